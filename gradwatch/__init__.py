"""gradwatch: gradient diagnostics for deep networks.

>>> import gradwatch
>>> mon = gradwatch.Monitor(model, log_dir="runs/exp", every=50)   # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util as _ilu
import os as _os
import sys as _sys

from . import blocks, detectors, flow
from .alert_sinks import CallableSink, LoggingSink, TensorBoardAlertSink, WebhookSink
from .alerts import Alert, GradientAlarm
from .history import History
from .layers import GLOBAL_NAME, clean_name
from .monitor import METRICS, Monitor

__version__ = "0.1.0"
__all__ = [
    "Monitor",
    "METRICS",
    "GLOBAL_NAME",
    "History",
    "Alert",
    "GradientAlarm",
    "WebhookSink",
    "LoggingSink",
    "TensorBoardAlertSink",
    "CallableSink",
    "blocks",
    "detectors",
    "flow",
    "clean_name",
    "__version__",
]


def _bind_integrations() -> None:
    """Make ``gradwatch.integrations`` importable from a source checkout that was never installed.

    Installed (wheel or editable) the package is mapped by setuptools; in a bare checkout the adapters sit in
    the top-level ``integrations/`` folder beside this package.
    """
    if "gradwatch.integrations" in _sys.modules or _ilu.find_spec(__name__ + ".integrations") is not None:
        return
    folder = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "integrations")
    init = _os.path.join(folder, "__init__.py")
    if not _os.path.isfile(init):
        return
    spec = _ilu.spec_from_file_location(__name__ + ".integrations", init, submodule_search_locations=[folder])
    if spec is None or spec.loader is None:
        return
    module = _ilu.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_bind_integrations()
