"""Hugging Face ``transformers.Trainer`` adapter: :class:`GradWatchTrainerCallback` drives a :class:`gradwatch.Monitor`
from the Trainer's callback events, through a :class:`gradwatch.driver.StepDriver`. Importing ``gradwatch`` never imports transformers; this module
does (``pip install gradwatch[transformers]``)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, Literal

import torch

from gradwatch import Config, Monitor, Sink
from gradwatch.config import BlocksSpec, ModuleTypes, Patterns, RulesSpec
from gradwatch.driver import StepDriver, loss_scale
from gradwatch.sinks import AlertSink, Tags

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - exercised by the import test
    raise ImportError("gradwatch.integrations.transformers needs transformers: pip install 'gradwatch[transformers]'") \
        from err

log = logging.getLogger("gradwatch")

__all__ = ["GradWatchTrainerCallback", "STATE_FILE"]

#: The monitor's state, saved in each checkpoint folder and read back on resume.
STATE_FILE = "gradwatch_state.json"
_OPTIONS = frozenset(f.name for f in fields(Config)) - {"every"}  # the keyword options shared with Monitor


class GradWatchTrainerCallback(TrainerCallback):
    """Per-layer gradient diagnostics, block flow and alerts for a ``transformers.Trainer``, in one line:
    ``Trainer(..., callbacks=[GradWatchTrainerCallback()])`` or ``trainer.add_callback(...)``.

    **When.** Once per optimizer step, after gradient accumulation, at the steps the Trainer logs
    (``logging_steps``; ``every=`` to choose), plus the first step. Values are recorded at the Trainer's step
    (``state.global_step`` after the step), the same axis as its own ``loss`` curve.

    **Before clipping.** The Trainer clips (``max_grad_norm``, default 1.0) before its first callback event
    after the backward. Clipping scales every gradient by one factor, so the callback reads one parameter's
    gradient norm right after its last accumulation (a ``post_accumulate_grad`` hook, armed on logging steps
    only), compares it with the same norm at ``on_pre_optimizer_step`` and divides the factor back out, on
    the device: values are the gradients before clipping, unscaled under fp16 (the optimizer's ``GradScaler``
    scale is taken into account) and bf16. A step the fp16 scaler skips is not recorded.

    **Where.** TensorBoard events go to ``log_dir``: by default ``$TENSORBOARD_LOGGING_DIR`` when set (the
    Trainer's own TensorBoard run), else ``<output_dir>/runs/gradwatch`` (a run next to the Trainer's);
    ``alerts.jsonl`` beside them. Rank 0 writes; under ``torchrun``/``accelerate launch`` every rank measures
    (one collective per logging step) and block-flow norms are averaged over ranks.

    **Other reporters.** On the Trainer's logging steps the callback adds the whole-model values to the logs
    (the dashboard's health section: ``gradwatch/grad_norm``, ``gradwatch/grad_to_weight_early``,
    ``gradwatch/open_incidents``, ``gradwatch/skip_share_min``, ``gradwatch/transmission_end_to_end``;
    ``docs/dashboard.md``) for the reporters that come after it
    (wandb, MLflow, ...). The Trainer runs user callbacks after its reporters: add the callback with
    :meth:`attach` to put it first. Per-layer values stay in gradwatch's own TensorBoard run.

    **Alerts.** ``on_critical="stop"`` sets ``control.should_training_stop``; ``"raise"`` lets
    :class:`gradwatch.GradientAlarm` out of ``trainer.train()``.

    **Resume.** The monitor's state (step axis, rule streaks, incidents) is saved as ``gradwatch_state.json``
    in each checkpoint folder and read back when training resumes from ``<output_dir>/checkpoint-<step>``.

    Args:
        every: measure every ``every`` optimizer steps; None: the Trainer's logging cadence.
        log_dir: where the TensorBoard events go (see above).
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
            ``cb.monitor.describe()`` lists the blocks, ``cb.monitor.flow_status`` says why flow is unavailable.
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
        on_critical: ``"warn"`` (default); ``"stop"`` sets ``control.should_training_stop``; ``"raise"`` lets
            :class:`~gradwatch.GradientAlarm` out of ``trainer.train()``.
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
            the end of ``train()``; 0: none.
        sinks: more sinks for every :class:`~gradwatch.StepRecord` (objects with ``write(record)``).
        history: logging steps kept in memory for ``cb.monitor.history()`` (the latest); ``None``: all.
        flight_recorder: logging steps kept for the flight recorder (default 64): when an incident opens,
            the records of the last N logging steps up to it are written next to ``alerts.jsonl``, one file
            per incident (``docs/alerts.md#flight-recorder-what-led-up-to-an-incident``); 0 turns it off.
        strict: re-raise errors inside gradwatch's hooks and sinks; otherwise they are logged, kept in
            ``cb.monitor.errors``, and training goes on.

    The options are :class:`gradwatch.Monitor`'s, checked now by :class:`gradwatch.Config`.
    """

    def __init__(
        self,
        every: int | None = None,
        *,
        log_dir: str | os.PathLike[str] | None = None,
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
    ) -> None:
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a path (str or os.PathLike), got {type(log_dir).__name__}: {log_dir!r}")
        options = {k: v for k, v in locals().items() if k in _OPTIONS}
        #: The checked options the monitor is built from (``every`` resolved at each ``train()``).
        self.config = Config(**options, **({} if every is None else {"every": every}))
        self._tags = Tags(self.config.prefix)
        self.every = every
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        #: The monitor of the current ``train()``; None before it starts.
        self.monitor: Monitor | None = None
        self._driver: StepDriver | None = None
        self._every = 1
        self._armed = False  # the coming optimizer step is a logging step: hooks record
        self._pre: torch.Tensor | None = None  # squared grad norm of the reference parameter before clipping
        self._pre_local = False  # _pre is a copy of this rank's gradient (DDP), not yet averaged
        self._ref: torch.nn.Parameter | None = None
        self._handle: Any = None
        self._pending = False

    def attach(self, trainer: Any) -> GradWatchTrainerCallback:
        """Put this callback before the Trainer's reporters (``trainer.callback_handler``), so they receive its
        scalars in ``on_log``; returns it: ``GradWatchTrainerCallback(every=10).attach(trainer)``."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        """Build the monitor on ``model``'s trainable parameters, hook the clip-factor reference and resume from the
        checkpoint's state."""
        self._close()
        self._every = self.every or int(getattr(state, "logging_steps", 0) or args.logging_steps or 50)
        params = [p for p in model.parameters() if p.requires_grad]
        log_dir = self.log_dir or os.environ.get("TENSORBOARD_LOGGING_DIR") or \
            os.path.join(args.output_dir, "runs", "gradwatch")
        cfg = self.config.replace(every=max(self._every, 1))
        if cfg.sync_ranks is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            cfg = cfg.replace(sync_ranks=True)  # every rank runs these events: flow norms averaged over ranks
        self.monitor = Monitor.from_config(model, cfg, params=params, log_dir=log_dir)
        self._driver = StepDriver(self.monitor, logging=lambda: self._armed)
        self._ref = _reference(params, self._data_parallel(params))
        self._handle = self._ref.register_post_accumulate_grad_hook(self._after_accumulation)
        self._resume(args, state)
        self._arm(state)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Arm the hooks when the coming optimizer step logs."""
        self._arm(state)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                              **kwargs: Any) -> None:
        """On an armed step, start the measurement, with clipping and the fp16 loss scale divided back out."""
        driver = self._driver
        if driver is None or not self._armed:
            return
        self._armed = False
        self._pending = driver.begin(state.global_step + 1, grad_scale=self._clip_factor(optimizer),
                                     track_update=self.config.track_updates)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        """Finish the measurement, or drop it when the fp16 scaler skipped the step."""
        if not self._pending:
            return
        self._pending = False
        if getattr(optimizer, "step_was_skipped", False):  # the fp16 scaler found inf/NaN: the step did not happen
            self._driver.discard()
        else:
            self._driver.end()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Ask the Trainer to stop when the monitor says so (``on_critical="stop"``)."""
        if self.monitor is not None and self.monitor.should_stop:
            control.should_training_stop = True

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        """Hand the Trainer's logged loss (its mean over the last ``logging_steps``) to the monitor, and add the
        health section's scalars to ``logs`` on a measured step, for the reporters after the callback."""
        if self.monitor is not None and logs is not None and isinstance(logs.get("loss"), (int, float)):
            self.monitor.loss(logs["loss"])  # the only loss the Trainer hands a callback
        rec = self.monitor.latest if self.monitor is not None else None
        if logs is None or rec is None or rec.step != state.global_step:
            return
        logs.update(self._tags.health_scalars(rec))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the monitor's state as :data:`STATE_FILE` in the checkpoint folder (rank 0)."""
        if self.monitor is None or not getattr(state, "is_world_process_zero", True):
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(self.monitor.state_dict(), f)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close the monitor: the run summary goes out, TensorBoard is flushed; :attr:`monitor` stays readable."""
        self._close()  # sends the run summary, flushes TensorBoard; cb.monitor stays readable

    # ------------------------------------------------------------------ internals
    def _arm(self, state: Any) -> None:
        """Arm the hooks when the coming optimizer step is one that logs (the first, and every ``every``)."""
        step = state.global_step + 1
        self._armed = self.monitor is not None and (step == 1 or step % self._every == 0)
        self._pre = None

    @staticmethod
    def _data_parallel(params: list[torch.Tensor]) -> bool:
        """Whether gradients are averaged over ranks after this hook sees them (DDP: its reducer writes the
        averaged gradient at the end of backward, so the hook reads this rank's own)."""
        dist = torch.distributed
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 \
            and not any(type(p).__name__ == "DTensor" for p in params)

    def _after_accumulation(self, p: torch.Tensor) -> None:
        # Every micro-batch of an armed step lands here; the last one, the sync step's, is what gets clipped.
        try:
            if self._armed and p.grad is not None:
                self._pre_local = self._data_parallel([p])
                if self._pre_local:  # this rank's own gradient: averaged like DDP's at the pre-step
                    self._pre = p.grad.detach().clone()
                else:
                    self._pre = torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32).square()
        except Exception as err:  # never raise into autograd
            self._pre = None
            log.warning("gradwatch: could not read the gradient before clipping (%s); values are as found", err)

    def _clip_factor(self, optimizer: Any) -> torch.Tensor | None:
        """What the gradients were multiplied by since :meth:`_after_accumulation`: the clip factor over the fp16
        loss scale (a device tensor, no host sync); None when unknown (then values are as found)."""
        pre, ref = self._pre, self._ref
        if pre is None or ref is None or ref.grad is None:
            return None
        try:
            if self._pre_local:  # a copy of this rank's gradient: the average DDP wrote, one small all_reduce
                torch.distributed.all_reduce(pre)
                pre = torch.linalg.vector_norm(pre / torch.distributed.get_world_size(), dtype=torch.float32).square()
            post = torch.linalg.vector_norm(ref.grad.detach(), dtype=torch.float32).square()
            scale = loss_scale(getattr(optimizer, "scaler", None))
            if scale is not None:  # the hook saw the gradient still multiplied by the loss scale
                pre = pre / torch.as_tensor(scale, dtype=torch.float32, device=pre.device).square()
            factor = (post / pre).sqrt()
            return torch.where(torch.isfinite(factor) & (factor > 0), factor, torch.ones_like(factor))
        except Exception as err:  # contained: the measurement goes on with the values as found
            log.warning("gradwatch: could not undo the Trainer's clipping (%s); values are after it", err)
            return None

    def _resume(self, args: Any, state: Any) -> None:
        if not state.global_step:
            return
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                self.monitor.load_state_dict(json.load(f))
        else:
            log.info("gradwatch: resumed at step %d without %s; the monitor starts afresh", state.global_step, path)

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.monitor is not None:
            self.monitor.close()


def _reference(params: list[torch.Tensor], data_parallel: bool) -> torch.Tensor:
    """The parameter whose gradient tells the clip factor (clipping scales every gradient alike: one is
    enough): the largest, whose gradient is almost never exactly 0; under DDP a small one of at least 16
    values, whose gradient is copied and all-reduced once per logging step to match DDP's average."""
    if data_parallel:
        small = [p for p in params if p.numel() >= 16]
        if small:
            return min(small, key=lambda p: p.numel())
    return max(params, key=lambda p: p.numel())
