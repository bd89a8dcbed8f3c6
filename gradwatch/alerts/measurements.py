"""What the rules see: one logging step's values as :class:`Measurements`, and the statistics rules share
(:func:`early_ratio`, :func:`depth_slope`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..names import EARLY_FRACTION, FLOW_METRICS, GLOBAL_NAME, ROOT_NAME, early_count
from ..record import StepRecord
from ._stats import nanmedian
from .siblings import Siblings

__all__ = ["Measurements", "EarlyRatio", "early_ratio", "early_ratio_shown", "depth_slope", "DORMANT_SHARE"]

#: A block whose skip carries more than this share of the gradient energy at its input has a branch that is
#: (nearly) off — under 1% of the energy, a tenth of the skip's amplitude: a zero-initialised branch while it
#: wakes up (torchvision resnet50 with zero_init_residual: 0.999995 for its first steps), or an attention
#: branch at initialisation (2-layer BERT: 0.998). Its layers' ratios reflect the branch's small gain, not the
#: network's depth profile (``docs/validation.md``).
DORMANT_SHARE = 0.99


@dataclass
class Measurements:
    """One logging step's measured values, as the rules see them.

    ``layers`` are the measured layer names in definition order (``named_modules()``); ``layer[metric]`` is an
    array aligned with it (NaN where a layer lacked that metric). ``whole`` holds the ``_global`` entry.
    ``blocks`` and ``block[metric]`` are the same for the residual blocks of block flow (empty without it).
    ``kinds`` maps layer names to :func:`gradwatch.measure.layers.layer_kinds` kinds. ``forward`` maps module names to the position in
    which they first ran in a forward pass, as the monitor recorded it on its first measured step (empty when
    unknown, e.g. in :func:`replay`); :meth:`forward_sorted` orders layers by it. ``siblings`` are the layers
    that read one input (:class:`~gradwatch.alerts.siblings.Siblings`, found with the forward order): one depth
    each for :func:`early_ratio`.

    The monitor builds one per logging step from its :class:`~gradwatch.StepRecord` (:meth:`from_record`);
    rules can also be fed by hand::

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
    lost: list[str] = field(default_factory=list)  # blocks whose merge is gone (StepRecord.lost)
    siblings: Siblings = field(default_factory=Siblings)
    loss: float | None = None  # the training loss given to the monitor (StepRecord.loss); None if not given
    #: What a rule found this step for the rules after it (``"unstable_blocks"``: the blocks whose skip the
    #: ``instability`` rule explains, which ``skip_collapse`` then leaves to it); rules run in ``RULES`` order.
    context: dict[str, Any] = field(default_factory=dict)
    # what several rules (and the health figures) derive alike, computed once per step; add() clears it
    _memo: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

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
        :data:`~gradwatch.names.FLOW_METRICS`, else a layer metric; ``_global`` goes to :attr:`whole`)."""
        self._memo.clear()
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        names = list(names)
        if GLOBAL_NAME in names:
            i = names.index(GLOBAL_NAME)
            self.whole[metric] = float(values[i])
            names = names[:i] + names[i + 1:]
            values = np.delete(values, i)
        if metric in FLOW_METRICS:
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

    @classmethod
    def from_record(cls, record: StepRecord, kinds: Mapping[str, str] | None = None,
                    forward: Mapping[str, int] | None = None, siblings: Siblings | None = None) -> Measurements:
        """The measurements of one :class:`~gradwatch.StepRecord` (how the monitor feeds its rules)."""
        return cls(
            step=record.step, kinds=dict(kinds or {}), layers=list(record.layers),
            layer={m: record.layer(m) for m in record.layer_metrics},
            whole={m: record.global_value(m) for m in record.layer_metrics},
            blocks=list(record.blocks), block={m: record.block(m) for m in FLOW_METRICS} if record.blocks else {},
            forward=dict(forward or {}), lost=list(record.lost),
            siblings=siblings if siblings is not None else Siblings(), loss=record.loss,
        )

    def values(self, metric: str) -> np.ndarray:
        """Layer ``metric`` aligned with :attr:`layers` (all NaN when not measured)."""
        return self.layer.get(metric, np.full(len(self.layers), np.nan))

    def block_values(self, metric: str) -> np.ndarray:
        """Block ``metric`` aligned with :attr:`blocks` (all NaN when not measured)."""
        return self.block.get(metric, np.full(len(self.blocks), np.nan))

    def weight_layers(self) -> np.ndarray:
        """Indices into :attr:`layers` of the ``"weight"`` layers (conv, linear, ...), in forward order (see
        :meth:`forward_sorted`)."""
        if "weight_layers" not in self._memo:
            kinds = self.kinds
            idx = np.flatnonzero([kinds.get(n, "weight") == "weight" for n in self.layers])
            self._memo["weight_layers"] = np.asarray(self.forward_sorted(idx), dtype=np.int64) if self.forward else idx
        return self._memo["weight_layers"].copy()

    def dormant(self) -> np.ndarray:
        """Mask over :attr:`layers`: inside a residual block whose branch is (nearly) switched off — skip_share
        above :data:`DORMANT_SHARE`, as when the branch's last norm layer starts at zero (torchvision's
        ``zero_init_residual``, timm's ``zero_init_last``). Such a branch learns from ~0 by design; its layers'
        tiny ratios say nothing about the depth profile. All False without block flow.

        A branch's layers are taken to be the layers inside the module that makes the merge. A module that
        makes several merges (a transformer block: ``h.0[0]`` the attention residual, ``h.0[1]`` the MLP's)
        holds the layers of all its branches, and which layer is on which branch is not known here: its layers
        are dormant only when every one of its merges is. (GPT-2's attention branches start at ~0.992 while
        its MLP branches learn: marking whole blocks dormant left no weight layer to compare, and
        ``grad_to_weight_early`` was NaN for the whole run.)"""
        if "dormant" not in self._memo:
            self._memo["dormant"] = self._dormant()
        return self._memo["dormant"].copy()

    def _dormant(self) -> np.ndarray:
        share = self.block_values("skip_share")
        asleep: dict[str, bool] = {}  # module -> whether every merge it makes is dormant
        for block, s in zip(self.blocks, share):
            module = block.split("[")[0]
            asleep[module] = asleep.get(module, True) and bool(np.isfinite(s) and s > DORMANT_SHARE)
        modules = {m for m, all_asleep in asleep.items() if all_asleep}
        if not modules:
            return np.zeros(len(self.layers), dtype=bool)
        inside = tuple(f"{m}." for m in modules)
        return np.fromiter((n.startswith(inside) for n in self.layers), dtype=bool, count=len(self.layers))


def _by_depth(m: Measurements, idx: np.ndarray, g2w: np.ndarray,
              agree: str = "max") -> tuple[np.ndarray, np.ndarray]:
    """One value per depth of the weight layers ``idx`` (in forward order): a layer's own ``grad_to_weight``, or
    for siblings (:attr:`Measurements.siblings`) the largest of the group's (``agree="max"``: the gradient that
    reaches that depth) or the smallest (``"min"``), at the position of the group's first layer. Returns the
    values and, per layer of ``idx``, the index of its depth. Vectorised: the group ids are computed once per
    set of layers."""
    vals = g2w[idx]
    if not m.siblings:
        return vals, np.arange(len(idx))
    gid = m.siblings.ids(m.layers)[idx]
    uniq, first, inv = np.unique(gid, return_index=True, return_inverse=True)
    if len(uniq) == len(idx):  # no two of these layers are siblings
        return vals, np.arange(len(idx))
    if agree == "max":
        best = np.full(len(uniq), -np.inf)
        np.maximum.at(best, inv, vals)
    else:
        best = np.full(len(uniq), np.inf)
        np.minimum.at(best, inv, vals)
    order = np.argsort(first, kind="stable")  # depths in the forward order of their first layer
    depth = np.empty(len(uniq), dtype=np.int64)
    depth[order] = np.arange(len(uniq))
    return best[order], depth[inv]


def _ratio(m: Measurements, idx: np.ndarray, g2w: np.ndarray, early: float, min_depths: int,
           fallback: bool = False, agree: str = "max") -> EarlyRatio | None:
    vals, depth = _by_depth(m, idx, g2w, agree)
    if len(vals) < min_depths:
        return None
    n = early_count(len(vals), early)
    typical = nanmedian(vals)  # finite values: np.median's
    # the exploding side (agree="min") reads the lower median of the early depths: at least half of them are at
    # it or above. np.median averages the middle two, so of two early depths one alone carried the pair: a
    # post-LN GPT-1's first attention projection reads ~35x the network's median (its LayerNorm divides the
    # small embedding stream by its scale), the other early depth ~5x, and "the early layers" read 21x
    early_med = nanmedian(vals[:n]) if agree == "max" else float(np.sort(vals[:n])[(n - 1) // 2])
    ratio = early_med / typical if typical > 0 else math.nan
    return EarlyRatio(ratio, early_med, typical, [m.layers[i] for i in idx[depth < n]], fallback=fallback)


@dataclass
class EarlyRatio:
    """median(grad_to_weight of the early depths) / median(grad_to_weight of all depths), a depth being one
    weight layer or one group of siblings (layers reading one input: :mod:`gradwatch.alerts.siblings`),
    which counts with its largest ratio (its smallest, and the lower median of the early depths, on the
    exploding side: ``agree="min"``). ``early`` names every layer of the early depths."""

    ratio: float
    early_median: float
    typical: float
    early: list[str]
    fallback: bool = False  # shown only (early_ratio_shown): no rule reads it


def early_ratio(m: Measurements, early: float = EARLY_FRACTION, min_layers: int = 4,
                agree: str = "max") -> EarlyRatio | None:
    """The statistic of :class:`Vanishing` and :class:`Exploding` (None with fewer than ``min_layers``
    depths with a finite ratio). Weight layers are taken in forward order; siblings (layers that read the same
    input, such as an attention's query, key and value) are one depth, valued at their largest ratio: query
    and key get tiny gradients at initialisation by the bilinear form of attention, not by depth. The early
    depths are the first ``early`` fraction. Layers of dormant branches (:meth:`Measurements.dormant`) are
    left out of both the early set and the typical value; while they are most of the weight layers (a
    zero-initialised resnet50's 48 of 53 for its first steps), there is no typical value and the statistic
    is None.

    ``agree`` says which sibling speaks for a depth, so that a rule fires only when every layer at that depth
    agrees: ``"max"`` (:class:`Vanishing`, the health figure): the depth is starved only if even its
    best-fed layer is; ``"min"`` (:class:`Exploding`): it is flooded only if even its least-fed layer is (on a
    2-layer OPT near its stability edge the value projection alone ran 36x the network's median while query
    and key sat below it: the maximum read that as an exploding depth); with ``"min"`` the early depths are
    flooded only if half of them are, too (their lower median)."""
    if agree not in ("max", "min"):
        raise ValueError(f"early_ratio: agree must be 'max' or 'min', got {agree!r}")
    key = ("early_ratio", early, min_layers, agree)
    if key not in m._memo:  # Vanishing, Exploding and the health figures all ask, on the same step
        m._memo[key] = _early_ratio(m, early, min_layers, agree)
    return m._memo[key]


def _early_ratio(m: Measurements, early: float, min_layers: int, agree: str) -> EarlyRatio | None:
    g2w = m.values("grad_to_weight")
    idx = m.weight_layers()
    asleep = m.dormant()[idx]
    if asleep.sum() * 2 > len(idx):  # most of the net learns from ~0 by design: there is no "typical" yet
        return None
    idx = idx[np.isfinite(g2w[idx]) & ~asleep]
    return _ratio(m, idx, g2w, early, min_layers, agree=agree)


def early_ratio_shown(m: Measurements, early: float = EARLY_FRACTION) -> EarlyRatio | None:
    """What the health figure ``grad_to_weight_early`` shows: :func:`early_ratio` when it exists, else the
    same quotient (siblings one depth alike) over every weight layer with a finite, non-zero ratio, dormant
    branches included (at least two depths), marked ``fallback``. The rules keep :func:`early_ratio`'s None
    there (a net learning from ~0 by design, or too few layers, says nothing about vanishing), but the seed's
    headline figure is on the first screen of any model with weight layers: a zero-initialised ResNet, a
    post-LN BERT whose 0.02-std branches start near-dormant, a 2-layer transformer. Zero ratios are left out:
    a branch behind a zero-initialised norm gets exactly no gradient, and would make the typical value 0."""
    found = early_ratio(m)
    if found is not None:
        return found
    g2w = m.values("grad_to_weight")
    idx = m.weight_layers()
    idx = idx[np.isfinite(g2w[idx]) & (g2w[idx] > 0)]
    return _ratio(m, idx, g2w, early, 2, fallback=True)


def depth_slope(m: Measurements, min_points: int = 6) -> tuple[str, float, int] | None:
    """The statistic of :class:`DepthTrend`: ``(unit, slope, points)`` with ``slope`` the least-squares slope
    of log10(gradient) per ``unit`` of depth: ``"block"`` (``grad_in`` of the blocks) when block flow measured
    any block, else ``"layer"`` (``grad_to_weight`` of the weight layers but the last, for nets without
    residual blocks). None when there are fewer than ``min_points`` points: a net with a few blocks (a 2-layer
    transformer) has no block profile to fit, and its layers — attention projections, poolers — are of kinds
    whose ratios do not line up with depth, so they are not used instead."""
    gin = m.block_values("grad_in")
    if len(m.blocks):
        ok = np.isfinite(gin) & (gin > 0)
        if ok.sum() < min_points:
            return None
        unit, y = "block", np.log10(gin[ok])
    else:
        vals = m.values("grad_to_weight")[m.weight_layers()[:-1]]
        vals = vals[np.isfinite(vals) & (vals > 0)]
        if len(vals) < min_points:
            return None
        unit, y = "layer", np.log10(vals)
    # the least-squares slope in closed form: np.polyfit's general solver costs ~0.3 ms a call, on every
    # logging step, for the same value (to rounding)
    x = np.arange(len(y), dtype=np.float64)
    x -= x.mean()
    slope = float(np.dot(x, y - y.mean()) / np.dot(x, x))
    return unit, slope, len(y)
