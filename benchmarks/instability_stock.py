"""Issue 26, out of sample: the ``instability`` rule on stock decoder LMs it was not calibrated on.

The rule (:mod:`gradwatch.alerts.instability`) was first tuned on gradwatch's own TinyGPT
(:mod:`gradwatch.reference.instability`). This script trains tiny decoder-only LMs built from ``transformers``
configs, 41 families in seven sets (``benchmarks/_lm_families.py`` has the configurations, the learning-rate
grids and how each was read, off loss curves alone): ``lm5`` (GPT-2, Llama, GPT-NeoX, OPT, Phi; seeds 5-6
calibrated round 2, 7-8 tested it), ``more6`` (Gemma, BLOOM, GPT-J, GPTBigCode, OLMo2, Qwen2; seeds 9-10,
round 3 calibration), ``test6`` (Falcon, StableLM, Qwen3, OLMo, GPT-Neo, Persimmon; seeds 11-12, round 3's
test, run once after the rule was frozen), ``round4`` (StarCoder2, Phi-3, Gemma 2, Cohere, MPT, Granite;
seeds 13-14, round 4's test, likewise), ``round5`` (Nemotron, XGLM, Apertus, Mixtral, GPT-1, DiffLlama;
seeds 15-16, round 5's test, likewise), ``round6`` (BioGPT, GLM, EXAONE 4, SmolLM3, OLMoE, BERT as a
decoder; seeds 17-18, round 6's test, likewise) and ``round7`` (the BART, Marian and RoFormer decoders, Helium,
ERNIE 4.5, CodeGen; seeds 19-20, round 7's test). Each runs the suite's loop
(:func:`~gradwatch.reference.instability.train`: AdamW, a linear warm-up over 200 of 250 steps into a peak
learning rate swept from stable to unstable, batch 16) on the suite's generated language
(:func:`~gradwatch.reference.gpt.synthetic_language`), watched as the suite's ``run_one`` watches
(``Monitor(model, optimizer=opt, every=1, pictures=0, remind_after=None, rules={"instability": {}})``, the
other rules at their defaults) and scored twice by the suite's own
:func:`~gradwatch.reference.instability.score` (:func:`~gradwatch.reference.instability.blowup` is the step a
run blew up: its loss spiked, 1 nat above the median of the 20 steps before, or non-finite; or diverged, its
median over 20 steps 1 nat above the lowest such median before): on the ``instability`` rule's incidents alone
-- what this script is for -- and on every rule's, as the suite's scorecard counts (the first warning of any
rule). Per run: the step it blew up, the first warning (step, rule, layers), the lead, the verdict; per family
and over all: recall (runs that blew up warned strictly before it), median lead, misses and false alarms (runs
that did neither yet got a warning).

    cd <worktree> && PYTHONPATH=$PWD nice -n 10 /work/zoovenv/bin/python benchmarks/instability_stock.py \\
        [--set lm5|more6|test6|round4|round5|round6|round7] [--usual] [--only FAMILY ...] [--seeds ...] \\
        [--lrs ...] [--json out.json] [--record DIR] [--loss-only]

The markdown goes to stdout, one progress line per run to stderr. ``--record DIR`` pickles each run's records
and losses for ``benchmarks/instability_replay.py`` (a rule change tried offline on the same runs);
``--loss-only`` prints the blow-ups alone (how a new set's grid is read before any of its warnings is seen).
3-6 s a run at one thread on the shared 2-core dev machine (60 runs of a set: ~4-5 min; 8-17 s beside other
jobs). Needs ``transformers`` (the zoo venv); the project venv has
not got it. Just below a family's edge (GPT-2 0.1, Llama 0.3, NeoX 0.3-0.5, Falcon 0.3, Qwen2 0.3) the loss
can drift up by 0.2-1.8 nat over the run without ever rising a nat above the 20 steps before: a drift of a nat
or more is a divergence, less is counted as never blown up (the ``loss min/last`` column shows it). The runs are
deterministic on one machine; on another machine or torch version a run near the edge may land the other way:
the table says what each run did, and the figures count what happened.

The loss is the shifted next-token cross-entropy computed here from the logits, as ``TinyGPT.loss`` computes
it (``labels=`` would shift inside the model and need 33 positions of a 32-position model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import sys
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import cast

import torch
import torch.nn.functional as F
from _lm_families import (  # benchmarks/ is the script's directory
    CONTEXT,
    FAMILIES,
    GRID,
    SETS,
    VOCAB,
)
from torch import nn

from gradwatch import Monitor
from gradwatch.reference.gpt import synthetic_language
from gradwatch.reference.instability import Run, RunOutcome, score, train
from gradwatch.reference.instability_report import blew_up, scores, summary_line

BATCH, STEPS, WARMUP = 16, 250, 200
#: ``--usual``: the peak learning rates of usual recipes for models this size (a nanoGPT-like 6e-4 and up), the
#: steps and the warm-up: healthy training whose steps move the weights by 2-10% (past the rule's 2% floor)
USUAL = ((6e-4, 1e-3, 3e-3), 400, 10)
SEEDS = SETS["lm5"][1]  # the instability suite uses 0-2 (calibration) and 3-4 (held out)


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``batch`` (batch, context + 1): logits of the first ``context`` tokens
    against the last ``context`` (as :meth:`TinyGPT.loss <gradwatch.reference.gpt.TinyGPT.loss>`)."""
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def run_stock(family: str, lr: float, seed: int, steps: int = STEPS, threads: int = 1,
              warmup: int = WARMUP, record: str | None = None) -> tuple[RunOutcome, RunOutcome]:
    """Train ``family`` at peak ``lr`` under the suite's monitor and score it with the suite's ``score``: on
    every rule's warnings, and on the ``instability`` rule's alone. With ``record`` (a folder), the run's
    records and losses are pickled there for ``benchmarks/instability_replay.py``."""
    torch.set_num_threads(threads)
    run = Run(f"{family}-lr{lr:g}-s{seed}", family, lr, seed=seed, steps=steps, warmup=warmup, group="stock")
    torch.manual_seed(seed)  # the library's own init, seeded
    model = FAMILIES[family]()
    model.train()
    data = synthetic_language(4096, context=CONTEXT, vocab=VOCAB, seed=seed)
    # the suite's loop: its optimizer, schedule (linear warm-up over WARMUP steps, then flat) and monitor
    mon, values, seconds = train(run, model, lambda i, gen: data[torch.randint(0, len(data), (BATCH,), generator=gen)],
                                 lm_loss)
    # the same run scored twice by the suite's score(): every rule's incidents (the suite's scorecard counts
    # the first warning of any rule), and the instability rule's alone (what this script is for: the other
    # rules were not calibrated on the suite and speak on these models for their own reasons)
    own = SimpleNamespace(alerts=[a for a in mon.alerts if a.rule == "instability"], records=mon.records,
                          errors=mon.errors)
    outcomes = score(run, mon, values, seconds), score(run, cast(Monitor, own), values, seconds)
    if record:
        _record(record, run, mon, values, outcomes[1])
    return outcomes


