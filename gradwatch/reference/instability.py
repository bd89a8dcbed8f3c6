"""``gradwatch validate --only instability``: the instability suite. Small decoder-only pre-LN transformers
(:class:`gradwatch.reference.gpt.TinyGPT`) trained with AdamW on a generated language, pushed from stable to
unstable by the peak learning rate (with and without qk-layernorm), an LR schedule restart, and a high β2;
several seeds. Each run is scored on when its loss spiked or diverged (:func:`blowup`: the suite reads the loss
it records; the monitor is given the loss only for its hold-back while the loss falls) against the first warning
gradwatch raised (:mod:`gradwatch.reference.instability_report` writes the scorecard).

Two sets: the **calibration** set (:func:`runs`, seeds 0-2), on which the ``instability`` rule was tuned, so
its figures are in-sample; and the **held-out** set (``runs(heldout=True)``, :func:`heldout_runs`): other
seeds, a TinyGPT of another shape, triggers the calibration set lacks (a tiny Adam ε, a data shift, a short
warm-up) and stable controls, not used to tune the rule's round-1 thresholds (rounds 2 to 4 were chosen on
both sets and on stock LMs, docs/alerts.md: the tests are now ``benchmarks/instability_stock.py --set test6``
and ``--set round4``).
The scorecard reports the two apart."""

from __future__ import annotations

import logging
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..monitor import Monitor
from .gpt import TinyGPT, synthetic_language

__all__ = ["Run", "RunOutcome", "runs", "run_one", "train_run", "build", "train", "spike_step", "divergence_step",
           "blowup", "SPIKE_NATS", "SPIKE_WINDOW", "SPIKE_FROM", "LEADING_RULES", "heldout_runs"]

#: The spike definition (:func:`spike_step`): the loss at a step exceeds the median of the ``SPIKE_WINDOW``
#: steps before it by ``SPIKE_NATS`` nats or more, or is not finite, at step ``SPIKE_FROM`` or later. The same
#: three define a divergence (:func:`divergence_step`); a run blew up at the first of the two (:func:`blowup`).
SPIKE_NATS = 1.0
SPIKE_WINDOW = 20
SPIKE_FROM = 10
#: Rules whose warnings count as warning of the instability ahead (the scorecard's first warning is the first
#: warning or critical incident of any rule: a rule that fires only after the spike is no early warning).
LEADING_RULES = ("instability",)


def spike_step(losses: Sequence[float], nats: float = SPIKE_NATS, window: int = SPIKE_WINDOW,
               start: int = SPIKE_FROM) -> int | None:
    """The first step ``t >= start`` whose loss is non-finite or at least ``nats`` above the median loss of the
    ``window`` steps before it (fewer at the start); None when the run never spiked. A median, so one noisy batch
    before it does not move the reference; a loss creeping up over more than ``window`` steps by less than
    ``nats`` is not a spike."""
    for t in range(max(start, 1), len(losses)):
        v = losses[t]
        if not math.isfinite(v):
            return t
        before = [x for x in losses[max(0, t - window):t] if math.isfinite(x)]
        if before and v >= statistics.median(before) + nats:
            return t
    return None


def divergence_step(losses: Sequence[float], nats: float = SPIKE_NATS, window: int = SPIKE_WINDOW,
                    start: int = SPIKE_FROM) -> int | None:
    """The first step ``t >= start`` at which the median loss of the ``window`` steps up to ``t`` (fewer at the
    start; finite losses only) is at least ``nats`` above the lowest such median before it; None when the loss
    never climbed that far. The divergence a spike's definition cannot see: a loss that climbs by a nat or
    more and stays up, too slowly ever to stand a nat above the steps just before it (stock LMs just below
    their edge drift up 1-2 nats over 100 steps, docs/alerts.md)."""
    lowest = math.inf
    for t in range(max(start, 1), len(losses)):
        recent = [x for x in losses[max(0, t - window + 1):t + 1] if math.isfinite(x)]
        if not recent:
            continue
        level = statistics.median(recent)
        if level >= lowest + nats:
            return t
        lowest = min(lowest, level)
    return None


