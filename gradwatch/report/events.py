"""``gradwatch report LOGDIR``: what a run's gradients did, read back from its event files.

:func:`load` reads every run under a folder with TensorBoard's own reader into one long table (the columns of
``Monitor.history()`` with ``run`` in front); :func:`summarize` turns one run into the answers (the health
figures, the layers with the lowest and highest gradient-to-weight ratio, the blocks with the lowest
skip_share, the incidents); :func:`render_text` and :mod:`gradwatch.report._html` print and share them.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ..alerts import read_events
from ..alerts.alert import SEVERITIES, severity_rank
from ..alerts.incident import EVENT_KINDS
from ..health import HEALTH
from ..names import GLOBAL_NAME
from ..sinks.tags import Tags
from ..sinks.tensorboard import _series
from ..sinks.tensorboard.link import own_tags, pin_link
from .leadup import find_recording, lead_up, read_recording, render_lead_up

__all__ = ["RunReport", "find_runs", "load", "summarize", "read", "render_text", "write_table", "check_output",
           "to_json", "worst_severity", "COLUMNS"]

#: The long table's columns: ``Monitor.history()``'s, with the run first.
COLUMNS = ("run", "step", "name", "metric", "value")
_MARK = "/grad_norm/_global"  # every gradwatch namespace writes <layers group>/grad_norm/_global: how one is recognised
_TOP = 5  # rows per ranking


@dataclass
class RunReport:
    """One run (one namespace of one event folder), summarised."""

    run: str
    path: str
    steps: tuple[int, int, int]  # first, last, how many logging steps
    health: pd.DataFrame  # index: figure; columns last, min, max
    low_layers: pd.DataFrame  # index: layer; columns min, median, last (of grad_to_weight)
    high_layers: pd.DataFrame
    low_blocks: pd.DataFrame  # index: block; columns min, median, last (of skip_share)
    incidents: list[dict] = field(default_factory=list)  # from alerts.jsonl: opened, with how they ended
    pictures: dict[str, bytes] = field(default_factory=dict)  # the run's latest TensorBoard pictures (PNG)
    worst: str | None = None  # the most severe incident (alerts.jsonl, else the event files' open counts)
    recorded: bool = True  # whether the run's folder has an alerts.jsonl (the incidents listed come from it)
    own_scalars: list[str] = field(default_factory=list)  # the folder's scalar tags not gradwatch's or a trainer's


def find_runs(logdir: str | os.PathLike) -> list[str]:
    """Folders under ``logdir`` (itself included) that hold TensorBoard event files, sorted."""
    root = os.fspath(logdir)
    if not os.path.isdir(root):
        raise ValueError(f"{root!r} is not a folder")
    return sorted(folder for folder, _, files in os.walk(root)
                  if any(f.startswith("events.out.tfevents.") for f in files))


def _accumulator(path: str) -> EventAccumulator:
    acc = EventAccumulator(path, size_guidance={"scalars": 0, "images": 4, "tensors": 0, "histograms": 1})
    acc.Reload()
    return acc


def _namespaces(tags: Sequence[str]) -> list[str]:
    found = {Tags.namespace_of(t) for t in tags if t.endswith(_MARK)}
    return sorted(ns for ns in found if ns is not None and Tags(ns).layer("grad_norm", GLOBAL_NAME) in tags)


def _series_rows(acc: EventAccumulator, tags: Tags, cols: dict[str, list]) -> set[str]:
    """Append the per-layer and per-block values of the series tensors to ``cols``; the metrics found."""
    tensor_tags = set(acc.Tags().get("tensors", []))
    found: set[str] = set()
    for block in (False, True):
        names_tag = tags.series_names(block)
        if names_tag not in tensor_tags:
            continue
        names = {e.step: _series.decode(e.tensor_proto) for e in acc.Tensors(names_tag)}
        head = tags.series("", block)
        for tag in sorted(t for t in tensor_tags if t.startswith(head) and not t[len(head):].startswith("_")):
            metric = tag[len(head):]
            for e in acc.Tensors(tag):
                at = names.get(e.step)
                vals = _series.decode(e.tensor_proto)
                if at is None or len(at) != len(vals):  # names of another step: a torn write, skipped
                    continue
                cols["step"].extend([e.step] * len(at))
                cols["value"].extend(np.asarray(vals).tolist())
                cols["name"].extend(at)
                cols["metric"].extend([metric] * len(at))
            found.add(metric)
    return found


def load(logdir: str | os.PathLike) -> pd.DataFrame:
    """Every gradwatch value of every run under ``logdir`` as one long table (:data:`COLUMNS`). A run is a
    folder of event files (several gradwatch namespaces in it, e.g. one per optimizer, are runs of their own:
    ``"<folder> [<namespace>]"``). Health figures are metrics of ``_global``, as in ``Monitor.history()``."""
    frames = [frame for _, _, frame, _ in _read(logdir)]
    return pd.concat(frames, ignore_index=True) if frames else _empty()


def _empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(COLUMNS, ("object", "int64", "object", "object",
                                                                           "float64"))})


def _read(logdir: str | os.PathLike):  # noqa: ANN202 - yields (run, path, frame, accumulator)
    root = os.fspath(logdir)
    for path in find_runs(root):
        acc = _accumulator(path)
        scalar_tags = acc.Tags()["scalars"]
        spaces = _namespaces(scalar_tags)
        rel = os.path.relpath(path, root)
        for ns in spaces:
            run = rel if rel != "." else os.path.basename(os.path.abspath(root))
            run = run if len(spaces) == 1 else f"{run} [{ns or 'no prefix'}]"
            tags = Tags(ns)
            cols: dict[str, list] = {c: [] for c in COLUMNS}
            in_series = _series_rows(acc, tags, cols)
            for tag in scalar_tags:
                parsed = tags.parse(tag)
                if parsed is None or parsed.metric in in_series:  # per-layer scalars (layer_scalars) repeat them
                    continue
                events = acc.Scalars(tag)
                cols["step"].extend(e.step for e in events)
                cols["value"].extend(10.0 ** e.value if parsed.log10 else e.value for e in events)
                cols["name"].extend([parsed[0]] * len(events))
                cols["metric"].extend([parsed[1]] * len(events))
            cols["run"] = [run] * len(cols["step"])
            frame = pd.DataFrame(cols, columns=list(COLUMNS))
            frame["step"] = frame["step"].astype("int64")
            frame["value"] = frame["value"].astype("float64")
            yield run, path, frame.sort_values(["step"], kind="stable", ignore_index=True), (acc, tags)


def _stats(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per name: min, median and last of ``metric`` (names in order of first appearance)."""
    rows = frame[(frame.metric == metric) & (frame.name != GLOBAL_NAME)]
    if rows.empty:
        return pd.DataFrame(columns=["min", "median", "last"])
    g = rows.groupby("name", sort=False).value
    out = pd.DataFrame({"min": g.min(), "median": g.median(), "last": g.last()})
    return out


