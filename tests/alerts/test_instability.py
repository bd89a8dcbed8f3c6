"""The instability rule on measurements fed by hand: what fires it (a layer's update and gradient growing
together with the whole model's gradient), what does not (a learning-rate warm-up, one noisy batch, one layer's
swing under a flat whole-model gradient), the layers it names, its checkpoint, and
skip_collapse leaving an exploded branch to it. The rule on real training runs: tests/reference/test_instability.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradwatch.alerts import Measurements, SkipCollapse, build_rules
from gradwatch.alerts.rules import RULES
from gradwatch.alerts.instability import Instability

LAYERS = ["emb", "a.qkv", "a.proj", "m.fc1", "m.fc2", "head"]
KINDS = {"emb": "embedding", **{n: "weight" for n in LAYERS[1:]}}


def step(t: int, update: dict[str, float] | float = 2e-2, grad: dict[str, float] | float = 1.0,
         branch: float = 1.0, skip: float = 1.0, whole: float | None = None,
         weight: dict[str, float] | None = None) -> Measurements:
    """One logging step; ``whole``: the monitor's whole-model gradient norm (``_global``), else the rule takes
    the root sum of squares of the layers'."""
    m = Measurements(step=t, kinds=KINDS)
    if whole is not None:
        m.add(["_global"], "grad_norm", [whole])
    u = [update.get(n, 2e-2) if isinstance(update, dict) else update for n in LAYERS]
    g = [grad.get(n, 1.0) if isinstance(grad, dict) else grad for n in LAYERS]
    noise = 1 + 0.05 * np.sin(np.arange(len(LAYERS)) + t)  # a little batch-to-batch wobble
    m.add(LAYERS, "update_to_weight", np.array(u) * noise)
    m.add(LAYERS, "grad_norm", np.array(g) * noise)
    if weight is not None:
        m.add(LAYERS, "weight_norm", [weight.get(n, 10.0) for n in LAYERS])
    m.add(["b[0]", "b[1]"], "branch_grad", [branch, 1.0])
    m.add(["b[0]", "b[1]"], "skip_grad", [skip, 1.0])
    share = skip ** 2 / (skip ** 2 + branch ** 2)
    m.add(["b[0]", "b[1]"], "skip_share", [share, 0.5])
    return m


def run(rule, measurements):
    return [(m.step, rule.check(m), dict(m.context)) for m in measurements]


def test_a_layer_whose_update_and_gradient_grow_together_is_warned_about_naming_it_first():
    rule = Instability(window=10, patience=2)
    steps = [step(t) for t in range(20)]
    steps += [step(t, update={"a.qkv": 6e-2}, grad={"a.qkv": 6.0}) for t in range(20, 22)]
    steps += [step(t, update={"a.qkv": 8e-2, "m.fc1": 6e-2}, grad={"a.qkv": 8.0, "m.fc1": 5.0}) for t in range(22, 26)]
    fired = [(t, found) for t, found, _ in run(rule, steps) if found]
    assert fired[0][0] == 21  # growth from step 20 (the whole model's gradient 2.6x), held for patience = 2
    first = fired[0][1][0]
    assert first.rule == "instability" and first.severity == "warning" and first.name == "a.qkv"
    assert "a.qkv (update 3" in first.message and "since step 20" in first.message
    assert "qk-layernorm" in first.hint and "lower the peak learning rate" in first.hint
    later = fired[-1][1][0].message
    assert later.index("a.qkv") < later.index("m.fc1")  # the layer that moved first is named first


def test_a_warm_up_growing_every_update_and_one_noisy_batch_are_quiet():
    rule = Instability(window=10)
    warm = [step(t, update=2e-3 * (t + 1)) for t in range(60)]  # lr warm-up: updates x60, gradients flat
    noisy = [step(t, grad=10.0 if t == 70 else 1.0, update=0.12) for t in range(60, 90)]  # one bad batch
    assert all(not found for _, found, _ in run(rule, warm + noisy))


