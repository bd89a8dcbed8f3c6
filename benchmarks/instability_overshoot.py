"""Does a layer overshoot before a loss spike? An offline test of a signal gradwatch does not measure (issue 26,
docs/alerts.md round 10): the **overshoot ratio** of each weight layer along its own last update.

Why this signal. A step ``d = w_t - w_{t-1}`` that is small against the loss's curvature along ``d`` leaves the
gradient's component along ``d`` as it was; the best step along ``d`` zeroes it; a step more than twice as long
as the best (the 1-D edge of stability, ``lr x curvature > 2``) flips it and makes it larger than it was, and
the next step along ``d`` overshoots further: a divergence starts. So per layer and step

    r_t = (g_t . d) / (g_{t-1} . d),    d = w_t - w_{t-1}

reads 1 for a small step, 0 for the best one, below -1 past the edge. Stable training under a large learning
rate sits near the edge (the edge of stability, Cohen et al. 2021, 2022); the question is whether runs that
blow up are pushed past it, for long enough, earlier than the present rule's signals move. The batch differs
between t-1 and t, so ``r`` is noisy; the triggers use a median over recent steps. Also recorded: the cosine of
consecutive updates and of consecutive gradients (a layer oscillating along its sharpest direction turns them
negative) and the norms.

It costs what gradwatch does not keep: the previous gradient and update of every weight layer (two copies of
the weights), so it is tried offline before anything is built. Record the suite's runs (its own loop,
:func:`~gradwatch.reference.instability.train`, monitor on; the hooks are global optimizer step hooks and read
only)::

    python benchmarks/instability_overshoot.py record runs/osh/cal
    python benchmarks/instability_overshoot.py record runs/osh/held --heldout

then score a grid of candidate triggers as the suite scores runs::

    python benchmarks/instability_overshoot.py scan runs/osh/cal runs/osh/held

and the same for stock LM families (``benchmarks/instability_stock.py``'s runs; the zoo venv, about 10 s a run
beside another job), then read the signals where the present rule first warned (could one of them hold back its
false alarms, the near-edge runs?)::

    PYTHONPATH=$PWD /work/zoovenv/bin/python benchmarks/instability_overshoot.py record-stock runs/osh/round8 --set round8
    python benchmarks/instability_overshoot.py scan runs/osh/round7 runs/osh/round8
    python benchmarks/instability_overshoot.py gate runs/osh/round7 runs/osh/round8
"""

from __future__ import annotations

import argparse
import itertools
import os
import pickle
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from _trigger_scan import frontier, outcome, recordings
from gradwatch.reference.instability import Run, blowup, build, heldout_runs, runs, score, train

#: per layer and step: g_t.d_t (own step), g_t.d_{t-1}, g_t.g_{t-1}, d_t.d_{t-1}, |g_t|^2, |d_t|^2, |w_t|^2
COLUMNS = ("gd", "gdprev", "ggprev", "ddprev", "gg", "dd", "ww")


@contextmanager
def watching() -> Iterator[dict[str, list[torch.Tensor]]]:
    """Global optimizer step hooks: for every weight matrix (``ndim >= 2``) an optimizer steps, the ``COLUMNS``
    per step, a (7,) float64 tensor per layer and step in the yielded dict, keyed ``p<index>`` in the
    optimizer's parameter order (the aggregates read layers, not names). Read only: the hooks clone and
    multiply; nothing the optimizer reads is written. One optimizer at a time."""
    before: dict[int, torch.Tensor] = {}
    prev: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    out: dict[str, list[torch.Tensor]] = {}

    def weights(opt: Any) -> list[torch.Tensor]:
        return [p for g in opt.param_groups for p in g["params"] if p.ndim >= 2]

    def pre(opt: Any, args: Any, kwargs: Any) -> None:
        for i, p in enumerate(weights(opt)):
            before[i] = p.detach().clone()

    def post(opt: Any, args: Any, kwargs: Any) -> None:
        for i, p in enumerate(weights(opt)):
            if p.grad is None:
                continue
            g = p.grad.detach().double().flatten()
            d = (p.detach() - before[i]).double().flatten()
            gp, dp = prev.get(i, (torch.zeros_like(g), torch.zeros_like(d)))
            out.setdefault(f"p{i}", []).append(torch.stack([g @ d, g @ dp, g @ gp, d @ dp, g @ g, d @ d,
                                                            p.detach().double().square().sum()]))
            prev[i] = (g, d)

    h1 = register_optimizer_step_pre_hook(pre)
    h2 = register_optimizer_step_post_hook(post)
    try:
        yield out
    finally:
        h1.remove()
        h2.remove()


