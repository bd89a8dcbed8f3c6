"""Scoring a grid of candidate early-warning triggers on recorded runs, as the instability suite scores runs
(``instability_forward.py``, ``instability_overshoot.py``: the offline rounds of docs/alerts.md)."""

from __future__ import annotations

import glob
import os
import pickle
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


def recordings(folders: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Each pickled run of ``folders``, in name order per folder."""
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, "*.pkl"))):
            with open(path, "rb") as f:
                yield pickle.load(f)


def outcome(pairs: Sequence[tuple[int | None, int | None]]) -> tuple[int, int, float]:
    """(false alarms, runs warned ahead, median lead) of (blew-up step, first warning) pairs: a run warned ahead
    was warned strictly before it blew up; a false alarm is a warning on a run that did not blow up."""
    ahead = [b - w for b, w in pairs if b is not None and w is not None and w < b]
    alarms = sum(b is None and w is not None for b, w in pairs)
    return alarms, len(ahead), float(np.median(ahead)) if ahead else float("nan")


def frontier(scored: Sequence[tuple[int, int, float, str]], calm: int, blew: int) -> None:
    """Print, per count of false alarms up to ``calm``, the (alarms, recall, lead, setting) with the best recall
    (ties: the longer lead, then fewer alarms), where it improves."""
    shown = -1
    for most in range(calm + 1):
        within = [s for s in scored if s[0] <= most]
        alarms, recall, lead, setting = max(within or [(0, -1, 0.0, "")], key=lambda s: (s[1], s[2], -s[0]))
        if recall > shown:
            shown = recall
            print(f"  <= {most}: recall {recall}/{blew}, median lead {lead:g}, {alarms} false alarms  ({setting})")
