"""``gradwatch report``: the event files of finished runs read back (``events``: the long table, per-run
summaries, text / JSON / CSV / Parquet) and one shareable HTML page (``_html``)."""

from __future__ import annotations

from .events import (COLUMNS, RunReport, check_output, find_runs, load, read, render_text, summarize, to_json,
                     worst_severity, write_table)

__all__ = ["COLUMNS", "RunReport", "check_output", "find_runs", "load", "read", "render_text", "summarize", "to_json",
           "worst_severity", "write_table"]
