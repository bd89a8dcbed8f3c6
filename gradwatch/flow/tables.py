"""Block flow as numbers and tables: the six :data:`~gradwatch.names.FLOW_METRICS` from a step's norms, and
per-block summaries of a ``Monitor.history()`` frame. The only part of block flow that uses pandas."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..measure.norms import safe_ratio
from ..names import FLOW_METRICS

__all__ = ["flow_metrics", "summary", "share_table"]


def flow_metrics(norms: np.ndarray) -> dict[str, np.ndarray]:
    """The six :data:`FLOW_METRICS` from an ``(n, 4)`` array of norms (grad_out, grad_in, skip, branch)."""
    norms = np.asarray(norms, dtype=np.float64).reshape(-1, 4)
    out, inp, skip, branch = norms.T
    return {
        "grad_out": out,
        "grad_in": inp,
        "skip_grad": skip,
        "branch_grad": branch,
        "skip_share": safe_ratio(skip * skip, skip * skip + branch * branch),
        "transmission": safe_ratio(inp, out),
    }


def summary(history: pd.DataFrame, step: int | None = None, how: str = "median") -> pd.DataFrame:
    """One row per block, one column per flow metric, from a ``Monitor.history()`` frame.

    ``step``: the values of that logging step; otherwise ``how`` (``"median"``, ``"mean"``, ``"first"``,
    ``"last"``, ``"min"``, ``"max"``) over all logged steps. Rows keep the depth order the blocks were logged
    in. Empty frame when the history holds no block metrics.

    >>> flow.summary(mon.history())[["skip_share", "transmission"]]   # doctest: +SKIP
    """
    rows = history[history.metric.isin(FLOW_METRICS)]
    if step is not None:
        rows = rows[rows.step == step]
    if rows.empty:
        return pd.DataFrame(columns=list(FLOW_METRICS), dtype=float)
    order = list(dict.fromkeys(rows.name))
    if how not in ("median", "mean", "first", "last", "min", "max"):
        raise ValueError(f"how must be median, mean, first, last, min or max, got {how!r}")
    table = rows.sort_values("step", kind="stable").groupby(["name", "metric"], sort=False).value.agg(how)
    table = table.unstack("metric").reindex(index=order, columns=list(FLOW_METRICS))
    table.index.name = "block"
    table.columns.name = None
    return table


def share_table(histories: dict[str, pd.DataFrame], metric: str = "skip_share", how: str = "median") -> str:
    """A text table of one flow metric per block (rows, depth order) for several runs (columns).

    ``histories`` maps a run label to its ``Monitor.history()``; runs without blocks (a plain net) show
    ``-``. Meant for printouts such as the demo's:

    >>> print(flow.share_table({"postact": h1, "preact": h2, "broken_skip": h3}))   # doctest: +SKIP
    """
    if metric not in FLOW_METRICS:
        raise ValueError(f"metric must be one of {FLOW_METRICS}, got {metric!r}")
    columns = {label: summary(h, how=how)[metric] for label, h in histories.items()}
    rows: list[str] = []
    for col in columns.values():
        rows.extend(n for n in col.index if n not in rows)
    width = max([5] + [len(r) for r in rows])
    head = f"{'block':<{width}}" + "".join(f" {label:>12}" for label in columns)
    lines = [head]
    for r in rows:
        cells = []
        for col in columns.values():
            v = col.get(r, np.nan)
            cells.append(f" {'-':>12}" if not np.isfinite(v) else f" {v:>12.3g}")
        lines.append(f"{r:<{width}}" + "".join(cells))
    return "\n".join(lines)
