"""The calibration zoo: stock architectures and planted faults, trained briefly under a default monitor.

Every healthy entry is a freshly initialised stock model (torchvision, timm, transformers from small configs)
with the library's own init tricks, trained on generated data with the usual optimiser of its family; it
must raise no warning or critical alert, and block discovery must find the residual merges it has. Every
fault entry is one of our reference nets (:mod:`gradwatch.reference.blocks`) with a planted fault; each rule
it names must fire. Libraries that are not installed are skipped and reported as skipped.

    python -m gradwatch.reference.zoo --quick                       # a few dozen steps per entry
    python -m gradwatch.reference.zoo --library transformers,reference --steps 100
    python -m gradwatch.reference.zoo --out runs/zoo --out-md docs/validation.md --json runs/zoo.json

This module holds the entries (:func:`entries`) and the command line; :mod:`gradwatch.reference.zoo_run`
trains them (:func:`run_entry`), :mod:`gradwatch.reference.zoo_report` writes the report (:func:`report`).
Exit status 1 on any miss, false alarm, wrong merge count or model that fails to run; 0 otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import resnet
from .data import synthetic_images
from .zoo_report import main_with, report
from .zoo_structures import FAULT_STEP, FaultyEncoder, resnet_fault_from
from .zoo_run import ZooResult, run_entry

# Optional libraries: imported once, here; entries of a missing library are skipped, not failed.
try:
    import torchvision
    import torchvision.models as tvm
except ImportError:  # pragma: no cover - depends on the environment
    torchvision = tvm = None
try:
    import timm
except ImportError:  # pragma: no cover
    timm = None
try:
    import transformers
except ImportError:  # pragma: no cover
    transformers = None

__all__ = ["ZooEntry", "Recipe", "ImageTask", "TokenTask", "VectorTask", "LIBRARIES", "entries", "run_entry",
           "report", "ZooResult", "main"]

#: The libraries entries come from, and the module object of each (None: not installed).
LIBRARIES: dict[str, Any] = {"torchvision": torchvision, "timm": timm, "transformers": transformers,
                             "reference": True}


# ---------------------------------------------------------------------------------------------- recipes and data
@dataclass(frozen=True)
class Recipe:
    """The optimiser of an entry: ``SGD`` (momentum 0.9) or ``AdamW``."""

    kind: str
    lr: float
    weight_decay: float

    def make(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimiser over ``model``'s trainable parameters."""
        params = [p for p in model.parameters() if p.requires_grad]
        if self.kind == "SGD":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def __str__(self) -> str:
        return f"{self.kind} {self.lr:g}, wd {self.weight_decay:g}"


SGD = Recipe("SGD", 0.05, 5e-4)           # the demo's recipe: the reference nets, as in docs/alerts.md
# Library BN CNNs: torchvision's 0.1 at batch 256, scaled to batch 8 (the linear scaling rule). At 0.01 the losses
# of ResNet-50, ResNeXt-50, Wide ResNet-50-2 and both MobileNetV2 rose over 100 steps (at 0.05 so did ResNet-18's).
SGD_CNN = Recipe("SGD", 0.003, 1e-4)
ADAMW = Recipe("AdamW", 3e-4, 0.05)       # small transformers / ConvNeXt / ViT
ADAMW_BIG = Recipe("AdamW", 1e-4, 0.05)   # the full-size torchvision transformers and ConvNeXt


