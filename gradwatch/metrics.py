"""Fused norm computation and the ratios built from it.

Everything here runs on the device and ends in ONE small vector that the caller moves to the host once per
logging step. Norms are computed in float32 whatever the tensor dtype, one ``torch._foreach_norm`` per
(device, dtype) group (the idiom of ``torch.nn.utils.clip_grad_norm_``).

Under torch.distributed with FSDP2 (DTensor parameters) each rank computes the squared norms of its local
shards; :func:`reduce_squared` sums them over ranks with one ``all_reduce`` of the stacked vector.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from ._compat import DTensor, Shard, foreach_norm_f32

__all__ = [
    "local_tensor",
    "is_sharded",
    "squared_norms",
    "reduce_squared",
    "safe_ratio",
    "segment_sum",
]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` that lives on this rank: the local shard of a DTensor, else ``t`` itself."""
    if DTensor is not None and isinstance(t, DTensor):
        return t.to_local()
    return t


def is_sharded(t: torch.Tensor) -> bool:
    """True when ``t`` is a DTensor split across ranks (its squared norm must be summed over ranks)."""
    if DTensor is None or not isinstance(t, DTensor):
        return False
    return any(isinstance(p, Shard) for p in t.placements)


def _dense_values(t: torch.Tensor) -> torch.Tensor:
    """A strided tensor with the same L2 norm: the stored values of a sparse tensor (e.g. the gradient of
    ``nn.Embedding(sparse=True)``), which ``_foreach_norm`` cannot take."""
    if t.layout == torch.strided:
        return t
    if t.layout == torch.sparse_coo:
        return t.coalesce().values()  # coalescing sums duplicate indices, as the dense tensor would
    return t.values()  # compressed layouts (CSR, CSC, BSR, BSC) store each entry once


def squared_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared L2 norm of each tensor, in float32, as one 1-D tensor in input order.

    Tensors are grouped by (device, dtype) and each group takes one fused ``torch._foreach_norm``. The
    result lives on the device of the first tensor; nothing is synchronised with the host.

    >>> squared_norms([torch.ones(4), torch.full((2,), 3.0)])
    tensor([ 4., 18.])
    """
    tensors = [_dense_values(local_tensor(t)) for t in tensors]
    if not tensors:
        return torch.zeros(0)
    target = tensors[0].device
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    if len(groups) == 1:
        return torch.stack(foreach_norm_f32(tensors)).square()
    parts, order = [], []
    for idx in groups.values():
        parts.append(torch.stack(foreach_norm_f32([tensors[i] for i in idx])).to(target))
        order.extend(idx)
    grouped = torch.cat(parts).square()
    if order == sorted(order):
        return grouped
    # Callers that pass tensors sorted by (device, dtype) never get here; the others pay one index copy.
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return grouped[inverse.to(target)]


def reduce_squared(values: torch.Tensor, sharded: torch.Tensor | None) -> torch.Tensor:
    """Sum squared norms of sharded tensors over ranks with one ``all_reduce``; leave the others alone.

    ``sharded`` is a boolean mask over ``values`` (None: nothing is sharded, no communication). Entries of
    replicated tensors are kept on rank 0 only before the sum, so the sum returns them unchanged.
    """
    if sharded is None or not (dist.is_available() and dist.is_initialized()):
        return values
    if dist.get_rank() != 0:
        values = torch.where(sharded.to(values.device), values, torch.zeros_like(values))
    values = values.contiguous()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` elementwise; NaN where ``den == 0`` (the ratio is undefined there), with no warning."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def segment_sum(values: np.ndarray, segments: np.ndarray, n: int) -> np.ndarray:
    """Sum ``values`` into ``n`` bins by ``segments`` (float64; NaN and Inf propagate to their bin)."""
    out = np.zeros(n, dtype=np.float64)
    np.add.at(out, segments, values)
    return out
