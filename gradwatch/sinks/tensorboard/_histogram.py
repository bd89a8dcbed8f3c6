"""TensorBoard histograms built in one pass: the ``HistogramProto`` that ``SummaryWriter.add_histogram`` writes.

``torch.utils.tensorboard.summary.make_histogram`` calls ``np.histogram``, which checks the bin edges and
sorts the values on every call: ~0.15 ms of Python and numpy overhead for a histogram of a few dozen values,
two thirds of the TensorBoard thread's work per ResNet-56 logging step (10 histograms). The edges here are
checked once (:class:`Bins`) and a step's values are placed with one ``searchsorted``; the proto is the same, field
for field (``tests/test_histogram.py`` compares them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tensorboard.compat.proto.summary_pb2 import HistogramProto

__all__ = ["Bins"]


class Bins:
    """Sorted bin edges (``SummaryWriter.default_bins``) and the histograms made with them."""

    def __init__(self, edges: Sequence[float]) -> None:
        self.edges = np.asarray(edges, dtype=np.float64)
        if self.edges.ndim != 1 or self.edges.size < 2 or np.any(np.diff(self.edges) < 0):
            raise ValueError("histogram bin edges must be a 1-D increasing sequence of at least 2 values")
        self._n = self.edges.size - 1

    def protos(self, arrays: Sequence[np.ndarray]) -> list[HistogramProto | None]:
        """The histogram of each of ``arrays`` (finite, non-empty), as ``make_histogram(array, edges)`` makes it,
        binned together: one ``searchsorted`` and one ``bincount`` for a step's ten histograms instead of ten of
        each. None for an array with no value inside the edges (``make_histogram`` raises there, e.g. on norms
        over 1e20, and the step's scalars would be lost with it)."""
        arrays = [np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays]
        if not arrays:
            return []
        if any(a.size == 0 for a in arrays):
            raise ValueError("a histogram needs at least one value")
        n, k = self._n, len(arrays)
        values = np.concatenate(arrays)
        # np.histogram's bins: [e_i, e_i+1) each, the last one closed; values outside the edges are not counted
        idx = np.searchsorted(self.edges, values, side="right") - 1
        idx[values == self.edges[-1]] = n - 1
        row = np.repeat(np.arange(k), [a.size for a in arrays])
        inside = (idx >= 0) & (idx < n)
        counts = np.bincount(row[inside] * n + idx[inside], minlength=k * n).reshape(k, n)
        occupied = counts > 0
        first = occupied.argmax(axis=1)
        last = n - 1 - occupied[:, ::-1].argmax(axis=1)
        out: list[HistogramProto | None] = []
        for r, a in enumerate(arrays):
            if not occupied[r, first[r]]:
                out.append(None)
                continue
            start, end = int(first[r]), int(last[r]) + 1
            # TensorBoard reads right limits only: one empty bin on the left keeps the leftmost limit
            bucket = counts[r, start - 1:end] if start > 0 else np.concatenate([[0], counts[r, :end]])
            # the moments per array, as make_histogram takes them (a segmented sum would round differently)
            out.append(HistogramProto(
                min=a.min(), max=a.max(), num=a.size, sum=a.sum(), sum_squares=a.dot(a),
                bucket_limit=self.edges[start:end + 1].tolist(), bucket=bucket.tolist()))
        return out
