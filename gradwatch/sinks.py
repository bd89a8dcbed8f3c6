"""Where measured values go: TensorBoard (scalars and histograms)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger("gradwatch")

__all__ = ["TensorBoardSink"]


class TensorBoardSink:
    """Write metrics to a ``torch.utils.tensorboard.SummaryWriter``.

    Scalars are tagged ``<prefix><metric>/<name>`` so that TensorBoard's grouping (text before the first
    ``/``) gives one section per metric. Each metric also gets a histogram across names,
    ``<prefix>hist/<metric>``, of its finite values, and a scalar ``<prefix>nonfinite/<metric>`` counting the
    NaN/Inf values left out of that histogram. ``add_scalars`` is never used: it makes a run per key.
    """

    def __init__(self, writer, prefix: str = "", histograms: bool = True) -> None:
        self.writer = writer
        self.prefix = prefix
        self.histograms = histograms

    def write(
        self,
        step: int,
        names: Sequence[str],
        metric: str,
        values: np.ndarray,
        hist_mask: np.ndarray | None = None,
    ) -> None:
        """Write one metric for all ``names`` at ``step``; ``hist_mask`` picks the entries for the histogram."""
        w, p = self.writer, self.prefix
        for name, v in zip(names, values):
            w.add_scalar(f"{p}{metric}/{name}", float(v), step)
        if not self.histograms:
            return
        vals = values if hist_mask is None else values[hist_mask]
        finite = np.isfinite(vals)
        w.add_scalar(f"{p}nonfinite/{metric}", float((~finite).sum()), step)
        if finite.any():  # add_histogram raises on empty input
            w.add_histogram(f"{p}hist/{metric}", vals[finite], step)

    def flush(self) -> None:
        self.writer.flush()
