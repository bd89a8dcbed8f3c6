"""StepDriver: how framework adapters drive a Monitor; the calls are not on Monitor, and a driven monitor's
step() is not the user's to call."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.driver import StepDriver
from gradwatch.reference.blocks import resnet


def backward(model, seed=0):
    torch.manual_seed(seed)
    model(torch.randn(4, 3, 8, 8)).sum().backward()


def test_the_adapter_calls_are_not_public_on_monitor():
    public = {n for n in dir(gradwatch.Monitor) if not n.startswith("_")}
    assert not public & {"begin_step", "end_step", "discard_step", "flow_trigger", "measurements"}


def test_begin_then_end_records_at_the_frameworks_step_with_block_flow_armed_by_the_driver():
    torch.manual_seed(0)
    model = resnet(8, width=4)
    mon = gradwatch.Monitor(model, every=1000, strict=True)  # every does not decide: the framework's cadence does
    armed = {"now": False}
    driver = StepDriver(mon, logging=lambda: armed["now"])
    for step in range(4):
        armed["now"] = step % 2 == 1
        backward(model, step)
        if armed["now"]:
            assert driver.begin(step * 10) is True
            driver.end()
        model.zero_grad()
    hist = mon.history()
    assert sorted(hist.step.unique()) == [10, 30]
    assert "skip_share" in set(hist.metric)  # block flow armed on the driver's logging forwards
    assert mon.measured_steps == 2
    mon.close()


def test_a_driven_monitors_step_is_ignored_with_a_warning():
    model = nn.Linear(3, 2)
    mon = gradwatch.Monitor(model, every=1, blocks=None)
    StepDriver(mon)
    model(torch.randn(2, 3)).sum().backward()
    with pytest.warns(UserWarning, match="framework adapter"):
        mon.step()
    assert mon.history().empty
    mon.close()


def test_a_driver_needs_a_monitor_it_can_drive():
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="Monitor"):
        StepDriver(object())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer"):
        StepDriver(gradwatch.Monitor(model, optimizer=opt, blocks=None))
    mon = gradwatch.Monitor(model, blocks=None)
    StepDriver(mon)
    with pytest.raises(ValueError, match="already"):
        StepDriver(mon)
    with pytest.raises(TypeError, match="logging"):
        StepDriver(gradwatch.Monitor(model, blocks=None), logging=True)


def test_a_bad_step_from_the_framework_is_contained():
    model = nn.Linear(3, 2)
    mon = gradwatch.Monitor(model, every=1, blocks=None)
    driver = StepDriver(mon)
    model(torch.randn(2, 3)).sum().backward()
    assert driver.begin("9") is False and "step must be an int" in mon.errors[-1]
    assert driver.begin(-1) is False and "step must be >= 0" in mon.errors[-1]
    assert mon.history().empty
    mon.close()


def test_a_begin_without_end_warns_once_and_a_closed_monitor_cannot_be_driven():
    model = nn.Linear(3, 2)
    mon = gradwatch.Monitor(model, every=1, blocks=None)
    driver = StepDriver(mon)
    model(torch.randn(2, 3)).sum().backward()
    assert driver.begin(0)
    with pytest.warns(UserWarning, match="still pending"):
        assert driver.begin(1)
    driver.end()
    assert sorted(mon.history().step.unique()) == [1]
    mon.close()
    with pytest.raises(ValueError, match="closed"):
        StepDriver(_closed(model))


def _closed(model):
    mon = gradwatch.Monitor(model, blocks=None)
    mon.close()
    return mon
