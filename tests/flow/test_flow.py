"""Block flow: discovery of residual merges and the exact skip/branch split of dL/dx (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.flow_reference import block_parts, contributions
from helpers.flow_reference import flow_values as values
from torch import nn

import gradwatch
from helpers import small_batch
from gradwatch import flow
from gradwatch.reference.blocks import resnet, set_skip_fault

TOL = 1e-8


def batch(n=4, size=8, seed=1, dtype=torch.float64):
    x, y = small_batch(n, size, seed)
    return x.to(dtype), y


def assert_close(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> None:
    err = float((a - b).abs().max() / scale.abs().max())
    assert err < TOL, err


def check_split(mon, name, ref_skip, ref_branch, ref_total, step=0):
    """Vectors kept by the probe and recorded norms equal the independent contributions."""
    vec = mon.probe.vectors[name]
    assert_close(vec["skip"], ref_skip, ref_total)
    assert_close(vec["branch"], ref_branch, ref_total)
    assert_close(vec["in"], ref_total, ref_total)
    assert_close(vec["skip"] + vec["branch"], vec["in"], ref_total)  # the two vectors sum to dL/dx
    v = values(mon, step)[name]
    s, b, t = (float(torch.linalg.vector_norm(r)) for r in (ref_skip, ref_branch, ref_total))
    assert v["skip_grad"] == pytest.approx(s, rel=TOL, abs=1e-300)
    assert v["branch_grad"] == pytest.approx(b, rel=TOL)
    assert v["grad_in"] == pytest.approx(t, rel=TOL)
    assert v["skip_share"] == pytest.approx(s * s / (s * s + b * b), rel=TOL, abs=1e-300)
    assert v["transmission"] == pytest.approx(v["grad_in"] / v["grad_out"], rel=1e-12)


# ---------------------------------------------------------------------------------------- reference blocks
VARIANTS = {
    "postact-B": dict(depth=8),  # identity + 1x1 conv/BN projection where the shape changes
    "postact-A": dict(depth=8, shortcut="A"),  # identity + stride slicing and zero-padded channels
    "postact-C": dict(depth=8, shortcut="C"),  # projection everywhere
    "preact-B": dict(depth=8, block="preact"),  # projection reads relu(bn1(x)): the paths fork there
    "preact-A": dict(depth=8, block="preact", shortcut="A"),
    "bottleneck": dict(depth=11, bottleneck=True),
    "preact-bottleneck": dict(depth=11, block="preact", bottleneck=True, shortcut="A"),
    "inplace": dict(depth=8, inplace=True),  # ReLU(inplace=True) and out += shortcut
    "inplace-A": dict(depth=8, inplace=True, shortcut="A", block="preact"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_split_equals_independent_contributions_for_reference_blocks(variant):
    kw = dict(VARIANTS[variant])
    depth = kw.pop("depth")
    torch.manual_seed(0)
    net = resnet(depth, width=4, **kw).double()
    blocks = net.residual_blocks()
    mon = gradwatch.Monitor(net, every=1, strict=True)
    mon.probe.keep_vectors = True
    x, y = batch()
    inputs = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
             for i, b in enumerate(blocks)]
    F.cross_entropy(net(x), y).backward()
    mon.step()
    for h in hooks:
        h.remove()

    found = mon.describe()
    assert [b.name for b in found] == [f"layer{s}.0" for s in (1, 2, 3)]
    assert [b.index for b in found] == [0, 1, 2]
    for i, block in enumerate(blocks):

        def downstream(out, i=i):
            for later in blocks[i + 1:]:
                out = later(out)
            if net.bn_final is not None:
                out = net.relu(net.bn_final(out))
            return F.cross_entropy(net.fc(F.adaptive_avg_pool2d(out, 1).flatten(1)), y)

        ref = contributions(lambda t, b=block: block_parts(b, t), inputs[i], downstream)
        check_split(mon, found[i].name, *ref)
        expected_kind = "projection" if block.projects else "identity"
        assert found[i].kind == expected_kind
    mon.close()


def test_skip_kinds_and_paths_are_described():
    mon = gradwatch.Monitor(resnet(8, width=4, shortcut="A"), every=1)
    found = mon.describe(batch(dtype=torch.float32)[0])
    assert [(b.kind, b.skip) for b in found] == [
        ("identity", ""), ("identity", "Slice>Slice>ConstantPadNd"), ("identity", "Slice>Slice>ConstantPadNd")
    ]
    mon = gradwatch.Monitor(resnet(8, width=4), every=1)
    found = mon.describe(batch(dtype=torch.float32)[0])
    assert [b.kind for b in found] == ["identity", "projection", "projection"]
    assert found[1].skip == "Convolution>NativeBatchNorm"
    text = str(found)
    assert "layer2.0" in text and "projection" in text


# ---------------------------------------------------------------------------------------- hand-written blocks
class PlusEquals(nn.Module):
    """`out += identity` after ReLU(inplace=True), as user code writes it."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def parts(self, x):
        branch = lambda t: self.bn2(self.conv2(self.relu(self.bn1(self.conv1(t)))))
        return x, (lambda t: t), branch, self.relu

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class OutPlusX(nn.Module):
    """`out = out + x` with linear layers."""

    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)

    def parts(self, x):
        return x, (lambda t: t), (lambda t: self.fc2(torch.tanh(self.fc1(t)))), (lambda y: y)

    def forward(self, x):
        out = self.fc2(torch.tanh(self.fc1(x)))
        out = out + x
        return out


