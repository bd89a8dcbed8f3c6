"""Alert rules, the alert record and policies on real training loops: NaN, vanishing, dead layers, resume."""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import read_events, small_batch
from torch import nn

import gradwatch
from gradwatch.alerts import read_alerts
from gradwatch.alerts import (
    DeadLayer,
    DepthTrend,
    Exploding,
    Measurements,
    NonFinite,
    Rule,
    SkipCollapse,
    Vanishing,
    build_rules,
    depth_slope,
    early_ratio,
    early_ratio_shown,
    replay,
)
from gradwatch.alerts.rule import FAR
from gradwatch.measure.layers import layer_kinds
from gradwatch.reference.blocks import resnet


def mlp(depth: int = 4, width: int = 16, act: type[nn.Module] = nn.ReLU, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(8 if i == 0 else width, width), act()]
    layers.append(nn.Linear(width, 3))
    return nn.Sequential(*layers)


def batch(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def train(model, mon, steps, opt=None, on_step=None):
    """The raw loop: backward, mon.step(), optimizer step. Returns the number of steps completed."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05)
    done = 0
    for i in range(steps):
        if on_step is not None:
            on_step(i)
        x, y = batch(i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        mon.step()
        opt.step()
        done += 1
    return done


def nan_grad_at(param: torch.Tensor, step_box: dict, at: int):
    """Make ``param``'s gradient NaN on step ``at`` (a tensor hook: only that layer is hit)."""
    return param.register_hook(lambda g: torch.full_like(g, math.nan) if step_box["i"] == at else g)


def read_alert_texts(log_dir: str) -> dict[str, list[tuple[int, str]]]:
    """The ``alerts/<rule>`` text entries of the run under ``log_dir``, read back with TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    out: dict[str, list[tuple[int, str]]] = {}
    for tag in acc.Tags()["tensors"]:
        if tag.startswith("zz_gradwatch.alerts/"):
            key = tag.removesuffix("/text_summary")
            out[key] = [(e.step, e.tensor_proto.string_val[0].decode("utf-8")) for e in acc.Tensors(tag)]
    return out


# ---------------------------------------------------------------------------------------------- nonfinite
def test_injected_nan_fires_nonfinite_naming_the_layer_with_record_log_and_tensorboard(tmp_path, caplog):
    model = mlp()
    box = {"i": 0}
    nan_grad_at(model[4].weight, box, at=3)
    mon = gradwatch.Monitor(model, log_dir=tmp_path, every=1, strict=True)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        train(model, mon, 6, on_step=lambda i: box.update(i=i))
    mon.close()

    crit = [a for a in mon.alerts if a.rule == "nonfinite"]
    assert len(crit) == 1
    a = crit[0]
    assert isinstance(a, gradwatch.Alert)
    assert (a.severity, a.step, a.name) == ("critical", 3, "4")
    assert math.isnan(a.value) and a.message and a.hint
    # the record: one JSON line per incident event (the summary at close), read back identical
    lines = [json.loads(s) for s in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert [ln["rule"] for ln in lines if ln["event"] == "opened"] == [x.rule for x in mon.alerts]
    assert lines[-1]["event"] == "summary" and lines[-1]["incidents"][0]["rule"] == "nonfinite"
    assert read_alerts(tmp_path / "alerts.jsonl")[0].name == mon.alerts[0].name
    # the gradwatch logger
    assert any("nonfinite" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    # TensorBoard: a count at every logging step (1 at the NaN step) and the text
    ev = read_events(str(tmp_path))
    count = ev["scalars"]["zz_gradwatch.alerts/count"]
    assert set(count) == set(range(6)) and count[3] >= 1 and count[0] == 0
    assert count[3] == sum(1 for x in mon.alerts if x.step == 3)
    texts = read_alert_texts(str(tmp_path))
    tags = gradwatch.sinks.Tags()  # one text tag per rule and severity: critical ones sort first in TEXT
    assert set(texts) == {tags.alert_text(x.rule, x.severity) for x in mon.alerts} | {"zz_gradwatch.alerts/summary"}
    assert "1 incident (1 still open" in texts["zz_gradwatch.alerts/summary"][0][1]
    ((step, text),) = texts["zz_gradwatch.alerts/1_critical/nonfinite"]
    assert step == 3 and text.startswith("**critical** `nonfinite` in `4` — opened at step 3")
    assert a.message in text and a.hint in text


def test_the_alert_record_deleted_with_log_dir_mid_run_is_written_again_with_one_warning(tmp_path, caplog):
    model = mlp()
    nan_at = {1, 8}  # an incident before the deletion, resolved and opened again after it
    run = tmp_path / "run"
    mon = gradwatch.Monitor(model, log_dir=run, every=1, strict=True)
    for i in range(12):
        if i == 4:
            mon.flush()
            shutil.rmtree(run)
            caplog.clear()
        x, y = batch(i)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if i in nan_at:
            model[4].weight.grad.fill_(math.nan)
        with caplog.at_level(logging.INFO, logger="gradwatch"):
            mon.step(i)  # no optimizer: the NaN stays in the gradient it was put in
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        mon.close()

    lines = [json.loads(s) for s in (run / "alerts.jsonl").read_text().splitlines()]
    assert [(ln["event"], ln.get("step")) for ln in lines] == [("resolved", 6), ("opened", 8), ("summary", 11)]
    # "during the run": the incident lines name their flight recording, under this test's tmp_path ("..._deleted_0")
    deleted = [r for r in caplog.records if "deleted during the run" in r.getMessage()]
    assert [r.levelno for r in deleted if r.levelno >= logging.WARNING] == [logging.WARNING]
    assert all(str(run) in r.getMessage() for r in deleted)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and "nonfinite" not in r.getMessage()]


class DefinedBackwards(nn.Module):
    """``late`` is defined before ``early`` but runs after it; ``nan_at`` makes the gradient at ``late``'s output
    NaN (born in backward: it spreads to ``late`` and everything before it, ``early``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.late = nn.Linear(8, 8)
        self.early = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.nan = False

    def forward(self, x):
        h = self.late(torch.relu(self.early(x)))
        if self.nan:
            h.register_hook(lambda g: torch.full_like(g, math.nan))
        return self.head(torch.relu(h))


def test_nonfinite_names_layers_in_forward_order_not_definition_order():
    model = DefinedBackwards()
    mon = gradwatch.Monitor(model, every=1, strict=True, blocks=None)
    hooks = sum(len(mod._forward_pre_hooks) for mod in model.modules())
    train(model, mon, 4, on_step=lambda i: setattr(model, "nan", i == 2))
    mon.close()
    assert hooks == 4  # one-shot recorder on every module (the root too) ...
    assert sum(len(mod._forward_pre_hooks) for mod in model.modules()) == 0  # ... gone after the first step
    (a,) = [x for x in mon.alerts if x.rule == "nonfinite"]
    assert (a.step, a.name) == (2, "early")  # definition order would say "late"
    assert "first in forward order: early" in a.message and "the last is late" in a.message
    # without a recorded order (replay of the history) the definition order is kept
    replayed = [x for x in replay(mon.history(), [NonFinite()], layer_kinds(model)) if x.rule == "nonfinite"]
    assert replayed[0].name == "late"


def test_nonfinite_is_not_raised_for_steps_the_amp_scaler_skips():
    # A fused optimizer under GradScaler: an overflow step is skipped by the scaler and dropped by the monitor.
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True) if _fused_cpu_adam() else None
    if opt is None:
        pytest.skip("no fused Adam on CPU in this torch")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, strict=True)
    box = {"i": 0}
    nan_grad_at(model[0].weight, box, at=1)
    for i in range(3):
        box["i"] = i
        x, y = batch(i)
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    mon.close()
    assert not [a for a in mon.alerts if a.rule == "nonfinite"]
    assert 1 not in set(mon.history().step)


