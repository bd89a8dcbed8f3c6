"""Reference residual blocks and CIFAR-style ResNets, to validate gradwatch's diagnostics against.

Our own implementation of He et al. 2015, "Deep Residual Learning for Image Recognition" (post-activation,
shortcut options A/B/C) and He et al. 2016, "Identity Mappings in Deep Residual Networks" (pre-activation).

Shortcut options (the 2015 paper's names):

- ``"A"``: identity; where the shape changes, subsample and zero-pad the channels (no parameters).
- ``"B"``: identity; where the shape changes, a 1x1 projection (conv + BN; pre-activation blocks: conv only).
- ``"C"``: a projection on every block.
- ``"none"``: no shortcut at all: the *plain* counterpart with the same layers.

Faults for validation: a block's ``skip_fault`` is ``None`` (healthy), ``"detached"`` (the skip carries no
gradient: ``s.detach()``), ``"dropped"`` (the forward returns the branch alone: no merge) or ``("scaled", c)``
(the skip is multiplied by ``c``). Plant them at build time
with ``resnet(..., skip_fault={3: "detached", 7: ("scaled", 1e-4)})`` or later with :func:`set_skip_fault`;
block indices count residual blocks in depth order from 0.

>>> from gradwatch.reference.blocks import resnet
>>> net = resnet(56, block="preact")                  # CIFAR ResNet-56, 0.85M parameters
>>> broken = resnet(20, skip_fault={3: "detached"})   # block 3's skip passes no gradient
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VARIANTS",
    "set_shortcut_variant",
    "SkipFault",
    "ZeroPadShortcut",
    "BasicBlock",
    "Bottleneck",
    "PreActBasicBlock",
    "PreActBottleneck",
    "PlainBasicBlock",
    "PlainBottleneck",
    "PlainPreActBasicBlock",
    "PlainPreActBottleneck",
    "ResNet",
    "resnet",
    "set_skip_fault",
]

Shortcut = Literal["A", "B", "C", "none"]
SkipFault = Union[None, str, tuple]


def _check_fault(fault: SkipFault) -> SkipFault:
    if fault is None or fault in ("detached", "dropped"):
        return fault
    if (
        isinstance(fault, tuple)
        and len(fault) == 2
        and fault[0] == "scaled"
        and isinstance(fault[1], (int, float))
    ):
        return ("scaled", float(fault[1]))
    raise ValueError(f"skip_fault must be None, 'detached', 'dropped' or ('scaled', factor), got {fault!r}")


class ZeroPadShortcut(nn.Module):
    """Option A shortcut: subsample by ``stride`` and zero-pad new channels. Has no parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("a zero-pad shortcut cannot reduce channels; use a projection (option B)")
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` subsampled by ``stride``, with the new channels zero-padded (half before, half after)."""
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            half = self.extra // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.extra - half))
        return x


class _ResidualBlock(nn.Module):
    """What all reference blocks share: the shortcut choice, the planted fault, the in-place option."""

    expansion = 1
    preact = False
    plain = False
    # Set only on blocks that are rewired after construction (absent otherwise: read with getattr): the He 2016
    # shortcut variant and its gate (set_shortcut_variant), the routed backward (gradwatch.reference.paths).
    variant: str
    gate: nn.Conv2d
    route: str | None

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        shortcut: Shortcut = "B",
        inplace: bool = False,
        skip_fault: SkipFault = None,
    ) -> None:
        super().__init__()
        if shortcut not in ("A", "B", "C", "none"):
            raise ValueError(f"shortcut must be 'A', 'B', 'C' or 'none', got {shortcut!r}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.inplace = inplace
        self.relu = nn.ReLU(inplace=inplace)
        self.has_skip = shortcut != "none"
        if not self.has_skip and skip_fault is not None:
            raise ValueError("a plain block has no skip to break")
        self.skip_fault = _check_fault(skip_fault)
        # Registered by _add_shortcut after the branch layers, so module order follows the forward pass.
        self._shortcut_args = (in_planes, planes * self.expansion, stride, shortcut)

    def _add_shortcut(self) -> None:
        in_planes, out_planes, stride, shortcut = self._shortcut_args
        if shortcut == "none":
            self.shortcut: nn.Module | None = None
        elif shortcut == "C" or (shortcut == "B" and (stride != 1 or in_planes != out_planes)):
            conv = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
            self.shortcut = conv if self.preact else nn.Sequential(conv, nn.BatchNorm2d(out_planes))
        elif stride != 1 or in_planes != out_planes:
            self.shortcut = ZeroPadShortcut(in_planes, out_planes, stride)
        else:
            self.shortcut = nn.Identity()

    @property
    def projects(self) -> bool:
        """True when the shortcut has learnable parameters (a 1x1 projection)."""
        return self.shortcut is not None and any(True for _ in self.shortcut.parameters())

    def _skip(self, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        # He 2016: a pre-activation projection sees the pre-activated input; identity and zero-pad see x.
        assert self.shortcut is not None  # _merge calls _skip only on blocks with a skip
        s = self.shortcut(pre if self.projects else x)
        if self.skip_fault == "detached":
            s = s.detach()
        elif isinstance(self.skip_fault, tuple):
            s = s * self.skip_fault[1]
        return s

    def _merge(self, out: torch.Tensor, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        if not self.has_skip or self.skip_fault == "dropped":
            return out  # "dropped": the forward no longer adds the skip at all (out = branch(x))
        s = self._skip(x, pre)
        route = getattr(self, "route", None)
        if route is not None:  # Veit et al.'s routed backward (gradwatch.reference.paths): forward unchanged
            return out + s.detach() if route == "branch" else out.detach() + s
        variant = getattr(self, "variant", None)
        if variant is not None:
            return _variant_merge(self, variant, out, s, x)
        if self.inplace:
            out += s
            return out
        return out + s

    def extra_repr(self) -> str:
        fault = f", skip_fault={self.skip_fault!r}" if self.skip_fault is not None else ""
        return f"skip={self.has_skip}, inplace={self.inplace}{fault}"


class BasicBlock(_ResidualBlock):
    """Post-activation basic block (He 2015): conv3x3-BN-ReLU-conv3x3-BN, add shortcut, ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, **kwargs) -> None:
        super().__init__(in_planes, planes, stride, **kwargs)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self._add_shortcut()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two 3x3 conv-BN stages (ReLU between them), plus the shortcut of ``x``, then ReLU."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self._merge(out, x, x))


class Bottleneck(_ResidualBlock):
    """Post-activation bottleneck (He 2015): 1x1-3x3-1x1 convs with BN, 4x expansion, add, ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, **kwargs) -> None:
        super().__init__(in_planes, planes, stride, **kwargs)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self._add_shortcut()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The 1x1, 3x3 and 1x1 conv-BN stages (ReLU between them), plus the shortcut of ``x``, then ReLU."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self._merge(out, x, x))


class PreActBasicBlock(_ResidualBlock):
    """Pre-activation basic block (He 2016): BN-ReLU-conv3x3-BN-ReLU-conv3x3, add shortcut, nothing after."""

    preact = True

    def __init__(self, in_planes: int, planes: int, stride: int = 1, **kwargs) -> None:
        super().__init__(in_planes, planes, stride, **kwargs)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self._add_shortcut()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two BN-ReLU-conv3x3 stages plus the shortcut (of the pre-activated input when it projects)."""
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        return self._merge(out, x, pre)


class PreActBottleneck(_ResidualBlock):
    """Pre-activation bottleneck (He 2016): BN-ReLU-1x1, BN-ReLU-3x3, BN-ReLU-1x1 (4x), add shortcut."""

    expansion = 4
    preact = True

    def __init__(self, in_planes: int, planes: int, stride: int = 1, **kwargs) -> None:
        super().__init__(in_planes, planes, stride, **kwargs)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self._add_shortcut()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The three BN-ReLU-conv stages plus the shortcut (of the pre-activated input when it projects)."""
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return self._merge(out, x, pre)


def _plain(cls: type[_ResidualBlock], doc: str) -> type[_ResidualBlock]:
    def __init__(self, in_planes: int, planes: int, stride: int = 1, inplace: bool = False) -> None:
        cls.__init__(self, in_planes, planes, stride, shortcut="none", inplace=inplace)

    return type(f"Plain{cls.__name__}", (cls,), {"__init__": __init__, "__doc__": doc, "__module__": __name__, "plain": True})


PlainBasicBlock = _plain(BasicBlock, "BasicBlock's layers with no shortcut (the 'plain' control).")
PlainBottleneck = _plain(Bottleneck, "Bottleneck's layers with no shortcut (the 'plain' control).")
PlainPreActBasicBlock = _plain(PreActBasicBlock, "PreActBasicBlock's layers with no shortcut.")
PlainPreActBottleneck = _plain(PreActBottleneck, "PreActBottleneck's layers with no shortcut.")


class ResNet(nn.Module):
    """CIFAR-style ResNet (He 2015, section 4.2): a 3x3 stem, three stages of ``n`` blocks with widths
    ``w, 2w, 4w`` (times the block's expansion) and strides 1, 2, 2, global average pooling, a linear head.
    Pre-activation nets end with BN-ReLU before pooling (He 2016). Build one with :func:`resnet`.
    """

    def __init__(
        self,
        block: type[_ResidualBlock],
        n: int,
        width: int = 16,
        num_classes: int = 10,
        shortcut: Shortcut = "B",
        inplace: bool = False,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.preact = block.preact
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = None if self.preact else nn.BatchNorm2d(width)
        in_planes = width
        stages = []
        for i, stride in enumerate((1, 2, 2)):
            planes = width * 2**i
            layers = []
            for j in range(n):
                options = {"inplace": inplace} if block.plain else {"inplace": inplace, "shortcut": shortcut}
                layers.append(block(in_planes, planes, stride if j == 0 else 1, **options))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn_final = nn.BatchNorm2d(in_planes) if self.preact else None
        self.relu = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def residual_blocks(self) -> list[_ResidualBlock]:
        """The blocks in depth order (indices used by ``skip_fault``)."""
        # a stage is an nn.Sequential of the blocks ResNet built: every item is a _ResidualBlock
        return cast("list[_ResidualBlock]", [b for stage in (self.layer1, self.layer2, self.layer3) for b in stage])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_classes)`` for images ``(batch, in_channels, H, W)``."""
        out = self.conv1(x)
        if self.bn1 is not None:
            out = self.relu(self.bn1(out))
        out = self.layer3(self.layer2(self.layer1(out)))
        if self.bn_final is not None:
            out = self.relu(self.bn_final(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


_BLOCKS: dict[tuple[str, bool], type[_ResidualBlock]] = {
    ("postact", False): BasicBlock,
    ("postact", True): Bottleneck,
    ("preact", False): PreActBasicBlock,
    ("preact", True): PreActBottleneck,
    ("plain", False): PlainBasicBlock,
    ("plain", True): PlainBottleneck,
    ("plain_preact", False): PlainPreActBasicBlock,
    ("plain_preact", True): PlainPreActBottleneck,
}


def resnet(
    depth: int,
    block: str = "postact",
    bottleneck: bool = False,
    width: int = 16,
    num_classes: int = 10,
    shortcut: Shortcut = "B",
    inplace: bool = False,
    skip_fault: Mapping[int, SkipFault] | None = None,
    in_channels: int = 3,
) -> ResNet:
    """Build a CIFAR-style ResNet of ``depth`` layers.

    Args:
        depth: ``6n+2`` for basic blocks (20, 32, 44, 56, 110, ...), ``9n+2`` for bottlenecks (164, 1001).
        block: ``"postact"`` (He 2015), ``"preact"`` (He 2016), ``"plain"`` (post-activation layers, no
            skip) or ``"plain_preact"``.
        bottleneck: use bottleneck blocks (1x1-3x3-1x1, 4x expansion).
        width: channels of the first stage (16 in the paper).
        shortcut: ``"A"`` zero-pad (the paper's CIFAR nets), ``"B"`` projection where the shape changes,
            ``"C"`` projection everywhere. Ignored by plain nets.
        inplace: use ``nn.ReLU(inplace=True)`` and ``out += shortcut`` (the trap for hook-based tools).
        skip_fault: ``{block_index: "detached" | ("scaled", c)}`` faults to plant.

    >>> sum(p.numel() for p in resnet(20, shortcut="A").parameters())
    269722
    """
    if (block, bottleneck) not in _BLOCKS:
        raise ValueError(f"block must be 'postact', 'preact', 'plain' or 'plain_preact', got {block!r}")
    per = 9 if bottleneck else 6
    if not isinstance(depth, int) or depth < per + 2 or (depth - 2) % per:
        raise ValueError(
            f"depth must be {per}n+2 for {'bottleneck' if bottleneck else 'basic'} blocks "
            f"(e.g. {per + 2}, {3 * per + 2}), got {depth!r}"
        )
    cls = _BLOCKS[(block, bottleneck)]
    net = ResNet(cls, (depth - 2) // per, width, num_classes, shortcut, inplace, in_channels)
    if skip_fault:
        set_skip_fault(net, skip_fault)
    return net


#: He, Zhang, Ren and Sun, "Identity Mappings in Deep Residual Networks" (2016), Table 1 / Figure 2: shortcut
#: variants that all train worse than the identity because they hamper signal propagation.
VARIANTS = ("constant_scaling", "exclusive_gating", "shortcut_only_gating", "conv_shortcut", "dropout_shortcut")


def _variant_merge(block: _ResidualBlock, variant: str, out: torch.Tensor, s: torch.Tensor,
                   x: torch.Tensor) -> torch.Tensor:
    if variant == "constant_scaling":  # lambda = 0.5 on both paths
        return 0.5 * out + 0.5 * s
    if variant in ("exclusive_gating", "shortcut_only_gating"):  # g(x) = sigmoid(1x1 conv of x)
        g = torch.sigmoid(block.gate(x))
        return (g * out if variant == "exclusive_gating" else out) + (1 - g) * s
    if variant == "dropout_shortcut":  # the shortcut kept with probability 0.5, not rescaled (expectation 0.5)
        if block.training:
            return out + s * (torch.rand_like(s) < 0.5).to(s.dtype)
        return out + 0.5 * s
    return out + s  # conv_shortcut: the 1x1 projection itself is the variant (see set_shortcut_variant)


def set_shortcut_variant(net: ResNet, variant: str, gate_bias: float = 0.0) -> ResNet:
    """Turn every residual block of a post-activation basic ``net`` into one of He et al.'s 2016 shortcut
    variants (:data:`VARIANTS`). Gates are 1x1 convolutions of the block input with bias ``gate_bias``
    (0: g = 0.5 at initialisation); ``conv_shortcut`` replaces every shortcut with a 1x1 convolution and
    BatchNorm. Returns ``net``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    for b in net.residual_blocks():
        if not b.has_skip or b.preact or b.expansion != 1:
            raise ValueError("shortcut variants apply to post-activation basic blocks with skips (He 2016, Fig. 2)")
        in_planes, out_planes, stride, _ = b._shortcut_args
        if variant == "conv_shortcut":
            b.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(out_planes))
        elif variant.endswith("gating"):
            b.gate = nn.Conv2d(in_planes, out_planes, 1, stride=stride)
            assert b.gate.bias is not None  # a Conv2d has a bias unless built with bias=False
            nn.init.constant_(b.gate.bias, gate_bias)
        b.variant = variant
    return net


def set_skip_fault(net: ResNet, faults: Mapping[int, SkipFault]) -> None:
    """Plant (or with ``None``, clear) skip faults on blocks of ``net`` by depth index."""
    blocks = net.residual_blocks()
    for index, fault in faults.items():
        if not isinstance(index, int) or not 0 <= index < len(blocks):
            raise ValueError(f"skip_fault index must be in 0..{len(blocks) - 1}, got {index!r}")
        b = blocks[index]
        if not b.has_skip:
            raise ValueError(f"block {index} is plain: it has no skip to break")
        b.skip_fault = _check_fault(fault)
