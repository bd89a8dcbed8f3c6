"""One logging step's measurement: the hooks armed during its forwards (:class:`_Session`) and the norms they
gave, stacked on the device (:class:`FlowBatch`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._hooks import _Slot
from .registry import _Entry

__all__ = ["FlowBatch"]


@dataclass
class FlowBatch:
    """On-device norms of one logging step: ``values[4*i : 4*i+4]`` = grad_out, grad_in, skip, branch of
    ``names[i]`` (NaN where a hook never fired)."""

    names: list[str]
    values: torch.Tensor
    step: int | None = None  # the step the probe was armed for (``step()`` at the first hooked forward)
    backward: bool = True  # whether any hook saw a gradient (False: the step was measured before backward)


class _Session:
    """Hooks and values of one logging step. Holds no graph node once its hooks are registered."""

    def __init__(self, step: int | None, number: int, discovery_only: bool = False) -> None:
        self.step = step
        self.number = number
        self.discovery_only = discovery_only
        self.inputs: dict[int, list[Any]] = {}  # module id -> stack of input nodes (during its forward)
        self.claimed: set[int] = set()
        self.rejected: set[int] = set()
        self.armed: dict[int, bool] = {}  # module id -> armed by a training-mode forward
        self.slots: dict[int, list[tuple[_Entry, _Slot]]] = {}
        self.handles: dict[int, list[Any]] = {}
        self.examined: list[int] = []
        self.order: dict[int, int] = {}  # module id -> position of its first completed call (depth order)
        self.merges: dict[int, _Slot] = {}  # id of an armed merge node -> its slot
        self.open = True  # False once collected or dropped

    def disarm(self, mid: int) -> None:
        for h in self.handles.pop(mid, ()):
            h.remove()
        self.slots.pop(mid, None)

    def close(self) -> None:
        """Remove every hook of the session (the probe closes, or a step is dropped)."""
        for mid in list(self.handles):
            self.disarm(mid)
        self.end()

    def end(self) -> None:
        """The step is collected: its hooks become no-ops (removing ~80 handles one by one cost ~0.3 ms per
        ResNet-56 logging step) and the session lets go of them."""
        self.open = False
        for pairs in self.slots.values():
            for _, slot in pairs:
                slot.retire()
        self.handles.clear()
        self.slots.clear()
        self.inputs.clear()
        self.claimed.clear()
        self.rejected.clear()
        self.merges.clear()

    def rows(self) -> list[tuple[int, str, _Slot]]:
        """``(depth index, block name, slot)`` of every armed merge, in depth order, each slot finished."""
        rows = []
        for mid, pairs in self.slots.items():
            for entry, slot in pairs:
                slot.finish()
                rows.append((entry.block.index, entry.block.name, slot))
        rows.sort(key=lambda r: r[0])
        return rows


def stack_norms(slots: Sequence[_Slot], constants: dict[tuple, torch.Tensor]) -> torch.Tensor:
    """The four norms of every slot in one vector, on one device and dtype (float64 if any norm is).

    ``constants`` caches the 0-d tensors that stand for plain values, kept by the caller across steps.
    """
    flat = [v for slot in slots for v in slot.norms]
    tensors = [v for v in flat if isinstance(v, torch.Tensor)]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    device = tensors[0].device if tensors else torch.device("cpu")
    parts = []
    for v in flat:
        if isinstance(v, torch.Tensor):
            parts.append(v.to(device=device, dtype=dtype))
        else:  # a hook that never fired (NaN) or a dead path (0.0): cached constants, no copy per value
            parts.append(_constant(constants, float("nan") if v is None else float(v), device, dtype))
    return torch.stack(parts)


def _constant(cache: dict[tuple, torch.Tensor], value: float, device: torch.device, dtype: torch.dtype
              ) -> torch.Tensor:
    """A 0-d tensor holding ``value`` on ``device``, built (one host-to-device copy) once per value."""
    key = (repr(value), device, dtype)
    t = cache.get(key)
    if t is None:
        t = cache[key] = torch.tensor(value, dtype=dtype).to(device)
    return t
