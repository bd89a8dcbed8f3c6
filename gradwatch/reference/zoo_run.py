"""Train zoo entries under a default monitor and measure what each rule judged.

:func:`run_entry` trains one :class:`~gradwatch.reference.zoo.ZooEntry` (``Monitor(model, optimizer=opt,
every=E, log_dir=<out>/<name>)``, rules and block flow at their defaults) and returns a :class:`ZooResult`:
blocks found, flow status, every alert, and per rule the statistic it judged, recomputed from
``mon.records`` with the public statistics of :mod:`gradwatch.alerts`, with its *margin* — how many times
the statistic would have to move to reach the rule's threshold (below 1: past it), over a run of the rule's
``patience`` consecutive logging steps, as the rule judges it. The entries and the command line are in
:mod:`gradwatch.reference.zoo`, the Markdown report in :mod:`gradwatch.reference.zoo_report`.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..alerts import Measurements, default_rules, depth_slope, early_ratio
from ..alerts._spike import spike_factors
from ..alerts.siblings import Siblings
from ..measure.layers import layer_kinds
from ..monitor import Monitor
from ..measure.order import ForwardOrder

if TYPE_CHECKING:  # typing only: the entries module imports this one
    from .zoo import ZooEntry

__all__ = ["ZooResult", "run_entry", "statistics", "alert_text", "QUICK", "FULL", "LOUD"]

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
    loss_first: float = math.nan  # mean of the first 10 steps' losses
    loss_last: float = math.nan   # mean of the last 10

    @property
    def passed(self) -> bool:
        """Whether the entry passed (a skipped one counts: its library is not installed)."""
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
    spike, warmup, window, q = (getattr(rule, k, None) for k in ("spike", "warmup", "spike_window", "spike_quantile"))
    if spike is None or warmup is None or window is None or q is None:
        return [math.nan] * len(norms)
    return spike_factors(norms, spike, window, q, warmup)


def _series(records: Sequence[Any], kinds: dict[str, str], forward: dict[str, int] | None,
            rules: dict[str, Any], siblings: Siblings | None = None) -> dict[str, Any]:
    """Each rule's statistic at every logging step (NaN where it could not be computed)."""
    van, dep, dead = rules.get("vanishing"), rules.get("depth_trend"), rules.get("dead_layer")
    min_total = math.log10(getattr(dep, "min_total", 100.0))
    out: dict[str, Any] = {k: [] for k in ("ratio", "median", "depth", "score", "norm", "zeros", "nonfinite")}
    shares: dict[str, list[float]] = {}
    streak: dict[str, int] = {}
    dead_layers: set[str] = set()
    for i, rec in enumerate(records):
        m = Measurements.from_record(rec, kinds, forward, siblings)
        er = early_ratio(m, getattr(van, "early", 0.25), getattr(van, "min_layers", 4))
        out["ratio"].append(er.ratio if er else math.nan)
        out["median"].append(er.early_median if er else math.nan)
        ds = depth_slope(m, getattr(dep, "min_points", 6))
        if ds is None:
            out["depth"].append((None, math.nan, math.nan))
            out["score"].append(math.nan)
        else:  # the rule fires when both the slope and the fitted end-to-end change pass their bounds
            unit, slope, points = ds
            total = 10 ** (abs(slope) * (points - 1))
            bound = getattr(dep, "per_block" if unit == "block" else "per_layer", math.nan)
            out["depth"].append((unit, slope, total))
            out["score"].append(math.copysign(min(abs(slope) / bound, math.log10(total) / min_total), slope))
        for name, share in zip(m.blocks, m.block_values("skip_share")):
            shares.setdefault(name, [math.nan] * i).append(float(share))
        for values in shares.values():  # a block missing at this step
            values.extend([math.nan] * (i + 1 - len(values)))
        g = m.values("grad_norm")
        zero = [m.layers[j] for j in np.flatnonzero(g == 0.0)]
        streak = {name: streak.get(name, 0) + 1 for name in zero}
        dead_layers.update(name for name, k in streak.items() if k >= getattr(dead, "patience", 3))
        out["zeros"].append(len(zero))
        whole = m.whole.get("grad_norm", math.nan)
        out["norm"].append(whole)
        out["nonfinite"].append(bool((~np.isfinite(g)).any() or not np.isfinite(whole)))
    out["shares"], out["dead_layers"] = shares, sorted(dead_layers)
    return out