def blowup(losses: Sequence[float]) -> tuple[int | None, str | None]:
    """When and how the run blew up: the first of :func:`spike_step` (``"spike"``) and :func:`divergence_step`
    (``"divergence"``; a spike on the same step wins), or ``(None, None)`` when it did neither."""
    spike, diverged = spike_step(losses), divergence_step(losses)
    if diverged is not None and (spike is None or diverged < spike):
        return diverged, "divergence"
    return spike, "spike" if spike is not None else None


@dataclass(frozen=True)
class Run:
    """One training run of the suite: the knob that makes it unstable (or not) and its seed."""

    name: str
    trigger: str  # "lr", "restart", "beta2"; held out also "shape", "eps", "shift", "warmup"
    lr: float  # peak learning rate
    qk_norm: bool = False
    seed: int = 0
    steps: int = 250
    warmup: int = 200  # linear warm-up to the peak
    beta2: float = 0.95
    eps: float = 1e-8
    restart: int | None = None  # a cosine from the peak decays to 0 at this step, then the schedule restarts:
    restart_lr: float = 0.0  # a linear warm-up to this peak over ``rewarm`` steps, the optimizer's state kept
    rewarm: int = 30
    shift: int | None = None  # from this step the data come from another grammar
    dim: int = 64  # TinyGPT's width and depth
    depth: int = 2
    group: str = "calibration"  # or "held-out": never used to tune a rule (see heldout_runs)


@dataclass
class RunOutcome:
    """What one run showed: its spike and the first warning, with the curves the picture needs."""

    run: str
    trigger: str
    spike: int | None  # the step it blew up (:func:`blowup`): its loss spiked or diverged
    warning: int | None  # step of the first warning (or critical) incident of any rule
    rule: str | None
    layers: str | None
    lead: int | None  # spike - warning when warned at or before the spike
    observed: list[str] = field(default_factory=list)  # "rule@step (name) [severity]" of every incident
    losses: list[float] = field(default_factory=list)
    signal: list[float] = field(default_factory=list)  # the instability rule's statistic per step
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    group: str = "calibration"  # the run's set: "calibration" (tuned on) or "held-out" (never tuned on)
    event: str | None = None  # how it blew up at ``spike``: "spike" or "divergence" (:func:`blowup`)


def _lr(run: Run, i: int) -> float:
    if run.restart is None:
        return run.lr * min(1.0, (i + 1) / run.warmup)
    if i >= run.restart:
        return run.restart_lr * min(1.0, (i - run.restart + 1) / run.rewarm)
    return run.lr * min((i + 1) / run.warmup, 0.5 * (1 + math.cos(math.pi * i / run.restart)))


def runs(quick: bool = False, heldout: bool = False) -> list[Run]:
    """The calibration set (``quick``: one stable and one unstable learning rate, seed 0, 120 steps): peak
    learning rates from stable (0.03, 0.1) to unstable (0.3, 0.5), each with and without qk-layernorm, reached
    by a linear warm-up over 200 of 250 steps; an LR schedule restart (a cosine from 0.1 to 0 at step 120, then
    a 30-step warm-up to 0.5, Adam's state kept); β2 = 0.9999 at a peak of 0.1 (stable at β2 = 0.95) for 300
    steps; seeds 0, 1, 2. The instability rule was tuned on these runs.

    ``heldout``: the held-out set instead (:func:`heldout_runs`)."""
    if heldout:
        return heldout_runs()
    if quick:
        return [Run("lr0.03-s0", "lr", 0.03, steps=120), Run("lr0.5-s0", "lr", 0.5, steps=120)]
    out = []
    for seed in (0, 1, 2):
        for lr in (0.03, 0.1, 0.3, 0.5):
            for qk in (False, True):
                out.append(Run(f"lr{lr:g}{'-qk' if qk else ''}-s{seed}", "lr", lr, qk, seed))
        out.append(Run(f"restart-s{seed}", "restart", 0.1, seed=seed, warmup=50, restart=120, restart_lr=0.5))
        out.append(Run(f"beta2-s{seed}", "beta2", 0.1, seed=seed, warmup=50, beta2=0.9999, steps=300))
    return out


