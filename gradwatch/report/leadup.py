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
from typing import Any

import numpy as np
import pandas as pd

from ..names import GLOBAL_NAME

__all__ = ["find_recording", "read_recording", "lead_up", "render_lead_up"]

_COLUMNS = 6  # steps shown per signal
_MOVERS = 3  # series shown besides the subject's
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


def _score(last: float, before: np.ndarray) -> float:
    """How far ``last`` moved from the median of ``before``: |log10(last / median)|; inf when it became NaN or
    infinite from finite values; NaN when there is nothing to compare."""
    finite = before[np.isfinite(before)]
    if not finite.size:
        return math.nan
    if not math.isfinite(last):
        return math.inf
    base = float(np.median(finite))
    if base == 0.0 or last == 0.0:
        return math.inf if (base == 0.0) != (last == 0.0) else 0.0
    return abs(math.log10(abs(last) / abs(base)))


def lead_up(frame: pd.DataFrame, subject: str | None, movers: int = _MOVERS) -> dict[str, Any]:
    """The signals of a recording: ``{"steps": [first, last, n], "signals": [{"name", "metric", "subject",
    "values": {step: value}, "change": last / median before}]}`` (JSON-safe: non-finite values as strings)."""
    steps = sorted(int(s) for s in frame.step.unique())
    if not steps:
        return {"steps": [0, 0, 0], "signals": []}
    shown = sorted({steps[i] for i in np.linspace(0, len(steps) - 1, min(_COLUMNS, len(steps))).round().astype(int)})
    last = steps[-1]
    who = subject if subject is not None and (frame.name == subject).any() else GLOBAL_NAME
    picked: list[tuple[float, bool, str, str, pd.Series]] = []
    for (name, metric), rows in frame.groupby(["name", "metric"], sort=False):
        series = rows.set_index("step").value
        series = series[~series.index.duplicated(keep="last")]
        if last not in series.index:
            continue
        before = series[series.index < last].to_numpy(dtype=np.float64)
        score = _score(float(series[last]), before)
        mine = name == who and (who != GLOBAL_NAME or metric in ("grad_norm", "update_to_weight", "grad_to_weight"))
        picked.append((score, mine, str(name), str(metric), series))
    ranked = sorted((p for p in picked if not p[1] and not math.isnan(p[0]) and p[0] >= _MOVED),
                    key=lambda p: -p[0])[:movers]
    signals = []
    for score, mine, name, metric, series in [*(p for p in picked if p[1]), *ranked]:
        before = series[series.index < last].to_numpy(dtype=np.float64)
        finite = before[np.isfinite(before)]
        base = float(np.median(finite)) if finite.size else math.nan
        now = float(series[last])
        change = now / base if base and math.isfinite(base) else math.nan
        signals.append({"name": name, "metric": metric, "subject": mine, "change": _json(change),
                        "values": {str(s): _json(float(series[s])) for s in shown if s in series.index}})
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