def _fused_cpu_adam() -> bool:
    try:
        m = nn.Linear(2, 2)
        o = torch.optim.Adam(m.parameters(), fused=True)
        m(torch.ones(1, 2)).sum().backward()
        o.step()
        return True
    except (RuntimeError, TypeError):
        return False


# ---------------------------------------------------------------------------------------------- vanishing / dead
def test_deep_sigmoid_mlp_fires_vanishing():
    model = mlp(depth=16, width=32, act=nn.Sigmoid)
    mon = gradwatch.Monitor(model, every=1, strict=True)
    train(model, mon, 4)
    mon.close()
    van = [a for a in mon.alerts if a.rule == "vanishing"]
    # 5e-6 is far (FAR = 5x) past the 0.02 threshold: at once, not after patience (3 logging steps)
    assert van and van[0].step == 0 and van[0].value < 0.02 / FAR
    assert "for " not in van[0].message.split(";")[0]  # no streak claimed on its first step
    assert van[0].severity in ("warning", "critical") and van[0].value < 0.02
    # names the early weight layers (Linear at indices 0, 2, ..., 8 of 16), not the late ones
    assert van[0].name is None and "early layers (0, 2, … 8 (5 in all))" in van[0].message


def test_a_whole_network_with_tiny_gradients_is_told_apart_from_early_layers_that_vanish():
    layers = [f"l{i}" for i in range(8)]
    uniform = step_of(1, layers={"grad_to_weight": (layers, np.full(8, 1e-12))})  # a memorised batch: all ~0
    [a] = Vanishing(patience=1).check(uniform)
    assert a.value == pytest.approx(1e-12) and a.threshold == pytest.approx(1e-7)
    assert "so has the network as a whole" in a.message and "loss is (near) zero" in a.hint
    assert "residual connections" not in a.hint
    deep = step_of(1, layers={"grad_to_weight": (layers, np.array([1e-9] * 2 + [1e-3] * 6))})  # a depth profile
    [b] = Vanishing(patience=1).check(deep)
    assert b.value < 0.02 and "residual connections" in b.hint and "as a whole" not in b.message


