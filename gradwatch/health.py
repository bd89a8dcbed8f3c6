"""The health figures: a few whole-model numbers, one per question, that open the dashboard.

Each answers "is the gradient flowing, and where not?" for the whole model in one line per run:

- ``grad_to_weight_early``: median gradient-to-weight ratio of the early weight layers over that of all weight
  layers, siblings (layers reading one input, as an attention's query, key and value) counted as one depth at
  their largest ratio, computed exactly as the ``vanishing`` and ``exploding`` rules compute it
  (:func:`gradwatch.alerts.early_ratio`): ~1 when early layers learn as fast as the rest, far below 1 when
  their gradient vanishes, far above when it explodes;
- ``skip_share_min``: the lowest ``skip_share`` over the residual blocks (the ``skip_collapse`` rule names the
  block when it fires);
- ``transmission_end_to_end``: the gradient at the first block's input over the gradient at the last block's
  output (``grad_in`` of the first block / ``grad_out`` of the last, in depth order): how much of the gradient
  arriving at the top of the residual chain reaches its bottom.

- ``effective_depth`` (and ``_p10``, ``_p50``, ``_p90``, ``_n``): how many residual blocks deep the gradient
  travels, the mean and percentiles of its path-length distribution over the ``_n`` blocks of the main chain
  (:mod:`gradwatch.depth`).

The whole-model gradient norm (``grad_norm`` of ``_global``) and the open incidents per severity complete
the health section; they are in the record already. A figure that cannot be computed (no blocks, too few
layers) is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .alerts.measurements import Measurements, early_ratio_shown
from .alerts.siblings import Siblings
from .depth import DEPTH, effective_depth
from .record import StepRecord

__all__ = ["HEALTH", "health"]

#: The derived health figures, in the order the record holds them.
HEALTH = ("grad_to_weight_early", "skip_share_min", "transmission_end_to_end", *DEPTH)


def health(record: StepRecord, kinds: Mapping[str, str] | None = None,
           forward: Mapping[str, int] | None = None, measurements: Measurements | None = None,
           siblings: Siblings | None = None) -> dict[str, float]:
    """The :data:`HEALTH` figures of ``record`` (``kinds``: layer kinds, ``forward``: forward order,
    ``siblings``: the layers that read one input, as the rules receive them; ``measurements``: the rules' own
    :class:`Measurements` of ``record``, made with the same ``kinds``, ``forward`` and ``siblings``, whose
    statistics are then reused)."""
    m = measurements if measurements is not None else \
        Measurements.from_record(record, kinds or {}, forward or {}, siblings)
    er = early_ratio_shown(m)
    out = {
        "grad_to_weight_early": er.ratio if er is not None else math.nan,
        "skip_share_min": _nanmin(record.block("skip_share")) if record.blocks else math.nan,
        "transmission_end_to_end": _end_to_end(record),
    }
    if record.blocks:
        out.update(effective_depth(record.blocks, record.block("skip_grad"), record.block("branch_grad")))
    else:
        out.update(dict.fromkeys(DEPTH, math.nan))
    return out


def _nanmin(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.min()) if finite.size else math.nan


def _end_to_end(record: StepRecord) -> float:
    if not record.blocks:
        return math.nan
    first, last = record.block("grad_in")[0], record.block("grad_out")[-1]
    if not (np.isfinite(first) and np.isfinite(last)) or last <= 0:
        return math.nan
    return float(first / last)
