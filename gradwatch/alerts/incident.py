"""What an incident is: :class:`Incident` (one condition, from opened to resolved), :class:`IncidentEvent` (what
is told about it) and :class:`RunSummary` (the run's incidents at its end), with the words each sink uses.

A *condition* is a rule firing about one subject (a layer, a block, or the whole model): its key is
:attr:`Alert.key`. The first finding opens an incident; while the condition holds, the incident stays open and
the tracker (:mod:`gradwatch.alerts.tracker`) decides when to remind; when it has been clear for a while the
incident is resolved. Everything here is plain data plus formatting: a leaf next to :mod:`.alert`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .alert import Alert, severity_rank

__all__ = ["EVENT_KINDS", "Incident", "IncidentEvent", "RunSummary", "format_duration"]

#: What can happen to an incident, in the order it can happen.
EVENT_KINDS = ("opened", "escalated", "reminder", "resolved")


def format_duration(seconds: float) -> str:
    """``45s``, ``12m``, ``3h05m``, ``2d04h``: a wall-clock span for a human."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _num(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else str(v)


def _json_num(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)


@dataclass(frozen=True)
class Incident:
    """One condition from the step it was first found to the step it was resolved (a snapshot: the tracker
    replaces it as the incident moves on).

    Attributes:
        id: unique in the run and kept across resume (``"<run>-<n>"``): what a webhook receiver updates by.
        key: the condition (:attr:`Alert.key`): one open incident per key at a time.
        rule, name: the rule and the layer/block named by its latest finding (None: a group or the model).
        severity: the latest finding's severity; ``peak``: the most severe so far.
        opened_step, opened_time: the first finding (monitor step, ``time.time()``).
        last_step: the latest step the condition held.
        first_value, last_value, worst_value: the rule's statistic at opening, latest, and farthest past the
            threshold (in the direction it was crossed); ``threshold`` the threshold.
        resolved_step, resolved_time: when it was resolved; None while open.
        reminders: reminders sent so far. ``held``: logging steps on which the condition held.
        alert: the latest finding (message and hint).
        recording: the flight recorder's file of the logging steps up to the opening (``docs/alerts.md``), or
            None (recorder off, not yet told, or nowhere to write).
    """

    id: str
    key: str
    rule: str
    name: str | None
    severity: str
    peak: str
    opened_step: int
    opened_time: float
    last_step: int
    first_value: float
    last_value: float
    worst_value: float
    threshold: float
    alert: Alert
    resolved_step: int | None = None
    resolved_time: float | None = None
    reminders: int = 0
    held: int = 1
    recording: str | None = None

    @property
    def open(self) -> bool:
        """Whether the incident is still open (not resolved yet)."""
        return self.resolved_step is None

    def duration(self, now: float | None = None) -> float:
        """Wall-clock seconds from opening to resolution (to ``now`` while open)."""
        end = self.resolved_time if self.resolved_time is not None else now
        return max(0.0, (self.opened_time if end is None else end) - self.opened_time)

    def steps(self, step: int | None = None) -> int:
        """Steps from opening to resolution (to ``step``, else the latest held step, while open)."""
        end = self.resolved_step if self.resolved_step is not None else (self.last_step if step is None else step)
        return max(0, end - self.opened_step)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (a non-finite value as its string): what checkpoints and summaries hold; :meth:`from_dict` reads
        it back."""
        d = asdict(self)
        d["alert"] = self.alert.to_dict()
        for k in ("first_value", "last_value", "worst_value", "threshold"):
            d[k] = _json_num(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Incident:
        """The incident :meth:`to_dict` wrote (read back from a checkpoint)."""
        fields = dict(d)
        fields["alert"] = Alert.from_dict(d["alert"])
        for k in ("first_value", "last_value", "worst_value", "threshold"):
            fields[k] = float(d[k])
        for k in ("opened_step", "last_step", "reminders", "held"):
            fields[k] = int(d[k])
        return cls(**fields)

    def describe(self, now: float | None = None) -> str:
        """``[warning] skip_collapse (layer2.4): steps 120–900 (13m), worst 0.00012`` — a summary's line."""
        where = f" ({self.name})" if self.name else ""
        span = f"since step {self.opened_step}" if self.open else f"steps {self.opened_step}–{self.resolved_step}"
        return f"[{self.peak}] {self.rule}{where}: {span} ({format_duration(self.duration(now))}), " \
               f"worst {_num(self.worst_value)}"


