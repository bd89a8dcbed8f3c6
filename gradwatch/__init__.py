"""gradwatch: gradient diagnostics for deep networks.

>>> import gradwatch
>>> mon = gradwatch.Monitor(model, log_dir="runs/exp", every=50)   # doctest: +SKIP

The data path (``docs/architecture.md``): hooks → fused norms (:mod:`gradwatch.measure`) → one
:class:`StepRecord` per logging step → alert rules (:mod:`gradwatch.alerts`) → every :class:`Sink` (history,
TensorBoard, alert sinks, yours).
"""

from __future__ import annotations

import importlib.util as _ilu
import os as _os
import sys as _sys

from . import alerts, blocks, flow, reference
from .alerts import (
    Alert, AlertSink, CallableSink, GradientAlarm, Incident, IncidentEvent, LoggingSink, Measurements, Rule,
    RunSummary, WebhookSink,
)
from .config import AlertConfig, Config, MeasureConfig, OutputConfig
from .health import HEALTH
from .history import History
from .measure import amp_grad_scale, loss_scale
from .monitor import Monitor, NothingToMeasure
from .names import EARLY_FRACTION, FLOW_METRICS, GLOBAL_NAME, METRICS, clean_name, early_count
from .record import Sink, StepRecord
from .sinks import ScalarsSink, TensorBoardSink
from .tags import Tags
from .version import __version__

__all__ = [
    "Monitor",
    "NothingToMeasure",
    "Config",
    "MeasureConfig",
    "AlertConfig",
    "OutputConfig",
    "StepRecord",
    "Sink",
    "TensorBoardSink",
    "ScalarsSink",
    "Tags",
    "History",
    "METRICS",
    "FLOW_METRICS",
    "HEALTH",
    "GLOBAL_NAME",
    "EARLY_FRACTION",
    "early_count",
    "amp_grad_scale",
    "loss_scale",
    "Alert",
    "GradientAlarm",
    "Incident",
    "IncidentEvent",
    "RunSummary",
    "Rule",
    "Measurements",
    "AlertSink",
    "WebhookSink",
    "LoggingSink",
    "CallableSink",
    "alerts",
    "blocks",
    "flow",
    "reference",
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
