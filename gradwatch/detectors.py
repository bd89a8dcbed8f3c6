"""Deprecated: the alert rules moved to :mod:`gradwatch.alerts` (``gradwatch.alerts.default_rules()``,
``gradwatch.alerts.Rule``, ``gradwatch.alerts.replay``); ``layer_kinds`` to :mod:`gradwatch.layers`."""

import warnings

from .alerts import *  # noqa: F401,F403 - the names this module used to hold
from .alerts import __all__ as _alerts_all
from .layers import layer_kinds  # noqa: F401
from .names import short_list  # noqa: F401

__all__ = [*_alerts_all, "layer_kinds", "short_list"]

warnings.warn("gradwatch.detectors is deprecated: import from gradwatch.alerts (layer_kinds: gradwatch.layers)",
              DeprecationWarning, stacklevel=2)
