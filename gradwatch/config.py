"""Every option of :class:`~gradwatch.Monitor` (and of the framework callbacks), grouped by concern and checked
in one place.

The options are keyword arguments of ``Monitor(...)``. Each group checks its fields when it is built, with one
rule (TypeError for a wrong type, ValueError for a wrong value, never a silent coercion), so a :class:`Config`
can only hold valid options, however it was made; :meth:`Config.from_options` also rejects unknown names.
Integrations take the same options, check them at construction, then hand the :class:`Config` to each
monitor they build (``Monitor(model, config=cfg)``).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ._checks import (
    GRANULARITIES, Pattern, check_bool, check_choice, check_int, check_modules, check_number, check_patterns,
    check_str, check_types,
)
from .alerts.alert import POLICIES
from .alerts.rules import build_rules
from .sinks.alerting import as_alert_sink

__all__ = ["Config", "MeasureConfig", "AlertConfig", "OutputConfig", "OPTIONS"]


def _rules(value: Any, name: str) -> Any:
    if isinstance(value, Mapping):
        value = dict(value)
    elif value not in (None, False) and not isinstance(value, (str, bytes)) and isinstance(value, Iterable):
        value = list(value)
    build_rules(value)  # raises for a bad spec; the rules are built again, fresh, for each monitor
    return value


def _alert_sinks(value: Any, name: str) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) or hasattr(value, "send") \
            or hasattr(value, "write"):
        raise TypeError(f"{name} must be a list of sinks or callables, e.g. {name}=[WebhookSink(url)]")
    out = []
    for s in value:
        try:
            out.append(as_alert_sink(s))
        except TypeError as err:
            raise TypeError(f"{name}: {err}") from None
    return tuple(out)


def _sinks(value: Any, name: str) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) or hasattr(value, "write"):
        raise TypeError(f"{name} must be a list of sinks (objects with write(record))")
    out = tuple(value)
    for s in out:
        if not callable(getattr(s, "write", None)):
            raise TypeError(f"{name} entries must have a write(record) method, got {type(s).__name__}")
    return out


def _alerts_path(value: Any, name: str) -> str | bool | None:
    if value is None or value is False:
        return value
    if value is True or not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, None (default location) or False (none), got {value!r}")
    return os.fspath(value)


def _backoff(value: Any, name: str) -> float:
    value = check_number(value, name)
    if value < 1:
        raise ValueError(f"{name} must be >= 1 (each reminder waits at least as long as the one before), got {value!r}")
    return value


def _cooldown(value: Any, name: str) -> int | None:
    value = check_int(value, name, minimum=0, allow_none=True)
    if value is not None:
        warnings.warn("alert_cooldown is deprecated: alerts are incidents now, reminded with back-off; use "
                      "remind_steps (logging steps) or remind_after (seconds). alert_cooldown=N is read as "
                      "remind_steps=N when remind_steps is not given", DeprecationWarning, stacklevel=4)
    return value


#: Every option: name -> (group, check). A check returns the value to store or raises TypeError/ValueError.
OPTIONS: dict[str, tuple[str, Callable[[Any, str], Any]]] = {
    "granularity": ("measure", lambda v, n: check_choice(v, n, GRANULARITIES)),
    "include": ("measure", check_patterns),
    "exclude": ("measure", check_patterns),
    "include_types": ("measure", check_types),
    "exclude_types": ("measure", check_types),
    "track_updates": ("measure", check_bool),
    "blocks": ("measure", check_modules),
    "sync_ranks": ("measure", lambda v, n: check_bool(v, n, allow_none=True)),
    "rules": ("alerts", _rules),
    "alert_sinks": ("alerts", _alert_sinks),
    "on_critical": ("alerts", lambda v, n: check_choice(v, n, POLICIES)),
    "alerts_path": ("alerts", _alerts_path),
    "remind_after": ("alerts", lambda v, n: check_number(v, n, allow_none=True)),
    "remind_steps": ("alerts", lambda v, n: check_int(v, n, minimum=1, allow_none=True)),
    "remind_backoff": ("alerts", _backoff),
    "resolve_after": ("alerts", lambda v, n: check_int(v, n, minimum=1)),
    "alert_cooldown": ("alerts", _cooldown),
    "every": ("output", lambda v, n: check_int(v, n, minimum=1)),
    "histograms": ("output", check_bool),
    "prefix": ("output", check_str),
    "pictures": ("output", lambda v, n: check_int(v, n, minimum=0)),
    "sinks": ("output", _sinks),
    "strict": ("output", check_bool),
    "history": ("output", lambda v, n: check_int(v, n, minimum=1, allow_none=True)),
}


class _Checked:
    """Checks (and normalises, e.g. a pattern to a tuple of patterns) every field with :data:`OPTIONS`."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            object.__setattr__(self, f.name, OPTIONS[f.name][1](getattr(self, f.name), f.name))


