"""Fused norm computation and the ratios built from it.

Everything here runs on the device and ends in ONE small vector that the caller moves to the host once per
logging step. Norms are computed in float32 whatever the tensor dtype. A :class:`NormPlan`, made once for a
fixed list of tensors, decides how: GPU tensors take one ``torch._foreach_norm`` per (device, dtype) group (the
idiom of ``torch.nn.utils.clip_grad_norm_``: a multi-tensor kernel, a few launches for any number of tensors).
On a CPU ``_foreach_norm`` is a loop of one op per tensor whose dispatch (~3-4 us) is the whole cost for small
tensors, so small CPU tensors of one shape are stacked and reduced along the stack in one op instead
(1,202-tensor Linear+LayerNorm stack: 0.65 ms instead of 2.8-4.8 ms for its gradients). The trade is a copy of
those tensors (one read, one write), cheap for small tensors only, which is why large ones keep the loop.

Under torch.distributed with DTensor parameters (FSDP2, HSDP, tensor parallel) each rank computes the squared
norms of its local shards; :func:`reduce_squared` sums each tensor's over exactly the mesh dimensions it is
split along (:func:`shard_dims`), one ``all_reduce`` of the stacked vector per dimension.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
import torch
import torch.distributed as dist

from .._compat import (
    foreach_copy, foreach_copy_, foreach_norm_f32, foreach_sub_, is_dtensor, is_shard, partial_op, vector_norm_f32,
)

__all__ = [
    "NormPlan",
    "local_tensor",
    "shard_dims",
    "partial_dims",
    "summed_partials",
    "squared_norms",
    "reduce_squared",
    "safe_ratio",
    "segment_sum",
]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` that lives on this rank: the local shard of a DTensor, else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def shard_dims(t: torch.Tensor) -> list[tuple[Any, int]]:
    """The (device mesh, mesh dimension) pairs ``t`` is split along: its squared norm is the sum of its
    shards' over exactly those dimensions, and over none on which it is replicated (a DTensor replicated over
    one dimension of a 2-D mesh, e.g. HSDP's replicas or a LayerNorm under tensor parallel). Empty for a plain
    tensor."""
    if not is_dtensor(t):
        return []
    return [(t.device_mesh, d) for d, placement in enumerate(t.placements) if is_shard(placement)]


def partial_dims(t: torch.Tensor) -> list[tuple[Any, int, str]]:
    """The (device mesh, mesh dimension, reduction) of each ``Partial`` placement of ``t``: there each rank
    holds a term of the tensor, not a piece (a LayerNorm's gradient under sequence parallel), and the norm of
    a sum is not a sum of norms. Empty for a plain tensor."""
    if not is_dtensor(t):
        return []
    out = []
    for d, placement in enumerate(t.placements):
        op = partial_op(placement)
        if op is not None:
            out.append((t.device_mesh, d, op))
    return out


_REDUCE_OPS = {"sum": "SUM", "avg": "SUM", "max": "MAX", "min": "MIN"}


def summed_partials(tensors: Sequence[torch.Tensor], which: Sequence[int]) -> list[torch.Tensor]:
    """The local tensors of ``tensors``, those in ``which`` with their ``Partial`` mesh dimensions reduced
    (:func:`partial_dims`): copies, the gradients themselves are left as they are. One ``all_reduce`` per
    process group and reduction, of all its tensors at once in one flat buffer (a collective per tensor would
    cost a launch each; the buffer costs one copy of tensors that are small: norms' weights and biases)."""
    local = [local_tensor(t) for t in tensors]
    pending: dict[tuple, tuple[Any, str, int, list[int]]] = {}
    for i in which:
        for mesh, d, op in partial_dims(tensors[i]):
            group = mesh.get_group(d)
            key = (tuple(dist.get_process_group_ranks(group)), op)
            pending.setdefault(key, (group, op, mesh.size(d), []))[3].append(i)
    for group, op, size, idx in pending.values():
        flat = torch.cat([local[i].reshape(-1) for i in idx])
        dist.all_reduce(flat, op=getattr(dist.ReduceOp, _REDUCE_OPS.get(op, "SUM")), group=group)
        if op == "avg":
            flat /= size
        for i, piece in zip(idx, flat.split([local[i].numel() for i in idx])):
            local[i] = piece.view(local[i].shape)
    return local


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

    Tensors are grouped as :class:`NormPlan` says (one fused op per group). The result lives on the device of
    the first tensor; nothing is synchronised with the host.

    >>> squared_norms([torch.ones(4), torch.full((2,), 3.0)])
    tensor([ 4., 18.])
    """
    tensors = [_dense_values(local_tensor(t)) for t in tensors]
    return NormPlan(tensors).squared(tensors)


# Stacking copies each tensor once, so it pays only for small tensors, several at once: the loop costs ~3-4 us
# a tensor, a copy of 64K floats ~10 us. On ResNet-56 (tensors of 2K-37K elements) limits of 4K to 64K gave the
# same logging step within noise (3.4-3.6 ms for begin + finish); the 1,202-tensor stack needs at least 4K.
_STACK_MAX_NUMEL = 1 << 16
_STACK_MIN_COUNT = 4
# CPU buffers kept between logging steps, per group; above this, page faults are small beside the copy itself.
_KEEP_MAX_BYTES = 1 << 28


class NormPlan:
    """How to take the squared norms of one list of tensors, decided once from their shapes, dtypes and devices.

    Grouping is Python work per tensor, the very cost a plan avoids on every logging step; a plan made from a
    parameter list also serves their gradients (torch keeps a dense gradient's shape, dtype and device equal to
    its parameter's) and their change over an optimizer step. Tensors must be strided (see ``_dense_values``).
    A call that no longer fits the tensors (a model moved or resized after the plan was made) raises; the caller
    makes a new plan.

    CPU groups keep their buffers (the stacks, the snapshot) between calls: a fresh multi-megabyte CPU tensor
    is fresh pages from the OS, and faulting them in cost more than the norms (4 ms instead of 1 ms for the
    1,202-tensor stack). That holds up to ~2x their size in host memory, so groups over 256 MB (CPU-offloaded
    shards of a large model) allocate per call, as GPU groups do: there the caching allocator reuses the
    memory, and a copy of the weights is held only while a logging step is in flight.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.size = len(tensors)
        self.device = tensors[0].device if tensors else torch.device("cpu")
        stacks, loose = _grouped(tensors)
        self.stacks = [_Group(idx, stacked=True, keep=_keeps(tensors, idx)) for idx in stacks]
        self.loose = [_Group(idx, stacked=False, keep=_keeps(tensors, idx)) for idx in loose]
        order = [i for g in self.stacks + self.loose for i in g.idx]
        self._inverse = None
        if order != list(range(self.size)):
            inverse = torch.empty(self.size, dtype=torch.long)
            inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(self.size)
            self._inverse = inverse.to(self.device)

    def squared(self, tensors: Sequence[torch.Tensor], snapshot: bool = False) -> torch.Tensor:
        """Squared L2 norm of each of ``tensors``, float32, in input order, on the plan's device. ``snapshot``:
        also copy them (weights before an optimizer step) for :meth:`squared_change`, one at a time; the norms
        are then read from the copy, so a stack is built once for both."""
        with torch.no_grad():
            if snapshot:
                parts = [_rows_squared(g.save(tensors)) for g in self.stacks]
                parts += [_each_squared(g.save(tensors)) for g in self.loose]
            else:
                parts = [_rows_squared(g.stack(tensors)) for g in self.stacks]
                parts += [_each_squared(g.pick(tensors)) for g in self.loose]
            return self._ordered(parts)

    def squared_change(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Squared L2 norm of ``tensors`` minus their snapshot (``squared(snapshot=True)``) per tensor. The
        snapshot is overwritten with the negated change in place (no second set of tensors) and released where it
        is not kept."""
        with torch.no_grad():
            parts = [_rows_squared(g.change(tensors)) for g in self.stacks]
            parts += [_each_squared(g.change(tensors)) for g in self.loose]
            return self._ordered(parts)

    def _ordered(self, parts: list[torch.Tensor]) -> torch.Tensor:
        parts = [p.to(self.device) for p in parts]
        if not parts:
            return torch.zeros(0, device=self.device)
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]
        if flat.numel() != self.size:
            raise RuntimeError(f"NormPlan for {self.size} tensors got {flat.numel()}")
        return flat if self._inverse is None else flat[self._inverse]


def _grouped(tensors: Sequence[torch.Tensor]) -> tuple[list[list[int]], list[list[int]]]:
    """Indices of the stacks (several small CPU tensors of one shape and dtype) and of the loose groups (the
    rest, by device and dtype)."""
    stacks: dict[tuple, list[int]] = defaultdict(list)
    loose: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        if t.device.type == "cpu" and 0 < t.numel() <= _STACK_MAX_NUMEL:
            stacks[(t.shape, t.dtype)].append(i)
        else:
            loose[(t.device, t.dtype)].append(i)
    for key in [k for k, idx in stacks.items() if len(idx) < _STACK_MIN_COUNT]:
        loose[(torch.device("cpu"), key[1])].extend(stacks.pop(key))
    return list(stacks.values()), [sorted(idx) for idx in loose.values()]


def _keeps(tensors: Sequence[torch.Tensor], idx: list[int]) -> bool:
    """Whether a group holds its buffers between calls: CPU groups up to _KEEP_MAX_BYTES."""
    first = tensors[idx[0]]
    return first.device.type == "cpu" and sum(tensors[i].numel() for i in idx) * first.element_size() <= _KEEP_MAX_BYTES


class _Group:
    """Tensors of one plan that take one op together: a stack (one CPU shape and dtype, reduced along the stack)
    or a loose group (one device and dtype, ``_foreach`` ops). ``keep``: hold buffers between calls."""

    __slots__ = ("idx", "stacked", "keep", "_buf", "_saved")

    def __init__(self, idx: list[int], stacked: bool, keep: bool) -> None:
        self.idx, self.stacked, self.keep = idx, stacked, keep
        self._buf: torch.Tensor | None = None  # a stack's scratch (the stacked gradients or weights)
        self._saved: Any = None  # the snapshot: a stacked tensor, or a list of copies

    def pick(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [tensors[i] for i in self.idx]

    def stack(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The group's tensors stacked into the scratch buffer (valid until the next call)."""
        picked = self.pick(tensors)
        if _fits(self._buf, picked[0]):
            return torch.stack(picked, out=self._buf)
        buf = torch.stack(picked)
        if self.keep:
            self._buf = buf
        return buf

    def save(self, tensors: Sequence[torch.Tensor]) -> Any:
        """Copy the group's tensors into the snapshot, and return it."""
        picked, saved = self.pick(tensors), self._saved
        if self.stacked:
            self._saved = torch.stack(picked, out=saved) if _fits(saved, picked[0]) else torch.stack(picked)
        elif saved is not None and _fits(saved[0], picked[0], stacked=False):
            foreach_copy_(saved, picked)
        else:
            self._saved = foreach_copy(picked)
        return self._saved

    def change(self, tensors: Sequence[torch.Tensor]) -> Any:
        saved = self._saved
        if saved is None:
            raise RuntimeError("NormPlan.squared_change without a snapshot")
        if not self.keep:
            self._saved = None
        if self.stacked:
            return saved.sub_(self.stack(tensors))
        return foreach_sub_(saved, self.pick(tensors))


def _fits(buf: torch.Tensor | None, t: torch.Tensor, stacked: bool = True) -> bool:
    """Whether a kept buffer still fits ``t`` (the first tensor of its group): same dtype, device and shape."""
    if buf is None or buf.dtype != t.dtype or buf.device != t.device:
        return False
    return (buf.shape[1:] if stacked else buf.shape) == t.shape


def _each_squared(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(foreach_norm_f32(tensors)).square()


def _rows_squared(stacked: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each row of a stack of equal tensors, float32 (one reduction for the whole stack)."""
    return vector_norm_f32(stacked.reshape(stacked.shape[0], -1), dim=1).square()


def reduce_squared(values: torch.Tensor, sums: Sequence[tuple[Any, bool, torch.Tensor]],
                   world_tail: int = 0, tail_group: Any = None) -> torch.Tensor:
    """Sum entries of ``values`` over process groups, one ``all_reduce`` per group, leaving the others alone.

    ``world_tail``: first sum the last that many entries over ``tail_group`` (None: the world), alone (each
    rank's own activation-gradient norms, when no ``sums`` reach every rank of its pipeline stage). Then each of ``sums`` is ``(group, first,
    mask)``: the entries under ``mask`` are summed over ``group``'s ranks; the others are kept by the group's
    first rank only (``first``) before the sum, so the sum returns them unchanged. Entries must be equal across
    a group's ranks unless summed over it (a replicated tensor's norm is; so is anything already summed over
    the world).
    """
    if not (sums or world_tail) or not (dist.is_available() and dist.is_initialized()):
        return values
    values = values.contiguous()
    if world_tail:
        dist.all_reduce(values[len(values) - world_tail:], op=dist.ReduceOp.SUM, group=tail_group)  # in place
    for group, first, mask in sums:
        if not first:
            values = torch.where(mask.to(values.device), values, torch.zeros_like(values)).contiguous()
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


def safe_ratio(num: ArrayLike, den: ArrayLike) -> np.ndarray:
    """``num / den`` elementwise; NaN where ``den == 0`` (the ratio is undefined there), with no warning."""
    n = np.asarray(num, dtype=np.float64)
    d = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(n, d).shape, np.nan)
    np.divide(n, d, out=out, where=d != 0)
    return out


def segment_sum(values: np.ndarray, segments: np.ndarray, n: int) -> np.ndarray:
    """Sum ``values`` into ``n`` bins by ``segments`` (float64; NaN and Inf propagate to their bin)."""
    return np.bincount(segments, weights=np.asarray(values, dtype=np.float64), minlength=n)
