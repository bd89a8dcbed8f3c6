"""From gradients on the device to one :class:`~gradwatch.StepRecord` on the host.

:class:`Meter` does the arithmetic of a logging step in two halves, so that a monitor driven by an optimizer
can snapshot weights before ``optimizer.step()`` and read the update after it:

- :meth:`Meter.begin`: fused squared norms of the gradients and weights, on the device (no host sync);
- :meth:`Meter.finish`: the update norms, block-flow norms and AMP overflow flag joined into ONE vector,
  one ``all_reduce`` per mesh dimension the parameters are split along (plus one over the world for the ranks'
  flow norms when none of those spans it), ONE device-to-host transfer, then per layer sums and ratios in
  numpy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist

from .._compat import is_dtensor, scale_tensor, unscales_in_step
from ..flow import FlowBatch, flow_metrics
from .layouts import Fsdp1Shards
from ..names import short_list
from ..record import StepRecord
from .layers import Selection
from .norms import (
    NormPlan, local_tensor, partial_dims, reduce_squared, safe_ratio, segment_sum, shard_dims, squared_norms,
    summed_partials,
)
from .parallel import FlowWeights, Parallelism
from .stages import Stages

log = logging.getLogger("gradwatch")

__all__ = ["Meter", "Pending", "amp_grad_scale", "loss_scale"]


def amp_grad_scale(optimizer: Any, scaler: Any) -> Any:
    """What to divide ``optimizer``'s gradients by before its step under an AMP ``GradScaler``: the loss scale
    (a device tensor: no host sync) when the optimizer unscales inside its own step (``fused=True``
    optimizers), else None (``scaler.unscale_`` has run, or no scaler). For ``StepDriver.begin(grad_scale=)`` (:mod:`gradwatch.driver`).
    """
    return loss_scale(scaler) if unscales_in_step(optimizer) else None


def loss_scale(scaler: Any) -> Any:
    """An AMP ``GradScaler``'s current loss scale as a device tensor when it offers one (no host sync), else a
    float; None when there is no scaler or it is disabled. For integrations that must relate gradients seen
    before ``unscale_`` to gradients seen after it."""
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return None
    return scale_tensor(scaler)


@dataclass
class Pending:
    """On-device results of a measurement whose host transfer waits for the end of the optimizer step."""

    step: int
    kept: list[int]  # indices into Selection.params that had a gradient
    parts: list[torch.Tensor]  # squared norms: grads, weights
    snapshot: bool  # the layout's plan holds the weights from before the optimizer step (update_to_weight)
    found_inf: torch.Tensor | None  # AMP overflow flag: the optimizer will skip this step
    flow: FlowBatch | None = None  # block-flow norms: they join the same transfer
    layout: _Layout | None = None  # what is known about the measured tensors (kept)


_STRIDED = {torch.strided}


class _Layout:
    """Everything about one set of measured parameters that does not change between logging steps, worked out
    once: per-tensor Python work (grouping, shard checks, segment ids) is what a logging step must not repeat
    on a 1,000-tensor model. The placements of the gradients are read from the first step's: they follow from
    the model and its parallel plan, not from the data."""

    def __init__(self, selection: Selection, kept: list[int], grads: Sequence[torch.Tensor],
                 dims: Any = shard_dims) -> None:
        self.whole = len(kept) == len(selection.params)
        self.kept = kept
        params = self.params(selection)
        # One (mesh, dimension) per way the tensors are split, with which gradients and which weights are split
        # along it: their squares are summed over that dimension's ranks, and over no dimension they are
        # replicated on. A gradient may be placed unlike its weight (a Replicate gradient of a Shard(0)
        # embedding under tensor parallel; a Partial one, summed first: summed_partials); a plain gradient
        # of a plain parameter is split as the parameter is (``dims``: FSDP1's original parameters). Keyed by
        # the ranks that dimension's group holds: each parameter may carry its own mesh object (FSDP2 per
        # module), and summing one group's entries twice would double them.
        split: dict[tuple[int, ...], tuple[Any, int, list[bool], list[bool]]] = {}
        for i, (g, p) in enumerate(zip(grads, params)):
            for row, found in ((0, shard_dims(g) if is_dtensor(g) else dims(p)), (1, dims(p))):
                for mesh, dim in found:
                    ranks = tuple(dist.get_process_group_ranks(mesh.get_group(dim)))
                    _, _, split_grads, split_weights = split.setdefault(
                        ranks, (mesh, dim, [False] * len(params), [False] * len(params)))
                    (split_grads, split_weights)[row][i] = True
        self.splits = list(split.values())
        self.partial = [i for i, g in enumerate(grads) if partial_dims(g)]
        self._sums: dict[tuple[int, int, bool], tuple[list[tuple[Any, bool, torch.Tensor]], int]] = {}
        self.local = any(local_tensor(p) is not p for p in params)  # DTensors: measure their local shards
        self.plan = NormPlan([local_tensor(p) for p in params])
        same = all(local_tensor(g).shape == local_tensor(p).shape for g, p in zip(grads, params))
        self.grad_plan = self.plan if same else NormPlan([local_tensor(g) for g in grads])
        n = len(selection.names)
        self.seg = np.asarray([selection.segments[i] for i in kept], dtype=np.int64)
        self.present = np.bincount(self.seg, minlength=n) > 0
        self.layers = tuple(selection.names[j] for j in np.flatnonzero(self.present))

    def sums(self, n_parts: int, n_flow: int, sync: bool, stage: int,
             device: torch.device) -> tuple[list[tuple[Any, bool, torch.Tensor]], int]:
        """The groups a logging step's vector is summed over (:func:`_sums`), worked out once per shape."""
        key = (n_parts, n_flow, sync)
        if key not in self._sums:
            self._sums[key] = _sums(self.splits, n_parts, len(self.kept), n_flow, sync, stage, device)
        return self._sums[key]

    def params(self, selection: Selection) -> Sequence[torch.Tensor]:
        """The measured parameters (the selection's own list when every one is measured: no copy)."""
        return selection.params if self.whole else [selection.params[i] for i in self.kept]

    def tensors(self, tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        return [local_tensor(t) for t in tensors] if self.local else tensors

    def grads(self, grads: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """The local gradients, with Partial ones reduced (one collective per group: only when there are any)."""
        return summed_partials(grads, self.partial) if self.partial else self.tensors(grads)


class Meter:
    """Measures the parameters of a :class:`~gradwatch.measure.layers.Selection` (and carries block-flow norms along).

    ``sync_ranks``: sum the block-flow norms over ranks into the global batch's (:mod:`.parallel`), in the
    same ``all_reduce`` where one reaches every rank.
    ``fsdp1``: the FSDP1 ``use_orig_params=True`` units' shard groups (:mod:`gradwatch.measure.layouts`).
    """

    def __init__(self, selection: Selection, sync_ranks: bool = False, fsdp1: Fsdp1Shards | None = None) -> None:
        self.selection = selection
        self.sync_ranks = sync_ranks
        self.fsdp1 = fsdp1
        self._layouts: dict[tuple[int, ...], _Layout] = {}
        self._reported_missing: set[str] = set()
        self._flow_weights: FlowWeights | None = None
        self.stages = Stages()

    def has_gradients(self) -> bool:
        """Whether any measured parameter has a ``.grad`` (a Python check: no device work)."""
        return any(p.grad is not None for p in self.selection.params)

    def begin(
        self,
        step: int,
        flow: FlowBatch | None = None,
        *,
        grad_scale: torch.Tensor | float | None = None,
        found_inf: torch.Tensor | None = None,
        snapshot: bool = False,
    ) -> Pending | None:
        """Squared norms on the device; None when there is nothing to measure (no gradient, no flow)."""
        sel = self.selection
        all_grads = self.fsdp1.grads(sel.params) if self.fsdp1 is not None else [p.grad for p in sel.params]
        kept = [i for i, g in enumerate(all_grads) if g is not None]
        self._report_missing(kept)
        if not kept:
            return None if flow is None else Pending(step, [], [], False, found_inf, flow)
        grads = cast("list[torch.Tensor]", [all_grads[i] for i in kept])
        try:
            return self._measure(step, kept, grads, flow, grad_scale, found_inf, snapshot)
        except RuntimeError:  # the plan no longer fits (the model was moved or resized): make new ones, once
            self._layouts.clear()
            return self._measure(step, kept, grads, flow, grad_scale, found_inf, snapshot)

    def _measure(self, step: int, kept: list[int], grads: list[torch.Tensor], flow: FlowBatch | None,
                 grad_scale: Any, found_inf: Any, snapshot: bool) -> Pending:
        sel = self.selection
        layout = self._layout(kept, grads)
        params = layout.params(sel)
        weights = layout.tensors(params)
        if {g.layout for g in grads} == _STRIDED:
            g_sq = layout.grad_plan.squared(layout.grads(grads))
        else:  # sparse gradients (nn.Embedding(sparse=True)): the general path
            g_sq = squared_norms(grads)
        if grad_scale is not None:
            scale = torch.as_tensor(grad_scale, dtype=torch.float32).to(g_sq.device)
            g_sq = g_sq / scale.square()
        w_sq = layout.plan.squared(weights, snapshot=snapshot)
        return Pending(step, kept, [g_sq, w_sq], snapshot, found_inf, flow, layout)

    def _layout(self, kept: list[int], grads: Sequence[torch.Tensor]) -> _Layout:
        key = tuple(kept)
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) > 8:  # parameters keep changing which have gradients: do not grow without bound
                self._layouts.clear()
            layout = self._layouts[key] = _Layout(self.selection, kept, grads,
                                                  self.fsdp1.dims if self.fsdp1 is not None else shard_dims)
        return layout

    def finish(self, pending: Pending) -> StepRecord | None:
        """The record of ``pending``; None when the AMP scaler skipped the step (its gradients overflowed)."""
        sel = self.selection
        parts = list(pending.parts)
        layout = pending.layout
        if pending.snapshot and layout is not None:  # a snapshot implies a layout (something was measured)
            parts.append(layout.plan.squared_change(layout.tensors(layout.params(sel))))
        flow = pending.flow.values if pending.flow is not None else None
        names = tuple(pending.flow.names) if pending.flow is not None else ()
        stacked, n_flow = self._join(parts, flow, names, layout)
        if pending.found_inf is not None:
            found = pending.found_inf.detach().reshape(1).to(device=stacked.device, dtype=stacked.dtype)
            stacked = torch.cat([stacked, found])
        host = stacked.cpu().numpy().astype(np.float64)  # the one device-to-host transfer
        if pending.found_inf is not None:
            if host[-1] > 0:
                log.debug("gradwatch: step %d skipped by the AMP scaler; not recorded", pending.step)
                return None
            host = host[:-1]
        flow_host = host[len(host) - n_flow:] if n_flow else None
        host = host[: len(host) - n_flow]
        layers, columns, whole = self._layer_metrics(layout, host.reshape(len(parts), len(pending.kept)))
        blocks: Sequence[str] = ()
        block_columns = None
        if flow_host is not None and pending.flow is not None:  # flow norms were transferred only with a flow
            blocks, block_columns = pending.flow.names, flow_metrics(flow_host)
        lost = pending.flow.lost if pending.flow is not None else ()
        return StepRecord.build(pending.step, layers, columns, whole, blocks, block_columns, lost)

    def _join(self, parts: list[torch.Tensor], flow: torch.Tensor | None, names: tuple[str, ...],
              layout: _Layout | None) -> tuple[torch.Tensor, int]:
        """Parameter and flow norms in one vector, all-reduced once per mesh dimension the parameters are split
        along (and once over the world for the flow norms, unless those dimensions reach every rank)."""
        stacked = torch.cat(parts) if parts else torch.zeros(0, device=flow.device if flow is not None else None)
        n_flow = 0 if flow is None else flow.numel()
        every_rank = self.sync_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if every_rank and not self.stages.found:  # the first logging step: are there pipeline stages?
            self.stages.find(tuple(self.selection.names), stacked.device)
        sync = bool(n_flow) and every_rank and self.stages.size != 1  # a stage of one rank has nothing to sum
        if flow is not None and n_flow:
            dtype = torch.promote_types(stacked.dtype, flow.dtype)
            flow = flow.to(device=stacked.device, dtype=dtype)
            if sync:  # each rank saw its own activations: weighted squares, summed over ranks below
                flow = flow.square()
                flow = flow * self._weights().of(names, flow.reshape(-1)).reshape(flow.shape).to(dtype)
            stacked = torch.cat([stacked.to(dtype), flow.reshape(-1)])
        if (layout is not None and layout.splits) or sync:
            splits = layout.splits if layout is not None else []
            n_params = len(layout.kept) if layout is not None else 0
            stage = self.stages.size or dist.get_world_size()
            sums, world_tail = layout.sums(len(parts), n_flow, sync, stage, stacked.device) if layout is not None \
                else _sums(splits, len(parts), n_params, n_flow, sync, stage, stacked.device)
            stacked = reduce_squared(stacked, sums, world_tail, self.stages.group)
            if sync:
                stacked = torch.cat([stacked[:-n_flow], stacked[-n_flow:].sqrt()])
        return stacked, n_flow

    def _weights(self) -> FlowWeights:
        if self._flow_weights is None:
            self._flow_weights = FlowWeights(Parallelism(self.selection.params, self.stages.size or None))
        return self._flow_weights

    def merge(self, record: StepRecord, kinds: dict[str, str]) -> StepRecord:
        """``record`` with every pipeline stage's layers and blocks (:mod:`.stages`); itself without stages."""
        return self.stages.merge(record, kinds)

    def _layer_metrics(self, layout: _Layout | None, sq: np.ndarray):
        """Per-unit norms and ratios from per-tensor squared norms (rows: grads, weights[, updates])."""
        if layout is None:
            return (), {}, {}
        n = len(self.selection.names)

        def per_unit(row: np.ndarray) -> tuple[np.ndarray, float]:
            return np.sqrt(segment_sum(row, layout.seg, n))[layout.present], float(np.sqrt(row.sum()))

        (grad, g_all), (weight, w_all) = per_unit(sq[0]), per_unit(sq[1])
        columns = {"grad_norm": grad, "weight_norm": weight, "grad_to_weight": safe_ratio(grad, weight)}
        whole = {"grad_norm": g_all, "weight_norm": w_all, "grad_to_weight": float(safe_ratio(g_all, w_all))}
        if sq.shape[0] > 2:
            update, u_all = per_unit(sq[2])
            columns["update_to_weight"] = safe_ratio(update, weight)
            whole["update_to_weight"] = float(safe_ratio(u_all, w_all))
        return layout.layers, columns, whole

    def _report_missing(self, kept: list[int]) -> None:
        if len(kept) == len(self.selection.params):
            return
        have = set(kept)
        new = [name for i, name in enumerate(self.selection.param_names)
               if i not in have and name not in self._reported_missing]
        if new:
            self._reported_missing.update(new)
            log.info("gradwatch: %d parameter(s) have no gradient (.grad is None) and are skipped: %s",
                     len(new), short_list(new))


def _sums(splits: list[tuple[Any, int, list[bool], list[bool]]], n_parts: int, n_params: int, n_flow: int,
          sync: bool, stage: int, device: torch.device) -> tuple[list[tuple[Any, bool, torch.Tensor]], int]:
    """The groups :func:`~gradwatch.measure.norms.reduce_squared` sums over, one per mesh dimension the
    parameters are split along (rows: gradients, then weights and updates), and how many trailing entries
    (the flow norms) it sums over the ranks of the pipeline stage (``stage`` of them: the world without a
    pipeline) first. The flow norms ride along instead when the split dimensions are the dimensions of one mesh
    that together hold every rank of the stage (1-D FSDP, FSDP x TP): one collective fewer."""
    ride = _covering(splits, stage) if sync else None
    out: list[tuple[Any, bool, torch.Tensor]] = []
    for i, (mesh, dim, grads, weights) in enumerate(splits):
        flow = [ride is not None and i in ride] * n_flow
        mask = torch.tensor(grads + weights * (n_parts - 1) + flow, device=device)
        out.append((mesh.get_group(dim), mesh.get_local_rank(dim) == 0, mask))
    return out, (n_flow if sync and ride is None else 0)


def _covering(splits: list[tuple[Any, int, list[bool], list[bool]]], world: int) -> set[int] | None:
    """Indices of splits that are distinct dimensions of one mesh whose sizes multiply to ``world`` (a sum
    over each in turn is a sum over every rank of the stage), or None."""
    by_mesh: dict[tuple, tuple[tuple[int, ...], dict[int, int]]] = {}
    for i, (mesh, dim, _, _) in enumerate(splits):
        key = (tuple(mesh.mesh.flatten().tolist()), tuple(mesh.mesh.shape))
        by_mesh.setdefault(key, (key[1], {}))[1].setdefault(dim, i)
    for shape, dims in by_mesh.values():
        if math.prod(shape[d] for d in dims) == world:
            return set(dims.values())
    return None