@dataclass(frozen=True)
class IncidentEvent:
    """Something to tell about an incident: ``opened``, ``escalated``, ``reminder`` or ``resolved``.

    Reads like the :class:`Alert` behind it (``rule``, ``severity``, ``step``, ``name``, ``value``,
    ``threshold``, ``message``, ``hint``, :meth:`headline`, :meth:`format`), so a sink written for alerts
    keeps working. ``severity`` of a ``resolved`` event is the incident's peak, so a sink that filters by
    severity hears the end of what it heard the start of.

    Attributes:
        kind: one of :data:`EVENT_KINDS`.
        incident: the incident after the event.
        step, time: when (monitor step, ``time.time()``).
        previous: the severity before an escalation (None otherwise).
        told: False for the end of an incident whose start was never told (inhibited): recorded, not sent.
    """

    kind: str
    incident: Incident
    step: int
    time: float
    previous: str | None = None
    told: bool = True

    # --- reads like an Alert
    @property
    def alert(self) -> Alert:
        """The incident's latest finding."""
        return self.incident.alert

    @property
    def rule(self) -> str:
        """The name of the rule that found the condition."""
        return self.incident.rule

    @property
    def severity(self) -> str:
        """The incident's current severity; its peak for a ``resolved`` event."""
        return self.incident.peak if self.kind == "resolved" else self.incident.severity

    @property
    def name(self) -> str | None:
        """The layer or block named by the latest finding (None: a group or the whole model)."""
        return self.incident.name

    @property
    def value(self) -> float:
        """The rule's statistic at the latest step the condition held."""
        return self.incident.last_value

    @property
    def threshold(self) -> float:
        """The rule's threshold."""
        return self.incident.threshold

    @property
    def message(self) -> str:
        """The latest finding's message."""
        return self.alert.message

    @property
    def hint(self) -> str:
        """The latest finding's hint: what to look at or change."""
        return self.alert.hint

    @property
    def id(self) -> str:
        """The incident's id (``<run>-<n>``): what a webhook receiver updates by."""
        return self.incident.id

    def headline(self) -> str:
        """``[warning] skip_collapse opened at step 120 (layer2.4)``."""
        inc = self.incident
        where = f" ({inc.name})" if inc.name else ""
        return f"[{self.severity}] {inc.rule} {self.what} at step {self.step}{where}"

    @property
    def what(self) -> str:
        """What happened, in words: ``opened``, ``escalated from warning``, ``still open``, ``resolved``."""
        return {"opened": "opened", "escalated": f"escalated from {self.previous}", "reminder": "still open",
                "resolved": "resolved"}[self.kind]

    def progress(self) -> str:
        """How long it has lasted and how the value moved (empty for an opening)."""
        inc = self.incident
        if self.kind == "opened":
            return ""
        span = f"{inc.steps(self.step)} steps, {format_duration(inc.duration(self.time))}"
        if self.kind == "resolved":
            return (f"after {span}; worst {_num(inc.worst_value)} (threshold {_num(inc.threshold)}), "
                    f"last held at step {inc.last_step}")
        return (f"for {span}; value {_num(inc.last_value)} (opened at {_num(inc.first_value)}, worst "
                f"{_num(inc.worst_value)}, threshold {_num(inc.threshold)})")

    def format(self) -> str:
        """One line: the headline, then the message (opened, escalated) or the progress, and the hint on
        opening only — a reminder does not repeat it."""
        if self.kind in ("opened", "escalated"):
            text = f"{self.headline()}: {self.message}"
            return f"{text} | hint: {self.hint}{self._recording(' | recording: ')}" if self.kind == "opened" else text
        return f"{self.headline()}, {self.progress()}"

    def _recording(self, lead: str) -> str:
        """``lead`` and the flight recorder's file, when the incident has one."""
        return f"{lead}{self.incident.recording}" if self.incident.recording else ""

    def markdown(self) -> str:
        """The event as Markdown (TensorBoard text, Slack)."""
        inc = self.incident
        where = f" in `{inc.name}`" if inc.name else ""
        head = f"**{self.severity}** `{inc.rule}`{where} — {self.kind} at step {self.step} (incident {inc.id})"
        if self.kind == "opened":
            lead_up = self._recording("\n_lead-up:_ ")
            return f"{head}\n{self.message}\n_hint:_ {self.hint}{lead_up}"
        if self.kind == "escalated":
            return f"{head}, was {self.previous}\n{self.message}"
        return f"{head}\n{self.progress()}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: what ``alerts.jsonl`` and a JSON webhook receive."""
        inc = self.incident
        return {
            "event": self.kind, "incident": inc.id, "key": inc.key, "state": "open" if inc.open else "resolved",
            "time": self.time, "step": self.step, "rule": inc.rule, "severity": self.severity, "peak": inc.peak,
            "previous": self.previous, "name": inc.name, "value": _json_num(inc.last_value),
            "first_value": _json_num(inc.first_value), "worst_value": _json_num(inc.worst_value),
            "threshold": _json_num(inc.threshold), "opened_step": inc.opened_step, "opened_time": inc.opened_time,
            "resolved_step": inc.resolved_step, "duration_s": inc.duration(self.time),
            "reminders": inc.reminders, "message": self.message, "hint": self.hint, "recording": inc.recording,
        }


