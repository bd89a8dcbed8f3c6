"""What drawing the pictures does to a Python-bound training loop: drawn in a child process or in this one.

A GPU training loop spends its host time in Python, launching kernels, so whatever holds the GIL stalls it. This
benchmark stands in for one on a CPU: a CIFAR ResNet-20 at batch 2 with one torch thread, where the step is
mostly Python. Each run trains for ``--seconds`` with ``Monitor(model, optimizer=opt, sinks=[TensorBoardSink(
SummaryWriter(dir), pictures=N, picture_budget=None)])``. That is the public API, with no time budget, so
drawings come back to back and their effect shows within a short run; the default budget keeps them to 1% of a
run.

Modes run in fresh processes, alternating over ``--rounds``:
- ``child``: the default, drawing in gradwatch's drawing process;
- ``in-process``: ``GRADWATCH_DRAW_IN_PROCESS=1``, drawing on the sink's thread, as before;
- ``no pictures``: the same monitor with ``pictures=0``, the reference.

Reports step-time percentiles, steps per second and drawings done. On a machine with few cores the child also
competes for CPU; the GIL is what it frees.

    .venv/bin/python benchmarks/picture_stall.py --seconds 20 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

MODES = {"no pictures": {}, "child": {}, "in-process": {"GRADWATCH_DRAW_IN_PROCESS": "1"}}


def _run(mode: str, seconds: float, every: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils.tensorboard import SummaryWriter

    import gradwatch
    from gradwatch.reference.blocks import resnet

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = resnet(20)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sink = gradwatch.TensorBoardSink(SummaryWriter(tempfile.mkdtemp()), pictures=0 if mode == "no pictures" else every,
                                     picture_budget=None)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, sinks=[sink])
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3 * every):  # the first drawing starts the child (or imports matplotlib here)
        step()
    sink.flush()
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    drawn = sink._pictures._spent if sink._pictures is not None else 0.0  # seconds spent drawing
    mon.close()
    q = sorted(times)
    return {"steps": len(times), "per_s": len(times) / seconds, "p50": statistics.median(times),
            "p90": q[int(0.9 * len(q))], "p99": q[int(0.99 * len(q))], "max": q[-1], "drawing_s": drawn}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--every", type=int, default=5, help="pictures every N logging steps")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(_run(args.mode, args.seconds, args.every)))
        return
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    labels = list(MODES)
    for r in range(args.rounds):
        for mode in labels[r % len(labels):] + labels[:r % len(labels)]:
            env = {**os.environ, **MODES[mode]}
            out = subprocess.run([sys.executable, __file__, "--mode", mode, "--seconds", str(args.seconds),
                                  "--every", str(args.every)], env=env, capture_output=True, text=True, check=True)
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"CIFAR ResNet-20, batch 2, 1 torch thread, every=1, pictures every {args.every} records without a time "
          f"budget; {args.rounds} rounds of {args.seconds:.0f} s per mode, medians over rounds")
    print(f"{'mode':<12} {'steps/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'drawing s':>10}")
    for mode, rs in results.items():
        def med(k: str, scale: float = 1e3) -> float:
            return scale * statistics.median(x[k] for x in rs)
        print(f"{mode:<12} {med('per_s', 1):8.1f} {med('p50'):8.2f} {med('p90'):8.2f} {med('p99'):8.2f} "
              f"{med('max'):8.1f} {med('drawing_s', 1):10.1f}")


if __name__ == "__main__":
    main()
