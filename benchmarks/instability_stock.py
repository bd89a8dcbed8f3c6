"""Issue 26, out of sample: the ``instability`` rule on stock decoder LMs it was not calibrated on.

The rule (:mod:`gradwatch.alerts.instability`) was tuned on gradwatch's own TinyGPT
(:mod:`gradwatch.reference.instability`). This script trains tiny decoder-only LMs built from ``transformers``
configs -- GPT-2 (``GPT2LMHeadModel``: pre-LN, learned positions, tied embeddings), Llama
(``LlamaForCausalLM``: RMSNorm, rotary, SwiGLU, no biases), GPT-NeoX (``GPTNeoXForCausalLM``: attention and
MLP in parallel on one residual merge, partial rotary), OPT (``OPTForCausalLM``, pre-LN, ReLU, offset
learned positions) and Phi (``PhiForCausalLM``: attention and MLP in parallel off one LayerNorm, partial rotary,
GELU, biases; added in round 2 as test data) -- with each library's own initialisation, no weights downloaded, on the suite's generated
language (:func:`~gradwatch.reference.gpt.synthetic_language`), with AdamW and the suite's schedule (a linear
warm-up over 200 of 250 steps into a peak learning rate, swept from stable to unstable), on two seeds the
suite does not use (5, 6). Each run is watched as the suite's ``run_one`` watches it
(``Monitor(model, optimizer=opt, every=1, pictures=0, remind_after=None, rules={"instability": {}})``, the
other rules at their defaults) and scored twice by the suite's own
:func:`~gradwatch.reference.instability.score` (:func:`~gradwatch.reference.instability.spike_step` is the
spike: the loss 1 nat above the median of the 20 steps before, or non-finite): on the ``instability`` rule's
incidents alone -- what this script is for -- and on every rule's, as the suite's scorecard counts (the first
warning of any rule). Per run: the spike step, the first warning (step, rule, layers), the lead, the verdict;
per family and over all: recall (spiking runs warned strictly before the spike), median lead, misses and
false alarms (runs that never spiked yet got a warning). Round 1 tuned no threshold on these runs. Round 2
chose its whole-model condition on GPT-2, Llama, NeoX and OPT at seeds 5-6 (the default ``--seeds``: calibration
data now); its test data are seeds 7-8 (``--seeds 7 8``) and the Phi family (docs/alerts.md, the instability
section, has both).

    cd <worktree> && PYTHONPATH=$PWD nice -n 10 /work/zoovenv/bin/python benchmarks/instability_stock.py \\
        [--json out.json] [--only gpt2 llama neox opt phi] [--seeds 5 6] [--lrs ...] [--threads 1]

The markdown goes to stdout, one progress line per run to stderr. 50 runs at one thread: 173 s (round 2); 40: 141 s on the shared
2-core dev machine (3-6 s a run; 192 s in a busier hour). Needs ``transformers`` (the zoo venv); the project venv
has not got it. The learning-rate grid (:data:`GRID`) was read off a coarser sweep on that machine (torch 2.14.1
CPU, transformers 5.25): per family the lowest peak never spiked on either seed and ended within 0.12 nat of its
lowest loss; the highest spiked on both. Just below the edge (GPT-2 0.1, Llama 0.3, NeoX 0.3-0.5) the loss can
drift up by 0.2-1.1 nat over the run without ever rising the spike definition's nat above the 20 steps before:
counted as never spiked all the same (the ``loss min/last`` column shows it). The runs are deterministic (two
sweeps here gave the same table). On another machine or torch version a run near the edge may land the other way:
the table says what each run did, and the figures count what happened. Phi's grid was read the same way off its
loss curves alone (a loss-only sweep of 0.01, 0.03, 0.1, 0.3, 1, 2 at seeds 5-6, no monitor: 0.01-0.3 never
spiked, 0.01 ended within 0.07 nat of its lowest loss; 1 and 2 spiked on both seeds), before any of its runs was
watched.

Configurations: 2 layers, width 64, 4 heads, MLP width 256 (Llama's SwiGLU 172: ~107k parameters each; Phi 108k),
context 32, vocabulary 64, batch 16, dropout 0 (the suite's TinyGPT has none), attention ``"eager"`` (no sdpa
kernel choice between machines), no KV cache, no padding token (every token of the language is real). The
loss is the shifted next-token cross-entropy computed here from the logits, as ``TinyGPT.loss`` computes it
(``labels=`` would shift inside the model and need 33 positions of a 32-position model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import Monitor
from gradwatch.reference.gpt import synthetic_language
from gradwatch.reference.instability import Run, RunOutcome, score, train
from gradwatch.reference.instability_report import scores, summary_line

VOCAB, CONTEXT, WIDTH, DEPTH, HEADS, BATCH, STEPS, WARMUP = 64, 32, 64, 2, 4, 16, 250, 200
SEEDS = (5, 6)  # the instability suite uses 0-2 (calibration) and 3-4 (held out)
#: Peak learning rates per family, lowest first: the lowest never spiked on either seed; the rest span the edge
#: into the range where the family spikes on both seeds (the module docstring says what each did here).
GRID: dict[str, tuple[float, ...]] = {
    "gpt2": (0.01, 0.03, 0.1, 0.2, 0.5),
    "llama": (0.03, 0.3, 1.0, 2.0, 3.0),
    "neox": (0.03, 0.3, 0.5, 1.0, 2.0),
    "opt": (0.01, 0.1, 0.3, 1.0, 2.0),
    "phi": (0.01, 0.1, 0.3, 1.0, 2.0),
}


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=WIDTH, n_layer=DEPTH, n_head=HEADS,
                     n_inner=4 * WIDTH, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                     bos_token_id=None, eos_token_id=None)  # GPT-2's 50256 is outside a 64-token vocabulary
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=172, num_hidden_layers=DEPTH,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=CONTEXT,
                      attention_dropout=0.0, tie_word_embeddings=False, use_cache=False)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg)


def _neox() -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                        intermediate_size=4 * WIDTH, max_position_embeddings=CONTEXT, attention_dropout=0.0,
                        hidden_dropout=0.0, tie_word_embeddings=False, use_cache=False)
    cfg._attn_implementation = "eager"
    return GPTNeoXForCausalLM(cfg)


def _opt() -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=DEPTH, ffn_dim=4 * WIDTH,
                    num_attention_heads=HEADS, max_position_embeddings=CONTEXT, word_embed_proj_dim=WIDTH,
                    do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0, layerdrop=0.0,
                    pad_token_id=None, use_cache=False)  # no padding row: every token of the language is real
    cfg._attn_implementation = "eager"
    return OPTForCausalLM(cfg)


def _phi() -> nn.Module:
    # added in round 2 as test data: its grid was read off loss curves only, before any warning of it was seen
    from transformers import PhiConfig, PhiForCausalLM
    cfg = PhiConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=DEPTH,
                    num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=CONTEXT,
                    resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False,
                    use_cache=False, bos_token_id=None, eos_token_id=None)
    cfg._attn_implementation = "eager"
    return PhiForCausalLM(cfg)


FAMILIES: dict[str, Callable[[], nn.Module]] = {"gpt2": _gpt2, "llama": _llama, "neox": _neox, "opt": _opt,
                                                "phi": _phi}


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``batch`` (batch, context + 1): logits of the first ``context`` tokens
    against the last ``context`` (as :meth:`TinyGPT.loss <gradwatch.reference.gpt.TinyGPT.loss>`)."""
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def run_stock(family: str, lr: float, seed: int, steps: int = STEPS,
              threads: int = 1) -> tuple[RunOutcome, RunOutcome]:
    """Train ``family`` at peak ``lr`` under the suite's monitor and score it with the suite's ``score``: on
    every rule's warnings, and on the ``instability`` rule's alone."""
    torch.set_num_threads(threads)
    run = Run(f"{family}-lr{lr:g}-s{seed}", family, lr, seed=seed, steps=steps, warmup=WARMUP, group="stock")
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
    return score(run, mon, values, seconds), score(run, cast(Monitor, own), values, seconds)