def test_the_output_layer_moving_first_points_at_z_loss_and_all_at_once_at_the_data():
    rule = Instability(window=10)
    out = run(rule, [step(t) for t in range(15)] + [step(t, update={"head": 0.1}, grad={"head": 5.0})
                                                     for t in range(15, 18)])
    assert "z-loss" in out[-1][1][0].hint
    rule = Instability(window=10)
    out = run(rule, [step(t) for t in range(15)] + [step(t, update=0.1, grad=5.0) for t in range(15, 18)])
    assert "check the data at step 15" in out[-1][1][0].hint


def test_skip_collapse_leaves_a_block_whose_branch_exploded_to_the_instability():
    # the branch of b[0] grows 100x against its skip once the instability warning is open: skip_share ~1e-4
    rules = [Instability(window=10), SkipCollapse()]  # in RULES order: instability first
    seq = [step(t) for t in range(20)]
    seq += [step(t, update=0.1, grad=5.0, branch=100.0 if t >= 23 else 1.0) for t in range(20, 32)]
    told = []
    for m in seq:
        for r in rules:
            told += [(a.rule, a.step) for a in r.check(m)]
        if m.step >= 23:
            assert m.context["unstable_blocks"] == {"b[0]"}
    assert ("instability", 21) in told and not [x for x in told if x[0] == "skip_collapse"]
    # the same collapse with no instability behind it is the architectural fault skip_collapse reports
    alone = SkipCollapse()
    found = [a for t in range(5) for a in alone.check(step(t, branch=100.0))]
    assert [a.name for a in found] == ["b[0]", "b[0]", "b[0]"]


def test_state_survives_a_json_checkpoint_mid_growth():
    a, b = Instability(window=10), Instability(window=10)
    seq = [step(t) for t in range(20)] + [step(t, update={"a.proj": 0.1}, grad={"a.proj": 5.0}) for t in (20, 21)]
    for m in seq[:21]:
        a.check(m)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [x.message for x in a.check(seq[21])] == [x.message for x in b.check(seq[21])] != []


@pytest.mark.parametrize("kw", [{"window": 1}, {"update_growth": 1.0}, {"grad_growth": 0.5}, {"patience": 0},
                                {"inflate": 1.5}, {"inflate": 0}, {"inflate_share": 0}, {"inflate_window": 0},
                                {"falling": 0}, {"falling_window": 0}, {"inflate_from": 0}, {"risen": 0}, {"risen_window": 1}])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError):
        Instability(**kw)


def test_it_is_on_by_default_and_runs_before_skip_collapse():
    names = [r.name for r in build_rules(None)]
    assert "instability" in names and names.index("instability") < names.index("skip_collapse")
    assert "instability" not in [r.name for r in build_rules({"instability": False})]
    assert list(RULES).index("instability") < list(RULES).index("skip_collapse")


def test_the_same_growth_at_steps_under_two_percent_of_the_weight_is_quiet():
    # what healthy training looks like (updates ~1e-3 of the weight) growing as a runaway would: not one
    rule = Instability(window=10)
    steps = [step(t, update=1e-3) for t in range(20)]
    steps += [step(t, update={"a.qkv": 3e-3, "m.fc1": 3e-3}, grad={"a.qkv": 4.0, "m.fc1": 5.0}) for t in range(20, 30)]
    assert all(not found for _, found, _ in run(rule, steps))
    # the same values 20x larger (2e-2 -> 6e-2 of the weight per step): warned
    rule = Instability(window=10)
    steps = [step(t) for t in range(20)]
    steps += [step(t, update={"a.qkv": 6e-2, "m.fc1": 6e-2}, grad={"a.qkv": 4.0, "m.fc1": 5.0}) for t in range(20, 30)]
    assert [t for t, found, _ in run(rule, steps) if found][0] == 21