class TorchAdd(nn.Module):
    """`torch.add(x, branch, alpha=0.5)`: the skip first, the branch scaled by alpha."""

    def __init__(self, c):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def parts(self, x):
        return x, (lambda t: t), (lambda t: 0.5 * F.gelu(self.fc(t))), (lambda y: y)

    def forward(self, x):
        return torch.add(x, F.gelu(self.fc(x)), alpha=0.5)


class GatedSkip(nn.Module):
    """A learned gate on the skip (`sigmoid(g) * x`): a scaled skip."""

    def __init__(self, c):
        super().__init__()
        self.fc = nn.Linear(c, c)
        self.gate = nn.Parameter(torch.tensor(0.3))

    def parts(self, x):
        return x, (lambda t: torch.sigmoid(self.gate) * t), (lambda t: torch.relu(self.fc(t))), (lambda y: y)

    def forward(self, x):
        return torch.relu(self.fc(x)) + torch.sigmoid(self.gate) * x


class ThreeWay(nn.Module):
    """Inception-ResNet style: x feeds three branch layers, concatenated and projected, plus an identity skip.

    The branch has three consumers of x; their contributions must be summed as vectors.
    """

    def __init__(self, c):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.up = nn.Linear(3 * c, c)

    def branch(self, t):
        return 0.2 * self.up(torch.relu(torch.cat([self.a(t), self.b(t), self.c(t)], dim=-1)))

    def parts(self, x):
        return x, (lambda t: t), self.branch, (lambda y: y)

    def forward(self, x):
        return x + self.branch(x)


@pytest.mark.parametrize("cls,kind", [(OutPlusX, "identity"), (TorchAdd, "identity"), (GatedSkip, "scaled"),
                                      (ThreeWay, "identity")])
def test_hand_written_blocks_split_exactly(cls, kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), cls(8), nn.Tanh(), cls(8), nn.Linear(8, 3)).double()
    mon = gradwatch.Monitor(model, every=1, strict=True)
    mon.probe.keep_vectors = True
    x = torch.randn(5, 6, dtype=torch.float64)
    target = torch.randn(5, 3, dtype=torch.float64)
    h1 = model[0](x).detach()
    model(x).sub(target).square().mean().backward()
    mon.step()
    found = mon.describe()
    assert [(b.name, b.kind) for b in found] == [("1", kind), ("3", kind)]
    # the first block, with everything after it downstream
    ref = contributions(model[1].parts, h1, lambda out: model[4](model[3](model[2](out))).sub(target).square().mean())
    check_split(mon, "1", *ref)


def test_plus_equals_identity_with_inplace_relu_splits_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), PlusEquals(4), PlusEquals(4)).double()
    mon = gradwatch.Monitor(model, every=1, strict=True)
    mon.probe.keep_vectors = True
    x, _ = batch()
    h1 = model[0](x).detach()
    w = torch.randn(4, 4, 8, 8, dtype=torch.float64)
    (model(x) * w).sum().backward()
    mon.step()
    assert [b.name for b in mon.describe()] == ["1", "2"]
    ref = contributions(model[1].parts, h1, lambda out: (model[2](out) * w).sum())
    check_split(mon, "1", *ref)


def test_block_fed_by_a_leaf_input_splits_at_its_accumulate_grad_node():
    torch.manual_seed(0)
    block = OutPlusX(8).double()
    mon = gradwatch.Monitor(block, every=1, strict=True)
    mon.probe.keep_vectors = True
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    block(x).square().sum().backward()
    mon.step()
    ref = contributions(block.parts, x.detach(), lambda out: out.square().sum())
    check_split(mon, "_root", *ref)
    assert_close(mon.probe.vectors["_root"]["in"], x.grad, x.grad)


