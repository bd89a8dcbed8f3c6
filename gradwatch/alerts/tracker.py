"""The incident tracker: turns each logging step's findings into what is worth telling.

A finding (an :class:`Alert` a rule returned) is one step's evidence that a condition holds. The tracker keeps
one open :class:`Incident` per condition (:attr:`Alert.key`) and says:

- ``opened`` the first time a condition is found;
- ``escalated`` at once when it becomes more severe than it has been (warning → critical);
- ``reminder`` while it stays open, with back-off: after ``remind_after`` seconds of wall time and/or
  ``remind_steps`` logging steps, then ``backoff`` times longer each time (1 h, 4 h, 16 h, 64 h by default:
  four reminders in a week);
- ``resolved`` once the condition has been clear for ``resolve_after`` consecutive logging steps. The rules
  add the other half of the hysteresis: once firing, they keep firing until the value is past the threshold
  by a margin (:meth:`gradwatch.Rule.hold`), so a value wobbling around a threshold stays one incident.

Inhibition, as Alertmanager's: while a critical incident is open, findings of less severe incidents it
explains (:data:`INHIBITS`) are recorded but not told — every other rule under ``nonfinite`` (after a NaN
every statistic is garbage); the early-layer ratios and the depth profile under a critical ``exploding``
(a 1000x gradient-norm spike skews them all). An incident never told is not told resolved either; if the
inhibiting incident ends first, it is told then, as ``opened``.

The tracker is deterministic given its clock; the same findings on every rank give the same incidents.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._checks import check_int, check_number
from .alert import Alert, severity_rank
from .incident import Incident, IncidentEvent, RunSummary, worse

__all__ = ["IncidentTracker", "Told", "INHIBITS"]

_CRITICAL = severity_rank("critical")

#: rule of an open critical incident -> the rules whose less severe findings it explains (None: all).
INHIBITS: dict[str, tuple[str, ...] | None] = {
    "nonfinite": None,
    "exploding": ("exploding", "vanishing", "depth_trend"),
}


@dataclasses.dataclass
class _Schedule:
    """The tracker's bookkeeping for one open incident (kept apart from the user-facing snapshot)."""

    told: bool = True  # whether "opened" (or an escalation) was told
    clear: int = 0  # consecutive logging steps without a finding
    next_time: float | None = None  # wall time of the next reminder
    next_eval: int | None = None  # logging step (evaluation number) of the next reminder
    wait_time: float | None = None  # current back-off intervals
    wait_steps: int | None = None


@dataclasses.dataclass(frozen=True)
class Told:
    """One step's outcome: the events to tell, and those only recorded (inhibited or never told)."""

    events: tuple[IncidentEvent, ...]
    quiet: tuple[tuple[IncidentEvent, str], ...]  # (event, why it was not told)


