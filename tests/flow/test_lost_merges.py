"""A merge that disappears mid-run: the block keeps its row as *lost* and ``lost_skip`` fires at that step; a
module bypassed, removed or re-declared on purpose is not an alarm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch.reference.blocks import resnet, set_skip_fault
from helpers import small_batch


def run(net, steps, before_step=None, mon=None):
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    mon = mon or gradwatch.Monitor(net, optimizer=opt, every=1, strict=True)
    for step in range(steps):
        if before_step is not None:
            before_step(net, mon, step)
        x, y = small_batch(4, 8, step)
        F.cross_entropy(net(x.double()), y).backward()
        opt.step()
        opt.zero_grad()
    return mon


def test_a_dropped_skip_is_a_lost_block_in_its_row_with_an_alert_at_that_step():
    torch.manual_seed(0)
    net = resnet(20, width=4).double()
    seen = {}

    def plant(net, mon, step):
        if step == 3:
            set_skip_fault(net, {4: "dropped"})  # layer2.1 now returns its branch alone

    def keep(module, args, out):  # the block input, for an independent dL/dx
        args[0].retain_grad()
        seen["x"] = args[0]

    block = net.residual_blocks()[4]
    block.register_forward_hook(keep)
    mon = run(net, 6, plant)
    names = [b.name for b in mon.describe()]
    assert len(names) == 9 and names[4] == "layer2.1"
    lost = mon.describe()[4]
    assert (lost.lost, lost.note) == (3, "merge lost at step 3")
    for rec in mon.records:
        assert rec.blocks == tuple(names)  # the row stays, in depth order
        assert rec.lost == (("layer2.1",) if rec.step >= 3 else ())
        share = rec.block("skip_share")[4]
        assert (share == 0.0) == (rec.step >= 3) and np.isfinite(rec.block("skip_share")).all()
        assert (rec.health["skip_share_min"] == 0.0) == (rec.step >= 3)
        assert rec.health["effective_depth_n"] == 9
    last = mon.records[-1]
    # the branch is the only consumer of the block input left: its contribution is all of dL/dx
    assert last.block("skip_grad")[4] == 0.0
    assert last.block("branch_grad")[4] == pytest.approx(float(seen["x"].grad.norm()), rel=1e-9)
    assert last.block("grad_in")[4] == pytest.approx(float(seen["x"].grad.norm()), rel=1e-9)
    hits = [(a.step, a.name, a.severity) for a in mon.alerts if a.rule == "lost_skip"]
    assert hits[0] == (3, "layer2.1", "critical")
    assert "since step 3" in next(a.message for a in mon.alerts if a.rule == "lost_skip")
    mon.close()


def test_a_lost_merge_that_comes_back_is_measured_again_and_the_incident_resolves():
    torch.manual_seed(0)
    net = resnet(20, width=4).double()

    def plant(net, mon, step):
        if step in (2, 4):
            set_skip_fault(net, {4: "dropped" if step == 2 else None})

    mon = run(net, 10, plant)  # resolve_after: 5 clear logging steps
    by_step = {r.step: r for r in mon.records}
    assert [bool(by_step[s].lost) for s in range(7)] == [False, False, True, True, False, False, False]
    assert by_step[5].block("skip_share")[4] > 0.05 and mon.describe()[4].lost is None
    inc = [(i.name, i.opened_step, i.resolved_step) for i in mon.incidents if i.rule == "lost_skip"]
    assert inc == [("layer2.1", 2, 8)]  # clear from step 4: resolved after resolve_after=5 clear steps
    mon.close()


class Drop(nn.Module):
    """A residual block that skips itself on some steps (layer drop: ``return x``)."""

    def __init__(self, d=8):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.skip_now = False

    def forward(self, x):
        if self.skip_now:
            return x
        return x + self.fc(torch.tanh(x))


class Net(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.inp, self.a, self.b, self.out = nn.Linear(4, d), Drop(d), Drop(d), nn.Linear(d, 3)

    def forward(self, x):
        return self.out(self.b(self.a(self.inp(x))))


def _vectors(net, steps, before_step):
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    mon = gradwatch.Monitor(net, optimizer=opt, every=1, strict=True)
    for step in range(steps):
        before_step(net, mon, step)
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
        F.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    return mon


def test_a_block_that_passes_its_input_through_on_a_step_is_not_lost():
    torch.manual_seed(0)
    net = Net().double()

    def layer_drop(net, mon, step):
        net.a.skip_now = step % 2 == 1

    mon = _vectors(net, 6, layer_drop)
    assert [b.name for b in mon.describe()] == ["a", "b"] and all(b.lost is None for b in mon.describe())
    assert not any(r.lost for r in mon.records)
    assert not [a for a in mon.alerts if a.rule in ("lost_skip", "skip_collapse")]
    mon.close()


def test_a_module_removed_or_watched_anew_is_not_an_alarm():
    torch.manual_seed(0)
    net = Net().double()

    def change(net, mon, step):
        if step == 2:
            net.a = nn.Identity()  # removed from the model on purpose: its block goes, silently
        if step == 4:
            net.b.forward = lambda x: net.b.fc(torch.tanh(x))  # the user rewrote the block ...
            mon.watch_block(net.b)  # ... and declared it anew

    mon = _vectors(net, 7, change)
    assert not [a for a in mon.alerts if a.rule == "lost_skip"]
    assert "a" not in mon.records[-1].blocks and not mon.records[-1].lost
    mon.close()
