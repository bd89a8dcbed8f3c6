"""The raw-PyTorch Monitor: values, cadence, non-perturbation, hooks, TensorBoard output."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import read_events, reference_norms, small_batch
from torch import nn

import gradwatch
from gradwatch.reference.blocks import resnet


def tiny_resnet(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return resnet(8, width=4, **kwargs)


def train_step(model, opt, seed):
    x, y = small_batch(seed=seed)
    F.cross_entropy(model(x), y).backward()


def test_values_equal_an_independent_computation_at_logged_steps_only(tmp_path):
    model = tiny_resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = {}
    mon = gradwatch.Monitor(model, log_dir=tmp_path, every=3, strict=True)
    for step in range(8):
        train_step(model, opt, step)
        if step % 3 == 0:
            expected[step] = reference_norms(model)
        mon.step()
        opt.step()
        opt.zero_grad()
    mon.close()

    hist = mon.history()
    assert list(hist.columns) == ["step", "name", "metric", "value"]
    assert sorted(hist.step.unique()) == [0, 3, 6]
    layer_metrics = set(hist.metric) - set(gradwatch.flow.FLOW_METRICS) - set(gradwatch.health.HEALTH)  # flow: test_flow*
    assert layer_metrics == {"grad_norm", "weight_norm", "grad_to_weight"}  # no optimizer: no updates
    scalars = read_events(str(tmp_path))["series"]  # per-layer values: one tensor per metric and step
    for step, layers in expected.items():
        for layer, metrics in layers.items():
            for metric, value in metrics.items():
                row = hist[(hist.step == step) & (hist.name == layer) & (hist.metric == metric)]
                assert len(row) == 1
                assert row.value.iloc[0] == pytest.approx(value, rel=1e-6)
                assert scalars[f"zz_gradwatch.layers/{metric}/{layer}"][step] == pytest.approx(value, rel=1e-6)
    for metric in ("grad_norm", "weight_norm", "grad_to_weight"):
        assert set(scalars[f"zz_gradwatch.layers/{metric}/conv1"]) == {0, 3, 6}
    # the whole-model entry
    g_global = math.sqrt(sum(v["grad_norm"] ** 2 for v in expected[6].values()))
    row = hist[(hist.step == 6) & (hist.name == "_global") & (hist.metric == "grad_norm")]
    assert row.value.iloc[0] == pytest.approx(g_global, rel=1e-6)


def test_steps_that_do_not_log_compute_no_norms(monkeypatch):
    model = tiny_resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    def counting(real):
        def wrapper(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(torch, "_foreach_norm", counting(torch._foreach_norm))
    monkeypatch.setattr(torch.linalg, "vector_norm", counting(torch.linalg.vector_norm))  # block-flow norms
    mon = gradwatch.Monitor(model, optimizer=opt, every=4)
    per_step = []
    for step in range(9):
        before = len(calls)
        train_step(model, opt, step)
        opt.step()
        opt.zero_grad()
        per_step.append(len(calls) - before)
    mon.close()
    assert [n > 0 for n in per_step] == [s % 4 == 0 for s in range(9)]
    assert mon.measured_steps == 3


def _train(model, monitor_kwargs=None, steps=20, momentum=0.9):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    mon = gradwatch.Monitor(model, optimizer=opt, **monitor_kwargs) if monitor_kwargs is not None else None
    outputs = []
    for step in range(steps):
        x, y = small_batch(seed=step)
        out = model(x)
        outputs.append(out.detach().clone())
        F.cross_entropy(out, y).backward()
        opt.step()
        opt.zero_grad()
    if mon is not None:
        mon.close()
    return outputs, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("inplace", [False, True])
def test_training_is_bit_identical_with_and_without_the_monitor(inplace, tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        out_bare, w_bare = _train(tiny_resnet(inplace=inplace))
        out_mon, w_mon = _train(tiny_resnet(inplace=inplace), {"every": 1, "log_dir": tmp_path, "strict": True})
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(out_bare, out_mon):
        assert torch.equal(a, b)
    for a, b in zip(w_bare, w_mon):
        assert torch.equal(a, b)


def test_manual_step_is_bit_identical_too():
    def run(with_monitor):
        model = tiny_resnet()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        mon = gradwatch.Monitor(model, every=1, strict=True) if with_monitor else None
        for step in range(20):
            train_step(model, opt, step)
            if mon:
                mon.step()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_update_to_weight_measures_the_optimizer_step():
    model = tiny_resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mon = gradwatch.Monitor(model, optimizer=opt, every=2, strict=True)
    expected = {}
    for step in range(4):
        train_step(model, opt, step)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        if step % 2 == 0:
            delta = sum(float((p.detach() - before[n]).double().pow(2).sum()) for n, p in model.named_parameters()
                        if n.startswith("layer2.0.conv1."))
            w0 = sum(float(before[n].double().pow(2).sum()) for n in before if n.startswith("layer2.0.conv1."))
            expected[step] = math.sqrt(delta) / math.sqrt(w0)
        opt.zero_grad()
    mon.close()
    hist = mon.history()
    upd = hist[(hist.metric == "update_to_weight") & (hist.name == "layer2.0.conv1")].set_index("step").value
    assert sorted(upd.index) == [0, 2]
    for step, value in expected.items():
        assert upd[step] == pytest.approx(value, rel=1e-5)


def test_the_loss_given_is_read_into_the_records_of_logging_steps_only():
    # Monitor.loss keeps the tensor and reads it when a logging step is measured (one host sync there only);
    # the instability rule holds its warnings back while it falls (tests/alerts/test_instability.py)
    model = tiny_resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gradwatch.Monitor(model, optimizer=opt, every=2, strict=True)
    given = {}
    for step in range(5):
        x, y = small_batch(seed=step)
        loss = F.cross_entropy(model(x), y, reduction="none")  # per sample: its mean is read
        if step != 2:
            mon.loss(loss)
            given[step] = float(loss.detach().mean())
        loss.mean().backward()
        opt.step()
        opt.zero_grad()
    mon.loss("not a number")  # a value that is no number is recorded as none, training goes on
    for step in (5, 6):
        x, y = small_batch(seed=step)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    mon.close()
    got = {r.step: r.loss for r in mon.records}
    # step 2 gave none: the last one given (step 1's) is what the monitor holds
    assert got == {0: pytest.approx(given[0]), 2: pytest.approx(given[1]), 4: pytest.approx(given[4]), 6: None}
    assert not mon.errors


def test_context_manager_removes_every_hook(tmp_path):
    model = tiny_resnet(inplace=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.Monitor(model, optimizer=opt, log_dir=tmp_path, every=1) as mon:
        assert opt._optimizer_step_pre_hooks and opt._optimizer_step_post_hooks
        train_step(model, opt, 0)
        opt.step()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    for p in model.parameters():
        assert not p._backward_hooks
    assert len(mon.history()) > 0


def test_user_step_counter_decides_and_labels(tmp_path):
    model = tiny_resnet()
    mon = gradwatch.Monitor(model, every=10)
    for step in (5, 10, 15, 20):
        train_step(model, None, step)
        mon.step(step=step)
        model.zero_grad()
    assert sorted(mon.history().step.unique()) == [10, 20]
    assert mon.global_step == 21


def test_tensorboard_tags_live_in_the_prefix_namespace_and_write_one_run(tmp_path):
    model = tiny_resnet()
    with gradwatch.Monitor(model, log_dir=tmp_path, every=1, prefix="gw") as mon:
        train_step(model, None, 0)
        mon.step()
    ev = read_events(str(tmp_path))
    assert "zz_gw.layers/grad_to_weight/layer1.0.conv1" in ev["series"]
    assert "zz_gw.layers/grad_norm/_global" in ev["scalars"] and "zz_gw.health/4_grad_norm_log10" in ev["scalars"]
    for metric in ("grad_norm", "weight_norm", "grad_to_weight"):
        hist = ev["histograms"][f"zz_gw.layers/{metric}"][0]
        assert hist.num == len(mon.layer_names)  # layers only, not _global
        assert ev["scalars"][f"zz_gw.layers/nonfinite/{metric}"][0] == 0
    groups = {tag.split("/")[0] for kind in ("scalars", "histograms", "series") for tag in ev[kind]}
    assert groups == {"zz_gw.health", "zz_gw.layers", "zz_gw.blocks", "zz_gw.alerts"}  # nothing outside the namespace
    assert [d for d in os.listdir(tmp_path) if os.path.isdir(tmp_path / d)] == []  # no add_scalars runs


def test_user_writer_is_flushed_not_closed(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp_path)
    model = tiny_resnet()
    with gradwatch.Monitor(model, writer=writer) as mon:
        train_step(model, None, 0)
        mon.step()
    writer.add_scalar("mine", 1.0, 0)  # still usable
    writer.close()
    assert "zz_gradwatch.layers/grad_norm/conv1" in read_events(str(tmp_path))["series"]


def test_parameter_granularity_and_filters():
    model = tiny_resnet()
    mon = gradwatch.Monitor(model, granularity="parameter", include="layer1.*", exclude_types=nn.BatchNorm2d)
    assert mon.layer_names == ["layer1.0.conv1.weight", "layer1.0.conv2.weight"]
    mon2 = gradwatch.Monitor(model, include_types=nn.Linear)
    assert mon2.layer_names == ["fc"]
    import re

    mon3 = gradwatch.Monitor(model, exclude=[re.compile(r"bn\d?$"), "layer*"])
    assert mon3.layer_names == ["conv1", "fc"]
    train_step(model, None, 0)
    mon.step()
    hist = mon.history()
    assert set(hist[hist.metric == "grad_norm"].name) == {"layer1.0.conv1.weight", "layer1.0.conv2.weight", "_global"}


def test_frozen_and_gradless_parameters_are_skipped_and_reported_once(caplog):
    model = tiny_resnet()
    model.conv1.weight.requires_grad_(False)
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        mon = gradwatch.Monitor(model, every=1, strict=True)
        assert "frozen" in caplog.text and "conv1.weight" in caplog.text
        caplog.clear()
        for step in range(3):
            x, y = small_batch(seed=step)
            # the head's bias gets no gradient: detach it from the graph
            out = F.linear(model.layer3(model.layer2(model.layer1(F.relu(model.bn1(model.conv1(x)))))).mean((2, 3)),
                           model.fc.weight)
            F.cross_entropy(out, y).backward()
            mon.step()
            model.zero_grad(set_to_none=True)
    assert caplog.text.count("no gradient") == 1 and "fc.bias" in caplog.text
    hist = mon.history()
    assert "conv1" not in set(hist.name)
    fc = hist[(hist.name == "fc") & (hist.metric == "weight_norm") & (hist.step == 0)].value.iloc[0]
    assert fc == pytest.approx(float(model.fc.weight.detach().norm()), rel=1e-6)  # bias left out: it had no gradient


def test_zero_weight_gives_nan_ratio_without_warnings():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    mon = gradwatch.Monitor(model, every=1, strict=True)
    model(torch.randn(8, 4)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon.step()
    hist = mon.history().set_index(["name", "metric"]).value
    assert hist[("2", "weight_norm")] == 0
    assert hist[("2", "grad_norm")] > 0
    assert np.isnan(hist[("2", "grad_to_weight")])
    assert np.isfinite(hist[("0", "grad_to_weight")])


def test_nan_gradients_are_recorded_and_training_goes_on(tmp_path):
    model = tiny_resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gradwatch.Monitor(model, log_dir=tmp_path, every=1, strict=True)
    train_step(model, opt, 0)
    model.layer2[0].conv1.weight.grad[0, 0, 0, 0] = float("nan")
    model.fc.bias.grad[0] = float("inf")
    mon.step()
    mon.close()
    hist = mon.history().set_index(["name", "metric"]).value
    assert np.isnan(hist[("layer2.0.conv1", "grad_norm")])
    assert np.isinf(hist[("fc", "grad_norm")])
    assert np.isfinite(hist[("layer1.0.conv1", "grad_norm")])
    ev = read_events(str(tmp_path))
    assert ev["scalars"]["zz_gradwatch.layers/nonfinite/grad_norm"][0] == 2
    assert ev["histograms"]["zz_gradwatch.layers/grad_norm"][0].num == len(mon.layer_names) - 2


def test_errors_inside_gradwatch_are_contained_unless_strict(caplog):
    class BrokenWriter:
        def add_scalar(self, *a, **k):
            raise OSError("disk full")

        def add_histogram(self, *a, **k):
            raise OSError("disk full")

        def flush(self):
            pass

    model = tiny_resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gradwatch.Monitor(model, optimizer=opt, writer=BrokenWriter(), every=1)
    with caplog.at_level(logging.ERROR, logger="gradwatch"):
        for step in range(3):
            train_step(model, opt, step)
            opt.step()
            opt.zero_grad()
    assert mon.errors and "disk full" in mon.errors[0]
    assert "disk full" in caplog.text
    assert mon.global_step == 3  # the counter kept going

    strict = gradwatch.Monitor(model, writer=BrokenWriter(), every=1, strict=True)
    train_step(model, opt, 0)
    with pytest.raises(OSError, match="disk full"):
        strict.step()


def test_amp_grad_scaler_sees_unscaled_gradients():
    def measured(fused):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        mon = gradwatch.Monitor(model, optimizer=opt, every=1, strict=True)
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
        loss = model(x).square().mean()
        scaler.scale(loss).backward()
        expected = {
            name: math.sqrt(sum(float(p.grad.double().square().sum()) for p in model[int(name)].parameters())) / 2.0**10
            for name in ("0", "2")
        }
        scaler.step(opt)
        scaler.update()
        mon.close()
        hist = mon.history().set_index(["name", "metric"]).value
        return expected, hist

    for fused in (False, True):
        expected, hist = measured(fused)
        assert len(hist) > 0
        for name in ("0", "2"):
            assert hist[(name, "grad_norm")] == pytest.approx(expected[name], rel=1e-5)


def test_overflowed_amp_steps_are_not_recorded():
    model = nn.Sequential(nn.Linear(4, 4))
    opt = torch.optim.Adam(model.parameters(), fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, strict=True)
    scaler.scale(model(torch.randn(2, 4)).sum()).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert len(mon.history()) == 0


@pytest.mark.parametrize(
    "backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)]
)
def test_compiled_model_gives_parameter_metrics(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    with gradwatch.Monitor(compiled, optimizer=opt, every=1, track_updates=False, strict=True) as mon:
        compiled(torch.randn(4, 8)).sum().backward()
        expected = reference_norms(model)
        opt.step()
    hist = mon.history().set_index(["name", "metric"]).value
    assert set(mon.layer_names) == {"0", "2"}  # no _orig_mod. prefix
    for layer in ("0", "2"):
        for metric in ("grad_norm", "weight_norm", "grad_to_weight"):
            assert hist[(layer, metric)] == pytest.approx(expected[layer][metric], rel=1e-6)


def test_history_saves_to_csv(tmp_path):
    model = tiny_resnet()
    mon = gradwatch.Monitor(model, every=1)
    train_step(model, None, 0)
    mon.step()
    path = mon.save_history(tmp_path / "h.csv")
    import pandas as pd

    back = pd.read_csv(path)
    assert len(back) == len(mon.history()) and list(back.columns) == ["step", "name", "metric", "value"]
    with pytest.raises(ValueError, match=r"\.csv"):
        mon.save_history(tmp_path / "h.txt")


def test_state_dict_round_trip():
    model = tiny_resnet()
    mon = gradwatch.Monitor(model, every=2)
    for step in range(3):
        mon.step()
    state = mon.state_dict()
    again = gradwatch.Monitor(model, every=2)
    again.load_state_dict(state)
    assert again.global_step == 3
    with pytest.raises(ValueError, match="state_dict"):
        again.load_state_dict({"nope": 1})


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors_at_construction(tmp_path):
    model = tiny_resnet()
    with pytest.raises(TypeError, match="model"):
        gradwatch.Monitor("not a model")
    with pytest.raises(ValueError, match="every"):
        gradwatch.Monitor(model, every=0)
    with pytest.raises(TypeError, match="every"):
        gradwatch.Monitor(model, every=2.5)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="log_dir"):
        gradwatch.Monitor(model, log_dir=blocker / "sub")
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        gradwatch.Monitor(frozen)
    with pytest.raises(ValueError, match="trainable"):
        gradwatch.Monitor(nn.ReLU())
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer"):
        gradwatch.Monitor(model, optimizer=other)
    with pytest.raises(TypeError, match="optimizer"):
        gradwatch.Monitor(model, optimizer="sgd")
    with pytest.raises(ValueError, match="log_dir or writer"):
        gradwatch.Monitor(model, log_dir=tmp_path, writer=object())
    with pytest.raises(ValueError, match="granularity"):
        gradwatch.Monitor(model, granularity="block")
    with pytest.raises(ValueError, match="filters"):
        gradwatch.Monitor(model, include="nothing.matches")
    with pytest.raises(TypeError, match="include_types"):
        gradwatch.Monitor(model, include_types=[int])
    with pytest.raises(TypeError, match="log_dir must be a path .*int: 123"):
        gradwatch.Monitor(model, log_dir=123)
    assert not os.path.exists("123")


def test_a_model_on_the_meta_device_is_refused_at_construction_not_at_the_first_step():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"meta device \(0.weight, 0.bias, 1.weight, 1.bias\).*to_empty"):
        gradwatch.Monitor(model)
    model.to_empty(device="cpu")  # materialised: measured as usual
    mon = gradwatch.Monitor(model, every=1, strict=True)
    model(torch.randn(3, 4)).sum().backward()
    mon.step()
    assert set(mon.history().name) >= {"0", "1"}
    mon.close()


def test_step_called_twice_per_iteration_warns_once_and_neither_doubles_nor_repeats_steps():
    model = tiny_resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gradwatch.Monitor(model, every=2, strict=True)
    with pytest.warns(UserWarning, match="twice") as seen:
        for i in range(6):
            train_step(model, opt, i)
            mon.step()
            mon.step()  # a second call for the same backward: ignored
            opt.step()
            opt.zero_grad()
    assert len([w for w in seen if "twice" in str(w.message)]) == 1
    assert mon.global_step == 6 and sorted(mon.history().step.unique()) == [0, 2, 4]
    mon.close()

    explicit = gradwatch.Monitor(model, every=1, strict=True, blocks=None)
    with pytest.warns(UserWarning, match="twice"):
        for i in range(3):
            train_step(model, opt, i)
            explicit.step(i)
            explicit.step(i)  # the same step again: no duplicate rows
            opt.zero_grad()
    hist = explicit.history()
    assert sorted(hist.step.unique()) == [0, 1, 2] and not hist.duplicated(["step", "name", "metric"]).any()
    explicit.close()


def test_gradients_written_outside_autograd_lose_one_step_and_the_check_turns_itself_off(caplog):
    """A loop that writes gradients where autograd's version counters do not show it (a replayed CUDA graph,
    copies through .data) looks like repeated calls; two in a row prove the evidence blind, and from then on
    every call counts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model(torch.randn(3, 4)).sum().backward()  # the gradients exist; from now on they are written by hand
    mon = gradwatch.Monitor(model, every=1, strict=True, blocks=None, rules=False)
    with pytest.warns(UserWarning, match="twice"), caplog.at_level(logging.WARNING, logger="gradwatch"):
        for i in range(6):
            for p in model.parameters():
                p.grad.data.copy_(torch.full_like(p, float(i + 1)))
            mon.step()
    assert sorted(mon.history().step.unique()) == [0, 1, 2, 3, 4]  # the second call was taken for a repeat
    assert "cannot tell a repeated call" in caplog.text
    mon.close()


