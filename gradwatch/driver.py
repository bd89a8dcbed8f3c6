"""How a framework adapter drives a :class:`~gradwatch.Monitor`: :class:`StepDriver`.

A raw loop calls ``mon.step()``, or gives the monitor its optimizer. A framework (Lightning, the Hugging Face
``Trainer``) has its own step counter and its own points where gradients are final — after accumulation and
the cross-rank sync, before clipping — so its adapter starts a measurement there and finishes it after the
optimizer step (``update_to_weight`` spans the step; an AMP overflow is known only then). These calls must come
in order, on the framework's logging steps only, so they are not methods a user sees on ``Monitor``: an
adapter wraps its monitor in a driver, which also tells the monitor's block-flow hooks which forwards belong to
a logging step. ``integrations/`` holds three adapters written this way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .measure.meter import amp_grad_scale, loss_scale
from .monitor import Monitor

__all__ = ["StepDriver", "amp_grad_scale", "loss_scale"]


class StepDriver:
    """Drives ``monitor`` from a framework's hooks: :meth:`begin` where the gradients are final, then
    :meth:`end` after the optimizer step, or :meth:`discard` when the step did not happen.

    Args:
        monitor: a monitor built without ``optimizer=`` (the adapter decides when to measure); its
            ``mon.step()`` is ignored from now on, with a warning.
        logging: called at each forward of a residual block: whether the step in progress logs, so that
            block-flow hooks are armed on those steps only (the monitor's own ``step % every`` check does not
            know the framework's step). ``None``: block flow is armed on no step (e.g. a second monitor of the
            same model, whose first monitor measures block flow).

    Example (the shape of an adapter)::

        driver = StepDriver(Monitor.from_config(model, cfg, writer=w, params=ps), logging=lambda: armed)
        # in the framework's "gradients are final" hook, on a logging step:
        pending = driver.begin(step, grad_scale=amp_grad_scale(optimizer, scaler), track_update=True)
        # after optimizer.step():
        if pending:
            driver.end(found_inf=getattr(optimizer, "found_inf", None))
    """

    def __init__(self, monitor: Monitor, *, logging: Callable[[], bool] | None = None) -> None:
        if not isinstance(monitor, Monitor):
            raise TypeError(f"monitor must be a gradwatch.Monitor, got {type(monitor).__name__}")
        if monitor._optimizer is not None:
            raise ValueError("this Monitor measures at its optimizer's steps (optimizer= was given); a StepDriver "
                             "needs one built without optimizer=")
        if monitor._driven:
            raise ValueError("this Monitor already has a StepDriver")
        if monitor._closed:
            raise ValueError("this Monitor is closed")
        if logging is not None and not callable(logging):
            raise TypeError(f"logging must be a callable returning bool, or None, got {type(logging).__name__}")
        self.monitor = monitor
        monitor._driven = True
        monitor._flow_trigger = logging if logging is not None else _never

    def begin(self, step: int, *, grad_scale: torch.Tensor | float | None = None, track_update: bool = False) -> bool:
        """Measure the gradients and weights now, to be recorded at ``step`` (on the framework's axis).

        Call where the gradients are final for this optimizer step (accumulated, synced, unscaled), before the
        step, on logging steps only (the driver does not check ``every``: the framework's cadence decides).
        ``grad_scale`` divides gradients still multiplied by an AMP loss scale (:func:`amp_grad_scale`; a
        device tensor, so no host sync). ``track_update`` snapshots the weights so :meth:`end` adds
        ``update_to_weight``. Nothing moves to the host until :meth:`end`. Returns True when a measurement is
        pending. Never raises unless the monitor is ``strict``. A measurement still pending (no :meth:`end` or
        :meth:`discard` since the last ``begin``) is dropped, with one warning: the adapter lost a step.
        """
        if self.monitor._pending is not None:
            self.monitor._once.warn("unfinished", "gradwatch: StepDriver.begin() while the last measurement is still "
                                    "pending (no end() or discard() after it): that measurement is dropped")
        return self.monitor._begin_step(step, grad_scale, track_update)

    def end(self, found_inf: torch.Tensor | None = None) -> None:
        """Finish the pending measurement and record it (rules, then every sink).

        ``found_inf``: an AMP scaler's overflow flag for this step (``optimizer.found_inf`` inside a fused
        optimizer's step); when non-zero the step was skipped and nothing is recorded. Read on the host with
        the norms, so it adds no synchronisation. A :class:`~gradwatch.GradientAlarm` (``on_critical="raise"``)
        propagates from here.
        """
        self.monitor._end_step(found_inf)

    def discard(self) -> None:
        """Drop the pending measurement, recording nothing: for a step the optimizer did not take (skipped by
        an AMP scaler). Nothing is moved to the host."""
        self.monitor._discard_step()

    def __repr__(self) -> str:
        return f"StepDriver({self.monitor!r})"


def _never() -> bool:
    return False