# ---------------------------------------------------------------------------------------- transformer
class ManualGELU(nn.Module):
    """tanh-GELU written out: ``x + 0.044715 x^3`` is an add of two tensors from one input, with no parameter."""

    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class PreLN(nn.Module):
    """A pre-LN transformer block: two residual merges in one module."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, heads)
        self.ln2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), ManualGELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


class TinyGPT(nn.Module):
    def __init__(self, vocab=11, d=16, n=2, t=6):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Parameter(0.1 * torch.randn(t, d))
        self.blocks = nn.ModuleList(PreLN(d) for _ in range(n))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def test_transformer_block_has_two_merges_named_apart_and_split_exactly():
    torch.manual_seed(0)
    gpt = TinyGPT().double()
    mon = gradwatch.Monitor(gpt, every=1, strict=True)
    mon.probe.keep_vectors = True
    idx = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))
    block = gpt.blocks[0]
    x0 = (gpt.tok(idx) + gpt.pos[:6]).detach()
    F.cross_entropy(gpt(idx).flatten(0, 1), idx.flatten()).backward()
    mon.step()
    found = mon.describe()
    assert [(b.name, b.module, b.kind, b.index) for b in found] == [
        ("blocks.0[0]", "blocks.0", "identity", 0),
        ("blocks.0[1]", "blocks.0", "identity", 1),
        ("blocks.1[0]", "blocks.1", "identity", 2),
        ("blocks.1[1]", "blocks.1", "identity", 3),
    ]  # the GELU's internal add and the embedding sum are not residuals

    def rest(out):
        return F.cross_entropy(gpt.head(gpt.ln(gpt.blocks[1](out))).flatten(0, 1), idx.flatten())

    # attention residual: fork = block input; the MLP residual sits downstream
    ref = contributions(
        lambda t: (t, (lambda s: s), (lambda s: block.attn(block.ln1(s))), (lambda h: h + block.mlp(block.ln2(h)))),
        x0, rest,
    )
    check_split(mon, "blocks.0[0]", *ref)
    # MLP residual: fork = output of the attention residual
    x1 = (x0 + block.attn(block.ln1(x0))).detach()
    ref = contributions(lambda t: (t, (lambda s: s), (lambda s: block.mlp(block.ln2(s))), (lambda h: h)), x1, rest)
    check_split(mon, "blocks.0[1]", *ref)


# ---------------------------------------------------------------------------------------- not residuals
class DenseLayer(nn.Module):
    def __init__(self, c, growth):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(c), nn.Conv2d(c, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(torch.relu(self.bn(x)))], dim=1)


def test_concatenation_and_plain_nets_have_no_blocks():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), DenseLayer(4, 4), DenseLayer(8, 4), DenseLayer(12, 4),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    images = batch(dtype=torch.float32)[0]
    cases = [(dense, images), (resnet(8, width=4, block="plain"), images),
             (nn.Sequential(nn.Linear(3, 8), ManualGELU(), nn.Linear(8, 2)), torch.randn(4, 3))]
    for model, inp in cases:
        mon = gradwatch.Monitor(model, every=1, strict=True)
        model(inp).square().mean().backward()
        mon.step()
        assert list(mon.describe()) == []
        assert mon.flow_status.state == "none"
        assert not set(mon.history().metric) & set(flow.FLOW_METRICS)
        mon.close()


class LearnedActivation(nn.Module):
    """xIELU's form (Apertus' MLP activation): learned scalars weigh ``x * x`` beside ``x`` for x > 0, an add of
    two tensors from one input whose only parameters are scalars."""

    def __init__(self):
        super().__init__()
        self.alpha_p, self.alpha_n = nn.Parameter(torch.tensor([0.8])), nn.Parameter(torch.tensor([0.8]))

    def forward(self, x):
        neg = self.alpha_n * torch.expm1(torch.clamp(x, max=0.0)) - self.alpha_n * x + 0.5 * x
        return torch.where(x > 0, self.alpha_p * x * x + 0.5 * x, neg)


class ScaledMLPBlock(nn.Module):
    """A residual block whose MLP uses the learned activation; its branch ends in a per-channel scale."""

    def __init__(self, d=8):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, 2 * d), LearnedActivation(), nn.Linear(2 * d, d)
        self.gamma = nn.Parameter(torch.full((d,), 0.5))

    def forward(self, x):
        return x + self.gamma * self.fc2(self.act(self.fc1(x)))


def test_a_learned_activation_whose_parameters_are_scalars_is_no_block():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), ScaledMLPBlock(), ScaledMLPBlock(), nn.Linear(8, 2))
    mon = gradwatch.Monitor(model, every=1, strict=True)
    model(torch.randn(4, 8)).square().mean().backward()
    mon.step()
    # the two residual blocks, not the adds inside their activations
    assert [(b.name, b.kind) for b in mon.describe()] == [("1", "identity"), ("2", "identity")]
    mon.close()
    alone = nn.Sequential(nn.Linear(8, 8), LearnedActivation(), nn.Linear(8, 2))
    mon = gradwatch.Monitor(alone, every=1, strict=True)
    alone(torch.randn(4, 8)).square().mean().backward()
    mon.step()
    assert list(mon.describe()) == [] and mon.flow_status.state == "none"
    mon.close()


# ---------------------------------------------------------------------------------------- faults and ranges
def test_detached_and_scaled_skips_are_seen():
    torch.manual_seed(0)
    net = resnet(20, width=4, skip_fault={3: "detached", 5: ("scaled", 1e-4)})
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    mon = gradwatch.Monitor(net, optimizer=opt, every=1, strict=True)
    for step in range(5):
        x, y = batch(seed=step, dtype=torch.float32)
        if step == 2:
            set_skip_fault(net, {7: "detached"})  # planted after discovery: the same pattern, a dead operand
        if step == 3:
            set_skip_fault(net, {3: None})  # repaired: rediscovered as the projection it is
        F.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
        found = {b.index: b for b in mon.describe()}
        if step == 0:
            assert found[3].note == "skip carries no gradient" and found[3].found == "sibling"
            assert found[3].kind == "other"  # what a cut-off skip was is not in the graph
    assert len(found) == 9
    assert (found[3].kind, found[3].note, found[3].name) == ("projection", "", "layer2.0")
    later = values(mon, 4)
    # a graph that changed is examined again at once: the repaired skip is measured at the step it came back
    assert later["layer2.0"]["skip_share"] > 0.1 and values(mon, 3)["layer2.0"]["skip_share"] > 0.1
    assert found[5].kind == "scaled"
    for step in range(3):
        v = values(mon, step)
        names = [found[i].name for i in range(9)]
        assert v[names[3]]["skip_share"] == 0.0 and v[names[3]]["skip_grad"] == 0.0
        assert v[names[3]]["grad_in"] == pytest.approx(v[names[3]]["branch_grad"], rel=1e-6)
        assert v[names[5]]["skip_share"] < 1e-6
        healthy = [v[names[i]]["skip_share"] for i in (0, 1, 2, 4, 6, 8)]
        assert min(healthy) > 0.1
        assert (v[names[7]]["skip_share"] == 0.0) == (step == 2)
    assert np.isfinite(mon.history().value).all()


@pytest.mark.parametrize("block", ["postact", "preact"])
def test_healthy_resnet56_blocks_fall_in_the_documented_range(block):
    # docs/flow.md: at init, batch 16, 5 seeds x shortcuts A/B: every block 0.17-0.89, medians 0.56-0.73
    torch.manual_seed(0)
    net = resnet(56, block=block)
    mon = gradwatch.Monitor(net, every=1, strict=True)
    x, y = batch(n=16, size=32, seed=100, dtype=torch.float32)
    F.cross_entropy(net(x), y).backward()
    mon.step()
    table = flow.summary(mon.history(), step=0)
    assert len(table) == 27
    assert table.skip_share.between(0.1, 0.95).all(), table.skip_share
    assert 0.45 < table.skip_share.median() < 0.85
    assert table.transmission.between(0.4, 3.0).all()


def test_summary_orders_blocks_by_depth_and_aggregates():
    torch.manual_seed(0)
    net = resnet(8, width=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    mon = gradwatch.Monitor(net, optimizer=opt, every=1)
    for step in range(3):
        x, y = batch(seed=step, dtype=torch.float32)
        F.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    hist = mon.history()
    table = flow.summary(hist)
    assert list(table.index) == ["layer1.0", "layer2.0", "layer3.0"]
    assert list(table.columns) == list(flow.FLOW_METRICS)
    at1 = flow.summary(hist, step=1)
    row = hist[(hist.step == 1) & (hist.name == "layer2.0") & (hist.metric == "skip_share")].value.iloc[0]
    assert at1.loc["layer2.0", "skip_share"] == row
    med = hist[(hist.name == "layer2.0") & (hist.metric == "skip_share")].value.median()
    assert table.loc["layer2.0", "skip_share"] == pytest.approx(med)
    assert flow.summary(hist[hist.metric == "grad_norm"]).empty
    with pytest.raises(ValueError, match="how"):
        flow.summary(hist, how="mode")


class Highway(nn.Module):
    """y = t * h(x) + (1 - t) * x with the gate t = sigmoid(W x) shared by both operands."""

    def __init__(self, c):
        super().__init__()
        self.h, self.t = nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, x):
        t = torch.sigmoid(self.t(x))
        return t * torch.relu(self.h(x)) + (1 - t) * x


def test_highway_gate_shared_by_both_operands_splits_at_x():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), Highway(6), nn.Linear(6, 2)).double()
    mon = gradwatch.Monitor(model, every=1, strict=True)
    mon.probe.keep_vectors = True
    x = torch.randn(5, 4, dtype=torch.float64)
    model(x).square().sum().backward()
    mon.step()
    (block,) = mon.describe()
    assert (block.name, block.kind, block.skip) == ("1", "scaled", "Mul")
    hw, head = model[1], model[2]
    f = model[0](x).detach().requires_grad_(True)

    def loss(f_skip, f_rest):  # the skip is the direct x factor of (1 - t) * x; the gate belongs to the branch
        t = torch.sigmoid(hw.t(f_rest))
        return head(t * torch.relu(hw.h(f_rest)) + (1 - t) * f_skip).square().sum()

    total = torch.autograd.grad(loss(f, f), f)[0]
    skip = torch.autograd.grad(loss(f, f.detach()), f)[0]
    branch = torch.autograd.grad(loss(f.detach(), f), f)[0]
    check_split(mon, "1", skip, branch, total)


def test_builtin_transformer_layers_are_named_alike():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True, norm_first=True)
    enc = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
    mon = gradwatch.Monitor(enc, every=1, strict=True)
    enc(torch.randn(2, 5, 16)).square().mean().backward()  # the input needs no grad: layer 0's first merge
    mon.step()                                              # has no gradient to split
    assert [b.name for b in mon.describe()] == ["layers.0[1]", "layers.1[0]", "layers.1[1]", "layers.2[0]",
                                                "layers.2[1]"]
    shares = flow.summary(mon.history(), step=0).skip_share
    assert shares.between(0.5, 1).all()


def test_share_table_for_the_demo():
    histories = {}
    for label, kw in [("plain", dict(block="plain")), ("broken", dict(skip_fault={1: "detached"}))]:
        torch.manual_seed(0)
        net = resnet(8, width=4, **kw)
        mon = gradwatch.Monitor(net, every=1)
        x, y = batch(dtype=torch.float32)
        F.cross_entropy(net(x), y).backward()
        mon.step()
        histories[label] = mon.history()
    lines = flow.share_table(histories).splitlines()
    assert lines[0].split() == ["block", "plain", "broken"]
    assert [line.split()[0] for line in lines[1:]] == ["layer1.0", "layer2.0", "layer3.0"]
    assert lines[2].split()[1:] == ["-", "0"]  # the plain net has no blocks; layer2.0's skip is cut
    with pytest.raises(ValueError, match="metric"):
        flow.share_table(histories, metric="grad_norm")


def test_describe_is_a_list_of_blocks_that_joins_text_as_its_table():
    net = resnet(8, width=4)
    mon = gradwatch.Monitor(net, every=1)
    found = mon.describe(torch.randn(2, 3, 8, 8))
    table = str(found)
    assert "layer2.0" in table and "block flow: ok" in table
    # as text, where a user writes text
    assert "blocks:\n" + found == "blocks:\n" + table
    assert found + "\n(end)" == table + "\n(end)"
    assert f"{found}" == table and f"{found:>5}" == table and "%s" % found == table
    text = "model blocks: "
    text += found
    assert text == "model blocks: " + table
    # as the list of blocks it is
    assert isinstance(found, list) and len(found) == 3 and [b.name for b in found] == ["layer1.0", "layer2.0", "layer3.0"]
    assert [b.name for b in found + found[:1]] == ["layer1.0", "layer2.0", "layer3.0", "layer1.0"]
    blocks = mon.describe()
    blocks += found[:1]
    assert isinstance(blocks, list) and len(blocks) == 4 and blocks[-1] is found[0]
    mon.close()
