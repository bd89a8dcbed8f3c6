"""The order in which a model's modules first run: the one owner of "forward order" for layers.

Definition order (``named_modules()``) is not always the order data flows in (a head defined before the
trunk, a shared layer); rules that name "the first layer where a NaN appears" need the forward order.
"""

from __future__ import annotations

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
    attached) stay, as no-ops, until :meth:`close`."""

    def __init__(self, model: nn.Module) -> None:
        self.order: dict[str, int] = {}
        self._handles: list[Any] = []
        self._finished = False
        if any(is_compiled(m) for m in model.modules()):
            return
        for qualified, module in model.named_modules():
            if isinstance(module, torch.jit.ScriptModule):  # takes no hooks; its layers keep definition order
                continue
            self._handles.append(module.register_forward_pre_hook(self._hook(clean_name(qualified) or ROOT_NAME)))

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any) -> None:
            if name not in self.order and not is_compiling():
                self.order[name] = len(self.order)
        return hook

    def finish(self) -> dict[str, int]:
        """Stop recording and return module name -> position, first module 0. The hooks are removed if they
        recorded anything (see the class docstring)."""
        self._finished = True
        if self.order:
            self.close()
        return dict(self.order)

    def close(self) -> None:
        """Remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def finished(self) -> bool:
        """Whether :meth:`finish` has been called: recording is over."""
        return self._finished
