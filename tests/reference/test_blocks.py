"""Reference ResNet blocks: shapes, published parameter counts, gradient reach, faults."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwatch.reference import blocks
from gradwatch.reference.blocks import resnet, set_skip_fault


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "depth, published", [(20, 0.27e6), (56, 0.85e6), (110, 1.7e6)]
)
def test_cifar_parameter_counts_match_the_paper(depth, published):
    # He 2015, table 6: the CIFAR nets use option A (zero-pad) shortcuts.
    count = n_params(resnet(depth, shortcut="A"))
    assert round(count / 1e6, 2 if depth < 100 else 1) == published / 1e6
    # projections where the shape changes add a few thousand parameters, same rounding
    assert abs(n_params(resnet(depth, shortcut="B")) - count) < 0.01e6


@pytest.mark.parametrize("cls, expansion", [
    (blocks.BasicBlock, 1), (blocks.Bottleneck, 4), (blocks.PreActBasicBlock, 1), (blocks.PreActBottleneck, 4),
    (blocks.PlainBasicBlock, 1), (blocks.PlainBottleneck, 4),
    (blocks.PlainPreActBasicBlock, 1), (blocks.PlainPreActBottleneck, 4),
])
@pytest.mark.parametrize("stride", [1, 2])
def test_every_block_keeps_or_halves_the_resolution(cls, expansion, stride):
    block = cls(8, 4, stride)
    out = block(torch.randn(2, 8, 8, 8))
    assert out.shape == (2, 4 * expansion, 8 // stride, 8 // stride)


@pytest.mark.parametrize("shortcut, kind", [("A", blocks.ZeroPadShortcut), ("B", nn.Sequential), ("C", nn.Sequential)])
def test_shortcut_options(shortcut, kind):
    down = blocks.BasicBlock(8, 16, 2, shortcut=shortcut)
    assert isinstance(down.shortcut, kind)
    same = blocks.BasicBlock(8, 8, 1, shortcut=shortcut)
    assert isinstance(same.shortcut, nn.Sequential if shortcut == "C" else nn.Identity)
    pre = blocks.PreActBasicBlock(8, 16, 2, shortcut="B")
    assert isinstance(pre.shortcut, nn.Conv2d)  # pre-activation projection: a 1x1 conv, no BN


def test_zero_pad_shortcut_pads_channels_with_zeros():
    sc = blocks.ZeroPadShortcut(4, 8, 2)
    x = torch.randn(1, 4, 4, 4)
    y = sc(x)
    assert y.shape == (1, 8, 2, 2)
    assert torch.equal(y[:, 2:6], x[:, :, ::2, ::2])
    assert y[:, :2].abs().sum() == 0 and y[:, 6:].abs().sum() == 0


@pytest.mark.parametrize("block", ["postact", "preact", "plain", "plain_preact"])
@pytest.mark.parametrize("inplace", [False, True])
def test_gradient_reaches_the_first_layer(block, inplace):
    net = resnet(20, block=block, inplace=inplace, width=8)
    out = net(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert net.conv1.weight.grad is not None and net.conv1.weight.grad.abs().sum() > 0


def test_preact_bottleneck_164_runs_forward_and_backward():
    net = resnet(164, block="preact", bottleneck=True)
    assert len(net.residual_blocks()) == 54
    assert round(n_params(net) / 1e6, 1) == 1.7  # He 2016, table 3
    out = net(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert net.conv1.weight.grad.abs().sum() > 0


def test_planted_faults_change_the_skip_only():
    torch.manual_seed(0)
    healthy = resnet(20, width=8)
    torch.manual_seed(0)
    broken = resnet(20, width=8, skip_fault={3: "detached", 7: ("scaled", 1e-4)})
    b = broken.residual_blocks()
    assert b[3].skip_fault == "detached" and b[7].skip_fault == ("scaled", 1e-4)
    x = torch.randn(2, 3, 16, 16)
    healthy.eval(), broken.eval()
    # a detached skip leaves the forward value unchanged; a scaled one does not
    only_detached = resnet(20, width=8)
    only_detached.load_state_dict(healthy.state_dict())
    only_detached.eval()
    set_skip_fault(only_detached, {3: "detached"})
    assert torch.allclose(only_detached(x), healthy(x))
    assert not torch.allclose(broken(x), healthy(x))
    set_skip_fault(broken, {3: None, 7: None})
    assert torch.allclose(broken(x), healthy(x))


def test_a_detached_skip_stops_the_gradient_through_it():
    block = blocks.BasicBlock(4, 4, skip_fault="detached")
    x = torch.randn(1, 4, 4, 4, requires_grad=True)
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()  # the branch carries nothing: any gradient to x would be the skip's
    block(x).sum().backward()
    assert x.grad.abs().sum() == 0


def test_builder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="6n\\+2"):
        resnet(21)
    with pytest.raises(ValueError, match="9n\\+2"):
        resnet(21, bottleneck=True)
    with pytest.raises(ValueError, match="block"):
        resnet(20, block="densenet")
    with pytest.raises(ValueError, match="index"):
        resnet(20, skip_fault={9: "detached"})
    with pytest.raises(ValueError, match="plain"):
        resnet(20, block="plain", skip_fault={0: "detached"})
    with pytest.raises(ValueError, match="skip_fault"):
        resnet(20, skip_fault={0: "broken"})
    with pytest.raises(ValueError, match="shortcut"):
        blocks.BasicBlock(4, 4, shortcut="D")
