"""Measure what the alert rules see on the reference nets: the evidence behind the defaults in docs/alerts.md.

Trains each net on the demo's generated 16x16 images (SGD lr 0.05, momentum 0.9, weight decay 5e-4, as
``gradwatch demo``) with a Monitor whose rules are on, then prints, per net, the alerts that fired and the
range of each rule's statistic over the logging steps (at step 0 and after it). "worst 3-run" is the
statistic's least extreme value over the most extreme run of 3 consecutive logging steps: what a rule with
patience 3 would have to cross.

    python benchmarks/calibrate_alerts.py                          # all nets, 200 steps, batch 8, every 5
    python benchmarks/calibrate_alerts.py --nets plain56,broken56 --steps 60
    python benchmarks/calibrate_alerts.py --no-blocks --nets postact56,preact56,postact110,preact110
    python benchmarks/calibrate_alerts.py --nets postact20,preact20 --steps 30 --every 1   # shallow, near init
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

import gradwatch
from gradwatch.reference.blocks import resnet
from gradwatch.reference.data import synthetic_images
from gradwatch.reference.demo import train as train_recipe
from gradwatch.alerts import Measurements, depth_slope, early_ratio
from gradwatch.measure.layers import layer_kinds

NETS = {
    "postact20": lambda: resnet(20),
    "preact20": lambda: resnet(20, block="preact"),
    "postact56": lambda: resnet(56),
    "preact56": lambda: resnet(56, block="preact"),
    "postact110": lambda: resnet(110),
    "preact110": lambda: resnet(110, block="preact"),
    "plain56": lambda: resnet(56, block="plain"),
    "broken56": lambda: resnet(56, skip_fault={13: "detached"}),
    "scaled56": lambda: resnet(56, skip_fault={13: ("scaled", 1e-4)}),
}


def train(
    name: str, steps: int, batch: int, every: int, seed: int, blocks: bool = True
) -> tuple[gradwatch.Monitor, float]:
    torch.manual_seed(seed)
    model = NETS[name]()
    x, y = synthetic_images(512, size=16, seed=seed)
    start = time.perf_counter()
    extra = {} if blocks else {"blocks": None}  # without block flow: depth_trend uses its layer proxy
    mon = train_recipe(model, x, y, steps=steps, batch_size=batch, seed=seed, every=every, alerts_path=False,
                       **extra)
    return mon, time.perf_counter() - start


def worst_run(values: np.ndarray, low: bool, run: int = 3) -> float:
    """Over windows of ``run`` consecutive values: the most extreme window's least extreme value."""
    v = values[np.isfinite(values)]
    if len(v) < run:
        return math.nan
    windows = np.lib.stride_tricks.sliding_window_view(v, run)
    return float(windows.max(axis=1).min()) if low else float(windows.min(axis=1).max())


def spike_factors(global_norms: np.ndarray, warmup: int = 5, weight: float = 0.1, cap: float = 10.0) -> np.ndarray:
    """The Exploding rule's spike statistic at each logging step (NaN during warm-up)."""
    out, base = [], None
    for i, g in enumerate(global_norms):
        x = math.log(g)
        out.append(math.exp(x - base) if base is not None and i >= warmup else math.nan)
        if base is not None:
            x = min(x, base + math.log(cap))
        base = x if base is None else (1 - weight) * base + weight * x
    return np.array(out)


def report(name: str, mon: gradwatch.Monitor, secs: float) -> None:
    kinds = layer_kinds(mon.model)
    ms = Measurements.from_history(mon.history(), kinds)
    ratio = np.array([getattr(early_ratio(m), "ratio", math.nan) for m in ms])
    slopes = [depth_slope(m) for m in ms]
    unit = next((s[0] for s in slopes if s is not None), "-")
    slope = np.array([s[1] if s is not None else math.nan for s in slopes])
    total = np.array([s[1] * (s[2] - 1) if s is not None else math.nan for s in slopes])
    share = np.array([np.nanmin(m.block_values("skip_share")) if m.blocks else math.nan for m in ms])
    spikes = spike_factors(np.array([m.whole.get("grad_norm", math.nan) for m in ms]))
    n_blocks = len(ms[0].blocks) if ms else 0
    fired = [f"{a.rule}/{a.severity}@{a.step}" + (f"({a.name})" if a.name else "") for a in mon.alerts]
    print(f"\n{name}: {len(ms)} logging steps, {n_blocks} blocks measured, {secs:.1f} s")
    print(f"  alerts: {', '.join(fired) if fired else 'none'}")

    def row(label: str, v: np.ndarray, low: bool | None) -> None:
        if not np.isfinite(v).any():
            print(f"  {label:<34} (not measured)")
            return
        rest = v[1:] if len(v) > 1 else v
        rest = rest[np.isfinite(rest)]
        w = f"  worst 3-run {worst_run(v[1:], low):9.3g}" if low is not None else ""
        print(f"  {label:<34} step 0 {v[0]:9.3g}  after: min {rest.min():9.3g} max {rest.max():9.3g}{w}")

    row("early/median grad_to_weight", ratio, True)
    row("  (same, for exploding)", ratio, False)
    row(f"depth slope, decades per {unit}", slope, False)
    row("  (same, toward the input)", slope, True)
    row("  fitted end-to-end change, decades", total, False)
    row("  (same, toward the input)", total, True)
    row("min skip_share over blocks", share, True)
    row("global grad_norm / baseline", spikes, None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", default=",".join(n for n in NETS if not n.endswith("20")),
                   help=f"comma-separated, from {list(NETS)}")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-blocks", action="store_true", help="turn block flow off (depth_trend's layer proxy)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"steps {args.steps}, batch {args.batch}, 16x16 generated images, every {args.every}, seed {args.seed}, "
          f"torch {torch.__version__}")
    for name in args.nets.split(","):
        mon, secs = train(name, args.steps, args.batch, args.every, args.seed, blocks=not args.no_blocks)
        report(name, mon, secs)


if __name__ == "__main__":
    main()