def statistics(records: Sequence[Any], kinds: dict[str, str],
               forward: dict[str, int] | None = None, siblings: Siblings | None = None) -> dict[str, dict[str, Any]]:
    """Per rule, the statistic it judged over ``records`` (``mon.records``): its worst value, the worst value
    held for the rule's ``patience`` logging steps (``worst_run``), the threshold (from
    :func:`~gradwatch.alerts.default_rules`) and the margin. ``kinds``: :func:`~gradwatch.measure.layers.layer_kinds`;
    ``forward``: module name -> position in the forward pass (:class:`~gradwatch.measure.order.ForwardOrder`), as the
    monitor gives its rules; ``siblings``: the layers that read one input (:class:`~gradwatch.alerts.siblings.Siblings`
    of the same ForwardOrder), likewise. Reproduces the current rules' arithmetic; a threshold a rule lacks gives NaN."""
    rules = {r.name: r for r in default_rules()}
    pat = {name: getattr(r, "patience", 1) for name, r in rules.items()}
    s = _series(records, kinds, forward, rules, siblings)
    out: dict[str, dict[str, Any]] = {}
    if "vanishing" in rules:
        van = rules["vanishing"]
        low = _worst_run(s["ratio"], pat["vanishing"], low=True)
        floor = _worst_run(s["median"], pat["vanishing"], low=True)
        out["vanishing"] = {
            "statistic": "early_ratio", "worst": _nanmin(s["ratio"]), "worst_run": low,
            "threshold": getattr(van, "relative", None), "margin": _margin(low, getattr(van, "relative", None), True),
            "early_median_worst_run": floor, "floor": getattr(van, "floor", None),
            "floor_margin": _margin(floor, getattr(van, "floor", None), True),
        }
    if "exploding" in rules:
        exp = rules["exploding"]
        high = _worst_run(s["ratio"], pat["exploding"], low=False)
        spikes = _spikes(s["norm"], exp)
        held = _worst_run(spikes, getattr(exp, "spike_patience", 1), low=False)  # a warning needs it held
        out["exploding"] = {
            "statistic": "early_ratio", "worst": _nanmax(s["ratio"]), "worst_run": high,
            "threshold": getattr(exp, "relative", None), "margin": _margin(high, getattr(exp, "relative", None), False),
            "spike_max": _nanmax(spikes), "spike_worst_run": held, "spike_threshold": getattr(exp, "spike", None),
            "spike_margin": _margin(held, getattr(exp, "spike", None), False),
        }
    if "depth_trend" in rules:
        dep, depth = rules["depth_trend"], s["depth"]
        slopes = np.array([d[1] for d in depth], dtype=np.float64)
        k = int(np.nanargmax(np.abs(slopes))) if np.isfinite(slopes).any() else None
        score = _nanmax([_worst_run(s["score"], pat["depth_trend"], low=False),  # decay toward the input
                         _worst_run([-x for x in s["score"]], pat["depth_trend"], low=False)])  # growth
        out["depth_trend"] = {
            "statistic": "depth_slope", "unit": depth[k][0] if k is not None else None,
            "worst": depth[k][1] if k is not None else math.nan,
            "end_to_end_at_worst": depth[k][2] if k is not None else math.nan,
            "step_of_worst": records[k].step if k is not None else None,
            "units": sorted({d[0] for d in depth if d[0]}),
            "threshold_block": getattr(dep, "per_block", None), "threshold_layer": getattr(dep, "per_layer", None),
            "min_total": getattr(dep, "min_total", None), "score_worst_run": score,
            "margin": (1 / score if score > 0 else math.inf) if np.isfinite(score) else math.nan,
        }
    if "skip_collapse" in rules:
        threshold = getattr(rules["skip_collapse"], "threshold", None)
        per_block = {b: _worst_run(v, pat["skip_collapse"], low=True) for b, v in s["shares"].items()}
        finite = {b: v for b, v in per_block.items() if np.isfinite(v)}
        block = min(finite, key=finite.__getitem__) if finite else None
        worst = finite[block] if block else math.nan
        out["skip_collapse"] = {
            "statistic": "skip_share", "worst": _nanmin([_nanmin(v) for v in s["shares"].values()]),
            "worst_run": worst, "block": block, "threshold": threshold, "margin": _margin(worst, threshold, True),
        }
    if "dead_layer" in rules:
        out["dead_layer"] = {
            "statistic": "zero-gradient layers", "worst": max(s["zeros"], default=0),
            "at_first_step": s["zeros"][0] if s["zeros"] else 0,
            "zero_for_patience": len(s["dead_layers"]), "layers": s["dead_layers"][:10],
        }
    out["nonfinite"] = {"statistic": "non-finite steps", "worst": sum(s["nonfinite"]), "of": len(records)}
    return out


def _nanmin(v: Sequence[float]) -> float:
    a = np.asarray(v, dtype=np.float64)
    return float(np.nanmin(a)) if np.isfinite(a).any() else math.nan


def _nanmean(v: Sequence[float]) -> float:
    a = np.asarray(v, dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else math.nan


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
    siblings = Siblings()
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
                mon.loss(loss)  # as the Lightning and HF adapters give it: the instability rule reads the loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                if not order.finished:
                    forward = order.finish()
                    siblings = Siblings(order.siblings, forward)
        finally:
            res.seconds = time.perf_counter() - start
            mon.close()
            order.finish()
    except Exception as err:  # noqa: BLE001 - one broken model must not stop the zoo
        res.status, res.reasons = "error", [f"{type(err).__name__}: {err}"]
        return res
    res.steps_per_s = res.steps / res.seconds if res.seconds > 0 else math.nan
    res.loss_first, res.loss_last = _nanmean(losses[:10]), _nanmean(losses[-10:])
    res.merges_found = len(mon.describe())
    res.flow_status = str(mon.flow_status)
    res.logging_steps = len(mon.records)
    res.alerts = [{"rule": a.rule, "severity": a.severity, "step": a.step, "name": a.name,
                   "value": _num(a.value), "threshold": _num(a.threshold), "message": a.message}
                  for a in mon.alerts]
    res.stats = statistics(mon.records, layer_kinds(model), forward, siblings)
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
        res.reasons += [f"false alarm: {alert_text(a)}: {a['message']}" for a in res.loud()]
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


def alert_text(a: dict[str, Any]) -> str:
    """``rule@step (name)``, `` [critical]`` when critical."""
    where = f" ({a['name']})" if a["name"] else ""
    sev = " [critical]" if a["severity"] == "critical" else ""
    return f"{a['rule']}@{a['step']}{where}{sev}"
