"""The per-step record: everything one logging step measured, in one immutable object.

A logging step produces exactly one :class:`StepRecord`. The :class:`~gradwatch.Monitor` runs the alert rules
on it, adds the alerts they raised, and hands the same record to every sink (history, TensorBoard, framework
loggers, alert sinks, your own: ``Monitor(sinks=[...])``). Values are plain float64 numpy arrays on the host:
the record is built after the one device-to-host transfer of the step.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from .names import FLOW_METRICS, GLOBAL_NAME, early_count

if TYPE_CHECKING:  # typing only: alerts depend on records, not the other way round
    from .alerts.alert import Alert
    from .alerts.incident import IncidentEvent

__all__ = ["StepRecord", "Sink"]

def _frozen(values: np.ndarray, *shape: int) -> np.ndarray:
    arr = np.array(values, dtype=np.float64).reshape(shape)  # a copy: the caller's array stays theirs
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)  # compared by identity: its fields are arrays
class StepRecord:
    """One logging step's measurements (and the alerts raised on them).

    Attributes:
        step: the monitor step (the TensorBoard step of every value in it).
        layers: the measured units (layers, or parameters with ``granularity="parameter"``) that had a
            gradient at this step, in definition order.
        layer_metrics: the column names of :attr:`layer_values` (a prefix of :data:`gradwatch.names.METRICS`:
            ``update_to_weight`` only when measured across an optimizer step).
        layer_values: ``(len(layers), len(layer_metrics))`` float64, read-only.
        whole: ``(len(layer_metrics),)``: the same metrics over the whole model (``_global``).
        blocks: the residual blocks measured at this step, in depth order (empty without block flow).
        block_values: ``(len(blocks), len(FLOW_METRICS))`` float64, read-only (:data:`gradwatch.flow.FLOW_METRICS`).
        alerts: the findings told at this step (incidents opened, escalated, reminded), or None when
            alerting is off.
        events: the incident events told at this step (``opened``, ``escalated``, ``reminder``,
            ``resolved``): what alert sinks send.
        open_incidents: open incidents per severity (info, warning, critical) after this step, or None when
            alerting is off.
        health: the whole-model health figures of this step (:data:`gradwatch.health.HEALTH`, NaN where they
            cannot be computed), read-only; empty in a record built by hand.
        kinds: the kind of each layer (:func:`gradwatch.measure.layers.layer_kinds`: ``"weight"``, ``"norm"``,
            ``"embedding"``, ``"other"``), aligned with :attr:`layers`; empty when unknown.
        verified: the run's self-check under torch.distributed (:mod:`gradwatch.measure.selfcheck`), carried
            by every record from the one it ran on: True when the per-layer grad norms agreed with torch's
            total norm, False when they did not (the values are unverified: the error in the log names the
            layout and the layers); None when not checked (a single process, or before the check).
        lost: the blocks of :attr:`blocks` whose residual merge is gone from the graph while their module still
            runs (``out = branch(x)`` where it was ``x + branch(x)``): they keep their row, in depth order,
            measured as blocks whose skip carries nothing (``skip_grad`` 0, so ``skip_share`` 0); the
            ``lost_skip`` rule reports them. Empty when none.
        loss: the training loss last given to :meth:`Monitor.loss <gradwatch.Monitor.loss>` (by the user or
            a framework adapter) when this step was measured, read on logging steps only; None when none was
            given. The ``instability`` rule holds its warnings back while it falls (the model is learning) and
            warns when it climbs (the run is diverging).
    """

    step: int
    layers: tuple[str, ...]
    layer_metrics: tuple[str, ...]
    layer_values: np.ndarray
    whole: np.ndarray
    blocks: tuple[str, ...] = ()
    block_values: np.ndarray = field(default_factory=lambda: np.zeros((0, len(FLOW_METRICS))))
    alerts: tuple[Alert, ...] | None = None
    events: tuple[IncidentEvent, ...] = ()
    open_incidents: tuple[int, int, int] | None = None
    health: Mapping[str, float] = field(default_factory=dict)
    kinds: tuple[str, ...] = ()
    verified: bool | None = None
    lost: tuple[str, ...] = ()
    loss: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.health, MappingProxyType):
            object.__setattr__(self, "health", MappingProxyType({k: float(v) for k, v in self.health.items()}))
        n, m, b = len(self.layers), len(self.layer_metrics), len(self.blocks)
        if self.kinds and len(self.kinds) != n:
            raise ValueError(f"StepRecord.kinds has {len(self.kinds)} entries for {n} layers")
        for name, arr, shape in (("layer_values", self.layer_values, (n, m)), ("whole", self.whole, (m,)),
                                 ("block_values", self.block_values, (b, len(FLOW_METRICS)))):
            if np.shape(arr) != shape:
                raise ValueError(f"StepRecord.{name} has shape {np.shape(arr)}, expected {shape}")
            if not isinstance(arr, np.ndarray) or arr.flags.writeable:
                object.__setattr__(self, name, _frozen(arr, *shape))

    def __getstate__(self) -> dict[str, Any]:
        # the health mapping is read-only (a mappingproxy, which pickle refuses): pickled as a plain dict, and
        # __setstate__ freezes it and the arrays again, as construction does
        return {**self.__dict__, "health": dict(self.health)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)
        self.__post_init__()

    @classmethod
    def build(
        cls,
        step: int,
        layers: Sequence[str],
        layer_columns: Mapping[str, np.ndarray],
        whole: Mapping[str, float],
        blocks: Sequence[str] = (),
        block_columns: Mapping[str, np.ndarray] | None = None,
        lost: Sequence[str] = (),
    ) -> StepRecord:
        """A record from per-metric columns (``{metric: values aligned with layers}``)."""
        metrics = tuple(layer_columns)
        n = len(layers)
        table = np.column_stack([np.asarray(layer_columns[m], dtype=np.float64).reshape(n) for m in metrics]) \
            if metrics else np.zeros((n, 0))
        nb = len(blocks)
        if block_columns is None or not nb:
            btable = np.zeros((0, len(FLOW_METRICS)))
            blocks = ()
        else:
            btable = np.column_stack([np.asarray(block_columns[m], dtype=np.float64).reshape(nb)
                                      for m in FLOW_METRICS])
        return cls(
            step=int(step),
            layers=tuple(layers),
            layer_metrics=metrics,
            layer_values=table,
            whole=np.asarray([whole.get(m, np.nan) for m in metrics], dtype=np.float64),
            blocks=tuple(blocks),
            block_values=btable,
            lost=tuple(b for b in lost if b in blocks),
        )

    # ------------------------------------------------------------------ reading
    def layer(self, metric: str) -> np.ndarray:
        """``metric`` of every layer, aligned with :attr:`layers` (all NaN when not measured at this step)."""
        if metric in self.layer_metrics:
            return self.layer_values[:, self.layer_metrics.index(metric)]
        return np.full(len(self.layers), np.nan)

    def block(self, metric: str) -> np.ndarray:
        """Flow ``metric`` of every block, aligned with :attr:`blocks`."""
        if metric not in FLOW_METRICS:
            raise KeyError(f"{metric!r} is not a flow metric; flow metrics are {FLOW_METRICS}")
        return self.block_values[:, FLOW_METRICS.index(metric)]

    def early(self, metric: str) -> np.ndarray:
        """``metric`` of the early layers of the record: the first :func:`~gradwatch.names.early_count` of
        :attr:`layers`, in definition order (the vanishing/exploding rules apply the same count to the weight
        layers only)."""
        return self.layer(metric)[: early_count(len(self.layers))] if self.layers else np.zeros(0)

    def global_value(self, metric: str) -> float:
        """``metric`` over the whole model (the ``_global`` entry); NaN when not measured."""
        if metric in self.layer_metrics:
            return float(self.whole[self.layer_metrics.index(metric)])
        return float("nan")

    def value(self, name: str, metric: str) -> float:
        """One value: ``metric`` of the layer or block ``name`` (or ``_global``); KeyError when absent."""
        if name == GLOBAL_NAME:
            if metric in self.health:
                return self.health[metric]
            if metric not in self.layer_metrics:
                raise KeyError((name, metric))
            return self.global_value(metric)
        if metric in FLOW_METRICS:
            if name not in self.blocks:
                raise KeyError((name, metric))
            return float(self.block(metric)[self.blocks.index(name)])
        if name not in self.layers or metric not in self.layer_metrics:
            raise KeyError((name, metric))
        return float(self.layer(metric)[self.layers.index(name)])

    def series(self) -> Iterator[tuple[str, tuple[str, ...], np.ndarray]]:
        """``(metric, names, values)`` per metric, layers first (with ``_global`` last), then block metrics:
        the long format of :meth:`Monitor.history <gradwatch.Monitor.history>`."""
        names = self.layers + (GLOBAL_NAME,)
        for j, metric in enumerate(self.layer_metrics):
            yield metric, names, np.append(self.layer_values[:, j], self.whole[j])
        if self.blocks:
            for j, metric in enumerate(FLOW_METRICS):
                yield metric, self.blocks, self.block_values[:, j]

    def nonfinite_counts(self) -> dict[str, int]:
        """Per metric, how many layers (``_global`` left out) or blocks hold NaN or Inf."""
        out = dict(zip(self.layer_metrics, (~np.isfinite(self.layer_values)).sum(axis=0).tolist()))
        if self.blocks:
            out.update(zip(FLOW_METRICS, (~np.isfinite(self.block_values)).sum(axis=0).tolist()))
        return out

    def __len__(self) -> int:
        """How many values the record holds (layers and ``_global`` × metrics, blocks × flow metrics, health)."""
        return (len(self.layers) + 1) * len(self.layer_metrics) + self.block_values.size + len(self.health)

    def __repr__(self) -> str:
        alerts = "off" if self.alerts is None else len(self.alerts)
        return (f"StepRecord(step={self.step}, layers={len(self.layers)}, metrics={list(self.layer_metrics)}, "
                f"blocks={len(self.blocks)}, alerts={alerts})")


class Sink:
    """What a sink is: an object that receives every :class:`StepRecord`, on rank 0, in the training thread.

    Subclassing is optional: any object with a ``write(record)`` method is a sink (``flush()`` and ``close()``
    are called when present). ``write`` must be quick; anything slow belongs on a thread of the sink's own
    (see :class:`gradwatch.WebhookSink`). An exception a sink raises is contained: logged on the ``gradwatch``
    logger, kept in ``Monitor.errors``; the other sinks and training go on.

    The monitor closes only sinks it created (TensorBoard for ``log_dir``, the default alert log); sinks you
    pass in are flushed at ``Monitor.close()``, not closed, so one sink can serve several monitors or fits.

    Example::

        class PrintSink(gradwatch.Sink):
            def write(self, record):
                print(record.step, record.global_value("grad_norm"))

        gradwatch.Monitor(model, sinks=[PrintSink()])
    """

    def write(self, record: StepRecord) -> None:  # pragma: no cover - interface
        """Take one record; subclasses implement it (quick: it runs in the training thread)."""
        raise NotImplementedError

    def flush(self) -> None:
        """Push out what is buffered; the sink stays usable."""

    def close(self) -> None:
        """Flush and release what the sink holds."""
        self.flush()
