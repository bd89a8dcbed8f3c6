"""The alert engine: runs the rules on each step's record, keeps incidents, writes the record that is never
lost, and applies the ``on_critical`` policy.

After each logging step the :class:`~gradwatch.Monitor` hands its :class:`~gradwatch.StepRecord` to
:meth:`AlertEngine.evaluate`. The rules (:mod:`gradwatch.alerts.rules`) turn it into findings (:class:`Alert`);
the :class:`~gradwatch.alerts.tracker.IncidentTracker` turns findings into incident events (opened,
escalated, reminder, resolved); the engine writes every event as one JSON line to ``alerts.jsonl`` (those not
told too, with why) and returns the events to tell, which the monitor puts into the record for the sinks
(logging, TensorBoard, webhooks, yours). At the end, :meth:`AlertEngine.summary` lists the run's incidents.
The ``on_critical`` policy:

- ``"warn"`` (default): alert and carry on;
- ``"stop"``: also set :attr:`Monitor.should_stop <gradwatch.Monitor.should_stop>` at any step with a
  critical finding (the Lightning callback turns it into ``trainer.should_stop``, agreed across ranks);
- ``"raise"``: also raise :class:`GradientAlarm` out of ``mon.step()`` (or ``optimizer.step()`` when the
  monitor drives itself from the optimizer) when a critical incident opens or a warning escalates to
  critical — the one exception gradwatch raises into a training loop.

Under torch.distributed every rank runs the rules and only rank 0 writes the record (and runs the sinks). The
per-layer numbers are the same on every rank (gradients after DDP's all-reduce; FSDP/DTensor norms
all-reduced). Block-flow metrics come from each rank's own activations: they are summed across ranks into
the global batch's values (:mod:`gradwatch.measure.parallel`) when the monitor syncs ranks — ``Monitor(sync_ranks=...)``, on by default
for DDP-wrapped and DTensor models and always in the Lightning callback — so then every rank reaches the same
verdict (``should_stop`` and ``GradientAlarm`` agree). With ``sync_ranks=False`` block-flow rules
(``skip_collapse``, the block form of ``depth_trend``) may fire on one rank and not another.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._once import recreate_folder
from ..record import StepRecord
from .alert import POLICIES, Alert, GradientAlarm
from .incident import IncidentEvent, RunSummary
from .tracker import IncidentTracker
from .measurements import Measurements
from .siblings import Siblings

log = logging.getLogger("gradwatch")

__all__ = ["AlertEngine", "default_path"]


class _JsonLines:
    """Append-only JSONL file: one line per alert or delivery failure, written and flushed at once.

    A file deleted during the run, or its directory (an ``rm -rf`` of the run), is noticed at the next line
    (one ``fstat``: no links left; or the directory that was there is gone) and opened again, directory and
    all, with one warning: the lines from then on are kept."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()  # webhook threads report delivery failures here too
        self._parent = os.path.dirname(path) or "."
        self._file: Any = None
        # when the directory was last known to be there (time.monotonic()); None: not yet, it is made at first
        self._there: float | None = time.monotonic() if os.path.isdir(self._parent) else None
        self._broken = False

    def write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, ensure_ascii=False, allow_nan=False)
        with self._lock:
            if self._broken:
                return
            try:
                deleted = self._file is not None and os.fstat(self._file.fileno()).st_nlink == 0
                if deleted:
                    self._file.close()
                    self._file = None
                if self._file is None:
                    self._open(deleted)
                self._file.write(line + "\n")
                self._file.flush()
            except OSError as err:
                self._broken = True
                log.error("gradwatch: cannot write the alert record %s (%s); alerts stay in mon.alerts and "
                          "the other sinks", self.path, err)

    def _open(self, deleted: bool) -> None:
        if self._there is None:  # a directory of its own, new
            os.makedirs(self._parent, exist_ok=True)
            recreated = None
        else:  # it was there: gone now means deleted during the run
            recreated = recreate_folder(self._parent, self._there)
        self._file = open(self.path, "a", encoding="utf-8")
        self._there = time.monotonic()
        if recreated is None and deleted:  # only the file went
            log.warning("gradwatch: the alert record %s was deleted during the run; writing it again from this "
                        "alert on", self.path)
        elif recreated is not None:  # its directory went: the first part of gradwatch to notice it warns
            log.log(logging.WARNING if recreated else logging.INFO, "gradwatch: the directory of the alert record "
                    "%s was deleted during the run; re-created it, and the record goes on from this alert on", self.path)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def default_path(log_dir: str | os.PathLike | None, writer: Any) -> str | None:
    """``<log_dir>/alerts.jsonl``, else the writer's log directory, else None."""
    if log_dir is not None:
        return os.path.join(os.fspath(log_dir), "alerts.jsonl")
    get = getattr(writer, "get_logdir", None)
    if callable(get):
        try:
            d = get()
        except Exception:
            d = None
        if d:
            return os.path.join(str(d), "alerts.jsonl")
    return None


