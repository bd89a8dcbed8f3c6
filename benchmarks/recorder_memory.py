"""What the flight recorder's ring buffer holds per recorded logging step (run by hand; docs/alerts.md).

For a CIFAR ResNet-56 (``gradwatch.reference.blocks.resnet(56)``, block flow on) and a 24-layer pre-LN
transformer encoder (torch's own ``nn.TransformerEncoderLayer``, ``norm_first=True``, block flow on), the
monitor runs ``--steps`` logging steps (``every=1``, alerting on, ``alerts_path`` set so the recorder exists, no
TensorBoard) with ``flight_recorder=64``, under ``history=1`` (the history keeps nothing the ring needs: the
worst case) and under ``history=None`` (the default: the history already holds every record, so the ring adds its
pointers only). Then the ring is emptied: the Python allocations (``tracemalloc``, numpy's arrays included) it
frees, over the records only the ring held, are the cost of one recorded step; the record's arrays' ``nbytes``
is printed beside it as an independent lower bound.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/recorder_memory.py
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import tracemalloc

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch.reference.blocks import resnet

RING = 64


class Encoder(nn.Module):
    """Token embedding, 24 pre-LN encoder layers (attention and MLP residuals: 48 merges), a head."""

    def __init__(self, layers: int = 24, dim: int = 32, vocab: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(x)))


def _batch(name: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "resnet56":
        return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    x = torch.randint(0, 64, (2, 16), generator=g)
    return x, x


def measure(name: str, steps: int, history: int | None) -> tuple[float, float, int, int]:
    """After ``steps`` logging steps with ``flight_recorder=64``: the bytes the ring alone keeps alive per
    recorded step (traced memory before and after the ring is emptied, over the records only it held), the bytes
    of one record's arrays (an independent lower bound), the layers and the blocks of one record."""
    torch.manual_seed(0)
    model = resnet(56) if name == "resnet56" else Encoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    folder = tempfile.mkdtemp()
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, alerts_path=os.path.join(folder, "alerts.jsonl"),
                            flight_recorder=RING, history=history)
    recorder = mon._out.recorder  # a private handle, in a benchmark only: the ring is emptied to weigh it
    assert recorder is not None
    g = torch.Generator().manual_seed(0)
    tracemalloc.start()
    for _ in range(steps):
        x, y = _batch(name, g)
        out = model(x)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    record = mon.latest
    assert record is not None
    only_ring = RING - 1 if history == 1 else 0  # the newest record is also the history's and mon.latest
    gc.collect()
    before, _ = tracemalloc.get_traced_memory()
    recorder._ring.clear()
    gc.collect()
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    arrays = record.layer_values.nbytes + record.whole.nbytes + record.block_values.nbytes
    mon.close()
    return (before - after) / max(only_ring, 1), arrays, len(record.layers), len(record.blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=RING + 16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in ("resnet56", "transformer24"):
        for history in (1, None):
            per_step, arrays, layers, blocks = measure(name, args.steps, history)
            if history == 1:
                said = f"the ring keeps {per_step:,.0f} bytes per recorded step ({per_step * RING / 1e6:.2f} MB)"
            else:  # no record is the ring's alone: what is left is its pointers and tracemalloc's noise
                said = f"emptying the ring frees {per_step:+,.0f} bytes in all (pointers only)"
            print(f"{name}: {layers} layers, {blocks} blocks; history={history}: {said}; one record's arrays: "
                  f"{arrays:,} bytes", flush=True)


if __name__ == "__main__":
    main()
