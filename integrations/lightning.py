"""Lightning adapter: :class:`GradWatchCallback`, for ``lightning.pytorch`` and ``pytorch_lightning`` alike.

The two packages ship separate ``Callback`` class hierarchies. ``GradWatchCallback`` subclasses the ``Callback``
of every one of them that is installed, so one class serves both ``lightning.pytorch.Trainer`` and
``pytorch_lightning.Trainer``; with only one installed, it subclasses that one. Everything namespace-specific
(logger classes, ``rank_zero_info``) is looked up from the module the trainer itself comes from.

This module only decides *when* to measure (Lightning's hooks) and *where* to write (the trainer's loggers);
the measuring is :class:`gradwatch.Monitor`'s.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from gradwatch.alerts import GradientAlarm, check_arguments
from gradwatch.history import History
from gradwatch.layers import Pattern, _as_patterns, _as_types, select_parameters
from gradwatch.monitor import Monitor

log = logging.getLogger("gradwatch")

__all__ = ["GradWatchCallback", "NAMESPACES", "PROG_BAR_KEY"]

_CANDIDATES = ("lightning.pytorch", "pytorch_lightning")


def _import_namespaces() -> dict[str, Any]:
    found = {}
    for name in _CANDIDATES:
        try:
            found[name] = importlib.import_module(name)
        except ImportError:
            continue
    return found


_MODULES = _import_namespaces()
if not _MODULES:
    raise ImportError(
        "gradwatch.integrations.lightning needs Lightning: pip install lightning (or pytorch-lightning)"
    )

#: The Lightning packages ``GradWatchCallback`` works with in this environment.
NAMESPACES: tuple[str, ...] = tuple(_MODULES)
_BASES = tuple(module.Callback for module in _MODULES.values())

#: Key of the progress-bar figure (``prog_bar=True``).
PROG_BAR_KEY = "g2w_early"

_STATE_VERSION = 1
_GRANULARITIES = ("layer", "parameter")
#: Monitor arguments the callback sets itself (the rest can be passed through ``**monitor_kwargs``).
_RESERVED = frozenset(
    {"self", "model", "optimizer", "log_dir", "writer", "every", "params", "granularity", "include", "exclude",
     "include_types", "exclude_types", "track_updates", "histograms", "prefix", "strict"}
)


class GradWatchCallback(*_BASES):  # type: ignore[misc]
    r"""Per-layer gradient diagnostics for a Lightning ``Trainer``, written next to your own ``self.log`` metrics.

    At every logging step the callback measures, per layer of the ``LightningModule`` (see
    :class:`gradwatch.Monitor`): ``grad_norm``, ``weight_norm``, ``grad_to_weight`` and ``update_to_weight``
    (across the optimizer step), plus the same over the whole model as ``_global``.

    **When it measures.** In ``on_before_optimizer_step``, once per optimizer step. Gradients there are
    accumulated over ``accumulate_grad_batches``, synchronised across DDP ranks, unscaled by the AMP
    ``GradScaler`` and not yet clipped (``gradient_clip_val`` applies after). Optimizers that unscale inside
    their own step (``_step_supports_amp_scaling``, e.g. ``Adam(fused=True)``) still hold scaled gradients
    there: the callback divides by the scaler's loss scale (its device tensor: no host sync). A step the
    scaler skips because the gradients overflowed is not recorded: for fused optimizers the scaler's
    ``found_inf`` flag is read inside the step, for the others the step never runs (the callback's step
    post-hook does not fire) and the measurement is dropped at ``on_train_batch_end``
    (``Monitor.discard_step``: nothing is moved to the host). ``update_to_weight`` is measured across the step
    by a step post-hook on the torch optimizer, so it includes clipping and the learning rate.

    **Which steps.** The step axis is the one ``self.log(..., on_step=True)`` uses:
    ``trainer.fit_loop.epoch_loop._batches_that_stepped`` (batches after which the optimizers stepped; equal
    to ``trainer.global_step`` with one optimizer, half of it with two). The callback measures at step 0 (the
    state at initialisation) and at the steps where Lightning writes ``self.log`` values: ``every - 1``,
    ``2 * every - 1``, ... With several optimizers (manual optimization), each is measured at its own step
    (its own ``on_before_optimizer_step``) within a logging batch, the first time it steps in that batch.

    **Where it writes** (rank 0 only; other ranks write nothing and open no files):

    - every ``TensorBoardLogger`` of the trainer (either package's class): scalars ``<metric>/<layer>`` and
      histograms ``hist/<metric>`` through the logger's own ``SummaryWriter``, on the step axis above;
    - every other logger (``CSVLogger``, W&B, ...): one flat ``{tag: value}`` dict per logging step through
      ``logger.log_metrics``;
    - no logger: a ``SummaryWriter`` in ``<trainer.default_root_dir>/gradwatch`` (announced once).

    With several optimizers each gets a monitor of its own, restricted to the parameters it holds, and its
    tags start with ``optimizer_<i>/`` (``i`` = position in ``configure_optimizers``).

    **Monitor features that run beside the norms.** Where the monitor measures block flow in the forward
    pass, the callback arms it on its own logging batches (``Monitor.flow_trigger``), in the first
    optimizer's monitor only. Where a monitor asks to stop (``Monitor.should_stop``, e.g. an alert policy
    ``on_critical="stop"``), the callback sets ``trainer.should_stop`` at the end of that batch, decided
    with ``trainer.strategy.reduce_boolean_decision`` so that all ranks agree; that all-reduce runs only when
    some monitor's policy is ``"stop"`` or ``"raise"``. ``GradientAlarm`` (policy ``"raise"``) is let through
    even when ``strict=False``. The callback passes ``Monitor(sync_ranks=True)`` (every rank runs its hooks;
    ``sync_ranks=False`` in ``monitor_kwargs`` overrides it). With only non-TensorBoard loggers,
    ``alerts.jsonl`` goes to the first logger's ``log_dir`` (else ``<default_root_dir>/gradwatch``).

    Args:
        every: measure every ``every`` steps (see above). ``None`` (default): the trainer's
            ``log_every_n_steps``.
        granularity: ``"layer"`` (default) or ``"parameter"``.
        include, exclude: glob patterns (``"net.layer1.*"``) or compiled regexes on layer names.
        include_types, exclude_types: module classes to keep or drop (e.g. ``nn.BatchNorm2d``).
        track_updates: measure ``update_to_weight`` (costs one copy of the measured weights during logging
            steps only).
        histograms: also write a histogram across layers per metric (TensorBoard loggers only).
        prefix: prepended to every tag (e.g. ``"gradwatch/"`` puts everything in one TensorBoard section).
        prog_bar: show ``g2w_early`` in the progress bar: the largest ``grad_to_weight`` among the first
            quarter of the measured layers (in definition order), from the latest measurement.
        strict: re-raise errors raised inside gradwatch (for tests). Otherwise they are logged on the
            ``gradwatch`` logger, kept in :attr:`errors`, and training goes on.
        **monitor_kwargs: any other :class:`gradwatch.Monitor` argument, passed to every monitor unchanged
            (checked against ``Monitor``'s signature here, at construction; ``rules``, ``on_critical`` and
            ``alert_cooldown`` are checked by gradwatch's alert code at construction too).

    Raises:
        TypeError: an argument of the wrong type (``every`` not an int, a pattern that is neither a string nor
            a compiled regex, a type that is not an ``nn.Module`` subclass, a flag that is not a bool), or a
            ``monitor_kwargs`` name that ``Monitor`` does not take or that the callback sets itself.
        ValueError: ``every < 1``; ``granularity`` not ``"layer"``/``"parameter"``; an unknown rule name,
            ``on_critical`` or negative ``alert_cooldown``; at ``fit`` start, when the filters leave nothing to
            measure in any optimizer's parameters.

    Example::

        >>> from lightning.pytorch import Trainer                    # or: from pytorch_lightning import Trainer
        >>> from lightning.pytorch.loggers import TensorBoardLogger
        >>> from gradwatch.integrations.lightning import GradWatchCallback
        >>> cb = GradWatchCallback()
        >>> trainer = Trainer(callbacks=[cb], logger=TensorBoardLogger("runs"))   # doctest: +SKIP
        >>> trainer.fit(model)                                                       # doctest: +SKIP
        >>> cb.monitor.history()        # columns step, name, metric, value      # doctest: +SKIP

    ``cb.monitor`` is the underlying :class:`gradwatch.Monitor` (the first optimizer's; ``cb.monitors`` has
    them all), built at the start of every ``fit``; ``None`` before. Its state (step counter) is saved in
    checkpoints; a fit resumed with ``ckpt_path=`` continues the same step axis.
    """

    def __init__(
        self,
        every: int | None = None,
        *,
        granularity: str = "layer",
        include: Pattern | Iterable[Pattern] | None = None,
        exclude: Pattern | Iterable[Pattern] | None = None,
        include_types: type | Iterable[type] | None = None,
        exclude_types: type | Iterable[type] | None = None,
        track_updates: bool = True,
        histograms: bool = True,
        prefix: str = "",
        prog_bar: bool = False,
        strict: bool = False,
        **monitor_kwargs: Any,
    ) -> None:
        super().__init__()
        accepted = set(inspect.signature(Monitor.__init__).parameters) - _RESERVED
        for name in monitor_kwargs:
            if name in _RESERVED:
                raise TypeError(f"GradWatchCallback sets Monitor's {name!r} itself; it cannot be passed")
            if name not in accepted:
                raise TypeError(
                    f"GradWatchCallback got an unexpected argument {name!r} "
                    f"(neither its own nor gradwatch.Monitor's: {', '.join(sorted(accepted)) or 'none'})"
                )
        _check_alert_arguments(monitor_kwargs)
        if every is not None:
            if isinstance(every, bool) or not isinstance(every, int):
                raise TypeError(f"every must be None or an int >= 1, got {type(every).__name__}")
            if every < 1:
                raise ValueError(f"every must be None (follow log_every_n_steps) or >= 1, got {every}")
        if granularity not in _GRANULARITIES:
            raise ValueError(f"granularity must be 'layer' or 'parameter', got {granularity!r}")
        for name, flag in (
            ("track_updates", track_updates),
            ("histograms", histograms),
            ("prog_bar", prog_bar),
            ("strict", strict),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self._filters = {
            "granularity": granularity,
            "include": _as_patterns(include, "include") or None,
            "exclude": _as_patterns(exclude, "exclude") or None,
            "include_types": _as_types(include_types, "include_types") or None,
            "exclude_types": _as_types(exclude_types, "exclude_types") or None,
        }
        self.every = every
        self.track_updates = track_updates
        self.histograms = histograms
        self.prefix = prefix
        self.prog_bar = prog_bar
        self.strict = strict
        self.monitor_kwargs = dict(monitor_kwargs)
        #: Errors contained inside the callback's hooks, as "ExceptionType: message" strings.
        self.errors: list[str] = []
        #: Where the callback's own SummaryWriter writes when the trainer has no logger (rank 0), else None.
        self.log_dir: str | None = None
        self._every: int | None = None  # resolved at fit start
        self._monitors: dict[str, Monitor] = {}
        self._by_optimizer: dict[int, _Slot] = {}
        self._handles: list[Any] = []
        self._own_writer: Any = None
        self._sinks: list[_LoggerWriter] = []
        self._loaded_state: dict[str, Any] | None = None
        self._announced = False
        self._tap: _Tap | None = None

    # ------------------------------------------------------------------ public API
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    @property
    def monitor(self) -> Monitor | None:
        """The underlying :class:`gradwatch.Monitor` (the first optimizer's); ``None`` before ``fit`` starts."""
        return next(iter(self._monitors.values()), None)

    @property
    def monitors(self) -> dict[str, Monitor]:
        """One monitor per optimizer that holds measured parameters: ``{"optimizer_0": Monitor, ...}``."""
        return dict(self._monitors)

    def is_logging_step(self, step: int) -> bool:
        """Whether the callback measures at ``step`` (on the ``self.log`` step axis) during this fit."""
        every = self._every if self._every is not None else self.every
        if not every:
            return False
        return step == 0 or (step + 1) % every == 0

    def history(self) -> pd.DataFrame:
        """Every logged value of every monitor: columns ``step, name, metric, value``.

        With several optimizers, names carry the optimizer key: ``optimizer_1/disc.fc``.
        """
        frames = []
        for key, mon in self._monitors.items():
            df = mon.history()
            if len(self._monitors) > 1:
                df["name"] = key + "/" + df["name"].astype(str)
            frames.append(df)
        if not frames:
            return History().to_frame()
        return pd.concat(frames, ignore_index=True)

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._teardown_hooks()
        every = self.every
        if every is None:
            every = int(getattr(trainer, "log_every_n_steps", 50) or 0)
            if every < 1:
                _rank_zero_info(
                    trainer,
                    "GradWatchCallback: trainer.log_every_n_steps=0 turns logging off, so gradwatch measures "
                    "nothing; pass GradWatchCallback(every=N) to measure anyway.",
                )
        self._every = every
        writer = self._build_writer(trainer) if getattr(trainer, "is_global_zero", True) else None

        optimizers = [_unwrap(o) for o in getattr(trainer, "optimizers", [])]
        optimizers = [o for o in optimizers if isinstance(o, torch.optim.Optimizer)]
        module_params = {id(p) for p in pl_module.parameters()}
        several = len(optimizers) > 1
        monitors: dict[str, Monitor] = {}
        by_optimizer: dict[int, _Slot] = {}
        skipped: list[str] = []
        filtered: list[str] = []
        for index, opt in enumerate(optimizers):
            key = f"optimizer_{index}"
            params = [p for g in opt.param_groups for p in g["params"] if id(p) in module_params]
            if not params:
                skipped.append(f"{key}: holds none of the LightningModule's parameters")
                continue
            prefix = f"{self.prefix}{key}/" if several else self.prefix
            if not select_parameters(pl_module, **self._filters, only={id(p) for p in params}).params:
                # Only this is "nothing to measure"; any other error of Monitor's propagates as itself.
                filtered.append(f"{key}: include/exclude filters leave no trainable parameters to measure")
                continue
            mon = Monitor(
                pl_module,
                writer=writer,
                every=max(every, 1),
                track_updates=self.track_updates,
                histograms=self.histograms,
                prefix=prefix,
                strict=self.strict,
                params=params,
                **self._filters,
                **self._sync_kwargs(),
                **self.monitor_kwargs,
            )
            monitors[key] = mon
            # Block-flow hooks run in the forward pass: arm them on this callback's logging batches, and only in
            # the first monitor (every monitor watches the whole module's blocks).
            first = not by_optimizer
            mon.flow_trigger = (lambda: self.is_logging_step(_axis_step(trainer))) if first else (lambda: False)
            early = mon.layer_names[: max(1, len(mon.layer_names) // 4)]
            by_optimizer[id(opt)] = _Slot(key, mon, opt, {f"{prefix}grad_to_weight/{n}" for n in early})
        if not monitors and filtered:  # the user's options select nothing: a configuration error
            raise ValueError(f"GradWatchCallback has nothing to measure ({'; '.join(filtered)})")
        if not monitors:
            warnings.warn(
                "GradWatchCallback: no optimizer holds parameters of the LightningModule; nothing is measured",
                stacklevel=2,
            )
        elif skipped or filtered:
            log.info("gradwatch: not measured: %s", "; ".join(skipped + filtered))

        self._monitors = monitors
        self._by_optimizer = by_optimizer
        for slot in by_optimizer.values():
            # Always hooked, even without track_updates: the end of the step is where an AMP overflow shows.
            if hasattr(slot.optimizer, "register_step_post_hook"):
                self._handles.append(slot.optimizer.register_step_post_hook(self._after_optimizer_step))
                slot.hooked = True
        if self._loaded_state is not None:
            self._apply_state(self._loaded_state)
            self._loaded_state = None

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        slot = self._by_optimizer.get(id(_unwrap(optimizer)))
        if slot is None:
            return
        try:
            step = _axis_step(trainer)
            if not self.is_logging_step(step) or slot.last_step == step:
                return
            slot.last_step = step
            grad_scale = None
            scaler = _scaler(trainer)
            if scaler is not None and getattr(slot.optimizer, "_step_supports_amp_scaling", False):
                # Lightning leaves unscaling to the optimizer's own step: grads here are still scaled. The
                # scale stays on the device (get_scale() would be an extra host sync); it joins the one transfer.
                grad_scale = _scale_tensor(scaler)
            slot.pending = slot.monitor.begin_step(
                step, grad_scale=grad_scale, track_update=self.track_updates and slot.hooked
            )
            if slot.pending and not slot.hooked:
                self._end(slot)
        except Exception as err:
            self._contain(err, slot)

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        slot = self._by_optimizer.get(id(optimizer))
        if slot is None or not slot.pending:
            return
        try:
            # Inside GradScaler.step a fused optimizer carries the overflow flag; the step skipped itself if set.
            self._end(slot, getattr(optimizer, "found_inf", None))
        except Exception as err:
            self._contain(err, slot)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        try:
            for slot in self._by_optimizer.values():
                if slot.pending:
                    # The optimizer never stepped after its measurement: GradScaler skipped it (overflow).
                    log.debug("gradwatch: %s did not step at step %s; measurement dropped", slot.key, slot.last_step)
                    slot.pending = False
                    slot.monitor.discard_step()
            if self.is_logging_step(_axis_step(trainer)) and any(_can_stop(m) for m in self._monitors.values()):
                # Alert policy on_critical="stop"/"raise": every rank takes part, so the decision is the same
                # on all. Only then: reduce_boolean_decision is an all_reduce plus a host sync.
                stop = any(m.should_stop for m in self._monitors.values())
                if trainer.strategy.reduce_boolean_decision(stop, all=False):
                    trainer.should_stop = True
            health = [s.health for s in self._by_optimizer.values() if s.health is not None]
            if self.prog_bar and health:
                pl_module.log(
                    PROG_BAR_KEY, max(health), prog_bar=True, logger=False, on_step=True, on_epoch=False,
                    rank_zero_only=True,
                )
        except Exception as err:
            self._contain(err)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def state_dict(self) -> dict[str, Any]:
        if not self._monitors and self._loaded_state is not None:
            return dict(self._loaded_state)
        return {
            "version": _STATE_VERSION,
            "monitors": {key: mon.state_dict() for key, mon in self._monitors.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("monitors"), dict):
            raise ValueError("not a GradWatchCallback state_dict (missing 'monitors')")
        if self._monitors:
            self._apply_state(state_dict)
        else:  # Lightning restores callbacks before the optimizers exist: applied in on_fit_start
            self._loaded_state = state_dict

    def __repr__(self) -> str:
        return (
            f"GradWatchCallback(every={self.every}, prefix={self.prefix!r}, "
            f"monitors={list(self._monitors) or None})"
        )

    # ------------------------------------------------------------------ internals
    def _sync_kwargs(self) -> dict[str, Any]:
        """``sync_ranks=True`` unless the user passed it: every rank runs the callback's hooks, so the per-rank
        block-flow norms can be all-reduced and the alert rules see (and decide) the same on every rank."""
        return {} if "sync_ranks" in self.monitor_kwargs else {"sync_ranks": True}

    def _end(self, slot: _Slot, found_inf: Any = None) -> None:
        slot.pending = False
        self._tap = tap = _Tap(slot.early_tags)
        try:
            slot.monitor.end_step(found_inf=found_inf)
        finally:
            self._tap = None
        for sink in self._sinks:
            sink.flush()
        if tap.values:
            slot.health = max(tap.values)

    def _apply_state(self, state: dict[str, Any]) -> None:
        for key, sub in state.get("monitors", {}).items():
            if key in self._monitors:
                self._monitors[key].load_state_dict(sub)

    def _build_writer(self, trainer: Any) -> Any:
        """The SummaryWriter-like object the monitors write to on rank 0."""
        tb_classes = _tensorboard_logger_classes()
        targets: list[Any] = []
        others = []
        for logger in getattr(trainer, "loggers", []) or []:
            if tb_classes and isinstance(logger, tb_classes):
                targets.append(logger.experiment)
            else:
                others.append(logger)
        self._sinks = []
        if others:
            # Its directory is where the monitors' alerts.jsonl goes when no TensorBoard logger gives one.
            sink = _LoggerWriter(others, os.path.join(str(trainer.default_root_dir), "gradwatch"))
            self._sinks.append(sink)
            targets.append(sink)
        if not targets:
            from torch.utils.tensorboard import SummaryWriter

            path = os.path.join(str(trainer.default_root_dir), "gradwatch")
            if self._own_writer is None or self.log_dir != path:
                os.makedirs(path, exist_ok=True)
                self._own_writer = SummaryWriter(log_dir=path)
                self.log_dir = path
            if not self._announced:
                self._announced = True
                _rank_zero_info(
                    trainer, f"GradWatchCallback: the trainer has no logger; writing TensorBoard events to {path}"
                )
            targets.append(self._own_writer)
        tap_writer = _TapWriter(self)
        return _FanOut([*targets, tap_writer])

    def _teardown_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _close(self) -> None:
        """End of fit: remove every hook (the callback's and the monitors'); histories stay readable."""
        self._teardown_hooks()
        for mon in self._monitors.values():
            mon.close()  # flushes our writer, does not close it (the loggers own theirs)
        for sink in self._sinks:
            sink.flush()
        if self._own_writer is not None:
            self._own_writer.flush()
            self._own_writer.close()
            self._own_writer = None

    def _contain(self, err: BaseException, slot: _Slot | None = None) -> None:
        if slot is not None:
            slot.pending = False
        if self.strict or isinstance(err, GradientAlarm):
            raise err  # on_critical="raise" is the user's request to stop training
        text = f"{type(err).__name__}: {err}"
        self.errors.append(text)
        if len(self.errors) <= 3:
            log.error("gradwatch: error inside GradWatchCallback, measurement skipped: %s", text, exc_info=err)


class _Slot:
    """One optimizer's monitor and the bookkeeping of its current measurement."""

    __slots__ = ("key", "monitor", "optimizer", "early_tags", "hooked", "pending", "last_step", "health")

    def __init__(self, key: str, monitor: Monitor, optimizer: torch.optim.Optimizer, early_tags: set[str]) -> None:
        self.key = key
        self.monitor = monitor
        self.optimizer = optimizer
        self.early_tags = early_tags
        self.hooked = False
        self.pending = False
        self.last_step: int | None = None
        self.health: float | None = None  # largest early-layer grad_to_weight of the latest measurement


class _Tap:
    """Collects the early layers' grad_to_weight values written during one measurement."""

    def __init__(self, tags: set[str]) -> None:
        self.tags = tags
        self.values: list[float] = []


class _TapWriter:
    """Writer stub that hands scalars to the callback's current :class:`_Tap` (progress-bar figure)."""

    def __init__(self, owner: GradWatchCallback) -> None:
        self.owner = owner

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        tap = self.owner._tap
        if tap is not None and tag in tap.tags and np.isfinite(value):
            tap.values.append(float(value))

    def add_histogram(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flush(self) -> None:
        pass


class _LoggerWriter:
    """SummaryWriter-like adapter that sends scalars to Lightning loggers as flat dicts via ``log_metrics``."""

    def __init__(self, loggers: Sequence[Any], fallback_dir: str) -> None:
        self.loggers = list(loggers)
        self.fallback_dir = fallback_dir
        self._step: int | None = None
        self._buffer: dict[str, float] = {}

    def get_logdir(self) -> str:
        """The first logger's ``log_dir`` (``CSVLogger`` has one), else ``<default_root_dir>/gradwatch``: where
        the monitors write ``alerts.jsonl``, so the alert record exists whatever the loggers."""
        for logger in self.loggers:
            try:
                d = getattr(logger, "log_dir", None)
            except Exception:  # a logger whose log_dir needs a live experiment
                d = None
            if d:
                return str(d)
        return self.fallback_dir

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._step is not None and step != self._step:
            self.flush()
        self._step = int(step)
        self._buffer[tag] = float(value)

    def add_histogram(self, *args: Any, **kwargs: Any) -> None:
        pass  # flat-scalar loggers have no histograms

    def flush(self) -> None:
        if not self._buffer:
            return
        metrics, self._buffer = self._buffer, {}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self._step)


class _FanOut:
    """SummaryWriter-like object that forwards every call to several writers."""

    def __init__(self, writers: Sequence[Any]) -> None:
        self.writers = list(writers)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for w in self.writers:
            w.add_scalar(tag, value, step)

    def add_histogram(self, tag: str, values: Any, step: int) -> None:
        for w in self.writers:
            w.add_histogram(tag, values, step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        for w in self.writers:
            add_text = getattr(w, "add_text", None)
            if add_text is not None:
                add_text(tag, text, step)

    def get_logdir(self) -> str | None:
        for w in self.writers:
            get = getattr(w, "get_logdir", None)
            if get is not None:
                return get()
        return None

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        self.flush()


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside a ``LightningOptimizer`` (either package's)."""
    if type(optimizer).__name__ == "LightningOptimizer":
        return getattr(optimizer, "_optimizer", optimizer)
    return optimizer


def _axis_step(trainer: Any) -> int:
    """The step Lightning's ``self.log`` writes at during training: batches after which the optimizers stepped."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    step = getattr(loop, "_batches_that_stepped", None)
    return int(step) if step is not None else int(trainer.global_step)


def _check_alert_arguments(kwargs: dict[str, Any]) -> None:
    """Run the monitor's own checks of its alert arguments now, so a mistake fails at construction.

    ``check_arguments`` opens nothing; the rules it builds (fresh objects for dict/name specs) are discarded.
    """
    defaults = inspect.signature(Monitor.__init__).parameters
    check_arguments(
        rules=kwargs.get("rules", defaults["rules"].default),
        alert_sinks=kwargs.get("alert_sinks", defaults["alert_sinks"].default),
        on_critical=kwargs.get("on_critical", defaults["on_critical"].default),
        cooldown=kwargs.get("alert_cooldown", defaults["alert_cooldown"].default),
    )


def _scale_tensor(scaler: Any) -> Any:
    """The scaler's current loss scale, as a device tensor when the scaler offers one (no host sync)."""
    get_async = getattr(scaler, "_get_scale_async", None)
    if callable(get_async):
        scale = get_async()
        if scale is not None:
            return scale
    return scaler.get_scale()


def _can_stop(monitor: Monitor) -> bool:
    """Whether ``monitor``'s alert policy can ever set ``should_stop`` (``on_critical`` "stop" or "raise")."""
    # Monitor exposes no public accessor for its policy; the AlertManager it holds (None: alerting off) does.
    manager = getattr(monitor, "_alerts", None)
    return manager is not None and manager.on_critical in ("stop", "raise")


def _scaler(trainer: Any) -> Any:
    plugin = getattr(trainer, "precision_plugin", None)
    scaler = getattr(plugin, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return None
    return scaler


def _namespace_of(obj: Any) -> Any:
    module = type(obj).__module__
    for name, mod in _MODULES.items():
        if module == name or module.startswith(name + "."):
            return mod
    return next(iter(_MODULES.values()))


def _tensorboard_logger_classes() -> tuple[type, ...]:
    classes = []
    for name in _MODULES:
        try:
            classes.append(importlib.import_module(name + ".loggers").TensorBoardLogger)
        except (ImportError, AttributeError):
            continue
    return tuple(classes)


def _rank_zero_info(trainer: Any, message: str) -> None:
    """Say ``message`` once, on rank 0, through the trainer's own package (visible at Lightning's INFO level)."""
    try:
        info = importlib.import_module(_namespace_of(trainer).__name__ + ".utilities.rank_zero").rank_zero_info
    except (ImportError, AttributeError):
        if getattr(trainer, "is_global_zero", True):
            log.warning(message)
        return
    info(message)