def sgd_like(t: int, grad: dict[str, float] | None = None, adaptive: bool = False) -> Measurements:
    """Layers whose gradients differ 100x; SGD's update is lr x gradient (one step per unit gradient), an
    adaptive one the same size whatever the gradient."""
    g = np.array([1.0, 0.1, 0.01, 0.5, 0.05]) * (1 + 0.05 * np.sin(np.arange(5) + t))
    for i, n in enumerate(LAYERS[1:]):
        g[i] *= (grad or {}).get(n, 1.0)
    u = np.full(5, 0.03) if adaptive else 0.03 * g / g.mean()
    m = Measurements(step=t, kinds=KINDS)
    m.add(LAYERS[1:], "update_to_weight", u)
    m.add(LAYERS[1:], "grad_norm", g)
    m.add(LAYERS[1:], "weight_norm", np.ones(5))
    return m


def test_an_update_that_follows_the_gradient_is_left_to_the_gradient_rules():
    # under SGD "the update grew with the gradient" is one fact counted twice: a noisy batch lifts both alike
    def grown(adaptive):
        rule = Instability(window=10)
        seq = [sgd_like(t, adaptive=adaptive) for t in range(20)]
        seq += [sgd_like(t, {"a.qkv": 4.0}, adaptive) for t in range(20, 24)]
        if adaptive:  # the adaptive update grows too, by less than the gradient
            for m in seq[20:]:
                m.layer["update_to_weight"][0] *= 2.0
        return [t for t, found, _ in run(rule, seq) if found]

    assert grown(adaptive=False) == []
    assert grown(adaptive=True) == [21, 22, 23]


def test_a_residual_branch_knocked_quiet_is_warned_about_naming_it():
    # the branch 20x below its level while the model's gradient doubles (the layers' updates where they were)
    rule = Instability(window=10, patience=2)
    seq = [step(t) for t in range(20)] + [step(t, branch=0.05, grad=2.5) for t in range(20, 24)]
    fired = [(t, found[0]) for t, found, _ in run(rule, seq) if found]
    assert [t for t, _ in fired] == [21, 22, 23]
    first = fired[0][1]
    assert first.name == "b[0]" and "b[0] (20x, since step 20)" in first.message and "went quiet" in first.message
    assert "the whole model's gradient at 2.5x its median over the last 10 logging steps" in first.message
    assert "lower the peak learning rate" in first.hint
    # 5x below is within a branch's wander: quiet
    rule = Instability(window=10, patience=2)
    seq = [step(t) for t in range(20)] + [step(t, branch=0.2, grad=2.5) for t in range(20, 24)]
    assert not [t for t, found, _ in run(rule, seq) if found]
    # the same 20x drop with the model's gradient where it was: no runaway behind it, quiet
    rule = Instability(window=10, patience=2)
    seq = [step(t) for t in range(20)] + [step(t, branch=0.05) for t in range(20, 24)]
    assert not [t for t, found, _ in run(rule, seq) if found]


def test_a_layer_growing_while_the_whole_model_gradient_stays_put_is_quiet():
    # a runaway raises the whole model's gradient; one layer's swing under a flat _global norm is not one
    def fired(whole_after):
        rule = Instability(window=10, patience=2)
        seq = [step(t, whole=10.0) for t in range(20)]
        seq += [step(t, update={"a.qkv": 8e-2}, grad={"a.qkv": 6.0}, whole=whole_after) for t in range(20, 24)]
        return [t for t, found, _ in run(rule, seq) if found]

    assert fired(10.0) == [] and fired(18.0) == []  # flat, or 1.8x: under runaway (2x, round 3)
    assert fired(25.0) == [21, 22, 23]
    # (the layers' own root sum of squares grows 2.6x here: fired(10.0) == [] shows the _global norm is what is read)


def test_skip_collapse_leaves_a_skip_that_passes_the_gradient_at_identity_gain():
    # an identity skip (skip_grad == grad_out) beside a branch 300x larger: skip_share ~1e-5, the skip intact
    def m(t, skip):
        x = Measurements(step=t)
        x.add(["b"], "grad_out", [1.0])
        x.add(["b"], "skip_grad", [skip])
        x.add(["b"], "branch_grad", [300.0])
        x.add(["b"], "skip_share", [skip ** 2 / (skip ** 2 + 300.0 ** 2)])
        return x

    intact = SkipCollapse()
    assert [a for t in range(6) for a in intact.check(m(t, 1.0))] == []
    scaled = SkipCollapse()  # the same share with the skip scaled by 1e-4 (gain 1e-4): the fault it is for
    assert [a.step for t in range(6) for a in scaled.check(m(t, 1e-4))] == [2, 3, 4, 5]


