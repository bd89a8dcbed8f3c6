"""gradwatch next to what people use instead, every step writing to TensorBoard (run by hand).

In one process, steps interleaved, identical models: bare (twice: noise control); a hand-written per-layer
loop (``writer.add_scalar(name, p.grad.norm().item(), step)`` for every parameter — what a forum answer
does); Lightning's ``grad_norm`` utility (``lightning.pytorch.utilities.grad_norm``) with its dict written
scalar by scalar, as ``self.log_dict`` → ``logger.log_metrics`` does; ``wandb.watch(log="all",
log_freq=1)`` in offline mode when wandb is installed (skipped with a message otherwise); gradwatch with
parameter metrics only and with all defaults. All at every step (the costliest cadence).

Note: once a gradwatch TensorBoard sink exists, every ``SummaryWriter`` in the process uses the C CRC-32C
(``gradwatch/sinks/tensorboard/_fastcrc.py``), the peers' included; ``GRADWATCH_FAST_CRC=0`` measures everyone
with tensorboard's own pure-Python checksum.

    .venv/bin/python benchmarks/peers.py --model stack --steps 40
    .venv/bin/python benchmarks/peers.py --model resnet56 --steps 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch
import torch.nn.functional as F
from _bench import build, interleave
from torch.utils.tensorboard import SummaryWriter

import gradwatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="stack")
    parser.add_argument("--tensors", type=int, default=1202)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--only", default="", help="comma-separated peers to run (item,lightning,wandb,gradwatch); "
                        "default all. Work a peer leaves running in the background (wandb's threads and service, "
                        "gradwatch's TensorBoard thread) lands on the steps of whatever runs next: run wandb alone")
    parser.add_argument("--drain", action="store_true", help="end each gradwatch step with mon.flush() (its "
                        "TensorBoard thread's work charged to its own step: an upper bound)")
    args = parser.parse_args()
    want = set(args.only.split(",")) if args.only else {"item", "lightning", "wandb", "gradwatch"}
    out = tempfile.mkdtemp(prefix="gradwatch-peers-")
    runs, closers = {}, []
    x = y = None

    def make(label):
        nonlocal x, y
        torch.manual_seed(0)
        model, batch = build(args.model, args.tensors)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if x is None:
            x, y = batch(args.batch)
        return model, opt, os.path.join(out, label.replace(" ", "_").replace("/", "_"))

    def plain(model, opt, after=None, end=None):
        state = {"step": 0}

        def step():
            F.cross_entropy(model(x), y).backward()
            if after is not None:  # a peer that reads gradients before the step
                after(state["step"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            if end is not None:
                end()
            state["step"] += 1
        return step

    for label in ("bare", "bare #2"):
        model, opt, _ = make(label)
        runs[label] = plain(model, opt)

    if "item" in want:
        model, opt, d = make("item loop")
        w = SummaryWriter(d)
        closers.append(w.close)
        named = [(n, p) for n, p in model.named_parameters()]
        runs["item loop"] = plain(model, opt, lambda s, w=w, named=named: [
            w.add_scalar(f"grad_norm/{n}", p.grad.norm().item(), s) for n, p in named if p.grad is not None])

    try:
        from lightning.pytorch.utilities import grad_norm
    except ImportError:
        grad_norm = None
        if "lightning" in want:
            print("lightning not installed: its grad_norm is skipped")
    if grad_norm is not None and "lightning" in want:
        model, opt, d = make("lightning grad_norm")
        w = SummaryWriter(d)
        closers.append(w.close)
        runs["lightning grad_norm"] = plain(model, opt, lambda s, w=w, m=model: [
            w.add_scalar(k, float(v), s) for k, v in grad_norm(m, norm_type=2).items()])

    try:
        import wandb
    except ImportError:
        wandb = None
        if "wandb" in want:
            print("wandb not installed: wandb.watch is skipped (pip install wandb to include it)")
    if wandb is not None and "wandb" in want:
        os.environ.setdefault("WANDB_MODE", "offline")
        model, opt, d = make("wandb watch")
        run = wandb.init(project="gradwatch-peers", dir=d, mode="offline", reinit=True)
        wandb.watch(model, log="all", log_freq=1)
        closers.append(run.finish)
        step = plain(model, opt)
        runs["wandb watch"] = lambda step=step, run=run: (step(), run.log({}, commit=True))

    for label, options in (("gradwatch params", {"blocks": None, "rules": False}), ("gradwatch defaults", {})):
        if "gradwatch" not in want:
            break
        model, opt, d = make(label)
        mon = gradwatch.Monitor(model, optimizer=opt, log_dir=d, every=1, **options)
        closers.append(mon.close)
        runs[label] = plain(model, opt, end=mon.flush if args.drain else None)

    times = interleave(runs, args.steps)
    n = sum(1 for _ in build(args.model, args.tensors)[0].parameters())
    print(f"{args.model}: {n} parameter tensors, batch {args.batch}, {args.steps} interleaved steps, every step "
          f"logged, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"fast CRC {'off' if os.environ.get('GRADWATCH_FAST_CRC') == '0' else 'on'}")
    print(f"{'':<20} {'median ms':>10} {'ratio':>8} {'+ms/step':>9}")
    for label, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times["bare"])]
        extra = [t - b for t, b in zip(ts, times["bare"])]
        print(f"{label:<20} {1e3 * statistics.median(ts):10.2f} {statistics.median(ratios):8.3f} "
              f"{1e3 * statistics.median(extra):9.2f}")
    for close in closers:
        close()


if __name__ == "__main__":
    main()