@dataclass(frozen=True)
class ImageTask:
    """Generated images (:func:`~gradwatch.reference.data.synthetic_images`), cross-entropy on the logits.
    ``hf``: the model is a transformers ``*ForImageClassification`` (``pixel_values=``, ``labels=``)."""

    size: int = 32
    classes: int = 10
    batch: int = 8
    hf: bool = False

    def sampler(self, seed: int) -> Callable[[torch.Generator], tuple]:
        """``g -> batch``: images and labels drawn by ``g`` from 256 generated from ``seed``."""
        x, y = synthetic_images(256, num_classes=self.classes, size=self.size, seed=seed)
        return lambda g: _pick(g, self.batch, x, y)

    def loss(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        """Cross-entropy on ``batch`` (the model's own loss when ``hf``)."""
        x, y = batch
        if self.hf:
            return model(pixel_values=x, labels=y).loss
        return F.cross_entropy(model(x), y)


@dataclass(frozen=True)
class TokenTask:
    """Token sequences from a fixed sparse Markov chain (each token has 4 likely successors: learnable).
    ``kind``: ``"classify"`` (label = first token's parity), ``"causal"`` (next token), ``"seq2seq"`` (copy)."""

    kind: str
    vocab: int = 1000
    seq: int = 32
    batch: int = 8

    def sampler(self, seed: int) -> Callable[[torch.Generator], tuple]:
        """``g -> batch``: token ids and labels drawn by ``g`` from 256 sequences of the chain of ``seed``."""
        g = torch.Generator().manual_seed(seed)
        succ = torch.randint(3, self.vocab, (self.vocab, 4), generator=g)  # ids 0-2 stay special
        toks = torch.empty(256, self.seq, dtype=torch.long)
        toks[:, 0] = torch.randint(3, self.vocab, (256,), generator=g)
        for t in range(1, self.seq):
            toks[:, t] = succ[toks[:, t - 1], torch.randint(0, 4, (256,), generator=g)]
        return lambda gen: _pick(gen, self.batch, toks, toks[:, 0] % 2)

    def loss(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        """The transformers model's own loss on ``batch`` (labels as :attr:`kind` says)."""
        ids, label = batch
        if self.kind == "classify":
            return model(input_ids=ids, labels=label).loss
        return model(input_ids=ids, labels=ids).loss  # causal: shifted inside; seq2seq: copy the input


@dataclass(frozen=True)
class VectorTask:
    """Gaussian vectors and random labels (the sigmoid MLP of the alert tests)."""

    features: int = 8
    classes: int = 3
    batch: int = 16

    def sampler(self, seed: int) -> Callable[[torch.Generator], tuple]:
        """``g -> batch``: vectors and labels drawn by ``g`` from 256 made from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(256, self.features, generator=g), torch.randint(0, self.classes, (256,), generator=g)
        return lambda gen: _pick(gen, self.batch, x, y)

    def loss(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        """Cross-entropy of the model's logits on ``batch``."""
        return F.cross_entropy(model(batch[0]), batch[1])


def _pick(g: torch.Generator, n: int, *pool: torch.Tensor) -> tuple:
    idx = torch.randint(0, pool[0].shape[0], (n,), generator=g)
    return tuple(t[idx] for t in pool)


# ---------------------------------------------------------------------------------------------- the entry
@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo.

    ``build()`` returns a freshly initialised model (the runner seeds torch first); ``task`` makes its data and
    loss; ``recipe`` its optimiser. ``merges`` is the number of residual merges discovery should find (None:
    not checked). Healthy entries must raise no warning or critical alert; a fault names in ``expect`` each
    rule that must fire, with the layer or block it must name (None: any). ``steps``/``every`` override the
    run's values for this entry (None: the run's).
    """

    name: str
    library: str
    about: str
    build: Callable[[], nn.Module]
    task: Any
    recipe: Recipe
    merges: int | None
    healthy: bool = True
    expect: Mapping[str, str | None] = field(default_factory=dict)
    steps: int | None = None
    every: int | None = None

    @property
    def available(self) -> bool:
        """Whether the library the entry needs is installed."""
        return LIBRARIES.get(self.library) is not None


# ---------------------------------------------------------------------------------------------- factories
def _tv(name: str, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: getattr(tvm, name)(weights=None, num_classes=10, **kw)


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kw)


def _hf(model: str, config: str, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: getattr(transformers, model)(getattr(transformers, config)(**kw))


def _mlp(depth: int, width: int, act: type[nn.Module], features: int = 8, classes: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(features if i == 0 else width, width), act()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def _nan_from(step: int, layer: str) -> Callable[[], nn.Module]:
    """ResNet-20 whose ``layer`` weight gradient is NaN from forward pass ``step`` (0-based) on."""
    def build() -> nn.Module:
        net = resnet(20)
        calls = {"n": -1}
        net.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
        weight = net.get_parameter(f"{layer}.weight")
        weight.register_hook(lambda g: g * math.nan if calls["n"] >= step else g)
        return net
    return build


_IMG = ImageTask(32)
_IMG_HF = ImageTask(32, hf=True)
_REF = ImageTask(16)  # the reference nets' 16x16 images, as in docs/alerts.md
_TEXT = dict(vocab_size=1000, max_position_embeddings=64)


def _registry() -> list[ZooEntry]:
    E = ZooEntry
    tv, tm, hf, ref = "torchvision", "timm", "transformers", "reference"
    return [
        # --- torchvision: BN CNNs with SGD, transformers and ConvNeXt with AdamW
        E("tv_resnet18", tv, "ResNet-18", _tv("resnet18"), _IMG, SGD_CNN, 8),
        E("tv_resnet50", tv, "ResNet-50, default init", _tv("resnet50"), _IMG, SGD_CNN, 16),
        E("tv_resnet50_zero_init", tv, "ResNet-50, zero_init_residual=True",
          _tv("resnet50", zero_init_residual=True), _IMG, SGD_CNN, 16),
        E("tv_resnext50_32x4d", tv, "ResNeXt-50 32x4d", _tv("resnext50_32x4d"), _IMG, SGD_CNN, 16),
        E("tv_wide_resnet50_2", tv, "Wide ResNet-50-2", _tv("wide_resnet50_2"), _IMG, SGD_CNN, 16),
        E("tv_regnet_y_400mf", tv, "RegNetY-400MF (SE gates)", _tv("regnet_y_400mf"), _IMG, SGD_CNN, 16),
        E("tv_mobilenet_v2", tv, "MobileNetV2 (residual only at stride 1, equal widths)", _tv("mobilenet_v2"),
          _IMG, SGD_CNN, 10),
        E("tv_efficientnet_b0", tv, "EfficientNet-B0 (stochastic depth 0.2, SE)", _tv("efficientnet_b0"),
          _IMG, SGD_CNN, 9),
        E("tv_convnext_tiny", tv, "ConvNeXt-T (layer scale 1e-6, stochastic depth 0.1)", _tv("convnext_tiny"),
          _IMG, ADAMW_BIG, 18),
        E("tv_swin_t", tv, "Swin-T (stochastic depth 0.2)", _tv("swin_t"), _IMG, ADAMW_BIG, 24),
        E("tv_vit_b_16", tv, "ViT-B/16, image_size 32 (4 patches)", _tv("vit_b_16", image_size=32), _IMG,
          ADAMW_BIG, 24),
        E("tv_densenet121", tv, "DenseNet-121: concatenation, no residual merge (control)", _tv("densenet121"),
          _IMG, SGD_CNN, 0),
        # --- timm, with its default init tricks
        E("timm_resnet18d", tm, "ResNet-18-D, zero_init_last (last BN of each block zero)", _timm("resnet18d"),
          _IMG, SGD_CNN, 8),
        E("timm_convnext_atto", tm, "ConvNeXt-atto (layer scale 1e-6, drop_path 0.1)",
          _timm("convnext_atto", drop_path_rate=0.1), _IMG, ADAMW, 12),
        E("timm_vit_tiny", tm, "ViT-Ti/16, img_size 32 (drop_path 0.1)",
          _timm("vit_tiny_patch16_224", img_size=32, drop_path_rate=0.1), _IMG, ADAMW, 24),
        E("timm_efficientnet_b0", tm, "EfficientNet-B0 (drop_path 0.2, SE)",
          _timm("efficientnet_b0", drop_path_rate=0.2), _IMG, SGD_CNN, 9),
        E("timm_regnety_002", tm, "RegNetY-200MF (SE gates)", _timm("regnety_002"), _IMG, SGD_CNN, 13),
        # --- transformers, small configs (text: vocab 1000, 32 tokens)
        E("hf_bert", hf, "BERT, post-LN encoder, 2 layers, hidden 64, sequence classification",
          _hf("BertForSequenceClassification", "BertConfig", hidden_size=64, num_hidden_layers=2,
              num_attention_heads=2, intermediate_size=256, num_labels=2, **_TEXT),
          TokenTask("classify"), ADAMW, 4),
        E("hf_gpt2", hf, "GPT-2, pre-LN decoder, 4 layers",
          _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=1000, n_positions=64, n_embd=128, n_layer=4,
              n_head=4, bos_token_id=0, eos_token_id=0), TokenTask("causal"), ADAMW, 8),
        E("hf_llama", hf, "Llama, RMSNorm + rotary, GQA, 2 layers",
          _hf("LlamaForCausalLM", "LlamaConfig", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, **_TEXT), TokenTask("causal"), ADAMW, 4),
        E("hf_t5", hf, "T5, pre-RMSNorm encoder-decoder, 2+2 layers",
          _hf("T5ForConditionalGeneration", "T5Config", vocab_size=1000, d_model=128, d_kv=32, d_ff=256,
              num_layers=2, num_decoder_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0),
          TokenTask("seq2seq"), ADAMW, 10),
        E("hf_bart", hf, "BART, post-LN encoder-decoder, 2+2 layers",
          _hf("BartForConditionalGeneration", "BartConfig", d_model=128, encoder_layers=2, decoder_layers=2,
              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
              pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, **_TEXT),
          TokenTask("seq2seq"), ADAMW, 10),
        # --- transformers' pure-torch vision models (no torchvision needed)
        E("hf_resnet", hf, "ResNetForImageClassification, basic blocks 2-2-2-2",
          _hf("ResNetForImageClassification", "ResNetConfig", embedding_size=32, hidden_sizes=[32, 64, 128, 256],
              depths=[2, 2, 2, 2], layer_type="basic", num_labels=10), _IMG_HF, SGD_CNN, 8),
        E("hf_convnext", hf, "ConvNextForImageClassification, 2-2-2-2, layer scale 1e-6",
          _hf("ConvNextForImageClassification", "ConvNextConfig", hidden_sizes=[32, 64, 128, 256],
              depths=[2, 2, 2, 2], drop_path_rate=0.1, num_labels=10), _IMG_HF, ADAMW, 8),
        E("hf_vit", hf, "ViTForImageClassification, 4 layers, patch 4 on 32 px",
          _hf("ViTForImageClassification", "ViTConfig", image_size=32, patch_size=4, hidden_size=128,
              num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, num_labels=10),
          _IMG_HF, ADAMW, 8),
        E("hf_mobilenet_v2", hf, "MobileNetV2ForImageClassification, 32 px",
          _hf("MobileNetV2ForImageClassification", "MobileNetV2Config", image_size=32, num_labels=10),
          _IMG_HF, SGD_CNN, 10),
        # --- reference nets: healthy controls on the faults' recipe
        E("ref_resnet56_postact", ref, "post-activation ResNet-56", lambda: resnet(56), _REF, SGD, 27),
        E("ref_resnet56_preact", ref, "pre-activation ResNet-56", lambda: resnet(56, block="preact"), _REF, SGD, 27),
        E("ref_mlp10_relu", ref, "10-layer ReLU MLP (width 32), PyTorch default init",
          lambda: _mlp(10, 32, nn.ReLU), VectorTask(), SGD, 0),
        # --- reference nets: planted faults
        E("fault_detached_skip", ref, "ResNet-56, block 13 (layer2.4) skip detached",
          lambda: resnet(56, skip_fault={13: "detached"}), _REF, SGD, 27, healthy=False,
          expect={"skip_collapse": "layer2.4"}),
        E("fault_scaled_skip_1e-4", ref, "ResNet-56, block 13 (layer2.4) skip scaled by 1e-4",
          lambda: resnet(56, skip_fault={13: ("scaled", 1e-4)}), _REF, SGD, 27, healthy=False,
          expect={"skip_collapse": "layer2.4"}),
        E("fault_plain56", ref, "plain 56-layer BN net (no skips)", lambda: resnet(56, block="plain"), _REF, SGD,
          0, healthy=False, expect={"vanishing": None}),
        E("fault_sigmoid_mlp16", ref, "16-layer sigmoid MLP (width 32)", lambda: _mlp(16, 32, nn.Sigmoid),
          VectorTask(), SGD, 0, healthy=False, expect={"vanishing": None}),
        E("fault_nan", ref, "ResNet-20, layer2.0.conv1 weight gradient NaN from step 10 (every=1)",
          _nan_from(10, "layer2.0.conv1"), _REF, SGD, 9, healthy=False,
          expect={"nonfinite": "layer2.0.conv1"}, steps=20, every=1),
        # He et al. 2016 (Identity Mappings), table 1: on ResNet-110 these shortcuts train worse than identity.
        # Their block input gradients also decay toward the input (depth_trend), an info alert by design.
        E("fault_const_scaling_0.5", ref, "ResNet-110, every skip scaled by 0.5 (He et al. 2016, constant "
          "scaling)", lambda: resnet(110, skip_fault={i: ("scaled", 0.5) for i in range(54)}), _REF, SGD, 54,
          healthy=False, expect={"vanishing": None}),
        E("fault_conv_shortcuts", ref, "ResNet-110, 1x1-conv shortcut on every block (He et al. 2016; "
          "shortcut='C')", lambda: resnet(110, shortcut="C"), _REF, SGD, 54, healthy=False,
          expect={"vanishing": None}),
        # structures discovery must count right (one 3-way merge per parallel layer, one block per call of a shared
        # layer, no scan/score/fusion adds), and skips zeroed or dropped mid-run (gradwatch.reference.zoo_structures)
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
          _timm("hrnet_w18_small"), _IMG, SGD_CNN, 23),
        E("fault_zeroed_skip_midrun", ref, f"ResNet-20, block 4 (layer2.1) skip multiplied by 0 from step {FAULT_STEP}",
          resnet_fault_from(("scaled", 0.0)), _REF, SGD, 9, healthy=False, expect={"skip_collapse": "layer2.1"},
          steps=30, every=2),
        E("fault_dropped_skip_midrun", ref, f"ResNet-20, block 4 (layer2.1) returns its branch alone from step "
          f"{FAULT_STEP}", resnet_fault_from("dropped"), _REF, SGD, 9, healthy=False,
          expect={"lost_skip": "layer2.1"}, steps=30, every=2),
        E("fault_zeroed_skip_transformer", ref, "pre-LN encoder (nn.TransformerEncoderLayer x4), layer 1's MLP skip "
          f"multiplied by 0 from step {FAULT_STEP}", lambda: FaultyEncoder("zeroed"), VectorTask(), ADAMW, 8,
          healthy=False, expect={"skip_collapse": "layers.1[1]"}, steps=30, every=2),
        E("fault_dropped_skip_transformer", ref, "pre-LN encoder (nn.TransformerEncoderLayer x4), layer 1's MLP "
          f"residual dropped from step {FAULT_STEP}", lambda: FaultyEncoder("dropped"), VectorTask(), ADAMW, 8,
          healthy=False, expect={"lost_skip": "layers.1[1]"}, steps=30, every=2),
    ]


def entries(libraries: Any = None) -> list[ZooEntry]:
    """The zoo's entries, in report order; ``libraries`` (names from :data:`LIBRARIES`) picks some. Entries
    whose library is not installed are included (``entry.available`` is False): the runner reports them as
    skipped."""
    chosen = _registry()
    if libraries is not None:
        wanted = set(libraries)
        unknown = wanted - set(LIBRARIES)
        if unknown:
            raise ValueError(f"unknown libraries {sorted(unknown)}; choose from {list(LIBRARIES)}")
        chosen = [e for e in chosen if e.library in wanted]
    return chosen


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    if transformers is not None:  # config notices per model; the report has what matters
        transformers.logging.set_verbosity_error()
    return main_with(entries, argv)


if __name__ == "__main__":
    raise SystemExit(main())
