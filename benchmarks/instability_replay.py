"""Replay the ``instability`` rule, with other settings, on recorded runs: how a rule change is tried offline.

Each change of the rule (docs/alerts.md, rounds 2-6) was first judged on recorded runs: every logging step's
:class:`~gradwatch.StepRecord` (with the loss the rule's gate reads) fed again to a fresh
:class:`~gradwatch.alerts.instability.Instability` built with the settings tried, its first warning scored
against the run's own blow-up (:func:`~gradwatch.reference.instability.blowup`), as the suite scores. The
rule sees exactly what it saw live: with the default settings the replay reproduces each run's recorded first
warning (checked on every replay, mismatches printed).

Record the suite's TinyGPT runs (calibration and held-out sets)::

    python benchmarks/instability_replay.py record-suite runs/rec/suite [--heldout] [--only NAME ...]

and stock LMs with ``benchmarks/instability_stock.py --record runs/rec/round5 ...`` (the zoo venv). Then::

    python benchmarks/instability_replay.py replay runs/rec/* [--rule falling=0.01 inflate_from=20] [--runs]

prints, per folder and over all, the suite's figures (recall, median lead, runs that did neither yet were
warned) for the default rule and for the settings tried, and the runs whose verdict changed.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import pickle
import sys
import time
from collections.abc import Sequence
from typing import Any

from gradwatch.alerts.instability import Instability
from gradwatch.alerts.measurements import Measurements
from gradwatch.reference.instability import blowup, heldout_runs, runs, train_run


def record_suite(folder: str, heldout: bool, only: Sequence[str] | None) -> None:
    """Train the suite's runs (calibration, or held-out) and pickle each one's records and losses."""
    os.makedirs(folder, exist_ok=True)
    for run in heldout_runs() if heldout else runs():
        if only and run.name not in only:
            continue
        mon, losses, seconds = train_run(run)
        live = next((a.step for a in mon.alerts if a.rule == "instability" and a.severity != "info"), None)
        with open(os.path.join(folder, f"{run.name}.pkl"), "wb") as f:
            pickle.dump({"run": run, "records": mon.records, "losses": losses, "live_warning": live}, f,
                        protocol=pickle.HIGHEST_PROTOCOL)
        print(f"{run.name}: {seconds:.1f} s", file=sys.stderr, flush=True)


def first_warning(records: Sequence[Any], settings: dict[str, Any]) -> int | None:
    """The step of the first warning a fresh rule with ``settings`` finds on ``records``, as the monitor feeds it
    (:meth:`Measurements.from_record`, each record's own layer kinds)."""
    rule = Instability(**settings)
    for rec in records:
        kinds = dict(zip(rec.layers, rec.kinds)) if len(rec.kinds) == len(rec.layers) else {}
        if any(a.severity != "info" for a in rule.check(Measurements.from_record(rec, kinds))):
            return int(rec.step)
    return None


def verdict(blew: int | None, warned: int | None) -> str:
    """As the suite's scorecard (``benchmarks/instability_stock.py``)."""
    if blew is None:
        return "quiet" if warned is None else "false alarm"
    return "warned ahead" if warned is not None and warned < blew else ("late" if warned is not None else "missed")


def figures(rows: Sequence[tuple[int | None, int | None]]) -> str:
    """``recall a/b, median lead L; c of d that did neither were warned`` over (blew up, warned) pairs."""
    blew = [(b, w) for b, w in rows if b is not None]
    ahead = sorted(b - w for b, w in blew if w is not None and w < b)
    calm = [w for b, w in rows if b is None]
    lead = ahead[len(ahead) // 2] if len(ahead) % 2 else (sum(ahead[len(ahead) // 2 - 1:len(ahead) // 2 + 1]) / 2
                                                         if ahead else float("nan"))
    return (f"recall {len(ahead)}/{len(blew)}, median lead {lead:g}; "
            f"{sum(w is not None for w in calm)} of {len(calm)} that did neither were warned")


def _one(job: tuple[str, dict[str, Any], bool]) -> tuple[str, int | None, int | None, int | None, int | None]:
    """One recorded run: its name, blow-up, live first warning, the default rule's replayed (the live one when
    not ``check``ed) and the tried settings'."""
    path, settings, check = job
    with open(path, "rb") as f:
        rec = pickle.load(f)
    blew, _ = blowup(rec["losses"])
    base = first_warning(rec["records"], {}) if check or not settings else rec["live_warning"]
    tried = first_warning(rec["records"], settings) if settings else base
    return rec["run"].name, blew, rec["live_warning"], base, tried


def replay(folders: Sequence[str], settings: dict[str, Any], show_runs: bool, check: bool = True,
           jobs: int = 1) -> int:
    total: dict[str, list[tuple[int | None, int | None]]] = {"default": [], "tried": []}
    mismatches, start = [], time.perf_counter()
    with multiprocessing.Pool(jobs) as pool:
        for folder in folders:
            rows: dict[str, list[tuple[int | None, int | None]]] = {"default": [], "tried": []}
            paths = sorted(glob.glob(os.path.join(folder, "*.pkl")))
            for name, blew, live, base, tried in pool.imap(_one, [(p, settings, check) for p in paths]):
                if live != base:  # the replay must reproduce what the rule did live
                    mismatches.append(f"{name}: live {live}, replayed {base}")
                rows["default"].append((blew, base))
                rows["tried"].append((blew, tried))
                if show_runs and base != tried:
                    print(f"  {os.path.basename(folder.rstrip('/'))}/{name}: blew up {blew}; {base} "
                          f"({verdict(blew, base)}) -> {tried} ({verdict(blew, tried)})")
            for k in total:
                total[k] += rows[k]
            print(f"- **{os.path.basename(folder.rstrip('/'))}** default: {figures(rows['default'])}"
                  + (f"; tried: {figures(rows['tried'])}" if settings else ""), flush=True)
    tried = f"; tried: {figures(total['tried'])}" if settings else ""
    print(f"- **all** default: {figures(total['default'])}{tried}")
    print(f"{len(total['default'])} runs replayed in {time.perf_counter() - start:.0f} s; settings tried: "
          f"{json.dumps(settings)}" + ("" if check or not settings else "; the default taken from the live runs"))
    for m in mismatches:
        print(f"replay differs from the live run: {m}")
    return 1 if mismatches else 0


def _setting(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected key=value with a JSON value (e.g. falling=0.01)")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record-suite", help="record the suite's TinyGPT runs")
    rec.add_argument("folder")
    rec.add_argument("--heldout", action="store_true")
    rec.add_argument("--only", nargs="+")
    rep = sub.add_parser("replay", help="replay the rule on recorded runs")
    rep.add_argument("folders", nargs="+")
    rep.add_argument("--rule", nargs="+", type=_setting, default=[], help="Instability settings tried: key=value")
    rep.add_argument("--runs", action="store_true", help="print the runs whose first warning changed")
    rep.add_argument("--no-check", action="store_true",
                     help="take the default rule's warnings from the live runs instead of replaying them too")
    rep.add_argument("--jobs", type=int, default=1, help="runs replayed at once (processes)")
    args = ap.parse_args(argv)
    if args.cmd == "record-suite":
        record_suite(args.folder, args.heldout, args.only)
        return 0
    return replay(args.folders, dict(args.rule), args.runs, not args.no_check, args.jobs)


if __name__ == "__main__":
    sys.exit(main())
