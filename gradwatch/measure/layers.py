"""Which parameters gradwatch measures and what it calls them.

A *layer* is a module that directly owns parameters (``module._parameters``), named by its qualified name
with wrapper prefixes removed, so that ``torch.compile``, DDP, FSDP and activation-checkpoint wrappers do
not change the names a user sees.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .._checks import Pattern
from .._compat import NORM_TYPES, is_fsdp1_flattened
from ..names import GLOBAL_NAME, ROOT_NAME, WRAPPER_PREFIXES, clean_name

log = logging.getLogger("gradwatch")

__all__ = ["WRAPPER_PREFIXES", "clean_name", "Selection", "select_parameters", "layer_kinds", "Pattern", "ROOT_NAME",
           "GLOBAL_NAME"]

def _matches(name: str, patterns: Sequence[Pattern]) -> bool:
    for pat in patterns:
        if isinstance(pat, re.Pattern):
            if pat.search(name):
                return True
        elif fnmatch.fnmatchcase(name, pat):
            return True
    return False


@dataclass
class Selection:
    """The measured parameters, grouped into named units (layers or single parameters).

    ``params[i]`` belongs to unit ``segments[i]`` whose name is ``names[segments[i]]``. Parameters are
    ordered by (device, dtype) so fused norms need no reordering; ``names`` follow forward/definition order.
    """

    names: list[str]
    params: list[nn.Parameter]
    param_names: list[str]
    segments: list[int]
    frozen: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)


def select_parameters(
    model: nn.Module,
    *,
    granularity: str = "layer",
    include: Sequence[Pattern] = (),
    exclude: Sequence[Pattern] = (),
    include_types: tuple[type, ...] = (),
    exclude_types: tuple[type, ...] = (),
    only: set[int] | None = None,
) -> Selection:
    """Resolve which parameters of ``model`` are measured, and their unit names.

    The options are :class:`~gradwatch.Config`'s, as it holds them once checked (this is not a user entry
    point): ``granularity`` ``"layer"`` or ``"parameter"``; ``include``/``exclude`` glob patterns (``fnmatch``,
    e.g. ``"layer1.*"``) or compiled regexes matched against the layer name; ``include_types``/``exclude_types``
    module classes. ``only`` restricts to parameters whose ``id`` is in the set (the parameters an optimizer
    holds). Frozen parameters (``requires_grad=False``) are left out and listed in ``Selection.frozen``.
    """
    inc, exc, inc_t, exc_t = include, exclude, include_types, exclude_types

    seen: set[int] = set()
    units: list[tuple[str, list[tuple[str, nn.Parameter]]]] = []
    frozen: list[str] = []
    for mod_name, module in model.named_modules(remove_duplicate=True):
        own = [(n, p) for n, p in module._parameters.items() if p is not None]
        if not own:
            continue
        layer = clean_name(mod_name) or ROOT_NAME
        if inc and not _matches(layer, inc):
            continue
        if exc and _matches(layer, exc):
            continue
        if inc_t and not isinstance(module, inc_t):
            continue
        if exc_t and isinstance(module, exc_t):
            continue
        kept = []
        for pname, p in own:
            if id(p) in seen:  # tied weights belong to the first module that owns them
                continue
            seen.add(id(p))
            full = f"{layer}.{pname}" if layer != ROOT_NAME else pname
            if isinstance(p, nn.parameter.UninitializedParameter):
                log.info("gradwatch: skipping uninitialized (lazy) parameter %s", full)
                continue
            if not p.requires_grad:
                frozen.append(full)
                continue
            if only is not None and id(p) not in only:
                continue
            kept.append((full, p))
        if not kept:
            continue
        if granularity == "layer":
            units.append((layer, kept))
        else:
            units.extend((full, [(full, p)]) for full, p in kept)

    flat = [(u, full, p) for u, (_, members) in enumerate(units) for full, p in members]
    # Stable sort by (device, dtype): one contiguous run per fused-norm group.
    keys: dict[tuple[torch.device, torch.dtype], int] = {}
    for _, _, p in flat:
        keys.setdefault((p.device, p.dtype), len(keys))
    flat.sort(key=lambda e: keys[(e[2].device, e[2].dtype)])
    return Selection(
        names=[name for name, _ in units],
        params=[p for _, _, p in flat],
        param_names=[full for _, full, _ in flat],
        segments=[u for u, _, _ in flat],
        frozen=frozen,
    )


_EMBEDDING_TYPES: tuple[type, ...] = (nn.Embedding, nn.EmbeddingBag)


def layer_kinds(model: nn.Module) -> dict[str, str]:
    """What kind of layer each measured name is: ``"weight"``, ``"norm"``, ``"embedding"`` or ``"other"``.

    ``"weight"`` layers (convolutions, linear maps, attention projections: a parameter with two or more
    dimensions) are the ones whose gradient-to-weight ratios are comparable across depth. Normalisation
    layers (scale ~1, small gradients) and embeddings (only the looked-up rows get a gradient) are not.
    Keys cover both granularities: ``"layer1.0.conv1"`` and ``"layer1.0.conv1.weight"``.
    """
    kinds: dict[str, str] = {}
    for mod_name, module in model.named_modules():
        own = [(n, p) for n, p in module._parameters.items() if p is not None]
        if not own:
            continue
        layer = clean_name(mod_name) or ROOT_NAME
        if isinstance(module, NORM_TYPES):
            kind = "norm"
        elif isinstance(module, _EMBEDDING_TYPES):
            kind = "embedding"
        elif any(_matrix(module, n, p) for n, p in own if not isinstance(p, nn.parameter.UninitializedParameter)):
            kind = "weight"
        else:
            kind = "other"
        kinds.setdefault(layer, kind)
        for pname, p in own:
            full = f"{layer}.{pname}" if layer != ROOT_NAME else pname
            weight = kind == "weight" and not isinstance(p, nn.parameter.UninitializedParameter) and \
                _matrix(module, pname, p)
            kinds.setdefault(full, "weight" if weight else ("other" if kind == "weight" else kind))
    return kinds


# Modules whose ``weight`` is a matrix (or a stack of kernels) even when FSDP1 shows it as a flat 1-D view of
# this rank's shard (``use_orig_params=True``): there its dimensions cannot tell.
_MATRIX_TYPES = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)


def _matrix(module: nn.Module, name: str, p: torch.Tensor) -> bool:
    """Whether parameter ``name`` of ``module`` is a weight matrix: two or more dimensions, or FSDP1's flat
    view of a Linear or convolution ``weight``."""
    if p.dim() >= 2:
        return True
    return name == "weight" and is_fsdp1_flattened(p) and isinstance(module, _MATRIX_TYPES)