def _stacked(out: dict[str, list[torch.Tensor]]) -> dict[str, np.ndarray]:
    """(steps, 7) per layer; a layer that missed steps (no gradient) is left out (the aggregates need one length)."""
    longest = max((len(v) for v in out.values()), default=0)
    return {n: torch.stack(v).numpy() for n, v in out.items() if len(v) == longest}


def record(run: Run) -> dict[str, Any]:
    """Train ``run`` as the suite does, with the ``COLUMNS`` recorded per weight layer and step."""
    torch.set_num_threads(1)
    model, batch = build(run)
    with watching() as out:
        mon, losses, seconds = train(run, model, batch, lambda net, b: net.loss(b))
    return {"run": run, "stats": _stacked(out), "losses": losses, "warning": score(run, mon, losses, seconds).warning}


def record_stock(set_name: str, folder: str) -> None:
    """The stock LM families of ``benchmarks/instability_stock.py --set set_name`` (zoo venv), each run as that
    script runs it (its ``run_stock``, the suite's loop and monitor), recorded; also the present rule's first
    warning (``instability`` alone) to compare against."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _lm_families import GRID as LRS, SETS  # noqa: PLC0415 (needs transformers: the zoo venv)
    from instability_stock import run_stock  # noqa: PLC0415

    os.makedirs(folder, exist_ok=True)
    families, seeds = SETS[set_name]
    for family in families:
        for lr in LRS[family]:
            for seed in seeds:
                with watching() as out:
                    _, alone = run_stock(family, lr, seed)
                d = {"run": SimpleNamespace(name=alone.run), "stats": _stacked(out), "losses": alone.losses,
                     "warning": alone.warning}
                with open(os.path.join(folder, f"{alone.run}.pkl"), "wb") as f:
                    pickle.dump(d, f, protocol=pickle.HIGHEST_PROTOCOL)
                print(f"{alone.run}: blew up at {blowup(alone.losses)[0]}, warned {alone.warning}", file=sys.stderr,
                      flush=True)


def signals(stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """(layers, steps) arrays of the candidate signals: ``r`` the overshoot ratio, ``cos_d`` and ``cos_g`` the
    cosines of consecutive updates and gradients."""
    names = sorted(stats)
    a = np.stack([stats[n] for n in names])  # (layers, steps, 7)
    gd, gdprev, ggprev, ddprev, gg, dd = (a[..., i] for i in range(6))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.full(gd.shape, np.nan)
        r[:, 1:] = gdprev[:, 1:] / gd[:, :-1]
        cos_d = np.full(gd.shape, np.nan)
        cos_d[:, 1:] = ddprev[:, 1:] / np.sqrt(dd[:, 1:] * dd[:, :-1])
        cos_g = np.full(gd.shape, np.nan)
        cos_g[:, 1:] = ggprev[:, 1:] / np.sqrt(gg[:, 1:] * gg[:, :-1])
    return {"names": np.array(names), "r": r, "cos_d": cos_d, "cos_g": cos_g}


def _rolling_median(a: np.ndarray, k: int) -> np.ndarray:
    """Median over the last ``k`` steps, per row (NaN until ``k`` steps are in)."""
    out = np.full(a.shape, np.nan)
    if a.shape[1] >= k:
        win = np.lib.stride_tricks.sliding_window_view(a, k, axis=1)
        out[:, k - 1:] = np.nanmedian(win, axis=-1)
    return out


def first_warning(sig: dict[str, np.ndarray], signal: str, k: int, bar: float, layers: int,
                  start: int) -> int | None:
    """The first step from ``start`` at which at least ``layers`` layers' median ``signal`` over the last ``k``
    steps is below ``bar`` (the overshoot ratio and the cosines fall when a layer overshoots)."""
    med = _rolling_median(sig[signal], k)
    with np.errstate(invalid="ignore"):
        count = (med < bar).sum(axis=0)
    hit = (count >= layers) & (np.arange(med.shape[1]) >= start)
    at = np.flatnonzero(hit)
    return int(at[0]) if len(at) else None


def load(folders: Sequence[str]) -> list[tuple[str, int | None, dict[str, np.ndarray]]]:
    """(name, blew-up step, signals) of each recorded run."""
    return [(d["run"].name, blowup(d["losses"])[0], signals(d["stats"])) for d in recordings(folders)]


GRID = {"r": (-2.0, -1.0, -0.5, 0.0), "cos_d": (0.0, 0.3, 0.5), "cos_g": (-0.3, -0.1, 0.0)}


def scan(folders: Sequence[str], starts: Sequence[int]) -> None:
    """Score the grid; print, per count of false alarms, the setting with the best recall."""
    recorded = load(folders)
    blew = sum(b is not None for _, b, _ in recorded)
    print(f"{len(recorded)} runs, {blew} blew up, from {', '.join(folders)}")
    scored = []
    for signal, bars in GRID.items():
        for bar, k, layers, start in itertools.product(bars, (3, 5, 9), (1, 2, 3), starts):
            pairs = [(b, first_warning(s, signal, k, bar, layers, start)) for _, b, s in recorded]
            scored.append((*outcome(pairs), f"{signal}<{bar:g} k={k} layers={layers} start={start}"))
    print(f"{len(scored)} settings; the best recall at each count of false alarms (of {len(recorded) - blew}):")
    frontier(scored, len(recorded) - blew, blew)


def gate(folders: Sequence[str], k: int = 9) -> None:
    """Per run the present rule warned on: each signal's median over the last ``k`` steps, its median and 10th
    percentile over the layers, at the warning step; and whether the warning came ahead, late or on a run that
    did neither (a false alarm). A signal that could hold the false alarms back reads apart on them."""
    print(f"{'run':28s} {'blew up':>7s} {'warned':>6s}  {'cos_g med/p10':>13s}  {'r med/p10':>13s}  "
          f"{'cos_d med/p10':>13s}  verdict")
    for d in recordings(folders):
        b, w = blowup(d["losses"])[0], d.get("warning")
        if w is None:
            continue
        sig = signals(d["stats"])
        cells = []
        for name in ("cos_g", "r", "cos_d"):
            med = _rolling_median(sig[name], k)[:, w]
            cells.append(f"{np.nanquantile(med, 0.5):6.2f} {np.nanquantile(med, 0.1):6.2f}")
        verdict = "false alarm" if b is None else ("ahead" if w < b else "late")
        print(f"{d['run'].name:28s} {str(b):>7s} {w:>6d}  " + "  ".join(cells) + f"  {verdict}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="train the suite's runs with the overshoot statistics recorded")
    rec.add_argument("folder")
    rec.add_argument("--heldout", action="store_true")
    rec.add_argument("--only", nargs="*", default=None, help="run names")
    st = sub.add_parser("record-stock", help="train a set of stock LM families (zoo venv) with them recorded")
    st.add_argument("folder")
    st.add_argument("--set", default="round8")
    ga = sub.add_parser("gate", help="the signals where the present rule first warned")
    ga.add_argument("folders", nargs="+")
    sc = sub.add_parser("scan", help="score the grid of candidate triggers on recorded runs")
    sc.add_argument("folders", nargs="+")
    sc.add_argument("--starts", nargs="+", type=int, default=[30, 50])
    args = ap.parse_args(argv)
    if args.cmd == "record":
        os.makedirs(args.folder, exist_ok=True)
        for run in heldout_runs() if args.heldout else runs():
            if args.only and run.name not in args.only:
                continue
            d = record(run)
            with open(os.path.join(args.folder, f"{run.name}.pkl"), "wb") as f:
                pickle.dump(d, f, protocol=pickle.HIGHEST_PROTOCOL)
            print(f"{run.name}: blew up at {blowup(d['losses'])[0]}", file=sys.stderr, flush=True)
    elif args.cmd == "gate":
        gate(args.folders)
    elif args.cmd == "record-stock":
        record_stock(args.set, args.folder)
    else:
        scan(args.folders, args.starts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