def _incidents(path: str) -> list[dict] | None:
    """The incidents told in the run's ``alerts.jsonl`` (None: no such file): each ``opened`` event, with
    ``resolved_at``, ``peak`` (the most severe it became) and ``lead_up`` (its flight recorder's file read back,
    :mod:`gradwatch.report.leadup`)."""
    file = os.path.join(path, "alerts.jsonl")
    if not os.path.isfile(file):
        return None
    ends: dict[Any, Any] = {}
    peaks: dict[Any, int] = {}
    opened = []
    for e in read_events(file):
        if e.get("told") is False or e.get("event") not in EVENT_KINDS:
            continue
        key = e.get("incident")
        peaks[key] = max(peaks.get(key, 0), *(_rank(e.get(k)) for k in ("severity", "peak")))
        if e.get("event") == "opened":
            opened.append(e)
        elif e.get("event") == "resolved":
            ends[key] = e.get("step")
    return [{**e, "resolved_at": ends.get(e.get("incident")), "peak": SEVERITIES[peaks[e.get("incident")]],
             "lead_up": _lead_up(e, path)} for e in opened]


def _rank(severity: Any) -> int:
    return severity_rank(severity) if severity in SEVERITIES else 0


def _lead_up(event: dict, folder: str) -> dict | None:
    """The incident's flight recording summarised, an ``error`` saying why not, or None without one."""
    recording = event.get("recording")
    if not recording:
        return None
    path = find_recording(str(recording), folder)
    if path is None:
        return {"recording": recording, "error": f"{os.path.basename(recording)} not found"}
    try:
        frame = read_recording(path)
    except Exception as err:  # a file cut short, pyarrow missing: say so under the incident, go on
        return {"recording": path, "error": f"cannot read {os.path.basename(path)}: {err}"}
    return {"recording": path, **lead_up(frame, event.get("name"))}


