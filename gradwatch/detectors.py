"""Alert rules: turn one logging step's measurements into findings. Open this file to add a rule.

Every logging step the :class:`~gradwatch.Monitor` gathers what it recorded (per-layer metrics in forward
order, the whole-model ``_global`` entry and, when block flow is on, per-block metrics) into one
:class:`Measurements` and hands it to each :class:`Rule`. A rule returns the :class:`~gradwatch.Alert` s it
raises at that step; what happens next (cooldown, the JSONL record, sinks, the ``on_critical`` policy) is
:mod:`gradwatch.alerts`'s business. Rules keep their state (streak counters, running baselines) in plain
dicts so that it travels in the monitor's ``state_dict`` and survives checkpoint/resume.

Rules see the same numbers on every rank, so they reach the same verdict everywhere without communicating:
per-layer gradients are identical after DDP's all-reduce (FSDP/DTensor norms are all-reduced), and block-flow
metrics, measured on each rank's own activations, are averaged across ranks (root mean square of the per-rank
norms) when the monitor syncs ranks (``Monitor(sync_ranks=...)``: on by default for DDP-wrapped and DTensor
models, always in the Lightning callback). With ``sync_ranks=False`` the block rules may disagree across ranks.

Adding a rule::

    class TooQuiet(Rule):
        name = "too_quiet"
        def check(self, m):
            g = m.whole.get("grad_norm", float("nan"))
            if self.streak("all", g < 1e-9) >= self.patience:
                return [self.alert(m, "warning", None, g, 1e-9, "no gradient at all", "is the loss detached?")]
            return []

    gradwatch.Monitor(model, rules=[*gradwatch.detectors.default_rules(), TooQuiet()])

Defaults and the measurements behind them are in ``docs/alerts.md``
(reproduce with ``python benchmarks/calibrate_alerts.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from .alerts import Alert
from .flow import FLOW_METRICS
from .layers import GLOBAL_NAME, ROOT_NAME, clean_name

__all__ = [
    "BLOCK_METRICS",
    "short_list",
    "Measurements",
    "EarlyRatio",
    "early_ratio",
    "depth_slope",
    "Rule",
    "SkipCollapse",
    "Vanishing",
    "Exploding",
    "DepthTrend",
    "NonFinite",
    "DeadLayer",
    "RULES",
    "default_rules",
    "build_rules",
    "layer_kinds",
    "replay",
]

#: Per-block metric names written by block flow (:data:`gradwatch.flow.FLOW_METRICS`); anything else recorded is
#: a layer metric.
BLOCK_METRICS = FLOW_METRICS

_NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_EMBEDDING_TYPES: tuple[type, ...] = (nn.Embedding, nn.EmbeddingBag)


def layer_kinds(model: nn.Module) -> dict[str, str]:
    """What kind of layer each measured name is: ``"weight"``, ``"norm"``, ``"embedding"`` or ``"other"``.

    ``"weight"`` layers (convolutions, linear maps, attention projections: a parameter with two or more
    dimensions) are the ones whose gradient-to-weight ratios are comparable across depth. Normalisation
    layers (scale ~1, small gradients) and embeddings (only the looked-up rows get a gradient) are not.
    Keys cover both granularities: ``"layer1.0.conv1"`` and ``"layer1.0.conv1.weight"``.
    """
    kinds: dict[str, str] = {}
    for mod_name, module in model.named_modules():
        own = [(n, p) for n, p in module._parameters.items() if p is not None]
        if not own:
            continue
        layer = clean_name(mod_name) or ROOT_NAME
        if isinstance(module, _NORM_TYPES):
            kind = "norm"
        elif isinstance(module, _EMBEDDING_TYPES):
            kind = "embedding"
        elif any(p.dim() >= 2 for _, p in own if not isinstance(p, nn.parameter.UninitializedParameter)):
            kind = "weight"
        else:
            kind = "other"
        kinds.setdefault(layer, kind)
        for pname, p in own:
            full = f"{layer}.{pname}" if layer != ROOT_NAME else pname
            weight = kind == "weight" and not isinstance(p, nn.parameter.UninitializedParameter) and p.dim() >= 2
            kinds.setdefault(full, "weight" if weight else ("other" if kind == "weight" else kind))
    return kinds


@dataclass
class Measurements:
    """One logging step's measured values, as the rules see them.

    ``layers`` are the measured layer names in definition order (``named_modules()``); ``layer[metric]`` is an
    array aligned with it (NaN where a layer lacked that metric). ``whole`` holds the ``_global`` entry.
    ``blocks`` and ``block[metric]`` are the same for the residual blocks of block flow (empty without it).
    ``kinds`` maps layer names to :func:`layer_kinds` kinds. ``forward`` maps module names to the position in
    which they first ran in a forward pass, as the monitor recorded it on its first measured step (empty when
    unknown, e.g. in :func:`replay`); :meth:`forward_sorted` orders layers by it.

    The monitor fills one per logging step through :meth:`add` (every value it records passes through), so a
    new measurement source shows up here by recording its values; rules can also be fed by hand::

        m = Measurements(step=0, kinds={"a": "weight", "b": "weight"})
        m.add(["a", "b", "_global"], "grad_norm", np.array([1.0, 2.0, 2.24]))
    """

    step: int
    kinds: Mapping[str, str] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)
    layer: dict[str, np.ndarray] = field(default_factory=dict)
    whole: dict[str, float] = field(default_factory=dict)
    blocks: list[str] = field(default_factory=list)
    block: dict[str, np.ndarray] = field(default_factory=dict)
    forward: Mapping[str, int] = field(default_factory=dict)

    def forward_sorted(self, indices: Iterable[int]) -> list[int]:
        """Layer ``indices`` sorted in the order their modules ran in the forward pass (:attr:`forward`: module
        name -> position, recorded by the monitor on its first measured step); layers whose module was not
        seen (or no order recorded, e.g. in :func:`replay`) keep definition order, after the others."""
        def key(i: int) -> tuple[int, int]:
            name = self.layers[i]
            pos = self.forward.get(name)
            if pos is None:  # granularity="parameter": "layer1.0.conv1.weight" -> its module
                pos = self.forward.get(name.rsplit(".", 1)[0] if "." in name else ROOT_NAME)
            return (0, pos) if pos is not None else (1, i)
        return sorted(indices, key=key)

    def add(self, names: Sequence[str], metric: str, values: np.ndarray | Sequence[float]) -> None:
        """Add ``values[i]`` as ``metric`` of ``names[i]`` (a block metric if ``metric`` is one of
        :data:`BLOCK_METRICS`, else a layer metric; ``_global`` goes to :attr:`whole`)."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        names = list(names)
        if GLOBAL_NAME in names:
            i = names.index(GLOBAL_NAME)
            self.whole[metric] = float(values[i])
            names = names[:i] + names[i + 1:]
            values = np.delete(values, i)
        if metric in BLOCK_METRICS:
            self._put(self.blocks, self.block, names, metric, values)
        else:
            self._put(self.layers, self.layer, names, metric, values)

    @staticmethod
    def _put(order: list[str], table: dict[str, np.ndarray], names: list[str], metric: str,
             values: np.ndarray) -> None:
        if not order:
            order.extend(names)
        if names == order:
            table[metric] = values
            return
        index = {n: i for i, n in enumerate(order)}
        new = [n for n in names if n not in index]
        if new:  # a name seen first in this metric: grow every table
            order.extend(new)
            index.update({n: len(index) + k for k, n in enumerate(new)})
            for key, arr in table.items():
                table[key] = np.concatenate([arr, np.full(len(new), np.nan)])
        out = table.get(metric, np.full(len(order), np.nan)).copy()
        out[[index[n] for n in names]] = values
        table[metric] = out

    @classmethod
    def from_history(cls, history: Any, kinds: Mapping[str, str] | None = None) -> list[Measurements]:
        """One :class:`Measurements` per step of a ``mon.history()`` DataFrame (or a saved one read back), in
        step order, e.g. to try rules on a finished run (:func:`replay`). Layer order is the frame's order."""
        out = []
        for step, frame in history.groupby("step", sort=True):
            m = cls(step=int(step), kinds=dict(kinds or {}))
            for metric, rows in frame.groupby("metric", sort=False):
                m.add(list(rows["name"]), str(metric), rows["value"].to_numpy())
            out.append(m)
        return out

    def values(self, metric: str) -> np.ndarray:
        """Layer ``metric`` aligned with :attr:`layers` (all NaN when not measured)."""
        return self.layer.get(metric, np.full(len(self.layers), np.nan))

    def block_values(self, metric: str) -> np.ndarray:
        """Block ``metric`` aligned with :attr:`blocks` (all NaN when not measured)."""
        return self.block.get(metric, np.full(len(self.blocks), np.nan))

    def weight_layers(self) -> np.ndarray:
        """Indices into :attr:`layers` of the ``"weight"`` layers (conv, linear, ...), in forward order."""
        kinds = self.kinds
        return np.flatnonzero([kinds.get(n, "weight") == "weight" for n in self.layers])


