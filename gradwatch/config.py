"""Every option of :class:`~gradwatch.Monitor` and of the framework adapters, as one typed, checked record.

``Monitor``, ``GradWatchCallback``, ``GradWatchTrainerCallback`` and ``integrations.accelerate.watch`` take
these options as explicit keyword-only parameters (``tests/test_config.py`` keeps their signatures equal to
the fields below); each builds a :class:`Config` from them, and that is the one place they are checked.
Build a :class:`Config` yourself to share one configuration between runs or monitors
(``Monitor.from_config(model, cfg)``); :meth:`Config.replace` derives another.

Checks follow one rule: TypeError for a wrong type, ValueError for a wrong value, never a silent coercion
(``True`` is not an int here, ``"3"`` is not a number). Values are normalised once, here: a single pattern
becomes a tuple of patterns, a callable alert sink a :class:`~gradwatch.sinks.CallableSink`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

from torch import nn

from ._checks import (
    GRANULARITIES, check_bool, check_choice, check_int, check_modules, check_number, check_patterns, check_prefix,
    check_types,
)
from .alerts.alert import POLICIES
from .alerts.rule import Rule
from .alerts.rules import build_rules
from .record import Sink
from .sinks.alerting import AlertSink, as_alert_sink

__all__ = ["Config", "Patterns", "ModuleTypes", "RulesSpec", "BlocksSpec"]

#: Layer-name patterns: a glob string (``fnmatch``), a compiled regex, or a sequence of them.
Patterns = Union[str, "re.Pattern[str]", Sequence[Union[str, "re.Pattern[str]"]]]
#: Module classes: one ``nn.Module`` subclass or a sequence of them.
ModuleTypes = Union[type[nn.Module], Sequence[type[nn.Module]]]
#: ``None``: every built-in rule; a dict tunes or drops them; a sequence of rules replaces them; ``False``: off.
RulesSpec = Union[None, bool, Mapping[str, Union[bool, Mapping[str, Any]]], Sequence[Rule]]
#: ``"auto"``: find residual merges; a sequence of modules: watch only those; ``None``: no block flow.
BlocksSpec = Union[Literal["auto"], Sequence[nn.Module], None]


@dataclass(frozen=True, kw_only=True)
class Config:
    """All of a monitor's options, checked when built (``Config(every=10, on_critical="stop")``).

    The fields are the keyword-only options of :class:`~gradwatch.Monitor`; its docstring says what each
    does. Read them as attributes (``cfg.every``); :meth:`replace` returns a changed copy, checked again.
    """

    # ---- when to measure
    every: int = 50  # measure on steps where step % every == 0 (step 0 first)
    # ---- what to measure
    granularity: Literal["layer", "parameter"] = "layer"  # a unit per module owning parameters, or per tensor
    include: Patterns = ()  # keep only layers whose name matches (glob or regex); empty: all layers
    exclude: Patterns = ()  # drop layers whose name matches
    include_types: ModuleTypes = ()  # keep only layers of these classes (e.g. nn.Conv2d); empty: all
    exclude_types: ModuleTypes = ()  # drop layers of these classes (e.g. nn.BatchNorm2d)
    track_updates: bool = True  # update_to_weight across optimizer.step() (one weight copy on logging steps)
    blocks: BlocksSpec = "auto"  # shortcut-path gradient flow: "auto", these modules, or None (off)
    sync_ranks: bool | None = None  # sum block-flow norms over ranks (global batch); None: DDP, FSDP, DTensor
    # ---- alerting
    rules: RulesSpec = None  # None: built-in rules; dict: tune/drop ({"vanishing": {"patience": 5}}); False: off
    alert_sinks: Sequence[AlertSink | Callable[..., Any]] = ()  # besides the logger, TensorBoard, alerts.jsonl
    on_critical: Literal["warn", "stop", "raise"] = "warn"  # "stop": should_stop; "raise": GradientAlarm
    alerts_path: str | os.PathLike[str] | Literal[False] | None = None  # None: <log_dir>/alerts.jsonl; False: none
    remind_after: float | None = 3600.0  # wall seconds before an open incident's first reminder; None: never
    remind_steps: int | None = None  # logging steps before the first reminder; None: never (either due: remind)
    remind_backoff: float = 4.0  # each later reminder waits this many times longer (1 h, 4 h, 16 h, ...)
    resolve_after: int = 5  # consecutive clear logging steps before an incident is resolved
    # ---- output
    histograms: bool = True  # a TensorBoard histogram across layers per metric and logging step
    layer_scalars: bool = False  # also a scalar tag per layer/block and metric (unbounded; default: <= 40 tags)
    prefix: str = "gradwatch"  # the tags' namespace: _gradwatch/ (health), zz_gradwatch.layers/, ...
    pictures: int = 20  # TensorBoard pictures (depth x time maps, profile) every N logging steps; 0: none
    sinks: Sequence[Sink] = ()  # more sinks for every record (objects with write(record))
    history: int | None = None  # logging steps kept in memory for history(), the latest; None: all
    flight_recorder: int = 64  # logging steps written next to alerts.jsonl when an incident opens; 0: off
    strict: bool = False  # re-raise errors inside gradwatch's hooks and sinks (tests, debugging)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _CHECKS[f.name](getattr(self, f.name), f.name))

    @property
    def alerting(self) -> bool:
        """Whether any rule runs: False for ``rules=False``, an empty list, or a dict that drops every rule."""
        return bool(build_rules(self.rules))

    def replace(self, **options: Any) -> Config:
        """A copy with ``options`` changed, checked again (TypeError for an unknown name)."""
        unknown = sorted(set(options) - set(_CHECKS))
        if unknown:
            raise TypeError(f"Config got an unexpected option {unknown[0]!r}; options are: {', '.join(_CHECKS)}")
        return dataclasses.replace(self, **options)

    def options(self) -> dict[str, Any]:
        """The options as one flat dict (name -> value), e.g. to log a run's configuration."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _rules(value: Any, name: str) -> Any:
    if isinstance(value, Mapping):
        value = dict(value)
    elif value not in (None, False) and not isinstance(value, (str, bytes)) and isinstance(value, Iterable):
        value = list(value)
    build_rules(value)  # raises for a bad spec; the rules are built again, fresh, for each monitor
    return value


