"""The TensorBoard path: :class:`TensorBoardSink` (``sink``) writes each step as one event on a background
thread; ``layout`` builds the Custom Scalars layout, ``pictures`` the depth x time pictures (drawn in a child
process by ``_drawer``); ``_histogram`` and ``_fastcrc`` make the event's histograms and checksums fast."""

from __future__ import annotations

from .sink import TensorBoardSink, alert_markdown, open_writer

__all__ = ["TensorBoardSink", "open_writer", "alert_markdown"]