def test_healthy_small_relu_mlp_fires_nothing():
    model = mlp(depth=4)
    mon = gradwatch.Monitor(model, every=1, strict=True)
    train(model, mon, 12)
    mon.close()
    assert [a for a in mon.alerts if a.severity != "info"] == []


class ZeroGate(nn.Module):
    """A layer in the graph whose output is multiplied by 0: its gradient is exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 8)

    def forward(self, x):
        return x + 0.0 * self.inner(x)


def gated() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(ZeroGate(), nn.Linear(8, 3))


def test_dead_layer_fires_after_patience_naming_the_layer():
    model = gated()
    mon = gradwatch.Monitor(model, every=1, strict=True, rules={"dead_layer": {"patience": 4}})
    train(model, mon, 5)
    dead = [a for a in mon.alerts if a.rule == "dead_layer"]
    assert [(a.step, a.name) for a in dead] == [(3, "0.inner")]


def test_a_layer_the_optimizer_does_not_move_is_dead_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.0},  # a zero learning rate in one group
                           {"params": model[2].parameters(), "lr": 0.1}], momentum=0.9)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, strict=True)
    for _ in range(4):
        F.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 3, (16,))).backward()
        opt.step()
        opt.zero_grad()
    mon.close()
    dead = [a for a in mon.alerts if a.rule == "dead_layer"]
    assert [(a.step, a.name) for a in dead] == [(2, "0")] and "learning rate of 0" in dead[0].hint
    assert "exactly zero update" in dead[0].message


def test_resume_from_a_checkpoint_keeps_the_streak(tmp_path):
    rules = {"dead_layer": {"patience": 4}}
    model = gated()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = gradwatch.Monitor(model, every=1, rules=rules, alerts_path=tmp_path / "a.jsonl")
    train(model, first, 2, opt)  # half-way through patience
    torch.save({"model": model.state_dict(), "gradwatch": first.state_dict()}, tmp_path / "ckpt.pt")
    first.close()
    assert not first.alerts
    json.dumps(first.state_dict())  # plain data: any checkpoint format can hold it

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = gradwatch.Monitor(model, every=1, rules=rules, alerts_path=tmp_path / "a.jsonl")
    resumed.load_state_dict(ckpt["gradwatch"])
    train(model, resumed, 2, opt)
    resumed.close()
    assert [(a.rule, a.step) for a in resumed.alerts] == [("dead_layer", 3)]  # steps 0, 1 | 2, 3

    fresh = gradwatch.Monitor(model, every=1, rules=rules, alerts_path=False)
    train(model, fresh, 2, opt)
    assert not fresh.alerts  # without the state the streak starts again
    assert [a.step for a in read_alerts(tmp_path / "a.jsonl")] == [3]


# ---------------------------------------------------------------------------------------------- policies
@pytest.mark.parametrize("driven", ["step", "optimizer"])
def test_on_critical_raise_raises_gradient_alarm_into_the_loop(driven):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    box = {"i": 0}
    nan_grad_at(model[2].weight, box, at=2)
    kw = {"optimizer": opt} if driven == "optimizer" else {}
    mon = gradwatch.Monitor(model, every=1, on_critical="raise", **kw)  # strict=False
    with pytest.raises(gradwatch.GradientAlarm) as info:
        for i in range(5):
            box["i"] = i
            x, y = batch(i)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if driven == "step":
                mon.step()
            opt.step()
    assert i == 2
    assert info.value.alert.rule == "nonfinite" and info.value.alert.name == "2"
    assert mon.should_stop and not mon.errors  # raised on purpose, not contained as an error
    mon.close()


def test_on_critical_stop_sets_should_stop_and_warn_does_not():
    for policy, expect in (("stop", True), ("warn", False)):
        model = mlp()
        box = {"i": 0}
        nan_grad_at(model[0].weight, box, at=1)
        mon = gradwatch.Monitor(model, every=1, on_critical=policy)
        steps = 0
        for i in range(4):
            box["i"] = i
            x, y = batch(i)
            F.cross_entropy(model(x), y).backward()
            mon.step()
            model.zero_grad()
            steps += 1
            if mon.should_stop:
                break
        assert mon.should_stop is expect
        assert steps == (2 if expect else 4)
        assert mon.alerts[0].rule == "nonfinite"
        mon.close()


def test_arguments_are_validated():
    model = mlp()
    with pytest.raises(ValueError, match="on_critical"):
        gradwatch.Monitor(model, on_critical="panic")
    with pytest.raises(ValueError, match="unknown rule"):
        gradwatch.Monitor(model, rules={"vanishng": {}})
    with pytest.raises(TypeError, match="vanishing"):
        gradwatch.Monitor(model, rules={"vanishing": {"patiense": 2}})
    with pytest.raises(ValueError, match="patience"):
        Vanishing(patience=0)
    with pytest.raises(TypeError, match="alert_sinks"):
        gradwatch.Monitor(model, alert_sinks=print)
    off = gradwatch.Monitor(model, rules=False, every=1)
    train(model, off, 2)
    assert off.alerts == [] and off.state_dict().get("alerts") is None
    assert [r.name for r in build_rules({"dead_layer": False})] == [
        "nonfinite", "instability", "skip_collapse", "lost_skip", "attenuated_identity", "vanishing", "exploding",
        "depth_trend"]


@pytest.mark.parametrize("bad,error", [
    ({"on_critical": "panic"}, ValueError),
    ({"rules": {"vanishng": {}}}, ValueError),
    ({"remind_steps": -1}, ValueError),
    ({"alert_sinks": print}, TypeError),
    ({"alert_sinks": [42]}, TypeError),
], ids=["on_critical", "rules", "remind_steps", "sinks", "sink"])
def test_bad_alert_argument_leaves_no_events_file_or_writer(tmp_path, bad, error):
    # alert arguments are checked before the SummaryWriter opens: nothing in log_dir, no writer thread left
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(error):
        gradwatch.Monitor(mlp(), log_dir=tmp_path / "run", **bad)
    run_dir = tmp_path / "run"
    assert not run_dir.exists() or not any(run_dir.glob("events.out.tfevents.*"))
    assert [t.name for t in threading.enumerate() if t.ident not in before] == []


# ---------------------------------------------------------------------------------------------- manager
def test_a_failing_sink_or_rule_never_reaches_training_and_the_record_keeps_the_alert(tmp_path, caplog):
    class Broken(Rule):
        name = "broken"

        def check(self, m):
            raise ZeroDivisionError("rule bug")

    def bad_sink(alert):
        raise OSError("sink down")

    model = gated()
    mon = gradwatch.Monitor(model, every=1, alerts_path=tmp_path / "a.jsonl",
                            rules=[Broken(), DeadLayer(patience=1)], alert_sinks=[bad_sink])
    with caplog.at_level(logging.ERROR, logger="gradwatch"):
        assert train(model, mon, 3) == 3
    mon.close()
    assert [a.rule for a in read_alerts(tmp_path / "a.jsonl")] == ["dead_layer"]
    assert any("rule bug" in e for e in mon.errors) and any("sink down" in e for e in mon.errors)


# ---------------------------------------------------------------------------------------------- rules, by hand
def step_of(step, blocks=None, layers=None, whole=None):
    m = Measurements(step=step, kinds={})
    for metric, (names, vals) in (blocks or {}).items():
        m.add(names, metric, np.asarray(vals, dtype=float))
    for metric, (names, vals) in (layers or {}).items():
        m.add(names, metric, np.asarray(vals, dtype=float))
    for metric, v in (whole or {}).items():
        m.add(["_global"], metric, np.array([v]))
    return m


def test_skip_collapse_names_the_block_after_patience():
    rule = SkipCollapse(patience=2)
    names = ["layer1.0", "layer1.1", "layer2.0"]
    fired = []
    for s in range(3):
        fired += rule.check(step_of(s, blocks={"skip_share": (names, [0.3, 1e-8, 0.5])}))
    assert [(a.step, a.name) for a in fired] == [(1, "layer1.1"), (2, "layer1.1")]
    # a healthy step resets the streak
    rule.check(step_of(3, blocks={"skip_share": (names, [0.3, 0.2, 0.5])}))
    assert rule.check(step_of(4, blocks={"skip_share": (names, [0.3, 0.0, 0.5])})) == []


def test_depth_trend_on_block_inputs_and_exploding_spike():
    blocks = [f"b{i}" for i in range(10)]
    decaying = 10.0 ** (0.3 * np.arange(10))  # 10^0.3 per block, larger at the output: 10^2.7 in all
    rule = DepthTrend(patience=2)
    got = [rule.check(step_of(s, blocks={"grad_in": (blocks, decaying)})) for s in range(2)]
    assert got[0] == [] and got[1][0].value == pytest.approx(0.3) and "decays toward the input" in got[1][0].message
    assert got[1][0].severity == "info"  # a profile is context: healthy resnet50s go 100x+ both ways
    growing = DepthTrend(patience=1).check(step_of(0, blocks={"grad_in": (blocks, decaying[::-1])}))
    assert growing[0].severity == "info" and "grows toward the input" in growing[0].message  # BN ResNets at init
    flat = DepthTrend(patience=1).check(step_of(0, blocks={"grad_in": (blocks, np.ones(10))}))
    assert flat == []
    # steep per block but only 10^(0.15*9) = 22x end to end (a shallow healthy net at init): not a trend
    shallow = DepthTrend(patience=1).check(step_of(0, blocks={"grad_in": (blocks, 10.0 ** (-0.15 * np.arange(10)))}))
    assert shallow == []

    spike = Exploding(warmup=3)
    norms = [1, 1.2, 0.9, 1.1, 50.0, 1.0, 60.0, 80.0, 120.0, 5e5]
    found = [spike.check(step_of(s, whole={"grad_norm": g})) for s, g in enumerate(norms)]
    assert sum(map(len, found[:4])) == 0 and found[4][0].value > 10
    assert [f[0].severity if f else None for f in found[4:]] == ["info", None, "info", "info", "warning", "critical"]
    assert "for 3 logging steps" in found[8][0].message  # a spike that lasts is a warning; one step is info


def test_replay_runs_rules_over_a_saved_history():
    model = mlp(depth=16, width=32, act=nn.Sigmoid)
    mon = gradwatch.Monitor(model, every=1, rules=False)
    train(model, mon, 4)
    alerts = replay(mon.history(), {"exploding": False}, layer_kinds(model))
    assert "vanishing" in {a.rule for a in alerts}
    assert NonFinite().check(step_of(0, layers={"grad_norm": (["a", "b"], [1.0, 2.0])})) == []


def test_an_object_with_send_is_an_alert_sink(tmp_path):
    """send(event) for each incident event, flush() and close() when it has them; nothing of the pre-release
    protocol (end_step, flush(timeout)) is called."""

    class SendOnly:
        def __init__(self):
            self.sent, self.calls = [], []

        def send(self, event):
            self.sent.append((event.step, event.kind))

        def end_step(self, step, alerts):
            self.calls.append("end_step")

        def flush(self):
            self.calls.append("flush")

    sink = SendOnly()
    model = gated()
    mon = gradwatch.Monitor(model, every=1, rules=[DeadLayer(patience=1)], alert_sinks=[sink], alerts_path=False)
    train(model, mon, 3)
    mon.close()
    assert sink.sent == [(0, "opened")]  # the open incident is not repeated
    assert sink.calls == ["flush"] and not mon.errors


def test_depth_trend_without_enough_blocks_does_not_fall_back_to_layers_of_mixed_kinds():
    """A 2-layer post-LN BERT: 4 blocks (too few to fit), and layers whose ratios span 4 decades by kind
    (query/key ~4e-5 next to a pooler at 0.33): no profile, no alert."""
    layers = [f"l{i}" for i in range(12)]
    g2w = 10.0 ** np.linspace(-4.4, -0.5, 12)
    blocks = ["layer.0.attention", "layer.0", "layer.1.attention", "layer.1"]
    m = step_of(0, blocks={"grad_in": (blocks, [1.0, 1.1, 0.9, 1.0])}, layers={"grad_to_weight": (layers, g2w)})
    assert depth_slope(m) is None and DepthTrend(patience=1).check(m) == []
    plain = step_of(0, layers={"grad_to_weight": (layers, g2w)})  # no blocks at all: the layer profile
    unit, slope, points = depth_slope(plain)
    assert unit == "layer" and slope > 0.3
    assert DepthTrend(patience=1).check(plain)[0].severity == "info"  # vanishing/exploding judge the harm


def test_layers_of_a_dormant_branch_are_left_out_of_the_early_and_typical_ratios():
    """timm's zero_init_last / torchvision's zero_init_residual: a branch whose last norm starts at 0 gets
    (almost) no gradient until training wakes it; its layers' tiny ratios are by design, not a depth profile."""
    awake = [f"b{i}.conv{j}" for i in range(1, 5) for j in (1, 2)]
    layers = ["stem", "b0.conv1", "b0.conv2", *awake, "fc"]
    g2w = np.array([0.1, 4e-6, 4e-6, *[0.1] * 8, 0.1])
    names = [f"b{i}" for i in range(5)]
    one_asleep = step_of(1, blocks={"skip_share": (names, [1 - 1e-9, 0.4, 0.5, 0.6, 0.7])},
                         layers={"grad_to_weight": (layers, g2w)})
    assert list(np.flatnonzero(one_asleep.dormant())) == [1, 2]
    assert early_ratio(one_asleep).ratio == pytest.approx(1.0)  # stem, b1.conv1, b1.conv2 against the rest
    assert Vanishing(patience=1).check(one_asleep) == []
    live = step_of(1, blocks={"skip_share": (names, [0.3, 0.4, 0.5, 0.6, 0.7])}, layers={"grad_to_weight": (layers, g2w)})
    assert not live.dormant().any() and early_ratio(live).ratio < 1e-4  # the same ratios, branches live: vanishing
    assert Vanishing(patience=1).check(live)[0].severity == "critical"
    # most of the net asleep (a zero-initialised resnet50's first steps): no typical value, no verdict
    most = step_of(1, blocks={"skip_share": (names, [1 - 1e-9] * 4 + [0.5])}, layers={"grad_to_weight": (layers, g2w)})
    assert early_ratio(most) is None and Exploding(spike=None).check(most) == []
    # the statistic is worked out once per step for every rule that asks, and again once the step changes
    most.add(names, "skip_share", [0.3, 0.4, 0.5, 0.6, 0.7])
    assert early_ratio(most).ratio < 1e-4 and not most.dormant().any()


