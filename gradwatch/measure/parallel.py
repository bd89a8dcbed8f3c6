"""How the ranks of a torch.distributed job divide the work, as far as block flow needs to know it.

Parameter norms need only each tensor's own placements (:func:`~gradwatch.measure.norms.shard_dims`). Block
flow reads *activation* gradients, plain tensors that carry no placement, so the layout is inferred:

- **Model-parallel mesh dimensions** (tensor, sequence, context parallel) are those on which the DTensor
  parameters are placed in a mix of ways: a tensor-parallel plan shards some weights by rows, some by
  columns and replicates norms and biases. A data-parallel dimension places every parameter alike: all
  replicated (HSDP's replicas) or all split along their first dimension (FSDP2's shards). The data-parallel
  degree is the world size over the model-parallel ones (DDP, with no DTensors: the world).
- **A residual stream is replicated over a model-parallel dimension exactly when its gradient norms agree
  across that dimension's ranks** (tensor parallel without sequence parallel: every rank holds the whole
  activation) and sharded when they differ (sequence parallel: each holds its part of the sequence). Read
  once per set of blocks from the norms themselves, one small collective per model-parallel dimension.

The exact value is the norm the unsharded model gives over the global batch with a mean loss: the squares of
the distinct shards summed, divided by the data-parallel degree squared (each rank's loss is a mean over its
own micro-batch, so its activation gradients are the degree times the global batch's; DDP and FSDP average
parameter gradients the same way). Under pipeline parallel all this holds within a stage. :class:`FlowWeights` gives each rank's factor per entry, so one world sum
of the weighted squares is that value.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .._compat import is_dtensor, is_replicate

log = logging.getLogger("gradwatch")

__all__ = ["FlowWeights", "Parallelism"]

# Shards of a sequence agreeing to this precision would be a coincidence; replicas agree exactly (the
# all-reduce that makes them hands every rank the same bits), up to this for reductions that round differently.
_SAME = 1e-6
_MAX_CHECKS = 8  # logging steps on which an all-zero entry (nothing to tell replicas from shards by) is re-read


class Parallelism:
    """The model-parallel mesh dimensions (as process groups) and the data-parallel degree of a run."""

    def __init__(self, params: Sequence[torch.Tensor], world: int | None = None) -> None:
        world = world or dist.get_world_size()  # a pipeline stage's ranks, when there are stages
        kinds: dict[tuple[int, ...], tuple[Any, int, set[str]]] = {}
        for p in params:
            if not is_dtensor(p):
                continue
            for d, placement in enumerate(p.placements):
                ranks = tuple(dist.get_process_group_ranks(p.device_mesh.get_group(d)))
                kinds.setdefault(ranks, (p.device_mesh, d, set()))[2].add(_kind(placement))
        #: (process group, this rank's index in it, size) of each model-parallel mesh dimension
        self.model_parallel = [(mesh.get_group(d), mesh.get_local_rank(d), mesh.size(d))
                               for mesh, d, seen in kinds.values() if len(seen) > 1 or seen == {"other"}]
        self.dp = max(1, world // math.prod(size for _, _, size in self.model_parallel))


def _kind(placement: Any) -> str:
    if is_replicate(placement):
        return "replicate"
    if getattr(placement, "dim", None) == 0:  # Shard(0), and FSDP2's strided shard of a TP parameter
        return "first"
    return "other"  # a shard along another dimension, or a Partial


class FlowWeights:
    """Each rank's factor on its squared flow norms, per entry, so that their world sum is the global value:
    ``1 / dp**2``, or 0 on the ranks that hold a second copy of a replicated entry."""

    def __init__(self, parallel: Parallelism) -> None:
        self.parallel = parallel
        self._known: dict[tuple[str, ...], torch.Tensor] = {}
        self._checks: dict[tuple[str, ...], int] = {}

    def of(self, names: tuple[str, ...], squares: torch.Tensor) -> torch.Tensor:
        """The factors for this step's squared norms ``squares`` of blocks ``names`` (4 entries each). The
        first call for a set of names reads the replication from ``squares`` (collectives); later ones reuse it."""
        known = self._known.get(names)
        if known is not None:
            return known
        base = torch.full_like(squares, 1.0 / self.parallel.dp ** 2)
        undecided = torch.zeros(squares.shape, dtype=torch.bool, device=squares.device)
        for group, local_rank, _ in self.parallel.model_parallel:
            replicated, zero = _replicated(squares, group)
            if local_rank != 0:
                base = torch.where(replicated, torch.zeros_like(base), base)
            undecided |= zero
        checks = self._checks.get(names, 0) + 1
        if not bool(undecided.any()) or checks >= _MAX_CHECKS:
            self._known[names] = base
            self._checks.pop(names, None)
        else:  # an all-zero entry shows nothing: read it again next time
            self._checks[names] = checks
        return base


def _replicated(squares: torch.Tensor, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Which entries are equal on every rank of ``group`` (and which are zero on all of them), with one
    all_reduce: the maximum of the values and of their negatives."""
    both = torch.cat([squares, -squares]).to(torch.float64)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    high, low = both[: len(squares)], -both[len(squares):]
    zero = high == 0
    return (high - low <= _SAME * high) & ~zero, zero