def heldout_runs() -> list[Run]:
    """The held-out set: runs no rule was tuned on (the team's standard: calibrate on some models, test on
    others), to measure recall, lead and false alarms out of sample. Seeds 3 and 4 (the calibration set has
    0-2), 20 runs, 12 of them stable controls (they never blew up by :func:`blowup` on this machine), some
    of them just below the edge, where a false alarm is likeliest:

    - ``lr``: the calibration set's peaks 0.03, 0.1 (stable) and 0.5 (spikes), and 0.15 between its stable
      and unstable ones (stable, near the edge), on the new seeds;
    - ``shape``: a TinyGPT of another shape, 4 blocks of width 128 (the calibration set's are 2 of width 64),
      at peaks 0.03, 0.1 (stable) and 0.3 (spikes);
    - ``eps``: Adam's ε at 1e-15 at a peak of 0.1 (stable: ε alone did not make this model spike at peaks
      0.1 or 0.2, so these are controls that the rule does not read a tiny ε as an instability);
    - ``shift``: from step 150 the data come from another grammar (peak 0.05 reached over 50 steps; stable
      without the shift): the loss jumps at the shift, so the spike is the data event itself and no rule can
      warn before it; these runs test that nothing fires ahead of it and what fires after;
    - ``warmup``: a warm-up too short, peak 0.2 reached in 50 steps (it spikes; the calibration set reaches
      its peaks in 200 steps, where 0.1 is stable)."""
    out = []
    for seed in (3, 4):
        for lr in (0.03, 0.1, 0.15, 0.5):
            out.append(Run(f"lr{lr:g}-s{seed}", "lr", lr, seed=seed, group="held-out"))
        for lr in (0.03, 0.1, 0.3):
            out.append(Run(f"shape-lr{lr:g}-s{seed}", "shape", lr, seed=seed, dim=128, depth=4, group="held-out"))
        out.append(Run(f"eps1e-15-s{seed}", "eps", 0.1, seed=seed, eps=1e-15, group="held-out"))
        out.append(Run(f"shift-s{seed}", "shift", 0.05, seed=seed, warmup=50, shift=150, group="held-out"))
        out.append(Run(f"warmup50-lr0.2-s{seed}", "warmup", 0.2, seed=seed, warmup=50, group="held-out"))
    return out


def run_one(run: Run, out: str | None = None, threads: int = 1, every: int = 1) -> RunOutcome:
    """Train ``run`` with a default monitor (logging every ``every`` steps; TensorBoard logs under
    ``<out>/<run>`` without pictures, when ``out`` is given) and score it."""
    return score(run, *train_run(run, out, threads, every))


def train_run(run: Run, out: str | None = None, threads: int = 1,
              every: int = 1) -> tuple[Monitor, list[float], float]:
    """:func:`run_one` before scoring: the suite's TinyGPT for ``run`` trained by :func:`train`; returns the
    monitor (its records replay a rule offline), the loss per step and the seconds taken."""
    torch.set_num_threads(threads)
    model, batch = build(run)
    return train(run, model, batch, lambda net, b: net.loss(b),
                 log_dir=os.path.join(out, run.name) if out else None, every=every)


