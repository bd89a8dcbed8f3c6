"""The instability suite's scorecard (:mod:`gradwatch.reference.instability` runs it): per run the step it blew
up (its loss spiked or diverged), the first warning (step, rule, layers) and the lead; recall, median lead,
false alarms and misses for the calibration set (the runs the rule was tuned on: in-sample figures) and the
held-out set (runs never tuned on: the out-of-sample ones) apart, never pooled; the table, the picture and their
section of ``docs/validation.md``."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._sections import marker, write_section
from .instability import SPIKE_FROM, SPIKE_NATS, SPIKE_WINDOW, RunOutcome

__all__ = ["MARKER", "GROUPS", "Scores", "scores", "scores_by_group", "summary_line", "summary_lines", "table",
           "blew_up", "figure", "write_markdown"]

#: Where the instability suite's section of docs/validation.md starts.
MARKER = marker("gradwatch validate --only instability")
#: The suite's sets, in the order they are reported: tuned on, then never tuned on.
GROUPS = ("calibration", "held-out")


@dataclass(frozen=True)
class Scores:
    """The suite's figures. ``spiked``: runs whose loss spiked or diverged (:func:`~.instability.blowup`);
    ``recall``: those warned strictly before it / ``spiked``; ``false_alarms``: runs that did neither yet got a
    warning (any rule); ``misses``: runs that blew up without a warning before it (warned late or not at all)."""

    runs: int
    spiked: int
    warned_ahead: int
    recall: float
    median_lead: float
    false_alarms: int
    misses: int
    stable: int


def scores(outcomes: Sequence[RunOutcome]) -> Scores:
    """The suite's figures from its runs' outcomes."""
    spiked = [o for o in outcomes if o.spike is not None]
    leads = [o.lead for o in spiked if o.lead is not None and o.lead > 0]
    stable = [o for o in outcomes if o.spike is None]
    return Scores(len(outcomes), len(spiked), len(leads), len(leads) / len(spiked) if spiked else math.nan,
                  float(statistics.median(leads)) if leads else math.nan,
                  sum(o.warning is not None for o in stable), len(spiked) - len(leads), len(stable))


def scores_by_group(outcomes: Sequence[RunOutcome]) -> dict[str, Scores]:
    """:func:`scores` of each set present (:data:`GROUPS` order, then any other): a figure pooled over the
    calibration and held-out sets would hide how much of it is in-sample."""
    present = [g for g in GROUPS if any(o.group == g for o in outcomes)]
    present += list(dict.fromkeys(o.group for o in outcomes if o.group not in GROUPS))
    return {g: scores([o for o in outcomes if o.group == g]) for g in present}


def summary_line(s: Scores) -> str:
    """One sentence with the suite's figures."""
    return (f"{s.runs} runs, {s.spiked} spiked or diverged: recall {s.warned_ahead}/{s.spiked} "
            f"({100 * s.recall:.0f}%), median lead {s.median_lead:g} steps, {s.misses} missed; "
            f"{s.false_alarms} of {s.stable} runs that did neither got a warning")


