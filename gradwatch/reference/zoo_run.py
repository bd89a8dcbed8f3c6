"""Train zoo entries under a default monitor, measure what each rule judged, and write the report.

:func:`run_entry` trains one :class:`~gradwatch.reference.zoo.ZooEntry` (``Monitor(model, optimizer=opt,
every=E, log_dir=<out>/<name>)``, rules and block flow at their defaults) and returns a :class:`ZooResult`:
blocks found, flow status, every alert, and per rule the statistic it judged, recomputed from
``mon.records`` with the public statistics of :mod:`gradwatch.alerts`, with its *margin* — how many times
the statistic would have to move to reach the rule's threshold (below 1: past it), over a run of the rule's
``patience`` consecutive logging steps, as the rule judges it. :func:`report` renders results as Markdown
(``docs/validation.md``). The entries and the command line are in :mod:`gradwatch.reference.zoo`.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..alerts import Measurements, default_rules, depth_slope, early_ratio
from ..layers import layer_kinds
from ..monitor import Monitor
from ..order import ForwardOrder
from ..version import __version__

if TYPE_CHECKING:  # typing only: the entries module imports this one
    from .zoo import ZooEntry

__all__ = ["ZooResult", "run_entry", "statistics", "report", "main_with", "QUICK", "FULL"]

#: (steps, every) of ``--quick`` and of a full run.
QUICK = (30, 2)
FULL = (300, 5)
LOUD = ("warning", "critical")


@dataclass
class ZooResult:
    """What one entry did. ``status``: ``"pass"``, ``"fail"`` (``reasons`` says why), ``"error"`` (the model
    did not run: ``reasons`` has the exception) or ``"skipped"`` (its library is not installed)."""

    name: str
    library: str
    about: str
    healthy: bool
    recipe: str
    status: str
    reasons: list[str] = field(default_factory=list)
    expect: dict[str, str | None] = field(default_factory=dict)
    merges_expected: int | None = None
    merges_found: int | None = None
    flow_status: str = ""
    alerts: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: int = 0
    every: int = 0
    logging_steps: int = 0
    seconds: float = math.nan
    steps_per_s: float = math.nan
    loss_first: float = math.nan
    loss_last: float = math.nan

    @property
    def passed(self) -> bool:
        return self.status in ("pass", "skipped")

    def loud(self) -> list[dict[str, Any]]:
        """The alerts of severity warning or critical."""
        return [a for a in self.alerts if a["severity"] in LOUD]


# ---------------------------------------------------------------------------------------------- statistics
def _worst_run(values: Sequence[float], run: int, low: bool) -> float:
    """Over every ``run`` consecutive values: the least extreme value of the most extreme window (NaN breaks a
    window). ``low``: extreme means small. NaN when no window is complete."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < run:
        return math.nan
    win = np.lib.stride_tricks.sliding_window_view(v, run)
    ok = np.isfinite(win).all(axis=1)
    if not ok.any():
        return math.nan
    win = win[ok]
    return float(win.max(axis=1).min()) if low else float(win.min(axis=1).max())


def _margin(value: float, threshold: Any, low: bool) -> float:
    """How many times ``value`` would have to move to reach ``threshold`` (``low``: the rule fires below it)."""
    if threshold is None or not np.isfinite(value) or threshold == 0:
        return math.nan
    if value <= 0:
        return 0.0 if low else math.inf
    return value / threshold if low else threshold / value


def _spikes(norms: Sequence[float], rule: Any) -> list[float]:
    """The exploding rule's grad-norm spike factor per logging step (NaN in warm-up), as the rule computes it."""
    spike, warmup, w = (getattr(rule, k, None) for k in ("spike", "warmup", "baseline_weight"))
    if spike is None or warmup is None or w is None:
        return [math.nan] * len(norms)
    out, base, seen = [], None, 0
    for g in norms:
        if not (np.isfinite(g) and g > 0):
            out.append(math.nan)
            continue
        out.append(math.exp(math.log(g) - base) if base is not None and seen >= warmup else math.nan)
        x = math.log(g) if base is None else min(math.log(g), base + math.log(spike))
        base = x if base is None else (1 - w) * base + w * x
        seen += 1
    return out


