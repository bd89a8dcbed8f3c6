"""Where a monitor's records go once measured: :class:`Outputs` runs the alert rules on each
:class:`~gradwatch.StepRecord`, adds the layer kinds and health figures, keeps it in the history and hands it
to every sink. The :class:`~gradwatch.Monitor` decides *when* to measure; this is the rest of the data path
(``docs/architecture.md``), with the writer, sinks and alert engine it opens and closes."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any, cast

from torch import nn

from .alerts import Alert, AlertEngine, Incident, IncidentTracker, Rule
from .alerts.engine import default_path
from .alerts.siblings import Siblings
from .config import Config
from .health import health
from .measure.layers import layer_kinds
from .measure.order import ForwardOrder
from .record import Sink, StepRecord
from .sinks.history import History
from .sinks.logging import LoggingSink
from .sinks.recorder import FlightRecorder
from .sinks.tensorboard import TensorBoardSink, open_writer

log = logging.getLogger("gradwatch")

__all__ = ["Outputs"]


class Outputs:
    """The history (every rank), the TensorBoard writer and sinks (rank 0) and the alert engine of one monitor.

    ``contain(where, err)`` is the monitor's error policy: a failing sink or rule is reported there (and
    re-raised under ``strict``). Opening cleans up after itself: when any part fails, what was opened is closed.
    """

    def __init__(self, cfg: Config, model: nn.Module, rules: list[Rule], log_dir: str | os.PathLike[str] | None,
                 writer: Any, rank_zero: bool, contain: Callable[[str | None, BaseException], None]) -> None:
        self.history = History(cfg.history)
        self.latest: StepRecord | None = None
        self.engine: AlertEngine | None = None
        self.recorder: FlightRecorder | None = None  # rank 0, alerting on, a folder for alerts.jsonl
        self._contain = contain
        self._kinds = layer_kinds(model)
        self._kinds_of: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._forward: dict[str, int] = {}
        self._siblings = Siblings()  # layers that read one input, found with the forward order
        self._order: ForwardOrder | None = None
        self.owned: list[Sink] = []  # the sinks opened here (closed at close(); the user's are only flushed)
        self._owns_writer = log_dir is not None and rank_zero
        self.writer: Any = None  # only rank 0 writes
        if rank_zero:
            self.writer = open_writer(log_dir) if log_dir is not None else writer
        try:
            self._open(cfg, model, rules, log_dir, writer, rank_zero)
        except BaseException:  # leave nothing behind: no forward hook, no writer thread
            self._close_own()
            raise

    def _open(self, cfg: Config, model: nn.Module, rules: list[Rule], log_dir: Any, writer: Any,
              rank_zero: bool) -> None:
        owned = self.owned
        if self.writer is not None:
            owned.append(TensorBoardSink(self.writer, prefix=cfg.prefix, histograms=cfg.histograms,
                                         pictures=cfg.pictures, layer_scalars=cfg.layer_scalars))
        user: list[Sink] = []
        if rules:
            given = cfg.alerts_path  # a str (Config applies os.fspath), False (none) or None (the default place)
            if given is None:
                path = default_path(log_dir, self.writer or writer)
            else:
                path = os.fspath(given) if given else None
            tracker = IncidentTracker(remind_after=cfg.remind_after, backoff=cfg.remind_backoff,
                                      resolve_after=cfg.resolve_after, remind_steps=cfg.remind_steps)
            if path and rank_zero and cfg.flight_recorder:  # next to alerts.jsonl, by the rank that writes it
                self.recorder = FlightRecorder(cfg.flight_recorder, os.path.dirname(path))
                owned.append(self.recorder)
            self.engine = AlertEngine(rules, kinds=self._kinds, on_critical=cfg.on_critical, tracker=tracker,
                                      path=path, rank_zero=rank_zero, on_error=self._contain,
                                      recording=None if self.recorder is None else self.recorder.name)
            self._order = ForwardOrder(model)  # until the first measured step: nonfinite names layers in this order
            owned.append(LoggingSink())
            user.extend(cast(tuple[Sink, ...], cfg.alert_sinks))  # Config wraps callables in CallableSink
            for sink in user:  # delivery failures go to alerts.jsonl
                attach = getattr(sink, "attach", None)
                if callable(attach):
                    attach(self.engine.report_failure)
        elif cfg.alert_sinks and rank_zero:
            log.warning("gradwatch: alert_sinks given but alerting is off (rules=%r): they receive no alert",
                        cfg.rules)
        user.extend(cfg.sinks)
        self.sinks = [*owned, *user] if rank_zero else []

    # ------------------------------------------------------------------ one record
    def publish(self, record: StepRecord) -> None:
        """Run the rules on ``record``, put their alerts, the kinds and the health figures in it, keep it,
        and hand it to every sink."""
        engine = self.engine
        if record.kinds:  # kinds of layers measured on other pipeline stages
            self._kinds.update(zip(record.layers, record.kinds))
            if engine is not None:
                engine.kinds.update(zip(record.layers, record.kinds))
        seen = None  # the rules' view of this record, which the health figures reuse
        if engine is not None:
            if self._order is not None and not self._order.finished:  # known after the first measured step
                self._forward = self._order.finish()
                self._siblings = Siblings(self._order.siblings, self._forward)
            if record.kinds and any(n not in self._forward for n in record.layers):
                self._forward = _across_stages(record.layers, self._forward)
            events = engine.evaluate(record, self._forward, self._siblings)
            record = dataclasses.replace(record, events=events, open_incidents=engine.open_counts(),
                                         alerts=tuple(e.alert for e in events if e.kind != "resolved"))
            seen = engine.measurements if engine.measurements is not None \
                and engine.measurements.step == record.step else None
        record = dataclasses.replace(record, kinds=self._record_kinds(record.layers),
                                     health=health(record, self._kinds, self._forward, seen, self._siblings))
        self.latest = record
        self.history.write(record)  # every rank keeps its history
        for sink in self.sinks:
            self._call(sink, "write", record)

    @property
    def kinds(self) -> dict[str, str]:
        """Each measured layer's kind (``norm``, ``conv``, ...), by name."""
        return self._kinds

    def _record_kinds(self, layers: tuple[str, ...]) -> tuple[str, ...]:
        cached = self._kinds_of
        if cached is None or cached[0] != layers:  # the layers measured rarely change: one tuple per set
            cached = self._kinds_of = (layers, tuple(self._kinds.get(n, "other") for n in layers))
        return cached[1]

    def raise_alarm(self) -> None:
        """A :class:`~gradwatch.GradientAlarm` held by ``on_critical="raise"``: deliberately not contained."""
        if self.engine is not None:
            self.engine.raise_pending()

    # ------------------------------------------------------------------ what the monitor reports
    @property
    def alerts(self) -> list[Alert]:
        return [] if self.engine is None else list(self.engine.alerts)

    @property
    def incidents(self) -> list[Incident]:
        return [] if self.engine is None else self.engine.tracker.incidents

    # ------------------------------------------------------------------ end
    def flush(self) -> None:
        for sink in self.sinks:
            self._call(sink, "flush")

    def close(self) -> BaseException | None:
        """The run's summary to every sink, then close the sinks (and writer) opened here and flush the
        user's; returns the first error a sink raised (the monitor raises it under ``strict``)."""
        if self._order is not None:
            self._order.close()
        first: BaseException | None = None
        if self.engine is not None and self.latest is not None:  # the run's incidents, once, to every sink
            summary = self.engine.summary()
            for sink in self.sinks:
                try:
                    self._call(sink, "summary", summary)
                except Exception as err:
                    first = first or err
        for sink in self.sinks:
            try:
                self._call(sink, "close" if any(sink is s for s in self.owned) else "flush")
            except Exception as err:
                first = first or err
        if self.engine is not None:
            self.engine.close()
        if self._owns_writer:
            self.writer.close()
        return first

    def _close_own(self) -> None:
        """After a failed open: stop what was started (the TensorBoard sink's thread, the forward hooks, the
        alert record, the writer), ignoring their errors: the one that failed the open is what propagates."""
        for part in [*self.owned, self.engine, self._order]:
            try:
                if part is not None:
                    part.close()
            except Exception:
                pass
        if self._owns_writer and self.writer is not None:
            self.writer.close()

    def _call(self, sink: Any, method: str, *args: Any) -> None:
        """``sink.method(*args)`` if it has one; a failing sink is contained like a failing hook."""
        fn = getattr(sink, method, None)
        if fn is None:
            return
        try:
            fn(*args)
        except Exception as err:
            self._contain(f"sink {sink!r}", err)


def _across_stages(layers: tuple[str, ...], forward: dict[str, int]) -> dict[str, int]:
    """Forward positions for a record joined from pipeline stages (:mod:`gradwatch.measure.stages`): the record
    is in stage order, this rank saw only its own stage run, so its layers take their forward order within
    their stretch of the record and the other stages' keep their record order."""
    order: list[str] = []
    run: list[str] = []
    for name in (*layers, None):
        if name is not None and name in forward:
            run.append(name)
            continue
        order += sorted(run, key=forward.__getitem__)
        run = []
        if name is not None:
            order.append(name)
    return {name: i for i, name in enumerate(order)}