class IncidentTracker:
    """Open, remind, escalate and resolve incidents from each step's findings.

    Args:
        remind_after: seconds of wall time before the first reminder of an open incident; None: no
            wall-time reminders.
        remind_steps: logging steps before the first reminder; None: no step reminders. When both are set, a
            reminder goes when either is due (and both restart from it).
        backoff: each later reminder waits this many times longer than the one before.
        resolve_after: consecutive clear logging steps before an incident is resolved.
        keep: resolved incidents kept in memory and checkpoints (the oldest are dropped; ``alerts.jsonl``
            keeps them all).
        inhibits: which critical incidents silence which rules' lesser findings (:data:`INHIBITS`).
        clock: wall time in seconds (``time.time``).
    """

    def __init__(self, *, remind_after: float | None = 3600.0, remind_steps: int | None = None,
                 backoff: float = 4.0, resolve_after: int = 5, keep: int = 1000,
                 inhibits: Mapping[str, tuple[str, ...] | None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.remind_after = check_number(remind_after, "remind_after", allow_none=True, owner="IncidentTracker")
        self.remind_steps = check_int(remind_steps, "remind_steps", minimum=1, allow_none=True, owner="IncidentTracker")
        self.backoff = check_number(backoff, "backoff", owner="IncidentTracker")
        if self.backoff < 1:
            raise ValueError(f"IncidentTracker: backoff must be >= 1, got {backoff!r}")
        self.resolve_after = check_int(resolve_after, "resolve_after", minimum=1, owner="IncidentTracker")
        self.keep = check_int(keep, "keep", minimum=0, owner="IncidentTracker")
        self.clock = clock
        self.inhibits = dict(INHIBITS if inhibits is None else inhibits)
        self.run = secrets.token_hex(3)  # incident ids "<run>-<n>": unique across runs sharing one receiver
        self._seq = 0
        self._evals = 0
        self._step: int | None = None
        self._open: dict[str, Incident] = {}
        self._sched: dict[str, _Schedule] = {}
        self._closed: list[Incident] = []
        self._deferred: set[str] = set()  # this step's repeated "opened" of incidents still untold

    # ------------------------------------------------------------------ reading
    @property
    def open(self) -> list[Incident]:
        """The open incidents, oldest first."""
        return list(self._open.values())

    @property
    def incidents(self) -> list[Incident]:
        """Every incident known (resolved ones up to ``keep``, then the open ones), oldest first."""
        return sorted([*self._closed, *self._open.values()], key=lambda i: (i.opened_step, i.id))

    def open_counts(self) -> tuple[int, int, int]:
        """Open incidents per severity (info, warning, critical), by their current severity."""
        counts = [0, 0, 0]
        for inc in self._open.values():
            counts[severity_rank(inc.severity)] += 1
        return counts[0], counts[1], counts[2]

    def summary(self) -> RunSummary:
        """The run's incidents so far, as of the latest step: a :class:`RunSummary`."""
        return RunSummary(tuple(self.incidents), self._step, self.clock())

    # ------------------------------------------------------------------ one step
    def _inhibits(self, critical_rule: str, rule: str) -> bool:
        """Whether an open critical incident of ``critical_rule`` silences ``rule``'s lesser findings (a rule
        mapped to None silences every other rule)."""
        if critical_rule not in self.inhibits:
            return False
        silenced = self.inhibits[critical_rule]
        return silenced is None or rule in silenced

    def update(self, findings: Sequence[Alert], step: int) -> Told:
        """Take one logging step's findings; return what to tell."""
        now = self.clock()
        self._evals += 1
        self._step = step
        current: dict[str, Alert] = {}
        for a in findings:  # one finding per condition: the most severe
            if a.key not in current or severity_rank(a.severity) > severity_rank(current[a.key].severity):
                current[a.key] = a
        events: list[IncidentEvent] = []
        self._deferred.clear()
        for key, a in current.items():
            events.extend(self._found(key, a, step, now))
        for key in [k for k in self._open if k not in current]:
            sched = self._sched[key]
            sched.clear += 1
            if sched.clear >= self.resolve_after:
                events.append(self._resolve(key, step, now))
        return self._sort(events, step, now)

    def _found(self, key: str, a: Alert, step: int, now: float) -> list[IncidentEvent]:
        inc = self._open.get(key)
        if inc is None:
            self._seq += 1
            inc = Incident(
                id=f"{self.run}-{self._seq}", key=key, rule=a.rule, name=a.name, severity=a.severity,
                peak=a.severity, opened_step=step, opened_time=now, last_step=step, first_value=a.value,
                last_value=a.value, worst_value=a.value, threshold=a.threshold, alert=a,
            )
            self._open[key] = inc
            self._sched[key] = sched = _Schedule()
            self._restart(sched, now)
            return [IncidentEvent("opened", inc, step, now)]
        sched = self._sched[key]
        sched.clear = 0
        previous = inc.peak
        escalated = severity_rank(a.severity) > severity_rank(previous)
        worst = a.value if worse(a.value, inc.worst_value, inc.threshold, inc.first_value) else inc.worst_value
        inc = dataclasses.replace(
            inc, name=a.name, severity=a.severity, peak=a.severity if escalated else previous, last_step=step,
            last_value=a.value, worst_value=worst, alert=a, held=inc.held + 1,
        )
        self._open[key] = inc
        if escalated:
            self._restart(sched, now)
            return [IncidentEvent("escalated", inc, step, now, previous=previous)]
        if self._due(sched, now):
            inc = dataclasses.replace(inc, reminders=inc.reminders + 1)
            self._open[key] = inc
            self._advance(sched, now)
            return [IncidentEvent("reminder", inc, step, now)]
        if not sched.told:  # a finding of an incident never told: told as opened once nothing inhibits it
            self._deferred.add(key)
            return [IncidentEvent("opened", inc, step, now)]
        return []

    def _resolve(self, key: str, step: int, now: float) -> IncidentEvent:
        inc = dataclasses.replace(self._open.pop(key), resolved_step=step, resolved_time=now)
        sched = self._sched.pop(key)
        self._closed.append(inc)
        del self._closed[: max(0, len(self._closed) - self.keep)]
        return IncidentEvent("resolved", inc, step, now, told=sched.told)

    def _sort(self, events: list[IncidentEvent], step: int, now: float) -> Told:
        """Split the events into told and quiet (inhibited, or the end of an incident never told)."""
        critical = [i for i in self._open.values() if severity_rank(i.severity) == _CRITICAL]
        told, quiet = [], []
        for e in events:
            if not e.told:
                quiet.append((e, "never told"))
                continue
            why = None
            if e.kind != "resolved" and severity_rank(e.severity) < _CRITICAL:
                by = next((c for c in critical if c.key != e.incident.key and self._inhibits(c.rule, e.rule)), None)
                why = None if by is None else f"inhibited by {by.id} ({by.rule})"
            sched = self._sched.get(e.incident.key)
            if why is None:
                told.append(e)
                if sched is not None:
                    sched.told = True
            elif e.incident.key not in self._deferred:  # a repeat of an untold opening is not recorded again
                quiet.append((e, why))
                if sched is not None and e.kind == "opened":
                    sched.told = False
        return Told(tuple(told), tuple(quiet))

    def set_recording(self, key: str, recording: str) -> Incident | None:
        """Name the flight recorder's file on the open incident ``key`` (kept by its later events and in
        checkpoints); the incident after the change, None when it is not open."""
        inc = self._open.get(key)
        if inc is not None:
            inc = self._open[key] = dataclasses.replace(inc, recording=recording)
        return inc

    # ------------------------------------------------------------------ the back-off
    def _restart(self, sched: _Schedule, now: float) -> None:
        sched.wait_time, sched.wait_steps = self.remind_after, self.remind_steps
        self._plan(sched, now)

    def _advance(self, sched: _Schedule, now: float) -> None:
        if sched.wait_time is not None:
            sched.wait_time *= self.backoff
        if sched.wait_steps is not None:
            sched.wait_steps = math.ceil(sched.wait_steps * self.backoff - 1e-9)
        self._plan(sched, now)

    def _plan(self, sched: _Schedule, now: float) -> None:
        sched.next_time = None if sched.wait_time is None else now + sched.wait_time
        sched.next_eval = None if sched.wait_steps is None else self._evals + sched.wait_steps

    def _due(self, sched: _Schedule, now: float) -> bool:
        return (sched.next_time is not None and now >= sched.next_time) or \
            (sched.next_eval is not None and self._evals >= sched.next_eval)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The run id, counters, open incidents with their reminder schedules and the resolved ones kept; JSON-like."""
        return {
            "run": self.run, "seq": self._seq, "evaluated": self._evals, "step": self._step,
            "open": [{"incident": i.to_dict(), "schedule": dataclasses.asdict(self._sched[k])}
                     for k, i in self._open.items()],
            "closed": [i.to_dict() for i in self._closed],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (on resume): open incidents stay open, ids keep counting."""
        self.run = str(state.get("run", self.run))
        self._seq = int(state.get("seq", 0))
        self._evals = int(state.get("evaluated", 0))
        self._step = state.get("step")
        self._open, self._sched = {}, {}
        for entry in state.get("open", []):
            inc = Incident.from_dict(entry["incident"])
            self._open[inc.key] = inc
            self._sched[inc.key] = _Schedule(**entry.get("schedule", {}))
        self._closed = [Incident.from_dict(d) for d in state.get("closed", [])]