def _alerted(acc: EventAccumulator, tags: Tags) -> str | None:
    """Without ``alerts.jsonl``: the most severe incident the event files show open at some step."""
    scalars = set(acc.Tags().get("scalars", []))
    worst = None
    for severity in SEVERITIES:
        tag = tags.open_incidents(severity)
        if tag in scalars and any(e.value > 0 for e in acc.Scalars(tag)):
            worst = severity
    return worst


def worst_severity(reports: Sequence[RunReport]) -> str | None:
    """The most severe incident of any of the runs (``"info"``, ``"warning"``, ``"critical"``), None without
    one: what ``gradwatch report``'s exit status says."""
    found = [r.worst for r in reports if r.worst is not None]
    return max(found, key=severity_rank) if found else None


def _kinds(acc: EventAccumulator, tags: Tags) -> dict[str, str]:
    """Each layer's kind, from the latest step that wrote them."""
    tensors = acc.Tags().get("tensors", [])
    if tags.kinds not in tensors or tags.series_names(False) not in tensors:
        return {}
    kinds = acc.Tensors(tags.kinds)[-1]
    names = {e.step: e for e in acc.Tensors(tags.series_names(False))}.get(kinds.step)
    if names is None:
        return {}
    return dict(zip(_series.decode(names.tensor_proto), _series.decode(kinds.tensor_proto)))


def _pictures(acc: EventAccumulator, tags: Tags) -> dict[str, bytes]:
    out = {}
    for tag in acc.Tags().get("images", []):
        if tag.startswith(tags.pictures_group + "/"):
            images = acc.Images(tag)
            if images:
                out[tag.rsplit("/", 1)[1]] = images[-1].encoded_image_string
    return out


def summarize(logdir: str | os.PathLike, top: int = _TOP) -> list[RunReport]:
    """One :class:`RunReport` per run under ``logdir``."""
    return read(logdir, top)[1]


def read(logdir: str | os.PathLike, top: int = _TOP) -> tuple[pd.DataFrame, list[RunReport]]:
    """:func:`load` and :func:`summarize` in one pass over the event files."""
    reports, frames = [], []
    for run, path, frame, (acc, tags) in _read(logdir):
        frames.append(frame)
        steps = sorted(frame.step.unique().tolist())
        glob = frame[frame.name == GLOBAL_NAME]
        health = {}
        for figure in ("grad_norm", *HEALTH):
            v = glob[glob.metric == figure].value
            if len(v):
                health[figure] = {"last": v.iloc[-1], "min": v.min(), "max": v.max()}
        g2w = _stats(frame, "grad_to_weight")
        kinds = _kinds(acc, tags)
        if kinds and any(k == "weight" for k in kinds.values()):  # norm layers' ratios sit apart by design
            g2w = g2w[[kinds.get(n) == "weight" for n in g2w.index]]
        g2w = g2w.sort_values("median")
        share = _stats(frame, "skip_share").sort_values("median")
        incidents = _incidents(path)
        if incidents is None:
            worst = _alerted(acc, tags)
        else:
            worst = max((i["peak"] for i in incidents), key=severity_rank) if incidents else None
        reports.append(RunReport(
            run=run, path=path, steps=(steps[0], steps[-1], len(steps)) if steps else (0, 0, 0),
            health=pd.DataFrame.from_dict(health, orient="index", columns=["last", "min", "max"]),
            low_layers=g2w.head(top), high_layers=g2w.iloc[::-1].head(top), low_blocks=share.head(top),
            incidents=incidents or [], pictures=_pictures(acc, tags), worst=worst, recorded=incidents is not None,
            own_scalars=own_tags(acc.Tags()["scalars"])))
    table = pd.concat(frames, ignore_index=True) if frames else _empty()
    return table, reports


def _table(df: pd.DataFrame, indent: str = "  ") -> str:
    if df.empty:
        return f"{indent}(none)"
    text = df.to_string(float_format=lambda v: f"{v:.4g}")
    return "\n".join(indent + line for line in text.splitlines())