def _record(folder: str, run: Run, mon: Monitor, losses: list[float], alone: RunOutcome) -> None:
    """One pickle per run: what ``benchmarks/instability_replay.py`` feeds the rule again (every logging step's
    record, with the loss the rule's gate reads) and scores (the losses), with the live outcome to check the
    replay against. Records hold numpy arrays: ~1-3 MB a run."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{run.name}.pkl"), "wb") as f:
        pickle.dump({"run": run, "records": mon.records, "losses": losses, "live_warning": alone.warning,
                     "torch": torch.__version__}, f, protocol=pickle.HIGHEST_PROTOCOL)


def verdict(o: RunOutcome) -> str:
    """As the suite's scorecard: quiet / false alarm on runs that never blew up, else warned ahead / late / missed."""
    if o.spike is None:
        return "quiet" if o.warning is None else "false alarm"
    return "warned ahead" if o.lead is not None and o.lead > 0 else ("late" if o.warning is not None else "missed")


def table(outcomes: Sequence[RunOutcome]) -> str:
    """One markdown row per run. ``loss min/last``: a run that never blew up by the suite's definitions can still
    drift up by less than a nat at a peak near the edge; a warning there is counted a false alarm all the same,
    and this column lets a reader tell those runs from ones that kept learning."""
    rows = ["| model | peak LR | seed | blew up at | first warning | rule | layers | lead | verdict | loss min/last "
            "| s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        family, lr, seed = _parts(o.run)
        rows.append(f"| {family} | {lr} | {seed} | {blew_up(o)} | {_or(o.warning, 'none')} | "
                    f"{o.rule or '–'} | {o.layers or '–'} | {_or(o.lead, '–')} | {verdict(o)} | {_loss(o)} | "
                    f"{o.seconds:.0f} |")
    return "\n".join(rows)


def _loss(o: RunOutcome) -> str:
    """``min/last`` of the run's finite losses."""
    finite = [x for x in o.losses if math.isfinite(x)]
    return f"{min(finite):.2f}/{o.losses[-1]:.2f}" if finite else "–"


def _parts(name: str) -> tuple[str, str, str]:
    family, lr, seed = name.rsplit("-", 2)
    return family, lr.removeprefix("lr"), seed.removeprefix("s")


def _or(v: object, default: str) -> str:
    return default if v is None else str(v)


def summary(outcomes: Sequence[RunOutcome]) -> list[str]:
    """The suite's figures (:func:`~gradwatch.reference.instability_report.scores`) per family and over all."""
    groups = {f: [o for o in outcomes if o.trigger == f] for f in dict.fromkeys(o.trigger for o in outcomes)}
    groups["all"] = list(outcomes)
    return [f"- **{name}**: {summary_line(scores(group))}" for name, group in groups.items()]


def _json(o: RunOutcome) -> dict[str, object]:
    return {**dataclasses.asdict(o), "verdict": verdict(o),
            "losses": [x if math.isfinite(x) else str(x) for x in o.losses]}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", choices=sorted(SETS), default="lm5", help="the families and seeds (_lm_families.SETS)")
    ap.add_argument("--only", nargs="+", choices=sorted(FAMILIES), help="these families (default: the set's)")
    ap.add_argument("--lrs", nargs="+", type=float, help="peak learning rates (default: each family's GRID)")
    ap.add_argument("--seeds", nargs="+", type=int, help="default: the set's")
    ap.add_argument("--steps", type=int, help=f"default {STEPS}; --usual {USUAL[1]}")
    ap.add_argument("--usual", action="store_true",
                    help=f"healthy runs: every family of the set at peaks {', '.join(map(str, USUAL[0]))} reached in "
                         f"{USUAL[2]} steps, {USUAL[1]} steps, seed 0 (what no rule may warn about)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write every run's outcome (losses, incidents) here")
    ap.add_argument("--loss-only", action="store_true",
                    help="print the losses' blow-ups alone, no warning (how a new set's grid is read before any "
                         "of its warnings is seen; with --record its runs are replayed once the rule is frozen)")
    ap.add_argument("--record", metavar="DIR", help="pickle each run's records and losses here, for "
                                                    "benchmarks/instability_replay.py")
    args = ap.parse_args(argv)
    args.only = args.only or list(SETS[args.set][0])
    args.seeds = args.seeds or ([0] if args.usual else list(SETS[args.set][1]))
    steps, warmup = (args.steps or USUAL[1], USUAL[2]) if args.usual else (args.steps or STEPS, WARMUP)
    every, alone, start = [], [], time.perf_counter()
    for family in args.only:
        for lr in args.lrs or (USUAL[0] if args.usual else GRID[family]):
            for seed in args.seeds:
                o, i = run_stock(family, lr, seed, steps, args.threads, warmup, args.record)
                every.append(o)
                alone.append(i)
                if args.loss_only:
                    print(f"{o.run}: blew up at {blew_up(o)}; loss {_loss(o)}; {o.seconds:.1f} s", flush=True)
                    continue
                print(f"{o.run}: blew up at {blew_up(o)}; first warning {o.warning} ({o.rule}), {verdict(o)}; "
                      f"instability {i.warning}, {verdict(i)}; {o.seconds:.1f} s"
                      + (f", errors {o.errors}" if o.errors else ""), file=sys.stderr, flush=True)
    if args.loss_only:
        return 0
    for title, outcomes in (("The instability rule alone", alone),
                            ("Every rule (the suite's scorecard: the first warning of any rule)", every)):
        print(f"### {title}\n\n{table(outcomes)}\n\n" + "\n".join(summary(outcomes)) + "\n")
    print(f"{len(every)} runs in {time.perf_counter() - start:.0f} s, torch {torch.__version__}, "
          f"{args.threads} thread(s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"instability": _json(i), "every_rule": _json(o)} for i, o in zip(alone, every)], f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
