"""Veit et al.'s path-length measurement, the ground truth for the live effective depth (:mod:`gradwatch.depth`).

Veit, Wilber and Belongie, "Residual Networks Behave Like Ensembles of Relatively Shallow Networks" (NeurIPS
2016): for a set S of k blocks, backpropagate only through the branch of the blocks in S and only through the
skip elsewhere (the forward pass unchanged), and sum the gradient magnitude at the input over all C(n, k)
such paths. :func:`sampled` does this on the reference nets (each block's ``route``), exactly where C(n, k) is
at most ``samples`` and from ``samples`` random sets otherwise; BatchNorm in eval mode, so that every routed
backward pass sees the same forward. :func:`estimated` is what gradwatch reports for the same state, batch and
mode, from one ordinary backward pass.

    python -m gradwatch.reference.paths --out-md docs/validation.md

writes the comparison table into ``docs/validation.md`` (after the marker :data:`MARKER`; the calibration
zoo's part of the page, above it, is kept).
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..depth import distribution
from ..monitor import Monitor
from ._sections import marker, write_section
from .blocks import ResNet, resnet
from .data import synthetic_images

__all__ = ["PathLengths", "sampled", "estimated", "train", "main", "MARKER"]

#: Where the generated section of docs/validation.md starts.
MARKER = marker("python -m gradwatch.reference.paths")


@dataclass
class PathLengths:
    """A path-length distribution (``dist[k]``: share of gradient magnitude on paths through k branches)."""

    dist: np.ndarray
    passes: int = 0  # backward passes it took

    @property
    def n(self) -> int:
        """The number of blocks (the longest path)."""
        return len(self.dist) - 1

    @property
    def mean(self) -> float:
        """The mean path length, in blocks."""
        return float((np.arange(len(self.dist)) * self.dist).sum())

    def quantile(self, q: float) -> int:
        """The smallest length k whose cumulative share reaches ``q``."""
        return int(np.searchsorted(np.cumsum(self.dist), q - 1e-12))


def _blocks(net: ResNet) -> list:
    return [b for b in net.residual_blocks() if b.has_skip]


def _set_routes(blocks: list, branch: set[int] | None) -> None:
    for i, b in enumerate(blocks):
        b.route = None if branch is None else ("branch" if i in branch else "skip")


def sampled(net: ResNet, x: torch.Tensor, y: torch.Tensor, samples: int = 8, seed: int = 0) -> PathLengths:
    """Veit's measurement on ``net`` for the batch ``(x, y)``: per length k, the mean gradient magnitude at the
    input over ``samples`` random sets of k branches (all of them when there are at most ``samples``), times
    C(n, k). The net is left in eval mode with its routes cleared."""
    net.eval()
    blocks = _blocks(net)
    n = len(blocks)
    rng = np.random.default_rng(seed)
    totals = np.zeros(n + 1)
    passes = 0
    try:
        for k in range(n + 1):
            count = math.comb(n, k)
            sets = (itertools.combinations(range(n), k) if count <= samples
                    else (rng.choice(n, k, replace=False) for _ in range(samples)))
            mags = []
            for chosen in sets:
                _set_routes(blocks, {int(i) for i in chosen})
                xi = x.detach().clone().requires_grad_(True)
                (g,) = torch.autograd.grad(F.cross_entropy(net(xi), y), xi)
                mags.append(float(g.norm()))
                passes += 1
            totals[k] = count * float(np.mean(mags))
    finally:
        _set_routes(blocks, None)
    return PathLengths(totals / totals.sum(), passes)


def estimated(net: ResNet, x: torch.Tensor, y: torch.Tensor) -> PathLengths:
    """What gradwatch reports for ``net`` on ``(x, y)`` in eval mode: the distribution from the per-block
    skip/branch gradients of one ordinary backward pass (block flow of a default :class:`~gradwatch.Monitor`)."""
    net.eval()
    mon = Monitor(net, every=1, rules=False)
    try:
        F.cross_entropy(net(x), y).backward()
        mon.step()
    finally:
        mon.close()
        net.zero_grad(set_to_none=True)
    r = mon.latest
    dist = None if r is None else distribution(r.blocks, r.block("skip_grad"), r.block("branch_grad"))
    if dist is None:
        raise RuntimeError("gradwatch measured no usable block flow on this net: no path-length distribution")
    return PathLengths(dist, 1)


def train(net: ResNet, steps: int, lr: float = 0.05, batch: int = 32, seed: int = 0) -> None:
    """``steps`` of momentum SGD (train mode) on the embedded data: the "after training" state."""
    x, y = synthetic_images(batch * 8, seed=seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    net.train()
    for s in range(steps):
        i = (s * batch) % len(x)
        loss = F.cross_entropy(net(x[i:i + batch]), y[i:i + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def _row(name: str, state: str, est: PathLengths, got: PathLengths, seconds: float, samples: int) -> str:
    return (f"| {name} | {state} | {got.n} | {got.mean:.2f} ({got.quantile(0.1)}–{got.quantile(0.9)}) | "
            f"{est.mean:.2f} ({est.quantile(0.1)}–{est.quantile(0.9)}) | {est.mean - got.mean:+.2f} | "
            f"{samples} | {got.passes} | {seconds:.0f} |")


def main(argv: list[str] | None = None) -> None:
    """``python -m gradwatch.reference.paths``: the comparison table, printed and (``--out-md``) written."""
    ap = argparse.ArgumentParser(description="Effective depth: gradwatch's live estimate against Veit's routed "
                                             "backward passes on the reference ResNets")
    ap.add_argument("--depths", type=int, nargs="+", default=[20, 56, 110])
    ap.add_argument("--steps", type=int, default=100, help="training steps for the 'trained' state")
    ap.add_argument("--samples", type=int, default=8, help="random branch sets per path length")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-md", help="write the table into this page, after the marker")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y = synthetic_images(args.batch, seed=123)
    rows = []
    for depth in args.depths:
        for kind in ("postact", "preact"):
            torch.manual_seed(0)
            net = resnet(depth, kind, width=args.width)
            for state in ("init", f"after {args.steps} steps"):
                if state != "init":
                    train(net, args.steps)
                t0 = time.perf_counter()
                got = sampled(net, x, y, args.samples)
                est = estimated(net, x, y)
                row = _row(f"{kind} ResNet-{depth}", state, est, got, time.perf_counter() - t0, args.samples)
                print(row, flush=True)
                rows.append(row)
    cmd = "python -m gradwatch.reference.paths " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k != "out_md" and v is not None)
    text = "\n".join([
        "## Effective depth: the live estimate against Veit's routed backward passes", "",
        f"Generated by `{cmd} --out-md docs/validation.md` ({time.strftime('%Y-%m-%d')}, torch "
        f"{torch.__version__}, CPU). Each net is measured at initialisation and after training, BatchNorm in eval "
        f"mode, on one batch of {args.batch} embedded 16x16 images. **Sampled**: Veit et al.'s measurement "
        "(`gradwatch.reference.paths.sampled`): per path length k, the gradient magnitude at the input averaged "
        f"over {args.samples} random sets of k branches routed through (every set where there are at most "
        f"{args.samples}), times C(n, k). **Estimate**: what gradwatch reports as `effective_depth` from one "
        "ordinary backward pass (`gradwatch.depth`, the per-block ratios r = branch_grad / skip_grad). Mean path "
        "length in blocks, with the 10–90% range in brackets; n is the nominal number of blocks.", "",
        "| net | state | n | sampled: mean (10–90%) | estimate: mean (10–90%) | error | samples per length | "
        "backward passes | seconds |",
        "|---|---|---|---|---|---|---|---|---|", *rows, ""])
    if args.out_md:
        write_section(args.out_md, MARKER, text)
        print(f"wrote {args.out_md}")


if __name__ == "__main__":  # pragma: no cover
    main()

