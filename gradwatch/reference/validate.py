"""``gradwatch validate``: every diagnostic proven on networks where the truth is known, on this machine.

A scorecard over reference networks trained on the embedded data with the default monitor:

- **healthy** ResNets (post-activation, pre-activation, bottleneck): no warning or critical may fire;
- **controls**: plain nets of the same depth; the depth rules (``vanishing``, ``exploding``, ``depth_trend``)
  may fire, nothing else;
- **faults**, each with the rule and the layer or block that must be named: a detached skip, a skip scaled
  by 1e-4, a deep sigmoid MLP, a NaN injected into one layer's gradient at a chosen step, a learning rate of
  0 in one layer's param group;
- **variants**: He et al. 2016's shortcut variants on a 110-layer net (:data:`gradwatch.reference.blocks.VARIANTS`),
  which the paper found train worse than the identity; what gradwatch flags and what it only shows is
  recorded, never counted as a miss or a false alarm;
- **instability** (:mod:`gradwatch.reference.instability`): tiny transformers pushed into loss spikes, each
  run scored on whether a warning came before its loss spiked or diverged, and runs that do neither must stay quiet
  (``--only instability``; two runs under ``--quick``): its calibration set (the runs the rule was tuned on)
  and its held-out set (never tuned on; not under ``--quick``), scored apart.

Each case is trained with momentum SGD (lr 0.1, momentum 0.9, weight decay 1e-4; nets of 56 layers and more
warm up at lr 0.01 for the first quarter of the steps, as He et al. did for deep nets), logs to TensorBoard
under ``<out>/<case>``, and ends with a verdict; ``<out>/validate.json`` holds them all. The exit status is
1 on any miss or false alarm.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..monitor import Monitor
from . import instability, instability_report
from ._json import dump_json
from .blocks import VARIANTS, resnet, set_shortcut_variant
from .data import synthetic_images
from .validate_report import MARKER, figure, findings, table, write_markdown

__all__ = ["Case", "Outcome", "cases", "run_case", "run", "table", "findings", "figure", "write_markdown",
           "DEPTH_RULES", "MARKER"]

#: Rules a plain (no-skip) control may fire: what they show is the reason the controls are there.
DEPTH_RULES = ("vanishing", "exploding", "depth_trend")


@dataclass(frozen=True)
class Case:
    """One network of the scorecard, what it must show and how it is trained."""

    name: str
    group: str  # "healthy", "control", "fault", "variant"
    about: str
    build: Callable[[], nn.Module]
    expect: tuple[tuple[str, str | None], ...] = ()  # (rule, name that must be in the alert, or None)
    allowed: tuple[str, ...] = ()  # rules that may fire besides the expected ones
    depth: int = 20
    zero_lr: str | None = None  # a layer whose param group gets lr 0
    nan_at: tuple[str, int] | None = None  # (layer, step): its weight gradient set to NaN at that step
    flatten: bool = False  # an MLP: images flattened
    steps: int | None = None  # at most this many steps, whatever the run's (--quick's 110-layer variants)


@dataclass
class Outcome:
    """What one case showed."""

    case: str
    group: str
    about: str
    expected: list[str]
    observed: list[str]  # "rule@step (name) [severity]" of every incident told, in order
    missed: list[str]
    false_alarms: list[str]
    health: dict[str, float] = field(default_factory=dict)  # last values of the health figures
    loss: float = math.nan  # mean loss over the last 10 steps
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # errors contained inside gradwatch (must be none)
    curves: dict[str, list[float]] = field(default_factory=dict)  # per logging step: step, loss, health figures

    @property
    def passed(self) -> bool:
        """No expected finding missed, no false alarm, no error contained inside gradwatch."""
        return not self.missed and not self.false_alarms and not self.errors

    @property
    def verdict(self) -> tuple[str, list[str]]:
        """``("ok" | "miss" | "false alarm" | "error", the findings behind it)``: one reading for every report."""
        if self.passed:
            return "ok", []
        if self.missed:
            return "miss", self.missed
        return ("false alarm", self.false_alarms) if self.false_alarms else ("error", self.errors)


def _mlp() -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(3 * 16 * 16, 64), nn.Sigmoid()]
    for _ in range(18):
        layers += [nn.Linear(64, 64), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(64, 10))


def cases(quick: bool = False) -> list[Case]:
    """The scorecard's cases (``quick``: depths 20 and 56, and four 110-layer variants and the identity for 20
    steps each; ≤ 3 minutes on 2 cores)."""
    depths = (20, 56) if quick else (20, 56, 110)
    out: list[Case] = []
    for d in depths:
        out.append(Case(f"postact-{d}", "healthy", f"ResNet-{d}, post-activation (He 2015)",
                        partial(resnet, d), depth=d))
        out.append(Case(f"preact-{d}", "healthy", f"ResNet-{d}, pre-activation (He 2016)",
                        partial(resnet, d, "preact"), depth=d))
    for d in ((20,) if quick else (20, 56, 110, 164)):  # 9n+2
        out.append(Case(f"bottleneck-{d}", "healthy", f"ResNet-{d}, pre-activation bottleneck",
                        partial(resnet, d, "preact", bottleneck=True), depth=d))
    for d in depths:
        out.append(Case(f"plain-{d}", "control", f"plain {d}-layer BN net (no skips)",
                        partial(resnet, d, "plain"), allowed=DEPTH_RULES, depth=d))
    out += [
        Case("detached-skip", "fault", "ResNet-20, block 4 (layer2.1) skip detached",
             lambda: resnet(20, skip_fault={4: "detached"}), expect=(("skip_collapse", "layer2.1"),)),
        Case("scaled-skip", "fault", "ResNet-20, block 4 (layer2.1) skip scaled by 1e-4",
             lambda: resnet(20, skip_fault={4: ("scaled", 1e-4)}), expect=(("skip_collapse", "layer2.1"),)),
        Case("sigmoid-mlp", "fault", "20-layer sigmoid MLP (vanishing by construction)", _mlp,
             expect=(("vanishing", None),), allowed=("depth_trend",), flatten=True),
        Case("nan-gradient", "fault", "ResNet-20, NaN in layer2.0.conv1's weight gradient at step 50",
             lambda: resnet(20), expect=(("nonfinite", "layer2.0.conv1"),), nan_at=("layer2.0.conv1", 50)),
        Case("zero-lr", "fault", "ResNet-20, layer1.1.conv1 in a param group with lr 0",
             lambda: resnet(20), expect=(("dead_layer", "layer1.1.conv1"),), zero_lr="layer1.1.conv1"),
    ]
    # He et al. 2016's variants at the paper's depth. --quick trains them 20 steps: attenuated_identity needs
    # three logging steps (every 5: it fires at step 10), and the 110-layer nets cost ~4x a 56-layer one
    v, vsteps = 110, (20 if quick else None)
    out.append(Case(f"identity-{v}", "variant", f"ResNet-{v} post-activation, identity shortcut (the reference "
                    "for the variants: quiet)", lambda: resnet(v), depth=v, steps=vsteps))
    for name in (("constant_scaling", "dropout_shortcut", "conv_shortcut") if quick else VARIANTS):
        out.append(Case(f"{name.replace('_', '-')}-{v}", "variant",
                        f"ResNet-{v}, {name.replace('_', ' ')}" + (" (b_g = 0)" if "gating" in name else ""),
                        partial(_variant, v, name), depth=v, steps=vsteps, expect=(("attenuated_identity", None),),
                        allowed=("skip_collapse", *DEPTH_RULES, "dead_layer")))
    # b_g = -6: the gate starts at sigmoid(-6) = 0.0025, so the skip is ~0.9975 x: near identity, quiet (the
    # paper's 6.91% and 8.70%; exclusive gating's branch is what is gated, not the identity path)
    for name in (("shortcut_only_gating",) if quick else ("shortcut_only_gating", "exclusive_gating")):
        out.append(Case(f"{name.replace('_', '-')}-{v}-bg-6", "variant",
                        f"ResNet-{v}, {name.replace('_', ' ')} at b_g = -6 (near identity: quiet)",
                        partial(_variant, v, name, -6.0), depth=v, steps=vsteps))
    return out


def _variant(depth: int, variant: str, gate_bias: float = 0.0) -> nn.Module:
    return set_shortcut_variant(resnet(depth), variant, gate_bias=gate_bias)


def _optimizer(model: nn.Module, zero_lr: str | None) -> torch.optim.Optimizer:
    kw: dict[str, Any] = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    if zero_lr is None:
        return torch.optim.SGD(model.parameters(), **kw)
    frozen = list(model.get_submodule(zero_lr).parameters())
    ids = {id(p) for p in frozen}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups: list[dict[str, Any]] = [{"params": rest}, {"params": frozen, "lr": 0.0}]
    return torch.optim.SGD(groups, **kw)


def run_case(case: Case, out: str, steps: int, every: int = 5, seed: int = 0, batch: int = 32,
             threads: int = 1, progress: Callable[[int, torch.Tensor], None] | None = None, device: str = "cpu",
             label: str | None = None) -> Outcome:
    """Train ``case`` for ``steps`` and judge what the monitor told (the ``gradwatch`` logger is quiet
    meanwhile: the verdict line says what fired)."""
    log = logging.getLogger("gradwatch")
    level = log.level
    log.setLevel(logging.CRITICAL + 1)  # errors inside gradwatch still reach the outcome (errors)
    try:
        return _run_case(case, out, steps, every, seed, batch, threads, progress, device, label or case.name)
    finally:
        log.setLevel(level)


def _run_case(case: Case, out: str, steps: int, every: int, seed: int, batch: int, threads: int,
              progress: Callable[[int, torch.Tensor], None] | None, device: str, label: str) -> Outcome:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    steps = min(steps, case.steps) if case.steps is not None else steps
    model = case.build().to(device)
    x, y = (t.to(device) for t in synthetic_images(1024, seed=seed))
    if case.flatten:
        x = x.flatten(1)
    opt = _optimizer(model, case.zero_lr)
    warm = steps // 4 if case.depth >= 56 else 0
    gen = torch.Generator().manual_seed(seed)
    hook = None
    start = time.perf_counter()
    losses: list[torch.Tensor] = []  # read back once at the end: .item() per step would sync a GPU every step
    with Monitor(model, optimizer=opt, log_dir=os.path.join(out, label), every=every,
                 remind_after=None) as mon:
        for i in range(steps):
            for g in opt.param_groups:
                if g["lr"] != 0.0:
                    g["lr"] = 0.01 if i < warm else 0.1
            if case.nan_at is not None and i == case.nan_at[1]:
                w = model.get_parameter(f"{case.nan_at[0]}.weight")
                hook = w.register_hook(lambda g: torch.full_like(g, math.nan))
            idx = torch.randint(0, len(x), (batch,), generator=gen).to(device)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            mon.loss(loss)  # as the Lightning and HF adapters give it (read on logging steps only)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if hook is not None:
                hook.remove()
                hook = None
            losses.append(loss.detach())
            if progress is not None:
                progress(i + 1, losses[-1])
    values = torch.stack(losses).tolist() if losses else []
    return _judge(case, mon, values, time.perf_counter() - start, label)


def _judge(case: Case, mon: Monitor, losses: Sequence[float], seconds: float, label: str) -> Outcome:
    told, seen = [], set()
    for a in mon.alerts:  # the findings told (opened, escalated, reminded), first per condition
        if (a.rule, a.name, a.severity) not in seen:
            seen.add((a.rule, a.name, a.severity))
            told.append(a)
    observed = [f"{a.rule}@{a.step} ({a.name or '-'}) [{a.severity}]" for a in told]
    missed = [f"{rule} ({name or 'any'})" for rule, name in case.expect
              if not any(a.rule == rule and (name is None or name == a.name) for a in told)]
    expected_rules = {rule for rule, _ in case.expect}
    false = [text for a, text in zip(told, observed)
             if a.severity != "info" and a.rule not in expected_rules and a.rule not in case.allowed]
    last = mon.latest
    health = {k: float(v) for k, v in (last.health.items() if last is not None else ())}
    if last is not None:
        health["grad_norm"] = last.global_value("grad_norm")
    tail = [v for v in losses[-10:] if math.isfinite(v)]
    curves: dict[str, list[float]] = {"step": [float(r.step) for r in mon.records]}
    curves["loss"] = [losses[r.step] if r.step < len(losses) else math.nan for r in mon.records]
    for key in ("grad_to_weight_early", "skip_share_min", "effective_depth", "transmission_end_to_end"):
        curves[key] = [float(r.health.get(key, math.nan)) for r in mon.records]
    if last is not None and last.blocks:  # the seed's "skip_share per block", at the last logging step
        curves["skip_share_per_block"] = [float(v) for v in last.block("skip_share")]
    return Outcome(label, case.group, case.about, [f"{r} ({n or 'any'})" for r, n in case.expect], observed,
                   missed, false, health, sum(tail) / len(tail) if tail else math.nan, seconds, list(mon.errors),
                   curves)


def _worker(args: tuple[str, bool, str, int, int, int, str, str, int]) -> Outcome:
    name, quick, out, steps, every, seed, device, label, threads = args  # cases hold lambdas: rebuilt by name
    (case,) = [c for c in cases(quick) if c.name == name]
    return run_case(case, out, steps, every, seed=seed, device=device, label=label, threads=threads)


def run(quick: bool = False, out: str = "runs/validate", steps: int | None = None, every: int = 5,
        jobs: int = 1, only: Sequence[str] = (), stream=None, out_md: str | None = None,  # noqa: ANN001
        seeds: int = 1, device: str = "cpu", threads: int = 1) -> list[Outcome]:
    """Run the scorecard (each case with ``seeds`` seeds, on ``device``) and the instability suite (``only``
    naming ``"instability"``, or nothing); print a line per case and the tables; write ``<out>/validate.json``
    and, with ``out_md``, the scorecard's and the suite's sections of that page."""
    stream = stream or sys.stdout
    steps = steps or (120 if quick else 300)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to torch here")
    rest = [o for o in only if o != "instability"]
    suite = not only or "instability" in only
    picked = [c for c in cases(quick) if c.name in rest or c.group in rest] if only else cases(quick)
    if rest and not picked:
        raise ValueError(f"no case matches {list(only)}; cases: {', '.join(c.name for c in cases(quick))}, "
                         "instability")
    chosen = [(c, seed, c.name if seeds == 1 else f"{c.name}-s{seed}") for c in picked for seed in range(seeds)]
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    outcomes: list[Outcome] = []
    if chosen:
        outcomes = _run_cases(chosen, quick, out, steps, every, jobs, stream, device, threads)
    command = "gradwatch validate" + (" --quick" if quick else "") + f" --steps {steps} --jobs {jobs}" + (
        f" --seeds {seeds}" if seeds > 1 else "") + (f" --device {device}" if device != "cpu" else "") + (
        f" --threads {threads}" if threads != 1 else "") + (
        f" --only {' '.join(only)}" if only else "")
    if out_md:
        command += f" --out-md {out_md}"
        if chosen:
            write_markdown(outcomes, out_md, command, steps, every, time.strftime("%Y-%m-%d"), device)
    runs: list[instability.RunOutcome] = []
    if suite:
        runs = _run_suite(quick, out, jobs, stream, out_md, command)
        outcomes += [_as_outcome(r) for r in runs]
    # "scores" stays the calibration set's figures (what it was before the held-out set); each set's apart
    calibration = [r for r in runs if r.group == "calibration"]
    bad = [o.case for o in outcomes if not o.passed]
    print(f"\n{len(outcomes) - len(bad)}/{len(outcomes)} passed in {time.perf_counter() - start:.0f} s"
          + (f"; failed: {', '.join(bad)}" if bad else ""), file=stream)
    dump_json(os.path.join(out, "validate.json"), {
        "quick": quick, "steps": steps, "every": every, "seeds": seeds, "device": device, "threads": threads,
        "torch": torch.__version__, "command": command, "date": time.strftime("%Y-%m-%d"),
        "cases": [asdict(o) | {"passed": o.passed} for o in outcomes],
        "instability": {"runs": [asdict(r) for r in runs],
                        "scores": asdict(instability_report.scores(calibration)) if calibration else None,
                        "scores_by_set": {k: asdict(v) for k, v in
                                          instability_report.scores_by_group(runs).items()}}})
    return outcomes


def _run_cases(chosen: list[tuple[Case, int, str]], quick: bool, out: str, steps: int, every: int, jobs: int,
               stream: Any, device: str, threads: int) -> list[Outcome]:
    print(f"gradwatch validate: {len(chosen)} cases, {steps} steps each, logging every {every}, "
          f"{jobs} process(es), TensorBoard logs in {out}/", file=stream, flush=True)
    outcomes: list[Outcome] = []

    def report(i: int, o: Outcome) -> None:
        verdict = o.verdict[0] if o.passed else o.verdict[0].upper()
        print(f"[{i:>2}/{len(chosen)}] {o.case:<26} {verdict:<11} {o.seconds:6.1f} s  "
              f"{', '.join(o.observed) or 'no incident'}", file=stream, flush=True)

    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            work = [(c.name, quick, out, steps, every, seed, device, label, threads) for c, seed, label in chosen]
            for i, o in enumerate(pool.map(_worker, work), 1):
                outcomes.append(o)
                report(i, o)
    else:
        for i, (c, seed, label) in enumerate(chosen, 1):
            def bar(k: int, loss: torch.Tensor, label: str = label, i: int = i) -> None:
                if k % 10 == 0 or k == steps:  # the one host read of the loss, every 10 steps
                    done = int(24 * k / steps)
                    stream.write(f"\r[{i:>2}/{len(chosen)}] {label:<26} [{'#' * done}{'.' * (24 - done)}] "
                                 f"{k}/{steps} loss {loss.item():.3f}")
                    stream.flush()
            o = run_case(c, out, steps, every, seed=seed, progress=bar if stream.isatty() else None,
                         device=device, label=label, threads=threads)
            if stream.isatty():
                stream.write("\r" + " " * 90 + "\r")
            outcomes.append(o)
            report(i, o)
    print("\n" + table(outcomes), file=stream)
    return outcomes


def _run_suite(quick: bool, out: str, jobs: int, stream: Any, out_md: str | None,
               command: str) -> list[instability.RunOutcome]:
    """The instability suite: its runs (on one thread each, logging every step), its table and figures."""
    todo = instability.runs(quick) + ([] if quick else instability.runs(heldout=True))
    where = os.path.join(out, "instability")
    print(f"\ngradwatch validate: instability suite, {len(todo)} runs, logging every step, {jobs} process(es), "
          f"TensorBoard logs in {where}/", file=stream, flush=True)
    start = time.perf_counter()
    done: list[instability.RunOutcome] = []
    work = partial(instability.run_one, out=where)
    mapped: Any = ProcessPoolExecutor(max_workers=jobs) if jobs > 1 else None
    try:
        for i, o in enumerate(mapped.map(work, todo) if mapped else map(work, todo), 1):
            done.append(o)
            print(f"[{i:>2}/{len(todo)}] {o.run:<21} {o.group:<11} "
                  f"blew up {instability_report.blew_up(o):>4}  "
                  f"first warning {o.warning if o.warning is not None else 'none':>4} {o.rule or ''} "
                  f"{'(' + o.layers + ')' if o.layers else ''}  {o.seconds:5.1f} s", file=stream, flush=True)
    finally:
        if mapped:
            mapped.shutdown()
    seconds = time.perf_counter() - start
    print("\n" + instability_report.table(done) + "\n\n" + "\n".join(instability_report.summary_lines(done)),
          file=stream)
    if out_md:
        instability_report.write_markdown(done, out_md, command, time.strftime("%Y-%m-%d"), seconds)
    return done


def _as_outcome(r: instability.RunOutcome) -> Outcome:
    """A suite run as a scorecard case: a run that blew up (its loss spiked or diverged) must be warned before
    it, one that did neither must stay quiet (exit status 1 otherwise)."""
    if r.spike is None:
        expected, missed = [], []
        false = [x for x in r.observed if not x.endswith("[info]")]
    else:
        expected = [f"a warning before step {r.spike}"]
        warned = r.lead is not None and r.lead > 0
        missed = [] if warned else [f"a warning before step {r.spike} (the {r.event or 'spike'})"]
        false = []
    about = f"tiny transformer, trigger {r.trigger}, {r.group} set"
    return Outcome(r.run, "instability", about, expected, r.observed, missed,
                   false, {}, r.losses[-1] if r.losses else math.nan, r.seconds, r.errors,
                   {"step": [float(i) for i in range(len(r.losses))], "loss": r.losses})
