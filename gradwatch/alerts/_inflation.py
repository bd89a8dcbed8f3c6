"""How much of a layer's steps went into growing its weight's norm: the measure behind the ``instability``
rule's inflation trigger (round 4, ``docs/alerts.md``), kept apart from the rule's other arithmetic."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._stats import quantile

__all__ = ["alignment", "empty", "reached"]


def empty() -> dict[str, Any]:
    """The history :func:`alignment` keeps: plain lists, so a rule's state is checkpointed as JSON."""
    return {"names": [], "steps": [], "log_weight": [], "update": []}


def alignment(hist: dict[str, Any], names: list[str], weight: np.ndarray, update: np.ndarray, step: int,
              window: int, judge: bool) -> np.ndarray:
    """Per layer, the share of its steps' length over the last ``window`` logging steps that went into growing
    its weight's norm: ``log(|w_now| / |w_then|)`` over the summed ``update_to_weight`` of the steps between
    (each logged update standing for the steps up to the next logging step, so ``every`` does not change it).
    About the mean cosine between step and weight: ~1 when every step scales the weight up, ~0 for steps
    across it (a random walk grows the norm by the square of its steps only), negative when it shrinks. NaN
    while ``judge`` is false or fewer than ``window`` logging steps are kept, and for layers without an update.
    ``hist`` (:func:`empty`) is a (steps x layers) table, restarted when the set of layers changes: one array
    op per logging step, nothing per layer in Python."""
    if hist["names"] != names:
        hist.update(empty(), names=list(names))
    out = np.full(len(names), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        logw = np.log(np.asarray(weight, dtype=np.float64))
        if judge and len(hist["steps"]) >= window:
            steps = np.diff(np.array(hist["steps"][-window:] + [step], dtype=np.float64))
            length = (np.array(hist["update"][-window:], dtype=np.float64) * steps[:, None]).sum(axis=0)
            grown = logw - np.array(hist["log_weight"][-window], dtype=np.float64)
            out = np.where(length > 0, grown / length, np.nan)
    hist["steps"].append(step)
    hist["log_weight"].append(logw.tolist())
    hist["update"].append(np.asarray(update, dtype=np.float64).tolist())
    for key in ("steps", "log_weight", "update"):
        del hist[key][: max(0, len(hist[key]) - window)]
    return out


def reached(align: np.ndarray, share: float) -> float:
    """The alignment that ``share`` of the layers reach (their ``1 - share`` quantile); NaN while none is
    known."""
    a = align[np.isfinite(align)]
    return quantile(a, 1 - share)
