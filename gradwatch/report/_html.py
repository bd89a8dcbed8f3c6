"""``gradwatch report --html``: one self-contained page (pictures inlined as base64 PNG, no external files or
scripts) to share or attach to a ticket."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..names import GLOBAL_NAME
from ..sinks.tensorboard.pictures import G2W_RANGE, depth_distribution, heatmap, profile
from .events import RunReport
from .leadup import render_lead_up

__all__ = ["render_html"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
td, th { padding: 2px 10px; border-bottom: 1px solid #eee; text-align: right; }
td:first-child, th:first-child { text-align: left; font-family: monospace; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; border: 1px solid #eee; }
.critical { color: #b00; } .warning { color: #c60; } .info { color: #666; }
"""


def _table(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p>(none)</p>"
    return df.to_html(float_format=lambda v: f"{v:.4g}", border=0, na_rep="–")


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _drawn(frame: pd.DataFrame) -> dict[str, bytes]:
    """Pictures drawn from the table when the run has none in its event file (``pictures=0``)."""
    out: dict[str, bytes] = {}
    layers = frame[(frame.name != GLOBAL_NAME) & (frame.metric == "grad_to_weight")]
    if not layers.empty:
        grid = layers.pivot_table(index="name", columns="step", values="value", sort=False)
        out["grad_to_weight"] = heatmap("grad_to_weight", list(grid.index), list(grid.columns), grid.to_numpy(),
                                        log=True, title="gradient-to-weight ratio per layer",
                                        vmin=G2W_RANGE[0], vmax=G2W_RANGE[1]).png
    blocks = frame[frame.metric == "skip_share"]
    if not blocks.empty:
        grid = blocks.pivot_table(index="name", columns="step", values="value", sort=False)
        out["skip_share"] = heatmap("skip_share", list(grid.index), list(grid.columns), grid.to_numpy(),
                                    log=False, title="skip_share per residual block", unit="block").png
    if not layers.empty:
        last = frame[frame.step == frame.step.max()]
        pick = last[last.name != GLOBAL_NAME].pivot_table(index="name", columns="metric", values="value", sort=False)
        names = [n for n in pick.index if n in set(layers.name)]
        col = (lambda m: pick.reindex(names)[m].to_numpy() if m in pick else np.full(len(names), np.nan))
        bnames = list(blocks[blocks.step == frame.step.max()].name)
        share = blocks[blocks.step == frame.step.max()].value.to_numpy()
        out["profile"] = profile(names, col("grad_norm"), col("grad_to_weight"), bnames, share,
                                 int(frame.step.max())).png
        last_blocks = frame[(frame.step == frame.step.max()) & frame.name.isin(bnames)]
        flow = last_blocks.pivot_table(index="name", columns="metric", values="value", sort=False).reindex(bnames)
        if bnames and {"skip_grad", "branch_grad"} <= set(flow.columns):
            out["effective_depth"] = depth_distribution(bnames, flow["skip_grad"].to_numpy(),
                                                        flow["branch_grad"].to_numpy(), int(frame.step.max())).png
    return out


def _lead_up(incident: dict) -> str:
    """The incident's lead-up (its flight recording), as the text report prints it; empty without one."""
    entry = incident.get("lead_up")
    if not entry:
        return ""
    return "<pre>" + html.escape("\n".join(render_lead_up(entry, indent=""))) + "</pre>"


def render_html(reports: Sequence[RunReport], frames: dict[str, pd.DataFrame], title: str) -> str:
    """The page for ``reports`` (``frames``: each run's long table, to draw pictures a run lacks)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for r in reports:
        first, last, n = r.steps
        parts.append(f"<h2>{html.escape(r.run)}</h2><p><code>{html.escape(r.path)}</code>: steps {first}–{last}, "
                     f"{n} logging steps</p>")
        parts.append("<h3>Health (last / min / max)</h3>" + _table(r.health))
        parts.append("<h3>Incidents</h3>")
        if r.incidents:
            rows = "".join(
                f"<li class='{html.escape(str(e.get('severity')))}'>[{html.escape(str(e.get('severity')))}] "
                f"<b>{html.escape(str(e.get('rule')))}</b> {html.escape(str(e.get('name') or ''))} from step "
                f"{e.get('step')}, {'resolved at ' + str(e['resolved_at']) if e.get('resolved_at') is not None else 'still open'}"
                f": {html.escape(str(e.get('message', '')))}{_lead_up(e)}</li>" for e in r.incidents)
            parts.append(f"<ul>{rows}</ul>")
        else:
            parts.append("<p>none</p>")
        pictures = r.pictures or _drawn(frames.get(r.run, pd.DataFrame(columns=["step", "name", "metric", "value"])))
        for name in ("profile", "effective_depth", "grad_to_weight", "skip_share"):
            if name in pictures:
                parts.append(_img(pictures[name], f"{r.run}: {name}"))
        parts.append("<h3>Layers with the lowest gradient-to-weight ratio (by median)</h3>" + _table(r.low_layers))
        parts.append("<h3>Layers with the highest gradient-to-weight ratio (by median)</h3>" + _table(r.high_layers))
        if not r.low_blocks.empty:
            parts.append("<h3>Blocks with the lowest skip_share (by median)</h3>" + _table(r.low_blocks))
    parts.append("</body></html>")
    return "\n".join(parts)