def table(outcomes: Sequence[RunOutcome]) -> str:
    """One row per run."""
    rows = ["| run | set | trigger | blew up at | first warning | rule | layers | lead (steps) | verdict | s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        if o.spike is None:
            verdict = "quiet" if o.warning is None else "false alarm"
        else:
            verdict = "warned ahead" if o.lead is not None and o.lead > 0 else (
                "late" if o.warning is not None else "missed")
        rows.append(f"| {o.run} | {o.group} | {o.trigger} | {blew_up(o)} | "
                    f"{o.warning if o.warning is not None else 'none'} | {o.rule or '–'} | {o.layers or '–'} | "
                    f"{o.lead if o.lead is not None else '–'} | {verdict} | {o.seconds:.0f} |")
    return "\n".join(rows)


def blew_up(o: RunOutcome) -> str:
    """The step a run blew up, with ``(divergence)`` when its loss diverged rather than spiked; ``none``."""
    if o.spike is None:
        return "none"
    return f"{o.spike} (divergence)" if o.event == "divergence" else str(o.spike)


def figure(outcomes: Sequence[RunOutcome], path: str, per_trigger: int = 4) -> str | None:
    """Loss curves with the step each run blew up (dotted: its spike or divergence) and the first warning (dashed)
    marked, and underneath the leading signal: the ``update_to_weight`` of the first layer the instability warning
    named (log scale). Up to ``per_trigger`` runs per trigger, those that blew up first."""
    from matplotlib.figure import Figure

    triggers = list(dict.fromkeys(o.trigger for o in outcomes))
    if not triggers:
        return None
    fig = Figure(figsize=(5 * len(triggers), 6.5), dpi=90)
    axes = fig.subplots(2, len(triggers), squeeze=False, sharex="col")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#7f7f7f", "#17becf"]
    for col, trig in enumerate(triggers):
        mine = sorted((o for o in outcomes if o.trigger == trig), key=lambda o: o.spike is None)[:per_trigger]
        top, bottom = axes[0][col], axes[1][col]
        for k, o in enumerate(mine):
            c = colours[k % len(colours)]
            top.plot(range(len(o.losses)), [min(v, 12.0) for v in o.losses], color=c, lw=0.8, label=o.run)
            if o.spike is not None:
                top.axvline(o.spike, color=c, ls=":", lw=1.2)
            if o.warning is not None:
                top.axvline(o.warning, color=c, ls="--", lw=1.2)
            if o.signal:
                bottom.plot(range(len(o.signal)), o.signal, color=c, lw=0.8, label=o.layers.split(",")[0]
                            if o.layers else None)
                if o.warning is not None:
                    bottom.axvline(o.warning, color=c, ls="--", lw=1.2)
        top.set_title(f"{trig}: loss (clipped at 12); dotted: blew up, dashed: first warning", fontsize=8)
        top.legend(fontsize=6)
        bottom.set_title("update_to_weight of the first layer warned about", fontsize=8)
        bottom.set_yscale("log")
        bottom.set_xlabel("step")
        if bottom.get_legend_handles_labels()[0]:  # no signal when no instability warning named a layer
            bottom.legend(fontsize=6)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    return path


def summary_lines(outcomes: Sequence[RunOutcome]) -> list[str]:
    """One line per set: its name and :func:`summary_line`."""
    return [f"{group}: {summary_line(s)}" for group, s in scores_by_group(outcomes).items()]


def write_markdown(outcomes: Sequence[RunOutcome], out_md: str, command: str, date: str, seconds: float) -> None:
    """The suite's section of ``out_md``: how it was made, the figures per set, the table and the picture."""
    picture = figure(outcomes, os.path.join(os.path.dirname(out_md) or ".", "img", "instability.png"))
    shown = [f"![loss curves with the blow-up and first warning marked; the leading signal underneath]"
             f"({os.path.relpath(picture, os.path.dirname(out_md) or '.')})", ""] if picture else []
    heldout = any(o.group == "held-out" for o in outcomes)
    write_section(out_md, MARKER, "\n".join([
        "## Instability suite: warning ahead of loss spikes", "",
        f"Generated by `{command}` ({date}, torch {torch.__version__}, cpu, one thread, {seconds:.0f} s in all; "
        "the monitor logs every step). Tiny decoder-only pre-LN transformers (2 blocks, width 64, 4 heads, "
        "context 32; `gradwatch/reference/gpt.py`) trained with AdamW (β1 0.9, no weight decay, batch 16) on a "
        "generated language (a random Markov chain whose second half repeats the first). **Calibration set** "
        "(the runs the `instability` rule was tuned on, so its figures are in-sample): pushed from stable "
        "to unstable by the peak learning rate (with and without qk-layernorm), an LR schedule restart and a "
        "too-high β2; seeds 0, 1, 2 (`gradwatch/reference/instability.py`, `runs()`). " + (
            "**Held-out set** (`runs(heldout=True)`; not used to tune the rule's round-1 thresholds, but rounds 2 "
            "to 4 were chosen on it as well (docs/alerts.md): no longer out of sample; the tests are stock LM "
            "families never tuned on, `benchmarks/instability_stock.py --set test6` and `--set round4`): "
            "seeds 3 and 4; the calibration peaks 0.03, 0.1 and 0.5 and one between, 0.15; a TinyGPT of another "
            "shape (4 blocks, width 128) at peaks 0.03, 0.1 and 0.3; Adam's ε at 1e-15 (at peak 0.1: stable); a "
            "data shift to another grammar at step 150 (the spike is the data event itself: no rule can warn "
            "before it); a warm-up too short (peak 0.2 in 50 steps)." if heldout else "The held-out set is not run here (`--quick`)."), "",
        f"**Spike step**, mechanically: the first step from {SPIKE_FROM} on whose loss is not finite or at least "
        f"{SPIKE_NATS:g} nat above the median loss of the {SPIKE_WINDOW} steps before it. **Divergence step**: the "
        f"first step from {SPIKE_FROM} on at which the median loss of the {SPIKE_WINDOW} steps up to it is "
        f"{SPIKE_NATS:g} nat or more above the lowest such median before it (a loss that climbs and stays up, too "
        "slowly to spike). A run **blew up** at the first of the two; runs go on past it. The suite reads the "
        "loss it records; the monitor is given the loss too (`Monitor.loss`), which only holds the `instability` "
        "rule back while the loss falls. **First warning**: the first warning or critical incident of any rule; "
        "**lead** = the step it blew up - warning step when the warning came first.", "",
        *[f"- **{line}.**" for line in summary_lines(outcomes)], "",
        "Targets (for each set): recall ≥ 90%, median lead ≥ 10 steps, no warning on runs that never blow up.", "",
        table(outcomes), "", *shown]))
