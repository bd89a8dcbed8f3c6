"""Options are checked once, in one place, with one rule: TypeError for a wrong type, ValueError for a wrong
value, never a silent coercion; Monitor and the Lightning callback share the check."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.reference.blocks import resnet

BAD = [
    ({"every": "3"}, TypeError),
    ({"every": 2.0}, TypeError),
    ({"every": True}, TypeError),
    ({"every": 0}, ValueError),
    ({"alert_cooldown": "3"}, TypeError),
    ({"alert_cooldown": -1}, ValueError),
    ({"granularity": 1}, TypeError),
    ({"granularity": "block"}, ValueError),
    ({"include": 3}, TypeError),
    ({"include": [3]}, TypeError),
    ({"exclude_types": [int]}, TypeError),
    ({"exclude_types": 3}, TypeError),
    ({"track_updates": 1}, TypeError),
    ({"histograms": None}, TypeError),
    ({"strict": "yes"}, TypeError),
    ({"prefix": 1}, TypeError),
    ({"sync_ranks": 1}, TypeError),
    ({"on_critical": "panic"}, ValueError),
    ({"on_critical": 1}, TypeError),
    ({"rules": "nonfinite"}, TypeError),
    ({"rules": {"nope": {}}}, ValueError),
    ({"rules": {"vanishing": {"patience": "3"}}}, TypeError),
    ({"rules": {"vanishing": {"patience": 0}}}, ValueError),
    ({"alert_sinks": print}, TypeError),
    ({"alert_sinks": [42]}, TypeError),
    ({"alerts_path": True}, TypeError),
    ({"blocks": "some"}, ValueError),
    ({"blocks": nn.Linear(2, 2)}, TypeError),
    ({"blocks": [3]}, TypeError),
    ({"sinks": [object()]}, TypeError),
    ({"no_such_option": 1}, TypeError),
]


@pytest.mark.parametrize("kwargs, exc", BAD, ids=[next(iter(k)) + "=" + repr(next(iter(k.values())))[:20] for k, _ in BAD])
def test_a_bad_option_fails_the_same_way_in_the_config_the_monitor_and_the_callback(kwargs, exc):
    name = next(iter(kwargs))
    with pytest.raises(exc, match=re.escape(name if name != "rules" else "rule")):
        gradwatch.Config.from_options(**kwargs)
    with pytest.raises(exc):
        gradwatch.Monitor(resnet(8, width=4), **kwargs)
    lightning = pytest.importorskip("gradwatch.integrations.lightning")
    with pytest.raises(exc):
        lightning.GradWatchCallback(**kwargs)


def test_a_bad_option_opens_nothing(tmp_path):
    with pytest.raises(ValueError):
        gradwatch.Monitor(resnet(8, width=4), log_dir=tmp_path / "run", on_critical="panic")
    assert not (tmp_path / "run").exists()


def test_options_are_grouped_and_kept_as_given():
    cfg = gradwatch.Config.from_options(every=5, include="layer1.*", exclude_types=nn.BatchNorm2d,
                                        on_critical="stop", prefix="gw/")
    assert cfg.output.every == 5 and cfg.output.prefix == "gw/"
    assert cfg.measure.include == ("layer1.*",) and cfg.measure.exclude_types == (nn.BatchNorm2d,)
    assert cfg.alerts.on_critical == "stop" and cfg.alerts.enabled
    assert cfg.options()["every"] == 5
    derived = cfg.replace(every=7)
    assert derived.output.every == 7 and cfg.output.every == 5 and derived.measure == cfg.measure
    assert not gradwatch.Config.from_options(rules=False).alerts.enabled


def test_monitor_keeps_its_documented_keyword_arguments_and_takes_a_config():
    model = resnet(8, width=4)
    mon = gradwatch.Monitor(model, every=3, granularity="parameter", include=["conv1", "fc"], histograms=False,
                            rules=False, blocks=None)
    assert mon.every == 3 and mon.layer_names == ["conv1.weight", "fc.weight", "fc.bias"]
    assert mon.config.output.histograms is False and mon.alerts == []
    cfg = gradwatch.Config.from_options(every=4, blocks=None)
    mon2 = gradwatch.Monitor(model, config=cfg, every=6)  # options override the config
    assert mon2.every == 6 and mon2.config.measure.blocks is None
    with pytest.raises(TypeError, match="Config"):
        gradwatch.Monitor(model, config={"every": 3})
    mon.close()
    mon2.close()


def test_blocks_read_any_iterable_once_and_must_belong_to_the_model():
    model = resnet(8, width=4)
    blocks = (b for b in [model.layer1[0]])
    mon = gradwatch.Monitor(model, blocks=blocks)
    assert mon.config.measure.blocks == (model.layer1[0],)
    mon.close()
    with pytest.raises(ValueError, match="not a submodule"):
        gradwatch.Monitor(model, blocks=[nn.Linear(2, 2)])


def test_step_numbers_are_whole_numbers_and_a_bad_one_never_breaks_the_loop():
    model = nn.Linear(3, 2)
    mon = gradwatch.Monitor(model, every=1, rules=False, blocks=None)
    model(torch.randn(2, 3)).sum().backward()
    mon.step(step=torch.tensor(4))
    mon.step(step=5)
    mon.step(step=6.0)  # some loops count in floats: a whole number is a step
    mon.step(step=np.int64(7))
    assert set(mon.history().step) == {4, 5, 6, 7}
    mon.step(step=8.5)  # contained: logged, kept in errors, nothing recorded, the loop goes on
    assert set(mon.history().step) == {4, 5, 6, 7} and "whole number" in mon.errors[-1]
    assert mon.begin_step("9") is False and "step must be an int" in mon.errors[-1]
    mon.close()
    strict = gradwatch.Monitor(model, every=1, rules=False, blocks=None, strict=True)
    with pytest.raises(TypeError, match="step"):
        strict.step(step=True)
    strict.close()


def test_config_groups_built_directly_are_checked_too():
    with pytest.raises(TypeError, match="every"):
        gradwatch.config.OutputConfig(every="3")
    with pytest.raises(ValueError, match="every"):
        gradwatch.Config(output=gradwatch.config.OutputConfig(every=0))
    with pytest.raises(TypeError, match="sinks"):
        gradwatch.config.OutputConfig(sinks=[object()])
    wrapped = gradwatch.config.AlertConfig(alert_sinks=[print])
    assert isinstance(wrapped.alert_sinks[0], gradwatch.sinks.CallableSink)  # normalised as from_options does
    assert gradwatch.config.MeasureConfig(include="layer1.*").include == ("layer1.*",)
    with pytest.raises(TypeError, match="MeasureConfig"):
        gradwatch.Config(measure={"every": 3})


def test_owner_is_not_an_option():
    with pytest.raises(TypeError, match="owner"):
        gradwatch.Monitor(resnet(8, width=4), owner="x")
