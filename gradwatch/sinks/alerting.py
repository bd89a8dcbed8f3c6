"""Where alerts go: Python logging, your own callable, any object with ``send(alert)``. Open this file to add
an alert sink (the logging sink is in :mod:`gradwatch.sinks.logging`, the webhook sink in
:mod:`gradwatch.sinks.webhook`).

An alert sink is a :class:`~gradwatch.Sink` like any other: it receives every :class:`~gradwatch.StepRecord`
and sends the incident events in it (``record.events``: opened, escalated, reminder, resolved — each an
:class:`~gradwatch.alerts.IncidentEvent`, which reads like an :class:`~gradwatch.Alert`), and at the end of the run
the :class:`~gradwatch.alerts.RunSummary` (``summary(summary)``). :class:`AlertSink` does the unpacking and
the severity filter; a subclass implements ``send(event)`` (and ``send_summary(summary)``), which must return
quickly (anything slow belongs on a thread, like :class:`~gradwatch.WebhookSink`). Optionally
``attach(report_failure)`` receives ``report_failure(sink_description, event, error)`` to record a delivery
that failed in ``alerts.jsonl``. Errors a sink raises are contained by the monitor; they never reach the
training loop. Sinks run on rank 0 only.

The JSONL record (``alerts.jsonl``) is not a sink: the alert engine writes it before any sink runs, so a
failing sink can never lose an alert.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..record import Sink, StepRecord
from .._checks import check_choice
from ..alerts.alert import SEVERITIES, Severity, severity_rank
from ..alerts.incident import IncidentEvent, RunSummary

__all__ = ["AlertSink", "CallableSink", "as_alert_sink"]


class AlertSink(Sink):
    """Base of the alert sinks: :meth:`write` sends each incident event of the record at least
    ``min_severity`` (a ``resolved`` event has the incident's peak severity); :meth:`summary` sends the run's
    summary when it holds an incident at least that severe, or always with ``always_summarize``.

    Args:
        min_severity: the least severe incident sent: ``"info"``, ``"warning"`` or ``"critical"``.
    """

    always_summarize = False

    def __init__(self, *, min_severity: Severity = "info") -> None:
        check_choice(min_severity, "min_severity", SEVERITIES)
        self.min_severity = min_severity

    def write(self, record: StepRecord) -> None:
        """Send (:meth:`send`) each incident event of ``record`` at least ``min_severity``."""
        for event in record.events:
            if self._wants(event):
                self.send(event)

    def summary(self, summary: RunSummary) -> None:
        """Send (:meth:`send_summary`) the run's summary, cut to ``min_severity``, when it holds an incident (always
        with ``always_summarize``)."""
        mine = summary.at_least(self.min_severity)
        if mine.incidents or self.always_summarize:
            self.send_summary(mine)

    def send(self, event: IncidentEvent) -> None:  # pragma: no cover - interface
        """Send one incident event; subclasses implement it (quick: it runs in the training thread)."""
        raise NotImplementedError

    def send_summary(self, summary: RunSummary) -> None:
        """Send the end-of-run summary (nothing by default)."""

    def _wants(self, event: Any) -> bool:
        return severity_rank(event.severity) >= severity_rank(self.min_severity)


class CallableSink(AlertSink):
    """Call ``fn(event)`` for each incident event (in the training thread: keep it quick); the event reads
    like an :class:`~gradwatch.Alert` (``event.rule``, ``.severity``, ``.message``, ...) and says what
    happened (``event.kind``). A plain callable passed in ``alert_sinks`` is wrapped in one.

    Args:
        fn: called as ``fn(event)`` for each incident event.
        min_severity: the least severe incident sent: ``"info"``, ``"warning"`` or ``"critical"``.
    """

    def __init__(self, fn: Callable[[IncidentEvent], Any], *, min_severity: Severity = "info") -> None:
        if not callable(fn):
            raise TypeError(f"CallableSink needs a callable, got {type(fn).__name__}")
        super().__init__(min_severity=min_severity)
        self.fn = fn

    def send(self, event: IncidentEvent) -> None:
        """Call ``fn(event)``."""
        self.fn(event)

    def __repr__(self) -> str:
        return f"CallableSink({getattr(self.fn, '__qualname__', self.fn)!r})"


class _SendOnly(AlertSink):
    """An object with ``send(event)`` as an alert sink (the event reads like an alert); its
    ``send_summary(summary)``, ``attach(report_failure)``, ``flush()`` and ``close()`` are called when it has
    them."""

    def __init__(self, target: Any) -> None:
        super().__init__()
        self.target = target

    def send(self, event: IncidentEvent) -> None:
        self.target.send(event)

    def send_summary(self, summary: RunSummary) -> None:
        self._call("send_summary", summary)

    def attach(self, report_failure: Callable[[str, Any, str], None]) -> None:
        self._call("attach", report_failure)

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        self._call("close")

    def _call(self, method: str, *args: Any) -> None:
        fn = getattr(self.target, method, None)
        if callable(fn):
            fn(*args)

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
