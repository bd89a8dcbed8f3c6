"""The raw-PyTorch entry point: :class:`Monitor`. It decides *when* to measure and routes each step's record;
the measuring is :mod:`gradwatch.measure.meter`'s, block flow :mod:`gradwatch.flow`'s, alerting
:mod:`gradwatch.alerts`'s, writing the sinks'."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, cast

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from ._checks import Pattern
from ._compat import is_dtensor
from ._once import Once
from ._outputs import Outputs
from ._steps import GradMark, as_step
from .alerts import Alert, Incident, build_rules
from .config import BlocksSpec, Config, ModuleTypes, Patterns, RulesSpec
from .flow import Blocks, FlowProbe, FlowStatus, check_blocks
from .measure.layers import Selection, select_parameters
from .measure.layouts import UnsupportedLayout, check_supported, fsdp1_shards, unsupported
from .measure.meter import Meter, Pending
from .measure.selfcheck import SelfCheck
from .names import short_list
from .record import Sink, StepRecord
from .sinks.alerting import AlertSink

log = logging.getLogger("gradwatch")

__all__ = ["Monitor", "NothingToMeasure"]

_OPTIONS = frozenset(f.name for f in dataclasses.fields(Config))

_STATE_VERSION = 1


class NothingToMeasure(ValueError):
    """The model, the optimizer's parameters and the filters leave no trainable parameter to measure."""