def build(run: Run) -> tuple[TinyGPT, Callable[[int, torch.Generator], torch.Tensor]]:
    """The suite's TinyGPT for ``run`` (seeded with ``run.seed``) and its batches for :func:`train`: batch ``i``
    is 16 sequences of the generated language, of the other grammar from ``run.shift`` on."""
    torch.manual_seed(run.seed)
    model = TinyGPT(dim=run.dim, depth=run.depth, qk_norm=run.qk_norm)
    data = synthetic_language(4096, seed=run.seed)
    shifted = synthetic_language(4096, seed=run.seed, grammar=1) if run.shift is not None else data

    def batch(i: int, gen: torch.Generator) -> torch.Tensor:
        source = shifted if run.shift is not None and i >= run.shift else data
        return source[torch.randint(0, len(source), (16,), generator=gen)]

    return model, batch


def train(run: Run, model: nn.Module, batch: Callable[[int, torch.Generator], torch.Tensor],
          loss_of: Callable[[Any, torch.Tensor], torch.Tensor], log_dir: str | None = None,
          every: int = 1) -> tuple[Monitor, list[float], float]:
    """The suite's training loop, for its own models and others (``benchmarks/instability_stock.py``): AdamW
    with ``run``'s β2, ε and schedule, ``batch(i, generator)`` the batch of step ``i`` (the generator seeded with
    ``run.seed``), ``loss_of(model, batch)`` its loss, under a default monitor logging every ``every`` steps with
    no pictures; gradwatch's log lines are silenced (the incidents are read from ``mon.alerts``). Returns the
    monitor, the loss per step and the seconds taken; the model is built (and seeded) by the caller."""
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr, betas=(0.9, run.beta2), eps=run.eps, weight_decay=0.0)
    gen = torch.Generator().manual_seed(run.seed)
    losses: list[torch.Tensor] = []
    log = logging.getLogger("gradwatch")
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    start = time.perf_counter()
    try:
        with Monitor(model, optimizer=opt, every=every, remind_after=None, pictures=0, rules={"instability": {}},
                     log_dir=log_dir) as mon:
            for i in range(run.steps):
                for g in opt.param_groups:
                    g["lr"] = _lr(run, i)
                loss = loss_of(model, batch(i, gen))
                mon.loss(loss)  # read on logging steps only (the rule holds back while it falls)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
    finally:
        log.setLevel(level)
    return mon, torch.stack(losses).tolist(), time.perf_counter() - start


def _named(message: str) -> list[str]:
    """The layers and blocks an instability warning names, in its order: ``name (..., since step N)``, else the
    layers a climb shows most in (``most in name (1.8x), name (1.6x)``)."""
    named = re.findall(r"(\S+) \([^()]*since step", message)
    climb = re.search(r"most in ((?:\S+ \([\d.e+-]+x\)(?:, )?)+)", message)
    return named or (re.findall(r"(\S+) \([\d.e+-]+x\)", climb.group(1)) if climb else [])


def score(run: Run, mon: Monitor, losses: list[float], seconds: float) -> RunOutcome:
    """The spike, the first warning and the lead of a finished run, and the leading signal for the picture: the
    ``update_to_weight`` of the first layer the first instability warning named."""
    spike, event = blowup(losses)
    seen, told = set(), []
    for a in mon.alerts:
        if (a.rule, a.name, a.severity) not in seen:
            seen.add((a.rule, a.name, a.severity))
            told.append(a)
    warn = next((a for a in told if a.severity != "info"), None)
    lead = spike - warn.step if warn is not None and spike is not None and warn.step < spike else None
    layers = None
    if warn is not None:
        named = _named(warn.message) if warn.rule == "instability" else []
        layers = ", ".join(named) if named else (warn.name or warn.subject)
    first = next((a for a in told if a.rule == "instability"), None)
    signal: list[float] = []
    if first is not None:
        named = [n for n in _named(first.message) if n in mon.records[-1].layers] if mon.records else []
        if named:
            signal = [float(r.value(named[0], "update_to_weight")) for r in mon.records]
    return RunOutcome(run.name, run.trigger, spike, warn.step if warn else None, warn.rule if warn else None,
                      layers, lead, [f"{a.rule}@{a.step} ({a.name or '-'}) [{a.severity}]" for a in told], losses,
                      signal, seconds, list(mon.errors), run.group, event)
