"""Lightning adapter: :class:`GradWatchCallback` drives one :class:`gradwatch.Monitor` per optimizer from
Lightning's hooks, through a :class:`gradwatch.driver.StepDriver`, and sends each record to the trainer's loggers. It subclasses the ``Callback`` of ``lightning.pytorch`` and
of ``pytorch_lightning``, whichever are installed, so one class serves both packages' trainers."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import warnings
from dataclasses import dataclass, fields
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from gradwatch import Config, GradientAlarm, Monitor, NothingToMeasure, Sink, TensorBoardSink
from gradwatch.config import BlocksSpec, ModuleTypes, Patterns, RulesSpec
from gradwatch.driver import StepDriver, amp_grad_scale
from gradwatch.sinks import AlertSink, ScalarsSink
from gradwatch.sinks.history import COLUMNS
from gradwatch.sinks.tensorboard import link, open_writer

log = logging.getLogger("gradwatch")

__all__ = ["GradWatchCallback", "NAMESPACES", "PROG_BAR_KEY", "PROG_BAR_ALERTS_KEY"]

_MODULES: dict[str, Any] = {}
for _name in ("lightning.pytorch", "pytorch_lightning"):
    try:
        _MODULES[_name] = importlib.import_module(_name)
    except ImportError:
        continue
if not _MODULES:
    raise ImportError("gradwatch.integrations.lightning needs Lightning: pip install lightning (or pytorch-lightning)")

#: The Lightning packages ``GradWatchCallback`` works with in this environment.
NAMESPACES: tuple[str, ...] = tuple(_MODULES)
_BASES = tuple(module.Callback for module in _MODULES.values())
_TENSORBOARD_LOGGERS = tuple(importlib.import_module(f"{n}.loggers").TensorBoardLogger for n in _MODULES)

#: Keys of the progress-bar figures: early layers' ratio (``prog_bar=True``), open incidents (warning and above).
PROG_BAR_KEY, PROG_BAR_ALERTS_KEY = "g2w_early", "gw_alerts"

_STATE_VERSION = 1
_OPTIONS = frozenset(f.name for f in fields(Config)) - {"every"}  # the keyword options shared with Monitor


class GradWatchCallback(*_BASES):  # type: ignore[misc]
    r"""Per-layer gradient diagnostics and block flow for a Lightning ``Trainer``, next to your ``self.log`` metrics.

    Measures in ``on_before_optimizer_step``, once per optimizer step: gradients accumulated, synced across
    ranks, unscaled by AMP (fused optimizers: divided by the loss scale, :func:`gradwatch.driver.amp_grad_scale`),
    not yet clipped. A step the AMP scaler skips is not recorded. ``update_to_weight`` spans the optimizer step.
    Steps are those of ``self.log(on_step=True)``: step 0, then ``every - 1``, ``2 * every - 1``, ...

    Writes on rank 0 to every ``TensorBoardLogger`` (scalars ``<metric>/<layer>``, histograms), to every other
    logger one flat dict per step (``log_metrics``), else to ``<default_root_dir>/gradwatch``;
    ``alerts.jsonl`` beside them. One monitor per optimizer (tags ``optimizer_<i>/`` when there are several).
    A monitor asking to stop (``on_critical="stop"``) sets ``trainer.should_stop``, agreed across ranks;
    ``GradientAlarm`` (``"raise"``) propagates. Details: ``docs/lightning.md``.

    Args:
        every: measure every ``every`` steps; ``None`` (default): the trainer's ``log_every_n_steps``.
        prog_bar: by default the bar shows ``gw_alerts`` (open incidents, warning and above); ``True`` adds
            ``g2w_early`` (the early layers' largest ``grad_to_weight``); ``False`` shows nothing.
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
        on_critical: ``"warn"`` (default); ``"stop"`` stops the trainer (``trainer.should_stop``, agreed across
            ranks); ``"raise"`` lets :class:`~gradwatch.GradientAlarm` out of ``trainer.fit()``.
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
            the end of ``fit``; 0: none.
        sinks: more sinks for every :class:`~gradwatch.StepRecord` (objects with ``write(record)``).
        history: logging steps kept in memory for ``cb.history()`` (the latest); ``None``: all.
        flight_recorder: logging steps kept for the flight recorder (default 64): when an incident opens,
            the records of the last N logging steps up to it are written next to ``alerts.jsonl``, one file
            per incident (``docs/alerts.md#flight-recorder-what-led-up-to-an-incident``); 0 turns it off.
        strict: re-raise errors inside gradwatch's hooks and sinks; otherwise they are logged, kept in
            ``cb.errors`` and ``cb.monitor.errors``, and training goes on.

    The options are :class:`gradwatch.Monitor`'s, checked now by :class:`gradwatch.Config` (``log_dir``,
    ``writer`` and ``params`` come from the trainer).

    Raises:
        TypeError: an option of the wrong type.
        ValueError: a wrong value (``every=0``); at ``fit`` start, filters that leave nothing to measure.

    Example::

        >>> from lightning.pytorch import Trainer                    # or: from pytorch_lightning import Trainer
        >>> from gradwatch.integrations.lightning import GradWatchCallback
        >>> cb = GradWatchCallback()
        >>> Trainer(callbacks=[cb]).fit(model)                       # doctest: +SKIP
        >>> cb.monitor.history()        # columns step, name, metric, value      # doctest: +SKIP

    ``cb.monitor`` is the first optimizer's :class:`gradwatch.Monitor` (``cb.monitors``: all), rebuilt at each
    ``fit``. Its state is saved in checkpoints: a fit resumed with ``ckpt_path=`` continues the step axis.
    """

    def __init__(
        self,
        every: int | None = None,
        *,
        prog_bar: bool | None = None,
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
        super().__init__()
        if prog_bar is not None and not isinstance(prog_bar, bool):
            raise TypeError(f"prog_bar must be a bool or None, got {type(prog_bar).__name__}")
        options = {k: v for k, v in locals().items() if k in _OPTIONS}
        #: The checked options every monitor is built from (``every`` resolved at each fit).
        self.config = Config(**options, **({} if every is None else {"every": every}))
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
        #: The TensorBoard link that pins the first charts you log above gradwatch's health card (said once, on
        #: rank 0, at the first logging step that logged any, from ``trainer.logged_metrics``: read in
        #: ``on_train_batch_end`` it is this batch's ``on_step`` values, no sync): TensorBoard opens only two
        #: groups, gradwatch's health and Lightning's ``epoch`` (``docs/dashboard.md``). None until then; ``""``
        #: without a ``TensorBoardLogger``.
        self.dashboard_link: str | None = None

    # ------------------------------------------------------------------ public API
    @property
    def state_key(self) -> str:
        """The callback's key in checkpoints, one per ``prefix`` (two callbacks with different prefixes coexist)."""
        return self._generate_state_key(prefix=self.config.prefix)

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
        frames = [mon.history() for mon in self.monitors.values()]
        if len(frames) > 1:
            frames = [df.assign(name=key + "/" + df["name"].astype(str)) for key, df in zip(self.monitors, frames)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Build one monitor per optimizer, hook the optimizers' steps and apply a state loaded from a checkpoint."""
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
            self._apply_state()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """On a logging step, start measuring ``optimizer``'s gradients (unscaled under AMP)."""
        slot = self._slots.get(id(_unwrap(optimizer)))
        step = _log_step(trainer)
        if slot is None or not self.is_logging_step(step) or slot.last_step == step:
            return
        slot.last_step = step
        try:
            scale = amp_grad_scale(slot.optimizer, _scaler(trainer))
            slot.pending = slot.driver.begin(step, grad_scale=scale, track_update=self.config.track_updates)
        except Exception as err:
            self._contain(err, slot)

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        slot = self._slots.get(id(optimizer))
        if slot is None or not slot.pending:
            return
        slot.pending = False
        try:
            # Inside GradScaler.step a fused optimizer carries the overflow flag; the step skipped itself if set.
            slot.driver.end(found_inf=getattr(optimizer, "found_inf", None))
        except Exception as err:
            self._contain(err, slot)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Drop steps the AMP scaler skipped, hand the loss to the monitors, stop training when they say so,
        update the progress bar."""
        try:
            for slot in self._slots.values():
                # kept, read at the next measured logging step: one step late (this step's optimizer step, where
                # it was measured, came before this hook); None when training_step returned nothing
                slot.monitor.loss(outputs.get("loss") if isinstance(outputs, dict) else outputs)
                if slot.pending:  # the optimizer never stepped after its measurement: GradScaler skipped it
                    slot.pending = False
                    slot.driver.discard()
            if self.is_logging_step(_log_step(trainer)) and any(s.monitor.can_stop for s in self._slots.values()):
                # Only under a stopping policy: reduce_boolean_decision is an all_reduce plus a host sync.
                stop = any(s.monitor.should_stop for s in self._slots.values())
                if trainer.strategy.reduce_boolean_decision(stop, all=False):
                    trainer.should_stop = True
            if self.prog_bar is not False and self.is_logging_step(_log_step(trainer)):
                self._show_progress(pl_module)
            if self.dashboard_link is None and self.is_logging_step(_log_step(trainer)):  # this batch's self.log keys
                self.dashboard_link = link.say_pins(trainer.logged_metrics, lambda m: _rank_zero_info(trainer, m),
                                                    any(isinstance(lg, _TENSORBOARD_LOGGERS) for lg in trainer.loggers))
        except Exception as err:
            self._contain(err)

    def _show_progress(self, pl_module: Any) -> None:
        latest = [s.monitor.latest for s in self._slots.values() if s.monitor.latest is not None]
        counts = [r.open_incidents[1] + r.open_incidents[2] for r in latest if r.open_incidents is not None]
        health = [v for r in latest for v in r.early("grad_to_weight") if np.isfinite(v)] if self.prog_bar else []
        shown = {PROG_BAR_ALERTS_KEY: float(sum(counts))} if counts else {}
        shown.update({PROG_BAR_KEY: max(health)} if health else {})
        for key, value in shown.items():
            pl_module.log(key, value, prog_bar=True, logger=False, on_step=True, on_epoch=False, rank_zero_only=True)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Close the monitors (their run summaries go out) and remove every hook."""
        self._close()  # the monitors' end-of-run summaries go out here

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Close the monitors and remove every hook, if :meth:`on_fit_end` has not."""
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Close the monitors and remove every hook when the fit fails."""
        self._close()

    def state_dict(self) -> dict[str, Any]:
        """The monitors' states by optimizer key (a loaded state not yet applied, as it is)."""
        if not self._slots and self._loaded_state is not None:
            return dict(self._loaded_state)
        return {"version": _STATE_VERSION, "monitors": {k: m.state_dict() for k, m in self.monitors.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take a checkpoint's state: applied to the monitors once they exist (Lightning restores callbacks first)."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("monitors"), dict):
            raise ValueError("not a GradWatchCallback state_dict (missing 'monitors')")
        self._loaded_state = state_dict  # Lightning restores callbacks before the optimizers exist: see on_fit_start
        if self._slots:
            self._apply_state()

    def __repr__(self) -> str:
        return f"GradWatchCallback(every={self.every}, monitors={list(self.monitors) or None})"

    # ------------------------------------------------------------------ internals
    def _build_slots(self, trainer: Any, pl_module: Any) -> dict[int, _Slot]:
        """One monitor per optimizer that holds parameters of the module, writing to the trainer's loggers."""
        optimizers = [o for o in map(_unwrap, getattr(trainer, "optimizers", [])) if isinstance(o, torch.optim.Optimizer)]
        ours = {id(p) for p in pl_module.parameters()}
        base = self.config.replace(every=max(self._every, 1))
        if base.sync_ranks is None:  # every rank runs these hooks: flow norms can be averaged over ranks
            base = base.replace(sync_ranks=True)
        writer, loggers = self._targets(trainer) if getattr(trainer, "is_global_zero", True) else (None, [])
        if writer is None and loggers and base.alerts_path is None:
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
            ns = base.prefix  # one namespace per optimizer: gradwatch.optimizer_1, ...
            prefix = (f"{ns}.{key}" if ns else key) if len(optimizers) > 1 else ns
            cfg = base.replace(prefix=prefix, sinks=(*base.sinks, *_logger_sinks(loggers, base, prefix)))
            try:
                mon = Monitor.from_config(pl_module, cfg, writer=writer, params=params)
            except NothingToMeasure as err:  # any other error of Monitor's propagates as itself
                empty.append(f"{key}: {err}")
                continue
            # Block-flow hooks run in the forward pass: armed on this callback's logging batches, first monitor only.
            logging = (lambda: self.is_logging_step(_log_step(trainer))) if not slots else None
            slots[id(opt)] = _Slot(key, mon, StepDriver(mon, logging=logging), opt)
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

    def _apply_state(self) -> None:
        state, self._loaded_state = self._loaded_state, None
        for key, mon in self.monitors.items():
            if key in state["monitors"]:
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
        if self.config.strict or isinstance(err, GradientAlarm):
            raise err  # on_critical="raise" is the user's request to stop training
        self.errors.append(f"{type(err).__name__}: {err}")
        if len(self.errors) <= 3:
            log.error("gradwatch: error inside GradWatchCallback, measurement skipped: %s", self.errors[-1],
                      exc_info=err)


@dataclass
class _Slot:
    """One optimizer's monitor and the state of its current measurement."""

    key: str
    monitor: Monitor
    driver: StepDriver
    optimizer: torch.optim.Optimizer
    pending: bool = False
    last_step: int | None = None


def _logger_sinks(loggers: list[Any], cfg: Config, prefix: str) -> list[Any]:
    """Sinks for the other loggers: TensorBoard ones, then flat ones (CSV, W&B, MLflow: ``log_metrics`` dicts)."""
    return [TensorBoardSink(lg.experiment, prefix=prefix, histograms=cfg.histograms, pictures=cfg.pictures,
                            layer_scalars=cfg.layer_scalars)
            if isinstance(lg, _TENSORBOARD_LOGGERS) else ScalarsSink(lg.log_metrics, prefix=prefix, counts=cfg.histograms,
                                                                      layer_scalars=cfg.layer_scalars)
            for lg in loggers]


def _log_dir(loggers: list[Any], trainer: Any) -> str:
    """The first logger's ``log_dir`` (``CSVLogger`` has one), else ``<default_root_dir>/gradwatch``."""
    for logger in loggers:
        with contextlib.suppress(Exception):  # a logger whose log_dir needs a live experiment
            if getattr(logger, "log_dir", None):
                return str(logger.log_dir)
    return os.path.join(str(trainer.default_root_dir), "gradwatch")


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside a ``LightningOptimizer`` (either package's); a torch optimizer as it is (a
    wrapping optimizer such as Lookahead is the one that steps)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _log_step(trainer: Any) -> int:
    """The step Lightning's ``self.log`` writes at during training: batches after which the optimizers stepped.
    Lightning keeps it in a private loop counter; ``trainer.global_step`` when that is gone."""
    step = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "_batches_that_stepped", None)
    return int(step) if step is not None else int(trainer.global_step)


def _scaler(trainer: Any) -> Any:
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _rank_zero_info(trainer: Any, message: str) -> None:
    """Say ``message`` on rank 0 through the trainer's own package (shown at Lightning's default INFO level)."""
    package = next((n for n in _MODULES if type(trainer).__module__.startswith(n + ".")), next(iter(_MODULES)))
    importlib.import_module(package + ".utilities.rank_zero").rank_zero_info(message)
