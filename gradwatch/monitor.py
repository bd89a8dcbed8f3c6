"""The raw-PyTorch entry point: :class:`Monitor`."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from .flow import Blocks, FlowBatch, FlowProbe, FlowStatus, check_blocks, flow_metrics
from .history import History
from .layers import GLOBAL_NAME, Pattern, Selection, select_parameters
from .metrics import DTensor, is_sharded, local_tensor, reduce_squared, safe_ratio, segment_sum, squared_norms
from .sinks import TensorBoardSink
from .alerts import Alert, build_manager
from .alerts import check_arguments as check_alert_arguments
from .detectors import short_list as _short_list

log = logging.getLogger("gradwatch")

__all__ = ["Monitor", "METRICS"]

#: The per-layer metric names (a contract: detectors, dashboards and outside checks rely on them).
METRICS = ("grad_norm", "weight_norm", "grad_to_weight", "update_to_weight")

_STATE_VERSION = 1


@dataclass
class _Pending:
    """On-device results of a measurement whose host transfer waits for the end of the optimizer step."""

    step: int
    kept: list[int]  # indices into Selection.params that had a gradient
    parts: list[torch.Tensor]  # squared norms: grads, weights
    snapshot: list[torch.Tensor] | None  # weights before the optimizer step (update_to_weight)
    found_inf: torch.Tensor | None  # fused-AMP overflow flag: the optimizer will skip this step
    flow: FlowBatch | None = None  # block-flow norms (gradwatch.flow): they join the same transfer


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

    and the same over the whole model under the name ``_global``. Norms of steps that do not log are not
    computed: ``step()`` / the optimizer hook costs one integer comparison, and with block flow on (default
    ``blocks="auto"``) each residual block's forward hook runs one integer check per forward (every module
    carries a discovery pre/post hook pair until the first logging step's forward has examined it). Norms are
    fused (``torch._foreach_norm``), computed in float32, and moved to the host once per logging step.

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
        log_dir: create a TensorBoard ``SummaryWriter`` there. Mutually exclusive with ``writer``.
        writer: an existing ``SummaryWriter`` (flushed, not closed, by :meth:`close`).
            With neither, values are kept in :meth:`history` only.
        every: log when ``step % every == 0``.
        granularity: ``"layer"`` (default) or ``"parameter"`` (one unit per parameter tensor).
        include, exclude: glob patterns (``"layer1.*"``) or compiled regexes on layer names.
        include_types, exclude_types: module classes to keep or drop (e.g. ``nn.BatchNorm2d``).
        track_updates: measure ``update_to_weight`` when an optimizer is attached.
        histograms: write a histogram across layers per metric and logging step.
        prefix: prepended to every TensorBoard tag (e.g. ``"gradwatch/"``).
        strict: re-raise errors raised inside gradwatch's own hooks (for tests). Otherwise they are logged
            on the ``gradwatch`` logger, kept in :attr:`errors`, and training goes on.
        params: measure only these parameters of ``model`` (e.g. one optimizer's, when an integration drives
            the monitor through :meth:`begin_step`); no hooks are added. Combines with ``optimizer``.
        rules: alert rules run after each logging step (``gradwatch.detectors``; ``docs/alerts.md``). ``None``
            (default): all built-in rules (``skip_collapse``, ``vanishing``, ``exploding``, ``depth_trend``,
            ``nonfinite``, ``dead_layer``) with defaults; a dict tunes or drops them
            (``{"vanishing": {"patience": 5}, "dead_layer": False}``); a list of ``Rule`` instances replaces
            them; ``False`` turns alerting off.
        alert_sinks: where alerts go besides the defaults (the ``gradwatch`` logger, TensorBoard text and an
            ``alerts/count`` scalar when there is a writer, and the JSONL record): e.g.
            ``[gradwatch.WebhookSink(url)]`` or any callable taking an :class:`~gradwatch.Alert`.
        on_critical: ``"warn"`` (default), ``"stop"`` (set :attr:`should_stop`) or ``"raise"`` (raise
            :class:`~gradwatch.GradientAlarm` out of ``step()`` / ``optimizer.step()``).
        alerts_path: the JSONL record of every alert; default ``<log_dir>/alerts.jsonl`` (or the writer's
            directory); ``False`` for none.
        alert_cooldown: logging steps before the same rule may alert again about the same layer or block at
            the same severity (an escalation to critical always passes).
        blocks: shortcut-path gradient flow per residual merge y = F(x) + S(x) (``grad_out``, ``grad_in``,
            ``skip_grad``, ``branch_grad``, ``skip_share``, ``transmission``; see ``docs/flow.md``).
            ``"auto"`` (default) finds the merges in the autograd graph of the first logging step's forward;
            a list of modules watches only those; ``None`` turns it off. :meth:`describe` lists the blocks,
            :meth:`watch_block` adds one, :attr:`flow_status` says why flow is unavailable (torch.compile).
        sync_ranks: under torch.distributed, average the block-flow norms over ranks (root mean square of each
            rank's norm, in the same ``all_reduce`` as sharded parameter norms) so block-based alert rules give
            every rank the same verdict. Every rank must then run the monitor on every logging step, with the
            same blocks. ``None`` (default): on when ``model`` is a ``DistributedDataParallel`` or has DTensor
            parameters; integrations that drive every rank pass ``True``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``optimizer`` not an optimizer, ``every`` not an int.
        ValueError: ``every < 1``; ``log_dir`` not writable; both ``log_dir`` and ``writer``; no trainable
            parameters (after filters); an optimizer that holds none of the model's parameters.

    Under torch.distributed only rank 0 writes to TensorBoard; other ranks open no files.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        log_dir: str | os.PathLike | None = None,
        writer: Any = None,
        every: int = 50,
        granularity: str = "layer",
        include: Pattern | Iterable[Pattern] | None = None,
        exclude: Pattern | Iterable[Pattern] | None = None,
        include_types: type | Iterable[type] | None = None,
        exclude_types: type | Iterable[type] | None = None,
        track_updates: bool = True,
        histograms: bool = True,
        prefix: str = "",
        strict: bool = False,
        params: Iterable[torch.Tensor] | None = None,
        rules: Any = None,
        alert_sinks: Iterable[Any] | None = None,
        on_critical: str = "warn",
        alerts_path: str | os.PathLike | bool | None = None,
        alert_cooldown: int = 20,
        blocks: str | Iterable[nn.Module] | None = "auto",
        sync_ranks: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int):
            raise TypeError(f"every must be an int >= 1, got {type(every).__name__}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if log_dir is not None and writer is not None:
            raise ValueError("pass log_dir or writer, not both")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("model has no trainable parameters (all are frozen or there are none)")
        if blocks is not None:
            listed = check_blocks(model, blocks)  # validated before anything is hooked or opened
            blocks = "auto" if listed is None else listed

        only: set[int] | None = None
        if optimizer is not None:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            only = {id(p) for p in model.parameters()} & held
            if not only:
                raise ValueError(
                    "optimizer holds none of the model's parameters; pass the optimizer that trains this model"
                )
        if params is not None:
            if isinstance(params, torch.Tensor):
                raise TypeError("params must be an iterable of parameters, not a single tensor")
            wanted = {id(p) for p in params} & {id(p) for p in model.parameters()}
            if not wanted:
                raise ValueError("params holds none of the model's parameters")
            only = wanted if only is None else only & wanted

        self.model = model
        self.every = every
        self.strict = strict
        self.track_updates = track_updates
        self._optimizer = optimizer
        self._selection: Selection = select_parameters(
            model,
            granularity=granularity,
            include=include,
            exclude=exclude,
            include_types=include_types,
            exclude_types=exclude_types,
            only=only,
        )
        if not self._selection.params:
            raise ValueError("include/exclude filters leave no trainable parameters to measure")
        if self._selection.frozen:
            log.info(
                "gradwatch: skipping %d frozen parameter(s): %s",
                len(self._selection.frozen),
                _short_list(self._selection.frozen),
            )

        # alert arguments are checked before the writer opens: a bad one leaves no events file or writer thread
        checked_alerts = check_alert_arguments(
            rules=rules, alert_sinks=alert_sinks, on_critical=on_critical, cooldown=alert_cooldown
        )
        self._rank_zero = _is_rank_zero()
        self._sync_ranks = _resolve_sync(model, sync_ranks)
        self._step = 0
        self._stride = 1  # the caller's step stride under step(step=...): predicts the step flow is armed for
        self._last_user_step: int | None = None
        #: For integrations with their own cadence: decides, at each block forward, whether the step in
        #: progress logs (default: :meth:`is_logging_step`), so block-flow hooks are armed on those steps only.
        self.flow_trigger: Callable[[], bool] | None = None
        # model hooks first (the likeliest to fail, e.g. on a module that takes none), then files and optimizer
        self._flow: FlowProbe | None = None
        if blocks is not None:
            self._flow = FlowProbe(model, blocks, is_logging=self._flow_armed, step=self._flow_step,
                                   on_error=self._contain)
        self._owns_writer = False
        self._writer = None
        try:
            if log_dir is not None and self._rank_zero:
                self._writer = _open_writer(log_dir)
                self._owns_writer = True
            elif writer is not None and self._rank_zero:
                if not hasattr(writer, "add_scalar"):
                    raise TypeError(f"writer must be a SummaryWriter-like object, got {type(writer).__name__}")
                self._writer = writer
            self.log_dir = None if log_dir is None else os.fspath(log_dir)
            self._sink = TensorBoardSink(self._writer, prefix, histograms) if self._writer is not None else None
            self._alerts = build_manager(
                model, checked_alerts, on_critical=on_critical, cooldown=alert_cooldown, alerts_path=alerts_path,
                log_dir=log_dir, writer=self._writer, prefix=prefix, rank_zero=self._rank_zero,
            )
        except BaseException:
            if self._flow is not None:
                self._flow.close()
            if self._owns_writer:
                self._writer.close()
            raise

        self._history = History()
        self._pending: _Pending | None = None
        self._reported_missing: set[str] = set()
        self._names_cache: dict[tuple[int, ...], list[str]] = {}
        self._closed = False
        self._warned: set[str] = set()
        #: Errors contained inside gradwatch's hooks, as "ExceptionType: message" strings.
        self.errors: list[str] = []
        #: How many measurements (logging steps) have run; steps that do not log leave it unchanged.
        self.measurements = 0

        self._handles: list[Any] = []
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
            self._handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))


    # ------------------------------------------------------------------ public API
    @property
    def layer_names(self) -> list[str]:
        """Names of the measured units (layers, or parameters with ``granularity="parameter"``)."""
        return list(self._selection.names)

    @property
    def global_step(self) -> int:
        """The step the next measurement would be recorded at."""
        return self._step

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
            self._flow = FlowProbe(self.model, [], is_logging=self._flow_armed, step=self._flow_step,
                                   on_error=self._contain)
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
        return self._flow.status

    def _flow_armed(self) -> bool:
        trigger = self.flow_trigger
        return trigger() if trigger is not None else (self._step - 1 + self._stride) % self.every == 0

    def _flow_step(self) -> int:
        """The step the forward in progress belongs to: the next internal step or, under ``step(step=...)``,
        the caller's last step plus its last stride. A wrong guess only loses that step's flow: ``_begin``
        drops a flow session armed for another step."""
        return self._step - 1 + self._stride

    def step(self, step: int | None = None) -> None:
        """Mark the end of a backward pass; measure if this step logs.

        Call after ``loss.backward()`` (after ``scaler.unscale_(optimizer)`` under AMP) and before gradient
        clipping and ``optimizer.step()``. ``step`` overrides the internal counter with the caller's own.
        Not used when the monitor was given an ``optimizer`` (it measures at ``optimizer.step()`` then).
        """
        if self._closed:
            self._warn_once("closed", "gradwatch: Monitor.step() called after close(); ignored")
            return
        if self._optimizer is not None:
            self._warn_once(
                "driven",
                "gradwatch: this Monitor measures at optimizer.step() (optimizer= was given); "
                "Monitor.step() is ignored",
            )
            return
        s = self._step if step is None else int(step)
        last, self._last_user_step = self._last_user_step, s
        self._stride = s - last if last is not None and s > last else 1
        try:
            if s % self.every == 0:
                self._begin(s, snapshot=False)
                self._finish()
        except Exception as err:  # never break the user's loop
            self._contain(err)
        finally:
            self._step = s + 1
        self._alert_step()

    def begin_step(
        self,
        step: int,
        *,
        grad_scale: torch.Tensor | float | None = None,
        track_update: bool = False,
    ) -> bool:
        """For framework integrations: measure gradients and weights now, recording them at ``step``.

        Call where the gradients are final for this optimizer step (accumulated, synced, unscaled), before
        the step. ``grad_scale`` divides gradients that are still multiplied by an AMP loss scale.
        ``track_update`` snapshots the weights so :meth:`end_step` can add ``update_to_weight``. Nothing is
        moved to the host until :meth:`end_step`. Does not check ``every``: the caller decides
        (:meth:`is_logging_step`). Returns True when a measurement is pending. Never raises unless ``strict``.
        """
        if self._closed:
            return False
        try:
            self._begin(int(step), grad_scale=grad_scale, snapshot=track_update)
        except Exception as err:
            self._contain(err)
        self._step = int(step) + 1
        self._stride, self._last_user_step = 1, None
        return self._pending is not None

    def end_step(self, found_inf: torch.Tensor | None = None) -> None:
        """For framework integrations: finish the measurement :meth:`begin_step` started and record it.

        ``found_inf`` is an AMP scaler's overflow flag for this step (``optimizer.found_inf`` inside a fused
        optimizer's step): when non-zero the step was skipped and nothing is recorded. Read on the host
        together with the norms, so it adds no synchronisation.
        """
        try:
            if found_inf is not None and self._pending is not None:
                self._pending.found_inf = torch.as_tensor(found_inf)
            self._finish()
        except Exception as err:
            self._contain(err)
        self._alert_step()

    def discard_step(self) -> None:
        """For framework integrations: drop the measurement :meth:`begin_step` started, recording nothing.

        For a step the optimizer did not take (e.g. skipped by an AMP scaler). Nothing is moved to the host.
        """
        self._pending = None

    def history(self) -> pd.DataFrame:
        """Every logged value as a long DataFrame: columns ``step, name, metric, value``."""
        return self._history.to_frame()

    def save_history(self, path: str | os.PathLike) -> str:
        """Write :meth:`history` to a ``.csv``/``.csv.gz`` or ``.parquet`` file and return the path."""
        return self._history.save(path)

    def state_dict(self) -> dict[str, Any]:
        """The monitor's resumable state (step counter)."""
        state: dict[str, Any] = {"version": _STATE_VERSION, "step": self._step}
        if self._alerts is not None:
            state["alerts"] = self._alerts.state_dict()  # rule streaks, baselines, cooldowns
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, so a resumed run continues the same step axis."""
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("not a gradwatch Monitor state_dict (missing 'step')")
        self._step = int(state["step"])
        self._stride, self._last_user_step = 1, None
        if self._alerts is not None and isinstance(state.get("alerts"), dict):
            self._alerts.load_state_dict(state["alerts"])

    @property
    def alerts(self) -> list[Alert]:
        """Every alert sent so far, oldest first (``gradwatch.Alert``; the same on every rank)."""
        return [] if self._alerts is None else self._alerts.alerts

    @property
    def should_stop(self) -> bool:
        """True once a critical alert fired under ``on_critical="stop"`` or ``"raise"``: end the loop."""
        return self._alerts is not None and self._alerts.should_stop

    def _alert_step(self) -> None:
        """Run the alert rules on what this logging step recorded; then, if the policy says so, raise."""
        if self._alerts is None:
            return
        try:
            self._alerts.evaluate_current()
        except Exception as err:
            self._contain(err)
        self._alerts.raise_pending()  # GradientAlarm (on_critical="raise"): deliberately not contained

    def flush(self) -> None:
        """Flush the TensorBoard writer."""
        if self._sink is not None:
            self._sink.flush()

    def close(self) -> None:
        """Remove every hook gradwatch added and flush (and close, if gradwatch opened it) the writer."""
        if self._closed:
            return
        self._closed = True
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._alerts is not None:
            self._alerts.close()  # flushes webhooks (bounded wait) and the JSONL record
        if self._flow is not None:
            self._flow.close()
        self._pending = None
        if self._writer is not None:
            self._writer.flush()
            if self._owns_writer:
                self._writer.close()

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
            self._begin(
                self._step,
                grad_scale=getattr(optimizer, "grad_scale", None),
                found_inf=getattr(optimizer, "found_inf", None),
                snapshot=self.track_updates,
            )
        except Exception as err:
            self._contain(err)

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._closed:
            return
        try:
            if self._pending is not None:
                self._finish()
        except Exception as err:
            self._contain(err)
        finally:
            self._step += 1
        self._alert_step()

    # ------------------------------------------------------------------ measurement
    def _begin(
        self,
        step: int,
        grad_scale: torch.Tensor | float | None = None,
        found_inf: torch.Tensor | None = None,
        snapshot: bool = False,
    ) -> None:
        """Compute squared norms on the device; the host transfer waits for :meth:`_finish`."""
        self.measurements += 1
        flow = self._flow.collect() if self._flow is not None else None
        if flow is not None and self.flow_trigger is None and flow.step is not None and flow.step != step:
            # armed for another step (the caller's step counter jumped): another batch's norms, not this one's
            log.debug("gradwatch: block flow armed for step %s, measured at %d: dropped", flow.step, step)
            flow = None
        sel = self._selection
        kept = [i for i, p in enumerate(sel.params) if p.grad is not None]
        self._report_missing(kept)
        if not kept:
            self._pending = None
            if flow is not None:
                for metric, values in flow_metrics(flow.values.cpu().numpy()).items():
                    self._record(step, flow.names, metric, values, None)
            return
        grads = [sel.params[i].grad for i in kept]
        weights = [sel.params[i].detach() for i in kept]
        g_sq = squared_norms(grads)
        if grad_scale is not None:
            scale = torch.as_tensor(grad_scale, dtype=torch.float32).to(g_sq.device)
            g_sq = g_sq / scale.square()
        before = [local_tensor(w).clone() for w in weights] if snapshot else None
        self._pending = _Pending(step, kept, [g_sq, squared_norms(weights)], before, found_inf, flow)

    def _finish(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        sel = self._selection
        parts = list(pending.parts)
        if pending.snapshot is not None:
            after = [local_tensor(sel.params[i].detach()) for i in pending.kept]
            parts.append(squared_norms(torch._foreach_sub(after, pending.snapshot)))
        stacked = torch.cat(parts)
        sharded = [is_sharded(sel.params[i]) for i in pending.kept]
        n_flow = 0 if pending.flow is None else pending.flow.values.numel()
        sync = bool(n_flow) and self._sync_ranks and dist.is_available() and dist.is_initialized()
        if n_flow:  # block-flow norms ride along
            flow = pending.flow.values
            dtype = torch.promote_types(stacked.dtype, flow.dtype)
            flow = flow.to(device=stacked.device, dtype=dtype)
            if sync:  # each rank saw its own activations: mean of the squared norms over ranks (same all_reduce)
                flow = flow.square() / dist.get_world_size()
            stacked = torch.cat([stacked.to(dtype), flow])
        if any(sharded) or sync:
            mask = torch.tensor(sharded * len(parts) + [sync] * n_flow, device=stacked.device)
            stacked = reduce_squared(stacked, mask)  # one collective for parameters and flow
            if sync:
                stacked = torch.cat([stacked[:-n_flow], stacked[-n_flow:].sqrt()])
        if pending.found_inf is not None:
            found = pending.found_inf.detach().reshape(1).to(device=stacked.device, dtype=stacked.dtype)
            stacked = torch.cat([stacked, found])
        host = stacked.cpu().numpy().astype(np.float64)  # the one device-to-host transfer
        if pending.found_inf is not None:
            if host[-1] > 0:  # the optimizer skipped this step: its gradients overflowed, not real
                log.debug("gradwatch: step %d skipped by the AMP scaler; not recorded", pending.step)
                return
            host = host[:-1]
        flow_host = None
        if n_flow:
            host, flow_host = host[:-n_flow], host[-n_flow:]
        self._record_parameters(pending.step, pending.kept, host.reshape(len(parts), len(pending.kept)))
        if flow_host is not None and self._flow is not None:
            for metric, values in flow_metrics(flow_host).items():
                self._record(pending.step, pending.flow.names, metric, values, None)

    def _record_parameters(self, step: int, kept: list[int], sq: np.ndarray) -> None:
        sel = self._selection
        n = len(sel.names)
        seg = np.asarray([sel.segments[i] for i in kept], dtype=np.int64)
        present = np.bincount(seg, minlength=n) > 0
        key = tuple(np.flatnonzero(present).tolist())
        names = self._names_cache.get(key)
        if names is None:
            names = [sel.names[j] for j in key] + [GLOBAL_NAME]
            self._names_cache[key] = names

        def per_unit(row: np.ndarray) -> np.ndarray:
            units = np.sqrt(segment_sum(row, seg, n))[present]
            return np.append(units, np.sqrt(row.sum()))

        grad = per_unit(sq[0])
        weight = per_unit(sq[1])
        values = {"grad_norm": grad, "weight_norm": weight, "grad_to_weight": safe_ratio(grad, weight)}
        if sq.shape[0] > 2:
            values["update_to_weight"] = safe_ratio(per_unit(sq[2]), weight)
        hist_mask = np.ones(len(names), dtype=bool)
        hist_mask[-1] = False  # the _global entry is not a layer
        for metric, vals in values.items():
            self._record(step, names, metric, vals, hist_mask)

    def _record(
        self, step: int, names: list[str], metric: str, values: np.ndarray, hist_mask: np.ndarray | None = None
    ) -> None:
        """Send one metric for ``names`` to the history and, on rank 0, to TensorBoard."""
        self._history.append(step, names, metric, values)
        if self._sink is not None:
            self._sink.write(step, names, metric, values, hist_mask)
        if self._alerts is not None:
            self._alerts.observe(step, names, metric, values)  # the step's measurements, for the alert rules

    # ------------------------------------------------------------------ housekeeping
    def _report_missing(self, kept: list[int]) -> None:
        if len(kept) == len(self._selection.params):
            return
        have = set(kept)
        new = [
            name
            for i, name in enumerate(self._selection.param_names)
            if i not in have and name not in self._reported_missing
        ]
        if new:
            self._reported_missing.update(new)
            log.info(
                "gradwatch: %d parameter(s) have no gradient (.grad is None) and are skipped: %s",
                len(new),
                _short_list(new),
            )

    def _contain(self, err: BaseException) -> None:
        self._pending = None
        if self.strict:
            raise err
        text = f"{type(err).__name__}: {err}"
        self.errors.append(text)
        if len(self.errors) <= 3:
            log.error("gradwatch: error inside a gradwatch hook, measurement skipped: %s", text, exc_info=err)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)


def _resolve_sync(model: nn.Module, sync_ranks: bool | None) -> bool:
    """``sync_ranks=None``: sync when every rank is known to run the monitor (DDP wrapper or DTensor params)."""
    if sync_ranks is not None:
        if not isinstance(sync_ranks, bool):
            raise TypeError(f"sync_ranks must be a bool or None, got {type(sync_ranks).__name__}")
        return sync_ranks
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return True
    return DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters())


def _open_writer(log_dir: str | os.PathLike) -> Any:
    path = os.fspath(log_dir)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"log_dir {path!r} is not writable: {err.strerror or err}") from err
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=path)