def render_text(reports: Sequence[RunReport]) -> str:
    """The reports as the console text of ``gradwatch report``."""
    out = []
    for r in reports:
        first, last, n = r.steps
        out.append(f"== {r.run}  ({r.path}): steps {first}–{last}, {n} logging steps")
        out.append("health (last / min / max):")
        out.append(_table(r.health))
        out.append("weight layers with the lowest grad_to_weight (by median):")
        out.append(_table(r.low_layers))
        out.append("weight layers with the highest grad_to_weight (by median):")
        out.append(_table(r.high_layers))
        if not r.low_blocks.empty:
            out.append("blocks with the lowest skip_share (by median):")
            out.append(_table(r.low_blocks))
        out.append(_incident_lines(r.incidents, None if r.recorded else r.worst))
        out.append("")
    link = pin_link(t for r in reports for t in r.own_scalars)
    if link is not None:  # TensorBoard opens two groups; pins from its URL are drawn above them
        out.append(f"TensorBoard, your first charts pinned above gradwatch's health card: {link}")
    if not reports:
        out.append("no gradwatch values found (no event file with a 'zz_<namespace>.layers/grad_norm/_global' tag)")
    return "\n".join(out)


def _incident_lines(incidents: list[dict], unrecorded: str | None = None) -> str:
    if not incidents:
        if unrecorded is not None:  # no alerts.jsonl to list them from: say what the event files show
            return f"incidents: no alerts.jsonl in the run's folder; its event files show an incident at {unrecorded}"
        return "incidents: none"
    lines = [f"incidents: {len(incidents)}"]
    for e in incidents:
        end = f"resolved at {e['resolved_at']}" if e.get("resolved_at") is not None else "still open at the end"
        where = f" ({e['name']})" if e.get("name") else ""
        peak = e.get("peak", e.get("severity"))
        rose = f"[{e.get('severity')} → {peak}]" if peak != e.get("severity") else f"[{peak}]"
        lines.append(f"  {rose} {e.get('rule')}{where} from step {e.get('step')}, {end}: {e.get('message', '')}")
        if e.get("lead_up"):
            lines.extend(render_lead_up(e["lead_up"]))
    return "\n".join(lines)


def _table_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith((".csv", ".csv.gz")):
        return "csv"
    raise ValueError(f"the table path must end in .csv, .csv.gz or .parquet, got {path!r}")


def write_table(frame: pd.DataFrame, path: str) -> str:
    """The long table to ``.csv`` (``.csv.gz``) or ``.parquet`` (needs pyarrow)."""
    if _table_format(path) == "parquet":
        try:
            frame.to_parquet(path, index=False)
        except ImportError as err:
            raise ImportError("writing Parquet needs pyarrow (pip install pyarrow); or use --csv") from err
    else:
        frame.to_csv(path, index=False)
    return path


def check_output(path: str, table: bool = False) -> None:
    """Raise, with a one-line message, unless ``path`` can be written: before a report is read and printed,
    not after. ``table``: a :func:`write_table` path (its suffix and, for Parquet, pyarrow are checked too).
    An existing file is opened for appending (left as it was); a new one is created and removed again."""
    if table and _table_format(path) == "parquet" and not any(
            importlib.util.find_spec(m) for m in ("pyarrow", "fastparquet")):
        raise ImportError("writing Parquet needs pyarrow (pip install pyarrow); or use --csv")
    if os.path.isdir(path):
        raise ValueError(f"cannot write {path}: it is a folder")
    try:
        if os.path.exists(path):
            with open(path, "ab"):
                pass
        else:
            with open(path, "xb"):
                pass
            os.remove(path)
    except OSError as err:
        raise ValueError(f"cannot write {path}: {err.strerror or err}") from err


def to_json(reports: Sequence[RunReport]) -> str:
    """The reports as JSON (no pictures): for scripts and CI checks."""
    def table(df: pd.DataFrame) -> dict:
        return {str(k): {c: (None if not np.isfinite(v) else float(v)) for c, v in row.items()}
                for k, row in df.to_dict(orient="index").items()}
    return json.dumps([{"run": r.run, "path": r.path, "steps": list(r.steps), "health": table(r.health),
                        "low_layers": table(r.low_layers), "high_layers": table(r.high_layers),
                        "low_blocks": table(r.low_blocks), "incidents": r.incidents} for r in reports], indent=1)