def test_the_whole_model_gradient_held_high_for_five_logging_steps_is_warned_about():
    # round 3: no layer grows beyond its own scatter, but the model's gradient stays 1.8x its median over the
    # last 50 logging steps (climb 1.75x) for 5 logging steps at large steps: the slow road to a spike
    def fired(level, steps, update=2e-2, rule=None):
        rule = rule or Instability()
        seq = [step(t, whole=10.0, update=update) for t in range(50)]
        seq += [step(t, whole=level, update=update) for t in range(50, 50 + steps)]
        seq += [step(t, whole=10.0, update=update) for t in range(50 + steps, 60 + steps)]
        return [(t, found[0]) for t, found, _ in run(rule, seq) if found]

    told = fired(18.0, 8)
    assert [t for t, _ in told][:4] == [54, 55, 56, 57]  # from step 50, the fifth logging step in a row
    first = told[0][1]
    assert first.rule == "instability" and first.name is None and first.value == pytest.approx(1.8)
    assert "stayed above 1.75x its median over the last 50 logging steps since step 50 (now 1.8x)" in first.message
    assert "lower the peak learning rate" in first.hint
    assert fired(18.0, 4) == []  # four logging steps: a rough patch, not a climb
    assert fired(16.0, 8) == []  # 1.6x: under climb
    assert fired(18.0, 8, update=1e-3) == []  # healthy step sizes (0.1% of the weight): nothing to run away
    # the numbers are settings: a shorter window and patience judge sooner
    assert [t for t, _ in fired(18.0, 8, rule=Instability(climb_window=20, sustained=3))][0] == 52


def test_the_layers_whose_gradient_grew_most_are_named_in_a_climb():
    rule = Instability()
    seq = [step(t, whole=10.0) for t in range(50)]
    seq += [step(t, whole=18.0, grad={"m.fc2": 2.2, "a.proj": 1.8}) for t in range(50, 55)]
    told = [found[0] for _, found, _ in run(rule, seq) if found]
    assert told and told[0].threshold == 1.75
    said = told[0].message
    assert "most in m.fc2 (2" in said and "a.proj (1." in said and said.index("m.fc2") < said.index("a.proj")


def test_three_layers_growing_at_once_need_the_model_gradient_at_one_and_a_half_one_layer_at_two():
    # a runaway spreads; a near-edge swing is one layer at a time (round 3: `together`, `runaway`)
    def fired(layers, whole):
        rule = Instability(window=10)
        seq = [step(t, whole=10.0) for t in range(20)]
        seq += [step(t, update={n: 6e-2 for n in layers}, grad={n: 4.0 for n in layers}, whole=whole)
                for t in range(20, 24)]
        return [t for t, found, _ in run(rule, seq) if found]

    three = ["a.qkv", "a.proj", "m.fc1"]
    assert fired(three, 16.0) == [21, 22, 23]
    assert fired(three[:2], 16.0) == [] and fired(three[:1], 16.0) == []
    assert fired(three[:1], 25.0) == [21, 22, 23]
    assert fired(three, 14.0) == []  # 1.4x: under grad_growth, however many layers


