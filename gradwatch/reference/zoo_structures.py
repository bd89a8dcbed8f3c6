"""Zoo entries for the structures block discovery must count right, and skips that break in the middle of a run.

Healthy stock models built from library configs (no downloads), each with the merge count discovery must find:

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
from .zoo import ADAMW, SGD, SGD_CNN, ImageTask, TokenTask, VectorTask, ZooEntry, _hf, _timm

__all__ = ["FAULT_STEP", "structural_entries", "FaultyEncoder"]

#: The forward pass (0-based) from which the planted faults are on: discovery ran long before.
FAULT_STEP = 10
_TEXT = dict(vocab_size=1000, max_position_embeddings=64)


class _EncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` (pre-LN) whose MLP residual can be broken: ``fault`` None, ``"zeroed"`` or
    ``"dropped"``."""

    fault: str | None = None

    def forward(self, src: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
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
        self.fault, self.broken, self.at, self.calls = fault, broken, at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            if self.calls == self.at:
                self.layers[self.broken].fault = self.fault
            self.calls += 1
        h = self.embed(x).view(x.shape[0], 4, self.width)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(dim=1))


def _resnet_fault_from(fault, block: int = 4) -> Callable[[], nn.Module]:
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


def structural_entries() -> list[ZooEntry]:
    """The entries of this module (``zoo.entries()`` includes them)."""
    E, hf, tm, ref = ZooEntry, "transformers", "timm", "reference"
    img, vec = ImageTask(16), VectorTask()
    return [
        E("hf_phi", hf, "Phi, parallel attention + MLP (x + attn(ln x) + mlp(ln x)), 4 layers: one 3-way merge each",
          _hf("PhiForCausalLM", "PhiConfig", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
              num_attention_heads=4, **_TEXT), TokenTask("causal"), ADAMW, 4),
        E("hf_albert", hf, "ALBERT, one shared layer run 4 times: 2 merges x 4 calls",
          _hf("AlbertForSequenceClassification", "AlbertConfig", hidden_size=128, num_hidden_layers=4,
              num_attention_heads=4, intermediate_size=256, embedding_size=64, num_labels=2, **_TEXT),
          TokenTask("classify"), ADAMW, 8),
        E("hf_mamba", hf, "Mamba (slow CPU scan), 3 layers: layer residual + the SSM's D skip, no scan adds",
          _hf("MambaForCausalLM", "MambaConfig", hidden_size=64, num_hidden_layers=3, state_size=8,
              vocab_size=1000), TokenTask("causal"), ADAMW, 6),
        E("hf_deberta_v2", hf, "DeBERTa-v2, relative-position attention (c2p + p2c score adds), 2 layers",
          _hf("DebertaV2ForSequenceClassification", "DebertaV2Config", hidden_size=64, num_hidden_layers=2,
              num_attention_heads=2, intermediate_size=128, num_labels=2, relative_attention=True,
              position_buckets=16, pos_att_type=["p2c", "c2p"], **_TEXT), TokenTask("classify"), ADAMW, 4),
        E("timm_hrnet_w18_small", tm, "HRNet-W18-small: multi-resolution fusion adds are not blocks",
          _timm("hrnet_w18_small"), ImageTask(32), SGD_CNN, 23),
        # --- planted mid-run faults: a zeroed and a dropped skip, on a CNN and a transformer
        E("fault_zeroed_skip_midrun", ref, f"ResNet-20, block 4 (layer2.1) skip multiplied by 0 from step {FAULT_STEP}",
          _resnet_fault_from(("scaled", 0.0)), img, SGD, 9, healthy=False, expect={"skip_collapse": "layer2.1"},
          steps=30, every=2),
        E("fault_dropped_skip_midrun", ref, f"ResNet-20, block 4 (layer2.1) returns its branch alone from step "
          f"{FAULT_STEP}", _resnet_fault_from("dropped"), img, SGD, 9, healthy=False,
          expect={"lost_skip": "layer2.1"}, steps=30, every=2),
        E("fault_zeroed_skip_transformer", ref, f"pre-LN encoder (nn.TransformerEncoderLayer x4), layer 1's MLP skip "
          f"multiplied by 0 from step {FAULT_STEP}", lambda: FaultyEncoder("zeroed"), vec, ADAMW, 8, healthy=False,
          expect={"skip_collapse": "layers.1[1]"}, steps=30, every=2),
        E("fault_dropped_skip_transformer", ref, f"pre-LN encoder (nn.TransformerEncoderLayer x4), layer 1's MLP "
          f"residual dropped from step {FAULT_STEP}", lambda: FaultyEncoder("dropped"), vec, ADAMW, 8, healthy=False,
          expect={"lost_skip": "layers.1[1]"}, steps=30, every=2),
    ]
