"""The training loss as the ``instability`` rule reads it (``docs/alerts.md``): whether it is falling (the
model is learning: no new warning opens) and how far its level has climbed above the best it reached (a run
on its way to diverging), kept apart from the rule's per-layer arithmetic."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from ._stats import nanmedian

__all__ = ["empty", "add", "falling", "risen", "Rise"]


def empty() -> dict[str, Any]:
    """The history :func:`add` keeps: plain types, so a rule's state is checkpointed as JSON. ``losses``: the
    last losses given (NaN for a non-finite one); ``best``: the lowest level (:func:`risen`) reached so far."""
    return {"losses": [], "best": None}


def add(hist: dict[str, Any], loss: float, keep: int) -> None:
    """Keep ``loss`` (one per logging step) and the last ``keep`` before it."""
    losses: list[float] = hist["losses"]
    losses.append(float(loss) if math.isfinite(loss) else math.nan)
    del losses[: max(0, len(losses) - keep)]


def falling(hist: dict[str, Any], window: int, share: float) -> bool:
    """Whether the median of the last ``window`` losses is ``share`` or more below the median of the ``window``
    before (False while fewer are kept)."""
    losses: list[float] = hist["losses"]
    if len(losses) < 2 * window:
        return False
    before, now = nanmedian(losses[-2 * window:-window]), nanmedian(losses[-window:])
    return math.isfinite(before) and math.isfinite(now) and now < before - share * abs(before)


#: How many standard errors of the level a climb must pass besides its bar in nats: the best level is the lowest
#: of many noisy medians (about 2 standard errors below the true level where the loss is noisy) and the level
#: now may read about 2 above it by chance. Small batches of images (the zoo's ResNeXt-50: per-batch losses
#: 0.4-13 nats) move a 20-step median by more than half a nat with nothing going wrong.
NOISE = 4.0


class Rise(NamedTuple):
    """The loss's level now, the best level before it, and the climb over it that counts (:func:`risen`)."""

    level: float
    best: float
    bar: float

    @property
    def up(self) -> bool:
        """The level stands ``bar`` or more above the best."""
        return self.level >= self.best + self.bar

    @property
    def half(self) -> bool:
        """The level stands half of ``bar`` or more above the best: a climb that has not eased yet."""
        return self.level >= self.best + self.bar / 2


def risen(hist: dict[str, Any], window: int, floor: float) -> Rise | None:
    """The loss's level now, the median of the last ``window`` losses (a median, so one bad batch does not move
    it); the lowest level before it, then kept as the best when lower; and the bar a climb must pass: the
    largest of ``floor`` (in the loss's units: nats for a cross-entropy), a tenth of the best level (a loss of
    another scale, a regression's in the thousands, is not judged by a half-unit wobble) and :data:`NOISE`
    standard errors of the level. The median's standard error is read from the median absolute deviation of the
    last ``2 window`` losses kept: 20 alone read a quiet stretch of a noisy loss, the zoo's RegNetY, as half its
    noise. None while fewer than ``window`` are kept or no level is known before."""
    losses: list[float] = hist["losses"]
    if len(losses) < window:
        return None
    recent = np.asarray(losses[-2 * window:], dtype=np.float64)
    level, best = nanmedian(losses[-window:]), hist["best"]
    if not math.isfinite(level):  # every loss of the window non-finite: the spike itself, not a climb
        return None
    hist["best"] = level if best is None else min(float(best), level)
    if best is None:
        return None
    finite = recent[np.isfinite(recent)]
    # the median's standard error: sqrt(pi/2) sigma / sqrt(n), sigma from the MAD (1.4826 MAD for a normal)
    spread = 1.2533 * 1.4826 * nanmedian(np.abs(finite - nanmedian(finite))) / math.sqrt(window)
    return Rise(level, float(best), max(floor, 0.1 * abs(float(best)), NOISE * spread))