def test_accumulated_and_set_to_none_gradients_are_new_backward_passes():
    """Neither accumulation (in place) nor zero_grad(set_to_none) + backward (a new tensor, maybe at the freed
    one's address) is mistaken for a repeated call."""
    model = tiny_resnet()
    mon = gradwatch.Monitor(model, every=1, strict=True, blocks=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(3):
            train_step(model, None, i)
            mon.step()  # accumulated on top of the last step's gradients
        for i in range(3):
            model.zero_grad(set_to_none=True)
            train_step(model, None, i)
            mon.step()
    assert sorted(mon.history().step.unique()) == list(range(6))
    mon.close()


def test_step_is_ignored_with_a_warning_when_the_optimizer_drives():
    model = tiny_resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1)
    with pytest.warns(UserWarning, match="optimizer"):
        mon.step()
    assert mon.measured_steps == 0


def test_sparse_gradients_are_measured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, strict=True)
    model(torch.tensor([[1, 1], [2, 3]])).sum().backward()  # index 1 twice: duplicate sparse entries
    assert model[0].weight.grad.is_sparse
    expected = float(model[0].weight.grad.to_dense().norm())
    opt.step()
    hist = mon.history().set_index(["name", "metric"]).value
    assert hist[("0", "grad_norm")] == pytest.approx(expected, rel=1e-6)
    assert mon.errors == []


