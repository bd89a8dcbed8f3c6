"""Do the forward output norms of the linear layers warn of a loss spike? An offline test of the one signal
issue 26 names that gradwatch does not measure (arXiv 2410.16682: the output norms of QKV, proj and FC2 grow
before divergence), on the instability suite's own runs (docs/alerts.md, round 9).

What is measured, per ``nn.Linear`` and training step: its **gain**, the RMS of its output over the RMS of its
input (a layer's output norm, freed of the residual stream's own growth, which every run shows). A candidate
trigger fires when some layer's gain (all layers, or one kind: ``qkv``, ``proj``, ``mlp.0``, ``mlp.2``,
``head``) has grown ``threshold`` times over the last ``lag`` steps, for 3 steps in a row, from step ``start``
on. Each (kind, lag, threshold, start) of a grid is scored as the suite scores: recall and median lead on the
runs that blew up (:func:`~gradwatch.reference.instability.blowup`), warnings on the runs that did neither.

Record the suite's calibration and held-out runs (its training loop, monitor on; here about 4 and 6 min)::

    python benchmarks/instability_forward.py record runs/fwd/cal
    python benchmarks/instability_forward.py record runs/fwd/held --heldout

then print the frontier (the best recall at each count of false alarms) over the grid::

    python benchmarks/instability_forward.py scan runs/fwd/cal runs/fwd/held [--starts 60 80]
"""

from __future__ import annotations

import argparse
import itertools
import os
import pickle
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from _trigger_scan import frontier, outcome, recordings
from gradwatch.reference.instability import Run, blowup, build, heldout_runs, runs, train

KINDS = ("all", "qkv", "proj", "mlp.0", "mlp.2", "head")
PATIENCE = 3  # steps in a row, as the instability rule's inflation trigger


def record(run: Run) -> dict[str, Any]:
    """Train ``run`` as the suite does (its model and batches from ``build``, then ``train``), with a forward hook
    on every linear layer keeping its output and input RMS at each training step (no ``torch.no_grad`` forward
    runs in the suite); returns the per-layer log gains, (steps,) each, and the losses."""
    torch.set_num_threads(1)
    model, batch = build(run)
    rms: dict[str, list[torch.Tensor]] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            # one stacked tensor per layer at the end: no host sync per step
            rms.setdefault(name, []).append(torch.stack([out.detach().float().square().mean().sqrt(),
                                                         args[0].detach().float().square().mean().sqrt()]))
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        _, losses, _ = train(run, model, batch, lambda net, b: net.loss(b))
    finally:
        for h in handles:
            h.remove()
    gains = {}
    for name, values in rms.items():
        out, inp = torch.stack(values).double().T.numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            gains[name] = np.log(out / inp)
    return {"run": run, "gains": gains, "losses": losses}


def first_warning(gains: dict[str, np.ndarray], kind: str, lag: int, threshold: float, start: int) -> int | None:
    """The first step at which some layer of ``kind`` has grown its gain ``threshold`` times over ``lag`` steps,
    the ``PATIENCE``-th step in a row, from ``start`` on."""
    rows = [g for n, g in gains.items() if kind == "all" or n.endswith(kind)]
    if not rows:
        return None
    a = np.array(rows)
    steps = a.shape[1]
    grown = np.full(steps, -np.inf)
    with np.errstate(invalid="ignore"):
        grown[lag:] = np.nanmax(a[:, lag:] - a[:, :-lag], axis=0)
    hit = (grown > np.log(threshold)) & (np.arange(steps) >= start)
    held = np.convolve(hit.astype(int), np.ones(PATIENCE, dtype=int))[:steps] >= PATIENCE
    at = np.flatnonzero(held)
    return int(at[0]) if len(at) else None


def scan(folders: Sequence[str], starts: Sequence[int]) -> None:
    """Score the grid on the recorded runs; print, per count of false alarms, the setting with the best recall."""
    recorded = [(blowup(d["losses"])[0], d["gains"]) for d in recordings(folders)]
    blew = sum(b is not None for b, _ in recorded)
    print(f"{len(recorded)} runs, {blew} blew up, from {', '.join(folders)}")
    scored = []
    for kind, lag, threshold, start in itertools.product(KINDS, (10, 20, 30), (1.5, 2, 3, 5), starts):
        pairs = [(b, first_warning(g, kind, lag, threshold, start)) for b, g in recorded]
        scored.append((*outcome(pairs), f"{kind} lag={lag} threshold={threshold:g} start={start}"))
    print(f"{len(scored)} settings; the best recall at each count of false alarms (of {len(recorded) - blew}) "
          f"where it improves:")
    frontier(scored, len(recorded) - blew, blew)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="train the suite's runs with the gains recorded")
    rec.add_argument("folder")
    rec.add_argument("--heldout", action="store_true")
    sc = sub.add_parser("scan", help="score the grid of candidate triggers on recorded runs")
    sc.add_argument("folders", nargs="+")
    sc.add_argument("--starts", nargs="+", type=int, default=[40, 60, 80])
    args = ap.parse_args(argv)
    if args.cmd == "record":
        os.makedirs(args.folder, exist_ok=True)
        for run in heldout_runs() if args.heldout else runs():
            d = record(run)
            with open(os.path.join(args.folder, f"{run.name}.pkl"), "wb") as f:
                pickle.dump(d, f, protocol=pickle.HIGHEST_PROTOCOL)
            print(f"{run.name}: blew up at {blowup(d['losses'])[0]}", file=sys.stderr, flush=True)
    else:
        scan(args.folders, args.starts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
