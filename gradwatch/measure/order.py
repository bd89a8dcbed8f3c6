"""The order in which a model's modules first run: the one owner of "forward order" for layers.

Definition order (``named_modules()``) is not always the order data flows in (a head defined before the
trunk, a shared layer); rules that name "the first layer where a NaN appears" need the forward order.

A module run at several depths of one forward pass (ALBERT's one layer run N times, a shared embedding used
again as the output head) has no single depth, and its gradient sums what every depth sends it: such modules
come after the modules run once (among themselves by the mean position of their calls), so a layer shared by
every depth never counts as "early" (an ALBERT's shared query and key, whose gradients are tiny at
initialisation, had made its early layers read as vanishing).

The same pass records *siblings*: modules called on the very same input tensor (one object, not modified in
place in between), such as an attention's query, key and value projections reading one LayerNorm's output, a
gated MLP's gate and up projections, or the parallel branches of an Inception block. Siblings sit at the same
depth; :attr:`ForwardOrder.siblings` hands them to the rules' depth statistics (:mod:`gradwatch.alerts.siblings`).
Only weak references to the inputs are kept, and only until :meth:`ForwardOrder.finish`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._compat import is_compiled, is_compiling
from ..names import ROOT_NAME, clean_name

__all__ = ["ForwardOrder"]


class ForwardOrder:
    """Records the order in which ``model``'s modules first run (a forward-pre hook on every module) until
    :meth:`finish` removes the hooks. Names are cleaned like the monitor's layer names (wrappers dropped, the
    root is ``_root``).

    Nothing is recorded under ``torch.compile`` (definition order then stands), and nothing is hooked on a
    compiled model: dynamo guards on a module's hooks, so removing one would force a recompile. For the same
    reason, hooks that recorded nothing by :meth:`finish` (the model was compiled after the monitor was
    attached) stay, as no-ops, until :meth:`close`.

    One forward pass starts when the first module ever seen runs again (not the root's hook: a Lightning
    ``training_step`` may call a sub-module and never the root); the positions of the first full pass give
    the order, modules first seen in later passes (a branch taken later) come after."""

    def __init__(self, model: nn.Module) -> None:
        self.order: dict[str, int] = {}
        self._calls: dict[str, list[int]] = {}  # positions of each module's calls in the first pass
        self._first: str | None = None  # the module that opens a pass
        self._passes = 0
        self._tick = 0
        self._handles: list[Any] = []
        self._finished = False
        # id(input) -> (weak reference to it, its version counter then, the modules that read it): an id is
        # reused once its tensor is freed, and an in-place op changes what the tensor holds, so both are checked
        self._readers: dict[int, tuple[Any, int, list[str]]] = {}
        self._read_before: list[list[str]] = []  # readers of inputs whose id was taken over by a later tensor
        self.siblings: list[tuple[str, ...]] = []  # groups of >= 2 modules run once on one input; set by finish()
        if any(is_compiled(m) for m in model.modules()):
            return
        for qualified, module in model.named_modules():
            if isinstance(module, torch.jit.ScriptModule):  # takes no hooks; its layers keep definition order
                continue
            self._handles.append(module.register_forward_pre_hook(self._hook(clean_name(qualified) or ROOT_NAME)))

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any) -> None:
            if is_compiling():
                return
            if self._first is None:
                self._first = name
            if name == self._first:
                self._passes += 1
            if self._passes == 1:
                self._calls.setdefault(name, []).append(self._tick)
                self._tick += 1
                if args and isinstance(args[0], torch.Tensor):
                    self._read(name, args[0])
            if name not in self.order:
                self.order[name] = len(self.order)
        return hook

    def _read(self, name: str, x: torch.Tensor) -> None:
        if self._finished:
            return
        try:
            version = x._version
        except RuntimeError:  # an inference-mode tensor has no version counter: no sibling found through it
            return
        seen = self._readers.get(id(x))
        if seen is not None and seen[0]() is x and seen[1] == version:
            seen[2].append(name)
            return
        if seen is not None:  # its tensor was freed (the id is reused) or changed in place: its readers are kept
            self._read_before.append(seen[2])
        try:
            ref = weakref.ref(x)
        except TypeError:  # a tensor subclass without weak references: no sibling found through it
            return
        self._readers[id(x)] = (ref, version, [name])

    def _groups(self) -> list[tuple[str, ...]]:
        """Modules that read one input, each run once in the first pass (a module run at several depths has
        none), in the order they ran; only groups of two or more."""
        once = {n for n, t in self._calls.items() if len(t) == 1}
        groups = []
        for names in self._read_before + [names for _, _, names in self._readers.values()]:
            names = [n for n in dict.fromkeys(names) if n in once]
            if len(names) > 1:
                groups.append(tuple(names))
        self._readers.clear()  # no reference to any activation is kept
        self._read_before.clear()
        return groups

    def _positions(self) -> dict[str, int]:
        """Module -> rank: modules run once in the first pass by position, then those run several times by their
        calls' mean position, then modules first seen in later passes, as seen."""
        mean = {n: sum(t) / len(t) for n, t in self._calls.items()}
        ranked = sorted(mean, key=lambda n: (len(self._calls[n]) > 1, mean[n], self.order[n]))
        later = [n for n in sorted(self.order, key=self.order.__getitem__) if n not in mean]
        return {n: i for i, n in enumerate(ranked + later)}

    def finish(self) -> dict[str, int]:
        """Stop recording and return module name -> position, first module 0. The hooks are removed if they
        recorded anything (see the class docstring)."""
        if not self._finished:
            self.siblings = self._groups()
        self._finished = True
        if self.order:
            self.close()
        return self._positions()

    def close(self) -> None:
        """Remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def finished(self) -> bool:
        """Whether :meth:`finish` has been called: recording is over."""
        return self._finished
