"""What an alert is: :class:`Alert`, its severities, and :class:`GradientAlarm`. A leaf: imports nothing of gradwatch."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = [
    "SEVERITIES", "Severity", "POLICIES", "severity_rank", "Alert", "GradientAlarm", "read_alerts", "read_events", "summarize",
]

#: Alert severities, mildest first.
SEVERITIES = ("info", "warning", "critical")
#: An incident's severity, least severe first.
Severity = Literal["info", "warning", "critical"]
#: Values of ``on_critical``.
POLICIES = ("warn", "stop", "raise")
_RANK = {s: i for i, s in enumerate(SEVERITIES)}


def severity_rank(severity: str) -> int:
    """0 for ``info``, 1 for ``warning``, 2 for ``critical``."""
    try:
        return _RANK[severity]
    except KeyError:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}") from None


@dataclass(frozen=True)
class Alert:
    """One finding of one rule at one logging step.

    Attributes:
        rule: the rule that fired (``"skip_collapse"``, ``"vanishing"``, ``"exploding"``, ``"depth_trend"``,
            ``"nonfinite"``, ``"dead_layer"`` or a custom rule's name).
        severity: ``"info"``, ``"warning"`` or ``"critical"``.
        step: the monitor step it was measured at (the TensorBoard step of the curves it refers to).
        name: the layer or block concerned, or None when the finding is about a group (early layers, the
            whole model).
        value: the measured statistic that crossed the threshold.
        threshold: the threshold it crossed.
        message: what was seen, in words.
        hint: what to look at.
        subject: what the condition is about, when ``name`` does not say it (``exploding`` reports a spike
            and an early-layer ratio, both with ``name=None``; ``nonfinite`` names the first bad layer, which
            may change while the condition is the same). None: ``name``.
    """

    rule: str
    severity: str
    step: int
    name: str | None
    value: float
    threshold: float
    message: str
    hint: str
    subject: str | None = None

    def __post_init__(self) -> None:
        severity_rank(self.severity)

    @property
    def key(self) -> str:
        """The condition this alert is a finding of, ``"<rule>:<subject or name>"``: one open incident per key."""
        about = self.subject if self.subject is not None else (self.name or "")
        return f"{self.rule}:{about}"

    def to_dict(self) -> dict[str, Any]:
        """The alert as JSON-safe values (non-finite numbers become the strings ``"nan"``, ``"inf"``, ``"-inf"``)."""
        d = asdict(self)
        for key in ("value", "threshold"):
            v = float(d[key])
            d[key] = v if math.isfinite(v) else str(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Alert:
        """Inverse of :meth:`to_dict` (extra keys, e.g. a JSONL line's ``event`` and ``time``, are ignored)."""
        return cls(
            rule=str(d["rule"]), severity=str(d["severity"]), step=int(d["step"]),
            name=None if d.get("name") is None else str(d["name"]), value=float(d["value"]),
            threshold=float(d["threshold"]), message=str(d["message"]), hint=str(d["hint"]),
            subject=None if d.get("subject") is None else str(d["subject"]),
        )

    def headline(self) -> str:
        """``[warning] vanishing at step 120 (layer1.0.conv1)`` — the one-line summary."""
        where = f" ({self.name})" if self.name else ""
        return f"[{self.severity}] {self.rule} at step {self.step}{where}"

    def format(self) -> str:
        """Headline, message and hint on three lines."""
        return f"{self.headline()}: {self.message}\n  value {self.value:.4g}, threshold {self.threshold:.4g}\n" \
               f"  hint: {self.hint}"


class GradientAlarm(RuntimeError):
    """Raised out of ``mon.step()`` / ``optimizer.step()`` after a critical alert when ``on_critical="raise"``.

    ``alert`` is the critical alert (the first of the step); ``alerts`` all critical alerts of that step.
    """

    def __init__(self, alerts: Sequence[Alert]) -> None:
        self.alerts = list(alerts)
        self.alert = self.alerts[0]
        more = f" (+{len(self.alerts) - 1} more critical)" if len(self.alerts) > 1 else ""
        super().__init__(f"gradwatch: {self.alert.headline()}{more}: {self.alert.message}. Hint: {self.alert.hint}")


def summarize(alerts: Iterable[Alert], min_severity: str = "warning") -> str:
    """A one-line digest, e.g. ``"vanishing@15, nonfinite@30 (fc) [critical]"``, of the alerts at least
    ``min_severity``; ``"none"`` when there are none. For run summaries (the demo prints one per net)."""
    floor = severity_rank(min_severity)
    parts = [
        f"{a.rule}@{a.step}" + (f" ({a.name})" if a.name else "") + (" [critical]" if a.severity == "critical" else "")
        for a in alerts
        if severity_rank(a.severity) >= floor
    ]
    return ", ".join(parts) if parts else "none"


#: The ``alerts.jsonl`` events that carry a finding told to the sinks.
_TOLD = ("alert", "opened", "escalated", "reminder")


def read_events(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every line of an ``alerts.jsonl`` file, as dicts: incident events (``event`` = ``opened``,
    ``escalated``, ``reminder``, ``resolved``; ``told: false`` with ``why`` when inhibited), ``summary``,
    ``delivery_failed``. A line cut short by a crash is skipped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a killed run
                continue
    return out


def read_alerts(path: str | os.PathLike) -> list[Alert]:
    """The findings told, as recorded in an ``alerts.jsonl`` file: one per ``opened``, ``escalated`` and
    ``reminder`` event (what the sinks received; :func:`read_events` has everything)."""
    return [Alert.from_dict(d) for d in read_events(path)
            if d.get("event", "alert") in _TOLD and d.get("told", True)]