def statistics(records: Sequence[Any], kinds: dict[str, str],
               forward: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """Per rule, the statistic it judged over ``records`` (``mon.records``), its worst value, the worst value
    held for the rule's ``patience`` logging steps, the threshold (from :func:`default_rules`) and the
    margin. ``kinds``: :func:`~gradwatch.layers.layer_kinds`; ``forward``: module name -> position in the
    forward pass (:class:`~gradwatch.order.ForwardOrder`), as the monitor gives its rules. Reproduces the
    current rules' arithmetic; where a rule lacks an attribute the margin is NaN."""
    rules = {r.name: r for r in default_rules()}
    van, exp, dep = rules.get("vanishing"), rules.get("exploding"), rules.get("depth_trend")
    skip, dead = rules.get("skip_collapse"), rules.get("dead_layer")
    pat = {name: getattr(r, "patience", 1) for name, r in rules.items()}
    ratios, medians, slopes, scores, norms, zeros, bad = [], [], [], [], [], [], 0
    shares: dict[str, list[float]] = {}
    zero_runs: dict[str, int] = {}
    for i, rec in enumerate(records):
        m = Measurements.from_record(rec, kinds, forward)
        er = early_ratio(m, getattr(van, "early", 0.25), getattr(van, "min_layers", 4))
        ratios.append(er.ratio if er else math.nan)
        medians.append(er.early_median if er else math.nan)
        ds = depth_slope(m, getattr(dep, "min_points", 6))
        if ds is None:
            slopes.append((None, math.nan, math.nan))
            scores.append(math.nan)
        else:
            unit, slope, points = ds
            total = 10 ** (abs(slope) * (points - 1))
            slopes.append((unit, slope, total))
            bound = getattr(dep, "per_block" if unit == "block" else "per_layer", math.nan)
            reach = math.log10(total) / math.log10(getattr(dep, "min_total", 100.0))
            scores.append(math.copysign(min(abs(slope) / bound, reach), slope))
        for name, s in zip(m.blocks, m.block_values("skip_share")):
            shares.setdefault(name, [math.nan] * i).append(float(s))
        for series in shares.values():
            if len(series) <= i:
                series.append(math.nan)
        g = m.values("grad_norm")
        zero = [m.layers[j] for j in np.flatnonzero(g == 0.0)]
        zeros.append(len(zero))
        zero_runs = {n: zero_runs.get(n, 0) + 1 for n in zero} | {n: 0 for n in zero_runs if n not in zero}
        if any(v >= pat.get("dead_layer", 3) for v in zero_runs.values()):
            zero_runs["__fired__"] = zero_runs.get("__fired__", 0) + 1
        whole = m.whole.get("grad_norm", math.nan)
        norms.append(whole)
        bad += int((~np.isfinite(g)).any() or not np.isfinite(whole))
    out: dict[str, dict[str, Any]] = {}
    n = len(records)
    if van is not None:
        low = _worst_run(ratios, pat["vanishing"], low=True)
        floor = _worst_run(medians, pat["vanishing"], low=True)
        out["vanishing"] = {
            "statistic": "early_ratio", "worst": _nanmin(ratios), "worst_run": low,
            "threshold": getattr(van, "relative", None), "margin": _margin(low, getattr(van, "relative", None), True),
            "early_median_worst_run": floor, "floor": getattr(van, "floor", None),
            "floor_margin": _margin(floor, getattr(van, "floor", None), True),
        }
    if exp is not None:
        high = _worst_run(ratios, pat["exploding"], low=False)
        spikes = _spikes(norms, exp)
        top = _nanmax(spikes)
        out["exploding"] = {
            "statistic": "early_ratio", "worst": _nanmax(ratios), "worst_run": high,
            "threshold": getattr(exp, "relative", None), "margin": _margin(high, getattr(exp, "relative", None), False),
            "spike_max": top, "spike_threshold": getattr(exp, "spike", None),
            "spike_margin": _margin(top, getattr(exp, "spike", None), False),
        }
    if dep is not None:
        k = int(np.nanargmax(np.abs([s[1] for s in slopes]))) if any(np.isfinite(s[1]) for s in slopes) else None
        runs = [_worst_run(scores, pat["depth_trend"], low=False),
                _worst_run([-s for s in scores], pat["depth_trend"], low=False)]
        score = _nanmax(runs)
        out["depth_trend"] = {
            "statistic": "depth_slope", "unit": slopes[k][0] if k is not None else None,
            "worst": slopes[k][1] if k is not None else math.nan,
            "end_to_end_at_worst": slopes[k][2] if k is not None else math.nan,
            "step_of_worst": records[k].step if k is not None else None,
            "units": sorted({s[0] for s in slopes if s[0]}),
            "threshold_block": getattr(dep, "per_block", None), "threshold_layer": getattr(dep, "per_layer", None),
            "min_total": getattr(dep, "min_total", None), "score_worst_run": score,
            "margin": (1 / score if score > 0 else math.inf) if np.isfinite(score) else math.nan,
        }
    if skip is not None:
        per_block = {b: _worst_run(s, pat["skip_collapse"], low=True) for b, s in shares.items()}
        finite = {b: v for b, v in per_block.items() if np.isfinite(v)}
        block = min(finite, key=finite.get) if finite else None
        worst = finite[block] if block else math.nan
        out["skip_collapse"] = {
            "statistic": "skip_share", "worst": _nanmin([_nanmin(s) for s in shares.values()]),
            "worst_run": worst, "block": block, "threshold": getattr(skip, "threshold", None),
            "margin": _margin(worst, getattr(skip, "threshold", None), True),
        }
    if dead is not None:
        out["dead_layer"] = {"statistic": "zero-gradient layers", "worst": max(zeros, default=0),
                             "at_first_step": zeros[0] if zeros else 0,
                             "steps_with_a_run": zero_runs.get("__fired__", 0)}
    out["nonfinite"] = {"statistic": "non-finite steps", "worst": bad, "of": n}
    return out


def _nanmin(v: Sequence[float]) -> float:
    a = np.asarray(v, dtype=np.float64)
    return float(np.nanmin(a)) if np.isfinite(a).any() else math.nan


def _nanmax(v: Sequence[float]) -> float:
    a = np.asarray(v, dtype=np.float64)
    return float(np.nanmax(a)) if np.isfinite(a).any() else math.nan


# ---------------------------------------------------------------------------------------------- running
def run_entry(entry: ZooEntry, steps: int, every: int, out: str, seed: int = 0) -> ZooResult:
    """Train ``entry`` for ``steps`` steps (its own ``steps``/``every`` win) under a default monitor logging to
    ``<out>/<name>``; judge it. Never raises for the model's sake: a failure to build or train is ``"error"``."""
    res = ZooResult(entry.name, entry.library, entry.about, entry.healthy, str(entry.recipe), "pass",
                    expect=dict(entry.expect), merges_expected=entry.merges)
    if not entry.available:
        res.status, res.reasons = "skipped", [f"{entry.library} is not installed"]
        return res
    res.steps = entry.steps if entry.steps is not None else steps
    res.every = entry.every if entry.every is not None else every
    losses: list[float] = []
    forward: dict[str, int] = {}
    try:
        torch.manual_seed(seed)
        model = entry.build()
        model.train()
        opt = entry.recipe.make(model)
        sample = entry.task.sampler(seed)
        gen = torch.Generator().manual_seed(seed)
        order = ForwardOrder(model)  # the forward order the monitor's rules see, for the statistics
        mon = Monitor(model, optimizer=opt, every=res.every, log_dir=os.path.join(out, entry.name))
        start = time.perf_counter()
        try:
            for _ in range(res.steps):
                loss = entry.task.loss(model, sample(gen))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                if not order.finished:
                    forward = order.finish()
        finally:
            res.seconds = time.perf_counter() - start
            mon.close()
            order.finish()
    except Exception as err:  # noqa: BLE001 - one broken model must not stop the zoo
        res.status, res.reasons = "error", [f"{type(err).__name__}: {err}"]
        return res
    res.steps_per_s = res.steps / res.seconds if res.seconds > 0 else math.nan
    res.loss_first, res.loss_last = (losses[0], losses[-1]) if losses else (math.nan, math.nan)
    res.merges_found = len(mon.describe())
    res.flow_status = str(mon.flow_status)
    res.logging_steps = len(mon.records)
    res.alerts = [{"rule": a.rule, "severity": a.severity, "step": a.step, "name": a.name,
                   "value": _num(a.value), "threshold": _num(a.threshold), "message": a.message}
                  for a in mon.alerts]
    res.stats = statistics(mon.records, layer_kinds(model), forward)
    if mon.errors:
        res.reasons.append(f"monitor errors: {mon.errors[:3]}")
    _judge(res)
    del model, opt, mon
    gc.collect()
    return res


def _judge(res: ZooResult) -> None:
    if res.merges_expected is not None and res.merges_found != res.merges_expected:
        res.reasons.append(f"merges found {res.merges_found}, expected {res.merges_expected}")
    if res.healthy:
        res.reasons += [f"false alarm: {_alert_text(a)}" for a in res.loud()]
    else:
        for rule, name in res.expect.items():
            hits = [a for a in res.loud() if a["rule"] == rule and (name is None or a["name"] == name)]
            if not hits:
                res.reasons.append(f"missed: {rule}" + (f" naming {name}" if name else ""))
    if res.reasons:
        res.status = "fail"


def _num(x: float) -> float | str:
    x = float(x)
    return x if math.isfinite(x) else str(x)


def _alert_text(a: dict[str, Any]) -> str:
    where = f" ({a['name']})" if a["name"] else ""
    sev = " [critical]" if a["severity"] == "critical" else ""
    return f"{a['rule']}@{a['step']}{where}{sev}"


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
    spike = f"{_g(exp.get('spike_max'))}x{_m(exp.get('spike_margin', math.nan))}" \
        if np.isfinite(exp.get("spike_max", math.nan)) else "–"
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
        "zero-grad layers (max) | time | pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in healthy:
        if r.status == "error":
            lines.append(f"| {r.name} | {r.library} | {r.recipe} | | | | | | | | | | | **error** |")
            continue
        info = [a for a in r.alerts if a["severity"] == "info"]
        lines.append("| " + " | ".join([
            r.name, r.library, r.recipe, f"{r.merges_found} / {r.merges_expected}", r.flow_status.split(":")[0],
            ", ".join(_alert_text(a) for a in r.loud()) or "none",
            ", ".join(_alert_text(a) for a in info) or "none", *_row_stats(r.stats),
            f"{r.seconds:.0f} s ({r.steps_per_s:.1f}/s)", "yes" if r.status == "pass" else "**no**",
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
            ", ".join(_alert_text(a) for a in r.loud()) or "none", ", ".join(_alert_text(a) for a in info) or "none",
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


def _source() -> str:
    """gradwatch's version and, in a git checkout, the commit and the files changed since (rules in flux)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def run(*args: str) -> str:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout

    try:
        commit = run("rev-parse", "--short", "HEAD").strip()
        dirty = [line[3:] for line in run("status", "--porcelain", "--", "gradwatch", "integrations").splitlines()
                 if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return f"gradwatch {__version__}"
    changed = f", with uncommitted changes to {', '.join(f'`{d}`' for d in dirty)}" if dirty else ""
    return f"gradwatch {__version__} at commit {commit}{changed}"


def _header(argv: Sequence[str], steps: int, every: int, threads: int, n: int, seconds: float | None) -> str:
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
        f"Python {platform.python_version()}, {threads} CPU thread(s); {n} entries{total}. Source: {_source()}.",
        "",
        f"Each model is freshly initialised (seed 0) and trained {steps} steps (unless its row says otherwise) on "
        f"generated data under `gradwatch.Monitor(model, optimizer=opt, every={every}, log_dir=...)` with the "
        "default rules and block flow. Images are 32x32 (the reference nets' 16x16), batch 8; text is 32 tokens "
        "from a vocabulary of 1000, batch 8. SGD has momentum 0.9 and weight decay 5e-4; AdamW weight decay "
        "0.05. Code: `gradwatch/reference/zoo.py` (entries), `gradwatch/reference/zoo_run.py` (runner, report).",
        "",
        "Statistics are recomputed from `mon.records` with `gradwatch.alerts.early_ratio` / `depth_slope` "
        "(thresholds from `gradwatch.alerts.default_rules()`), over every logging step. **(×m)** is the margin: "
        "how many times the statistic held for the rule's patience would have to move to reach the threshold "
        "(bold below 1: past it). early_ratio: min is judged by `vanishing`, max by `exploding`. Depth slope: "
        "decades of the gradient per block (`grad_in`) or per weight layer (the fallback with too few blocks; "
        "`*`: both occurred), the step with the steepest slope; its margin combines the slope bound "
        f"({getattr(dep, 'per_block', '?')}/block, {getattr(dep, 'per_layer', '?')}/layer) and the end-to-end "
        f"bound ({getattr(dep, 'min_total', '?'):g}x) as the rule does. Spike: whole-model grad norm over its "
        "running baseline. Zero-grad layers: most layers with an exactly zero gradient at one logging step "
        "(and at the first logging step).",
    ])


def main_with(entries: Callable[..., list[Any]], argv: list[str] | None = None) -> int:
    """The command line of :mod:`gradwatch.reference.zoo`, given its ``entries`` function."""
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
    args = p.parse_args(argv)
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
            fired = ", ".join(_alert_text(a) for a in res.loud()) or "no alerts ≥ warning"
            print(f"[{i}/{len(chosen)}] {res.name:<26} {res.status:<7} {res.seconds:6.1f} s  "
                  f"merges {res.merges_found}/{res.merges_expected}  {fired}"
                  + (f"  -- {'; '.join(res.reasons)}" if res.reasons else ""), flush=True)
            if args.json:
                _write_json(args.json, argv, steps, every, results)
    finally:
        if quiet is not None:
            log.removeHandler(quiet)
            log.propagate = True
    text = report(results, _header(argv, steps, every, torch.get_num_threads(), len(results),
                                   time.perf_counter() - start))
    if args.out_md:
        with open(args.out_md, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        print(text)
    failed = [r.name for r in results if not r.passed]
    print(f"{len(results) - len(failed)}/{len(results)} passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _write_json(path: str, argv: Sequence[str], steps: int, every: int, results: Sequence[ZooResult]) -> None:
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    doc = {"command": "python -m gradwatch.reference.zoo " + " ".join(argv), "steps": steps, "every": every,
           "torch": torch.__version__, "results": [clean(asdict(r)) for r in results]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
