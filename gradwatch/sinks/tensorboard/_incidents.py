"""The incidents card: the health section's first card, an image that says which rule fired on which layer or
block and since which step, per run.

A scalar of open incidents cannot say *which* or *since when*, and TensorBoard's default smoothing (0.6)
turns its 0 → 1 step into a ramp (0.4, 0.64, ...); a small table drawn as an image says both exactly. Its
tag sorts first in the health group (``_gradwatch/1_incidents``), so it is the first card of the dashboard.
:class:`OpenIncidents` follows the record's incident events (opened, escalated, resolved) on the sink's
thread; :func:`draw_card` draws on the drawing child (numpy and matplotlib only, as
:mod:`~gradwatch.sinks.tensorboard.pictures`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from .pictures import Picture

__all__ = ["IncidentCard", "OpenIncidents", "draw_card", "MAX_ROWS"]

#: Incidents listed on the card; more are counted in a last line (the TEXT tab and alerts.jsonl list all).
MAX_ROWS = 6
_RANK = {"critical": 0, "warning": 1, "info": 2}
_COLOURS = {"critical": "#d62728", "warning": "#e6550d", "info": "#636363"}


class IncidentCard(NamedTuple):
    """What the card shows: the step it is drawn at and the open incidents as ``(severity, rule, name,
    since_step)``, most severe first, then oldest first."""

    step: int
    rows: list[tuple[str, str, str, int]]


class OpenIncidents:
    """The open incidents, followed from the records' incident events."""

    def __init__(self) -> None:
        self._open: dict[Any, tuple[str, str, str, int]] = {}
        self.alerting = False  # whether any record had alerting on

    def add(self, record: Any) -> bool:
        """Follow ``record``'s events; True when the card changes (the first record with alerting on, an
        incident opened, escalated or resolved)."""
        if record.alerts is None:
            return False
        changed = not self.alerting
        self.alerting = True
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


def _order(row: tuple[str, str, str, int]) -> tuple:
    """Most severe first, then the oldest."""
    return _RANK.get(row[0], 3), row[3], row[1], row[2]


def draw_card(card: IncidentCard) -> Picture:
    """The card as a PNG: 560 px wide, text at 13–15 pt, legible when TensorBoard scales it into a card."""
    from matplotlib.figure import Figure

    from .pictures import _png

    shown = sorted(card.rows, key=_order)[:MAX_ROWS]
    more = len(card.rows) - len(shown)
    lines = len(shown) + (1 if more else 0)
    height = 0.95 + 0.36 * max(lines, 1)
    fig = Figure(figsize=(5.6, height), dpi=100)
    fig.patch.set_facecolor("white")
    top = 1 - 0.3 / height
    if not card.rows:
        fig.text(0.03, top, "no open incidents", fontsize=15, fontweight="bold", color="#31a354", va="top")
        fig.text(0.03, top - 0.45 / height, f"at step {card.step}", fontsize=12, color="#444444", va="top")
        return _png(fig, "incidents")
    worst = shown[0][0]
    fig.text(0.03, top, f"{len(card.rows)} open incident{'s' if len(card.rows) > 1 else ''} at step {card.step}",
             fontsize=15, fontweight="bold", color=_COLOURS.get(worst, "black"), va="top")
    y = top - 0.5 / height
    for severity, rule, name, since in shown:
        fig.text(0.03, y, severity, fontsize=12, color=_COLOURS.get(severity, "black"), va="top", fontweight="bold")
        fig.text(0.20, y, f"{rule} · {_short(name)}", fontsize=13, va="top")
        fig.text(0.97, y, f"since {since}", fontsize=12, va="top", ha="right", color="#444444")
        y -= 0.36 / height
    if more:
        fig.text(0.03, y, f"+ {more} more (TEXT tab: zz_…alerts)", fontsize=11, color="#444444", va="top")
    return _png(fig, "incidents")


def _short(name: str, limit: int = 24) -> str:
    """A long layer name cut in the middle, keeping its start (the stage) and its end (the layer)."""
    return name if len(name) <= limit else f"{name[:9]}…{name[-(limit - 10):]}"
