"""Effective depth: how many residual blocks deep the gradient really travels, from the skip/branch split.

Veit, Wilber and Belongie (NeurIPS 2016) read a residual network as 2^n paths: at each of its n blocks the
gradient goes through the branch or through the skip. They measured offline, by routing the backward pass,
how much gradient magnitude the paths of each length k carry, and found it concentrated on paths far
shorter than the network (5–17 of a ResNet-110's 54 blocks).

Block flow already measures, per block, the gradient reaching the block's input through its branch and
through its skip. With the amplitude ratio r_b = branch_grad_b / skip_grad_b and a multiplicative model
(a path's magnitude is the product of the ratios of the branches it takes, relative to the all-skip path),
the total magnitude of the paths of length k is the k-th elementary symmetric polynomial e_k(r_1, ..., r_n),
and the share of length k is e_k / prod(1 + r_b): the distribution of the number of successes of n
independent trials with probabilities q_b = r_b / (1 + r_b) (Poisson binomial). It is computed with that
recursion over the blocks, each step a convex combination of shares in [0, 1], so 100+ blocks neither
overflow (e_k itself grows like C(n, k) r^k) nor lose precision. Its mean is sum(q_b).

Which blocks: the chain on the main path, i.e. every block not nested inside another block's module (two
merges of one transformer block, ``h.0[0]`` and ``h.0[1]``, are two links of the chain). A projection
shortcut's "skip" is a path of its own with its own weights; the estimate still counts it as the
zero-length choice. A block skipped on a step (stochastic depth: no branch gradient) has r_b = 0. Blocks
without a finite ratio at a step are left out, and ``n`` counts the blocks used. ``docs/flow.md`` says what
the estimate assumes and where it does not hold; ``gradwatch.reference.paths`` checks it against Veit's
routed backward passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["DEPTH", "chain", "path_length_distribution", "distribution", "effective_depth", "figures"]

#: The effective-depth figures: mean path length, its 10th/50th/90th percentiles, blocks in the chain.
DEPTH = ("effective_depth", "effective_depth_p10", "effective_depth_p50", "effective_depth_p90",
         "effective_depth_n")


def chain(blocks: Sequence[str]) -> np.ndarray:
    """Indices of the blocks on the main path: those whose module is not inside another block's module."""
    modules = [b.split("[")[0] for b in blocks]
    outer = set(modules)
    keep = []
    for i, m in enumerate(modules):
        parts = m.split(".")
        if not any(".".join(parts[:j]) in outer for j in range(1, len(parts))):
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def path_length_distribution(ratios: np.ndarray) -> np.ndarray:
    """``p[k]``, k = 0..n: the share of the gradient magnitude carried by paths through exactly k branches,
    for per-block amplitude ratios ``ratios`` (branch over skip; ``inf`` for a block without a skip)."""
    r = np.asarray(ratios, dtype=np.float64)
    q = np.where(np.isinf(r), 1.0, r / (1.0 + np.where(np.isinf(r), 0.0, r)))
    dist = np.zeros(len(q) + 1)
    dist[0] = 1.0
    for i, qb in enumerate(q):  # n steps of O(n): 0.1 ms for 100 blocks
        dist[1: i + 2] = dist[1: i + 2] * (1.0 - qb) + dist[: i + 1] * qb
        dist[0] *= 1.0 - qb
    return dist


def _quantile(dist: np.ndarray, q: float) -> float:
    return float(np.searchsorted(np.cumsum(dist), q - 1e-12))


def distribution(blocks: Sequence[str], skip_grad: np.ndarray, branch_grad: np.ndarray) -> np.ndarray | None:
    """The path-length distribution over the main chain of ``blocks`` with these gradients at their inputs
    (blocks without a finite ratio left out); None when no block is usable."""
    idx = chain(blocks)
    if not len(idx):
        return None
    skip, branch = np.asarray(skip_grad, np.float64)[idx], np.asarray(branch_grad, np.float64)[idx]
    ok = np.isfinite(skip) & np.isfinite(branch) & (skip >= 0) & (branch >= 0) & ((skip > 0) | (branch > 0))
    if not ok.any():
        return None
    with np.errstate(divide="ignore"):
        r = np.where(skip[ok] > 0, branch[ok] / np.where(skip[ok] > 0, skip[ok], 1.0), np.inf)
    return path_length_distribution(r)


def effective_depth(blocks: Sequence[str], skip_grad: np.ndarray, branch_grad: np.ndarray) -> dict[str, float]:
    """The :data:`DEPTH` figures for blocks with these gradients at their inputs (NaN without a chain)."""
    return figures(distribution(blocks, skip_grad, branch_grad))


def figures(dist: np.ndarray | None) -> dict[str, float]:
    """The :data:`DEPTH` figures of a path-length distribution (:func:`distribution`; NaN for None)."""
    if dist is None:
        return dict.fromkeys(DEPTH, math.nan)
    k = np.arange(len(dist))
    return {"effective_depth": float((k * dist).sum()), "effective_depth_p10": _quantile(dist, 0.1),
            "effective_depth_p50": _quantile(dist, 0.5), "effective_depth_p90": _quantile(dist, 0.9),
            "effective_depth_n": float(len(dist) - 1)}
