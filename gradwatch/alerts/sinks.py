"""Where alerts go: Python logging, your own callable, any object with ``send(alert)``. Open this file to add
an alert sink (the webhook sink is in :mod:`gradwatch.alerts.webhook`).

An alert sink is a :class:`~gradwatch.Sink` like any other: it receives every :class:`~gradwatch.StepRecord`
and sends the alerts in it (``record.alerts``: those that passed the cooldown). :class:`AlertSink` does the
unpacking and the severity filter; a subclass implements ``send(alert)``, which must return quickly (anything
slow belongs on a thread, like :class:`~gradwatch.WebhookSink`). Optionally ``attach(report_failure)``
receives ``report_failure(sink_description, alert, error)`` to record a delivery that failed in
``alerts.jsonl``. Errors a sink raises are contained by the monitor; they never reach the training loop.
Sinks run on rank 0 only.

The JSONL record (``alerts.jsonl``) is not a sink: the alert engine writes it before any sink runs, so a
failing sink can never lose an alert.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from ..record import Sink, StepRecord
from .alert import Alert, severity_rank

__all__ = ["AlertSink", "LoggingSink", "CallableSink", "as_alert_sink"]


class AlertSink(Sink):
    """Base of the alert sinks: :meth:`write` sends each alert of the record at least ``min_severity``."""

    def __init__(self, min_severity: str = "info") -> None:
        severity_rank(min_severity)  # ValueError for an unknown severity
        self.min_severity = min_severity

    def write(self, record: StepRecord) -> None:
        for alert in record.alerts or ():
            if self._wants(alert):
                self.send(alert)

    def send(self, alert: Alert) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _wants(self, alert: Alert) -> bool:
        return severity_rank(alert.severity) >= severity_rank(self.min_severity)


class LoggingSink(AlertSink):
    """Log each alert on a Python logger (default ``gradwatch``): info → INFO, warning → WARNING,
    critical → ERROR. On by default."""

    _LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.ERROR}

    def __init__(self, logger: str | logging.Logger = "gradwatch", min_severity: str = "info") -> None:
        super().__init__(min_severity)
        self.logger = logger if isinstance(logger, logging.Logger) else logging.getLogger(logger)

    def send(self, alert: Alert) -> None:
        self.logger.log(self._LEVELS[alert.severity], "gradwatch %s", alert.format())

    def __repr__(self) -> str:
        return f"LoggingSink({self.logger.name!r})"


class CallableSink(AlertSink):
    """Call ``fn(alert)`` for each alert (in the training thread: keep it quick). A plain callable passed in
    ``alert_sinks`` is wrapped in one."""

    def __init__(self, fn: Callable[[Alert], Any], min_severity: str = "info") -> None:
        if not callable(fn):
            raise TypeError(f"CallableSink needs a callable, got {type(fn).__name__}")
        super().__init__(min_severity)
        self.fn = fn

    def send(self, alert: Alert) -> None:
        self.fn(alert)

    def __repr__(self) -> str:
        return f"CallableSink({getattr(self.fn, '__qualname__', self.fn)!r})"


class _SendOnly(AlertSink):
    """An object of the earlier alert-sink protocol as an alert sink: ``send(alert)``, and optionally
    ``end_step(step, alerts)`` after every evaluated step, ``attach(report_failure)``, ``flush(timeout)`` and
    ``close(timeout)`` (given :attr:`wait` seconds)."""

    wait = 5.0

    def __init__(self, target: Any) -> None:
        super().__init__("info")
        self.target = target

    def write(self, record: StepRecord) -> None:
        super().write(record)
        end_step = getattr(self.target, "end_step", None)
        if callable(end_step):
            end_step(record.step, list(record.alerts or ()))

    def send(self, alert: Alert) -> None:
        self.target.send(alert)

    def attach(self, report_failure: Callable[[str, Alert | None, str], None]) -> None:
        attach = getattr(self.target, "attach", None)
        if callable(attach):
            attach(report_failure)

    def flush(self) -> None:
        self._finish("flush")

    def close(self) -> None:
        self._finish("close")

    def _finish(self, method: str) -> None:
        fn = getattr(self.target, method, None)
        if not callable(fn):
            return
        try:  # the earlier protocol passed a timeout; a plain flush() takes none
            takes_timeout = bool(inspect.signature(fn).parameters)
        except (TypeError, ValueError):  # a builtin without a signature: call it plainly
            takes_timeout = False
        if takes_timeout:
            fn(self.wait)
        else:
            fn()

    def __repr__(self) -> str:
        return repr(self.target)


def as_alert_sink(obj: Any) -> Sink:
    """``obj`` if it is a sink (has ``write``), wrapped if it only has ``send(alert)`` or is a callable."""
    if hasattr(obj, "write"):
        return obj
    if hasattr(obj, "send"):
        return _SendOnly(obj)
    if callable(obj):
        return CallableSink(obj)
    raise TypeError(f"an alert sink needs a send(alert) method or must be callable, got {type(obj).__name__}")
