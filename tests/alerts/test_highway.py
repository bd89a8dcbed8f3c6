"""The attenuated_identity rule: a chain of skips that stopped being an identity path (He et al. 2016's
shortcut variants), read from each block's skip gain skip_grad / grad_out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import small_batch

import gradwatch
from gradwatch.alerts import AttenuatedIdentity, Measurements
from gradwatch.alerts.highway import highway
from gradwatch.reference.blocks import resnet, set_shortcut_variant


def chain(step: int, gains, out=1.0, names=None) -> Measurements:
    names = names or [f"layer.{i}" for i in range(len(gains))]
    m = Measurements(step=step, kinds={})
    m.add(names, "grad_out", np.full(len(gains), out))
    m.add(names, "skip_grad", np.asarray(gains, dtype=float) * out)
    return m


def run(rule: AttenuatedIdentity, gains, steps: int = 4) -> list:
    return [a for s in range(steps) for a in rule.check(chain(s, gains))]


def test_identity_chains_and_a_few_projections_are_quiet():
    assert run(AttenuatedIdentity(), [1.0] * 54) == []
    # torchvision's resnet50 at a late step: three projection shortcuts, 10^-0.9 in all
    assert run(AttenuatedIdentity(), [1.08, 1, 1, 0.67, 1, 1, 1, 0.62, 1, 1, 1, 1, 1, 0.33, 1, 1]) == []
    # a net whose every block projects but barely departs (10^0.5 in all): not a broken highway
    assert run(AttenuatedIdentity(), [0.98] * 27 + [0.8] * 5) == []


def test_constant_scaling_fires_after_patience_and_names_the_worst_blocks():
    gains = [0.5] * 27
    gains[3] = 0.25
    alerts = run(AttenuatedIdentity(), gains)
    assert [a.step for a in alerts] == [2, 3]  # patience 3
    a = alerts[0]
    assert (a.rule, a.severity, a.subject) == ("attenuated_identity", "warning", "identity path")
    assert "the identity path is attenuated: 27 of 27 blocks" in a.message and "layer.3 (0.25)" in a.message
    assert a.value == abs(np.log10(gains)).sum()


def test_amplifying_projections_read_as_amplified_and_a_zero_gain_is_left_to_skip_collapse():
    alerts = run(AttenuatedIdentity(), [1.2] * 54)
    assert alerts and "the identity path is amplified" in alerts[0].message
    h = highway(chain(0, [0.0, 1.0, 1.0, 1.0]))
    assert h is not None and not h.off[0] and h.departure == 0  # detached: skip_collapse's finding


def test_a_parallel_residual_block_is_judged_by_its_true_skip():
    """GPT-J / Phi / Falcon: ``x + attn(ln(x)) + mlp(ln(x))`` is found as two merges per block, the sum of the
    two branches (whose "skip" is the MLP: gain ~0.05) and the true skip (gain 1): the block's identity path is
    the latter. Held-out runs read 0.5 of the merges off identity and 10^10 along the chain without this."""
    names = [f"h.{i}[{j}]" for i in range(8) for j in range(2)]
    rule = AttenuatedIdentity()
    assert [a for s in range(4) for a in rule.check(chain(s, [0.05, 1.0] * 8, names=names))] == []
    h = highway(chain(0, [0.05, 1.0] * 8, names=names))
    assert h is not None and h.blocks == [f"h.{i}[1]" for i in range(8)] and not h.off.any()
    # both of a block's merges scaled: its identity path is attenuated, and the rule says so
    rule = AttenuatedIdentity()
    both = [a for s in range(4) for a in rule.check(chain(s, [0.25, 0.25] * 8, names=names))]
    assert both and "8 of 8 blocks" in both[0].message


def test_hysteresis_and_few_blocks():
    rule = AttenuatedIdentity()
    assert run(rule, [0.5] * 12, steps=3)
    # 7 of 12 off identity (above half) keeps it open; back to 3 of 12 clears it
    assert rule.check(chain(3, [0.5] * 7 + [1.0] * 5))
    assert rule.check(chain(4, [0.5] * 3 + [1.0] * 9)) == []
    assert run(AttenuatedIdentity(), [0.01] * 3) == []  # under min_blocks: no chain to judge


def _train(model, steps: int = 3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1)
    for s in range(steps):
        x, y = small_batch(n=8, seed=s)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    mon.close()
    return mon


def test_he_2016_variants_on_a_resnet_56_are_flagged_and_the_identity_is_not():
    """The real blocks: constant scaling and the dropout shortcut flagged at the third logging step, naming
    the identity path; the identity shortcut and shortcut-only gating at b_g = -6 (a near-identity gate) quiet."""
    torch.manual_seed(0)
    for variant in ("constant_scaling", "dropout_shortcut"):
        mon = _train(set_shortcut_variant(resnet(56), variant))
        found = [a for a in mon.alerts if a.rule == "attenuated_identity"]
        assert found and found[0].step == 2, (variant, [str(a) for a in mon.alerts])
        assert "the identity path is attenuated" in found[0].message
    for model in (resnet(56), set_shortcut_variant(resnet(56), "shortcut_only_gating", gate_bias=-6.0)):
        mon = _train(model)
        assert [a for a in mon.alerts if a.rule == "attenuated_identity"] == []


class _Rescaled(torch.nn.Module):
    """``(x + F(x)) / sqrt(2)``: StyleGAN2's discriminator and NCSN++'s ``skip_rescale`` scale after the add."""

    def __init__(self, width: int, before: bool) -> None:
        super().__init__()
        self.f = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, width), torch.nn.GELU(),
                                     torch.nn.Linear(width, width))
        self.before = before

    def forward(self, x):
        if self.before:  # the same function, written as He et al.'s constant scaling: on both operands
            return x / 2 ** 0.5 + self.f(x) / 2 ** 0.5
        return (x + self.f(x)) / 2 ** 0.5


def test_a_rescale_after_the_add_keeps_the_identity_path_one_before_it_does_not():
    """A scaling after the merge is not on the skip (it rescales the residual stream, like a norm after the
    add): 24 such blocks read identity. Written on the operands it is He et al.'s constant scaling at
    1/sqrt(2): 24 blocks at 0.71 compound to 10^-3.6, and the rule says so."""
    fired = {}
    for before in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), *[_Rescaled(16, before) for _ in range(24)],
                                  torch.nn.Linear(16, 3))
        opt = torch.optim.AdamW(net.parameters(), 1e-3)
        mon = gradwatch.Monitor(net, optimizer=opt, every=1)
        g = torch.Generator().manual_seed(0)
        for _ in range(4):
            F.cross_entropy(net(torch.randn(32, 8, generator=g)), torch.randint(0, 3, (32,), generator=g)).backward()
            opt.step()
            opt.zero_grad()
        mon.close()
        fired[before] = [a.rule for a in mon.alerts if a.rule == "attenuated_identity"]
        h = highway(Measurements.from_record(mon.records[-1]))
        assert h is not None and len(h.blocks) == 24
        assert (h.share, h.departure) == ((1.0, pytest.approx(24 * np.log10(2 ** 0.5), rel=1e-3)) if before else (0.0, 0.0))
    assert fired == {False: [], True: ["attenuated_identity"]}
