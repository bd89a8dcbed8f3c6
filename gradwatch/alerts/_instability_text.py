"""The words of an :class:`~gradwatch.alerts.instability.Instability` warning: what moved first, in order,
and what to do about it (kept apart from the rule's arithmetic: one concern per module)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..names import short_list
from ._loss import Rise
from .alert import Alert
from .measurements import Measurements

if TYPE_CHECKING:
    from .instability import Instability

__all__ = ["finding"]

_ATTENTION = ("attn", "attention", "qkv", "query", "key", "q_proj", "k_proj", "in_proj")


def finding(rule: Instability, m: Measurements, names: list[str], u: np.ndarray, ru: np.ndarray, rg: np.ndarray,
             growing: list[str], exploded: list[str], quiet: list[str], dropped: dict[str, float],
             opened: int, climbing: bool = False, align: np.ndarray | None = None,
             rise: Rise | None = None) -> Alert:
    since: dict[str, int] = rule.state["since"]
    first = sorted((n for n in growing if n in since), key=lambda n: (since[n], names.index(n)))
    pos = {n: i for i, n in enumerate(names)}
    parts = [f"{n} (update {ru[pos[n]]:.2g}x, gradient {rg[pos[n]]:.2g}x, since step {since[n]})" for n in first[:3]]
    starts = [since[n] for n in first] + [since[f"branch:{b}"] for b in quiet if f"branch:{b}" in since] + (
        [since["whole"]] if climbing and "whole" in since else []) + (
        [since["inflate"]] if align is not None and "inflate" in since else []) + (
        [since["loss"]] if rise is not None and "loss" in since else [])
    start = min(starts, default=opened)
    said = []
    if first:
        said.append(f"the update and the gradient of {len(first)} of {len(names)} weight layers grew together "
                    f"against their medians over the last {rule.window} logging steps, first "
                    + "; ".join(parts) + (f"; {short_list(first[3:], 4)}" if len(first) > 3 else ""))
    if quiet:
        drops = [f"{b} ({dropped[b]:.2g}x, since step {since.get(f'branch:{b}', opened)})" if b in dropped
                 else b for b in sorted(quiet)]
        said.append(f"residual branches went quiet, their gradient fallen {rule.branch_drop:g}x and more "
                    f"against their skip's below their median over the last {rule.window} logging steps: "
                    f"{short_list(drops, 4)} (units knocked out by too large steps)")
    big = float(np.nanmax(u)) if len(u) and np.isfinite(u).any() else math.nan
    whole = rule.state.get("whole_ratio")
    climbed = rule.state.get("climb_ratio")
    if climbing:  # the layers whose gradient grew most: where the climb shows
        top = [names[i] for i in np.argsort(-np.nan_to_num(rg, nan=0.0)) if rg[i] > rule.grad_growth][:3]
        said.append(f"the whole model's gradient has stayed above {rule.climb:g}x its median over the "
                    f"last {rule.climb_window} logging steps since step {since.get('whole', opened)}"
                    + (f" (now {climbed:.2g}x)" if climbed else "")
                    + (f", most in {', '.join(f'{n} ({rg[pos[n]]:.2g}x)' for n in top)}" if top else ""))
    else:
        top = []
    inflated: list[str] = []
    if align is not None:  # the layers whose steps went most into their weight's norm
        order = np.argsort(-np.nan_to_num(align, nan=-np.inf))
        inflated = [names[i] for i in order if align[i] > rule.inflate]
        said.append(f"the weights inflate: in {len(inflated)} of {len(names)} weight layers, "
                    f"{rule.inflate:.0%} or more of the steps' length over the last {rule.inflate_window} "
                    f"logging steps went into growing the weight's norm (each step scales the weight up) since "
                    f"step {since.get('inflate', opened)}, most in "
                    + ", ".join(f"{names[i]} ({align[i]:.2f})" for i in order[:3] if align[i] > rule.inflate))
    if rise is not None:
        said.append(f"the training loss has climbed {rise.level - rise.best:.2g} above the best it reached (its "
                    f"median over the last {rule.risen_window} logging steps {rise.best:.4g} -> {rise.level:.4g}; "
                    f"{rise.bar:.2g} counts as a climb for this loss's scale and noise) since step "
                    f"{since.get('loss', opened)}: the run is on its way to diverging")
    if (first or quiet) and whole is not None:
        said.append(f"the whole model's gradient at {whole:.2g}x its median over the last {rule.window} "
                    "logging steps")
    if said:
        what = (f"instability ahead at steps of up to {big:.2g} of the weight: " + "; ".join(said))
    else:
        what = f"instability since step {opened}: the layers' growth has settled"
    value = float(np.nanmax(ru[[pos[n] for n in first]])) if first else (
        climbed if climbing and climbed else (float(align[pos[inflated[0]]]) if inflated and align is not None
                                              else (rise.level - rise.best if rise is not None else big)))
    moved = first or top or inflated  # the layers the hints read: those that moved first, else where it shows
    if exploded:
        what += (f"; residual branches grown {rule.branch_growth:g}x and more against their skip since step "
                 f"{opened}: {short_list(sorted(exploded), 4)} (their skip_share falls because the branch "
                 "exploded, not because the skip is broken)")
    hint = ["lower the peak learning rate or lengthen the warm-up (or clip gradients)"]
    if inflated:
        hint.append("weight decay bounds growing weights")
    if any(any(a in n.lower() for a in _ATTENTION) for n in moved[:3]):
        hint.append("attention layers moved first: qk-layernorm bounds the attention logits")
    if names and moved and moved[0] == names[-1]:
        hint.append("the output layer moved first: a z-loss keeps the output logits from drifting")
    if len(first) >= max(2, len(names) // 2) and len({since[n] for n in first}) == 1:
        hint.append(f"most layers moved in the same step: check the data at step {start}")
    else:
        hint.append(f"if the schedule or the data changed near step {start}, look there first")
    name = first[0] if len(first) == 1 and not quiet and not climbing and not inflated else (
        quiet[0] if len(quiet) == 1 and not first and not inflated else None)
    threshold = rule.update_growth if first else (rule.climb if climbing else (
        rule.inflate if inflated else (rise.bar if rise is not None else rule.update_growth)))
    return rule.alert(m, "warning", name, value, threshold, what, "; ".join(hint),
                      subject="training stability")