def test_step_before_backward_is_skipped_with_one_warning():
    torch.manual_seed(0)
    model = resnet(8, width=4)
    mon = gradwatch.Monitor(model, every=1)
    x, y = small_batch()
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        with pytest.warns(UserWarning, match="before backward") if _ == 0 else contextlib.nullcontext():
            mon.step()  # too early: nothing to measure yet
        loss.backward()
        model.zero_grad(set_to_none=True)
    assert mon.history().empty and mon.latest is None and not mon.errors
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    mon.step()
    assert set(mon.history().step) == {2} and not np.isnan(mon.latest.block("grad_in")).any()
    mon.close()


def test_history_can_be_bounded_while_tensorboard_keeps_every_step(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, log_dir=tmp_path, history=3, rules=False)
    for _ in range(7):
        F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,))).backward()
        opt.step()
        opt.zero_grad()
    mon.close()
    assert [r.step for r in mon.records] == [4, 5, 6] and set(mon.history().step) == {4, 5, 6}
    assert sorted(read_events(str(tmp_path))["scalars"]["zz_gradwatch.layers/grad_norm/_global"]) == list(range(7))
    with pytest.raises(ValueError, match="history"):
        gradwatch.Monitor(model, history=0)


def test_values_stay_right_when_the_model_changes_dtype_and_shape_after_the_first_steps():
    """The norms are planned once per parameter set (many same-shaped CPU tensors are stacked); a model cast to
    float64 or resized afterwards must still be measured exactly, update included."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, blocks=None, rules=False, strict=True)
    expected = {}
    for step in range(6):
        if step == 2:
            model.double()
        if step == 4:  # the last layer now maps to 2 outputs: its tensors leave their stacks
            with torch.no_grad():
                model[5].weight.data = torch.randn(2, 4, dtype=torch.float64)
                model[5].bias.data = torch.zeros(2, dtype=torch.float64)
            opt.state.clear()
        x = torch.randn(3, 4, dtype=next(model.parameters()).dtype)
        model(x).pow(2).sum().backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        for layer in ("0", "5"):
            names = [f"{layer}.weight", f"{layer}.bias"]
            g = math.sqrt(sum(float(grads[n].double().pow(2).sum()) for n in names))
            w = math.sqrt(sum(float(before[n].double().pow(2).sum()) for n in names))
            d = math.sqrt(sum(float((dict(model.named_parameters())[n].detach() - before[n]).double().pow(2).sum())
                              for n in names))
            expected[(step, layer)] = (g, d / w)
    mon.close()
    hist = mon.history().set_index(["step", "name", "metric"]).value
    for (step, layer), (g, u) in expected.items():
        assert hist[(step, layer, "grad_norm")] == pytest.approx(g, rel=1e-5)
        assert hist[(step, layer, "update_to_weight")] == pytest.approx(u, rel=1e-4)


def test_a_sink_that_fails_to_attach_leaves_no_thread_or_hook_behind(tmp_path):
    import threading

    class Broken:
        def send(self, event):
            pass

        def attach(self, report_failure):
            raise RuntimeError("cannot attach")

    before = {t.name for t in threading.enumerate()}
    model = tiny_resnet()
    with pytest.raises(RuntimeError, match="cannot attach"):
        gradwatch.Monitor(model, log_dir=tmp_path, alert_sinks=[Broken()])
    time.sleep(0.2)
    assert {t.name for t in threading.enumerate() if t.is_alive()} <= before
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