def _is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class Monitor:
    """Per-layer gradient diagnostics for any ``nn.Module``, written to TensorBoard and kept in memory.

    On each logging step (every ``every``-th step, starting with step 0) the monitor measures, per layer
    (a module that owns parameters directly):

    - ``grad_norm``: L2 norm of the layer's gradients,
    - ``weight_norm``: L2 norm of the layer's weights (trainable parameters that have a gradient),
    - ``grad_to_weight``: grad_norm / weight_norm (NaN when weight_norm is 0: undefined),
    - ``update_to_weight``: ||w_after - w_before|| / ||w_before|| across the optimizer step (only when an
      optimizer is attached; costs one copy of the measured weights, held during logging steps only),

    and the same over the whole model under the name ``_global``; with block flow, six metrics per residual
    block (``docs/flow.md``). Norms of steps that do not log are not computed: ``step()`` / the optimizer hook
    costs an integer comparison and a few attribute reads, and with block flow on (default ``blocks="auto"``)
    each residual block's forward hook runs one integer check per forward (every module carries a discovery
    pre/post hook pair until the first logging step's forward has examined it). Norms are fused
    (``torch._foreach_norm``), computed in float32, and moved to the host once per logging step.

    Each logging step becomes one :class:`~gradwatch.StepRecord`: the alert rules run on it, then it goes to
    every sink — the history (:meth:`history`), TensorBoard, the alert sinks and yours (``sinks=``); the
    latest one is :attr:`latest`. ``docs/architecture.md`` draws the path.

    Two ways to drive it::

        mon = gradwatch.Monitor(model, log_dir="runs/exp", every=50)
        for x, y in loader:
            loss_fn(model(x), y).backward()
            mon.step()              # after backward (after scaler.unscale_), before clipping and step()
            optimizer.step(); optimizer.zero_grad()
        mon.close()

        with gradwatch.Monitor(model, optimizer=optimizer, log_dir="runs/exp") as mon:
            ...                     # measured at every optimizer.step(), no mon.step() call
        df = mon.history()          # columns: step, name, metric, value

    Args:
        model: the network to watch.
        optimizer: when given, measure at every ``optimizer.step()`` (a step pre-hook) and add
            ``update_to_weight``; only the model parameters the optimizer holds are measured. Under
            ``torch.amp.GradScaler`` that point sees unscaled gradients (fused optimizers included).
        log_dir: create a TensorBoard ``SummaryWriter`` there (a ``str`` or ``os.PathLike``). Mutually
            exclusive with ``writer``.
        writer: an existing ``SummaryWriter`` (flushed, not closed, by :meth:`close`). With neither
            ``log_dir`` nor ``writer``, values are kept in :meth:`history` only.
        params: measure only these parameters of ``model`` (e.g. one optimizer's); combines with
            ``optimizer``.
        every: measure on the steps where ``step % every == 0``, step 0 first (default 50).
        granularity: ``"layer"`` (a unit per module that owns parameters) or ``"parameter"`` (per tensor).
        include: keep only the layers whose name matches: a glob (``"layer1.*"``), a compiled regex, or a
            list of them; default all.
        exclude: drop the layers whose name matches (same forms).
        include_types: keep only layers of these module classes (``nn.Conv2d`` or a list); default all.
        exclude_types: drop layers of these module classes (``nn.BatchNorm2d`` or a list).
        track_updates: with ``optimizer``, add ``update_to_weight`` (one copy of the measured weights, on
            logging steps only).
        blocks: shortcut-path gradient flow per residual merge (``docs/flow.md``): ``"auto"`` finds the
            merges on the first logging step; a list of modules watches only those; ``None`` turns it off.
            :meth:`describe` lists the blocks, :meth:`watch_block` adds one, :attr:`flow_status` says why
            flow is unavailable.
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
        on_critical: ``"warn"`` (default); ``"stop"`` sets :attr:`should_stop`; ``"raise"`` raises
            :class:`~gradwatch.GradientAlarm` out of ``step()`` / ``optimizer.step()``.
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
            :meth:`close`; 0: none.
        sinks: more sinks for every :class:`~gradwatch.StepRecord` (objects with ``write(record)``).
        history: logging steps kept in memory for :meth:`history` (the latest); ``None``: all.
        flight_recorder: logging steps kept for the flight recorder (default 64): when an incident opens,
            the records of the last N logging steps up to it are written next to ``alerts.jsonl``, one file
            per incident (``docs/alerts.md#flight-recorder-what-led-up-to-an-incident``); 0 turns it off.
        strict: re-raise errors inside gradwatch's hooks and sinks; otherwise they are logged, kept in
            :attr:`errors`, and training goes on.

    The options are checked together, before anything is hooked or opened, by :class:`~gradwatch.Config`;
    to share one configuration, build a ``Config`` and use :meth:`from_config`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``optimizer`` not an optimizer, ``log_dir`` not a
            path, an option of the wrong type (``every="3"``, ``histograms=1``).
        ValueError: an option with a wrong value (``every=0``, ``on_critical="panic"``); ``log_dir`` not
            writable; both ``log_dir`` and ``writer``; parameters on the meta device; an optimizer that
            holds none of the model's parameters.
        NothingToMeasure: no trainable parameters (after the filters).
        UnsupportedLayout: parameters whose gradients ``p.grad`` does not hold: DeepSpeed ZeRO, FSDP1 with
            ``use_orig_params=False`` (``docs/troubleshooting.md#unsupported-layouts``).

    Under torch.distributed only rank 0 writes (TensorBoard, alerts, sinks); other ranks open no files. With
    more than one process, the first logging step checks the values against torch's own total gradient norm
    once (:mod:`gradwatch.measure.selfcheck`; the verdict is :attr:`StepRecord.verified <gradwatch.StepRecord>`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        writer: Any = None,
        params: Iterable[torch.Tensor] | None = None,
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
    ) -> None:
        options = {name: value for name, value in locals().items() if name in _OPTIONS}
        self._setup(model, Config(**options), optimizer, log_dir, writer, params)

    @classmethod
    def from_config(
        cls,
        model: nn.Module,
        config: Config,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        writer: Any = None,
        params: Iterable[torch.Tensor] | None = None,
    ) -> Monitor:
        """A monitor with the options of ``config`` (a :class:`~gradwatch.Config`, e.g. shared between
        runs); the other arguments are :class:`Monitor`'s."""
        if not isinstance(config, Config):
            raise TypeError(f"config must be a gradwatch.Config, got {type(config).__name__}")
        monitor = cls.__new__(cls)
        monitor._setup(model, config, optimizer, log_dir, writer, params)
        return monitor

    def _setup(self, model: nn.Module, cfg: Config, optimizer: Any, log_dir: Any, writer: Any, params: Any) -> None:
        """Check the arguments, then hook the model, open the outputs and hook the optimizer (in that order:
        the likeliest to fail first); nothing is left behind when one fails."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a path (str or os.PathLike), got {type(log_dir).__name__}: {log_dir!r}")
        if log_dir is not None and writer is not None:
            raise ValueError("pass log_dir or writer, not both")
        if writer is not None and not hasattr(writer, "add_scalar"):
            raise TypeError(f"writer must be a SummaryWriter-like object, got {type(writer).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not any(p.requires_grad for p in model.parameters()):
            raise NothingToMeasure("model has no trainable parameters (all are frozen or there are none)")
        blocks = cfg.blocks
        if blocks is not None and blocks != "auto":
            blocks = check_blocks(model, blocks)  # all in the model: checked before anything is hooked or opened
        selection = _select(model, cfg, optimizer, params)
        fsdp1 = fsdp1_shards(model)  # FSDP1 use_orig_params=True: each unit's shard group
        check_supported(selection.params, selection.param_names, fsdp1)  # DeepSpeed ZeRO, FSDP1 flat parameters
        rules = build_rules(cfg.rules)  # fresh rule state for this monitor

        self.model = model
        self.config = cfg
        self.every = cfg.every
        self.strict = cfg.strict
        self.track_updates = cfg.track_updates
        #: Errors contained inside gradwatch's hooks and sinks, as "ExceptionType: message" strings.
        self.errors: list[str] = []
        #: How many logging steps have been measured; steps that do not log leave it unchanged.
        self.measured_steps = 0
        # Set by a framework adapter's StepDriver: decides, at each block forward, whether the step in progress
        # logs (default: is_logging_step), so block-flow hooks are armed on those steps only.
        self._flow_trigger: Callable[[], bool] | None = None
        self._driven = False  # a StepDriver drives this monitor: step() is not the user's to call
        self._grads = GradMark(model, selection.params)
        self._optimizer = optimizer
        self._selection: Selection = selection
        self._meter = Meter(selection, _resolve_sync(model, cfg.sync_ranks, fsdp1 is not None), fsdp1)
        self._layout_state: Literal["unchecked", "readable", "unreadable"] = "unchecked"
        self._pending: Pending | None = None
        self._check = SelfCheck(self._contain_in)  # under torch.distributed: the values against torch's, once
        self._step = 0
        self._stride = 1  # the caller's step stride under step(step=...): predicts the step flow is armed for
        self._last_user_step: int | None = None
        self._closed = False
        self._loss: Any = None  # the last loss given (Monitor.loss), read on logging steps only
        self._once = Once()
        self._handles: list[Any] = []
        #: The directory this monitor opened a TensorBoard writer on (``log_dir``), else None.
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        # model hooks first (the likeliest to fail, e.g. on a module that takes none), then files and optimizer
        self._flow = self._new_probe(blocks) if blocks is not None else None
        try:
            self._out = Outputs(cfg, model, rules, log_dir, writer, _is_rank_zero(), self._contain_in)
        except BaseException:  # leave nothing behind: no hook
            if self._flow is not None:
                self._flow.close()
            raise
        if selection.frozen:
            log.info("gradwatch: skipping %d frozen parameter(s): %s", len(selection.frozen),
                     short_list(selection.frozen))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
            self._handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))

    def _new_probe(self, blocks: Any) -> FlowProbe:
        return FlowProbe(self.model, blocks, is_logging=self._flow_armed, step=self._flow_step,
                         on_error=self._contain)

    # ------------------------------------------------------------------ public API
    @property
    def layer_names(self) -> list[str]:
        """Names of the measured units (layers, or parameters with ``granularity="parameter"``)."""
        return list(self._selection.names)

    @property
    def global_step(self) -> int:
        """The step the next measurement would be recorded at."""
        return self._step

    @property
    def latest(self) -> StepRecord | None:
        """The record of the latest logging step (with its alerts), or None before the first."""
        return self._out.latest

    @property
    def probe(self) -> FlowProbe | None:
        """The block-flow probe (:class:`gradwatch.flow.FlowProbe`), None with ``blocks=None``. A debugging
        handle: ``probe.keep_vectors = True`` keeps the gradient vectors of the last measured step in
        ``probe.vectors``; ``probe.armed`` says whether hooks wait for a backward."""
        return self._flow

    def is_logging_step(self, step: int | None = None) -> bool:
        """Whether ``step`` (default: the next step) is one that logs."""
        s = self._step if step is None else step
        return s % self.every == 0

    def watch_block(self, module: nn.Module, name: str | None = None) -> None:
        """Measure the residual merges in ``module``'s forward, named ``name`` (default: its qualified name).

        For blocks discovery does not see (a skip dead from the start, a branch without parameters) or to
        rename one. Works with ``blocks=None`` too (then only watched modules are measured).
        """
        if self._flow is None:
            self._flow = self._new_probe([])
        self._flow.watch(module, name)

    def describe(self, *example_args: Any, **example_kwargs: Any) -> Blocks:
        """The residual blocks found (name, skip kind, depth index), as a list that prints as a table.

        Blocks are found on the first logging step; pass example inputs to find them now with one forward
        (buffers such as BatchNorm statistics and the RNG state are left as they were).
        """
        if self._flow is None:
            return Blocks()
        if example_args or example_kwargs:
            return self._flow.discover(*example_args, **example_kwargs)
        return self._flow.describe()

    @property
    def flow_status(self) -> FlowStatus:
        """Whether block flow is measured; if not, why (e.g. ``torch.compile``)."""
        if self._flow is None:
            return FlowStatus("off", "blocks=None")
        if self._layout_state == "unreadable":
            return FlowStatus("off", "the model's sharded layout is unsupported: nothing is recorded (see errors)")
        return self._flow.status

    def loss(self, value: Any) -> None:
        """Give the monitor this step's training loss (a tensor or a number), for the ``instability`` rule: it
        holds its warnings back while the loss falls (a gradient that climbs while the model learns is not a
        runaway) and warns when the loss's level climbs half a nat above its best (a run on its way to
        diverging). Optional; call it any time in the iteration. The tensor is kept, not read: it is read (one
        host sync) only when a logging step is measured, so the other steps stay free of syncs. The framework
        adapters give it for you where the framework hands it over."""
        # detached (no sync, no copy): holding the tensor must not keep its autograd graph alive
        self._loss = value.detach() if isinstance(value, torch.Tensor) else value

    def step(self, step: int | None = None) -> None:
        """Mark the end of a backward pass; measure if this step logs.

        Call once per iteration, after ``loss.backward()`` (after ``scaler.unscale_(optimizer)`` under AMP)
        and before gradient clipping and ``optimizer.step()``. ``step`` (a non-negative int) overrides the
        internal counter with the caller's own. A second call without a backward in between, or with the
        same ``step``, is ignored with a warning, so the step axis neither doubles nor repeats. Not used when
        the monitor was given an ``optimizer`` (it measures at ``optimizer.step()`` then) or is driven by a
        framework adapter.
        """
        if self._closed:
            self._once.warn("closed", "gradwatch: Monitor.step() called after close(); ignored")
            return
        if self._optimizer is not None or self._driven:
            how = "optimizer.step() (optimizer= was given)" if self._optimizer is not None else "its framework adapter"
            self._once.warn("driven", f"gradwatch: this Monitor is driven by {how}; Monitor.step() is ignored")
            return
        try:
            s = self._step if step is None else as_step(step)
        except (TypeError, ValueError) as err:  # a bad step number must not break the user's loop either
            self._contain(err)
            return
        last = self._last_user_step
        if step is not None and s == last:
            self._once.warn("twice", f"gradwatch: Monitor.step(step={s}) called twice; the second call is ignored "
                            "(no duplicate rows): call it once per iteration")
            return
        if step is None and self._grads.repeated():
            self._once.warn("twice", "gradwatch: Monitor.step() called twice for one backward pass; the second call "
                            "is ignored (the step axis does not double): call it once per iteration")
            return
        if not self._grads.active:
            self._once.log("blind", "gradwatch: Monitor.step() cannot tell a repeated call in this loop (its "
                           "gradients change where autograd's version counters do not show it); every call now "
                           "counts as a step, and one step was lost finding out: pass step= to be sure")
        if step is not None and last is not None and s < last:
            self._once.warn("backwards", f"gradwatch: Monitor.step(step={s}) after step={last}: the step axis went "
                            "back, so steps repeat in the history and TensorBoard", stacklevel=3)
        self._last_user_step = s
        self._stride = s - last if last is not None and s > last else 1
        try:
            if s % self.every == 0:
                self._begin(s)
                self._finish()
        except Exception as err:  # never break the user's loop
            self._contain(err)
        finally:
            self._step = s + 1
        self._raise_alarm()

    # ------------------------------------------------------------------ framework adapters (gradwatch.driver)
    def _begin_step(self, step: int, grad_scale: torch.Tensor | float | None, track_update: bool) -> bool:
        """Measure now, recording at ``step``; see :meth:`gradwatch.driver.StepDriver.begin`."""
        if self._closed:
            return False
        try:
            step = as_step(step)
        except (TypeError, ValueError) as err:
            self._contain(err)
            return False
        try:
            self._begin(step, grad_scale=grad_scale, snapshot=track_update)
        except Exception as err:
            self._contain(err)
        self._step = step + 1
        self._stride, self._last_user_step = 1, None
        return self._pending is not None

    def _end_step(self, found_inf: torch.Tensor | None) -> None:
        """Finish and record what :meth:`_begin_step` started; see :meth:`gradwatch.driver.StepDriver.end`."""
        try:
            if found_inf is not None and self._pending is not None:
                self._pending.found_inf = torch.as_tensor(found_inf)
            self._finish()
        except Exception as err:
            self._contain(err)
        self._raise_alarm()

    def _discard_step(self) -> None:
        """Drop what :meth:`_begin_step` started: nothing is moved to the host or recorded."""
        self._pending = None

    def history(self) -> pd.DataFrame:
        """Every logged value as a long DataFrame: columns ``step, name, metric, value``."""
        return self._out.history.to_frame()

    @property
    def records(self) -> list[StepRecord]:
        """Every record of this monitor, oldest first (what :meth:`history` is built from)."""
        return self._out.history.records

    def save_history(self, path: str | os.PathLike) -> str:
        """Write :meth:`history` to a ``.csv``/``.csv.gz`` or ``.parquet`` file and return the path."""
        return self._out.history.save(path)

    def state_dict(self) -> dict[str, Any]:
        """The monitor's resumable state (step counter, alert rule state)."""
        state: dict[str, Any] = {"version": _STATE_VERSION, "step": self._step}
        if self._out.engine is not None:
            state["alerts"] = self._out.engine.state_dict()  # rule streaks, baselines, incidents
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, so a resumed run continues the same step axis."""
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("not a gradwatch Monitor state_dict (missing 'step')")
        self._step = int(state["step"])
        self._stride, self._last_user_step = 1, None
        if self._out.engine is not None and isinstance(state.get("alerts"), dict):
            self._out.engine.load_state_dict(state["alerts"])

    @property
    def alerts(self) -> list[Alert]:
        """The findings told so far (incidents opened, escalated, reminded), oldest first (``gradwatch.Alert``;
        the same on every rank; restored on resume)."""
        return self._out.alerts

    @property
    def incidents(self) -> list[Incident]:
        """Every incident of the run, open and resolved, oldest first (``gradwatch.Incident``: start, end,
        worst value; restored on resume, so a resumed run does not announce open incidents again)."""
        return self._out.incidents

    @property
    def suppressed_alerts(self) -> int:
        """How many findings were not told: repeats of open incidents between reminders, inhibited ones."""
        return 0 if self._out.engine is None else self._out.engine.suppressed

    @property
    def can_stop(self) -> bool:
        """Whether the alert policy can ever set :attr:`should_stop` (``on_critical`` "stop" or "raise")."""
        return self._out.engine is not None and self.config.on_critical in ("stop", "raise")

    @property
    def should_stop(self) -> bool:
        """True once a critical alert fired under ``on_critical="stop"`` or ``"raise"``: end the loop."""
        return self._out.engine is not None and self._out.engine.should_stop

    def flush(self) -> None:
        """Flush every sink (the TensorBoard writer among them)."""
        self._out.flush()

    def close(self) -> None:
        """Remove every hook gradwatch added; close the sinks gradwatch created (and the writer, if it opened
        it) and flush the others, which stay usable by another monitor or fit."""
        if self._closed:
            return
        self._closed = True
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._flow is not None:
            self._flow.close()
        self._pending = None
        first = self._out.close()  # under strict, a sink's error is raised once everything is closed
        if first is not None:
            raise first

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Monitor({type(self.model).__name__}, units={len(self._selection.names)}, every={self.every}, "
            f"step={self._step}, log_dir={self.log_dir!r})"
        )

    # ------------------------------------------------------------------ optimizer hooks
    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._closed or self._step % self.every:
            return
        try:
            # A fused optimizer under GradScaler unscales inside its step: its grads are still scaled here.
            self._begin(self._step, grad_scale=getattr(optimizer, "grad_scale", None),
                        found_inf=getattr(optimizer, "found_inf", None), snapshot=self.track_updates)
        except Exception as err:
            self._contain(err)

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._closed:
            return
        try:
            self._finish()
        except Exception as err:
            self._contain(err)
        finally:
            self._step += 1
        self._raise_alarm()

    # ------------------------------------------------------------------ block-flow cadence
    def _flow_armed(self) -> bool:
        trigger = self._flow_trigger
        return trigger() if trigger is not None else (self._step - 1 + self._stride) % self.every == 0

    def _flow_step(self) -> int:
        """The step the forward in progress belongs to: the next internal step or, under ``step(step=...)``,
        the caller's last step plus its last stride. A wrong guess only loses that step's flow: ``_begin``
        drops a flow session armed for another step."""
        return self._step - 1 + self._stride

    # ------------------------------------------------------------------ measure, record, publish
    def _begin(self, step: int, grad_scale: Any = None, found_inf: Any = None, snapshot: bool = False) -> None:
        """Compute squared norms on the device; the host transfer waits for :meth:`_finish`."""
        if self._layout_unreadable():
            self._pending = None
            return
        self.measured_steps += 1
        flow = self._flow.collect() if self._flow is not None else None
        if flow is not None and self._flow_trigger is None and flow.step is not None and flow.step != step:
            # armed for another step (the caller's step counter jumped): another batch's norms, not this one's
            log.debug("gradwatch: block flow armed for step %s, measured at %d: dropped", flow.step, step)
            flow = None
        if (flow is None or not flow.backward) and not self._meter.has_gradients():
            # no parameter has a gradient and no block hook saw one: called before backward
            self._once.warn("early", "gradwatch: Monitor.step() ran before backward (no gradient yet); nothing is "
                            "recorded for that step: call it after loss.backward()", stacklevel=4)
            self._pending = None
            return
        self._pending = self._meter.begin(step, flow, grad_scale=grad_scale, found_inf=found_inf,
                                          snapshot=snapshot)
        if self._check.waiting:
            if self._meter.fsdp1 is not None:  # plain tensors holding shards: torch's norm of them is one rank's
                self._check.skip("FSDP1 shards plain tensors, whose total norm only FSDP's own clip_grad_norm_ "
                                 "takes")
            else:
                self._check.begin(self._selection, step, self._pending.kept if self._pending else (), grad_scale)

    def _layout_unreadable(self) -> bool:
        """Whether the parameters became unreadable after construction (e.g. ``deepspeed.initialize`` or FSDP1
        wrapping after the monitor was made): checked on the first logging step, raised once (contained: logged
        and kept in :attr:`errors`), then nothing is measured."""
        if self._layout_state == "unchecked":
            sel = self._selection
            reason = unsupported(sel.params, sel.param_names, self._meter.fsdp1)
            self._layout_state = "readable" if reason is None else "unreadable"
            if reason is not None:
                if self._flow is not None:  # its hooks would only cost time: nothing is recorded
                    self._flow.close()
                raise UnsupportedLayout(reason + " Nothing is recorded.")
        return self._layout_state == "unreadable"

    def _finish(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        record = self._check.finish(self._meter.finish(pending))
        if record is not None:  # checked as this rank measured it, then joined with other pipeline stages
            record = self._meter.merge(record, self._out.kinds)
            if self._loss is not None:
                loss = _as_loss(self._loss)
                if loss is None:
                    self._once.log("loss", f"gradwatch: Monitor.loss() was given {type(self._loss).__name__}, not a "
                                   "number or tensor; the records carry no loss (the instability rule judges without)")
                record = dataclasses.replace(record, loss=loss)
            self._out.publish(record)

    def _raise_alarm(self) -> None:
        self._out.raise_alarm()  # GradientAlarm (on_critical="raise"): deliberately not contained

    # ------------------------------------------------------------------ housekeeping
    def _contain(self, err: BaseException) -> None:
        self._pending = None
        self._contain_in(None, err)

    def _contain_in(self, where: str | None, err: BaseException) -> None:
        if self.strict:
            raise err
        text = f"{type(err).__name__}: {err}" if where is None else f"{where}: {type(err).__name__}: {err}"
        self.errors.append(text)
        if len(self.errors) <= 3:
            log.error("gradwatch: error inside gradwatch (%s); training goes on", text, exc_info=err)



def _as_loss(value: Any) -> float | None:
    """A loss as a float (a tensor's mean, so a per-sample loss works too); None when it is not a number."""
    try:
        return float(value.float().mean()) if isinstance(value, torch.Tensor) else float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def _select(model: nn.Module, cfg: Config, optimizer: Any, params: Any) -> Selection:
    """The measured parameters: the model's trainable ones, held by ``optimizer`` and in ``params`` if given,
    after the include/exclude filters."""
    only: set[int] | None = None
    if optimizer is not None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        only = {id(p) for p in model.parameters()} & held
        if not only:
            raise ValueError("optimizer holds none of the model's parameters; pass the optimizer that trains this model")
    if params is not None:
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of parameters, not a single tensor")
        wanted = {id(p) for p in params} & {id(p) for p in model.parameters()}
        if not wanted:
            raise ValueError("params holds none of the model's parameters")
        only = wanted if only is None else only & wanted
    # Config stores each filter normalised to a tuple, whatever form it was given in
    patterns = cast(tuple[Pattern, ...], cfg.include), cast(tuple[Pattern, ...], cfg.exclude)
    types = cast(tuple[type, ...], cfg.include_types), cast(tuple[type, ...], cfg.exclude_types)
    selection = select_parameters(model, granularity=cfg.granularity, include=patterns[0], exclude=patterns[1],
                                  include_types=types[0], exclude_types=types[1], only=only)
    if not selection.params:
        raise NothingToMeasure("include/exclude filters leave no trainable parameters to measure")
    meta = [name for name, p in zip(selection.param_names, selection.params) if p.is_meta]
    if meta:
        raise ValueError(f"model has parameters on the meta device ({short_list(meta)}): they hold no values to "
                         "measure; materialise them first (e.g. model.to_empty(device=...) then initialise)")
    return selection


def _resolve_sync(model: nn.Module, sync_ranks: bool | None, fsdp1: bool) -> bool:
    """``sync_ranks=None``: sync when every rank is known to run the monitor (DDP or FSDP1 wrapper, DTensor
    params)."""
    if sync_ranks is not None:
        return sync_ranks
    if isinstance(model, nn.parallel.DistributedDataParallel) or fsdp1:
        return True
    return any(is_dtensor(p) for p in model.parameters())
