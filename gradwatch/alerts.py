"""Alerts: what a finding looks like, the record that is never lost, and what a critical one does.

The pipeline after each logging step: the rules (:mod:`gradwatch.detectors`) turn the step's
:class:`~gradwatch.detectors.Measurements` into :class:`Alert` s; :class:`AlertManager` drops repeats
(cooldown per (rule, name), an escalation to ``critical`` always passes), writes every alert as one JSON line
to ``alerts.jsonl``, hands it to the sinks (:mod:`gradwatch.alert_sinks`: logging, TensorBoard, callables,
webhooks) and applies the ``on_critical`` policy:

- ``"warn"`` (default): alert and carry on;
- ``"stop"``: also set :attr:`Monitor.should_stop <gradwatch.Monitor.should_stop>` (the Lightning callback
  turns it into ``trainer.should_stop``, agreed across ranks);
- ``"raise"``: also raise :class:`GradientAlarm` out of ``mon.step()`` (or ``optimizer.step()`` when the
  monitor drives itself from the optimizer) — the one exception gradwatch raises into a training loop.

Under torch.distributed every rank runs the rules and only rank 0 writes the record and sends alerts. The
per-layer numbers are the same on every rank (gradients after DDP's all-reduce; FSDP/DTensor norms
all-reduced). Block-flow metrics come from each rank's own activations: they are averaged across ranks (root
mean square of the per-rank norms) when the monitor syncs ranks — ``Monitor(sync_ranks=...)``, on by default
for DDP-wrapped and DTensor models and always in the Lightning callback — so then every rank reaches the same
verdict (``should_stop`` and ``GradientAlarm`` agree). With ``sync_ranks=False`` block-flow rules
(``skip_collapse``, the block form of ``depth_trend``) may fire on one rank and not another.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

log = logging.getLogger("gradwatch")

__all__ = ["SEVERITIES", "POLICIES", "Alert", "GradientAlarm", "AlertManager", "read_alerts", "summarize"]

#: Alert severities, mildest first.
SEVERITIES = ("info", "warning", "critical")
#: Values of ``on_critical``.
POLICIES = ("warn", "stop", "raise")
_RANK = {s: i for i, s in enumerate(SEVERITIES)}


def severity_rank(severity: str) -> int:
    """0 for ``info``, 1 for ``warning``, 2 for ``critical``."""
    try:
        return _RANK[severity]
    except KeyError:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}") from None


@dataclass(frozen=True)
class Alert:
    """One finding of one rule at one logging step.

    Attributes:
        rule: the rule that fired (``"skip_collapse"``, ``"vanishing"``, ``"exploding"``, ``"depth_trend"``,
            ``"nonfinite"``, ``"dead_layer"`` or a custom rule's name).
        severity: ``"info"``, ``"warning"`` or ``"critical"``.
        step: the monitor step it was measured at (the TensorBoard step of the curves it refers to).
        name: the layer or block concerned, or None when the finding is about a group (early layers, the
            whole model).
        value: the measured statistic that crossed the threshold.
        threshold: the threshold it crossed.
        message: what was seen, in words.
        hint: what to look at.
    """

    rule: str
    severity: str
    step: int
    name: str | None
    value: float
    threshold: float
    message: str
    hint: str

    def __post_init__(self) -> None:
        severity_rank(self.severity)

    def to_dict(self) -> dict[str, Any]:
        """The alert as JSON-safe values (non-finite numbers become the strings ``"nan"``, ``"inf"``, ``"-inf"``)."""
        d = asdict(self)
        for key in ("value", "threshold"):
            v = float(d[key])
            d[key] = v if math.isfinite(v) else str(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Alert:
        """Inverse of :meth:`to_dict` (extra keys, e.g. a JSONL line's ``event`` and ``time``, are ignored)."""
        return cls(
            rule=str(d["rule"]), severity=str(d["severity"]), step=int(d["step"]),
            name=None if d.get("name") is None else str(d["name"]), value=float(d["value"]),
            threshold=float(d["threshold"]), message=str(d["message"]), hint=str(d["hint"]),
        )

    def headline(self) -> str:
        """``[warning] vanishing at step 120 (layer1.0.conv1)`` — the one-line summary."""
        where = f" ({self.name})" if self.name else ""
        return f"[{self.severity}] {self.rule} at step {self.step}{where}"

    def format(self) -> str:
        """Headline, message and hint on three lines."""
        return f"{self.headline()}: {self.message}\n  value {self.value:.4g}, threshold {self.threshold:.4g}\n" \
               f"  hint: {self.hint}"


class GradientAlarm(RuntimeError):
    """Raised out of ``mon.step()`` / ``optimizer.step()`` after a critical alert when ``on_critical="raise"``.

    ``alert`` is the critical alert (the first of the step); ``alerts`` all critical alerts of that step.
    """

    def __init__(self, alerts: Sequence[Alert]) -> None:
        self.alerts = list(alerts)
        self.alert = self.alerts[0]
        more = f" (+{len(self.alerts) - 1} more critical)" if len(self.alerts) > 1 else ""
        super().__init__(f"gradwatch: {self.alert.headline()}{more}: {self.alert.message}. Hint: {self.alert.hint}")


def summarize(alerts: Iterable[Alert], min_severity: str = "warning") -> str:
    """A one-line digest, e.g. ``"vanishing@15, nonfinite@30 (fc) [critical]"``, of the alerts at least
    ``min_severity``; ``"none"`` when there are none. For run summaries (the demo prints one per net)."""
    floor = severity_rank(min_severity)
    parts = [
        f"{a.rule}@{a.step}" + (f" ({a.name})" if a.name else "") + (" [critical]" if a.severity == "critical" else "")
        for a in alerts
        if severity_rank(a.severity) >= floor
    ]
    return ", ".join(parts) if parts else "none"


def read_alerts(path: str | os.PathLike) -> list[Alert]:
    """The alerts recorded in an ``alerts.jsonl`` file (delivery-failure lines are skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            d = json.loads(line)
            if d.get("event", "alert") == "alert":
                out.append(Alert.from_dict(d))
    return out


class _Record:
    """Append-only JSONL file: one line per alert or delivery failure, written and flushed at once."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = None
        self._broken = False

    def write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, ensure_ascii=False, allow_nan=False)
        with self._lock:
            if self._broken:
                return
            try:
                if self._file is None:
                    parent = os.path.dirname(self.path)
                    if parent:
                        os.makedirs(parent, exist_ok=True)
                    self._file = open(self.path, "a", encoding="utf-8")
                self._file.write(line + "\n")
                self._file.flush()
            except OSError as err:
                self._broken = True
                log.error("gradwatch: cannot write the alert record %s (%s); alerts stay in mon.alerts and "
                          "the other sinks", self.path, err)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class _ForwardOrder:
    """Records the order in which a model's modules first run (forward-pre hooks on every module), until
    :meth:`finish` removes the hooks. Names are cleaned like the monitor's layer names (wrappers dropped, the
    root is ``_root``). Nothing is recorded while ``torch.compile`` traces (the rules then keep definition
    order)."""

    def __init__(self, model: Any) -> None:
        import torch

        from .layers import ROOT_NAME, clean_name

        self.order: dict[str, int] = {}
        self._handles: list[Any] = []
        is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)

        def make(name: str) -> Callable[..., None]:
            def hook(module: Any, args: Any) -> None:
                if name not in self.order and not is_compiling():
                    self.order[name] = len(self.order)
            return hook

        try:
            for qualified, module in model.named_modules():
                name = clean_name(qualified) or ROOT_NAME
                self._handles.append(module.register_forward_pre_hook(make(name)))
        except Exception:  # not an nn.Module, or hooks refused: definition order it is
            self.finish()

    def finish(self) -> dict[str, int]:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return dict(self.order)


