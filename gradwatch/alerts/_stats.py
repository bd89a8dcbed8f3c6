"""Medians and quantiles of the short histories the alert rules keep, fast: rules run on every logging step, and numpy's
``median``/``nanmedian`` spend ~40-100 us each on the arrays of 10-40 values they read (argument handling, and
``nanmedian`` of a small axis goes through masked arrays), several times per rule per step. A sort of the whole
(rows x window) array, or Python's own sort of a short list, gives the same values in a few microseconds."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["nanmedian", "nanmedian_rows", "quantile", "quantiles"]


def nanmedian_rows(x: np.ndarray) -> np.ndarray:
    """Each row's median over the last axis of a 2-D array, NaN left out, as ``np.nanmedian(x, axis=1)``: one
    sort, then the middle one or two values (an array holding any NaN takes numpy's own path)."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[1] == 0 or np.isnan(x).any():
        return np.nanmedian(x, axis=1) if x.shape[1] else np.full(x.shape[0], np.nan)
    s, n = np.sort(x, axis=1), x.shape[1]
    return s[:, n // 2] if n % 2 else (s[:, n // 2 - 1] + s[:, n // 2]) / 2


def nanmedian(values: Iterable[float]) -> float:
    """The median of ``values``, NaN left out (none, or NaN only: NaN), as ``np.nanmedian``."""
    v = sorted(float(x) for x in values if x == x)  # x == x: not NaN
    n = len(v)
    if not n:
        return math.nan
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def quantile(values: Iterable[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (NaN if one is NaN or there are none), as ``np.quantile``'s default
    (linear) method computes it: the two values around the index ``(n - 1) q`` of the sorted values,
    interpolated from the nearer end."""
    return quantiles(values, (q,))[0]


def quantiles(values: Iterable[float], qs: Sequence[float]) -> list[float]:
    """:func:`quantile` of ``values`` at each of ``qs``, from one sort."""
    v = sorted(float(x) for x in values)
    n = len(v)
    if not n or any(x != x for x in v):
        return [math.nan for _ in qs]
    return [_interpolated(v, (n - 1) * q) for q in qs]


def _interpolated(v: list[float], at: float) -> float:
    """The value at fractional index ``at`` of the sorted ``v``, as numpy's linear method computes it."""
    n = len(v)
    i = math.floor(at)
    t = at - i
    # past either end both neighbours are the end value (numpy's lerp then gives NaN for an infinite one)
    a, b = (v[-1], v[-1]) if at >= n - 1 else ((v[0], v[0]) if at < 0 else (v[i], v[i + 1]))
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t
