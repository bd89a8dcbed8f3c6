"""Sharded layouts whose gradients ``p.grad`` does not hold, or holds only in part: which ones gradwatch refuses
with a message that says what to do, and the help it needs for the one it reads.

gradwatch reads each parameter's ``.grad`` at the optimizer-step boundary, and under torch.distributed sums each
tensor's squares over the ranks it is split across (DTensor placements: :mod:`gradwatch.measure.norms`). Three
layouts break that, each recognised here by the attributes its library sets, without importing the library:

- **DeepSpeed ZeRO** keeps gradients in its own partitioned buffers: ZeRO-1/2 leave ``p.grad`` None or a view
  of a reused bucket (partly reduced values), ZeRO-3 also empties ``p.data``. Refused
  (:class:`UnsupportedLayout`): DeepSpeed's ``safe_get_full_grad(p)`` is the way to read them.
- **FSDP1 with** ``use_orig_params=False``: the parameters are ``FlatParameter``s, one 1-D shard per wrapped
  unit, so no per-layer value can be read. Refused: use FSDP2 (``fully_shard``) or ``use_orig_params=True``.
- **FSDP1 with** ``use_orig_params=True`` (what HF Accelerate and Lightning's ``FSDPStrategy`` use): each
  original parameter is a 1-D view of its piece of this rank's flat shard, and so is its ``.grad``: read exactly
  with :class:`Fsdp1Shards`, which sums each one's squares over its unit's shard group (not over HYBRID_SHARD's
  replicas) and gives the pieces absent from this rank an empty gradient, so that every rank measures the same
  list of tensors (FSDP1 sets their ``.grad`` to None).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._compat import fsdp1_unit, is_dtensor, is_flat_param, is_fsdp1_flattened
from ..names import short_list
from .norms import shard_dims

__all__ = ["UnsupportedLayout", "unsupported", "check_supported", "Fsdp1Shards", "fsdp1_shards"]


class UnsupportedLayout(ValueError):
    """The model is sharded in a way whose gradients gradwatch cannot read from ``p.grad`` (DeepSpeed ZeRO,
    FSDP1 with flat parameters); the message says what to use instead."""


_DEEPSPEED = (
    "gradwatch cannot measure this model: its parameters are managed by DeepSpeed ZeRO{stage} ({names}). ZeRO "
    "keeps gradients in its own partitioned buffers, so p.grad is None or holds a partly reduced bucket after "
    "backward{data}, and per-layer norms read from it would be wrong. Use PyTorch FSDP2 (fully_shard; Lightning: "
    "ModelParallelStrategy; Accelerate/HF Trainer: fsdp_version=2), which gradwatch measures exactly, or read "
    "DeepSpeed's own gradients with deepspeed.utils.safe_get_full_grad(param) between engine.backward() and "
    "engine.step()."
)
_FLAT = (
    "gradwatch cannot measure this model: it is wrapped by FSDP1 (FullyShardedDataParallel) with "
    "use_orig_params=False, which flattens each wrapped unit's parameters into one FlatParameter ({names}), so no "
    "per-layer norm can be read. Use FSDP2 (torch.distributed.fsdp.fully_shard), or FullyShardedDataParallel("
    "..., use_orig_params=True), which gradwatch measures exactly."
)
_UNSEEN = (
    "gradwatch cannot measure these parameters: FSDP1 (FullyShardedDataParallel) shards them ({names}) but the "
    "FSDP1 unit that owns them is not inside the model given to gradwatch (the root FullyShardedDataParallel "
    "wraps it, or the model was wrapped after the monitor was made), so gradwatch cannot tell which ranks hold "
    "their pieces. Give gradwatch the FSDP-wrapped model itself, after wrapping (Lightning's FSDPStrategy wraps "
    "the LightningModule from outside: wrap its layers in configure_model instead), or use FSDP2 (fully_shard; "
    "Lightning: ModelParallelStrategy)."
)


def unsupported(params: Sequence[torch.Tensor], names: Sequence[str], fsdp1: Fsdp1Shards | None = None) -> str | None:
    """Why gradwatch cannot measure ``params`` (named ``names``), or None when it can. ``fsdp1``: the FSDP1
    units found in the model (:func:`fsdp1_shards`); a parameter FSDP1 manages outside them is refused.
    A Python pass over the parameters, no device work."""
    zero3 = [n for n, p in zip(names, params) if hasattr(p, "ds_id")]  # DeepSpeed's own is_zero_param test
    if zero3:
        return _DEEPSPEED.format(stage="-3", names=short_list(zero3),
                                 data=" and p.data is an empty placeholder outside forward and backward")
    # ZeRO-1/2 and DeepSpeed's bf16 optimizer link every parameter they hold to its fp32 partition (_hp_mapping)
    zero = [n for n, p in zip(names, params) if hasattr(p, "_hp_mapping")]
    if zero:
        return _DEEPSPEED.format(stage=" (stage 1 or 2)", names=short_list(zero), data="")
    flat = [n for n, p in zip(names, params) if is_flat_param(p)]
    if flat:
        return _FLAT.format(names=short_list(flat))
    known = fsdp1.groups if fsdp1 is not None else {}
    unseen = [n for n, p in zip(names, params) if is_fsdp1_flattened(p) and not is_dtensor(p) and id(p) not in known]
    if unseen:
        return _UNSEEN.format(names=short_list(unseen))
    return None


def check_supported(params: Sequence[torch.Tensor], names: Sequence[str], fsdp1: Fsdp1Shards | None = None) -> None:
    """Raise :class:`UnsupportedLayout` with :func:`unsupported`'s message, if any."""
    reason = unsupported(params, names, fsdp1)
    if reason is not None:
        raise UnsupportedLayout(reason)


