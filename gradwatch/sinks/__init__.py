"""Where each step's :class:`~gradwatch.StepRecord` goes. A sink is any object with ``write(record)``
(subclass :class:`~gradwatch.Sink`); ``flush()``, ``close()`` and ``summary(run_summary)`` are optional.

- :mod:`~gradwatch.sinks.history`: the in-memory history every monitor keeps (``mon.history()``);
- :mod:`~gradwatch.sinks.tensorboard`: one event per step, the Custom Scalars layout, the pictures;
- :mod:`~gradwatch.sinks.scalars`: one flat ``{tag: value}`` dict per step, for loggers that take dicts;
- :mod:`~gradwatch.sinks.tags`: the one owner of tag names (TensorBoard, flat dicts, ``gradwatch report``);
- :mod:`~gradwatch.sinks.alerting`: the base of the sinks that tell incidents (:class:`AlertSink`), and
  :class:`CallableSink`; :mod:`~gradwatch.sinks.logging` and :mod:`~gradwatch.sinks.webhook` (Slack or any
  JSON endpoint; what it posts: :mod:`~gradwatch.sinks.messages`) are two of them.

Open :mod:`gradwatch.sinks.alerting` to add a sink that tells alerts, this package for any other.
"""

from __future__ import annotations

from ..record import Sink
from .alerting import AlertSink, CallableSink
from .logging import LoggingSink
from .scalars import ScalarsSink
from .tags import Tags
from .tensorboard import TensorBoardSink
from .webhook import WebhookSink

__all__ = ["Sink", "TensorBoardSink", "ScalarsSink", "AlertSink", "LoggingSink", "CallableSink", "WebhookSink",
           "Tags"]
