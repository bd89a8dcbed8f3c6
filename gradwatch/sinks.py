"""The TensorBoard sink: one logging step, written as one event, off the training thread.

``SummaryWriter.add_scalar`` costs ~80-100 µs per call on 2 cores, most of it the training thread waiting on
the writer's 10-entry queue; a ResNet-56 step holds ~640 values. One ``Summary`` proto can hold them all, so
the sink builds one per step and hands it to the writer's event file at once (one queue entry per step).
Building it (a protobuf per value, a histogram per metric) still costs milliseconds of Python, so for a plain
``SummaryWriter`` it happens on a background thread (:class:`~gradwatch._worker.Worker`): the training
thread only queues the immutable record. Writers that are not a torch ``SummaryWriter`` (any object with
``add_scalar``, or a subclass that overrides it) get one call per value, in the training thread.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard import summary as tb_summary

from . import _fastcrc
from ._compat import event_file_writer
from ._worker import Worker
from .record import Sink, StepRecord

__all__ = ["TensorBoardSink", "ScalarsSink", "open_writer", "alert_markdown"]

log = logging.getLogger("gradwatch")
_WAIT = 60.0  # longest flush()/close() wait for queued steps: a stuck disk must not hang the end of a run


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


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


class _ScalarBytes:
    """Scalars as serialized ``Summary.Value`` entries (``tag = 1``, ``simple_value = 2``), the tag part encoded
    once per tag and kept: per step only the 4 bytes of each float are new. ~10x cheaper than building a
    ``Summary.Value`` object per scalar (thousands per step on a deep model)."""

    def __init__(self) -> None:
        self._prefixes: dict[tuple[str, tuple[str, ...]], list[bytes]] = {}

    def encode(self, head: str, names: tuple[str, ...], values: np.ndarray) -> bytes:
        key = (head, names)
        prefixes = self._prefixes.get(key)
        if prefixes is None:
            if len(self._prefixes) > 256:  # the layers measured changed many times: start over
                self._prefixes.clear()
            prefixes = self._prefixes[key] = [self._prefix((head + n).encode("utf-8")) for n in names]
        raw = np.asarray(values, dtype="<f4").tobytes()
        return b"".join([p + raw[4 * i: 4 * i + 4] for i, p in enumerate(prefixes)])

    @staticmethod
    def _prefix(tag: bytes) -> bytes:
        body = 1 + len(_varint(len(tag))) + len(tag) + 5  # tag field, then the fixed32 simple_value field
        return b"\x0a" + _varint(body) + b"\x0a" + _varint(len(tag)) + tag + b"\x15"


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

    With ``background`` (default), a plain ``SummaryWriter``'s events are built and handed to it on a thread
    of the sink's own; :meth:`flush` and :meth:`close` wait for it (``Monitor.close()`` and ``flush()`` call
    them), so the event file is complete when they return.
    """

    def __init__(self, writer: Any, prefix: str = "", histograms: bool = True, background: bool = True) -> None:
        self.writer = writer
        self.prefix = prefix
        self.histograms = histograms
        # One event per step only for a plain SummaryWriter: a subclass that overrides add_* gets its calls.
        plain = isinstance(writer, SummaryWriter) and all(
            getattr(type(writer), m) is getattr(SummaryWriter, m) for m in ("add_scalar", "add_histogram", "add_text"))
        self._events = event_file_writer(writer) if plain else None
        self._worker = Worker("gradwatch-tensorboard") if (self._events is not None and background) else None
        _fastcrc.install()  # tensorboard's pure-Python checksum was the largest cost of writing an event
        self._scalar_bytes = _ScalarBytes()
        self._bins: np.ndarray | None = None

    def write(self, record: StepRecord) -> None:
        if self._worker is not None:
            self._worker.submit(self._write_record, record)
        else:
            self._write_record(record)

    def _write_record(self, record: StepRecord) -> None:
        p = self.prefix
        scalars: list[tuple[str, float]] = []
        encoded: list[bytes] = []  # the event path: per-layer scalars as ready-made Summary.Value bytes
        hists: list[tuple[str, np.ndarray]] = []
        for metric, names, values in record.series():
            if self._events is not None:
                encoded.append(self._scalar_bytes.encode(f"{p}{metric}/", names, values))
            else:
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
        self._write(record.step, scalars, hists, texts, b"".join(encoded))
        if record.events:
            self._flush_writer()

    def summary(self, summary: Any) -> None:
        """The run's incidents (:class:`gradwatch.alerts.RunSummary`) as the text ``<prefix>alerts/summary``."""
        text = "\n\n".join(line.strip() for line in summary.lines(limit=50))
        if self._worker is not None:
            self._worker.submit(self._write, summary.step or 0, [], [], [(f"{self.prefix}alerts/summary", text)])
        else:
            self._write(summary.step or 0, [], [], [(f"{self.prefix}alerts/summary", text)])

    def _write(self, step: int, scalars, hists, texts, encoded: bytes = b"") -> None:
        if self._events is not None:
            self._write_event(self._events, step, scalars, hists, texts, encoded)
        else:
            self._write_calls(step, scalars, hists, texts)

    def _write_event(self, events: Any, step: int, scalars, hists, texts, encoded: bytes) -> None:
        summary = Summary.FromString(encoded)  # parsing is C; building ~1,000s of Value objects in Python is not
        summary.value.extend(Summary.Value(tag=tag, simple_value=v) for tag, v in scalars)
        if self._bins is None:  # what add_histogram(bins="tensorflow") uses, as an array once, not per call
            self._bins = np.asarray(self.writer.default_bins, dtype=np.float64)
        for tag, vals in hists:
            summary.value.add(tag=tag, histo=tb_summary.make_histogram(vals, self._bins))
        for tag, text in texts:
            summary.value.extend(tb_summary.text(tag, text).value)
        events.add_summary(summary, step)

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
        """Wait for the steps queued to be written, then flush the writer."""
        if self._worker is not None and not self._worker.drain(_WAIT):
            log.error("gradwatch: TensorBoard writing has not caught up after %.0f s; going on", _WAIT)
        self._flush_writer()

    def close(self) -> None:
        """Write what is queued, flush, stop the thread (the writer stays open: it is not the sink's)."""
        if self._worker is not None:
            self._worker.close(_WAIT)
        self._flush_writer()

    def _flush_writer(self) -> None:
        flush = getattr(self.writer, "flush", None)
        if flush is not None:
            flush()
