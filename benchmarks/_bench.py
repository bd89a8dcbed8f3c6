"""Shared pieces of the benchmarks: models, the floor, interleaved timing, the table (run by hand)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradwatch.reference.blocks import resnet


def stack(tensors: int, width: int = 64) -> nn.Module:
    """Alternating Linear and LayerNorm layers, 2 parameter tensors each, ``tensors`` in all (a 1,202-tensor
    stack is 601 layers): a model with many small layers, where per-layer Python costs show."""
    layers: list[nn.Module] = []
    for i in range(tensors // 2):
        layers.append(nn.Linear(width, width) if i % 2 == 0 else nn.LayerNorm(width))
    return nn.Sequential(*layers, nn.Flatten())


def build(name: str, tensors: int = 1202) -> tuple[nn.Module, Callable[[int], tuple[torch.Tensor, torch.Tensor]]]:
    """A model and a batch maker: ``resnet56`` (CIFAR, 32x32) or ``stack`` (``tensors`` tensors, width 64)."""
    if name.startswith("resnet"):
        model = resnet(int(name.removeprefix("resnet")))
        return model, lambda b: (torch.randn(b, 3, 32, 32), torch.randint(0, 10, (b,)))
    model = stack(tensors)
    return model, lambda b: (torch.randn(b, 64), torch.randint(0, 64, (b,)))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def floor(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 20) -> float:
    """What any per-layer monitor must do on a logging step: one fused norm over all gradients, one over all
    weights, one host transfer. Median seconds over ``repeats`` (after a backward, gradients in place)."""
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        g = torch._foreach_norm(grads)
        w = torch._foreach_norm(params)
        torch.stack([*g, *w]).cpu()
        out.append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    return statistics.median(out)


def interleave(runs: dict[str, Callable[[], None]], steps: int, warmup: int = 5) -> dict[str, list[float]]:
    """Time one step of each run per round, the order rotating every round so noise hits all alike."""
    labels = list(runs)
    times: dict[str, list[float]] = {k: [] for k in labels}
    for step in range(warmup + steps):
        k = step % len(labels)
        for label in labels[k:] + labels[:k]:
            t0 = time.perf_counter()
            runs[label]()
            dt = time.perf_counter() - t0
            if step >= warmup:
                times[label].append(dt)
    return times


def table(times: dict[str, list[float]], bare: str, logging: dict[str, int], floor_s: float,
          offset: int = 0) -> list[str]:
    """Median step, median per-round ratio to ``bare``, the cost of a logging step (median of step minus bare
    over the logging steps; ``logging[label]`` is the cadence; ``offset`` the warm-up steps not timed) and
    that cost in floors."""
    rows = [f"{'config':<16} {'median ms':>10} {'ratio':>8} {'log-step +ms':>13} {'x floor':>8}"]
    base = times[bare]
    for label, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base)]
        every = logging.get(label)
        cost = ""
        if every:
            extra = [t - b for i, (t, b) in enumerate(zip(ts, base)) if (i + offset) % every == 0]
            if extra:  # a cadence longer than the timed steps logs none of them
                c = statistics.median(extra)
                cost = f"{1e3 * c:13.2f} {c / floor_s:8.1f}"
            else:
                cost = f"{'(none timed)':>13}"
        rows.append(f"{label:<16} {1e3 * statistics.median(ts):10.2f} {statistics.median(ratios):8.4f} {cost}")
    return rows
