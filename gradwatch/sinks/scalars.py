"""The flat-dict sink: each record as ``{tag: value}`` for loggers that take dicts of scalars (Lightning's
``log_metrics``, W&B, MLflow), with the tag names TensorBoard gets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..record import Sink, StepRecord
from .._checks import check_bool, check_prefix
from .tags import DEFAULT_NAMESPACE, Tags

__all__ = ["ScalarsSink"]


class ScalarsSink(Sink):
    """Each record as one flat dict, ``fn({tag: value, ...}, step)``, with the tags TensorBoard gets
    (:class:`gradwatch.sinks.tags.Tags`: the health section, per layer, per block, alerts): for loggers that take
    dicts of scalars (Lightning's ``log_metrics``, W&B, MLflow). No histograms or pictures; with ``counts``,
    the ``nonfinite/<metric>`` counts that accompany the histograms in TensorBoard. As in TensorBoard, at most
    :data:`~gradwatch.sinks.tags.MAX_SCALAR_TAGS` keys per step unless ``layer_scalars`` adds one per layer
    (block) and metric; ``Monitor.history()`` holds every value either way.

    Args:
        fn: called as ``fn({tag: value, ...}, step)`` once per record, in the training thread (keep it quick).
        prefix: the tags' namespace, as :class:`~gradwatch.sinks.TensorBoardSink`'s.
        counts: add the ``nonfinite/<metric>`` counts.
        layer_scalars: add one key per layer (and block) and metric.
    """

    def __init__(self, fn: Callable[[dict[str, float], int], Any], *, prefix: str = DEFAULT_NAMESPACE,
                 counts: bool = False, layer_scalars: bool = False) -> None:
        if not callable(fn):
            raise TypeError(f"ScalarsSink needs a callable, got {type(fn).__name__}")
        check_prefix(prefix)
        check_bool(counts, "counts")
        check_bool(layer_scalars, "layer_scalars")
        self.layer_scalars = layer_scalars
        self.fn = fn
        self.tags = Tags(prefix)
        self.counts = counts

    def write(self, record: StepRecord) -> None:
        """Call ``fn`` with ``record``'s scalars as one ``{tag: value}`` dict, and its step."""
        self.fn(self.tags.scalars(record, counts=self.counts, layer_scalars=self.layer_scalars), record.step)