@dataclass(frozen=True)
class MeasureConfig(_Checked):
    """What to measure.

    ``blocks``: shortcut-path gradient flow per residual merge y = F(x) + S(x) (``docs/flow.md``). ``"auto"``
    finds the merges in the autograd graph of the first logging step's forward; a list of modules watches
    only those; ``None`` turns it off. ``sync_ranks``: under torch.distributed, average the block-flow norms
    over ranks (root mean square, in the same ``all_reduce`` as sharded parameter norms) so block-based rules
    give every rank the same verdict; every rank must then run the monitor on every logging step. ``None``:
    on when the model is a ``DistributedDataParallel`` or has DTensor parameters.
    """

    granularity: str = "layer"  # "layer" (a module that owns parameters) or "parameter" (one unit per tensor)
    include: tuple[Pattern, ...] = ()  # glob patterns or compiled regexes on layer names; empty: all layers
    exclude: tuple[Pattern, ...] = ()  # same, layers to drop
    include_types: tuple[type, ...] = ()  # module classes to keep (e.g. nn.Conv2d); empty: all
    exclude_types: tuple[type, ...] = ()  # module classes to drop (e.g. nn.BatchNorm2d)
    track_updates: bool = True  # update_to_weight across optimizer.step() (one weight copy on logging steps)
    blocks: str | tuple[nn.Module, ...] | None = "auto"  # block flow: "auto", these modules, or None (off)
    sync_ranks: bool | None = None  # average block-flow norms over ranks; None: when the model is DDP/DTensor


@dataclass(frozen=True)
class AlertConfig(_Checked):
    """Alerting (``docs/alerts.md``).

    ``rules``: ``None``, all built-in rules (``skip_collapse``, ``vanishing``, ``exploding``, ``depth_trend``,
    ``nonfinite``, ``dead_layer``) with defaults; a dict tunes or drops them (``{"vanishing": {"patience": 5},
    "dead_layer": False}``); a list of ``Rule`` instances replaces them; ``False`` turns alerting off.
    ``alert_sinks``: e.g. ``[gradwatch.WebhookSink(url)]``, or any callable taking an ``Alert``.
    ``on_critical``: ``"stop"`` sets ``Monitor.should_stop``; ``"raise"`` raises ``GradientAlarm`` out of
    ``step()`` / ``optimizer.step()``. Findings become incidents: told when opened, escalated (at once),
    reminded with back-off (``remind_after`` seconds and/or ``remind_steps`` logging steps, then
    ``remind_backoff`` times longer each time) and resolved after ``resolve_after`` clear logging steps.
    """

    rules: Any = None  # None: all built-in rules; dict: tune/drop them; list: exactly these; False: alerting off
    alert_sinks: tuple[Any, ...] = ()  # where alerts go besides the logger, TensorBoard and alerts.jsonl
    on_critical: str = "warn"  # "warn", "stop" (Monitor.should_stop) or "raise" (GradientAlarm)
    alerts_path: str | bool | None = None  # the JSONL record; None: <log_dir>/alerts.jsonl; False: none
    remind_after: float | None = 3600.0  # wall seconds before an open incident's first reminder; None: none
    remind_steps: int | None = None  # logging steps before the first reminder; None: none (either due: remind)
    remind_backoff: float = 4.0  # each later reminder waits this many times longer (1 h, 4 h, 16 h, 64 h)
    resolve_after: int = 5  # consecutive clear logging steps before an incident is resolved
    alert_cooldown: int | None = None  # deprecated: read as remind_steps when that is not given

    @property
    def enabled(self) -> bool:
        """False for ``rules=False`` or an empty list: no rule runs, nothing is evaluated."""
        return self.rules is not False and not (isinstance(self.rules, list) and not self.rules)


@dataclass(frozen=True)
class OutputConfig(_Checked):
    """When and where values are written. Sinks passed in are flushed at ``Monitor.close()``, not closed."""

    every: int = 50  # log when step % every == 0
    histograms: bool = True  # a TensorBoard histogram across layers per metric and logging step
    prefix: str = "gradwatch"  # namespace of the tags: sections gradwatch/ (health), gradwatch.layers/, ...
    pictures: int = 20  # TensorBoard pictures (depth x time maps, profile) every N logging steps; 0: none
    sinks: tuple[Any, ...] = ()  # more sinks for every record (objects with write(record))
    strict: bool = False  # re-raise errors inside gradwatch's hooks and sinks (for tests)
    history: int | None = None  # logging steps kept in memory for mon.history() (the latest); None: all


_GROUPS = {"measure": MeasureConfig, "alerts": AlertConfig, "output": OutputConfig}


@dataclass(frozen=True)
class Config:
    """All options, checked. Build with :meth:`from_options`; read as ``cfg.measure.granularity``,
    ``cfg.alerts.on_critical``, ``cfg.output.every``; derive with :meth:`replace`."""

    measure: MeasureConfig = field(default_factory=MeasureConfig)
    alerts: AlertConfig = field(default_factory=AlertConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        for name, cls in _GROUPS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"Config.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")

    @classmethod
    def from_options(cls, base: Config | None = None, owner: str = "Monitor", /, **options: Any) -> Config:
        """``options`` (any of :data:`OPTIONS`), checked, on top of ``base`` (default: all defaults).
        ``owner`` names the caller in the error for an unknown option."""
        if base is not None and not isinstance(base, Config):
            raise TypeError(f"config must be a gradwatch.Config, got {type(base).__name__}")
        unknown = [name for name in options if name not in OPTIONS]
        if unknown:
            raise TypeError(f"{owner} got an unexpected option {unknown[0]!r}; options are: {', '.join(OPTIONS)}")
        cfg = base or cls()
        changes = {group: {n: v for n, v in options.items() if OPTIONS[n][0] == group} for group in _GROUPS}
        return dataclasses.replace(
            cfg, **{group: dataclasses.replace(getattr(cfg, group), **kw) for group, kw in changes.items() if kw}
        )

    def replace(self, **options: Any) -> Config:
        """A copy with ``options`` changed (checked like :meth:`from_options`)."""
        return Config.from_options(self, **options)

    def options(self) -> dict[str, Any]:
        """The options as one flat dict (name -> value)."""
        return {name: getattr(getattr(self, group), name) for name, (group, _) in OPTIONS.items()}