class AlertEngine:
    """Runs the rules after each logging step and decides what is told. Owned by :class:`~gradwatch.Monitor`.

    Args:
        rules: the :class:`~gradwatch.alerts.Rule` s to run (see :func:`gradwatch.alerts.build_rules`).
        kinds: layer kinds (:func:`gradwatch.measure.layers.layer_kinds`).
        on_critical: ``"warn"``, ``"stop"`` or ``"raise"``.
        tracker: the :class:`~gradwatch.alerts.tracker.IncidentTracker` (back-off, hysteresis); None: defaults.
        path: the JSONL record, or None for none.
        rank_zero: whether this process writes the record.
        on_error: receives ``(where, exception)`` for an error inside a rule (the other rules still run).
        keep_alerts: alerts kept in :attr:`alerts` (and checkpoints), the latest.
        recording: names the flight recorder's file for an incident told ``opened`` (the event in, a path or
            None out), before the event is written or told: the file is written after (the recorder is a sink,
            :mod:`gradwatch.sinks.recorder`), so the record, the log line and the webhook all name it. None: no
            recorder.
    """

    def __init__(
        self,
        rules: Sequence[Any],
        *,
        kinds: Mapping[str, str] | None = None,
        on_critical: str = "warn",
        tracker: IncidentTracker | None = None,
        path: str | None = None,
        rank_zero: bool = True,
        on_error: Callable[[str, BaseException], None] | None = None,
        keep_alerts: int = 1000,
        recording: Callable[[IncidentEvent], str | None] | None = None,
    ) -> None:
        if on_critical not in POLICIES:
            raise ValueError(f"on_critical must be one of {POLICIES}, got {on_critical!r}")
        self.rules = list(rules)
        self.on_critical = on_critical
        self.tracker = tracker if tracker is not None else IncidentTracker()
        self.kinds = dict(kinds or {})
        self.path = path
        self._jsonl = _JsonLines(path) if (path and rank_zero) else None
        self._on_error = on_error
        self._keep = keep_alerts
        self._recording = recording
        #: The findings told (opened, escalated, reminded), oldest first (the same list on every rank).
        self.alerts: list[Alert] = []
        #: Findings not told: repeats of open incidents between reminders, and inhibited ones.
        self.suppressed = 0
        self.should_stop = False
        self._pending_alarm: list[Alert] | None = None
        self._closed = False
        #: The :class:`Measurements` of the record evaluated last (what the rules saw).
        self.measurements: Measurements | None = None

    def evaluate(self, record: StepRecord, forward: Mapping[str, int] | None = None,
                 siblings: Siblings | None = None) -> tuple[IncidentEvent, ...]:
        """Run the rules on ``record`` (``forward``: module name -> position in the forward pass; ``siblings``:
        the layers that read one input, :class:`~gradwatch.alerts.siblings.Siblings`), update the incidents,
        record every event and return those to tell."""
        self.measurements = None
        if self._closed:
            return ()
        m = self.measurements = Measurements.from_record(record, self.kinds, forward or {}, siblings)
        found: list[Alert] = []
        for rule in self.rules:
            try:
                found.extend(rule.check(m))
            except Exception as err:  # a broken rule must not silence the others
                self._error(f"rule {getattr(rule, 'name', rule)!r}", err)
        told = self.tracker.update(found, record.step)
        if self._recording is not None:
            told = dataclasses.replace(told, events=tuple(self._named(e) for e in told.events))
        alerts = [e.alert for e in told.events if e.kind != "resolved"]
        self.suppressed += len(found) - len(alerts)
        self.alerts.extend(alerts)
        del self.alerts[: max(0, len(self.alerts) - self._keep)]
        if self._jsonl is not None:
            for event in told.events:
                self._jsonl.write(event.to_dict())
            for event, why in told.quiet:
                self._jsonl.write({**event.to_dict(), "told": False, "why": why})
        if any(a.severity == "critical" for a in found) and self.on_critical in ("stop", "raise"):
            self.should_stop = True
        critical = [e.alert for e in told.events if e.kind in ("opened", "escalated") and e.severity == "critical"]
        if critical and self.on_critical == "raise":
            self._pending_alarm = critical
        return told.events

    def _named(self, event: IncidentEvent) -> IncidentEvent:
        """An incident told ``opened`` for the first time, with its flight recorder's file named."""
        if event.kind != "opened" or event.incident.recording is not None or self._recording is None:
            return event
        try:
            path = self._recording(event)
        except Exception as err:  # a failing recorder must not lose the alert
            self._error("flight recorder", err)
            return event
        inc = self.tracker.set_recording(event.incident.key, path) if path else None
        return event if inc is None else dataclasses.replace(event, incident=inc)

    def open_counts(self) -> tuple[int, int, int]:
        """Open incidents per severity (info, warning, critical)."""
        return self.tracker.open_counts()

    def summary(self) -> RunSummary:
        """The run's incidents (opened, resolved, still open); written to the record as a ``summary`` line."""
        summary = self.tracker.summary()
        if self._jsonl is not None and not self._closed:
            self._jsonl.write(summary.to_dict())
        return summary

    def raise_pending(self) -> None:
        """Raise the :class:`GradientAlarm` a critical alert left pending (``on_critical="raise"``)."""
        pending, self._pending_alarm = self._pending_alarm, None
        if pending:
            raise GradientAlarm(pending)

    def report_failure(self, sink: str, alert: Any, error: str) -> None:
        """Record that ``sink`` could not deliver ``alert`` (an event or an alert; called by sinks, possibly
        from their threads)."""
        what = getattr(alert, "headline", None)
        log.warning("gradwatch: alert not delivered by %s: %s%s", sink, error, f" ({what()})" if what else "")
        if self._jsonl is not None:
            entry = {"event": "delivery_failed", "time": time.time(), "sink": sink, "error": error}
            if alert is not None and hasattr(alert, "to_dict"):
                entry["alert"] = alert.to_dict()
            self._jsonl.write(entry)

    def close(self) -> None:
        """Close the JSONL record; later evaluations return nothing."""
        self._closed = True
        if self._jsonl is not None:
            self._jsonl.close()

    def state_dict(self) -> dict[str, Any]:
        """Rule state (streaks, baselines), the incidents and the alerts told; JSON-like."""
        return {
            "rules": {r.name: r.state_dict() for r in self.rules},
            "incidents": self.tracker.state_dict(),
            "alerts": [a.to_dict() for a in self.alerts],
            "suppressed": self.suppressed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; a rule absent from ``state`` keeps its fresh state."""
        rules = state.get("rules", {})
        for rule in self.rules:
            if rule.name in rules:
                rule.load_state_dict(rules[rule.name])
        if isinstance(state.get("incidents"), Mapping):
            self.tracker.load_state_dict(state["incidents"])
        self.alerts = [Alert.from_dict(d) for d in state.get("alerts", [])]
        self.suppressed = int(state.get("suppressed", 0))

    def _error(self, where: str, err: BaseException) -> None:
        if self._on_error is not None:
            self._on_error(where, err)
        else:
            log.error("gradwatch: error in alerting (%s: %s: %s); training goes on", where, type(err).__name__, err)
