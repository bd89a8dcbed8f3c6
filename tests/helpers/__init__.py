"""Helpers the tests share: event files read back, independent reference norms, small batches."""

from __future__ import annotations

import glob
import os

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn


def read_events(log_dir: str) -> dict:
    """Every scalar and histogram of the one run under ``log_dir``, read back with TensorBoard's reader."""
    files = glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))
    assert files, f"no event file in {log_dir}"
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    histograms = {tag: {e.step: e.histogram_value for e in acc.Histograms(tag)} for tag in acc.Tags()["histograms"]}
    return {"scalars": scalars, "histograms": histograms}


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
