"""Healthy ranges of block flow on the reference CIFAR ResNets at initialisation (run by hand, not a test).

For each net (post-/pre-activation, shortcut option A and B) and seed: one forward/backward on a random
batch, then the per-block ``skip_share`` and ``transmission``. Prints min-max over all blocks and seeds, the
median, and the projection blocks apart. The numbers in ``docs/flow.md`` come from:

    .venv/bin/python benchmarks/flow_ranges.py --depth 56 --batch 16 --seeds 5
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

import gradwatch
from gradwatch import flow
from gradwatch.reference.blocks import resnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--faults", action="store_true", help="also plant a detached and a 1e-4-scaled skip")
    args = parser.parse_args()
    print(f"ResNet-{args.depth}, batch {args.batch}x3x{args.size}x{args.size}, {args.seeds} seeds, at init")
    print(f"{'net':<12} {'skip_share':>13} {'median':>7} {'projection':>13} {'transmission':>13}")
    print(f"{'':<12} {'(identity)':>13} {'(all)':>7}")
    for block in ("postact", "preact"):
        for shortcut in ("A", "B"):
            shares, trans, kinds = [], [], []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                faults = {3: "detached", 5: ("scaled", 1e-4)} if args.faults else None
                net = resnet(args.depth, block=block, shortcut=shortcut, skip_fault=faults)
                mon = gradwatch.Monitor(net, every=1, strict=True)
                g = torch.Generator().manual_seed(100 + seed)
                x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
                y = torch.randint(0, 10, (args.batch,), generator=g)
                F.cross_entropy(net(x), y).backward()
                mon.step()
                table = flow.summary(mon.history(), step=0)
                shares.append(table.skip_share.to_numpy())
                trans.append(table.transmission.to_numpy())
                kinds = [b.kind for b in mon.describe()]
                mon.close()
            s, t = np.array(shares), np.array(trans)
            proj = np.array([k == "projection" for k in kinds])
            keep = ~proj  # identity (and zero-pad) blocks
            if args.faults:
                print(f"  {block}-{shortcut} faults: detached {s[:, 3].max():.3g}, scaled 1e-4 {s[:, 5].max():.3g}")
                keep[[3, 5]] = False
                proj[[3, 5]] = False
            healthy = s[:, keep]
            proj_text = f"{s[:, proj].min():.2f}-{s[:, proj].max():.2f}" if proj.any() else "-"
            print(f"{block + '-' + shortcut:<12} {healthy.min():6.2f}-{healthy.max():.2f} {np.median(s):7.2f} "
                  f"{proj_text:>13} {t.min():6.2f}-{t.max():.2f}")


if __name__ == "__main__":
    main()