def test_a_module_with_several_merges_is_dormant_only_when_all_of_them_are():
    """A transformer block makes two merges (attention, MLP) and holds the layers of both branches."""
    layers = [f"h.{i}.{part}" for i in range(3) for part in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
    g2w = np.array([0.05, 1.4, 0.09, 0.8] * 3)
    names = [f"h.{i}[{j}]" for i in range(3) for j in (0, 1)]
    attention_quiet = step_of(1, blocks={"skip_share": (names, [0.992, 0.94] * 3)}, layers={"grad_to_weight": (layers, g2w)})
    assert not attention_quiet.dormant().any()
    assert early_ratio(attention_quiet).early == ["h.0.attn.qkv", "h.0.attn.proj", "h.0.mlp.fc"]
    both_quiet = step_of(1, blocks={"skip_share": (names, [0.992, 0.995, 0.992, 0.94, 0.992, 0.94])},
                         layers={"grad_to_weight": (layers, g2w)})
    assert list(np.flatnonzero(both_quiet.dormant())) == [0, 1, 2, 3]  # h.0: both of its merges dormant


def test_gpt2_has_an_early_ratio_at_every_step_and_raises_no_alert():
    """GPT-2's attention branches start with skip_share ~0.992 (dormant) while its MLP branches learn; both
    merges are made by one module per block. grad_to_weight_early was NaN for the whole run."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=3, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = gradwatch.Monitor(model, every=1)
    for step in range(12):
        ids = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(step))
        model(ids, labels=ids).loss.backward()
        mon.step(step)
        opt.step()
        opt.zero_grad()
    mon.close()
    shares = mon.records[0].block("skip_share")
    assert shares[0::2].min() > 0.99 > shares[1::2].max()  # attention merges dormant, MLP merges not: the case
    history = mon.history()
    early = history[history.metric == "grad_to_weight_early"].set_index("step").value
    assert list(early.index) == list(range(12)) and early.between(0.05, 1.0).all()
    assert [a for a in mon.alerts if a.severity != "info"] == []


def test_zero_initialised_residual_branches_raise_no_alert():
    """Our reference ResNet with the last BN of every block zeroed (what zero_init_residual does)."""
    torch.manual_seed(0)
    model = resnet(20)
    for block in model.residual_blocks():
        nn.init.zeros_(block.bn2.weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1)
    for s in range(12):
        x, y = small_batch(n=8, seed=s)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    mon.close()
    assert [a for a in mon.alerts if a.severity != "info"] == []
    assert mon.records[1].block("skip_share").min() > 1 - 1e-4  # the branches were dormant, as planted
    # the rules' early statistic does not exist while the branches learn from ~0, but the health figure does:
    # the fallback over every weight layer with a non-zero ratio (here the stem, the projections, the head)
    m = Measurements.from_record(mon.records[-1], layer_kinds(model), {})
    assert early_ratio(m) is None
    shown = early_ratio_shown(m)
    assert shown is not None and shown.fallback and shown.early[0] == "conv1"
    early = [r.health["grad_to_weight_early"] for r in mon.records]
    assert all(math.isfinite(v) and v > 0 for v in early), early


def test_post_ln_bert_shows_an_early_ratio_without_alerting_on_it():
    """BERT's 0.02-std branches start near-dormant (skip_share ~0.9999 on every merge), which leaves the rules
    no typical layer; the health figure falls back to every weight layer, and no rule reads that fallback."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, num_labels=2,
        vocab_size=1000, max_position_embeddings=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        model(input_ids=torch.randint(0, 1000, (4, 16), generator=g), labels=torch.randint(0, 2, (4,), generator=g)
              ).loss.backward()
        opt.step()
        opt.zero_grad()
    mon.close()
    assert mon.records[0].block("skip_share").min() > 0.999  # near-dormant branches: the case
    m = Measurements.from_record(mon.records[-1], layer_kinds(model), {})
    assert early_ratio(m) is None and early_ratio_shown(m).fallback
    early = [r.health["grad_to_weight_early"] for r in mon.records]
    assert all(0.05 < v < 20 for v in early), early  # every step, a plain number
    assert [a for a in mon.alerts if a.rule in ("vanishing", "exploding") and a.severity != "info"] == []


class SharedAttention(nn.Module):
    """ALBERT's pattern: one pair of projections (``q``, ``k``) run at every depth, its tiny gradients (as a
    query/key's at initialisation) scaled by 1e-4 into a residual stream, then a plain stack."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
        self.stack = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(6)])
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        for _ in range(self.depth):
            x = x + 1e-4 * self.k(self.q(x))
        return self.out(self.stack(x))


@pytest.mark.parametrize("depth", [1, 4])
def test_a_layer_run_at_every_depth_is_not_an_early_layer(depth):
    # Run once, q and k are the net's first layers and their gradients are 1e-4 of the others': vanishing is
    # right. Run at 4 depths (one shared layer, as in ALBERT), they have no single depth: the early layers are
    # the stack's first, and the rule is quiet (the zoo's hf_albert raised vanishing at step 4 before).
    torch.manual_seed(0)
    model = SharedAttention(depth)
    mon = gradwatch.Monitor(model, every=1, strict=True, blocks=None, rules=[Vanishing()])
    train(model, mon, 6)
    mon.close()
    fired = [a for a in mon.alerts if a.rule == "vanishing"]
    if depth == 1:
        assert fired and "q" in fired[0].message and "k" in fired[0].message
    else:
        assert not fired, fired[0].message