def _check_policy(on_critical: Any, cooldown: Any) -> None:
    if on_critical not in POLICIES:
        raise ValueError(f"on_critical must be one of {POLICIES}, got {on_critical!r}")
    if isinstance(cooldown, bool) or not isinstance(cooldown, int) or cooldown < 0:
        raise ValueError(f"alert_cooldown must be an int >= 0 (logging steps), got {cooldown!r}")


class AlertManager:
    """Runs the rules after each logging step and routes what they find. Owned by :class:`~gradwatch.Monitor`.

    Args:
        rules: the :class:`~gradwatch.detectors.Rule` s to run (see :func:`gradwatch.detectors.build_rules`).
        sinks: where alerts go besides the record (rank 0 only), objects with ``send(alert)`` and optional
            ``end_step(step, alerts)``, ``close(timeout)``, ``attach(report_failure)``; plain callables are
            wrapped.
        kinds: layer kinds (:func:`gradwatch.detectors.layer_kinds`).
        on_critical: ``"warn"``, ``"stop"`` or ``"raise"``.
        cooldown: logging steps during which a repeat of the same (rule, name) at the same or a lower
            severity is not sent again (still counted in :attr:`suppressed`).
        path: the JSONL record, or None for none.
        rank_zero: whether this process writes and sends.
        owned: the sinks this manager created (identity); :meth:`close` closes those and only flushes the
            others (``flush(timeout)`` when they have one), which stay usable by another monitor or fit.
        model: when given, the order its modules run in is recorded up to the first evaluation (one-shot
            forward-pre hooks, removed then) and handed to the rules as :attr:`Measurements.forward
            <gradwatch.detectors.Measurements.forward>`, so ``nonfinite`` can name layers in forward order.
    """

    def __init__(
        self,
        rules: Sequence[Any],
        sinks: Sequence[Any] = (),
        *,
        kinds: dict[str, str] | None = None,
        on_critical: str = "warn",
        cooldown: int = 20,
        path: str | None = None,
        rank_zero: bool = True,
        owned: Iterable[Any] = (),
        model: Any = None,
    ) -> None:
        from .alert_sinks import as_sink

        _check_policy(on_critical, cooldown)
        self.rules = list(rules)
        self.on_critical = on_critical
        self.cooldown = cooldown
        self.kinds = dict(kinds or {})
        self.rank_zero = rank_zero
        self.path = path
        self.sinks = [as_sink(s) for s in sinks]
        self._owned = {id(s) for s in owned}
        self._record = _Record(path) if (path and rank_zero) else None
        for sink in self.sinks:
            attach = getattr(sink, "attach", None)
            if attach is not None:
                attach(self.report_failure)
        #: Every alert sent, oldest first (the same list on every rank).
        self.alerts: list[Alert] = []
        #: Alerts held back by the cooldown.
        self.suppressed = 0
        self.should_stop = False
        self.errors: list[str] = []
        self._pending_alarm: list[Alert] | None = None
        self._current = None  # Measurements being filled
        self._evaluated = 0
        self._last: dict[str, tuple[int, int]] = {}  # "rule\x00name" -> (evaluation number, severity rank)
        self._closed = False
        self._order = _ForwardOrder(model) if model is not None else None
        self._forward: dict[str, int] = {}

    # ------------------------------------------------------------------ the monitor's calls
    def observe(self, step: int, names: Sequence[str], metric: str, values: np.ndarray) -> None:
        """Take one recorded metric into the current step's measurements."""
        from .detectors import Measurements

        m = self._current
        if m is None or m.step != step:
            m = self._current = Measurements(step=int(step), kinds=self.kinds)
        m.add(names, metric, values)

    def evaluate(self, step: int) -> list[Alert]:
        """Run the rules on what was observed at ``step``; send and return the alerts that pass the cooldown."""
        m, self._current = self._current, None
        if m is None or m.step != step or self._closed:
            return []
        self._evaluated += 1
        if self._order is not None:  # the forward order is known after the first measured step: stop recording
            self._forward = self._order.finish()
            self._order = None
        m.forward = self._forward
        found: list[Alert] = []
        for rule in self.rules:
            try:
                found.extend(rule.check(m))
            except Exception as err:  # a broken rule must not silence the others
                self._error(f"rule {getattr(rule, 'name', rule)!r}", err)
        sent = [a for a in found if self._passes(a)]
        for alert in sent:
            self._emit(alert)
        if self.rank_zero:
            for sink in self.sinks:
                end = getattr(sink, "end_step", None)
                if end is not None:
                    try:
                        end(step, sent)
                    except Exception as err:
                        self._error(f"sink {sink!r}", err)
        critical = [a for a in sent if a.severity == "critical"]
        if critical and self.on_critical in ("stop", "raise"):
            self.should_stop = True
            if self.on_critical == "raise":
                self._pending_alarm = critical
        return sent

    def evaluate_current(self) -> list[Alert]:
        """:meth:`evaluate` the step observed last, if it has not been evaluated yet (else do nothing)."""
        m = self._current
        return [] if m is None else self.evaluate(m.step)

    def raise_pending(self) -> None:
        """Raise the :class:`GradientAlarm` a critical alert left pending (``on_critical="raise"``)."""
        pending, self._pending_alarm = self._pending_alarm, None
        if pending:
            raise GradientAlarm(pending)

    def emit(self, alert: Alert) -> bool:
        """Send an alert found outside the rules (integrations); cooldown applies. Returns whether it was sent."""
        if not self._passes(alert):
            return False
        self._emit(alert)
        return True

    def report_failure(self, sink: str, alert: Alert | None, error: str) -> None:
        """Record that ``sink`` could not deliver ``alert`` (called by sinks, possibly from their threads)."""
        log.warning("gradwatch: alert not delivered by %s: %s%s", sink, error,
                    f" ({alert.headline()})" if alert is not None else "")
        if self._record is not None:
            entry = {"event": "delivery_failed", "time": time.time(), "sink": sink, "error": error}
            if alert is not None:
                entry["alert"] = alert.to_dict()
            self._record.write(entry)

    def close(self, timeout: float = 10.0) -> None:
        """Close the sinks this manager created and flush the others (at most ``timeout`` seconds in all),
        then the record. Sinks passed in are not closed: they may serve another monitor (or the next fit)."""
        if self._closed:
            return
        self._closed = True
        if self._order is not None:
            self._order.finish()
            self._order = None
        deadline = time.monotonic() + timeout
        for sink in self.sinks:
            finish = getattr(sink, "close" if id(sink) in self._owned else "flush", None)
            if finish is None:
                continue
            try:
                finish(max(0.0, deadline - time.monotonic()))
            except Exception as err:
                self._error(f"sink {sink!r}", err)
        if self._record is not None:
            self._record.close()

    def state_dict(self) -> dict[str, Any]:
        """Rule state (streaks, baselines) and the cooldown table; JSON-like."""
        return {
            "rules": {r.name: r.state_dict() for r in self.rules},
            "evaluated": self._evaluated,
            "last": {k: list(v) for k, v in self._last.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rules = state.get("rules", {})
        for rule in self.rules:
            if rule.name in rules:
                rule.load_state_dict(rules[rule.name])
        self._evaluated = int(state.get("evaluated", 0))
        self._last = {k: (int(v[0]), int(v[1])) for k, v in state.get("last", {}).items()}

    # ------------------------------------------------------------------ internals
    def _passes(self, alert: Alert) -> bool:
        key = f"{alert.rule}\x00{alert.name}"
        rank = severity_rank(alert.severity)
        last = self._last.get(key)
        if last is not None and rank <= last[1] and self._evaluated - last[0] < max(self.cooldown, 1):
            self.suppressed += 1
            return False
        self._last[key] = (self._evaluated, rank)
        return True

    def _emit(self, alert: Alert) -> None:
        self.alerts.append(alert)
        if not self.rank_zero:
            return
        if self._record is not None:
            self._record.write({"event": "alert", "time": time.time(), **alert.to_dict()})
        for sink in self.sinks:
            try:
                sink.send(alert)
            except Exception as err:
                self._error(f"sink {sink!r}", err)

    def _error(self, where: str, err: BaseException) -> None:
        text = f"{where}: {type(err).__name__}: {err}"
        self.errors.append(text)
        if len(self.errors) <= 5:
            log.error("gradwatch: error in alerting (%s); training goes on", text)


def default_path(log_dir: str | None, writer: Any) -> str | None:
    """``<log_dir>/alerts.jsonl``, else the writer's log directory, else None."""
    if log_dir is not None:
        return os.path.join(os.fspath(log_dir), "alerts.jsonl")
    get = getattr(writer, "get_logdir", None)
    if callable(get):
        try:
            d = get()
        except Exception:
            d = None
        if d:
            return os.path.join(str(d), "alerts.jsonl")
    return None


def check_arguments(
    *,
    rules: Any,
    alert_sinks: Iterable[Any] | None,
    on_critical: str,
    cooldown: int,
) -> tuple[list[Any], list[Any]] | None:
    """Validate a monitor's alert arguments before anything is opened (no writer, no hook, no file yet).

    Returns ``(rules, user_sinks)`` resolved (rules built, plain callables wrapped), or None when alerting is
    off. Raises ``ValueError`` / ``TypeError`` for a bad ``rules``, ``on_critical``, ``cooldown`` or sink.
    """
    from .alert_sinks import as_sink
    from .detectors import build_rules

    _check_policy(on_critical, cooldown)
    resolved = build_rules(rules)
    if alert_sinks is not None and (isinstance(alert_sinks, (str, bytes)) or not isinstance(alert_sinks, Iterable)
                                    or hasattr(alert_sinks, "send")):
        raise TypeError("alert_sinks must be a list of sinks or callables, e.g. alert_sinks=[WebhookSink(url)]")
    sinks = [as_sink(s) for s in (alert_sinks or [])]
    if not resolved:
        return None
    return resolved, sinks


def build_manager(
    model: Any,
    checked: tuple[list[Any], list[Any]] | None,
    *,
    on_critical: str,
    cooldown: int,
    alerts_path: Any,
    log_dir: str | None,
    writer: Any,
    prefix: str,
    rank_zero: bool,
) -> AlertManager | None:
    """What :class:`~gradwatch.Monitor` calls once its writer is open: a manager from :func:`check_arguments`'
    result (None: alerting off).

    Default sinks: Python logging (logger ``gradwatch``) and, with a writer, TensorBoard; then the user's
    ``alert_sinks``. Only the default sinks (and callables wrapped here) are closed with the monitor; the
    user's sinks are flushed, so one sink can serve several monitors or fits.
    """
    from .alert_sinks import CallableSink, LoggingSink, TensorBoardAlertSink
    from .detectors import layer_kinds

    if checked is None:
        return None
    resolved, user_sinks = checked
    defaults: list[Any] = [LoggingSink()]
    if writer is not None:
        defaults.append(TensorBoardAlertSink(writer, prefix))
    wrapped = [s for s in user_sinks if isinstance(s, CallableSink)]  # as_sink's wrappers: ours to close too
    if alerts_path is None:
        path = default_path(log_dir, writer)
    elif alerts_path is False:
        path = None
    else:
        path = os.fspath(alerts_path)
    return AlertManager(resolved, [*defaults, *user_sinks], kinds=layer_kinds(model), on_critical=on_critical,
                        cooldown=cooldown, path=path, rank_zero=rank_zero, owned=[*defaults, *wrapped],
                        model=model)
