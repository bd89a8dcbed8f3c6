"""The identity path: whether a residual net's chain of skips still passes the gradient through unchanged.

A residual merge ``y = F(x) + S(x)`` hands ``dL/dy`` to its skip; an identity skip passes it on to ``x``
whole, so the block's **skip gain** ``skip_grad / grad_out`` is exactly 1. The chain of those gains is the
gradient highway He et al. 2016 ("Identity Mappings in Deep Residual Networks") credit for training very
deep nets: scaling the shortcut (λ = 0.5), gating it, making it a 1x1 convolution or dropping it out each
attenuates or distorts the signal at every block, and their ResNet-110s train worse or not at all.

Healthy nets keep the highway: every identity skip reads 1.0, and only the projection shortcuts where the
stage changes shape read otherwise (0.33-2.6 in torchvision's and timm's ResNets, RegNets; all 4 blocks of
timm's resnet14t, but 10^0.8 in all). So the statistic is about the chain, not one block: how many of its skips are not identities (gain outside ``[1 - band,
1 / (1 - band)]``) and how far their gains compound (``sum |log10 gain|``: 3 is a factor of 1,000 along the
chain, either way).

Calibration (``docs/alerts.md``, :class:`AttenuatedIdentity`): over 30 stock models from torchvision, timm and
transformers and the scorecard's healthy ResNets (100-300 steps, every logging step) at most 0.375 of the
blocks were off identity and the compounded departure at most 1.97 (a post-activation ResNet-110's two
projection shortcuts); He et al.'s variants at 110 layers: 0.46-1.0 of the blocks and 3.8-16. Tested after
on 23 stock models it was not calibrated on: quiet on all (shallow ResNets up to 1.0 off identity, but
departures under 0.9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .measurements import Measurements

__all__ = ["Highway", "highway"]


@dataclass
class Highway:
    """The chain of skip gains at one logging step."""

    blocks: list[str]  # one merge per module that makes merges (its most identity-like), in depth order
    gains: np.ndarray  # their skip_grad / grad_out (NaN where either is 0 or not finite)
    off: np.ndarray  # mask: blocks whose skip is not an identity (finite gain outside the band)
    departure: float  # sum over off-identity blocks of |log10 gain|: how far the chain compounds, either way
    compounded: float  # product of the off-identity gains: < 1 attenuated, > 1 amplified

    @property
    def measured(self) -> int:
        """Blocks with a finite gain."""
        return int(np.isfinite(self.gains).sum())

    @property
    def share(self) -> float:
        """Fraction of the measured blocks whose skip is not an identity."""
        return float(self.off.sum() / self.measured) if self.measured else math.nan


def highway(m: Measurements, band: float = 0.1) -> Highway | None:
    """The skip gains of ``m``'s blocks, one per module that makes merges (None without block flow).

    A module that makes several merges is judged by its most identity-like one: a transformer block's two
    residuals are both identities when healthy, and a parallel-residual block (GPT-J, Phi, Falcon, GPT-NeoX:
    ``x + attn(ln(x)) + mlp(ln(x))``) is found as two merges, the true skip (gain 1) and the sum of its two
    branches, whose "skip" is the MLP (gain 0.04-3; ``docs/flow.md``). Its identity path is the first."""
    if not len(m.blocks):
        return None
    out, skip = m.block_values("grad_out"), m.block_values("skip_grad")
    with np.errstate(divide="ignore", invalid="ignore"):
        each = np.where((out > 0) & np.isfinite(out) & np.isfinite(skip) & (skip > 0), skip / out, np.nan)
    modules: dict[str, list[int]] = {}
    for i, name in enumerate(m.blocks):
        modules.setdefault(name.split("[")[0], []).append(i)
    names, gains = [], []
    for module, idx in modules.items():
        measured = [i for i in idx if np.isfinite(each[i])]
        best = min(measured, key=lambda i: abs(math.log10(each[i]))) if measured else idx[0]
        names.append(m.blocks[best])
        gains.append(each[best])
    g = np.asarray(gains, dtype=np.float64)
    finite = np.isfinite(g)
    off = finite & ((g < 1 - band) | (g > 1 / (1 - band)))
    logs = np.log10(g[off]) if off.any() else np.zeros(0)
    # a skip that passes nothing (gain 0: detached) is skip_collapse's, not a gain to compound
    return Highway(names, g, off, float(np.abs(logs).sum()), float(10 ** logs.sum()))
