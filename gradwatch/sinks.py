"""The TensorBoard sink: one logging step, written as one event.

``SummaryWriter.add_scalar`` costs ~80-100 µs per call on 2 cores, most of it the training thread waiting on
the writer's 10-entry queue; a ResNet-56 step holds ~640 values. One ``Summary`` proto can hold them all, so
the sink builds one per step and hands it to the writer's event file at once (one queue entry per step).
Writers that are not a torch ``SummaryWriter`` (any object with ``add_scalar``) get one call per value.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard import summary as tb_summary

from ._compat import event_file_writer
from .record import Sink, StepRecord

__all__ = ["TensorBoardSink", "ScalarsSink", "open_writer", "alert_markdown"]


def open_writer(log_dir: str | os.PathLike) -> SummaryWriter:
    """A ``SummaryWriter`` on ``log_dir``, created if needed; ValueError when it cannot be written to."""
    path = os.fspath(log_dir)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"log_dir {path!r} is not writable: {err.strerror or err}") from err
    return SummaryWriter(log_dir=path)


def alert_markdown(alert: Any) -> str:
    """An alert or incident event as the Markdown of its TensorBoard text entry."""
    markdown = getattr(alert, "markdown", None)
    if callable(markdown):  # an IncidentEvent
        return markdown().replace("\n", "\n\n")
    where = f" — `{alert.name}`" if alert.name else ""
    return (f"**{alert.severity}** {alert.rule}{where}\n\n{alert.message}\n\n"
            f"value {alert.value:.4g}, threshold {alert.threshold:.4g}\n\n*hint:* {alert.hint}")


class ScalarsSink(Sink):
    """Each record as one flat dict, ``fn({"<prefix><metric>/<name>": value, ...}, step)``: for loggers that
    take dicts of scalars (Lightning's ``log_metrics``, W&B, MLflow). No histograms; with ``counts``, the
    ``<prefix>nonfinite/<metric>`` counts that accompany them in TensorBoard."""

    def __init__(self, fn: Callable[[dict[str, float], int], Any], prefix: str = "", counts: bool = False) -> None:
        if not callable(fn):
            raise TypeError(f"ScalarsSink needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.prefix = prefix
        self.counts = counts

    def write(self, record: StepRecord) -> None:
        values = record.scalars(self.prefix)
        if self.counts:
            values.update({f"{self.prefix}nonfinite/{m}": float(c) for m, c in record.nonfinite_counts().items()})
        self.fn(values, record.step)


class TensorBoardSink(Sink):
    """Write each :class:`~gradwatch.StepRecord` to a ``SummaryWriter``.

    Scalars are tagged ``<prefix><metric>/<name>`` so that TensorBoard's grouping (text before the first
    ``/``) gives one section per metric. With ``histograms``, each metric also gets a histogram across names,
    ``<prefix>hist/<metric>``, of its finite values (layers only, ``_global`` left out), and a scalar
    ``<prefix>nonfinite/<metric>`` counting the NaN/Inf values left out of it. When alerting is on, every step
    writes ``<prefix>alerts/open/<severity>`` (open incidents: when trouble started and ended) and
    ``<prefix>alerts/count`` (incident events told at that step), each event a text entry
    ``<prefix>alerts/<rule>``, and the end of the run a text ``<prefix>alerts/summary``; the writer is flushed
    on a step with events so they show at once.
    ``add_scalars`` is never used: it makes a run per key.
    """

    def __init__(self, writer: Any, prefix: str = "", histograms: bool = True) -> None:
        self.writer = writer
        self.prefix = prefix
        self.histograms = histograms
        # One event per step only for a plain SummaryWriter: a subclass that overrides add_* gets its calls.
        plain = isinstance(writer, SummaryWriter) and all(
            getattr(type(writer), m) is getattr(SummaryWriter, m) for m in ("add_scalar", "add_histogram", "add_text"))
        self._events = event_file_writer(writer) if plain else None

    def write(self, record: StepRecord) -> None:
        p = self.prefix
        scalars: list[tuple[str, float]] = []
        hists: list[tuple[str, np.ndarray]] = []
        for metric, names, values in record.series():
            scalars.extend(zip((f"{p}{metric}/{n}" for n in names), values.tolist()))
            if self.histograms:
                vals = values[:-1] if metric in record.layer_metrics else values  # _global is not a layer
                finite = vals[np.isfinite(vals)]
                if finite.size:  # add_histogram raises on empty input
                    hists.append((f"{p}hist/{metric}", finite))
        if self.histograms:  # what the histograms leave out
            scalars.extend((f"{p}nonfinite/{m}", float(c)) for m, c in record.nonfinite_counts().items())
        scalars.extend(record.alert_scalars(p).items())
        texts = [(f"{p}alerts/{e.rule}", alert_markdown(e)) for e in record.events]
        self._write(record.step, scalars, hists, texts)
        if record.events:
            self.flush()

    def summary(self, summary: Any) -> None:
        """The run's incidents (:class:`gradwatch.alerts.RunSummary`) as the text ``<prefix>alerts/summary``."""
        text = "\n\n".join(line.strip() for line in summary.lines(limit=50))
        self._write(summary.step or 0, [], [], [(f"{self.prefix}alerts/summary", text)])
        self.flush()

    def _write(self, step: int, scalars, hists, texts) -> None:
        if self._events is not None:
            self._write_event(self._events, step, scalars, hists, texts)
        else:
            self._write_calls(step, scalars, hists, texts)

    def _write_event(self, events: Any, step: int, scalars, hists, texts) -> None:
        values = [Summary.Value(tag=tag, simple_value=v) for tag, v in scalars]
        bins = self.writer.default_bins  # what add_histogram(bins="tensorflow") uses
        for tag, vals in hists:
            values.extend(tb_summary.histogram(tag, vals, bins).value)
        for tag, text in texts:
            values.extend(tb_summary.text(tag, text).value)
        events.add_summary(Summary(value=values), step)

    def _write_calls(self, step: int, scalars, hists, texts) -> None:
        w = self.writer
        for tag, v in scalars:
            w.add_scalar(tag, v, step)
        add_histogram = getattr(w, "add_histogram", None)
        for tag, vals in hists if add_histogram is not None else ():
            add_histogram(tag, vals, step)
        add_text = getattr(w, "add_text", None)
        for tag, text in texts if add_text is not None else ():
            add_text(tag, text, step)

    def flush(self) -> None:
        flush = getattr(self.writer, "flush", None)
        if flush is not None:
            flush()
