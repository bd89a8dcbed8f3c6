"""The training loss as the ``instability`` rule reads it (``docs/alerts.md``): whether it is falling (the
model is learning: no new warning opens) and how far its level has climbed above the best it reached (a run
on its way to diverging), kept apart from the rule's per-layer arithmetic."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

__all__ = ["empty", "add", "falling", "risen"]


def empty() -> dict[str, Any]:
    """The history :func:`add` keeps: plain types, so a rule's state is checkpointed as JSON. ``losses``: the
    last losses given (NaN for a non-finite one); ``best``: the lowest level (:func:`risen`) reached so far."""
    return {"losses": [], "best": None}


def add(hist: dict[str, Any], loss: float, keep: int) -> None:
    """Keep ``loss`` (one per logging step) and the last ``keep`` before it."""
    losses: list[float] = hist["losses"]
    losses.append(float(loss) if math.isfinite(loss) else math.nan)
    del losses[: max(0, len(losses) - keep)]


def _median(values: list[float]) -> float:
    with warnings.catch_warnings():  # all NaN: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmedian(values)) if values else math.nan


def falling(hist: dict[str, Any], window: int, share: float) -> bool:
    """Whether the median of the last ``window`` losses is ``share`` or more below the median of the ``window``
    before (False while fewer are kept)."""
    losses: list[float] = hist["losses"]
    if len(losses) < 2 * window:
        return False
    before, now = _median(losses[-2 * window:-window]), _median(losses[-window:])
    return math.isfinite(before) and math.isfinite(now) and now < before - share * abs(before)


def risen(hist: dict[str, Any], window: int) -> tuple[float, float] | None:
    """The loss's level now, the median of the last ``window`` losses, and the lowest level before it, then
    kept as the best when lower; None while fewer than ``window`` are kept or no level is known before. A
    median, so one bad batch does not move the level."""
    losses: list[float] = hist["losses"]
    if len(losses) < window:
        return None
    level, best = _median(losses[-window:]), hist["best"]
    if not math.isfinite(level):  # every loss of the window non-finite: the spike itself, not a climb
        return None
    hist["best"] = level if best is None else min(float(best), level)
    return None if best is None else (level, float(best))
