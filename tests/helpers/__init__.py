"""Helpers the tests share: event files read back, independent reference norms, small batches."""

from __future__ import annotations

import glob
import os

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn


def read_events(log_dir: str) -> dict:
    """Every scalar and histogram of the one run under ``log_dir``, read back with TensorBoard's reader, and
    ``series``: the per-layer (per-block) values of gradwatch's series tensors as ``{"<group>/<metric>/<name>":
    {step: value}}`` (the tag ``layer_scalars=True`` would give them), decoded with TensorBoard's own
    ``tensor_util``."""
    files = glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))
    assert files, f"no event file in {log_dir}"
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    histograms = {tag: {e.step: e.histogram_value for e in acc.Histograms(tag)} for tag in acc.Tags()["histograms"]}
    return {"scalars": scalars, "histograms": histograms, "series": _series(acc)}


def _series(acc: EventAccumulator) -> dict:
    from tensorboard.util import tensor_util

    out: dict = {}
    tags = acc.Tags()["tensors"]
    for names_tag in [t for t in tags if t.endswith("/series/_names")]:
        group = names_tag[: -len("/series/_names")]
        names = {e.step: [n.decode() for n in tensor_util.make_ndarray(e.tensor_proto).tolist()]
                 for e in acc.Tensors(names_tag)}
        for tag in [t for t in tags if t.startswith(group + "/series/") and "/_" not in t[len(group):]]:
            metric = tag.rsplit("/", 1)[1]
            for e in acc.Tensors(tag):
                for n, v in zip(names[e.step], tensor_util.make_ndarray(e.tensor_proto).tolist(), strict=True):
                    out.setdefault(f"{group}/{metric}/{n}", {})[e.step] = v
    return out


def reference_norms(model: nn.Module, strip: str = "") -> dict[str, dict[str, float]]:
    """Per-layer norms computed directly in float64, one module at a time (the independent check)."""
    out = {}
    for name, module in model.named_modules():
        params = [p for p in module._parameters.values() if p is not None and p.requires_grad and p.grad is not None]
        if not params:
            continue
        g = sum(float(p.grad.double().pow(2).sum()) for p in params) ** 0.5
        w = sum(float(p.detach().double().pow(2).sum()) for p in params) ** 0.5
        out[name.removeprefix(strip) or "_root"] = {"grad_norm": g, "weight_norm": w, "grad_to_weight": g / w}
    return out


def small_batch(n: int = 4, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)
