"""Step-time overhead of gradwatch, writing to TensorBoard as users do (run by hand).

Identical models train side by side in one process, steps interleaved (the order rotates every round): bare,
bare again (the noise control), and monitored as the README sets it up — ``Monitor(model, optimizer=opt,
log_dir=...)`` — with the defaults (parameter metrics, block flow, alert rules) at every 1, 10 and 50, and
with parameter metrics only (``blocks=None, rules=False``) at every 1, with and without ``update_to_weight``
(``track_updates=False``: the same work as the floor plus the record and TensorBoard). Reports the median
step, the median per-round ratio to bare, the cost of a logging step (median of monitored minus bare over logging steps) and
that cost in *floors*: one ``torch._foreach_norm`` over all gradients, one over all weights, one host
transfer (what any per-layer monitor must do).

    .venv/bin/python benchmarks/overhead.py --model resnet56 --steps 100
    .venv/bin/python benchmarks/overhead.py --model stack --tensors 1202 --steps 200
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from _bench import build, floor, interleave, table, train_step

import gradwatch

CONFIGS = {
    "bare": None,
    "bare #2": None,
    "defaults/50": {"every": 50},
    "defaults/10": {"every": 10},
    "defaults/1": {"every": 1},
    "params/1": {"every": 1, "blocks": None, "rules": False},
    "grads+weights/1": {"every": 1, "blocks": None, "rules": False, "track_updates": False},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56", help="resnet56 (any resnetN) or stack")
    parser.add_argument("--tensors", type=int, default=1202, help="parameter tensors of the stack")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--drain", action="store_true",
                        help="end each monitored step with mon.flush(): charge the TensorBoard thread's work to the "
                             "step that made it (an upper bound; without it, that work overlaps the next steps of "
                             "every config in the process, bare ones included)")
    parser.add_argument("--configs", default="",
                        help="comma-separated labels to run (bare and bare #2 always run): more steps for the ones "
                             "a question is about, e.g. 'defaults/1,defaults/50'")
    args = parser.parse_args()
    configs = CONFIGS
    if args.configs:
        wanted = {c.strip() for c in args.configs.split(",")}
        unknown = wanted - set(CONFIGS)
        if unknown:
            parser.error(f"unknown config(s) {sorted(unknown)}; choose from {list(CONFIGS)}")
        configs = {k: v for k, v in CONFIGS.items() if v is None or k in wanted}
    if args.threads:
        torch.set_num_threads(args.threads)
    out = tempfile.mkdtemp(prefix="gradwatch-overhead-")
    runs, monitors = {}, {}
    x = y = None
    for label, options in configs.items():
        torch.manual_seed(0)
        model, batch = build(args.model, args.tensors)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if options:
            log_dir = os.path.join(out, label.replace("/", "_").replace(" ", ""))
            monitors[label] = gradwatch.Monitor(model, optimizer=opt, log_dir=log_dir, **options)
        if x is None:
            x, y = batch(args.batch)
        mon = monitors.get(label)
        if args.drain and mon is not None:
            runs[label] = (lambda m=model, o=opt, mon=mon: (train_step(m, o, x, y), mon.flush()))
        else:
            runs[label] = (lambda m=model, o=opt: train_step(m, o, x, y))
    torch.manual_seed(0)
    floor_s = floor(build(args.model, args.tensors)[0], x, y)
    times = interleave(runs, args.steps, args.warmup)
    n = sum(p.numel() > 0 for p in build(args.model, args.tensors)[0].parameters())
    print(f"{args.model}: {n} parameter tensors, batch {args.batch}, {args.steps} interleaved steps, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; floor {1e3 * floor_s:.2f} ms")
    cadence = {k: v["every"] for k, v in configs.items() if v}
    for line in table(times, "bare", cadence, floor_s, offset=args.warmup):
        print(line)
    for label, mon in monitors.items():
        mon.close()
        if mon.errors:
            print(f"{label}: {len(mon.errors)} contained errors: {mon.errors[:2]}")
    print(f"TensorBoard events under {out}")


if __name__ == "__main__":
    main()
