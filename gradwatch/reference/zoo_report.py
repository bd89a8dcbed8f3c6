"""The zoo's report and command line: a Markdown table per kind of entry (``docs/validation.md``), a JSON
dump of every result, and :func:`main_with`, the body of ``python -m gradwatch.reference.zoo``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import logging
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..alerts import default_rules
from ..version import __version__
from ._json import dump_json
from ._sections import write_head
from .zoo_run import FULL, QUICK, ZooResult, alert_text, run_entry

__all__ = ["report", "main_with", "Source", "source"]


# ---------------------------------------------------------------------------------------------- the report
def _g(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "inf" if x == math.inf else "–"
    return f"{x:.{digits}g}"


def _m(margin: float) -> str:
    """A margin, bold when the statistic is past the threshold."""
    if not isinstance(margin, float) or math.isnan(margin):
        return ""
    text = "∞" if margin == math.inf else f"{margin:.2g}"
    return f" (**×{text}**)" if margin < 1 else f" (×{text})"


def _row_stats(s: dict[str, dict[str, Any]]) -> list[str]:
    van, exp, dep = s.get("vanishing", {}), s.get("exploding", {}), s.get("depth_trend", {})
    skip, dead = s.get("skip_collapse", {}), s.get("dead_layer", {})
    ratio = (f"{_g(van.get('worst'))}{_m(van.get('margin', math.nan))} / "
             f"{_g(exp.get('worst'))}{_m(exp.get('margin', math.nan))}")
    if dep.get("unit"):
        unit = dep["unit"] + ("" if len(dep.get("units", [])) < 2 else "*")
        slope = (f"{dep['worst']:+.3f}/{unit}, {_g(dep.get('end_to_end_at_worst'))}x"
                 f"{_m(dep.get('margin', math.nan))}")
    else:
        slope = "–"
    share = f"{_g(skip.get('worst'))}{_m(skip.get('margin', math.nan))}" if skip.get("block") else "–"
    spike = (f"{_g(exp.get('spike_max'))}x; held {_g(exp.get('spike_worst_run'))}x"
             f"{_m(exp.get('spike_margin', math.nan))}") if np.isfinite(exp.get("spike_max", math.nan)) else "–"
    zero = f"{dead.get('worst', 0)} ({dead.get('at_first_step', 0)} at first)" if dead.get("worst") else "0"
    return [ratio, slope, share, spike, zero]


def report(results: Sequence[ZooResult], header: str = "") -> str:
    """The Markdown report: ``header``, a table of the healthy models, a table of the faults, skipped entries
    and the list of failures."""
    lines = [header.rstrip(), ""] if header else []
    healthy = [r for r in results if r.healthy and r.status != "skipped"]
    faults = [r for r in results if not r.healthy and r.status != "skipped"]
    lines += [
        "## Healthy models (must raise no warning or critical alert)", "",
        "| model | library | optimiser | merges found / expected | flow | alerts ≥ warning | info alerts | "
        "early_ratio min / max | worst depth slope, fitted end to end | min skip_share | max grad-norm spike | "
        "zero-grad layers (max) | loss | time | pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in healthy:
        if r.status == "error":
            lines.append(f"| {r.name} | {r.library} | {r.recipe} | | | | | | | | | | | | **error** |")
            continue
        info = [a for a in r.alerts if a["severity"] == "info"]
        lines.append("| " + " | ".join([
            r.name, r.library, r.recipe, f"{r.merges_found} / {r.merges_expected}", r.flow_status.split(":")[0],
            ", ".join(alert_text(a) for a in r.loud()) or "none",
            ", ".join(alert_text(a) for a in info) or "none", *_row_stats(r.stats),
            f"{r.loss_first:.3g} → {r.loss_last:.3g}", f"{r.seconds:.0f} s ({r.steps_per_s:.1f}/s)",
            "yes" if r.status == "pass" else "**no**",
        ]) + " |")
    lines += [
        "", "## Planted faults (each expected rule must fire, warning or critical)", "",
        "| fault | what | merges found / expected | expected | fired (≥ warning) | info alerts | time | pass |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in faults:
        expect = ", ".join(k + (f" ({v})" if v else "") for k, v in r.expect.items())
        if r.status == "error":
            lines.append(f"| {r.name} | {r.about} | | {expect} | | | | **error** |")
            continue
        info = [a for a in r.alerts if a["severity"] == "info"]
        lines.append("| " + " | ".join([
            r.name, r.about, f"{r.merges_found} / {r.merges_expected}", expect,
            ", ".join(alert_text(a) for a in r.loud()) or "none", ", ".join(alert_text(a) for a in info) or "none",
            f"{r.seconds:.0f} s", "yes" if r.status == "pass" else "**no**",
        ]) + " |")
    skipped = [r for r in results if r.status == "skipped"]
    if skipped:
        lines += ["", "Skipped (library not installed): " + ", ".join(f"{r.name} ({r.library})" for r in skipped)
                  + "."]
    failed = [r for r in results if not r.passed]
    lines += ["", "## Failures", ""]
    lines += [f"- **{r.name}**: " + "; ".join(r.reasons) for r in failed] or ["None."]
    return "\n".join(lines) + "\n"


_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class Source:
    """Which code a zoo run measured: gradwatch's version and, in a git checkout, the commit and the files under
    ``gradwatch/`` and ``integrations/`` that differed from it when the run started."""

    version: str
    commit: str | None = None
    changed: tuple[str, ...] = ()

    def text(self) -> str:
        """What the published page says: the version and the commit. Nothing about the working tree: a run
        from a changed tree is refused or explicitly allowed before it starts (:func:`main_with`), and the
        JSON keeps the list of changed files."""
        return f"gradwatch {self.version}" + (f" at commit {self.commit}" if self.commit else "")

    def to_dict(self) -> dict[str, Any]:
        """For the JSON: the version, the commit, ``dirty`` (a flag) and the ``changed`` files."""
        return {"version": self.version, "commit": self.commit, "dirty": bool(self.changed),
                "changed": list(self.changed)}


def source(root: str = _ROOT) -> Source:
    """The :class:`Source` of the checkout at ``root``; only the version outside a git checkout."""

    def run(*args: str) -> str:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout

    try:
        commit = run("rev-parse", "--short", "HEAD").strip()
        changed = tuple(line[3:] for line in run("status", "--porcelain", "--", "gradwatch", "integrations")
                        .splitlines() if line.strip())
    except (OSError, subprocess.SubprocessError):
        return Source(__version__)
    return Source(__version__, commit, changed)


def _header(argv: Sequence[str], steps: int, every: int, threads: int, n: int, seconds: float | None,
            source: str) -> str:
    versions = []
    for dist in ("torch", "torchvision", "timm", "transformers"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} not installed")
    total = f", {seconds / 60:.1f} min in all" if seconds is not None else ""
    rules = {r.name: r for r in default_rules()}
    dep = rules.get("depth_trend")
    return "\n".join([
        "# Validation: the calibration zoo", "",
        "Generated by `python -m gradwatch.reference.zoo " + " ".join(argv) + "` (do not edit by hand) on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: {', '.join(versions)}, "
        f"Python {platform.python_version()}, {threads} CPU thread(s); {n} entries{total}. Source: {source}.",
        "",
        f"Each model is freshly initialised (seed 0) and trained {steps} steps (unless its row says otherwise) on "
        f"generated data under `gradwatch.Monitor(model, optimizer=opt, every={every}, log_dir=...)` with the "
        "default rules and block flow. Images are 32x32 (the reference nets' 16x16), batch 8; text is 32 tokens "
        "from a vocabulary of 1000, batch 8. SGD has momentum 0.9. Loss: mean of the first 10 steps → mean of "
        "the last 10. Code: `gradwatch/reference/zoo.py` (entries), `zoo_run.py` (training, statistics), "
        "`zoo_report.py` (this report). CI runs a pinned part of the zoo with torch and transformers only "
        "(`tests/reference/test_zoo.py`).",
        "",
        "Statistics are recomputed from `mon.records` with `gradwatch.alerts.early_ratio` / `depth_slope` "
        "(thresholds from `gradwatch.alerts.default_rules()`), over every logging step. **(×m)** is the margin: "
        "how many times the statistic held for the rule's patience would have to move to reach the threshold "
        "(bold below 1: past it). early_ratio: min is judged by `vanishing`, max by `exploding`. Depth slope: "
        "decades of the gradient per block (`grad_in`) or, for nets without blocks, per weight layer (`*`: both "
        "units occurred; – : too few points) at the step with the steepest slope, positive when the gradient "
        "decays toward the input, negative when it grows toward it; its margin counts either direction (the "
        "alert columns show the severity the rule gave) and combines the slope bound "
        f"({getattr(dep, 'per_block', '?')}/block, {getattr(dep, 'per_layer', '?')}/layer) and the end-to-end "
        f"bound ({getattr(dep, 'min_total', '?'):g}x) as the rule does. Spike: whole-model grad norm over its "
        "recent upper range (the exploding rule's reference: a quantile of the last logging steps' norms), "
        "the largest and the largest held for the rule's spike patience (its margin). "
        "Zero-grad layers: most layers with an exactly zero gradient at one logging step (and at the first "
        "logging step).",
    ])


def main_with(entries: Callable[..., list[Any]], argv: list[str] | None = None, root: str = _ROOT) -> int:
    """The command line of :mod:`gradwatch.reference.zoo`, given its ``entries`` function; ``root``: the
    checkout whose commit the report names (the one this package lives in)."""
    p = argparse.ArgumentParser(prog="python -m gradwatch.reference.zoo",
                                description="Train the calibration zoo under a default monitor and report.")
    p.add_argument("--quick", action="store_true", help=f"{QUICK[0]} steps, every {QUICK[1]}")
    p.add_argument("--only", help="comma-separated entry names")
    p.add_argument("--library", help="comma-separated: torchvision,timm,transformers,reference")
    p.add_argument("--steps", type=int, help=f"steps per entry (default {FULL[0]}; --quick {QUICK[0]})")
    p.add_argument("--every", type=int, help=f"logging interval (default {FULL[1]}; --quick {QUICK[1]})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="runs/zoo", help="TensorBoard runs go to OUT/<entry>")
    p.add_argument("--out-md", help="write the Markdown report here")
    p.add_argument("--json", help="write the results as JSON here (rewritten after every entry)")
    p.add_argument("--verbose", action="store_true", help="show gradwatch's alert log lines while training")
    p.add_argument("--allow-dirty", action="store_true",
                   help="write --out-md although gradwatch/ or integrations/ differ from the commit it names")
    args = p.parse_args(argv)
    # The page names the commit a reader checks out to reproduce it, and says nothing about the working tree.
    # A run from a tree whose code differs from that commit cannot be reproduced from what the page says, so
    # --out-md refuses it, before hours of training rather than after. --allow-dirty is for the usual
    # exception, rules tuned on the zoo's evidence and committed together with the page they produced; the
    # JSON lists the changed files either way, for whoever audits the run, and the page's command line shows
    # the --allow-dirty.
    src = source(root)  # as the run starts: the rules it ran with
    if args.out_md and src.changed and not args.allow_dirty:
        p.error(f"uncommitted changes to {', '.join(src.changed)}: the page would name commit {src.commit}, "
                "which is not the code that ran; commit them first, or pass --allow-dirty to write it anyway")
    argv = list(sys.argv[1:] if argv is None else argv)
    steps = args.steps or (QUICK if args.quick else FULL)[0]
    every = args.every or (QUICK if args.quick else FULL)[1]
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = entries(args.library.split(",") if args.library else None)
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - {e.name for e in chosen}
        if unknown:
            p.error(f"unknown entries {sorted(unknown)}; choose from {[e.name for e in chosen]}")
        chosen = [e for e in chosen if e.name in names]
    log = logging.getLogger("gradwatch")
    quiet = None if args.verbose else logging.NullHandler()
    if quiet is not None:  # alerts are in the report; keep the console to one line per entry
        log.addHandler(quiet)
        log.propagate = False
    results: list[ZooResult] = []
    start = time.perf_counter()
    try:
        for i, entry in enumerate(chosen, 1):
            res = run_entry(entry, steps, every, args.out, args.seed)
            results.append(res)
            if args.json:
                _write_json(args.json, argv, steps, every, src, results)
            if res.status == "skipped":
                print(f"[{i}/{len(chosen)}] {res.name:<26} skipped: {res.reasons[0]}", flush=True)
                continue
            fired = ", ".join(alert_text(a) for a in res.loud()) or "no alerts ≥ warning"
            other = [r for r in res.reasons if not r.startswith("false alarm")]  # false alarms: in `fired`
            print(f"[{i}/{len(chosen)}] {res.name:<26} {res.status:<7} {res.seconds:6.1f} s  "
                  f"merges {res.merges_found}/{res.merges_expected}  {fired}"
                  + (f"  -- {'; '.join(other)}" if other else ""), flush=True)
    finally:
        if quiet is not None:
            log.removeHandler(quiet)
            log.propagate = True
    text = report(results, _header(argv, steps, every, torch.get_num_threads(), len(results),
                                   time.perf_counter() - start, src.text()))
    if args.out_md:
        write_head(args.out_md, text)  # the sections other scripts generate below it stay
    else:
        print(text)
    failed = [r.name for r in results if not r.passed]
    print(f"{len(results) - len(failed)}/{len(results)} passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _write_json(path: str, argv: Sequence[str], steps: int, every: int, src: Source,
                results: Sequence[ZooResult]) -> None:
    doc = {"command": "python -m gradwatch.reference.zoo " + " ".join(argv), "steps": steps, "every": every,
           "torch": torch.__version__, "source": src.to_dict(), "results": [asdict(r) for r in results]}
    dump_json(path, doc)
