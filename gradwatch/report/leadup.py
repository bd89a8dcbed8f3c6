"""The lead-up of an incident in ``gradwatch report``: its flight recorder's file read back, and the few signals
that moved before it opened.

The file (:mod:`gradwatch.sinks.recorder`) holds every layer's and block's values over the logging steps up to
the incident's opening step, in ``Monitor.history()``'s long format. Two kinds of signal are shown: the
incident's subject (its layer or block, every metric; the whole model's ``_global`` values for an incident
about the whole model), and up to three series that moved most at the opening step against their own median
over the steps before it (the ratio ``last / median before``, at least 2x either way, ranked by how far its
logarithm is from 0; a value that became NaN or infinite ranks first). A few steps are shown, evenly spaced,
the opening step last.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np
import pandas as pd

from ..names import GLOBAL_NAME

__all__ = ["find_recording", "read_recording", "lead_up", "render_lead_up"]

_COLUMNS = 6  # steps shown per signal
_MOVERS = 3  # series shown besides the subject's
_WHOLE = ("grad_norm", "update_to_weight", "grad_to_weight")  # the _global series shown for a whole-model incident
_MOVED = math.log10(2.0)  # a series moved when its opening value is 2x (or 1/2x) its median before, or more


def find_recording(recording: str, folder: str) -> str | None:
    """The file an incident's ``recording`` field names: as written when it is there, else the file of that
    name in ``folder`` (the run's folder, copied or moved since); None when neither exists."""
    for path in (recording, os.path.join(folder, os.path.basename(recording))):
        if os.path.isfile(path):
            return path
    return None


def read_recording(path: str) -> pd.DataFrame:
    """A flight recorder's file (``.parquet`` or ``.csv``) as a DataFrame: ``step, name, metric, value``."""
    if path.endswith(".parquet"):
        try:
            return pd.read_parquet(path)
        except ImportError as err:
            raise ImportError(f"reading {os.path.basename(path)} needs pyarrow (pip install pyarrow)") from err
    return pd.read_csv(path, dtype={"name": str, "metric": str}, keep_default_na=False,
                       na_values={"value": ["", "nan", "NaN"]})


def _json(v: float) -> float | str:
    return float(v) if math.isfinite(v) else str(v)


def _median_before(before: np.ndarray) -> np.ndarray:
    """Each row's median over its finite values (NaN for a row without one)."""
    if not before.shape[1]:
        return np.full(len(before), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a row without a finite value: NaN is the answer
        return np.nanmedian(np.where(np.isfinite(before), before, np.nan), axis=1)


def _scores(now: np.ndarray, base: np.ndarray) -> np.ndarray:
    """How far each ``now`` moved from its ``base``: |log10(now / base)|; inf when it became NaN or infinite,
    or left 0 or reached it; NaN with nothing to compare (no finite value before)."""
    with np.errstate(all="ignore"):
        score = np.abs(np.log10(np.abs(now) / np.abs(base)))
    score = np.where((base == 0) & (now == 0), 0.0, score)
    score = np.where(np.isfinite(base) & ~np.isfinite(now), np.inf, score)
    return np.where(np.isnan(base), np.nan, score)


def lead_up(frame: pd.DataFrame, subject: str | None, movers: int = _MOVERS) -> dict[str, Any]:
    """The signals of a recording: ``{"steps": [first, last, n], "signals": [{"name", "metric", "subject",
    "values": {step: value}, "change": last / median before}]}`` (JSON-safe: non-finite values as strings)."""
    steps = sorted(int(s) for s in frame.step.unique())
    if not steps:
        return {"steps": [0, 0, 0], "signals": []}
    shown = sorted({steps[i] for i in np.linspace(0, len(steps) - 1, min(_COLUMNS, len(steps))).round().astype(int)})
    last = steps[-1]
    who = subject if subject is not None and (frame.name == subject).any() else GLOBAL_NAME
    rows = frame.drop_duplicates(["step", "name", "metric"], keep="last").assign(there=1.0)
    wide = rows.pivot(index=["name", "metric"], columns="step", values="value")
    there = rows.pivot(index=["name", "metric"], columns="step", values="there").notna()  # NaN: measured or not
    first_seen = pd.MultiIndex.from_frame(rows[["name", "metric"]].drop_duplicates())  # the record's order, kept
    wide, there = wide.reindex(first_seen), there.reindex(first_seen)
    keep = there[last].to_numpy()  # the series measured at the opening step
    wide, there = wide[keep], there[keep]
    values = wide.to_numpy(dtype=np.float64)
    columns = list(wide.columns)
    now = values[:, columns.index(last)]
    base = _median_before(values[:, [i for i, s in enumerate(columns) if s < last]])
    score = _scores(now, base)
    names = [str(n) for n in wide.index.get_level_values("name")]
    metrics = [str(m) for m in wide.index.get_level_values("metric")]
    mine = [n == who and (who != GLOBAL_NAME or m in _WHOLE) for n, m in zip(names, metrics)]
    order = np.argsort(-np.nan_to_num(score, nan=-1.0, posinf=np.finfo(np.float64).max), kind="stable")
    moved = [int(i) for i in order if not mine[i] and score[i] >= _MOVED][:movers]
    signals = []
    for i in [*(i for i, m in enumerate(mine) if m), *moved]:
        change = now[i] / base[i] if math.isfinite(base[i]) and base[i] != 0 else math.nan
        signals.append({"name": names[i], "metric": metrics[i], "subject": mine[i], "change": _json(float(change)),
                        "values": {str(s): _json(float(wide.iat[i, columns.index(s)])) for s in shown
                                   if there.iat[i, columns.index(s)]}})
    return {"steps": [steps[0], last, len(steps)], "signals": signals}


def _num(v: float | str) -> str:
    return v if isinstance(v, str) else f"{v:.3g}"


def render_lead_up(entry: dict[str, Any], indent: str = "    ") -> list[str]:
    """The lines ``gradwatch report`` prints under an incident for its lead-up."""
    if entry.get("error"):
        return [f"{indent}lead-up: {entry['error']}"]
    first, last, n = entry["steps"]
    head = f"{indent}lead-up ({os.path.basename(entry['recording'])}: steps {first}–{last}, {n} logging steps)"
    signals = entry["signals"]
    if not signals:
        return [head + ": no values"]
    steps = sorted({int(s) for sig in signals for s in sig["values"]})
    label = [f"{sig['name']} {sig['metric']}" + ("" if sig["subject"] else " *") for sig in signals]
    width = max(len(s) for s in label)
    cells = [[_num(sig["values"][str(s)]) if str(s) in sig["values"] else "" for s in steps] for sig in signals]
    col = max(9, *(len(c) for row in cells for c in row))
    header = f"{indent}  {'step':<{width}} " + " ".join(f"{s:>{col}}" for s in steps) + "  last/median before"
    out = [head + ":", header]
    for name, row, sig in zip(label, cells, signals):
        out.append(f"{indent}  {name:<{width}} " + " ".join(f"{c:>{col}}" for c in row) + f"  {_num(sig['change'])}")
    if any(not sig["subject"] for sig in signals):
        out.append(f"{indent}  * moved most at the opening step, against its median before")
    return out
