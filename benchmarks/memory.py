"""Memory over 10,000 logging steps: flat except the history, and the history's cost per step (run by hand).

A 10-layer MLP (width 32, ~10 layers + ``_global`` x 4 metrics) trains with ``Monitor(..., every=1,
log_dir=...)`` for ``--steps`` steps, twice: keeping the whole history (the default) and with
``history=100``. Python allocations (``tracemalloc``) and the process RSS are printed every ``--every``
steps; the history's bytes per logging step are the slope of the first run minus that of the second.

    .venv/bin/python benchmarks/memory.py --steps 10000
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import tracemalloc

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch


def run(steps: int, every: int, **options) -> list[tuple[int, float, float]]:
    torch.manual_seed(0)
    layers = [m for _ in range(9) for m in (nn.Linear(32, 32), nn.ReLU())]
    model = nn.Sequential(*layers, nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(256, 32), torch.randint(0, 10, (256,))
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, log_dir=tempfile.mkdtemp(), **options)
    out = []
    tracemalloc.start()
    for s in range(1, steps + 1):
        i = torch.randint(0, 256, (32,))
        F.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s % every == 0:
            mon.flush()
            current, _ = tracemalloc.get_traced_memory()
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            out.append((s, current / 1e6, rss))
    tracemalloc.stop()
    mon.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=1000)
    args = parser.parse_args()
    full = run(args.steps, args.every)
    bounded = run(args.steps, args.every, history=100)
    print(f"{'step':>6} {'traced MB (all history)':>24} {'traced MB (history=100)':>24} {'max RSS MB':>11}")
    for (s, a, rss), (_, b, _) in zip(full, bounded):
        print(f"{s:>6} {a:24.2f} {b:24.2f} {rss:11.0f}")
    n = full[-1][0] - full[0][0]
    slope_full = (full[-1][1] - full[0][1]) * 1e6 / n
    slope_bounded = (bounded[-1][1] - bounded[0][1]) * 1e6 / n
    print(f"growth per logging step: {slope_full:.0f} B (all history), {slope_bounded:.0f} B (history=100): "
          f"the history costs ~{slope_full - slope_bounded:.0f} B per logging step for this model")


if __name__ == "__main__":
    main()