def test_weights_that_grow_by_the_length_of_their_steps_are_warned_about():
    # round 4: every step scales the weight up (the logit growth before a spike): log|w| grows by the summed
    # update_to_weight. Steps of 4% of the weight across it (a random walk: the norm stays) are the control
    adam = {n: 10.0 ** (i - 2) for i, n in enumerate(LAYERS)}  # the same steps whatever the gradient: Adam's

    def fired(inflating, grow=1.04, update=4e-2, every=1, rule=None):
        rule = rule or Instability()
        seq = [step(t * every, update={n: update for n in LAYERS}, grad=adam,
                    weight={n: 10.0 * (grow ** (t * every) if n in inflating else 1.0) for n in LAYERS})
               for t in range(45)]
        return [(t, found[0]) for t, found, _ in run(rule, seq) if found]

    told = fired(["a.qkv", "a.proj"])  # 2 of the 5 weight layers: a quarter or more (inflate_share)
    assert [t for t, _ in told][0] == 32  # judged from the 30th logging step (inflate_from), held 3 (inflate_patience)
    first = told[0][1]
    assert first.rule == "instability" and first.name is None and first.threshold == 0.9
    # 0.98 of each step grows the weight (the fixture wobbles each update by up to 5%)
    assert first.value == pytest.approx(np.log(1.04) / 0.04, rel=0.02)
    assert "the weights inflate: in 2 of 5 weight layers" in first.message and "since step 30" in first.message
    named = first.message.split("most in ")[1]
    assert "a.qkv (0.9" in named and "a.proj (0.9" in named
    assert "weight decay" in first.hint and "qk-layernorm" in first.hint
    assert fired([]) == []  # the same steps across the weight
    assert fired(["a.qkv"]) == []  # one layer of five: under a quarter
    assert fired(["a.qkv", "a.proj"], grow=1.02) == []  # half of each step into the norm: 0.5 < 0.9
    assert fired(["a.qkv", "a.proj"], grow=1.001, update=1e-3) == []  # healthy step sizes: nothing to run away
    # logging every 5 steps: each logged update stands for the 5 steps to the next log, the same share
    assert [t for t, _ in fired(["a.qkv", "a.proj"], every=5)][0] == 32 * 5
    assert [t for t, _ in fired(["a.qkv", "a.proj"], rule=Instability(inflate_patience=1))][0] == 30
    assert [t for t, _ in fired(["a.qkv", "a.proj"], rule=Instability(inflate_from=20))][0] == 22  # round 6's trial


def test_the_inflation_state_survives_a_json_checkpoint():
    a, b = Instability(), Instability()
    seq = [step(t, update=4e-2, grad={n: 10.0 ** (i - 2) for i, n in enumerate(LAYERS)},
                weight={"a.qkv": 10 * 1.04 ** t, "a.proj": 10 * 1.04 ** t}) for t in range(34)]
    for m in seq[:32]:
        a.check(m)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for m in seq[32:]:
        assert [x.message for x in a.check(m)] == [x.message for x in b.check(m)] != []


def test_a_climb_while_the_loss_falls_is_held_back_until_it_stops_falling():
    # round 4: a gradient that climbs as the model leaves a plateau (Gemma 2 at a usual 1e-3) is learning, not a
    # runaway; the loss given to the monitor (Measurements.loss) tells them apart (2% in round 4, 1% since
    # round 7). Without a loss: as before
    def fired(losses):
        rule = Instability()
        seq = [step(t, whole=10.0) for t in range(50)] + [step(t, whole=18.0) for t in range(50, 75)]
        for t, m in enumerate(seq):
            m.loss = None if losses is None else losses(t)
        return [t for t, found, _ in run(rule, seq) if found]

    assert fired(None)[0] == 54 and fired(lambda t: 3.0)[0] == 54  # no loss, or a flat one: the climb
    assert fired(lambda t: 4.0 - 0.02 * t) == []  # falling 1% and more over 10 logging steps: held back
    # the loss stops falling at step 55: the median of its last 10 is within 1% of the 10 before at step 69
    assert fired(lambda t: 4.0 - 0.02 * min(t, 55))[0] == 69
    assert fired(lambda t: 4.0 - 0.003 * t)[0] == 54  # falling under 1% per 10 logging steps: not held back
    # a warning already open is not held back by a loss that then falls
    late = fired(lambda t: 3.0 if t < 56 else 3.0 - 0.1 * (t - 56))
    assert late[:3] == [54, 55, 56] and late[-1] == 74


