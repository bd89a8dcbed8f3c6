"""Alerts: rules that turn each step's record into findings, and incidents that turn findings into what is
worth telling (opened, escalated, reminded with back-off, resolved). Open :mod:`gradwatch.alerts.rules` to add
a rule; the sinks that tell incidents (logging, webhook, your callable) are in :mod:`gradwatch.sinks`
(:mod:`gradwatch.sinks.alerting` to add one).

Modules, leaf first: ``alert`` (the :class:`Alert` type, severities, :class:`GradientAlarm`), ``incident``
(:class:`Incident`, :class:`IncidentEvent`, :class:`RunSummary`), ``siblings`` (layers that read one input:
one depth), ``measurements`` (what rules see), ``rule``
(the :class:`Rule` base), ``rules`` (the built-in rules), ``tracker`` (the :class:`IncidentTracker`: back-off,
hysteresis, inhibition) and ``engine`` (the ``alerts.jsonl`` record, the ``on_critical`` policy).
"""

from .alert import POLICIES, SEVERITIES, Alert, GradientAlarm, read_alerts, read_events, severity_rank, summarize
from .engine import AlertEngine
from .incident import EVENT_KINDS, Incident, IncidentEvent, RunSummary
from .tracker import IncidentTracker
from .measurements import EarlyRatio, Measurements, depth_slope, early_ratio, early_ratio_shown
from .rule import Rule
from .lost import LostSkip
from .rules import (
    RULES, AttenuatedIdentity, DeadLayer, DepthTrend, Exploding, NonFinite, SkipCollapse, Vanishing, build_rules,
    default_rules, replay,
)

__all__ = [
    "SEVERITIES", "POLICIES", "severity_rank", "Alert", "GradientAlarm", "read_alerts", "read_events", "summarize",
    "EVENT_KINDS", "Incident", "IncidentEvent", "RunSummary", "IncidentTracker", "AlertEngine", "Measurements", "EarlyRatio", "early_ratio", "early_ratio_shown", "depth_slope", "Rule", "RULES", "SkipCollapse", "LostSkip",
    "AttenuatedIdentity", "Vanishing", "Exploding", "DepthTrend", "NonFinite", "DeadLayer", "default_rules", "build_rules", "replay",
]
