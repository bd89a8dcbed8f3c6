"""gradwatch: gradient diagnostics for deep networks.

>>> import gradwatch
>>> mon = gradwatch.Monitor(model, log_dir="runs/exp", every=50)   # doctest: +SKIP

The data path (``docs/architecture.md``): hooks → fused norms (:mod:`gradwatch.measure.meter`, block flow
:mod:`gradwatch.flow`) → one :class:`StepRecord` per logging step → alert rules (:mod:`gradwatch.alerts`)
→ every sink (:mod:`gradwatch.sinks`: history, TensorBoard, logging, webhooks, yours); after the run,
:mod:`gradwatch.report.events`. The reference networks and the validation harness are in
:mod:`gradwatch.reference`, which ``import gradwatch`` does not import.
"""

from __future__ import annotations

import importlib.util as _ilu
import os as _os
import sys as _sys

from .alerts import Alert, GradientAlarm, Incident, Rule
from .config import Config
from .monitor import Monitor, NothingToMeasure
from .record import Sink, StepRecord
from .sinks import TensorBoardSink, WebhookSink
from .version import __version__

__all__ = [
    "Monitor", "Config", "NothingToMeasure", "StepRecord", "Sink", "TensorBoardSink", "WebhookSink", "Alert",
    "Incident", "GradientAlarm", "Rule", "__version__",
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
