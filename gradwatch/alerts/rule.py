"""The base class of alert rules: :class:`Rule` (streaks, state that survives checkpoints, alert building)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .._checks import check_int, check_number
from .alert import Alert
from .measurements import Measurements

__all__ = ["Rule", "FAR"]

#: How far past its threshold a value must be to fire at once, without waiting for ``patience`` logging steps.
#: A threshold crossed by a little for one logging step is noise (a healthy hierarchical ViT read 21.7 against
#: ``exploding``'s 20 for one step); one crossed by 5x is not (a 16-layer sigmoid MLP reads 3e-7 against
#: ``vanishing``'s 0.02; He et al.'s constant-scaling and 1x1-conv-shortcut ResNet-110s read 215-300 against
#: ``exploding``'s 20 at init). ``docs/alerts.md``.
FAR = 5.0


class Rule:
    """Base class of alert rules.

    Subclasses set :attr:`name` and implement :meth:`check`, returning the alerts raised at this step
    (build them with :meth:`alert`). Keep every piece of state in :attr:`state` (a JSON-like dict): it is
    saved in the monitor's ``state_dict``. :meth:`streak` counts consecutive logging steps a condition held;
    :meth:`hold` does the same with hysteresis.

    A subclass may set ``on_by_default = False`` to stay out of ``rules=None`` (the defaults) until asked for
    by name; every built-in rule is on by default (``instability`` too, since issue 26: ``docs/alerts.md``).

    A rule returns a finding at every step its condition holds, not only the first: the monitor's incident
    tracker (:mod:`gradwatch.alerts.tracker`) turns the findings into one incident per condition, opened,
    reminded with back-off and resolved when the findings stop.

    Args:
        patience: consecutive logging steps a condition must hold before the rule fires.
        clear_margin: once firing, a rule with a threshold keeps firing until its value is this many times
            past the threshold on the safe side (a floor of 1e-3 clears above 2e-3 with the default 2), so a
            value wobbling around the threshold stays one incident instead of flapping.
        far: a rule with a threshold fires at once, without waiting for ``patience``, when its value is this
            many times past the threshold on the unsafe side (:data:`FAR`; rules pass it to :meth:`hold`).
    """

    name = "rule"

    def __init__(self, patience: int = 3, clear_margin: float = 2.0, far: float = FAR) -> None:
        owner = type(self).__name__
        self.patience = check_int(patience, "patience", minimum=1, owner=owner)
        self.clear_margin = check_number(clear_margin, "clear_margin", owner=owner)
        if self.clear_margin < 1:
            raise ValueError(f"{owner}: clear_margin must be >= 1, got {clear_margin!r}")
        self.far = check_number(far, "far", owner=owner)
        if self.far < 1:
            raise ValueError(f"{owner}: far must be >= 1, got {far!r}")
        self.state: dict[str, Any] = {"streaks": {}}

    def check(self, m: Measurements) -> list[Alert]:  # pragma: no cover - abstract
        """The findings at this logging step (empty: all clear); subclasses implement it."""
        raise NotImplementedError

    def streak(self, key: str, condition: bool) -> int:
        """Count consecutive logging steps on which ``condition`` held for ``key`` (0 resets)."""
        streaks = self.state["streaks"]
        n = streaks.get(key, 0) + 1 if condition else 0
        if n:
            streaks[key] = n
        else:
            streaks.pop(key, None)
        return n

    def hold(self, key: str, fire: bool, clear: bool, far: bool = False, patience: int | None = None) -> int:
        """:meth:`streak` with hysteresis: a streak that reached :attr:`patience` goes on until ``clear``
        (the value past the threshold by :attr:`clear_margin`), not merely until ``fire`` stops. ``far`` (the
        value past the threshold by :attr:`far`) makes the condition fire at once. Returns the streak (the
        logging steps it has held); :meth:`firing` says whether it fires. ``patience`` overrides the rule's for
        this condition (one rule, conditions of different patience); read such a condition from the streak
        returned, as :meth:`firing` assumes the rule's own."""
        p = self.patience if patience is None else patience
        fired = self.state.setdefault("firing", {})
        was = key in fired or self.state["streaks"].get(key, 0) >= p
        n = self.streak(key, fire or far or (was and not clear))
        if n and (far or n >= p or key in fired):
            fired[key] = n
        else:
            fired.pop(key, None)
        return n

    def firing(self, key: str) -> bool:
        """Whether the condition :meth:`hold` tracks under ``key`` fires: it has held :attr:`patience` logging
        steps, or was far past its threshold, and has not cleared since."""
        return key in self.state.get("firing", {}) or self.state["streaks"].get(key, 0) >= self.patience

    def alert(self, m: Measurements, severity: str, name: str | None, value: float, threshold: float,
              message: str, hint: str, subject: str | None = None) -> Alert:
        """A finding of this rule at ``m``'s step (``subject``: what it is about when ``name`` is None)."""
        return Alert(self.name, severity, int(m.step), name, float(value), float(threshold), message, hint, subject)

    def state_dict(self) -> dict[str, Any]:
        """:attr:`state` as a deep copy of plain JSON-like data (numpy scalars as Python numbers)."""
        return _plain(self.state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace :attr:`state` with a plain copy of ``state`` (saved by :meth:`state_dict`)."""
        self.state = _plain(state)
        self.state.setdefault("streaks", {})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "state")
        return f"{type(self).__name__}({args})"


def _plain(obj: Any) -> Any:
    """A deep copy made of dicts, lists, str, int and float (what checkpoints store best)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj
