"""Every private or version-dependent torch API gradwatch touches, in one place, each behind a guard.

When a torch release moves one of these, this is the only file to change. Nothing here imports Lightning or
any other framework (the core does not depend on them).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import nn

if TYPE_CHECKING:  # for the type checker only: importing it costs ~0.5 s (see below)
    from torch.distributed.tensor import DTensor

__all__ = [
    "is_dtensor", "is_shard", "is_replicate", "partial_op", "is_optimized_module", "is_flat_param", "is_fsdp1_flattened",
    "fsdp1_unit", "NORM_TYPES", "is_compiling", "is_compiled", "in_backward", "tree_tensors",
    "foreach_norm_f32", "vector_norm_f32", "foreach_sub_", "foreach_copy", "foreach_copy_", "unscales_in_step", "scale_tensor", "event_file_writer",
    "event_file_path", "detach_event_files", "reopen_event_file", "total_norm",
]

# DTensor (FSDP2, tensor parallel) and OptimizedModule (torch.compile's wrapper) are recognised without
# importing their modules: torch.distributed.tensor and torch._dynamo cost ~1 s of `import gradwatch`, and no
# DTensor or compiled module can exist before the module that makes it has been imported.
_DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")  # moved out of _tensor in torch 2.4


def _loaded(modules: tuple[str, ...], name: str) -> Any:
    for module in modules:
        found = getattr(sys.modules.get(module), name, None)
        if found is not None:
            return found
    return None


def is_dtensor(t: Any) -> TypeGuard[DTensor]:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 or tensor-parallel parameter)."""
    cls = _loaded(_DTENSOR_MODULES, "DTensor")
    return cls is not None and isinstance(t, cls)


def is_shard(placement: Any) -> bool:
    """Whether a DTensor ``placement`` splits the tensor along that mesh dimension: a ``Shard``, or the
    ``_StridedShard`` FSDP2 uses on the data-parallel dimension of a tensor-parallel parameter (not a
    ``Shard`` subclass, and its ``is_shard()`` says False)."""
    cls = _loaded(_DTENSOR_MODULES, "Shard")
    strided = _loaded(("torch.distributed.tensor.placement_types", "torch.distributed._tensor.placement_types"),
                      "_StridedShard")
    return (cls is not None and isinstance(placement, cls)) or (strided is not None and isinstance(placement, strided))


def is_replicate(placement: Any) -> bool:
    """Whether a DTensor ``placement`` holds the whole tensor on every rank of that mesh dimension."""
    cls = _loaded(_DTENSOR_MODULES, "Replicate")
    return cls is not None and isinstance(placement, cls)


def partial_op(placement: Any) -> str | None:
    """The reduction (``"sum"``, ``"avg"``, ...) of a ``Partial`` placement: each rank holds a term of the
    tensor, not a piece (a LayerNorm's gradient under sequence parallel); None for any other placement."""
    cls = _loaded(_DTENSOR_MODULES, "Partial")
    if cls is None or not isinstance(placement, cls):
        return None
    return str(getattr(placement, "reduce_op", "sum"))


def is_optimized_module(module: Any) -> bool:
    """Whether ``module`` is the wrapper ``torch.compile(module)`` returns."""
    cls = _loaded(("torch._dynamo.eval_frame",), "OptimizedModule")
    return cls is not None and isinstance(module, cls)


# FSDP1 (FullyShardedDataParallel, the wrapper class): recognised by the attributes it sets, read with guards.
_FSDP1_MODULES = ("torch.distributed.fsdp.fully_sharded_data_parallel",)


def is_flat_param(t: Any) -> bool:
    """Whether ``t`` is an FSDP1 ``FlatParameter``: a unit's parameters flattened into one 1-D shard
    (``use_orig_params=False``)."""
    return bool(getattr(t, "_is_flat_param", False))


def is_fsdp1_flattened(t: Any) -> bool:
    """Whether FSDP1 manages ``t``: an original parameter of a unit (or one of its ``FlatParameter``s)."""
    return bool(getattr(t, "_fsdp_flattened", False))


def fsdp1_unit(module: Any) -> tuple[list[torch.Tensor], Any] | None:
    """For an FSDP1 unit with ``use_orig_params=True``: its original parameters and the process group its flat
    shard is split over (under ``HYBRID_SHARD`` the intra-node group, not the replicas), or None as the group
    when it does not shard (``NO_SHARD``: full parameters, gradients all-reduced as under DDP). None for any
    other module, and for a unit with ``use_orig_params=False`` (its parameter is a ``FlatParameter``)."""
    cls = _loaded(_FSDP1_MODULES, "FullyShardedDataParallel")
    if cls is None or not isinstance(module, cls):
        return None
    handle: Any = getattr(module, "_handle", None)
    flat = getattr(handle, "flat_param", None)
    params = getattr(flat, "_params", None)
    if params is None:
        return None
    shared = getattr(flat, "_shared_params", None) or []
    group = handle.process_group if getattr(handle, "uses_sharded_strategy", True) else None
    return [*params, *shared], group


