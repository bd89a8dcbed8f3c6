"""The alert sink every monitor has: each incident event as one line on a Python logger."""

from __future__ import annotations

import logging

from ..alerts.alert import Severity, severity_rank
from ..alerts.incident import IncidentEvent, RunSummary
from .alerting import AlertSink

__all__ = ["LoggingSink"]


class LoggingSink(AlertSink):
    """Log each incident event on a Python logger (default ``gradwatch``) as one line, at the incident's level:
    info → INFO, warning → WARNING, critical → ERROR (a ``resolved`` line at its peak's level, so a console that
    showed the opening shows the end); the hint once, when the incident opens. At the end of the run, the
    summary (WARNING when the run had an incident at warning or above, else INFO). On by default.

    Args:
        logger: a logger or its name.
        min_severity: the least severe incident logged: ``"info"``, ``"warning"`` or ``"critical"``.
    """

    _LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.ERROR}
    always_summarize = True

    def __init__(self, logger: str | logging.Logger = "gradwatch", *, min_severity: Severity = "info") -> None:
        if not isinstance(logger, (str, logging.Logger)):
            raise TypeError(f"logger must be a logging.Logger or a logger's name, got {type(logger).__name__}")
        super().__init__(min_severity=min_severity)
        self.logger = logger if isinstance(logger, logging.Logger) else logging.getLogger(logger)

    def send(self, event: IncidentEvent) -> None:
        """Log ``event`` as one line at its severity's level."""
        self.logger.log(self._LEVELS[event.severity], "gradwatch %s", event.format())

    def send_summary(self, summary: RunSummary) -> None:
        """Log the summary: WARNING when an incident reached warning or above, else INFO."""
        loud = any(severity_rank(i.peak) >= 1 for i in summary.incidents)
        self.logger.log(logging.WARNING if loud else logging.INFO, "%s", summary.format())

    def __repr__(self) -> str:
        return f"LoggingSink({self.logger.name!r})"
