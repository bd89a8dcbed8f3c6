"""Hugging Face Accelerate adapter: :func:`watch` builds a :class:`gradwatch.Monitor` for a loop run by an
``accelerate.Accelerator``. Importing ``gradwatch`` never imports accelerate; this module does."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, Literal

import torch

from gradwatch import Config, Monitor, Sink
from gradwatch.config import BlocksSpec, ModuleTypes, Patterns, RulesSpec
from gradwatch.sinks import AlertSink

try:
    import accelerate  # noqa: F401  (only to say what to install)
except ImportError as err:  # pragma: no cover - exercised by the import test
    raise ImportError("gradwatch.integrations.accelerate needs accelerate: pip install 'gradwatch[transformers]'") \
        from err

__all__ = ["watch"]


def watch(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: Any,
    *,
    log_dir: str | os.PathLike[str] | None = None,
    every: int = 50,
    granularity: Literal["layer", "parameter"] = "layer",
    include: Patterns = (),
    exclude: Patterns = (),
    include_types: ModuleTypes = (),
    exclude_types: ModuleTypes = (),
    track_updates: bool = True,
    blocks: BlocksSpec = "auto",
    sync_ranks: bool | None = None,
    rules: RulesSpec = None,
    alert_sinks: Sequence[AlertSink | Callable[..., Any]] = (),
    on_critical: Literal["warn", "stop", "raise"] = "warn",
    alerts_path: str | os.PathLike[str] | Literal[False] | None = None,
    remind_after: float | None = 3600.0,
    remind_steps: int | None = None,
    remind_backoff: float = 4.0,
    resolve_after: int = 5,
    histograms: bool = True,
    layer_scalars: bool = False,
    prefix: str = "gradwatch",
    pictures: int = 20,
    sinks: Sequence[Sink] = (),
    history: int | None = None,
    flight_recorder: int = 64,
    strict: bool = False,
) -> Monitor:
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

    Args:
        accelerator: the ``accelerate.Accelerator`` that prepared ``model`` and ``optimizer``.
        model: the model as returned by ``accelerator.prepare`` (it is unwrapped here).
        optimizer: the optimizer as returned by ``accelerator.prepare`` (its torch optimizer is hooked).
        log_dir: where the TensorBoard events and ``alerts.jsonl`` go (the main process writes).
        every: measure on the steps where ``step % every == 0``, step 0 first (default 50).
        granularity: ``"layer"`` (a unit per module that owns parameters) or ``"parameter"`` (per tensor).
        include: keep only the layers whose name matches: a glob (``"layer1.*"``), a compiled regex, or a
            list of them; default all.
        exclude: drop the layers whose name matches (same forms).
        include_types: keep only layers of these module classes (``nn.Conv2d`` or a list); default all.
        exclude_types: drop layers of these module classes (``nn.BatchNorm2d`` or a list).
        track_updates: add ``update_to_weight`` across the optimizer step (one copy of the measured weights,
            on logging steps only).
        blocks: shortcut-path gradient flow per residual merge (``docs/flow.md``): ``"auto"`` finds the
            merges on the first logging step; a list of modules watches only those; ``None`` turns it off.
            ``mon.describe()`` lists the blocks, ``mon.flow_status`` says why flow is unavailable.
        sync_ranks: under torch.distributed, sum block-flow norms over ranks into the values of the global
            batch (in the all-reduce of a logging step; see docs/distributed.md) so every rank reaches the same
            verdict, and join pipeline stages' records; every rank must then measure on every logging step.
            ``None``: on when the model is a ``DistributedDataParallel``, an FSDP1 model, or has DTensor
            parameters.
        rules: the alert rules (``docs/alerts.md``): ``None``, every built-in rule with its defaults; a dict
            tunes or drops them (``{"vanishing": {"patience": 5}, "dead_layer": False}``); a list of
            :class:`~gradwatch.Rule` replaces them; ``False`` turns alerting off.
        alert_sinks: where incidents go besides the ``gradwatch`` logger, TensorBoard and ``alerts.jsonl``:
            e.g. ``[gradwatch.WebhookSink(url)]``, or any callable taking an incident event.
        on_critical: ``"warn"`` (default); ``"stop"`` sets the returned monitor's ``should_stop``; ``"raise"`` raises
            :class:`~gradwatch.GradientAlarm` out of ``optimizer.step()``.
        alerts_path: the JSONL record of incidents; ``None``: ``<log_dir>/alerts.jsonl`` when there is a
            log directory; ``False``: none.
        remind_after: wall-clock seconds before an open incident's first reminder (default 3600); ``None``:
            no time-based reminders.
        remind_steps: logging steps before an open incident's first reminder; ``None`` (default): none.
            Whichever of the two is due first reminds.
        remind_backoff: each later reminder waits this many times longer (default 4: 1 h, 4 h, 16 h, ...).
        resolve_after: consecutive clear logging steps before an incident is resolved (default 5).
        histograms: a TensorBoard histogram across layers per metric and logging step.
        layer_scalars: also one TensorBoard scalar tag per layer (and block) and metric, for small models or
            one-off digging (unbounded: 4 per layer, 6 per block); without it the per-layer values are in the
            event file as one tensor per metric (``gradwatch report``) and the scalar tags stay at most 40.
        prefix: the tags' namespace (default ``"gradwatch"``: sections ``gradwatch/``,
            ``gradwatch.layers/``, ...; ``docs/dashboard.md``).
        pictures: TensorBoard pictures (depth x time maps, gradient profile) every N logging steps and at
            ``mon.close()``; 0: none.
        sinks: more sinks for every :class:`~gradwatch.StepRecord` (objects with ``write(record)``).
        history: logging steps kept in memory for ``mon.history()`` (the latest); ``None``: all.
        flight_recorder: logging steps kept for the flight recorder (default 64): when an incident opens,
            the records of the last N logging steps up to it are written next to ``alerts.jsonl``, one file
            per incident (``docs/alerts.md#flight-recorder-what-led-up-to-an-incident``); 0 turns it off.
        strict: re-raise errors inside gradwatch's hooks and sinks; otherwise they are logged, kept in
            ``mon.errors``, and training goes on.

    The options are :class:`gradwatch.Monitor`'s, checked by :class:`gradwatch.Config`; with more than one
    process ``sync_ranks`` defaults to True.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer wraps the torch optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch optimizer or one prepared by accelerate, got {type(optimizer).__name__}")
    if sync_ranks is None and getattr(accelerator, "num_processes", 1) > 1:
        sync_ranks = True
    options = {k: v for k, v in locals().items() if k in _OPTIONS}
    return Monitor.from_config(_unwrap(accelerator, model), Config(**options), optimizer=inner, log_dir=log_dir)


def _unwrap(accelerator: Any, model: torch.nn.Module) -> torch.nn.Module:
    """The model to watch: ``accelerator.unwrap_model(model)``, except that an FSDP1 root wrapper is kept (its
    ``_fsdp_wrapped_module.`` prefix is dropped from the names all the same): it owns the parameters no inner unit
    holds, and gradwatch reads from the units which ranks hold each parameter's piece."""
    fsdp1 = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", None)
    return model if fsdp1 is not None and isinstance(model, fsdp1) else accelerator.unwrap_model(model)


_OPTIONS = frozenset(f.name for f in fields(Config))  # the keyword options shared with Monitor