@dataclass(frozen=True)
class RunSummary:
    """The incidents of a run, at its end: what the person who comes back after a weekend reads first.

    Attributes:
        incidents: every incident of the run (this process's part of it: since the monitor was built or
            resumed), oldest first.
        step: the last step measured; ``time``: when the summary was made.
    """

    incidents: tuple[Incident, ...]
    step: int | None
    time: float

    def at_least(self, severity: str) -> RunSummary:
        """The same summary with only the incidents whose peak is at least ``severity``."""
        floor = severity_rank(severity)
        return RunSummary(tuple(i for i in self.incidents if severity_rank(i.peak) >= floor), self.step, self.time)

    @property
    def still_open(self) -> list[Incident]:
        """The incidents still open at the end, oldest first."""
        return [i for i in self.incidents if i.open]

    @property
    def resolved(self) -> list[Incident]:
        """The incidents resolved by the end, oldest first."""
        return [i for i in self.incidents if not i.open]

    def headline(self) -> str:
        """``gradwatch run summary at step 10000: 3 incidents (1 still open, 2 resolved)``."""
        n = len(self.incidents)
        if not n:
            return f"gradwatch run summary at step {self.step}: no incidents"
        return (f"gradwatch run summary at step {self.step}: {n} incident{'s' * (n != 1)} "
                f"({len(self.still_open)} still open, {len(self.resolved)} resolved)")

    def lines(self, limit: int = 20) -> list[str]:
        """The headline, then one line per incident, the open ones first, most severe first."""
        order = sorted(self.incidents, key=lambda i: (not i.open, -severity_rank(i.peak), i.opened_step))
        out = [self.headline()]
        out += [("  still open: " if i.open else "  resolved:   ") + i.describe(self.time) for i in order[:limit]]
        if len(order) > limit:
            out.append(f"  … and {len(order) - limit} more (alerts.jsonl has them all)")
        return out

    def format(self) -> str:
        """The :meth:`lines` as one text, a line each (what the log shows)."""
        return "\n".join(self.lines())

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (``"event": "summary"``): what ``alerts.jsonl`` and a JSON webhook receive."""
        return {"event": "summary", "time": self.time, "step": self.step,
                "incidents": [i.to_dict() for i in self.incidents]}


def worse(value: float, than: float, threshold: float, first: float) -> bool:
    """Whether ``value`` is farther past ``threshold`` than ``than``, in the direction ``first`` crossed it
    (below a floor: lower is worse; above a ceiling: higher is worse)."""
    if not math.isfinite(value):
        return math.isfinite(than)  # non-finite is the worst there is
    if not math.isfinite(than):
        return False
    if first < threshold:
        return value < than
    if first > threshold:
        return value > than
    return abs(value) > abs(than)