class Fsdp1Shards:
    """How to measure the original parameters of FSDP1 units with ``use_orig_params=True``.

    ``groups`` maps ``id(param)`` to a 1-D device mesh over the process group its unit's flat parameter is
    sharded across, or to None for a unit that does not shard (``NO_SHARD``: full gradients, all-reduced as
    under DDP, summed over nothing).
    """

    def __init__(self, groups: dict[int, Any]) -> None:
        self.groups = groups

    def dims(self, p: torch.Tensor) -> list[tuple[Any, int]]:
        """The (mesh, dimension) pairs ``p``'s squares are summed over: a DTensor's own, else its unit's group."""
        mesh = self.groups.get(id(p))
        return [(mesh, 0)] if mesh is not None else shard_dims(p)

    def grads(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """Each parameter's ``.grad``; for a sharded FSDP1 parameter with no elements on this rank (FSDP1 sets
        its ``.grad`` to None), the parameter's own empty tensor: its exact share of the norm, zero, measured
        on every rank alike, so that every rank's vector has the same entries."""
        grads = []
        for p in params:
            grad = p.grad
            if grad is None and p.numel() == 0 and self.groups.get(id(p)) is not None:
                grad = p.detach()  # empty, on the parameter's device and dtype
            grads.append(grad)
        return grads


def fsdp1_shards(model: nn.Module) -> Fsdp1Shards | None:
    """The FSDP1 ``use_orig_params=True`` units inside ``model`` (None when there are none)."""
    groups: dict[int, Any] = {}
    meshes: dict[Any, Any] = {}
    for module in model.modules():
        unit = fsdp1_unit(module)
        if unit is None:
            continue
        params, group = unit
        if group is not None and group not in meshes:
            meshes[group] = _mesh(group, params)
        for p in params:
            groups[id(p)] = meshes.get(group) if group is not None else None
    return Fsdp1Shards(groups) if groups else None


def _mesh(group: Any, params: Sequence[torch.Tensor]) -> Any:
    """A 1-D device mesh over an existing process group (no new group is created: no collective)."""
    from torch.distributed.device_mesh import DeviceMesh

    device = next((p.device.type for p in params), "cpu")
    return DeviceMesh.from_group(group, device)
