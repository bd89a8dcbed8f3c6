"""Deprecated: the alert sinks moved to :mod:`gradwatch.alerts` (``gradwatch.alerts.sinks``,
``gradwatch.alerts.webhook``). ``TensorBoardAlertSink`` is gone: the monitor's TensorBoard sink writes the
alert text and ``alerts/count`` from each step's record."""

import warnings

from .alerts.sinks import *  # noqa: F401,F403 - the names this module used to hold
from .alerts.sinks import __all__ as _sinks_all
from .alerts.webhook import WEBHOOK_ENV, WebhookSink, redact_url  # noqa: F401

__all__ = [*_sinks_all, "WebhookSink", "WEBHOOK_ENV", "redact_url"]

warnings.warn("gradwatch.alert_sinks is deprecated: import from gradwatch.alerts", DeprecationWarning, stacklevel=2)