class Rule:
    """Base class of alert rules.

    Subclasses set :attr:`name` and implement :meth:`check`, returning the alerts raised at this step
    (build them with :meth:`alert`). Keep every piece of state in :attr:`state` (a JSON-like dict): it is
    saved in the monitor's ``state_dict``. :meth:`streak` counts consecutive logging steps a condition held.
    """

    name = "rule"

    def __init__(self, patience: int = 3) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"{type(self).__name__}: patience must be an int >= 1, got {patience!r}")
        self.patience = patience
        self.state: dict[str, Any] = {"streaks": {}}

    def check(self, m: Measurements) -> list[Alert]:  # pragma: no cover - abstract
        raise NotImplementedError

    def streak(self, key: str, condition: bool) -> int:
        """Count consecutive logging steps on which ``condition`` held for ``key`` (0 resets)."""
        streaks = self.state["streaks"]
        n = streaks.get(key, 0) + 1 if condition else 0
        if n:
            streaks[key] = n
        else:
            streaks.pop(key, None)
        return n

    def alert(self, m: Measurements, severity: str, name: str | None, value: float, threshold: float,
              message: str, hint: str) -> Alert:
        return Alert(self.name, severity, int(m.step), name, float(value), float(threshold), message, hint)

    def state_dict(self) -> dict[str, Any]:
        return _plain(self.state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state = _plain(state)
        self.state.setdefault("streaks", {})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "state")
        return f"{type(self).__name__}({args})"


