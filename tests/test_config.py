"""Options are explicit typed keyword-only parameters of Monitor and every adapter, checked once, by Config,
with one rule: TypeError for a wrong type, ValueError for a wrong value, never a silent coercion."""

from __future__ import annotations

import dataclasses
import inspect
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
    ({"flight_recorder": -1}, ValueError),
    ({"flight_recorder": None}, TypeError),
    ({"no_such_option": 1}, TypeError),
]


@pytest.mark.parametrize("kwargs, exc", BAD, ids=[next(iter(k)) + "=" + repr(next(iter(k.values())))[:20] for k, _ in BAD])
def test_a_bad_option_fails_the_same_way_in_the_config_the_monitor_and_the_callback(kwargs, exc):
    name = next(iter(kwargs))
    with pytest.raises(exc, match=re.escape(name if name != "rules" else "rule")):
        gradwatch.Config(**kwargs)
    with pytest.raises(exc):
        gradwatch.Monitor(resnet(8, width=4), **kwargs)
    lightning = pytest.importorskip("gradwatch.integrations.lightning")
    with pytest.raises(exc):
        lightning.GradWatchCallback(**kwargs)


def test_a_bad_option_opens_nothing(tmp_path):
    with pytest.raises(ValueError):
        gradwatch.Monitor(resnet(8, width=4), log_dir=tmp_path / "run", on_critical="panic")
    assert not (tmp_path / "run").exists()


def test_options_are_kept_as_given_and_normalised_once():
    cfg = gradwatch.Config(every=5, include="layer1.*", exclude_types=nn.BatchNorm2d, on_critical="stop",
                           prefix="gw")
    assert cfg.every == 5 and cfg.prefix == "gw" and cfg.on_critical == "stop" and cfg.alerting
    assert cfg.include == ("layer1.*",) and cfg.exclude_types == (nn.BatchNorm2d,)
    assert cfg.options()["every"] == 5 and set(cfg.options()) == {f.name for f in dataclasses.fields(cfg)}
    derived = cfg.replace(every=7)
    assert derived.every == 7 and cfg.every == 5 and derived.include == cfg.include
    assert not gradwatch.Config(rules=False).alerting
    wrapped = gradwatch.Config(alert_sinks=[print])
    assert isinstance(wrapped.alert_sinks[0], gradwatch.sinks.CallableSink)
    with pytest.raises(ValueError, match="every"):
        cfg.replace(every=0)
    with pytest.raises(TypeError, match="no_such"):
        cfg.replace(no_such=1)
    with pytest.raises(TypeError):
        gradwatch.Config(5)  # keyword-only: a positional value has no name to be checked under


def test_monitor_keeps_its_documented_keyword_arguments_and_takes_a_config():
    model = resnet(8, width=4)
    mon = gradwatch.Monitor(model, every=3, granularity="parameter", include=["conv1", "fc"], histograms=False,
                            rules=False, blocks=None)
    assert mon.every == 3 and mon.layer_names == ["conv1.weight", "fc.weight", "fc.bias"]
    assert mon.config.histograms is False and mon.alerts == []
    cfg = gradwatch.Config(every=4, blocks=None)
    mon2 = gradwatch.Monitor.from_config(model, cfg)
    assert mon2.every == 4 and mon2.config is cfg
    with pytest.raises(TypeError, match="Config"):
        gradwatch.Monitor.from_config(model, {"every": 3})
    with pytest.raises(TypeError):
        gradwatch.Monitor(model, 3)  # options are keyword-only
    mon.close()
    mon2.close()


def _entry_points():
    out = [("Monitor", gradwatch.Monitor, gradwatch.Monitor.__init__)]
    for module, name in [("lightning", "GradWatchCallback"), ("transformers", "GradWatchTrainerCallback"),
                         ("accelerate", "watch")]:
        try:
            mod = __import__(f"gradwatch.integrations.{module}", fromlist=[name])
        except ImportError:
            continue
        obj = getattr(mod, name)
        out.append((name, obj, obj.__init__ if inspect.isclass(obj) else obj))
    return out


@pytest.mark.parametrize("name, obj, fn", _entry_points(), ids=[e[0] for e in _entry_points()])
def test_every_entry_point_takes_every_option_typed_keyword_only_and_documents_it(name, obj, fn):
    """The options are visible to help(), IDEs, type checkers and inspect.signature, the same everywhere."""
    params = inspect.signature(fn).parameters
    doc = inspect.getdoc(obj) or ""
    args = doc[doc.index("Args:"):]
    for f in dataclasses.fields(gradwatch.Config):
        assert f.name in params, f"{name} lacks the option {f.name}"
        p = params[f.name]
        if f.name == "every" and name != "Monitor" and name != "watch":  # adapters: None = the framework's cadence
            assert p.default is None
        else:
            assert p.kind is inspect.Parameter.KEYWORD_ONLY, f"{name}({f.name}) is not keyword-only"
            assert p.default == f.default, f"{name}({f.name}={p.default!r}) but Config has {f.default!r}"
            assert p.annotation == f.type, f"{name}({f.name}: {p.annotation}) but Config has {f.type}"
        assert re.search(rf"^\s+{f.name}: \S", args, re.M), f"{name}'s docstring has no Args entry for {f.name}"
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()), f"{name} takes **kwargs"


def test_blocks_read_any_iterable_once_and_must_belong_to_the_model():
    model = resnet(8, width=4)
    blocks = (b for b in [model.layer1[0]])
    mon = gradwatch.Monitor(model, blocks=blocks)
    assert mon.config.blocks == (model.layer1[0],)
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
    mon.step(step=-3)  # a negative step is refused the same way
    assert set(mon.history().step) == {4, 5, 6, 7} and "step must be >= 0, got -3" in mon.errors[-1]
    mon.close()
    strict = gradwatch.Monitor(model, every=1, rules=False, blocks=None, strict=True)
    with pytest.raises(TypeError, match="step"):
        strict.step(step=True)
    strict.close()


def test_an_unknown_option_is_named():
    with pytest.raises(TypeError, match="owner"):
        gradwatch.Monitor(resnet(8, width=4), owner="x")
    with pytest.raises(TypeError, match="config"):
        gradwatch.Monitor(resnet(8, width=4), config=gradwatch.Config())  # a Config goes through from_config
