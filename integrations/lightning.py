"""Lightning adapter: :class:`GradWatchCallback`, for ``lightning.pytorch`` and ``pytorch_lightning`` alike.

The two packages ship separate ``Callback`` class hierarchies. ``GradWatchCallback`` subclasses the ``Callback``
of every one of them that is installed, so one class serves both ``lightning.pytorch.Trainer`` and
``pytorch_lightning.Trainer``. It connects Lightning's hooks to public :class:`gradwatch.Monitor` calls and
turns each :class:`gradwatch.StepRecord` into the trainer's loggers' calls; the measuring is the monitor's.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from typing import Any

import numpy as np
import pandas as pd
import torch

from gradwatch import (
    Config, GradientAlarm, History, Monitor, NothingToMeasure, Sink, StepRecord, TensorBoardSink, amp_grad_scale,
    early_count,
)
from gradwatch.sinks import open_writer

log = logging.getLogger("gradwatch")

__all__ = ["GradWatchCallback", "NAMESPACES", "PROG_BAR_KEY"]


def _import_namespaces() -> dict[str, Any]:
    found = {}
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            found[name] = importlib.import_module(name)
        except ImportError:
            continue
    return found


_MODULES = _import_namespaces()
if not _MODULES:
    raise ImportError("gradwatch.integrations.lightning needs Lightning: pip install lightning (or pytorch-lightning)")

#: The Lightning packages ``GradWatchCallback`` works with in this environment.
NAMESPACES: tuple[str, ...] = tuple(_MODULES)
_BASES = tuple(module.Callback for module in _MODULES.values())
_TENSORBOARD_LOGGERS = tuple(m.loggers.TensorBoardLogger for m in _MODULES.values() if hasattr(m, "loggers"))

#: Key of the progress-bar figure (``prog_bar=True``).
PROG_BAR_KEY = "g2w_early"

_STATE_VERSION = 1


class GradWatchCallback(*_BASES):  # type: ignore[misc]
    r"""Per-layer gradient diagnostics for a Lightning ``Trainer``, written next to your own ``self.log`` metrics.

    At every logging step the callback measures, per layer of the ``LightningModule`` (see
    :class:`gradwatch.Monitor`): ``grad_norm``, ``weight_norm``, ``grad_to_weight`` and ``update_to_weight``
    (across the optimizer step), plus the same over the whole model as ``_global``, and block flow.

    **When it measures.** In ``on_before_optimizer_step``, once per optimizer step. Gradients there are
    accumulated over ``accumulate_grad_batches``, synchronised across DDP ranks, unscaled by the AMP
    ``GradScaler`` and not yet clipped (``gradient_clip_val`` applies after). Optimizers that unscale inside
    their own step (``Adam(fused=True)``) still hold scaled gradients there: the callback divides by the
    scaler's loss scale (:func:`gradwatch.amp_grad_scale`: a device tensor, no host sync). A step the scaler
    skips because the gradients overflowed is not recorded: for fused optimizers the scaler's ``found_inf``
    flag is read inside the step; for the others the step never runs (the callback's step post-hook does not
    fire) and the measurement is dropped at ``on_train_batch_end`` (``Monitor.discard_step``: nothing is moved
    to the host). ``update_to_weight`` is measured across the step by a step post-hook on the torch optimizer,
    so it includes clipping and the learning rate.

    **Which steps.** The step axis is the one ``self.log(..., on_step=True)`` uses: batches after which the
    optimizers stepped (equal to ``trainer.global_step`` with one optimizer, half of it with two). The callback
    measures at step 0 (the state at initialisation) and at the steps where Lightning writes ``self.log``
    values: ``every - 1``, ``2 * every - 1``, ... With several optimizers (manual optimization), each is
    measured at its own step within a logging batch, the first time it steps in that batch.

    **Where it writes** (rank 0 only; other ranks write nothing and open no files): every ``TensorBoardLogger``
    (either package's) gets the record as TensorBoard scalars ``<metric>/<layer>`` and histograms
    ``hist/<metric>``; every other logger (``CSVLogger``, W&B, ...) one flat ``{tag: value}`` dict per
    logging step through ``logger.log_metrics`` (no histograms, no ``nonfinite/`` counters); with no logger, a
    ``SummaryWriter`` in ``<trainer.default_root_dir>/gradwatch`` (announced once). ``alerts.jsonl`` goes to
    the first TensorBoard logger's directory, else the first logger's ``log_dir``, else
    ``<default_root_dir>/gradwatch``. With several optimizers each gets a monitor of its own, restricted to the
    parameters it holds, and its tags start with ``optimizer_<i>/`` (``i`` = position in
    ``configure_optimizers``).

    **Block flow and alerts.** Block-flow hooks are armed on the callback's own logging batches
    (``Monitor.flow_trigger``), in the first optimizer's monitor only. Monitors sync block flow across ranks
    (``sync_ranks=True`` unless given). Where a monitor asks to stop (``on_critical="stop"``), the callback sets
    ``trainer.should_stop`` at the end of that batch, decided with ``trainer.strategy.reduce_boolean_decision``
    so that all ranks agree; that all-reduce runs only when a monitor's policy is ``"stop"`` or ``"raise"``.
    ``GradientAlarm`` (policy ``"raise"``) is let through even when ``strict=False``.

    Args:
        every: measure every ``every`` steps (see above). ``None`` (default): the trainer's
            ``log_every_n_steps``.
        prog_bar: show ``g2w_early`` in the progress bar: the largest ``grad_to_weight`` among the early layers
            (the first :data:`gradwatch.EARLY_FRACTION` of the measured layers, in definition order) of the
            latest measurement.
        **options: any option of :class:`gradwatch.Monitor` (``granularity``, ``include``, ``rules``,
            ``on_critical``, ``prefix``, ``histograms``, ``strict``, ...), checked here by
            :meth:`gradwatch.Config.from_options` and passed to every monitor.

    Raises:
        TypeError: an unknown option (``log_dir``, ``writer`` and ``params`` are the callback's to set), or one
            of the wrong type (``every=2.5``, ``prog_bar="yes"``).
        ValueError: an option with a wrong value (``every=0``, ``granularity="block"``); at ``fit`` start, when
            the filters leave nothing to measure in any optimizer's parameters.

    Example::

        >>> from lightning.pytorch import Trainer                    # or: from pytorch_lightning import Trainer
        >>> from lightning.pytorch.loggers import TensorBoardLogger
        >>> from gradwatch.integrations.lightning import GradWatchCallback
        >>> cb = GradWatchCallback()
        >>> trainer = Trainer(callbacks=[cb], logger=TensorBoardLogger("runs"))   # doctest: +SKIP
        >>> trainer.fit(model)                                                       # doctest: +SKIP
        >>> cb.monitor.history()        # columns step, name, metric, value      # doctest: +SKIP

    ``cb.monitor`` is the first optimizer's :class:`gradwatch.Monitor` (``cb.monitors`` has them all), built at
    the start of every ``fit``; ``None`` before. Its state (step counter, alert rule state) is saved in
    checkpoints; a fit resumed with ``ckpt_path=`` continues the same step axis.
    """

    def __init__(self, every: int | None = None, *, prog_bar: bool = False, **options: Any) -> None:
        super().__init__()
        if not isinstance(prog_bar, bool):
            raise TypeError(f"prog_bar must be a bool, got {type(prog_bar).__name__}")
        if every is not None:
            options["every"] = every
        #: The checked options every monitor is built from.
        self.config = Config.from_options(owner="GradWatchCallback", **options)
        self.every = every
        self.prog_bar = prog_bar
        #: Errors contained inside the callback's hooks, as "ExceptionType: message" strings.
        self.errors: list[str] = []
        #: Where the callback's own SummaryWriter writes when the trainer has no logger (rank 0), else None.
        self.log_dir: str | None = None
        self._every: int | None = None  # resolved at fit start
        self._slots: dict[int, _Slot] = {}  # id(torch optimizer) -> its monitor
        self._handles: list[Any] = []
        self._own_writer: Any = None
        self._loaded_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ public API
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.config.output.prefix)

    @property
    def monitor(self) -> Monitor | None:
        """The first optimizer's :class:`gradwatch.Monitor`; ``None`` before ``fit`` starts."""
        return next((s.monitor for s in self._slots.values()), None)

    @property
    def monitors(self) -> dict[str, Monitor]:
        """One monitor per optimizer that holds measured parameters: ``{"optimizer_0": Monitor, ...}``."""
        return {s.key: s.monitor for s in self._slots.values()}

    def is_logging_step(self, step: int) -> bool:
        """Whether the callback measures at ``step`` (on the ``self.log`` step axis) during this fit."""
        every = self._every if self._every is not None else self.every
        return bool(every) and (step == 0 or (step + 1) % every == 0)

    def history(self) -> pd.DataFrame:
        """Every logged value of every monitor: columns ``step, name, metric, value``; with several optimizers,
        names carry the optimizer key: ``optimizer_1/disc.fc``."""
        frames = []
        for key, mon in self.monitors.items():
            df = mon.history()
            if len(self._slots) > 1:
                df["name"] = key + "/" + df["name"].astype(str)
            frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else History().to_frame()

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._teardown_hooks()
        self._every = self.every if self.every is not None else int(getattr(trainer, "log_every_n_steps", 50) or 0)
        if self._every < 1:
            _rank_zero_info(trainer, "GradWatchCallback: trainer.log_every_n_steps=0 turns logging off, so gradwatch "
                            "measures nothing; pass GradWatchCallback(every=N) to measure anyway.")
        self._slots = self._build_slots(trainer, pl_module)
        for slot in self._slots.values():
            # Always hooked, even without track_updates: the end of the step is where an AMP overflow shows.
            self._handles.append(slot.optimizer.register_step_post_hook(self._after_optimizer_step))
        if self._loaded_state is not None:
            self._apply_state(self._loaded_state)
            self._loaded_state = None

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        slot = self._slots.get(id(_unwrap(optimizer)))
        step = _log_step(trainer)
        if slot is None or not self.is_logging_step(step) or slot.last_step == step:
            return
        slot.last_step = step
        try:
            scale = amp_grad_scale(slot.optimizer, _scaler(trainer))
            slot.pending = slot.monitor.begin_step(step, grad_scale=scale,
                                                   track_update=self.config.measure.track_updates)
        except Exception as err:
            self._contain(err, slot)

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        slot = self._slots.get(id(optimizer))
        if slot is None or not slot.pending:
            return
        slot.pending = False
        try:
            # Inside GradScaler.step a fused optimizer carries the overflow flag; the step skipped itself if set.
            slot.monitor.end_step(found_inf=getattr(optimizer, "found_inf", None))
        except Exception as err:
            self._contain(err, slot)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        try:
            for slot in self._slots.values():
                if slot.pending:  # the optimizer never stepped after its measurement: GradScaler skipped it
                    slot.pending = False
                    slot.monitor.discard_step()
            if self.is_logging_step(_log_step(trainer)) and any(_can_stop(s.monitor) for s in self._slots.values()):
                # Only under a stopping policy: reduce_boolean_decision is an all_reduce plus a host sync.
                stop = any(s.monitor.should_stop for s in self._slots.values())
                if trainer.strategy.reduce_boolean_decision(stop, all=False):
                    trainer.should_stop = True
            health = [h for h in (_early_max(s.monitor.latest) for s in self._slots.values()) if h is not None]
            if self.prog_bar and health:
                pl_module.log(PROG_BAR_KEY, max(health), prog_bar=True, logger=False, on_step=True, on_epoch=False,
                              rank_zero_only=True)
        except Exception as err:
            self._contain(err)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def state_dict(self) -> dict[str, Any]:
        if not self._slots and self._loaded_state is not None:
            return dict(self._loaded_state)
        return {"version": _STATE_VERSION, "monitors": {k: m.state_dict() for k, m in self.monitors.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("monitors"), dict):
            raise ValueError("not a GradWatchCallback state_dict (missing 'monitors')")
        if self._slots:
            self._apply_state(state_dict)
        else:  # Lightning restores callbacks before the optimizers exist: applied in on_fit_start
            self._loaded_state = state_dict

    def __repr__(self) -> str:
        return f"GradWatchCallback(every={self.every}, monitors={list(self.monitors) or None})"

    # ------------------------------------------------------------------ internals
    def _build_slots(self, trainer: Any, pl_module: Any) -> dict[int, _Slot]:
        """One monitor per optimizer that holds parameters of the module, writing to the trainer's loggers."""
        optimizers = [o for o in map(_unwrap, getattr(trainer, "optimizers", [])) if isinstance(o, torch.optim.Optimizer)]
        ours = {id(p) for p in pl_module.parameters()}
        base = self.config.replace(every=max(self._every, 1))
        if base.measure.sync_ranks is None:  # every rank runs these hooks: flow norms can be averaged over ranks
            base = base.replace(sync_ranks=True)
        writer, loggers = self._targets(trainer) if getattr(trainer, "is_global_zero", True) else (None, [])
        if writer is None and loggers and base.alerts.alerts_path is None:
            base = base.replace(alerts_path=os.path.join(_log_dir(loggers, trainer), "alerts.jsonl"))
        slots: dict[int, _Slot] = {}
        skipped: list[str] = []  # optimizers of other modules
        empty: list[str] = []  # optimizers whose parameters the options filter out entirely
        for index, opt in enumerate(optimizers):
            key = f"optimizer_{index}"
            params = [p for g in opt.param_groups for p in g["params"] if id(p) in ours]
            if not params:
                skipped.append(f"{key}: holds none of the LightningModule's parameters")
                continue
            prefix = base.output.prefix + (f"{key}/" if len(optimizers) > 1 else "")
            cfg = base.replace(prefix=prefix, sinks=(*base.output.sinks, *_logger_sinks(loggers, base, prefix)))
            try:
                mon = Monitor(pl_module, writer=writer, params=params, config=cfg)
            except NothingToMeasure as err:  # any other error of Monitor's propagates as itself
                empty.append(f"{key}: {err}")
                continue
            # Block-flow hooks run in the forward pass: armed on this callback's logging batches, first monitor only.
            first = not slots
            mon.flow_trigger = (lambda: self.is_logging_step(_log_step(trainer))) if first else (lambda: False)
            slots[id(opt)] = _Slot(key, mon, opt)
        if not slots and empty:  # the user's options select nothing: a configuration error
            raise ValueError(f"GradWatchCallback has nothing to measure ({'; '.join(empty)})")
        if not slots:
            warnings.warn("GradWatchCallback: no optimizer holds parameters of the LightningModule; nothing is "
                          "measured", stacklevel=2)
        elif skipped or empty:
            log.info("gradwatch: not measured: %s", "; ".join(skipped + empty))
        return slots

    def _targets(self, trainer: Any) -> tuple[Any, list[Any]]:
        """The writer the monitors write TensorBoard events with, and the other loggers."""
        loggers = list(getattr(trainer, "loggers", []) or [])
        tensorboard = [lg for lg in loggers if isinstance(lg, _TENSORBOARD_LOGGERS)]
        if tensorboard:
            return tensorboard[0].experiment, [lg for lg in loggers if lg is not tensorboard[0]]
        if loggers:
            return None, loggers
        path = os.path.join(str(trainer.default_root_dir), "gradwatch")
        if self._own_writer is None:  # closed at the end of each fit
            if self.log_dir != path:  # said once per place
                _rank_zero_info(trainer, f"GradWatchCallback: the trainer has no logger; writing TensorBoard events "
                                f"to {path}")
            self._own_writer, self.log_dir = open_writer(path), path
        return self._own_writer, []

    def _apply_state(self, state: dict[str, Any]) -> None:
        for key, mon in self.monitors.items():
            if key in state.get("monitors", {}):
                mon.load_state_dict(state["monitors"][key])

    def _teardown_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _close(self) -> None:
        """End of fit: remove every hook (the callback's and the monitors'); histories stay readable."""
        self._teardown_hooks()
        for mon in self.monitors.values():
            mon.close()  # flushes the loggers' writers and sinks, closes none of them
        if self._own_writer is not None:
            self._own_writer.close()
            self._own_writer = None

    def _contain(self, err: BaseException, slot: _Slot | None = None) -> None:
        if slot is not None:
            slot.pending = False
        if self.config.output.strict or isinstance(err, GradientAlarm):
            raise err  # on_critical="raise" is the user's request to stop training
        self.errors.append(f"{type(err).__name__}: {err}")
        if len(self.errors) <= 3:
            log.error("gradwatch: error inside GradWatchCallback, measurement skipped: %s", self.errors[-1],
                      exc_info=err)


class _Slot:
    """One optimizer's monitor and the state of its current measurement."""

    __slots__ = ("key", "monitor", "optimizer", "pending", "last_step")

    def __init__(self, key: str, monitor: Monitor, optimizer: torch.optim.Optimizer) -> None:
        self.key = key
        self.monitor = monitor
        self.optimizer = optimizer
        self.pending = False
        self.last_step: int | None = None


class _LoggerSink(Sink):
    """Each record as one flat ``{tag: value}`` dict through ``logger.log_metrics`` (CSV, W&B, MLflow, ...)."""

    def __init__(self, loggers: list[Any], prefix: str) -> None:
        self.loggers = loggers
        self.prefix = prefix

    def write(self, record: StepRecord) -> None:
        metrics = record.scalars(self.prefix)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=record.step)


def _logger_sinks(loggers: list[Any], cfg: Config, prefix: str) -> list[Sink]:
    """Sinks for the loggers besides the monitor's writer: more TensorBoard loggers, then the flat ones."""
    out: list[Sink] = [TensorBoardSink(lg.experiment, prefix, cfg.output.histograms)
                       for lg in loggers if isinstance(lg, _TENSORBOARD_LOGGERS)]
    flat = [lg for lg in loggers if not isinstance(lg, _TENSORBOARD_LOGGERS)]
    return out + ([_LoggerSink(flat, prefix)] if flat else [])


def _log_dir(loggers: list[Any], trainer: Any) -> str:
    """The first logger's ``log_dir`` (``CSVLogger`` has one), else ``<default_root_dir>/gradwatch``."""
    for logger in loggers:
        try:
            d = getattr(logger, "log_dir", None)
        except Exception:  # a logger whose log_dir needs a live experiment
            d = None
        if d:
            return str(d)
    return os.path.join(str(trainer.default_root_dir), "gradwatch")


def _early_max(record: StepRecord | None) -> float | None:
    """The progress-bar figure: the largest finite grad_to_weight among the early layers of ``record``."""
    if record is None or not record.layers:
        return None
    early = record.layer("grad_to_weight")[: early_count(len(record.layers))]
    early = early[np.isfinite(early)]
    return float(early.max()) if early.size else None


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside a ``LightningOptimizer`` (either package's)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _log_step(trainer: Any) -> int:
    """The step Lightning's ``self.log`` writes at during training: batches after which the optimizers stepped.
    Lightning keeps it in a private loop counter; ``trainer.global_step`` when that is gone."""
    step = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "_batches_that_stepped", None)
    return int(step) if step is not None else int(trainer.global_step)


def _can_stop(monitor: Monitor) -> bool:
    """Whether ``monitor``'s alert policy can ever set ``should_stop``."""
    return monitor.config.alerts.enabled and monitor.config.alerts.on_critical in ("stop", "raise")


def _scaler(trainer: Any) -> Any:
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _rank_zero_info(trainer: Any, message: str) -> None:
    """Say ``message`` once, on rank 0, through the trainer's own package (visible at Lightning's INFO level)."""
    module = type(trainer).__module__
    package = next((m for name, m in _MODULES.items() if module == name or module.startswith(name + ".")),
                   next(iter(_MODULES.values())))
    try:
        info = importlib.import_module(package.__name__ + ".utilities.rank_zero").rank_zero_info
    except (ImportError, AttributeError):
        if getattr(trainer, "is_global_zero", True):
            log.warning(message)
        return
    info(message)