def _plain(obj: Any) -> Any:
    """A deep copy made of dicts, lists, str, int and float (what checkpoints store best)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def _early(idx: np.ndarray, fraction: float) -> np.ndarray:
    return idx[: max(1, math.ceil(len(idx) * fraction))]


@dataclass
class EarlyRatio:
    """median(grad_to_weight of the early weight layers) / median(grad_to_weight of all weight layers)."""

    ratio: float
    early_median: float
    typical: float
    early: list[str]


def early_ratio(m: Measurements, early: float = 0.25, min_layers: int = 4) -> EarlyRatio | None:
    """The statistic of :class:`Vanishing` and :class:`Exploding` (None with fewer than ``min_layers``
    weight layers with a finite ratio)."""
    g2w = m.values("grad_to_weight")
    idx = m.weight_layers()
    idx = idx[np.isfinite(g2w[idx])]
    if len(idx) < min_layers:
        return None
    first = _early(idx, early)
    typical = float(np.median(g2w[idx]))
    early_med = float(np.median(g2w[first]))
    ratio = early_med / typical if typical > 0 else math.nan
    return EarlyRatio(ratio, early_med, typical, [m.layers[i] for i in first])


def depth_slope(m: Measurements, min_points: int = 6) -> tuple[str, float, int] | None:
    """The statistic of :class:`DepthTrend`: ``(unit, slope, points)`` with ``slope`` the least-squares slope
    of log10(gradient) per ``unit`` of depth: ``"block"`` (``grad_in`` of the blocks, when block flow measured
    at least ``min_points``) or ``"layer"`` (``grad_to_weight`` of the weight layers but the last). None when
    there are too few points."""
    gin = m.block_values("grad_in")
    ok = np.isfinite(gin) & (gin > 0)
    if ok.sum() >= min_points:
        unit, y = "block", np.log10(gin[ok])
    else:
        vals = m.values("grad_to_weight")[m.weight_layers()[:-1]]
        vals = vals[np.isfinite(vals) & (vals > 0)]
        if len(vals) < min_points:
            return None
        unit, y = "layer", np.log10(vals)
    slope = float(np.polyfit(np.arange(len(y), dtype=np.float64), y, 1)[0])
    return unit, slope, len(y)


def short_list(names: Sequence[str], limit: int = 8) -> str:
    """``names`` joined with commas; past ``limit`` names, the first ``limit - 1``, an ellipsis and the last:
    ``"0, 2, … 6 (4 in all)"``. For messages (alerts here, the monitor's log lines)."""
    names = list(names)
    if len(names) <= limit:
        return ", ".join(names)
    head = ", ".join(names[:max(limit - 1, 1)])
    return f"{head}, … {names[-1]} ({len(names)} in all)"


def _check_fraction(value: float, arg: str, owner: str) -> float:
    if not 0 < value <= 1:
        raise ValueError(f"{owner}: {arg} must be in (0, 1], got {value!r}")
    return float(value)


def _check_positive(value: float | None, arg: str, owner: str, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{owner}: {arg} must be a number > 0, got {value!r}")
    return float(value)


class SkipCollapse(Rule):
    """A residual block's skip carries (almost) no gradient.

    Fires when a block's ``skip_share`` = skip_grad² / (skip_grad² + branch_grad²) stays below ``threshold``
    for ``patience`` consecutive logging steps; ``critical`` when it is below ``critical`` then. Names the
    block. Needs block flow (``Monitor(blocks="auto")``); without block metrics it stays silent.

    Defaults: healthy reference ResNets stay above 0.024 (post-activation, during training) and 0.16
    (pre-activation); a detached skip gives 0 and a skip scaled by 1e-4 gives ~1e-8.
    """

    name = "skip_collapse"

    def __init__(self, threshold: float = 1e-3, critical: float | None = None, patience: int = 3) -> None:
        super().__init__(patience)
        self.threshold = _check_positive(threshold, "threshold", self.name)
        self.critical = _check_positive(critical, "critical", self.name, allow_none=True)

    def check(self, m: Measurements) -> list[Alert]:
        share = m.block_values("skip_share")
        out = []
        for name, s in zip(m.blocks, share):
            low = bool(np.isfinite(s) and s < self.threshold)
            n = self.streak(name, low)
            if n >= self.patience:
                severity = "critical" if self.critical is not None and s < self.critical else "warning"
                out.append(self.alert(
                    m, severity, name, s, self.threshold,
                    f"block {name}: the skip carries {s:.3g} of the gradient reaching the block input "
                    f"(skip_share < {self.threshold:g} for {n} logging steps); the block trains like a plain one",
                    "look for a .detach(), a multiply by ~0 or a gate closing on the skip path of this block's "
                    "forward; healthy ResNets keep skip_share above ~0.02",
                ))
        return out


class Vanishing(Rule):
    """Early layers get far less gradient, relative to their weights, than the network typically does.

    Among the ``"weight"`` layers (conv/linear, in forward order), the *early* ones are the first ``early``
    fraction. The statistic is median(grad_to_weight of early layers) / median(grad_to_weight of all weight
    layers). Fires (warning) when it is below ``relative`` or the early median is below the absolute
    ``floor``, for ``patience`` consecutive logging steps; critical when the statistic is below
    ``critical``. Relative, so one default holds across models and learning rates; the floor catches a whole
    network whose gradients vanish together. Normalisation layers and embeddings are left out: their ratios
    live on another scale.
    """

    name = "vanishing"

    def __init__(self, relative: float = 0.02, floor: float | None = 1e-7, critical: float | None = 1e-4,
                 early: float = 0.25, patience: int = 3, min_layers: int = 4) -> None:
        super().__init__(patience)
        self.relative = _check_positive(relative, "relative", self.name)
        self.floor = _check_positive(floor, "floor", self.name, allow_none=True)
        self.critical = _check_positive(critical, "critical", self.name, allow_none=True)
        self.early = _check_fraction(early, "early", self.name)
        self.min_layers = int(min_layers)

    def check(self, m: Measurements) -> list[Alert]:
        stat = early_ratio(m, self.early, self.min_layers)
        if stat is None:
            self.streak("early", False)
            return []
        ratio, early_med, typical, names = stat.ratio, stat.early_median, stat.typical, stat.early
        rel_low = bool(np.isfinite(ratio) and ratio < self.relative)
        floor_low = self.floor is not None and early_med < self.floor
        n = self.streak("early", rel_low or floor_low)
        if n < self.patience:
            return []
        severity = "critical" if self.critical is not None and np.isfinite(ratio) and ratio < self.critical \
            else "warning"
        if rel_low:
            value, threshold = ratio, self.relative
            what = (f"early layers ({short_list(names, 3)}) have a median grad_to_weight {early_med:.3g}, "
                    f"{ratio:.3g} times the network's median {typical:.3g}")
        else:
            value, threshold = early_med, float(self.floor)
            what = f"early layers ({short_list(names, 3)}) have a median grad_to_weight {early_med:.3g} < {self.floor:g}"
        return [self.alert(
            m, severity, None, value, threshold,
            f"vanishing gradients: {what} for {n} logging steps; they have (almost) stopped learning",
            "typical of deep nets without skips or normalisation, saturating activations (sigmoid/tanh) or a "
            "bad init: add residual connections or BatchNorm/LayerNorm, use ReLU-family activations and "
            "He/Kaiming init; check the layers listed",
        )]


class Exploding(Rule):
    """Early layers far above the typical value, or a spike of the whole-model gradient norm.

    Two conditions, one rule: (1) median(grad_to_weight of early weight layers) / median(all weight layers)
    above ``relative`` for ``patience`` consecutive logging steps (with the same *early* as
    :class:`Vanishing`); (2) ``grad_norm`` of ``_global`` more than ``spike`` times its running baseline
    (a geometric moving average over logging steps, weight ``baseline_weight``, judged after ``warmup``
    steps). ``critical`` when the spike exceeds ``critical_spike``.
    """

    name = "exploding"

    def __init__(self, relative: float = 20.0, spike: float | None = 10.0, critical_spike: float | None = 1e3,
                 early: float = 0.25, patience: int = 1, warmup: int = 5, baseline_weight: float = 0.1,
                 min_layers: int = 4) -> None:
        super().__init__(patience)
        self.relative = _check_positive(relative, "relative", self.name)
        self.spike = _check_positive(spike, "spike", self.name, allow_none=True)
        self.critical_spike = _check_positive(critical_spike, "critical_spike", self.name, allow_none=True)
        self.early = _check_fraction(early, "early", self.name)
        self.warmup = int(warmup)
        self.baseline_weight = _check_fraction(baseline_weight, "baseline_weight", self.name)
        self.min_layers = int(min_layers)
        self.state.update({"log_baseline": None, "seen": 0})

    def check(self, m: Measurements) -> list[Alert]:
        out = []
        stat = early_ratio(m, self.early, self.min_layers)
        high = stat is not None and bool(np.isfinite(stat.ratio) and stat.ratio > self.relative)
        n = self.streak("early", high)
        if n >= self.patience and stat is not None:
            out.append(self.alert(
                m, "warning", None, stat.ratio, self.relative,
                f"exploding gradients toward the input: early layers ({short_list(stat.early, 3)}) have a median "
                f"grad_to_weight {stat.early_median:.3g}, {stat.ratio:.3g} times the network's median "
                f"{stat.typical:.3g}" + (f", for {n} logging steps" if n > 1 else ""),
                "typical of deep nets without skip connections (BatchNorm alone makes gradients grow toward the "
                "input at init); add residual connections, lower the learning rate or warm it up, clip gradients",
            ))
        g = m.whole.get("grad_norm", math.nan)
        if self.spike is not None and np.isfinite(g) and g > 0:
            base = self.state["log_baseline"]
            seen = int(self.state["seen"])
            if base is not None and seen >= self.warmup:
                factor = math.exp(math.log(g) - base)
                if factor > self.spike:
                    severity = "critical" if self.critical_spike is not None and factor > self.critical_spike \
                        else "warning"
                    out.append(self.alert(
                        m, severity, None, factor, self.spike,
                        f"gradient norm spike: the whole-model grad_norm {g:.3g} is {factor:.3g} times its running "
                        f"baseline {math.exp(base):.3g}",
                        "a bad batch, a too-high learning rate or an unstable layer: clip gradients "
                        "(torch.nn.utils.clip_grad_norm_), lower or warm up the learning rate, look at the "
                        "grad_norm curves of the layers to find where it starts",
                    ))
            # Update after judging; a spike moves the baseline by at most log(spike) so it cannot hide the next.
            x = math.log(g)
            if base is not None and self.spike is not None:
                x = min(x, base + math.log(self.spike))
            w = self.baseline_weight
            self.state["log_baseline"] = x if base is None else (1 - w) * base + w * x
            self.state["seen"] = seen + 1
        return out


class DepthTrend(Rule):
    """Gradient magnitude decaying or growing exponentially with depth.

    Fits log10 of the gradient against depth by least squares and fires when, for ``patience`` consecutive
    logging steps, the slope is beyond a bound *and* the fitted change from the first to the last point is more
    than ``min_total`` times (a shallow healthy net can be steep per block without going far: a ResNet-20 at
    init grows ~1.27x per block toward the input, 7x in all). With block flow the profile is ``grad_in``
    (‖dL/dx‖ at each block input, in depth order; bound ``per_block`` decades per block). Without it (no
    residual blocks found, e.g. a plain net) the proxy is ``grad_to_weight`` of the weight layers except the
    output layer (bound ``per_layer`` decades per layer). A positive slope (gradient larger at the output)
    means it decays toward the input; a negative one that it grows toward the input.
    """

    name = "depth_trend"

    def __init__(self, per_block: float = 0.1, per_layer: float = 0.05, min_total: float = 100.0,
                 patience: int = 3, min_points: int = 6) -> None:
        super().__init__(patience)
        self.per_block = _check_positive(per_block, "per_block", self.name)
        self.per_layer = _check_positive(per_layer, "per_layer", self.name)
        self.min_total = _check_positive(min_total, "min_total", self.name)
        self.min_points = int(min_points)

    def check(self, m: Measurements) -> list[Alert]:
        stat = depth_slope(m, self.min_points)
        if stat is None:
            self.streak("decay", False)
            self.streak("growth", False)
            return []
        unit, slope, points = stat
        bound = self.per_block if unit == "block" else self.per_layer
        total = 10 ** (abs(slope) * (points - 1))
        far = total > self.min_total
        decay = self.streak("decay", far and slope > bound)
        growth = self.streak("growth", far and slope < -bound)
        n = max(decay, growth)
        if n < self.patience:
            return []
        what = "block input gradient ‖dL/dx‖" if unit == "block" else "grad_to_weight of the weight layers"
        direction = "decays toward the input" if slope > 0 else "grows toward the input"
        return [self.alert(
            m, "warning", None, slope, bound if slope > 0 else -bound,
            f"depth trend: the {what} {direction} by {10 ** abs(slope):.3g}x per {unit} "
            f"(fitted over {points} {unit}s: {total:.3g}x end to end) for {n} logging steps",
            "an exponential profile over depth is the signature of a net that cannot pass gradient through "
            "its depth: add or repair skip connections, normalisation, or the init scale"
            + (" (look for blocks with low skip_share or transmission far from 1)" if unit == "block" else ""),
        )]


class NonFinite(Rule):
    """A NaN or Inf gradient: critical at once, naming the first layer in forward order where it appears.

    Forward order is the order the modules ran in on the monitor's first measured step
    (:attr:`Measurements.forward`); layers it did not see, and all layers when it is unknown (:func:`replay`),
    follow in definition order.

    Raised once per episode (the first non-finite step after finite ones): once a NaN reached the weights,
    every later step is non-finite too.

    A NaN born in the backward pass spreads to every layer *before* it in forward order, so the message also
    names the last non-finite layer (where a backward-born NaN starts). Steps an AMP ``GradScaler`` skipped for
    overflow never reach the rules (the monitor drops them; see ``docs/alerts.md``).
    """

    name = "nonfinite"

    def __init__(self, patience: int = 1) -> None:
        super().__init__(patience)

    def check(self, m: Measurements) -> list[Alert]:
        g = m.values("grad_norm")
        bad = np.flatnonzero(~np.isfinite(g))
        whole = m.whole.get("grad_norm", math.nan)
        present = bool(len(bad)) or ("grad_norm" in m.whole and not np.isfinite(whole))
        n = self.streak("any", present)
        if n != self.patience:  # once per episode: after a NaN step the weights are usually NaN for good
            return []
        if len(bad):
            bad = m.forward_sorted(bad)
            first, last = m.layers[bad[0]], m.layers[bad[-1]]
            value = g[bad[0]]
            where = f"first in forward order: {first}"
            if len(bad) > 1:
                where += f"; {len(bad)} of {len(m.layers)} layers non-finite, the last is {last}"
        else:
            first, value, where = None, whole, "in the whole-model norm"
        bad_w = [m.layers[i] for i in np.flatnonzero(~np.isfinite(m.values("weight_norm")))]
        if bad_w:
            where += f"; weights already non-finite in {short_list(bad_w, 3)}"
        return [self.alert(
            m, "critical", first, value, math.inf,
            f"non-finite gradient ({value}) at step {m.step} ({where})",
            "NaN/Inf in the backward pass: look for log/sqrt/division at 0 or overflow in that layer or the loss "
            "(a NaN born in backward spreads to all earlier layers, so check the last one listed); lower the "
            "learning rate, clip gradients; under float16 use a GradScaler",
        )]


class DeadLayer(Rule):
    """A trainable layer whose gradient is exactly zero for ``patience`` consecutive logging steps.

    Layers whose ``.grad`` is ``None`` are not measured at all (the monitor logs them once); this catches a
    layer that is in the graph but receives nothing (dead ReLUs, a zero gate, an output multiplied by 0, an
    unused layer under ``zero_grad(set_to_none=False)``). When more than ``max_named`` layers die at once
    they are reported as one alert.
    """

    name = "dead_layer"

    def __init__(self, patience: int = 3, max_named: int = 5) -> None:
        super().__init__(patience)
        self.max_named = int(max_named)

    def check(self, m: Measurements) -> list[Alert]:
        before = self.state["streaks"]
        zero = [m.layers[i] for i in np.flatnonzero(m.values("grad_norm") == 0.0)]
        self.state["streaks"] = streaks = {name: before.get(name, 0) + 1 for name in zero}  # others reset
        firing = [name for name in zero if streaks[name] >= self.patience]
        hint = ("the layer is in the graph but gets no gradient: dead ReLUs (lower the learning rate, "
                "LeakyReLU), a gate or multiplier stuck at 0, or an unused layer; if intended, freeze it "
                "(requires_grad=False) or exclude it from the monitor")
        if len(firing) > self.max_named:
            return [self.alert(
                m, "warning", None, 0.0, 0.0,
                f"{len(firing)} layers have had exactly zero gradient for {self.patience}+ logging steps: "
                f"{short_list(firing, self.max_named)}", hint,
            )]
        return [self.alert(
            m, "warning", name, 0.0, 0.0,
            f"layer {name} has had exactly zero gradient for {streaks[name]} logging steps", hint,
        ) for name in firing]


#: The built-in rules by name, in the order they are evaluated.
RULES: dict[str, type[Rule]] = {
    cls.name: cls for cls in (NonFinite, SkipCollapse, Vanishing, Exploding, DepthTrend, DeadLayer)
}


def default_rules() -> list[Rule]:
    """One instance of every built-in rule with its default settings."""
    return [cls() for cls in RULES.values()]


def build_rules(spec: Any) -> list[Rule]:
    """Resolve the ``rules=`` argument of :class:`~gradwatch.Monitor`.

    - ``None``: every built-in rule with defaults;
    - ``False`` or ``[]``: no rules (no detection at all);
    - a dict ``{rule_name: options}``: the built-in rules, each configured with ``options`` (a dict of
      constructor arguments; ``False`` drops the rule; ``True``/``{}`` keeps defaults), e.g.
      ``{"vanishing": {"patience": 5}, "dead_layer": False}``;
    - a list of :class:`Rule` instances (and/or built-in names): exactly those.
    """
    if spec is None:
        return default_rules()
    if spec is False:
        return []
    if isinstance(spec, Mapping):
        unknown = set(spec) - set(RULES)
        if unknown:
            raise ValueError(f"unknown rule(s) {sorted(unknown)}; built-in rules are {list(RULES)}")
        rules = []
        for name, cls in RULES.items():
            opts = spec.get(name, True)
            if opts is False:
                continue
            if opts is True:
                opts = {}
            if not isinstance(opts, Mapping):
                raise TypeError(f"rules[{name!r}] must be a dict of options, True or False, got {opts!r}")
            try:
                rules.append(cls(**opts))
            except TypeError as err:
                raise TypeError(f"rules[{name!r}]: {err}") from None
        return rules
    if isinstance(spec, (str, Rule)) or not isinstance(spec, Iterable):
        raise TypeError("rules must be None, False, a dict of rule options or a list of Rule instances, "
                        f"got {type(spec).__name__}")
    rules = []
    for item in spec:
        if isinstance(item, str):
            if item not in RULES:
                raise ValueError(f"unknown rule {item!r}; built-in rules are {list(RULES)}")
            item = RULES[item]()
        if not isinstance(item, Rule):
            raise TypeError(f"rules entries must be Rule instances or built-in rule names, got {item!r}")
        rules.append(item)
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise ValueError(f"two rules share a name: {names} (rule state is saved by name)")
    return rules


def replay(history: Any, rules: Any = None, kinds: Mapping[str, str] | None = None) -> list[Alert]:
    """Run ``rules`` (as for ``Monitor(rules=...)``) over a recorded history, step by step; return every alert
    they raise (no cooldown). ``kinds`` from :func:`layer_kinds` (without it every layer counts as a weight
    layer). For trying thresholds on a finished run without training again."""
    resolved = build_rules(rules)
    out: list[Alert] = []
    for m in Measurements.from_history(history, kinds):
        for rule in resolved:
            out.extend(rule.check(m))
    return out
