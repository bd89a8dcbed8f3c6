"""The planted mid-run skip faults of the zoo, and what its structural entries are for.

The zoo (:mod:`gradwatch.reference.zoo`) holds healthy stock models built from library configs (no downloads)
for the structures block discovery must count right, each with the merge count it must find:

- parallel attention + MLP blocks ``x + attn(ln x) + mlp(ln x)`` (Phi): one three-way merge per layer;
- a weight-shared layer run N times (ALBERT): one block per call (``<name>@<call>``), 2 merges x N calls;
- a state-space model (Mamba, its CPU scan): the layer residual and the SSM's ``D`` skip
  (``y = scan(x) + D * x``) per layer, none of the scan's recurrence adds ``state = dA[t] * state + dBu[t]``;
- relative-position attention (DeBERTa-v2): the two residuals per layer, none of the score adds
  ``c2p + p2c + q k^T``;
- multi-resolution fusion (timm HRNet-W18-small): the residual blocks of its branches and stems, none of the adds
  that fuse parallel resolutions.

Planted faults, each switched on at forward pass :data:`FAULT_STEP` (after discovery, mid-run), on a CNN (the
reference ResNet-20) and a transformer (``torch.nn.TransformerEncoderLayer``, pre-LN, 4 layers): a *zeroed* skip
(``0 * x + F(x)``: the merge stays, its skip carries nothing: ``skip_collapse``) and a *dropped* skip
(``F(x)`` alone: the merge is gone from the graph: ``lost_skip``), each naming its block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .blocks import resnet, set_skip_fault

__all__ = ["FAULT_STEP", "FaultyEncoder", "resnet_fault_from"]

#: The forward pass (0-based) from which the planted faults are on: discovery ran long before.
FAULT_STEP = 10


class _EncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` (pre-LN) whose MLP residual can be broken: ``fault`` None, ``"zeroed"`` or
    ``"dropped"``."""

    fault: str | None = None

    def forward(self, src: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Pre-LN attention and MLP residuals; the MLP's skip zeroed or dropped as :attr:`fault` says."""
        x = src + self._sa_block(self.norm1(src), None, None)
        ff = self._ff_block(self.norm2(x))
        if self.fault == "dropped":
            return ff
        return (x * 0.0 if self.fault == "zeroed" else x) + ff


class FaultyEncoder(nn.Module):
    """Vectors of 8 features as 4 tokens of width 32, 4 pre-LN encoder layers, mean pooling, 3 classes; from
    forward pass ``at`` on, layer ``broken``'s MLP residual has ``fault``."""

    def __init__(self, fault: str | None = None, broken: int = 1, at: int = FAULT_STEP, width: int = 32) -> None:
        super().__init__()
        self.width = width
        self.embed = nn.Linear(8, 4 * width)
        self.layers = nn.ModuleList(_EncoderLayer(width, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
                                    for _ in range(4))
        self.head = nn.Linear(width, 3)
        self.planted: str | None = fault
        self.broken, self.at, self.calls = broken, at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` (batch, 8); counts training forwards and plants the fault at the ``at``-th."""
        if self.training:
            if self.calls == self.at:
                layer = self.layers[self.broken]
                assert isinstance(layer, _EncoderLayer)
                layer.fault = self.planted
            self.calls += 1
        h = self.embed(x).view(x.shape[0], 4, self.width)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(dim=1))


def resnet_fault_from(fault: str | tuple, block: int = 4) -> Callable[[], nn.Module]:
    """Reference ResNet-20 whose block ``block`` (layer2.1) gets ``fault`` from forward pass :data:`FAULT_STEP`."""
    def build() -> nn.Module:
        net = resnet(20)
        calls = {"n": 0}

        def count(*_):
            if net.training:
                if calls["n"] == FAULT_STEP:
                    set_skip_fault(net, {block: fault})
                calls["n"] += 1
        net.register_forward_pre_hook(count)
        return net
    return build
