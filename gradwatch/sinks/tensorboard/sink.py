"""The TensorBoard sink: one logging step, written as one event, off the training thread.

``SummaryWriter.add_scalar`` costs ~80-100 µs per call on 2 cores, most of it the training thread waiting on
the writer's 10-entry queue; a ResNet-56 step holds ~640 values. One ``Summary`` proto can hold them all, so
the sink builds one per step and hands it to the writer's event file at once (one queue entry per step).
Building it (a protobuf per value, a histogram per metric) still costs milliseconds of Python, so for a plain
``SummaryWriter`` it happens on a background thread (:class:`~gradwatch.sinks._worker.Worker`): the training
thread only queues the immutable record. Writers that are not a torch ``SummaryWriter`` (any object with
``add_scalar``, or a subclass that overrides it) get one call per value, in the training thread.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard import summary as tb_summary

from . import _fastcrc, _series
from ._drawer import draw_pictures
from ._card import HealthCard, OpenIncidents, card_figures
from ._histogram import Bins
from ._logdir import LogDir
from ._reading import reading_note, settings_note
from .._worker import Worker
from .layout import build_layout
from .pictures import Timeline, scene
from ...names import GLOBAL_NAME
from ...record import Sink, StepRecord
from ..tags import DEFAULT_NAMESPACE, Tags
from ..._checks import check_bool, check_int, check_number, check_prefix
from ..._once import Once

__all__ = ["TensorBoardSink", "open_writer", "alert_markdown"]

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


def alert_markdown(alert: Any, tags: Tags | None = None) -> str:
    """An alert or incident event as the Markdown of its TensorBoard text entry. With ``tags``, an opened
    incident (or a plain alert) ends with the card to read it on and the TensorBoard settings that card needs
    (smoothing 0, outliers shown: :func:`._reading.reading_note`)."""
    note = f"\n\n{reading_note(tags, alert.rule)}" if tags is not None else ""
    markdown = getattr(alert, "markdown", None)
    if callable(markdown):  # an IncidentEvent
        return markdown().replace("\n", "\n\n") + (note if alert.kind == "opened" else "")
    where = f" — `{alert.name}`" if alert.name else ""
    return (f"**{alert.severity}** {alert.rule}{where}\n\n{alert.message}\n\n"
            f"value {alert.value:.4g}, threshold {alert.threshold:.4g}\n\n*hint:* {alert.hint}{note}")


def _layout_summary(layout: Any) -> Summary:
    """The Custom Scalars layout as the summary TensorBoard's plugin reads (what ``add_custom_scalars``
    writes, from our own ``Layout`` proto)."""
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="custom_scalars"))
    tensor = TensorProto(dtype="DT_STRING", string_val=[layout.SerializeToString()], tensor_shape=TensorShapeProto())
    return Summary(value=[Summary.Value(tag="custom_scalars__config__", tensor=tensor, metadata=meta)])


class _PictureSchedule:
    """When to draw (every ``every`` records, within the time budget) and what: the :class:`Timeline`
    the pictures are drawn from, fed on the sink's thread."""

    def __init__(self, every: int, budget: float | None) -> None:
        self.every, self.budget = every, budget
        self.timeline = Timeline()
        self.incidents = OpenIncidents()
        self._since = 0  # records since the last drawing
        self._start: float | None = None
        self._spent = 0.0
        self._failed = Once()  # a drawing that fails fails again at every drawing: said once per kind

    def add(self, record: StepRecord, tags: Tags) -> list[Summary.Value]:
        self.timeline.add(record)
        changed = self.incidents.add(record) or len(self.timeline.steps) == 1  # the first card at once
        now = time.perf_counter()
        self._start = now if self._start is None else self._start
        self._since += 1
        if self._since < self.every or (self.budget is not None and self._spent > self.budget * (now - self._start)):
            # between drawings (or over the time budget) only the health card, when the open incidents changed:
            # it is the first card of the dashboard and must not lag (~30 ms to draw: benchmarks/picture_cost.py)
            return self._card(record.step, tags) if changed else []
        return self._card(record.step, tags) + self._draw(tags)

    def _fail(self, what: str, err: Exception) -> None:
        """Say a failed drawing once per kind of failure (a missing matplotlib fails every drawing of a
        week-long run: one line, not one per logging step); the same again goes to DEBUG."""
        said = f"drawing {what} failed ({type(err).__name__}: {err})"
        self._failed.log(said, f"gradwatch: {said}; the scalars are written (said once; the same failure again "
                               "is logged at DEBUG)")
        log.debug("gradwatch: %s", said)

    def final(self, tags: Tags) -> tuple[int, list[Summary.Value]]:
        latest = self.timeline.latest
        if latest is None or not self._since:
            return 0, []
        return latest.step, self._card(latest.step, tags) + self._draw(tags)

    def _card(self, step: int, tags: Tags) -> list[Summary.Value]:
        latest = self.timeline.latest
        if latest is None:
            return []
        # not counted in the time budget: drawn only when incidents open, escalate or close (and with the
        # pictures), ~30 ms each; the budget is for the maps, which are drawn all along
        try:
            pictures = draw_pictures(HealthCard(step, self.incidents.rows(), card_figures(latest),
                                                self.incidents.alerting))
        except Exception as err:  # a picture must never cost the scalars of the step
            self._fail("the health card", err)
            return []
        return [Summary.Value(tag=tags.card, image=Summary.Image(
            height=p.height, width=p.width, colorspace=4, encoded_image_string=p.png)) for p in pictures]

    def _draw(self, tags: Tags) -> list[Summary.Value]:
        t0 = time.perf_counter()
        self._since = 0
        try:
            pictures = draw_pictures(scene(self.timeline))
        except Exception as err:  # a picture must never cost the scalars of the step
            self._fail("the pictures", err)
            return []
        finally:
            self._spent += time.perf_counter() - t0
        return [Summary.Value(tag=tags.picture(p.name), image=Summary.Image(
            height=p.height, width=p.width, colorspace=4, encoded_image_string=p.png)) for p in pictures]


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
    once per tag and kept: per step only the 4 bytes of each float are new, written into a copy of the kept
    bytes by one numpy assignment. ~10x cheaper than building a ``Summary.Value`` object per scalar (thousands
    per step on a deep model), and than joining the pieces in Python."""

    def __init__(self) -> None:
        self._templates: dict[tuple[str, tuple[str, ...]], tuple[np.ndarray, np.ndarray]] = {}

    def encode(self, head: str, names: tuple[str, ...], values: np.ndarray) -> bytes:
        key = (head, names)
        cached = self._templates.get(key)
        if cached is None:
            if len(self._templates) > 256:  # the layers measured changed many times: start over
                self._templates.clear()
            cached = self._templates[key] = self._template([self._prefix((head + n).encode("utf-8")) for n in names])
        template, slots = cached
        out = template.copy()
        out[slots] = np.frombuffer(np.asarray(values, dtype="<f4").tobytes(), dtype=np.uint8)
        return out.tobytes()

    @staticmethod
    def _template(prefixes: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """The entries with zeros for the floats, and the byte positions of the floats in it."""
        ends = np.cumsum([len(p) + 4 for p in prefixes])
        slots = (ends[:, None] - 4 + np.arange(4)).reshape(-1)
        return np.frombuffer(b"".join(p + bytes(4) for p in prefixes), dtype=np.uint8).copy(), slots

    @staticmethod
    def _prefix(tag: bytes) -> bytes:
        body = 1 + len(_varint(len(tag))) + len(tag) + 5  # tag field, then the fixed32 simple_value field
        return b"\x0a" + _varint(body) + b"\x0a" + _varint(len(tag)) + tag + b"\x15"


class TensorBoardSink(Sink):
    """Write each :class:`~gradwatch.StepRecord` to a ``SummaryWriter``: gradwatch's dashboard.

    The tags are :class:`gradwatch.sinks.tags.Tags` of ``prefix`` (default ``gradwatch``; ``docs/dashboard.md``):
    the health section ``_gradwatch/`` (sorts before the user's groups), then ``zz_gradwatch.alerts/``,
    ``zz_gradwatch.blocks/``, ``zz_gradwatch.layers/`` and ``zz_gradwatch.pictures/`` (after them). At most
    :data:`~gradwatch.sinks.tags.MAX_SCALAR_TAGS` scalar tags, whatever the depth: per-layer and per-block values
    go into the event file as one tensor per metric and step (:mod:`gradwatch.sinks.tensorboard._series`; read
    back by ``gradwatch report``), and, with ``layer_scalars``, also as one scalar tag each. With
    ``histograms``, each metric also gets a histogram across layers (or blocks) of its finite values and a
    ``nonfinite/<metric>`` count of the values left out. When alerting is on, each incident event is a text
    ``zz_gradwatch.alerts/<rank>_<severity>/<rule>`` (the writer is flushed at once), the end of the run
    ``zz_gradwatch.alerts/summary``. The health section is one image card (:mod:`._card`): the open incidents
    and the health figures.
    ``add_scalars`` is never used: it makes a run per key.

    A plain ``SummaryWriter`` also gets the Custom Scalars layout (:func:`gradwatch.sinks.tensorboard.layout.build_layout`,
    written again when the layers or blocks measured change) and, every ``pictures`` logging steps and at
    close, the pictures (:mod:`gradwatch.sinks.tensorboard.pictures`; ``pictures=0``: none, and no health card),
    drawn in a child process so that matplotlib never holds this process's GIL
    (:mod:`gradwatch.sinks.tensorboard._drawer`). Drawing takes ~0.2 s of CPU per picture, so it also waits until
    the time spent drawing is at most ``picture_budget`` (1%) of the time since the run's first record
    (``None``: no limit); the health card is also redrawn whenever the open incidents change.

    With ``background`` (default), a plain ``SummaryWriter``'s events are built and handed to it on a thread
    of the sink's own; :meth:`flush` and :meth:`close` wait for it (``Monitor.close()`` and ``flush()`` call
    them), so the event file is complete when they return. A log directory deleted during the run is re-created,
    with a new event file for the events from then on and one warning on the ``gradwatch`` logger
    (:class:`~gradwatch.sinks.tensorboard._logdir.LogDir`); nothing is raised into training or out of ``close``.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or any object with ``add_scalar``: then one call
            per value, no series tensors, layout or pictures). Flushed by :meth:`flush`, closed by :meth:`close`.
        prefix: the tags' namespace (``""``: groups ``_health``, ``zz_layers``, ...).
        histograms: a histogram across layers (or blocks) per metric and step, with ``nonfinite/<metric>``.
        pictures: draw the pictures every ``pictures`` records and at close; 0: none.
        picture_budget: the largest share of the run's time spent drawing (default 1%); None: no limit.
        background: build and write the events on a thread of the sink's own (a plain ``SummaryWriter``).
        layer_scalars: also one scalar tag per layer (block) and metric (4 per layer, 6 per block: unbounded).
    """

    def __init__(self, writer: Any, *, prefix: str = DEFAULT_NAMESPACE, histograms: bool = True,
                 pictures: int = 20, picture_budget: float | None = 0.01, background: bool = True,
                 layer_scalars: bool = False) -> None:
        if not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"writer must be a SummaryWriter-like object (add_scalar), got {type(writer).__name__}")
        check_prefix(prefix)
        check_bool(histograms, "histograms")
        check_int(pictures, "pictures", minimum=0)
        check_number(picture_budget, "picture_budget", allow_none=True)
        check_bool(background, "background")
        check_bool(layer_scalars, "layer_scalars")
        self.writer = writer
        self.layer_scalars = layer_scalars
        self.tags = Tags(prefix)
        self.histograms = histograms
        # One event per step only for a plain SummaryWriter: a subclass that overrides add_* gets its calls.
        plain = isinstance(writer, SummaryWriter) and all(
            getattr(type(writer), m) is getattr(SummaryWriter, m) for m in ("add_scalar", "add_histogram", "add_text"))
        self._dir = LogDir(writer, plain)  # re-created, with a new event file, if it is deleted mid-run
        self._worker = Worker("gradwatch-tensorboard") if (self._events is not None and background) else None
        _fastcrc.install()  # tensorboard's pure-Python checksum was the largest cost of writing an event
        self._scalar_bytes = _ScalarBytes()
        self._bins: Bins | None = None
        self._layout_key: tuple[Any, ...] | None = None
        self._pictures = _PictureSchedule(pictures, picture_budget) if self._events is not None and pictures \
            else None

    @property
    def _events(self) -> Any:
        """The writer's event-file writer (one ``add_summary`` per step), or None for a writer of calls."""
        return self._dir.events

    @property
    def prefix(self) -> str:
        """The tag namespace (``prefix`` without a trailing ``/``)."""
        return self.tags.namespace

    def write(self, record: StepRecord) -> None:
        """Write ``record``'s events (handed to the sink's thread with ``background``)."""
        if self._worker is not None:
            self._worker.submit(self._write_record, record)
        else:
            self._write_record(record)

    def _write_record(self, record: StepRecord) -> None:
        if not self._dir.ready(record.step):
            return
        t = self.tags
        scalars = list(t.health_scalars(record).items())
        if not self.layer_scalars:
            scalars.extend(t.global_scalars(record).items())
        encoded: list[bytes] = []  # the event path: per-layer scalars as ready-made Summary.Value bytes
        series: list[Summary.Value] = []  # the event path: one tensor per metric (and the names)
        hists: list[tuple[str, np.ndarray]] = []
        if self._events is not None:
            series.append(_series.strings(t.series_names(False), record.layers + (GLOBAL_NAME,)))
            if record.kinds:
                series.append(_series.strings(t.kinds, record.kinds))
            if record.blocks:
                series.append(_series.strings(t.series_names(True), record.blocks))
        for metric, names, values in record.series():
            block = metric not in record.layer_metrics
            if self._events is not None:
                series.append(_series.values(t.series(metric, block), values))
            if self.layer_scalars and self._events is not None:
                encoded.append(self._scalar_bytes.encode(t.series_head(metric, block), names, values))
            elif self.layer_scalars:
                scalars.extend(zip((t.series_head(metric, block) + n for n in names), values.tolist()))
            if self.histograms:
                vals = values if block else values[:-1]  # _global is not a layer
                finite = vals[np.isfinite(vals)]
                if finite.size:  # add_histogram raises on empty input
                    hists.append((t.histogram(metric, block), finite))
        if self.histograms:  # what the histograms leave out
            scalars.extend(t.nonfinite_scalars(record).items())
        scalars.extend(t.alert_scalars(record).items())
        texts = [(t.alert_text(e.rule, e.severity), alert_markdown(e, t)) for e in record.events]
        extra: list[Summary.Value] = series
        if self._events is not None:
            extra.extend(self._layout(record))
            if self._pictures is not None:
                extra.extend(self._pictures.add(record, t))
        self._write(record.step, scalars, hists, texts, b"".join(encoded), extra)
        if record.events:
            self._flush_writer()

    def _layout(self, record: StepRecord) -> list[Summary.Value]:
        key = (record.layers, record.layer_metrics, record.blocks, record.alerts is not None, self._dir.generation)
        if key == self._layout_key:
            return []
        self._layout_key = key
        layout = build_layout(self.tags, record.layers, record.layer_metrics, record.blocks, record.alerts is not None,
                              per_layer=self.layer_scalars)
        return list(_layout_summary(layout).value)

    def summary(self, summary: Any) -> None:
        """The run's incidents (:class:`gradwatch.alerts.RunSummary`) as the text ``zz_gradwatch.alerts/summary``."""
        text = "\n\n".join([line.strip() for line in summary.lines(limit=50)] + [settings_note(self.tags)])
        if self._worker is not None:
            self._worker.submit(self._write, summary.step or 0, [], [], [(self.tags.summary, text)])
        else:
            self._write(summary.step or 0, [], [], [(self.tags.summary, text)])

    def _write(self, step: int, scalars, hists, texts, encoded: bytes = b"", extra=()) -> None:
        if not self._dir.ready(step):
            return
        if self._events is not None:
            self._dir.call(lambda: self._write_event(self._events, step, scalars, hists, texts, encoded, extra), step)
        else:
            self._dir.call(lambda: self._write_calls(step, scalars, hists, texts), step)

    def _write_event(self, events: Any, step: int, scalars, hists, texts, encoded: bytes, extra=()) -> None:
        summary = Summary.FromString(encoded)  # parsing is C; building ~1,000s of Value objects in Python is not
        summary.value.extend(extra)
        summary.value.extend(Summary.Value(tag=tag, simple_value=v) for tag, v in scalars)
        if self._bins is None:  # what add_histogram(bins="tensorflow") uses, checked once, not per call
            self._bins = Bins(self.writer.default_bins)
        for (tag, _), histo in zip(hists, self._bins.protos([vals for _, vals in hists])):
            if histo is not None:  # every value beyond the bins (norms over ~1e20): the scalars say it
                summary.value.add(tag=tag, histo=histo)
        for tag, text in texts:
            summary.value.extend(tb_summary.text(tag, text).value)
        events.add_summary(summary, step)

    def _write_calls(self, step: int, scalars, hists, texts) -> None:
        w = self.writer
        for tag, v in scalars:
            w.add_scalar(tag, v, step)
        add_histogram = getattr(w, "add_histogram", None)
        if add_histogram is not None:
            for tag, vals in hists:
                try:
                    add_histogram(tag, vals, step)
                except ValueError as err:  # e.g. every value beyond the bins (norms over ~1e20): the scalars say it
                    log.debug("gradwatch: histogram %s at step %d not written: %s", tag, step, err)
        add_text = getattr(w, "add_text", None)
        if add_text is not None:
            for tag, text in texts:
                add_text(tag, text, step)

    def flush(self) -> None:
        """Wait for the steps queued to be written, then flush the writer."""
        if self._worker is not None and not self._worker.drain(_WAIT):
            log.error("gradwatch: TensorBoard writing has not caught up after %.0f s; going on", _WAIT)
        self._flush_writer()

    def close(self) -> None:
        """Draw the final pictures, write what is queued, flush, stop the thread (the writer stays open: it is
        not the sink's)."""
        if self._pictures is not None and self._worker is not None:
            self._worker.submit(self._final_pictures)
        elif self._pictures is not None:
            self._final_pictures()
        if self._worker is not None:
            self._worker.close(_WAIT)
        self._flush_writer()

    def _final_pictures(self) -> None:
        if self._pictures is None:
            return
        step, values = self._pictures.final(self.tags)
        if values:
            self._write(step, [], [], [], b"", values)

    def _flush_writer(self) -> None:
        flush = getattr(self.writer, "flush", None)
        if flush is not None:
            self._dir.call(flush)
