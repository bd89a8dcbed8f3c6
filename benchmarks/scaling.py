"""How a logging step's cost grows with the number of parameter tensors (run by hand).

Linear+LayerNorm stacks of 100, 1,000 and 5,000 parameter tensors (width 64, batch 32), each trained bare and
monitored with parameter metrics written to TensorBoard as users do (``Monitor(model, optimizer=opt,
log_dir=..., every=1, blocks=None, rules=False)``), steps interleaved; a second bare net is the noise control.
Reports the logging-step cost (median of monitored minus bare) against the floor (one fused norm over all
gradients, one over all weights, one host transfer) and per tensor: linear scaling shows as a flat µs/tensor.

    .venv/bin/python benchmarks/scaling.py --sizes 100,1000,5000 --steps 40
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch
from _bench import build, floor, interleave, train_step

import gradwatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,5000")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--updates", action="store_true", help="also update_to_weight (track_updates=True)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.steps} "
          f"interleaved steps, every=1, parameter metrics{' + updates' if args.updates else ''}, TensorBoard on")
    print(f"{'tensors':>8} {'bare ms':>9} {'noise ms':>9} {'log-step +ms':>13} {'floor ms':>9} {'x floor':>8} "
          f"{'µs/tensor':>10}")
    for n in (int(s) for s in args.sizes.split(",")):
        runs, mons = {}, []
        x = y = None
        for label in ("bare", "bare #2", "monitored"):
            torch.manual_seed(0)
            model, batch = build("stack", n)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            if x is None:
                x, y = batch(args.batch)
            if label == "monitored":
                mons.append(gradwatch.Monitor(model, optimizer=opt, every=1, log_dir=tempfile.mkdtemp(),
                                              blocks=None, rules=False, track_updates=args.updates))
            runs[label] = (lambda m=model, o=opt: train_step(m, o, x, y))
        floor_s = floor(build("stack", n)[0], x, y)
        times = interleave(runs, args.steps)
        extra = statistics.median(t - b for t, b in zip(times["monitored"], times["bare"]))
        noise = statistics.median(t - b for t, b in zip(times["bare #2"], times["bare"]))
        print(f"{n:>8} {1e3 * statistics.median(times['bare']):9.2f} {1e3 * noise:9.2f} {1e3 * extra:13.2f} "
              f"{1e3 * floor_s:9.2f} {extra / floor_s:8.2f} {1e6 * extra / n:10.1f}")
        for mon in mons:
            mon.close()


if __name__ == "__main__":
    main()