def verdict(o: RunOutcome) -> str:
    """As the suite's scorecard: quiet / false alarm on runs that never spiked, else warned ahead / late / missed."""
    if o.spike is None:
        return "quiet" if o.warning is None else "false alarm"
    return "warned ahead" if o.lead is not None and o.lead > 0 else ("late" if o.warning is not None else "missed")


def table(outcomes: Sequence[RunOutcome]) -> str:
    """One markdown row per run. ``loss min/last``: a run that never spiked by the suite's definition can still
    drift up (by less than a nat over 20 steps at a time) at a peak near the edge; a warning there is counted a
    false alarm all the same, and this column lets a reader tell those runs from ones that kept learning."""
    rows = ["| model | peak LR | seed | spike step | first warning | rule | layers | lead | verdict | loss min/last "
            "| s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        family, lr, seed = _parts(o.run)
        finite = [x for x in o.losses if math.isfinite(x)]
        loss = f"{min(finite):.2f}/{o.losses[-1]:.2f}" if finite else "–"
        rows.append(f"| {family} | {lr} | {seed} | {_or(o.spike, 'none')} | {_or(o.warning, 'none')} | "
                    f"{o.rule or '–'} | {o.layers or '–'} | {_or(o.lead, '–')} | {verdict(o)} | {loss} | "
                    f"{o.seconds:.0f} |")
    return "\n".join(rows)


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
    ap.add_argument("--only", nargs="+", choices=sorted(FAMILIES), default=list(FAMILIES))
    ap.add_argument("--lrs", nargs="+", type=float, help="peak learning rates (default: each family's GRID)")
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write every run's outcome (losses, incidents) here")
    args = ap.parse_args(argv)
    every, alone, start = [], [], time.perf_counter()
    for family in args.only:
        for lr in args.lrs or GRID[family]:
            for seed in args.seeds:
                o, i = run_stock(family, lr, seed, args.steps, args.threads)
                every.append(o)
                alone.append(i)
                print(f"{o.run}: spike {o.spike}; first warning {o.warning} ({o.rule}), {verdict(o)}; "
                      f"instability {i.warning}, {verdict(i)}; {o.seconds:.1f} s"
                      + (f", errors {o.errors}" if o.errors else ""), file=sys.stderr, flush=True)
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
