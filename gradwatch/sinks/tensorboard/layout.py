"""The Custom Scalars layout: gradwatch's charts, grouped, for TensorBoard's Custom Scalars tab.

One category for the health section, then (with ``layer_scalars``, when there are per-layer scalar tags) one
per metric family. A family's layers (or blocks) are split into
charts of at most :data:`MAX_LINES` lines along their names: by stage (``layer1``), then by block
(``layer1.0``), neighbours merged back while they fit, so a chart reads as one part of the network. Each chart
matches its tags with an anchored regex of escaped names, so names with ``.`` or ``[`` match only themselves.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tensorboard.plugins.custom_scalar import layout_pb2

from ...alerts.alert import SEVERITIES
from ...depth import DEPTH
from ...names import FLOW_METRICS, GLOBAL_NAME
from ..tags import Tags

__all__ = ["MAX_LINES", "group_names", "build_layout"]

#: The most lines one chart holds: past a dozen, lines and legend entries can no longer be told apart.
MAX_LINES = 12

# Which families get a category (all of them), in reading order: the ratios first.
_LAYER_ORDER = ("grad_to_weight", "update_to_weight", "grad_norm", "weight_norm")
_BLOCK_ORDER = ("skip_share", "transmission", "grad_in", "grad_out", "skip_grad", "branch_grad")


def group_names(names: Sequence[str], limit: int = MAX_LINES) -> list[tuple[str, list[str]]]:
    """``names`` (in model order) cut into consecutive groups of at most ``limit``, along the dotted name
    hierarchy; each group with a title (``"layer1.0–2"``, ``"layer2"``, ``"conv1, bn1"``)."""
    groups = _split(list(names), 0, limit)
    merged: list[list[str]] = []
    for g in groups:  # neighbours back together while they fit: 3 blocks of 4 layers make one chart
        if merged and len(merged[-1]) + len(g) <= limit and _related(merged[-1], g):
            merged[-1] = merged[-1] + g
        else:
            merged.append(list(g))
    return [(_title(g), g) for g in merged]


def _split(names: list[str], depth: int, limit: int) -> list[list[str]]:
    if len(names) <= limit:
        return [names]
    runs: list[list[str]] = []  # consecutive names sharing their first depth+1 parts
    for n in names:
        key = _key(n, depth)
        if runs and _key(runs[-1][0], depth) == key:
            runs[-1].append(n)
        else:
            runs.append([n])
    if len(runs) == 1 and all(len(n.split(".")) <= depth + 1 for n in names):  # no finer level: cut in order
        return [names[i:i + limit] for i in range(0, len(names), limit)]
    if len(runs) == 1:
        return _split(names, depth + 1, limit)
    return [g for run in runs for g in _split(run, depth + 1, limit)]


def _key(name: str, depth: int) -> tuple[str, ...]:
    return tuple(name.split(".")[: depth + 1])


def _related(a: list[str], b: list[str]) -> bool:
    """Groups merge within a part of the network (a shared first name part), or when both are loose
    top-level layers (``conv1``, ``bn1``)."""
    return bool(_common(a + b)) or all("." not in n for n in a + b)


def _common(group: list[str]) -> str:
    parts = [n.split(".") for n in group]
    out = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)


def _title(group: list[str]) -> str:
    if len(group) == 1:
        return group[0]
    common = _common(group)
    first, last = group[0], group[-1]
    if common and common not in (first, last) and all(n.startswith(common + ".") for n in group):
        a, b = first[len(common) + 1:].split(".")[0], last[len(common) + 1:].split(".")[0]
        return f"{common}.{a}–{b}" if a != b and a.isdigit() and b.isdigit() else common
    if len(group) <= 3:
        return ", ".join(group)
    return f"{first} … {last}"


def _regex(tags: Sequence[str]) -> str:
    return "^(?:" + "|".join(re.escape(t) for t in tags) + ")$"


def _chart(category: layout_pb2.Category, title: str, tags: Sequence[str]) -> None:
    chart = category.chart.add(title=title)
    chart.multiline.tag.append(_regex(tags))


def build_layout(tags: Tags, layers: Sequence[str], layer_metrics: Sequence[str], blocks: Sequence[str],
                 alerts: bool = True, per_layer: bool = False) -> layout_pb2.Layout:
    """The layout for a model with these ``layers`` (model order), measured ``layer_metrics`` and residual
    ``blocks`` (depth order); ``alerts``: whether the open-incident chart is shown; ``per_layer``: whether
    there are per-layer (per-block) scalar tags to chart."""
    layout = layout_pb2.Layout()
    ns = tags.namespace or "gradwatch"
    health = layout.category.add(title=f"{ns}: health")
    if alerts:
        _chart(health, "open incidents per severity (step lines: turn smoothing off)",
               [tags.open_incidents(s) for s in SEVERITIES])
    if blocks:
        _chart(health, "lowest skip_share over blocks (→0: a skip collapsed)", [tags.health("skip_share_min")])
    _chart(health, "log10 early layers' gradient-to-weight ratio / typical layer's (≈0 healthy)",
           [tags.health("grad_to_weight_early")])
    if "grad_norm" in layer_metrics:
        _chart(health, "log10 gradient norm, whole model", [tags.health("grad_norm")])
    if blocks:
        _chart(health, "log10 end-to-end transmission: gradient into the first block / out of the last",
               [tags.health("transmission_end_to_end")])
        _chart(health, "effective depth: mean, 10/50/90th percentile path length, blocks in the chain (n)",
               [tags.health_tag(f) for f in DEPTH])
    if not per_layer:
        return layout
    groups = group_names([n for n in layers if n != GLOBAL_NAME])
    for metric in [m for m in _LAYER_ORDER if m in layer_metrics]:
        cat = layout.category.add(title=f"{ns}: {metric} by layer", closed=True)
        for title, names in groups:
            _chart(cat, f"{metric} · {title}", [tags.layer(metric, n) for n in names])
    if blocks:
        bgroups = group_names(blocks)
        for metric in [m for m in _BLOCK_ORDER if m in FLOW_METRICS]:
            cat = layout.category.add(title=f"{ns}: {metric} by block", closed=True)
            for title, names in bgroups:
                _chart(cat, f"{metric} · {title}", [tags.block(metric, n) for n in names])
    return layout