#: Normalisation layers (scale ~1, small gradients): their gradient-to-weight ratios do not compare with
#: those of convolutions and linear maps. ``_NormBase`` covers every BatchNorm and InstanceNorm.
NORM_TYPES: tuple[type, ...] = (
    getattr(nn.modules.batchnorm, "_NormBase", nn.modules.batchnorm.BatchNorm2d),
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def is_compiling() -> bool:
    """True while torch.compile traces (hooks must then do nothing: they would be traced or ignored)."""
    try:
        return torch.compiler.is_compiling()
    except Exception:  # pragma: no cover - older torch
        return False


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is compiled: the wrapper ``torch.compile(module)`` returns, or compiled in place
    (``module.compile()``)."""
    return is_optimized_module(module) or getattr(module, "_compiled_call_impl", None) is not None


def in_backward() -> bool:
    """True inside a backward pass (an activation-checkpoint recompute runs its forward there)."""
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # pragma: no cover - older torch: assume a plain forward
        return False


def tree_tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside nested tuples, lists and dicts (a module's inputs or outputs)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    return [t for t in torch.utils._pytree.tree_leaves(obj) if isinstance(t, torch.Tensor)]


def foreach_norm_f32(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """One fused L2 norm per tensor, in float32 (tensors of one device and dtype)."""
    if tensors and tensors[0].dtype == torch.float64:  # a float64 norm cannot narrow to float32 inside the op
        return [n.float() for n in torch._foreach_norm(tensors, 2)]
    try:
        return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    except TypeError:  # torch < 2.2 has no dtype argument: upcast first
        return list(torch._foreach_norm([t.float() for t in tensors], 2))


def vector_norm_f32(t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """L2 norm (along ``dim``, else of all of ``t``) in float32 whatever ``t``'s dtype."""
    if t.dtype == torch.float64:  # a float64 norm cannot narrow to float32 inside the op
        return torch.linalg.vector_norm(t, dim=dim).float()
    return torch.linalg.vector_norm(t, dim=dim, dtype=torch.float32)


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch's own L2 norm over all of ``tensors`` (plain tensors, or DTensors of one device mesh: then a
    DTensor, and torch reduces the shards itself): ``torch.nn.utils.get_total_norm`` (torch 2.6+), else the
    arithmetic ``clip_grad_norm_`` used before it, which leaves the tensors untouched."""
    get = getattr(torch.nn.utils, "get_total_norm", None)
    if get is not None:
        return get(tensors)
    if not tensors:  # pragma: no cover - older torch
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))  # pragma: no cover


def foreach_sub_(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    """``x -= y`` for each pair, in place, in one fused kernel per group; returns ``a``."""
    if a:
        torch._foreach_sub_(a, b)
    return a


def foreach_copy(a: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[x.clone() for x in a]`` in one fused kernel per group (new tensors: nothing is kept between
    logging steps, so the copy costs memory only while a logging step is in flight)."""
    return list(torch._foreach_mul(a, 1.0)) if a else []


def foreach_copy_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``x.copy_(y)`` for each pair, fused where torch has ``_foreach_copy_`` (2.1+)."""
    if not dst:
        return
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, src)
    else:  # pragma: no cover - older torch
        for d, s in zip(dst, src):
            d.copy_(s)


def unscales_in_step(optimizer: Any) -> bool:
    """Whether ``optimizer`` unscales AMP gradients inside its own ``step`` (fused optimizers): before that
    step, its gradients are still multiplied by the loss scale."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def scale_tensor(scaler: Any) -> Any:
    """A ``GradScaler``'s current loss scale, as a device tensor when it offers one (no host sync)."""
    get_async = getattr(scaler, "_get_scale_async", None)
    if callable(get_async):
        scale = get_async()
        if scale is not None:
            return scale
    return scaler.get_scale()


def event_file_writer(writer: Any) -> Any:
    """The event-file writer behind a ``torch.utils.tensorboard.SummaryWriter`` (its ``add_summary`` takes a
    whole ``Summary`` proto at once), or None when the writer has none."""
    get = getattr(writer, "_get_file_writer", None)
    return get() if callable(get) else None


def event_file_path(events: Any) -> str | None:
    """The path of the file an event-file writer (:func:`event_file_writer`) appends to, when it says."""
    path = getattr(getattr(events, "event_writer", None), "_file_name", None)
    return path if isinstance(path, str) else None


def detach_event_files(writer: Any) -> None:
    """Close a ``SummaryWriter``'s event-file writers, ignoring their errors, and forget them (its next
    ``add_*`` opens a new event file; its ``flush``/``close`` do nothing until then). A writer whose thread died
    on a vanished directory re-raises that error from every later call; this is how it stops."""
    writers = getattr(writer, "all_writers", None)
    if not isinstance(writers, dict) or not hasattr(writer, "file_writer"):
        return
    for old in list(writers.values()):
        try:
            old.close()
        except Exception:  # the error its thread died of: it is why we are here
            pass
    writer.file_writer = writer.all_writers = None


def reopen_event_file(writer: Any) -> Any:
    """Give a ``SummaryWriter`` a new event file in its log directory, re-creating the directory (the old
    event-file writers are closed and dropped: :func:`detach_event_files`); the new event-file writer, or None
    when ``writer`` is not a ``SummaryWriter``. Raises ``OSError`` when the directory cannot be created."""
    if not callable(getattr(writer, "_get_file_writer", None)) or not isinstance(getattr(writer, "all_writers", None), dict):
        return None
    detach_event_files(writer)
    return writer._get_file_writer()