def _alert_sinks(value: Any, name: str) -> tuple[Sink, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) or hasattr(value, "send") \
            or hasattr(value, "write"):
        raise TypeError(f"{name} must be a list of sinks or callables, e.g. {name}=[WebhookSink(url)]")
    out: list[Sink] = []
    for s in value:
        try:
            out.append(as_alert_sink(s))
        except TypeError as err:
            raise TypeError(f"{name}: {err}") from None
    return tuple(out)


def _sinks(value: Any, name: str) -> tuple[Sink, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) or hasattr(value, "write"):
        raise TypeError(f"{name} must be a list of sinks (objects with write(record))")
    out = tuple(value)
    for s in out:
        if not callable(getattr(s, "write", None)):
            raise TypeError(f"{name} entries must have a write(record) method, got {type(s).__name__}")
    return out


def _alerts_path(value: Any, name: str) -> str | Literal[False] | None:
    if value is None or value is False:
        return value
    if value is True or not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, None (default location) or False (none), got {value!r}")
    return os.fspath(value)


def _backoff(value: Any, name: str) -> float:
    value = check_number(value, name)
    if value < 1:
        raise ValueError(f"{name} must be >= 1 (each reminder waits at least as long as the one before), got {value!r}")
    return float(value)


#: Every option's check: it returns the value to store or raises TypeError/ValueError.
_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "every": lambda v, n: check_int(v, n, minimum=1),
    "granularity": lambda v, n: check_choice(v, n, GRANULARITIES),
    "include": check_patterns,
    "exclude": check_patterns,
    "include_types": check_types,
    "exclude_types": check_types,
    "track_updates": check_bool,
    "blocks": check_modules,
    "sync_ranks": lambda v, n: check_bool(v, n, allow_none=True),
    "rules": _rules,
    "alert_sinks": _alert_sinks,
    "on_critical": lambda v, n: check_choice(v, n, POLICIES),
    "alerts_path": _alerts_path,
    "remind_after": lambda v, n: check_number(v, n, allow_none=True),
    "remind_steps": lambda v, n: check_int(v, n, minimum=1, allow_none=True),
    "remind_backoff": _backoff,
    "resolve_after": lambda v, n: check_int(v, n, minimum=1),
    "histograms": check_bool,
    "layer_scalars": check_bool,
    "prefix": check_prefix,
    "pictures": lambda v, n: check_int(v, n, minimum=0),
    "sinks": _sinks,
    "history": lambda v, n: check_int(v, n, minimum=1, allow_none=True),
    "flight_recorder": lambda v, n: check_int(v, n, minimum=0),
    "strict": check_bool,
}
