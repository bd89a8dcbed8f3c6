"""How merges are counted: n-way residual sums, modules run several times, and adds that are not residuals.

Every number is checked against one computed independently with ``torch.autograd.grad`` on the same tensors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.flow_reference import flow_values as values
from torch import nn

import gradwatch


class Parallel(nn.Module):
    """``x + attn(ln1 x) + mlp(ln2 x)`` (GPT-NeoX); ``inplace``: ``m += a; return m + x`` (Falcon)."""

    def __init__(self, d=8, inplace=False):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.inplace = inplace

    def branches(self, x):
        return self.attn(self.ln1(x)), self.mlp(self.ln2(x))

    def forward(self, x):
        a, m = self.branches(x)
        if self.inplace:
            m = m.clone()
            m += a
            return m + x
        return x + a + m


class Stack(nn.Module):
    def __init__(self, *blocks, d=8):
        super().__init__()
        self.inp, self.blocks, self.out = nn.Linear(4, d), nn.ModuleList(blocks), nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)


@pytest.mark.parametrize("inplace", [False, True])
def test_a_parallel_block_is_one_three_way_merge_with_its_split_measured(inplace):
    torch.manual_seed(0)
    net = Stack(Parallel(inplace=inplace), Parallel(inplace=inplace)).double()
    mon = gradwatch.Monitor(net, every=1, strict=True)
    seen = {}

    def keep(module, args, out):  # the block's input and output, for the independent split
        args[0].retain_grad()
        out.retain_grad()
        seen[module] = (args[0], out)

    for b in net.blocks:
        b.register_forward_hook(keep)
    x, y = _inputs()
    F.cross_entropy(net(x), y).backward()
    mon.step()
    blocks = list(mon.describe())
    assert [(b.name, b.kind, b.branches) for b in blocks] == [("blocks.0", "identity", 2), ("blocks.1", "identity", 2)]
    v = values(mon)
    for b, block in zip(net.blocks, blocks):
        xin, out = seen[b]
        g = out.grad
        xd = xin.detach().requires_grad_()
        a, m = b.branches(xd)
        (branch,) = torch.autograd.grad(a + m, xd, g)  # both branches' contribution to dL/dx, the skip's is g
        got = v[block.name]
        assert got["skip_grad"] == pytest.approx(float(g.norm()), rel=1e-9)
        assert got["branch_grad"] == pytest.approx(float(branch.norm()), rel=1e-9)
        assert got["grad_in"] == pytest.approx(float(xin.grad.norm()), rel=1e-9)
        share = g.norm() ** 2 / (g.norm() ** 2 + branch.norm() ** 2)
        assert got["skip_share"] == pytest.approx(float(share), rel=1e-9)
    mon.close()


class Shared(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(torch.tanh(x))


class Looped(nn.Module):  # one block applied three times (ALBERT, universal transformers)
    def __init__(self, d=8):
        super().__init__()
        self.inp, self.b, self.other, self.out = nn.Linear(4, d), Shared(d), Shared(d), nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        h = self.b(self.b(h))
        h = self.other(h)
        return self.out(self.b(h))


def test_a_module_run_three_times_is_three_blocks_in_the_order_they_ran():
    torch.manual_seed(0)
    net = Looped().double()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    mon = gradwatch.Monitor(net, optimizer=opt, every=1, strict=True)
    calls = []

    def keep(module, args, out):
        args[0].retain_grad()
        out.retain_grad()
        calls.append((args[0], out))

    handle = net.b.register_forward_hook(keep)
    expected = []
    for step in range(2):
        calls.clear()
        x, y = _inputs(step)
        F.cross_entropy(net(x), y).backward()
        expected = []
        for xin, out in calls:  # before the update: the weights the backward used
            xd = xin.detach().requires_grad_()
            (branch,) = torch.autograd.grad(net.b.fc(torch.tanh(xd)), xd, out.grad)
            expected.append((float(out.grad.norm()), float(xin.grad.norm()), float(branch.norm())))
        opt.step()
        opt.zero_grad()
    handle.remove()
    blocks = list(mon.describe())
    assert [(b.name, b.calls) for b in blocks] == [("b@0", 0), ("b@1", 1), ("other", None), ("b@2", 2)]
    assert {b.module for b in blocks if b.calls is not None} == {"b"}
    v = values(mon, step=1)
    assert len(expected) == 3
    for i, (g_out, g_in, branch) in enumerate(expected):
        got = v[f"b@{i}"]
        assert (got["grad_out"], got["grad_in"], got["branch_grad"]) == pytest.approx((g_out, g_in, branch), rel=1e-9)
    mon.close()


def test_gradient_accumulation_does_not_count_micro_batches_as_calls():
    torch.manual_seed(0)
    net = Stack(Shared(), Shared()).double()
    mon = gradwatch.Monitor(net, every=1, strict=True)
    for seed in range(3):  # three forwards of the model in one step: each block still runs once per forward
        x, y = _inputs(seed)
        F.cross_entropy(net(x), y).backward()
    mon.step()
    assert [b.name for b in mon.describe()] == ["blocks.0", "blocks.1"]
    mon.close()


# ------------------------------------------------------------------------------- adds that are not residuals
class RelativeScores(nn.Module):
    """Attention with disentangled relative-position scores (DeBERTa: ``q k^T + q p_k^T + k p_q^T``)."""

    def __init__(self, d=8, t=5):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.pos = nn.Parameter(torch.randn(t, d))
        self.pk, self.pq = nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        q, k = self.q(x), self.k(x)
        scores = q @ k.transpose(-1, -2) + q @ self.pk(self.pos).T + k @ self.pq(self.pos).T
        return x + self.o(torch.softmax(scores, -1) @ self.v(x))  # the one residual


class Scan(nn.Module):
    """A state-space scan ``state = dA[t] * state + dBu[t]`` (Mamba's CPU path), its ``D`` skip and a residual."""

    def __init__(self, d=8):
        super().__init__()
        self.dt, self.b = nn.Linear(d, d), nn.Linear(d, d)
        self.a = nn.Parameter(-torch.rand(d))
        self.D = nn.Parameter(torch.ones(d))
        self.o = nn.Linear(d, d)

    def forward(self, x):
        dt = F.softplus(self.dt(x))  # (B, T, d)
        da, dbu = torch.exp(dt * self.a), dt * self.b(x) * x
        state = torch.zeros_like(x[:, 0])
        ys = []
        for t in range(x.shape[1]):
            state = da[:, t] * state + dbu[:, t]
            ys.append(state)
        y = torch.stack(ys, 1) + x * self.D  # the D skip: a scaled skip around the scan
        return x + self.o(y)  # the layer residual


class Fusion(nn.Module):
    """Two resolutions computed in parallel and fused by adds (HRNet), then averaged by two heads."""

    def __init__(self, d=8):
        super().__init__()
        self.hi = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU())
        self.lo = nn.Sequential(nn.Linear(d, d // 2), nn.ReLU(), nn.Linear(d // 2, d // 2), nn.ReLU())
        self.up = nn.Linear(d // 2, d)
        self.head_a, self.head_b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        fused = self.hi(x) + self.up(self.lo(x))
        return (self.head_a(fused) + self.head_b(fused)) / 2


class Biased(nn.Module):
    """A position table added to every sample's scores (T5's bias plus mask), then a residual."""

    def __init__(self, d=8, t=5):
        super().__init__()
        self.table = nn.Embedding(2 * t, 1)
        self.q = nn.Linear(d, d)
        self.t = t

    def forward(self, x):
        idx = torch.arange(self.t)[:, None] - torch.arange(self.t)[None, :] + self.t
        bias = self.table(idx)[..., 0].unsqueeze(0)  # (1, T, T): broadcast over the batch
        q = self.q(x)
        scores = q @ q.transpose(-1, -2) + bias.clone()
        return x + torch.softmax(scores, -1) @ q


@pytest.mark.parametrize("block,expected", [
    (RelativeScores, ["blocks.0"]),
    (Scan, ["blocks.0[0]", "blocks.0[1]"]),  # the D skip and the residual; no scan step
    (Fusion, []),
    (Biased, ["blocks.0"]),
])
def test_adds_that_are_not_a_path_around_a_sub_network_are_not_blocks(block, expected):
    torch.manual_seed(0)
    d = 8

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.blocks, self.out = nn.Linear(4, 5 * d), nn.ModuleList([block()]), nn.Linear(d, 3)

        def forward(self, x):
            h = self.inp(x).view(x.shape[0], 5, d)
            for b in self.blocks:
                h = b(h)
            return self.out(h.mean(1))

    net = Tokens().double()
    mon = gradwatch.Monitor(net, every=1, strict=True)
    x, y = _inputs()
    F.cross_entropy(net(x), y).backward()
    mon.step()
    assert [b.name for b in mon.describe()] == expected
    if block is Scan:
        assert [b.kind for b in mon.describe()] == ["scaled", "identity"]
    mon.close()
