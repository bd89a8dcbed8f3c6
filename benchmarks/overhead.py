"""Step-time overhead of gradwatch on a CIFAR ResNet-56, writing to TensorBoard as users do (run by hand).

Identical nets train side by side in one process: bare (twice: the second is a noise control); monitored with
the defaults (parameter metrics, block flow, alert rules) at ``every=50`` and ``every=1``; and monitored with
parameter metrics only (``blocks=None, rules=False``) at ``every=1``. Every monitor writes TensorBoard events
(``Monitor(model, optimizer=opt, log_dir=...)``, the README's set-up) to a temporary folder. Steps are
interleaved (the order rotates every round) so that machine noise hits all alike; the report gives the median
step time of each, the median of per-round ratios against the bare step, and the monitor's work per logging
step (median over rounds of the step time minus the bare step time; the noise control shows the spread).

    .venv/bin/python benchmarks/overhead.py --steps 200 --batch 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import gradwatch
from gradwatch.blocks import resnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="image side (CIFAR: 32)")
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    configs = {
        "bare": None,
        "bare #2": None,  # noise control: a second bare net
        "every=50": {"every": 50},
        "every=1": {"every": 1},
        "params/1": {"every": 1, "blocks": None, "rules": False},
    }
    runs = {}
    out = tempfile.mkdtemp(prefix="gradwatch-overhead-")
    for label, options in configs.items():
        torch.manual_seed(0)
        model = resnet(args.depth)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        log_dir = os.path.join(out, label.replace("/", "_").replace("=", ""))
        mon = gradwatch.Monitor(model, optimizer=opt, log_dir=log_dir, **options) if options else None
        runs[label] = (model, opt, mon)

    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    times: dict[str, list[float]] = {k: [] for k in configs}
    labels = list(configs)
    for step in range(args.warmup + args.steps):
        k = step % len(labels)
        order = labels[k:] + labels[:k]
        for label in order:
            model, opt, _ = runs[label]
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            if step >= args.warmup:
                times[label].append(dt)

    bare = times["bare"]
    print(f"ResNet-{args.depth}, batch {args.batch}x3x{args.size}x{args.size}, {args.steps} interleaved steps, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("every=50/every=1: defaults (parameter metrics + block flow + rules); params/1: blocks=None, rules=False")
    print(f"{'config':<10} {'median ms':>10} {'median ratio':>13} {'extra ms/step':>14}")
    for label in labels:
        ratios = [t / b for t, b in zip(times[label], bare)]
        extra = [t - b for t, b in zip(times[label], bare)]
        print(f"{label:<10} {1e3 * statistics.median(times[label]):10.2f} {statistics.median(ratios):13.4f} "
              f"{1e3 * statistics.median(extra):14.2f}")
    # the logging steps alone, for every=50
    logged = [t / b for i, (t, b) in enumerate(zip(times["every=50"], bare)) if (i + args.warmup) % 50 == 0]
    if logged:
        print(f"every=50, logging steps only: median ratio {statistics.median(logged):.4f} over {len(logged)} steps")
    for label in labels[2:]:
        mon = runs[label][2]
        mon.close()
        print(f"{label}: {mon.measurements} measurements, {len(mon.errors)} contained errors")
    print(f"TensorBoard events under {out}")


if __name__ == "__main__":
    main()
