"""Step-time overhead of block flow (shortcut-path gradient split) on a CIFAR ResNet-56 (run by hand, not a test).

Identical nets train side by side in one process; steps are interleaved (the order rotates every round) so that
machine noise hits all alike. Reported: the median step time of each and the median of per-round ratios
against the bare step.

- ``bare``: no gradwatch; ``bare again``: a second identical bare net, the control that shows the noise floor
  (two bare nets differ only by where their tensors live).
- ``flow only``: a :class:`gradwatch.flow.FlowProbe` armed on every step, its norms moved to the host each
  step (block flow alone, no parameter metrics).
- ``params every=1``: ``Monitor(blocks=None, every=1)``: parameter metrics only, every step.
- ``all every=1``: ``Monitor(every=1)``: parameter metrics and block flow, every step.
- ``all every=50``: ``Monitor(every=50)``; the ratio is taken over the steps that do not log.

Step time is CPU time of the process (``--clock cpu``, with ``--threads 1`` by default), which other jobs
on a shared machine disturb far less than wall time; ``--clock wall --threads 0`` measures wall time with
torch's default threads.

    .venv/bin/python benchmarks/flow_overhead.py --steps 50 --batch 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import gradwatch
from gradwatch.reference.blocks import resnet
from gradwatch.flow import FlowProbe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="image side (CIFAR: 32)")
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--block", default="postact", choices=["postact", "preact"])
    parser.add_argument("--inplace", action="store_true", help="ReLU(inplace=True) and out += shortcut")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave the default)")
    parser.add_argument("--clock", default="cpu", choices=["cpu", "wall"], help="process CPU time or wall time")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    labels = ["bare", "bare again", "flow only", "params every=1", "all every=1", "all every=50"]
    runs = {}
    for label in labels:
        torch.manual_seed(0)
        model = resnet(args.depth, block=args.block, inplace=args.inplace)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        mon = probe = None
        if label == "flow only":
            probe = FlowProbe(model, is_logging=lambda: True, step=lambda: 0)
        elif label == "params every=1":
            mon = gradwatch.Monitor(model, optimizer=opt, every=1, blocks=None)
        elif label == "all every=1":
            mon = gradwatch.Monitor(model, optimizer=opt, every=1)
        elif label == "all every=50":
            mon = gradwatch.Monitor(model, optimizer=opt, every=50)
        runs[label] = (model, opt, mon, probe)

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    times: dict[str, list[float]] = {k: [] for k in labels}
    for step in range(args.warmup + args.steps):
        k = step % len(labels)
        order = labels[k:] + labels[:k]
        for label in order:
            model, opt, _, probe = runs[label]
            t0 = clock()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if probe is not None:
                batch = probe.collect()
                if batch is not None:
                    batch.values.cpu()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = clock() - t0
            if step >= args.warmup:
                times[label].append(dt)

    bare = times["bare"]
    print(f"ResNet-{args.depth} ({args.block}{', inplace' if args.inplace else ''}), batch {args.batch}x3x{args.size}x"
          f"{args.size}, {args.steps} interleaved steps, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.clock} time")
    print(f"{'config':<16} {'median ms':>10} {'median ratio':>13}")
    for label in labels:
        ratios = [t / b for t, b in zip(times[label], bare)]
        print(f"{label:<16} {1e3 * statistics.median(times[label]):10.2f} {statistics.median(ratios):13.4f}")
    quiet = [t / b for i, (t, b) in enumerate(zip(times["all every=50"], bare)) if (i + args.warmup) % 50]
    print(f"all every=50, steps that do not log: median ratio {statistics.median(quiet):.4f} over {len(quiet)} steps")
    both = [a / p for a, p in zip(times["all every=1"], times["params every=1"])]
    print(f"block flow on top of parameter metrics (all / params, every=1): median ratio {statistics.median(both):.4f}")
    # Steps that do not log: their whole cost is one forward hook call per block, far below the noise of a
    # step ratio. Time that call directly (an empty module, hooked vs bare) and scale by the number of blocks.
    mon = runs["all every=50"][2]
    assert not mon.is_logging_step()
    probe_hook = mon.probe._arm_hook
    hooked, bare_mod = torch.nn.Identity(), torch.nn.Identity()
    hooked.register_forward_hook(probe_hook)
    reps, per_call = 20000, []
    for module in (bare_mod, hooked, bare_mod, hooked):
        t0 = clock()
        for _ in range(reps):
            module(x)
        per_call.append((clock() - t0) / reps)
    extra = (per_call[1] + per_call[3] - per_call[0] - per_call[2]) / 2
    n_hooks = len(mon.probe._tracker.arm_handles)
    est = 1 + n_hooks * extra / statistics.median(bare)
    print(f"steps that do not log, from the hook's own cost: {1e6 * extra:.2f} us x {n_hooks} block hooks "
          f"= {1e6 * n_hooks * extra:.0f} us per step -> ratio {est:.5f}")
    for label in labels:
        mon, probe = runs[label][2], runs[label][3]
        if mon is not None:
            print(f"{label}: {mon.measured_steps} measurements, {len(mon.describe())} blocks, "
                  f"{len(mon.errors)} contained errors; flow: {mon.flow_status}")
        if probe is not None:
            print(f"{label}: {len(probe.describe())} blocks; flow: {probe.status}")


if __name__ == "__main__":
    main()
