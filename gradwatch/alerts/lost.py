"""The ``lost_skip`` rule: a residual block whose merge disappeared from the graph while its module still runs.

Block flow finds merges once and then re-locates them on every logging step. When a block's forward stops
adding its skip (``out = branch(x)`` where it was ``x + branch(x)``: a refactor, a config flag, a checkpoint
loaded into the wrong class), the merge is no longer in the graph. The probe then examines the module again at
that step: if the module still runs a sub-network but no longer merges, each block it measured before is kept
(its name, its row in depth order) as *lost* and listed in :attr:`gradwatch.StepRecord.lost`; it is measured
as a block whose skip carries nothing (``skip_grad`` 0, ``branch_grad`` the gradient its forward sends to its
input), so ``skip_share`` reads 0, ``skip_share_min`` falls to 0 and the effective depth counts it as a block
without a skip. This rule reports it at once, naming the block and the step it was lost at.

Not lost (no alarm), because they are not a block losing its skip while training goes on: a module removed
from the model or no longer run (its blocks are dropped or simply not measured), a module that passed its input
straight through at this step (stochastic depth or layer drop: nothing with parameters ran), and a block the
user re-declared with ``Monitor.watch_block`` (a deliberate change). ``docs/alerts.md`` and ``docs/flow.md``
say more.
"""

from __future__ import annotations

from .alert import Alert
from .measurements import Measurements
from .rule import Rule

__all__ = ["LostSkip"]


class LostSkip(Rule):
    """A residual block's merge is gone: its module still runs its branch but no longer adds the skip.

    Fires (``critical``) at the first logging step a block is listed in :attr:`Measurements.lost` and at every
    step it stays there; clears when the merge is back. No threshold: the evidence is structural (the
    autograd graph of the module's forward no longer holds the add that merged the skip).
    """

    name = "lost_skip"

    def __init__(self, patience: int = 1) -> None:
        super().__init__(patience, clear_margin=1.0)

    def check(self, m: Measurements) -> list[Alert]:
        """One finding per block listed as lost at this step."""
        since: dict[str, int] = self.state.setdefault("since", {})
        lost = set(m.lost)
        for name in [n for n in since if n not in lost]:
            since.pop(name)
        out = []
        for name in m.lost:
            since.setdefault(name, int(m.step))
            n = self.streak(name, True)
            if n < self.patience:
                continue
            out.append(self.alert(
                m, "critical", name, 0.0, 0.0,
                f"block {name}: its residual merge is gone from the graph since step {since[name]}: the module still "
                f"runs its branch but no longer adds the skip (skip_share 0); the block trains like a plain layer",
                "look at this block's forward: it returns branch(x) instead of x + branch(x) (a refactor, a config "
                "flag, a checkpoint loaded into another class); if the change is on purpose, declare the block "
                "anew with Monitor.watch_block or remove the module",
            ))
        for name in list(self.state.get("streaks", {})):
            if name not in lost:
                self.streak(name, False)
        return out
