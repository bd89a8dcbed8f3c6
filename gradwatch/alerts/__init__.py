"""Alerts: rules that turn each step's record into findings, the engine that decides what is sent, and the
sinks that send it. Open :mod:`gradwatch.alerts.rules` to add a rule, :mod:`gradwatch.alerts.sinks` to add a
sink.

Modules, leaf first: ``alert`` (the :class:`Alert` type, severities, :class:`GradientAlarm`),
``measurements`` (what rules see), ``rule`` (the :class:`Rule` base), ``rules`` (the built-in rules),
``engine`` (cooldown, the ``alerts.jsonl`` record, the ``on_critical`` policy), ``sinks`` and ``webhook``.
"""

from .alert import POLICIES, SEVERITIES, Alert, GradientAlarm, read_alerts, severity_rank, summarize
from .engine import AlertEngine
from .measurements import EarlyRatio, Measurements, depth_slope, early_ratio
from .rule import Rule
from .rules import (
    RULES, DeadLayer, DepthTrend, Exploding, NonFinite, SkipCollapse, Vanishing, build_rules, default_rules, replay,
)
from .sinks import AlertSink, CallableSink, LoggingSink, as_alert_sink
from .webhook import WEBHOOK_ENV, WebhookSink, redact_url

__all__ = [
    "SEVERITIES", "POLICIES", "severity_rank", "Alert", "GradientAlarm", "read_alerts", "summarize",
    "AlertEngine", "Measurements", "EarlyRatio", "early_ratio", "depth_slope", "Rule", "RULES", "SkipCollapse",
    "Vanishing", "Exploding", "DepthTrend", "NonFinite", "DeadLayer", "default_rules", "build_rules", "replay",
    "AlertSink", "LoggingSink", "CallableSink", "as_alert_sink", "WebhookSink", "redact_url", "WEBHOOK_ENV",
]