def test_a_loss_that_climbs_half_a_nat_above_its_best_at_large_steps_is_warned_about():
    # round 7: post-LN models (GPT-1, a BERT decoder) climb back to chance with no layer's signal growing first;
    # the loss's level (median of its last 20 logging steps) half a nat above the best it reached is the warning
    def fired(losses, update=4e-2, **kw):
        rule = Instability(**{"risen": 0.5, **kw})
        seq = [step(t, update=update, whole=10.0) for t in range(130)]
        for t, m in enumerate(seq):
            m.loss = losses(t)
        return [(t, found[0]) for t, found, _ in run(rule, seq) if found]

    def climb(top):  # down to 2.0 by step 20, flat, then up 0.02 per step from step 60, to 2.0 + top
        return lambda t: max(2.0, 3.0 - 0.05 * t) if t < 60 else min(2.0 + 0.02 * (t - 60), 2.0 + top)

    got = fired(climb(2.0))
    # the level (median of 20) passes 2.5 at step 95; held for patience (2) logging steps
    assert got[0][0] == 96 and got[0][1].rule == "instability" and got[0][1].severity == "warning"
    assert "the training loss has climbed 0.5" in got[0][1].message and "since step 95" in got[0][1].message
    assert "lower the peak learning rate" in got[0][1].hint
    assert got[0][1].threshold == 0.5 and "0.5 counts as a climb" in got[0][1].message  # the bar it used
    assert fired(climb(0.45)) == []  # a drift short of half a nat: quiet
    assert fired(climb(2.0), update=1e-3) == []  # small steps: no runaway to warn of
    assert fired(climb(2.0), risen=None) == []  # off
    assert fired(lambda t: 2.0 if t % 25 else 40.0) == []  # single bad batches do not move the median
    # the loss's history is checkpointed with the rule: resumed at step 90, the same warning at step 96
    a, b = Instability(risen=0.5), Instability(risen=0.5)
    seq = [step(t, update=4e-2, whole=10.0) for t in range(100)]
    for t, m in enumerate(seq):
        m.loss = climb(2.0)(t)
    for m in seq[:90]:
        a.check(m)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [bool(b.check(m)) for m in seq[90:]] == [t >= 96 for t in range(90, 100)]


def test_the_loss_climb_is_judged_at_a_tenth_of_the_loss_scale_at_least():
    # a loss in the thousands (a regression) wobbles by far more than half a unit: the bar is a tenth of its level
    def found(scale, top):
        rule = Instability(risen=0.5)
        seq = [step(t, update=4e-2, whole=10.0) for t in range(130)]
        for t, m in enumerate(seq):  # flat, then climbs to (1 + top) x its level from step 60
            m.loss = scale * (1.0 + min(top, 0.01 * max(0, t - 60)))
        return [(t, got[0]) for t, got, _ in run(rule, seq) if got]

    def fired(scale, top):
        return [t for t, _ in found(scale, top)]

    assert fired(1000.0, 0.05) == []  # 50 units up: under a tenth of 1000
    assert fired(1000.0, 0.3)[0] > 60  # 300 up: over it
    # the incident reports the bar it judged by, a tenth of the level, not `risen`
    assert found(1000.0, 0.3)[0][1].threshold == 100.0
    assert fired(2.0, 0.2) == [] and fired(2.0, 0.3)[0] > 60  # a cross-entropy at 2: half a nat is the bar


def test_the_loss_climb_is_judged_against_the_noise_of_the_loss():
    # the zoo's image models at batch 8 lose 0.4-20 nats a batch (ResNeXt-50): their 20-step median wanders by
    # more than half a nat with nothing going wrong; the bar is 4 standard errors of the level there
    noise = np.random.default_rng(0).exponential(3.0, 130)

    def fired(climb):
        rule = Instability(risen=0.5)
        seq = [step(t, update=4e-2, whole=10.0) for t in range(130)]
        for t, m in enumerate(seq):
            m.loss = 1.0 + noise[t] + climb * max(0, t - 60) / 70
        return [t for t, found, _ in run(rule, seq) if found]

    assert fired(0.0) == []  # noise alone
    assert fired(1.0) == []  # a nat's climb under this noise: not told apart from it
    assert fired(12.0)[0] > 60  # a climb well past the noise
