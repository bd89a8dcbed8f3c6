"""The step axis of a raw loop: what a step number may be (:func:`as_step`), and whether a backward pass ran
since the last ``Monitor.step()`` (:class:`GradMark`), so a repeated call neither doubles nor repeats steps."""

from __future__ import annotations

import numbers
import operator
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["as_step", "GradMark"]


def as_step(step: Any) -> int:
    """A non-negative integer step: an int, a numpy integer, an integer 0-d tensor, or a float holding a whole
    number (``8.0``, as some loops count); TypeError for anything else (``8.5``, a bool, a string), ValueError
    for a negative one."""
    if isinstance(step, bool):
        raise TypeError("step must be an int, got bool")
    if isinstance(step, numbers.Integral):
        out = int(step)
    elif isinstance(step, numbers.Real):
        if not float(step).is_integer():
            raise TypeError(f"step must be a whole number, got {step!r}")
        out = int(float(step))
    else:
        try:
            out = operator.index(step)  # integer 0-d tensors
        except TypeError:
            raise TypeError(f"step must be an int, got {type(step).__name__}") from None
    if out < 0:
        raise ValueError(f"step must be >= 0, got {out}")
    return out


class GradMark:
    """Whether a backward pass ran since the last ``step()``, read off two measured parameters' gradients: the
    model's first and last (a stem and a head: a backward through the model reaches them). A backward replaces
    a gradient or accumulates into it in place, which bumps the tensor's version counter: a few attribute reads
    per ``step()``, no hook in the backward, no host sync. A gradient that is None (set to None by
    ``zero_grad``, a parameter the batch did not use) is no evidence either way.

    A loop can write gradients where the counter does not see it (a replayed CUDA graph, copies through
    ``.data``): then every call looks repeated. A real repeat alternates with real calls, so two calls in a
    row that look repeated mean the evidence is blind in this loop: from then on :meth:`repeated` says False
    (one step was lost to it, and said so)."""

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor]) -> None:
        measured = {id(p) for p in params}
        ordered = [p for p in model.parameters() if id(p) in measured]
        self._params = (ordered[0], ordered[-1]) if ordered else ()
        # weak references: an id() can be reused by the next gradient once the old one is freed, and a strong
        # reference would keep an embedding-sized gradient alive
        self._seen: list[tuple[weakref.ref[torch.Tensor], int]] | None = None
        self._last_repeated = False
        #: False once the version counters proved blind in this loop (see the class docstring).
        self.active = True

    def repeated(self) -> bool:
        """Whether this ``step()`` call follows the last one with no backward in between; marks the gradients
        for the next call."""
        if not self.active:
            return False
        same = self._unchanged()
        if same and self._last_repeated:  # two in a row: the gradients change where we cannot see it
            self.active = same = False
        self._last_repeated = same
        if not same:
            self._mark()
        return same

    def _mark(self) -> None:
        grads = [p.grad for p in self._params]
        if any(g is None for g in grads):
            self._seen = None
        else:
            self._seen = [(weakref.ref(g), g._version) for g in grads if g is not None]

    def _unchanged(self) -> bool:
        """True only when both gradients are the very tensors of the last mark, unchanged since."""
        if self._seen is None:
            return False
        for p, (ref, version) in zip(self._params, self._seen):
            g = p.grad
            if g is None or ref() is not g or g._version != version:
                return False
        return True
