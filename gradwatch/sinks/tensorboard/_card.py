"""The health card: the dashboard's first card, one image per run that says whether the gradient flows, which
rule fired on which layer or block, and since which step.

TensorBoard opens the first two groups of Time Series. A health section of six curves took three rows at
1600 × 1000 and pushed the user's own groups off the first screen; a scalar of open incidents cannot say
*which* or *since when*, and TensorBoard's default smoothing (0.6) turns its 0 → 1 step into a ramp (0.4,
0.64, ...). One image drawn by gradwatch says all of it exactly, whatever TensorBoard's smoothing and outlier
settings, in one row: the open incidents (most severe first, then the oldest) and the health figures with
their healthy ranges (docs/dashboard.md; outside them in orange). The figures' curves are one group further
down (``zz_gradwatch.health``). :class:`OpenIncidents` follows the records' incident events on the sink's
thread; :func:`draw_card` draws on the drawing child (numpy and matplotlib only, as
:mod:`~gradwatch.sinks.tensorboard.pictures`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from ._image import Picture, to_png

__all__ = ["HealthCard", "OpenIncidents", "card_figures", "draw_card", "MAX_ROWS", "HEALTHY"]

#: Incidents listed on the card; more are counted in a last line (the TEXT tab and alerts.jsonl list all).
MAX_ROWS = 5
#: The healthy ranges the card marks (docs/dashboard.md, "The health section"): outside them a figure is orange.
HEALTHY = {"skip_share_min": (0.1, math.inf), "grad_to_weight_early": (0.3, 3.0)}
_RANK = {"critical": 0, "warning": 1, "info": 2}
_COLOURS = {"critical": "#d62728", "warning": "#e6550d", "info": "#636363"}
_LABELS = (("skip_share_min", "lowest skip_share", "≳ 0.1"),
           ("grad_to_weight_early", "early / typical ratio", "0.3–3"),
           ("grad_norm", "gradient norm", ""), ("transmission_end_to_end", "end-to-end transmission", "≈ 1–10"),
           ("effective_depth", "effective depth", ""))


class HealthCard(NamedTuple):
    """What the card shows: the step, the open incidents as ``(severity, rule, name, since_step)``, and the
    health figures as ``(figure, value)`` (those the model has)."""

    step: int
    rows: list[tuple[str, str, str, int]]
    figures: list[tuple[str, float]]
    alerting: bool = True


class OpenIncidents:
    """The open incidents, followed from the records' incident events."""

    def __init__(self) -> None:
        self._open: dict[Any, tuple[str, str, str, int]] = {}
        self.alerting = False  # whether any record had alerting on

    def add(self, record: Any) -> bool:
        """Follow ``record``'s events; True when the card's incidents change (the first record, an incident
        opened, escalated or resolved)."""
        changed = not self.alerting and record.alerts is not None
        self.alerting = self.alerting or record.alerts is not None
        for e in record.events:
            key = e.incident.key
            if e.kind == "resolved":
                changed |= self._open.pop(key, None) is not None
            elif e.kind in ("opened", "escalated") or key not in self._open:
                self._open[key] = (e.severity, e.rule, e.name or "whole model", e.incident.opened_step)
                changed = True
        return changed

    def rows(self) -> list[tuple[str, str, str, int]]:
        return sorted(self._open.values(), key=_order)


def card_figures(record: Any) -> list[tuple[str, float]]:
    """The figures the card lists, from ``record`` (NaN ones left out: the model cannot have them)."""
    values = dict(record.health)
    if "grad_norm" in record.layer_metrics:
        values["grad_norm"] = record.global_value("grad_norm")
    if "effective_depth_n" in values and not math.isnan(values.get("effective_depth", math.nan)):
        values["effective_depth_of"] = values["effective_depth_n"]
    out = [(k, float(values[k])) for k, _, _ in _LABELS if k in values and not math.isnan(values[k])]
    if "effective_depth_of" in values:
        out.append(("effective_depth_of", float(values["effective_depth_of"])))
    return out


def _order(row: tuple[str, str, str, int]) -> tuple:
    """Most severe first, then the oldest."""
    return _RANK.get(row[0], 3), row[3], row[1], row[2]


def draw_card(card: HealthCard) -> Picture:
    """The card as a PNG, 560 px wide, text at 11–15 pt: legible where TensorBoard scales it into a card."""
    from matplotlib.figure import Figure

    rows = sorted(card.rows, key=_order)
    shown = rows[:MAX_ROWS]
    more = len(rows) - len(shown)
    figures = dict(card.figures)
    listed = [(k, label, healthy) for k, label, healthy in _LABELS if k in figures]
    lines = max(len(shown), 1) + (1 if more else 0) + len(listed)
    height = 1.0 + 0.3 * lines
    fig = Figure(figsize=(5.6, height), dpi=100)
    fig.patch.set_facecolor("white")
    inch = 1 / height  # one inch in figure fraction
    y = 1 - 0.25 * inch
    if not card.alerting:
        head, colour = "alerting off", "#636363"
    elif rows:
        head = f"{len(rows)} open incident{'s' if len(rows) > 1 else ''}"
        colour = _COLOURS.get(rows[0][0], "black")
    else:
        head, colour = "no open incidents", "#31a354"
    fig.text(0.03, y, head, fontsize=15, fontweight="bold", color=colour, va="top")
    fig.text(0.97, y, f"step {card.step}", fontsize=12, color="#444444", va="top", ha="right")
    y -= 0.42 * inch
    for severity, rule, name, since in shown:
        fig.text(0.03, y, severity, fontsize=11, color=_COLOURS.get(severity, "black"), va="top", fontweight="bold")
        fig.text(0.19, y, f"{rule} · {_short(name)}", fontsize=12, va="top")
        fig.text(0.97, y, f"since {since}", fontsize=11, va="top", ha="right", color="#444444")
        y -= 0.3 * inch
    if more:
        fig.text(0.03, y, f"+ {more} more (TEXT tab, zz_…alerts)", fontsize=10, color="#444444", va="top")
        y -= 0.3 * inch
    y -= 0.04 * inch
    fig.add_artist(_rule(fig, y))
    y -= 0.14 * inch
    for k, label, healthy in listed:
        v = figures[k]
        lo, hi = HEALTHY.get(k, (-math.inf, math.inf))
        ok = lo <= v <= hi
        text = f"{v:.3g}"
        if k == "effective_depth" and "effective_depth_of" in figures:
            text += f" of {figures['effective_depth_of']:.0f} blocks"
        fig.text(0.03, y, label, fontsize=11, va="top", color="#222222")
        fig.text(0.62, y, text, fontsize=11, va="top", ha="right", fontweight="bold",
                 color="#222222" if ok else "#e6550d")
        if healthy:
            fig.text(0.97, y, f"healthy {healthy}", fontsize=10, va="top", ha="right", color="#777777")
        y -= 0.3 * inch
    return to_png(fig, "health")


def _rule(fig: Any, y: float) -> Any:
    from matplotlib.lines import Line2D

    return Line2D([0.03, 0.97], [y, y], transform=fig.transFigure, color="#cccccc", linewidth=1)


def _short(name: str, limit: int = 24) -> str:
    """A long layer name cut in the middle, keeping its start (the stage) and its end (the layer)."""
    return name if len(name) <= limit else f"{name[:9]}…{name[-(limit - 10):]}"
