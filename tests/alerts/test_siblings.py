"""Siblings — modules that read one input tensor — count as one depth in the vanishing/exploding statistic.

An attention's query and key get tiny gradients at initialisation (the logits are the bilinear form q·k: each
one's gradient is scaled by the other's small output), while the value projection beside them, on the same
input, gets a healthy one. Counted as early layers of their own, query and key made a 2-layer OPT's early
median read as vanishing on healthy training; one depth at the group's largest ratio, they do not."""

from __future__ import annotations

import gc
import statistics
import weakref

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.alerts import Measurements, early_ratio
from gradwatch.alerts.rules import Exploding
from gradwatch.alerts.siblings import Siblings
from gradwatch.measure.layers import layer_kinds
from gradwatch.measure.order import ForwardOrder

WIDTH, VOCAB, BLOCKS = 32, 50, 2


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.q, self.k, self.v, self.out = (nn.Linear(WIDTH, WIDTH) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        logits = self.q(h) @ self.k(h).transpose(1, 2) / WIDTH ** 0.5
        return x + self.out(torch.softmax(logits, dim=-1) @ self.v(h))


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class TinyLM(nn.Module):
    """Token embedding, pre-LN attention + MLP blocks, output tied to the embedding; std-0.02 init (GPT/OPT)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.Sequential(*(nn.Sequential(Attention(), Mlp()) for _ in range(BLOCKS)))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.embed(ids)) @ self.embed.weight.T


def qkv(b: int) -> tuple[str, ...]:
    return tuple(f"blocks.{b}.0.{p}" for p in "qkv")


def test_forward_order_groups_the_modules_that_read_one_input():
    model = TinyLM()
    order = ForwardOrder(model)
    x = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        model(x)
    order.finish()
    groups = [set(g) for g in order.siblings]
    for b in range(BLOCKS):  # q, k and v read the attention's LayerNorm output
        assert set(qkv(b)) in groups
    weights = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    together = [g & weights for g in groups if len(g & weights) > 1]
    assert sorted(map(sorted, together)) == sorted(sorted(qkv(b)) for b in range(BLOCKS))  # nothing else


def test_a_tensor_changed_in_place_between_two_reads_makes_no_siblings_and_no_input_is_kept():
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            x.add_(y)  # b reads what a's output made of x: one depth deeper, not a's sibling
            return self.b(x)

    model = InPlace()
    order = ForwardOrder(model)
    x = torch.randn(2, 4)
    alive = weakref.ref(x)
    with torch.no_grad():
        model(x)
    del x
    gc.collect()
    assert alive() is None  # recording siblings kept no reference to the input
    order.finish()
    assert not any({"a", "b"} <= set(g) for g in order.siblings)


def test_siblings_read_before_their_input_changed_are_kept_when_a_later_read_takes_its_place():
    # an input changed in place (or freed, its id then reused by a later tensor) must not erase the siblings
    # already read from it: q, k and v read h, then h changes and u, w read it anew; two groups, not one
    class TwoReads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(4)
            self.q, self.k, self.v, self.u, self.w = (nn.Linear(4, 4) for _ in range(5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.norm(x)
            out = self.q(h) + self.k(h) + self.v(h)
            h.mul_(2.0)
            return out + self.u(h) + self.w(h)

    model = TwoReads()
    order = ForwardOrder(model)
    with torch.no_grad():
        model(torch.randn(2, 4))
    order.finish()
    groups = [set(g) for g in order.siblings]
    assert {"q", "k", "v"} in groups and {"u", "w"} in groups


@pytest.fixture(scope="module")
def lm_run():
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # without block flow: no branch is set aside as dormant (the attention branches start near skip_share
    # 0.99), so every weight layer is in the statistic and the expected value below needs no block figures
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, pictures=0, blocks=None)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids = torch.randint(0, VOCAB, (8, 16), generator=g)
        loss = nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    mon.close()
    return model, mon


def test_an_attention_whose_query_and_key_start_tiny_is_not_vanishing(lm_run):
    model, mon = lm_run
    assert len(mon.records) == 5
    for record in mon.records:
        g2w = dict(zip(record.layers, record.layer("grad_to_weight")))
        q, k, v = (g2w[n] for n in qkv(0))
        assert max(q, k) < 0.05 * v  # the case: query and key ~50x below the value projection
        # counted layer by layer (no siblings), the first quarter of the 12 weight layers is q, k, v of block 0:
        # the early median is k's or q's, and the statistic is below the vanishing rule's 0.02
        alone = early_ratio(Measurements.from_record(record, layer_kinds(model)))
        assert alone is not None and alone.early == list(qkv(0)) and alone.ratio < 0.02
        # one depth per sibling group: an independent computation from the recorded ratios
        depths = []
        for b in range(BLOCKS):
            depths.append(max(g2w[n] for n in qkv(b)))
            depths += [g2w[f"blocks.{b}.0.out"], g2w[f"blocks.{b}.1.fc1"], g2w[f"blocks.{b}.1.fc2"]]
        expected = statistics.median(depths[:2]) / statistics.median(depths)  # ceil(8 / 4) = 2 early depths
        assert record.health["grad_to_weight_early"] == pytest.approx(expected, rel=1e-9)
        assert expected > 0.3
    assert [a for a in mon.alerts if a.rule in ("vanishing", "exploding")] == []


def test_a_plain_deep_mlp_has_no_siblings_and_still_vanishes():
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(16):
        layers += [nn.Linear(8 if i == 0 else 32, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 3))
    order = ForwardOrder(model)
    with torch.no_grad():
        model(torch.randn(4, 8))
    order.finish()
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert all(len(set(g) & linear) < 2 for g in order.siblings)  # each layer reads its own input
    mon = gradwatch.Monitor(model, every=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        mon.step()
        model.zero_grad()
    mon.close()
    assert [a.step for a in mon.alerts if a.rule == "vanishing"][:1] == [0]


def test_hand_fed_siblings_count_once_at_their_largest_ratio():
    # six weight layers: "a", then the siblings q/k/v, then "b", "c"; parameter names take their module's group
    names = ["a.weight", "q.weight", "k.weight", "v.weight", "b.weight", "c.weight"]
    m = Measurements(step=0, kinds={}, siblings=Siblings([("q", "k", "v")], modules=["a", "q", "k", "v", "b", "c"]))
    m.add(names, "grad_to_weight", [1.0, 0.001, 0.002, 0.5, 2.0, 4.0])
    found = early_ratio(m)
    # depths: a 1.0, {q,k,v} 0.5, b 2.0, c 4.0 -> early (ceil(4 / 4) = 1 depth) 1.0, typical median 1.5
    assert found is not None and found.early == ["a.weight"]
    assert found.typical == pytest.approx(1.5) and found.ratio == pytest.approx(1.0 / 1.5)
    two = early_ratio(m, early=0.5)  # two early depths: a and the group, every member named
    assert two is not None and two.early == names[:4] and two.early_median == pytest.approx(0.75)


def test_exploding_reads_siblings_at_their_smallest_ratio_so_one_loud_sibling_is_not_a_flooded_depth():
    # four depths, the first (the early one) {q, k, v}; only v is far above the network (a 2-layer OPT near its
    # stability edge): at its largest the depth reads 30x the typical value, past Exploding's 20x
    names = ["q.weight", "k.weight", "v.weight", "b.weight", "c.weight", "d.weight"]
    sib = Siblings([("q", "k", "v")], modules=["q", "k", "v", "b", "c", "d"])
    m = Measurements(step=0, kinds={}, siblings=sib)
    m.add(names, "grad_to_weight", [0.05, 0.08, 3.0, 0.1, 0.1, 0.1])
    assert early_ratio(m).ratio == pytest.approx(30.0)  # the vanishing side: the best-fed sibling
    assert early_ratio(m, agree="min").ratio == pytest.approx(0.5)  # the exploding side: the least-fed one
    with pytest.raises(ValueError, match="agree"):
        early_ratio(m, agree="median")
    rule, fired = Exploding(), []
    for step in range(5):  # five logging steps: past the rule's patience and its warm-up of spikes
        one = Measurements(step=step, kinds={}, siblings=sib)
        one.add(names, "grad_to_weight", [0.05, 0.08, 3.0, 0.1, 0.1, 0.1])
        fired += rule.check(one)
    assert fired == []
    # the same values with v's siblings as loud as v: every layer of the depth agrees, and it fires
    loud = Exploding()
    for step in range(5):
        one = Measurements(step=step, kinds={}, siblings=sib)
        one.add(names, "grad_to_weight", [3.0, 3.0, 3.0, 0.1, 0.1, 0.1])
        fired += loud.check(one)
    assert fired and fired[-1].rule == "exploding"


def test_exploding_needs_half_the_early_depths_flooded_one_loud_depth_is_not_the_early_layers():
    # eight depths, two of them early (ceil(8 / 4)): a post-LN GPT-1, whose first attention projection reads
    # ~35x the network's median (its LayerNorm divides the small embedding stream by its scale), the other early
    # depth ~5x. np.median of the two read 20x, the rule's threshold; the lower median reads 5x
    names = [f"l{i}.weight" for i in range(8)]
    values = [0.05, 0.35, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01]
    m = Measurements(step=0, kinds={})
    m.add(names, "grad_to_weight", values)
    assert early_ratio(m).ratio == pytest.approx(20.0)  # the vanishing side (and the health figure): the median
    assert early_ratio(m, agree="min").ratio == pytest.approx(5.0)  # the exploding side: half must read it
    quiet, fired = Exploding(), []
    for step in range(5):
        one = Measurements(step=step, kinds={})
        one.add(names, "grad_to_weight", [v * 1.2 for v in values[:2]] + values[2:])  # 24x by the median
        fired += quiet.check(one)
    assert fired == []
    loud = Exploding()  # both early depths flooded: it fires on the third logging step
    for step in range(5):
        one = Measurements(step=step, kinds={})
        one.add(names, "grad_to_weight", [0.3, 0.35] + values[2:])
        fired += loud.check(one)
    assert fired and fired[0].rule == "exploding" and fired[0].step == 2
