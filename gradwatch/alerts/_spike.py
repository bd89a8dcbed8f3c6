"""The reference a whole-model gradient norm is judged against by :class:`~gradwatch.alerts.Exploding`'s
spike condition: the upper range of the run's recent norms (what a hard batch of this run reads), not their
average.

Why not an average: near zero loss with small batches, most batches are solved and give a gradient norm
near 0 while an ordinary hard batch still gives one of order 1 (torchvision's resnet18 fitting 32 images at
batch 4: norms from 1e-6 to 400 within 50 steps). A geometric moving average sinks to the solved batches'
level and reads every hard batch as a 35-1700x spike. The 90th percentile of the last ``window`` logging
steps sits at the hard batches' level instead: a spike is a norm far above anything the run produced
recently, whatever the spread of its batches.

A spike must not carry the reference up with it, or a sustained explosion would hide itself within a few
steps: a norm enters the window capped at ``reference * sqrt(spike)``, so a level jump by 10x or more is read
as a spike for several logging steps (long enough for ``spike_patience``) while a permanent new level is
followed within about ``window / 10`` logging steps per half-decade. A steady ramp faster than about
1.3-1.5x per logging step outruns the reference and is read as a spike.

State is plain data (a list of floats) so it travels in the monitor's ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping, Sequence
from typing import Any

from ._stats import quantile

__all__ = ["SpikeReference", "spike_factors"]


class SpikeReference:
    """The spike factor of one norm after another: ``norm / quantile(recent norms)``, in log space.

    Args:
        state: where the window of recent log-norms lives (``state["recent"]``, created if missing).
        spike: the factor that counts as a spike (caps what a spike adds to the window).
        window: logging steps the reference looks back over.
        quantile: which quantile of the window is the reference (0.9: the upper range, what a hard batch reads).
        warmup: norms needed before any is judged.
    """

    def __init__(self, state: MutableMapping[str, Any], spike: float, window: int = 64, quantile: float = 0.9,
                 warmup: int = 5) -> None:
        self.state, self.spike, self.window, self.quantile, self.warmup = state, spike, window, quantile, warmup
        self.state.setdefault("recent", [])

    def reference(self) -> float | None:
        """The current reference norm (None while warming up)."""
        recent = self.state["recent"]
        if len(recent) < max(self.warmup, 1):
            return None
        return math.exp(quantile(recent, self.quantile))

    def judge(self, norm: float) -> float:
        """``norm`` over the reference (NaN while warming up or for a norm that is not finite and positive), then
        take ``norm`` into the window."""
        if not (math.isfinite(norm) and norm > 0):
            return math.nan
        ref = self.reference()
        x = math.log(norm)
        if ref is not None:  # a spike raises the reference by at most sqrt(spike) per step it is in the window
            x = min(x, math.log(ref) + 0.5 * math.log(self.spike))
        recent = self.state["recent"]
        recent.append(x)
        del recent[: max(0, len(recent) - self.window)]
        return norm / ref if ref is not None else math.nan


def spike_factors(norms: Sequence[float], spike: float, window: int = 64, quantile: float = 0.9,
                  warmup: int = 5) -> list[float]:
    """The spike factor at each of ``norms`` (NaN in warm-up), as :class:`~gradwatch.alerts.Exploding` judges
    them (the calibration zoo reports it)."""
    ref = SpikeReference({}, spike, window, quantile, warmup)
    return [ref.judge(float(g)) for g in norms]
