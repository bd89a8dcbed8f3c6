"""How many TensorBoard tags gradwatch writes per run, by model depth (docs/dashboard.md, "A bounded dashboard").

    PYTHONPATH=$PWD /work/zoovenv/bin/python benchmarks/dashboard_tags.py   # needs transformers for GPT-2

Trains each model for 2 logging steps with the default options and with ``layer_scalars=True`` (one scalar tag
per layer and metric, the old default), and counts the tags in the event file with TensorBoard's own reader:
scalar tags (Time Series cards), images, histograms, and the per-layer series tensors that keep the values.
"""

from __future__ import annotations

import sys
import tempfile

import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import gradwatch
from gradwatch.reference.blocks import resnet
from gradwatch.sinks.tags import MAX_SCALAR_TAGS


def _resnet56():
    model = resnet(56, width=4)
    return model, lambda: F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.randint(0, 10, (4,)))


def _gpt2_24():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=24, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    ids = torch.randint(0, 64, (2, 8))
    return model, lambda: model(ids, labels=ids).loss


class _Stack(nn.Module):
    """1,000 Linear+Tanh layers, no skips: a deep plain stack."""

    def __init__(self, depth: int = 1000, width: int = 8) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())])

    def forward(self, x):
        return self.layers(x)


def _stack():
    model = _Stack()
    return model, lambda: model(torch.randn(4, 8)).pow(2).mean()


def count(build, **options) -> dict[str, int]:
    torch.manual_seed(0)
    model, loss = build()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with tempfile.TemporaryDirectory() as d:
        mon = gradwatch.Monitor(model, optimizer=opt, every=1, log_dir=d, pictures=0, **options)
        for _ in range(2):
            loss().backward()
            opt.step()
            opt.zero_grad()
        mon.close()
        acc = EventAccumulator(d, size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
        acc.Reload()
        tags = acc.Tags()
        return {"layers": len(mon.layer_names), "blocks": len(mon.latest.blocks), "scalars": len(tags["scalars"]),
                "histograms": len(tags["histograms"]),
                "series": sum(1 for t in tags["tensors"] if "/series/" in t)}


def main() -> None:
    torch.set_num_threads(1)
    models = {"ResNet-56 (CIFAR)": _resnet56, "GPT-2, 24 layers": _gpt2_24, "1,000-layer Linear+Tanh stack": _stack}
    print(f"MAX_SCALAR_TAGS = {MAX_SCALAR_TAGS}")
    print("| model | layers | blocks | scalar tags (default) | scalar tags (layer_scalars=True) | histograms | series tensors |")
    print("|---|---|---|---|---|---|---|")
    for name, build in models.items():
        try:
            default, opt_in = count(build), count(build, layer_scalars=True)
        except ImportError as err:
            print(f"| {name} | skipped: {err} | | | | | |", file=sys.stderr)
            continue
        print(f"| {name} | {default['layers']} | {default['blocks']} | {default['scalars']} | {opt_in['scalars']} | "
              f"{default['histograms']} | {default['series']} |")
        assert default["scalars"] <= MAX_SCALAR_TAGS


if __name__ == "__main__":
    main()
