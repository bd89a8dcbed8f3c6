"""Hugging Face Accelerate adapter: :func:`watch` builds a :class:`gradwatch.Monitor` for a loop run by an
``accelerate.Accelerator``. Importing ``gradwatch`` never imports accelerate; this module does."""

from __future__ import annotations

import os
from typing import Any

import torch

from gradwatch import Monitor

try:
    import accelerate  # noqa: F401  (only to say what to install)
except ImportError as err:  # pragma: no cover - exercised by the import test
    raise ImportError("gradwatch.integrations.accelerate needs accelerate: pip install 'gradwatch[transformers]'") \
        from err

__all__ = ["watch"]


def watch(accelerator: Any, model: torch.nn.Module, optimizer: Any, *, log_dir: str | os.PathLike | None = None,
          **options: Any) -> Monitor:
    """A monitor for ``model`` and ``optimizer`` as returned by ``accelerator.prepare(...)``.

    It measures at the real optimizer steps only: with ``accelerator.accumulate(model)``, the prepared optimizer
    calls the torch optimizer once per ``gradient_accumulation_steps`` micro-batches (``accelerator.sync_gradients``),
    and the monitor hooks that torch optimizer, so values are after accumulation and after the cross-process
    gradient sync; under fp16 the ``GradScaler`` has unscaled them, and a step it skips is not recorded. Names are
    the unwrapped model's (no ``module.`` prefix). Every process measures (one collective per logging step; block
    flow averaged over processes); only the main process writes. Gradients are measured where the torch optimizer
    sees them: after ``accelerator.clip_grad_norm_`` if you clip.

    Example::

        model, opt, dl = accelerator.prepare(model, opt, dl)
        mon = gradwatch.integrations.accelerate.watch(accelerator, model, opt, log_dir="runs/exp", every=50)
        for batch in dl:
            with accelerator.accumulate(model):
                accelerator.backward(loss_fn(model(batch)))
                opt.step(); opt.zero_grad()
        mon.close()
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer wraps the torch optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch optimizer or one prepared by accelerate, got {type(optimizer).__name__}")
    if getattr(accelerator, "num_processes", 1) > 1:
        options.setdefault("sync_ranks", True)
    return Monitor(accelerator.unwrap_model(model), optimizer=inner, log_dir=log_dir, **options)
