"""Block flow at run time: non-perturbation, cadence, hook hygiene, checkpointing, eval loops, compile, errors."""

from __future__ import annotations

import gc
import logging
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradwatch
from helpers import small_batch
from helpers.processes import spawn
from gradwatch import flow
from gradwatch.flow import _hooks
from gradwatch.reference.blocks import BasicBlock, resnet


def batch(n=4, size=8, seed=1, dtype=torch.float32):
    x, y = small_batch(n, size, seed)
    return x.to(dtype), y


def flow_rows(mon):
    hist = mon.history()
    return hist[hist.metric.isin(flow.FLOW_METRICS)]


def train(model, steps, mon_kwargs=None, seed=0, extra=None):
    """SGD steps on a fixed stream of batches; returns (params, monitor)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mon = gradwatch.Monitor(model, optimizer=opt, **mon_kwargs) if mon_kwargs is not None else None
    for step in range(steps):
        x, y = batch(seed=seed + step)
        if extra is not None:
            extra(model, step)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], mon


def sgd_steps(model, opt, seeds, data=None):
    """One SGD step per seed on ``data(seed)`` (default: the fixed batches), with an optimizer made by the test."""
    for seed in seeds:
        x, y = data(seed) if data is not None else batch(seed=seed)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def test_inplace_model_trains_bit_identically_with_and_without_block_flow():
    torch.manual_seed(0)
    a = resnet(20, width=4, inplace=True, shortcut="A")
    b = resnet(20, width=4, inplace=True, shortcut="A")
    b.load_state_dict(a.state_dict())
    bare, _ = train(a, 4)
    watched, mon = train(b, 4, dict(every=1, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(bare, watched))
    assert all(torch.equal(p, q) for p, q in zip(a.buffers(), b.buffers()))
    rows = flow_rows(mon)
    assert sorted(rows.step.unique()) == [0, 1, 2, 3]
    assert len(mon.describe()) == 9 and np.isfinite(rows.value).all()
    assert not mon.errors


def test_only_logging_steps_arm_and_discovery_is_paid_once():
    torch.manual_seed(0)
    net = resnet(8, width=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    mon = gradwatch.Monitor(net, optimizer=opt, every=3, strict=True)
    hooked_before = sum(len(m._forward_hooks) for m in net.modules())
    # discovery hooks until the first logging step, and the model's own pair (arming waits for its forward's end)
    assert hooked_before == len(list(net.modules())) + 1
    for step in range(7):
        x, y = batch(seed=step)
        loss = F.cross_entropy(net(x), y)
        armed = mon.probe.armed
        assert armed == (step % 3 == 0)  # nothing is armed on steps that do not log
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert not mon.probe.armed  # collected, hooks removed
        # after discovery: one forward hook per block, and the model's pair
        assert sum(len(m._forward_hooks) for m in net.modules()) == 3 + 1
        assert sum(len(m._forward_pre_hooks) for m in net.modules()) == 1
    assert sorted(flow_rows(mon).step.unique()) == [0, 3, 6]
    assert mon.probe.sessions == 3


def test_no_hook_remains_after_close_and_no_activation_is_held():
    torch.manual_seed(0)
    net = resnet(8, width=4, inplace=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    mon = gradwatch.Monitor(net, optimizer=opt, every=1, strict=True)
    refs = []
    keep = net.layer2.register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out)))

    def steps(n, seed):
        for step in range(n):
            x, y = batch(seed=seed + step)
            F.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad()

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter))

    steps(5, 0)
    before = live_tensors()
    assert refs and all(r() is None for r in refs)  # no activation outlives its step
    steps(15, 5)
    assert live_tensors() == before  # nothing accumulates over steps
    assert all(r() is None for r in refs)
    keep.remove()
    assert len(flow_rows(mon).step.unique()) == 20
    mon.close()
    for m in net.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    x, y = batch()
    F.cross_entropy(net(x), y).backward()  # nothing armed, nothing recorded, no error
    assert not mon.probe.armed and not mon.errors


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_each_block_once_with_the_same_values(reentrant):
    class Checkpointed(nn.Module):
        def __init__(self, net, use_ckpt):
            super().__init__()
            self.net, self.use_ckpt = net, use_ckpt

        def forward(self, x):
            out = self.net.relu(self.net.bn1(self.net.conv1(x)))
            for block in self.net.residual_blocks():
                out = checkpoint(block, out, use_reentrant=reentrant) if self.use_ckpt else block(out)
            return self.net.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))

    torch.manual_seed(0)
    plain = resnet(8, width=4).double()
    ckpt = resnet(8, width=4).double()
    ckpt.load_state_dict(plain.state_dict())
    results = []
    for model in (Checkpointed(plain, False), Checkpointed(ckpt, True)):
        mon = gradwatch.Monitor(model, every=1, strict=True)
        for step in range(2):
            x, y = batch(seed=step, dtype=torch.float64)
            F.cross_entropy(model(x), y).backward()
            mon.step()
            model.zero_grad()
        results.append(flow_rows(mon).set_index(["step", "name", "metric"]).value)
        assert len(mon.describe()) == 3
    reference, measured = results
    assert len(measured) == len(reference) == 2 * 3 * len(flow.FLOW_METRICS)  # once per block and step
    assert measured.index.equals(reference.index)
    np.testing.assert_allclose(measured.values, reference.values, rtol=1e-10)


def test_eval_and_no_grad_forwards_on_logging_steps_are_harmless():
    def validate(model, step):
        x, _ = batch(seed=100 + step)
        model.eval()
        with torch.no_grad():
            model(x)  # a validation loop
        model(x).sum()  # an eval forward with grad enabled, never backpropagated
        model.train()

    torch.manual_seed(0)
    a, b = resnet(8, width=4), resnet(8, width=4)
    b.load_state_dict(a.state_dict())
    _, plain = train(a, 3, dict(every=1, strict=True))
    _, validated = train(b, 3, dict(every=1, strict=True), extra=validate)
    # the eval forwards ran before each training forward of the same step: they armed nothing that stuck
    pd_plain = flow_rows(plain).set_index(["step", "name", "metric"]).value
    pd_val = flow_rows(validated).set_index(["step", "name", "metric"]).value
    np.testing.assert_allclose(pd_val.values, pd_plain.values, rtol=1e-6)
    assert np.isfinite(pd_val.values).all() and not validated.errors


def test_gradient_accumulation_measures_the_last_micro_batch():
    torch.manual_seed(0)
    net = resnet(8, width=4).double()
    mon = gradwatch.Monitor(net, every=1, strict=True)
    for micro in range(2):
        x, y = batch(seed=micro, dtype=torch.float64)
        F.cross_entropy(net(x), y).backward()
    mon.step()
    accumulated = flow_rows(mon).set_index(["name", "metric"]).value
    net.zero_grad()
    single = gradwatch.Monitor(net, every=1, strict=True)
    mon.close()
    x, y = batch(seed=1, dtype=torch.float64)
    F.cross_entropy(net(x), y).backward()
    single.step()
    last = flow_rows(single).set_index(["name", "metric"]).value
    np.testing.assert_allclose(accumulated.values, last.values, rtol=1e-10)


def test_tensorboard_tags_are_grouped_like_layer_metrics(tmp_path, events):
    torch.manual_seed(0)
    net = resnet(8, width=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    mon = gradwatch.Monitor(net, optimizer=opt, every=2, log_dir=tmp_path, prefix="gw")
    for step in range(3):
        x, y = batch(seed=step)
        F.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    mon.close()
    ev = events(str(tmp_path))
    hist = mon.history()
    for metric in flow.FLOW_METRICS:
        for name in ("layer1.0", "layer2.0", "layer3.0"):
            tag = f"zz_gw.blocks/{metric}/{name}"  # the per-block series tensors, read back per name
            assert set(ev["series"][tag]) == {0, 2}
            value = hist[(hist.step == 2) & (hist.name == name) & (hist.metric == metric)].value.iloc[0]
            assert ev["series"][tag][2] == pytest.approx(value, rel=1e-6)
        assert ev["histograms"][f"zz_gw.blocks/{metric}"][0].num == 3


def test_explicit_blocks_watch_block_and_names():
    class TanhResidual(nn.Module):  # a residual around a parameter-free op: not found automatically
        def forward(self, x):
            return x + torch.tanh(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), TanhResidual(), nn.Linear(8, 8), TanhResidual(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    mon = gradwatch.Monitor(model, every=1, strict=True)
    model(x).sum().backward()
    mon.step()
    assert list(mon.describe()) == []
    mon.watch_block(model[3], name="late")
    model(x).sum().backward()
    mon.step()
    assert [(b.name, b.found) for b in mon.describe()] == [("late", "watch")]
    assert set(flow_rows(mon)[lambda d: d.step == 1].name) == {"late"}
    mon.close()

    net = resnet(8, width=4)
    only = gradwatch.Monitor(net, every=1, blocks=[net.layer2[0]], strict=True)
    xi, yi = batch()
    F.cross_entropy(net(xi), yi).backward()
    only.step()
    assert [b.name for b in only.describe()] == ["layer2.0"]
    only.watch_block(net.layer2[0], name="downsample")  # rename
    assert [b.name for b in only.describe()] == ["downsample"]
    only.close()

    off = gradwatch.Monitor(net, every=1, blocks=None)
    assert off.flow_status.state == "off" and list(off.describe()) == []
    F.cross_entropy(net(xi), yi).backward()
    off.step()
    assert flow_rows(off).empty
    off.close()

    with pytest.raises(ValueError, match="not a submodule"):
        gradwatch.Monitor(net, blocks=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="blocks must be"):
        gradwatch.Monitor(net, blocks="all")
    with pytest.raises(TypeError, match="nn.Module"):
        gradwatch.Monitor(net, blocks=["layer1.0"])


def test_watch_block_finds_a_block_whose_skip_is_dead_from_the_start():
    class Cut(BasicBlock):
        def forward(self, x):
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            return self.relu(out + x.detach())  # every instance is broken: no sibling to match

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Cut(4, 4), Cut(4, 4))
    mon = gradwatch.Monitor(model, every=1, blocks=None, strict=True)
    mon.watch_block(model[1])
    x, _ = batch()
    model(x).sum().backward()
    mon.step()
    (block,) = mon.describe()
    assert (block.name, block.note) == ("1", "skip carries no gradient")
    v = flow_rows(mon).set_index("metric").value
    assert v["skip_share"] == 0.0 and v["grad_in"] == pytest.approx(v["branch_grad"], rel=1e-6)


def test_describe_with_example_input_changes_no_state():
    torch.manual_seed(0)
    net = resnet(8, width=4, block="preact")
    nn.init.normal_(net.fc.weight)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    mon = gradwatch.Monitor(net, every=1)
    rng = torch.get_rng_state()
    found = mon.describe(batch()[0])
    assert [b.name for b in found] == ["layer1.0", "layer2.0", "layer3.0"]
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    assert flow_rows(mon).empty and mon.flow_status.state == "ok"


def test_errors_inside_flow_hooks_are_contained(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("norm exploded")

    torch.manual_seed(0)
    a, b = resnet(8, width=4), resnet(8, width=4)
    b.load_state_dict(a.state_dict())
    monkeypatch.setattr(_hooks, "_norm", broken)  # what the flow hooks compute their norms with
    with caplog.at_level(logging.ERROR, logger="gradwatch"):
        bare, _ = train(a, 2)
        watched, mon = train(b, 2, dict(every=1))
    assert all(torch.equal(p, q) for p, q in zip(bare, watched))
    assert mon.errors and "norm exploded" in mon.errors[0]
    hist = mon.history()
    assert set(hist[hist.metric == "grad_norm"].step) == {0, 1}  # parameter metrics continue


class _Res(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.b0, self.b1, self.out = nn.Linear(4, 8), _Res(), _Res(), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.b1(self.b0(self.inp(x))))


@pytest.mark.slow
def test_torch_compile_reports_flow_unavailable_once_and_parameter_metrics_continue(caplog):
    torch.manual_seed(0)
    x = torch.randn(5, 4)

    def run(model, params, steps=3):
        opt = torch.optim.SGD(params, lr=0.1)
        mon = gradwatch.Monitor(model, optimizer=opt, every=1)
        for _ in range(steps):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return mon

    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        net = _Net()
        mon = run(torch.compile(net), net.parameters())  # the whole model
    assert sum("block flow is unavailable" in r.getMessage() for r in caplog.records) == 1
    assert mon.flow_status.state == "unavailable" and "torch.compile" in mon.flow_status.reason
    hist = mon.history()
    assert set(hist.step) == {0, 1, 2} and set(hist.metric) == set(gradwatch.names.METRICS) | set(gradwatch.health.HEALTH)
    assert not mon.errors

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        net = _Net()
        net.b1 = torch.compile(net.b1)  # one block compiled: the other is still measured
        mon = run(net, net.parameters())
    assert sum("torch.compile" in r.getMessage() for r in caplog.records) == 1
    status = mon.flow_status
    assert status.state == "partial" and status.unavailable == ("b1",)
    assert [b.name for b in mon.describe()] == ["b0"]
    assert set(flow_rows(mon).name) == {"b0"} and set(flow_rows(mon).step) == {0, 1, 2}

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        net = _Net()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        mon = gradwatch.Monitor(net, optimizer=opt, every=1)
        compiled = torch.compile(net)  # compiled after attaching: gradwatch's module hooks never run
        for _ in range(4):
            compiled(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert sum("block flow is unavailable" in r.getMessage() for r in caplog.records) == 1
    assert mon.flow_status.state == "unavailable" and "torch.compile" in mon.flow_status.reason
    assert set(mon.history().step) == {0, 1, 2, 3} and not mon.errors


def test_cli_inspect_lists_the_blocks_of_a_factory(tmp_path, capsys):
    import json

    from gradwatch.cli import main

    args = ["inspect", "gradwatch.reference.blocks:resnet", "--kwargs", "depth=8", "shortcut=A", "--input-shape", "2,3,8,8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "layer2.0" in out and "Slice>Slice>ConstantPadNd" in out and "block flow: ok: 3 residual merges" in out

    path = tmp_path / "mymodel.py"
    path.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Res(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(4, 4)\n"
        "    def forward(self, x):\n        return x + torch.relu(self.fc(x))\n\n"
        "def build():\n    return nn.Sequential(nn.Linear(3, 4), Res(), Res()), torch.randn(2, 3)\n"
    )
    assert main(["inspect", f"{path}:build", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "ok"
    found = [(b["name"], b["kind"], b["index"]) for b in report["blocks"]]
    assert found == [("1", "identity", 0), ("2", "identity", 1)]

    assert main(["inspect", "gradwatch.reference.blocks:resnet", "--kwargs", "depth=8"]) == 1
    assert "--input-shape" in capsys.readouterr().err


def test_invalid_blocks_argument_fails_before_anything_is_hooked():
    net = resnet(8, width=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for bad, err in [("all", ValueError), (net.layer1[0], TypeError), ([nn.Linear(2, 2)], ValueError), (3, TypeError)]:
        with pytest.raises(err):
            gradwatch.Monitor(net, optimizer=opt, blocks=bad)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    mon = gradwatch.Monitor(net, blocks=(b for b in [net.layer2[0]]), every=1)  # any iterable, read once
    x, y = batch()
    F.cross_entropy(net(x), y).backward()
    mon.step()
    assert [b.name for b in mon.describe()] == ["layer2.0"]


# ---------------------------------------------------------------------------------------- review fixes
def _grad_out_per_batch(net, steps, mon):
    """Train ``net`` (pre-activation: a block's output is its merge output) on ``steps`` with
    ``mon.step(step=s)``; returns {step: {block: ||dL/d(block output)||}} taken with tensor hooks."""
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    seen: dict[int, dict[str, float]] = {}
    current: dict[str, float] = {}
    names = {b: n for n, b in net.named_modules() if b in net.residual_blocks()}

    def grab(module, args, out):
        out.register_hook(lambda g, n=names[module]: current.__setitem__(n, float(g.norm())))

    hooks = [b.register_forward_hook(grab) for b in names]
    for s in steps:
        current = {}
        x, y = batch(seed=s, dtype=torch.float64)
        F.cross_entropy(net(x), y).backward()
        seen[s] = current
        mon.step(step=s)
        opt.step()
        opt.zero_grad()
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("start", [0, 5])
def test_step_counter_with_a_stride_labels_flow_with_its_own_batch(start):
    torch.manual_seed(0)
    net = resnet(8, width=4, block="preact").double()
    mon = gradwatch.Monitor(net, every=10, strict=True)
    steps = list(range(start, 45, 5))
    truth = _grad_out_per_batch(net, steps, mon)
    hist = mon.history()
    param_steps = set(hist[hist.metric == "grad_norm"].step)
    rows = flow_rows(mon)
    flow_steps = set(rows.step)
    assert param_steps == {s for s in steps if s % 10 == 0}
    # the first stride is unknown when the counter does not start on a logging step: that step has no flow
    assert flow_steps == (param_steps if start == 0 else param_steps - {10})
    for s in flow_steps:
        got = rows[(rows.step == s) & (rows.metric == "grad_out")].set_index("name").value
        assert got.to_dict() == pytest.approx(truth[s], rel=1e-10)  # this batch's gradients, no other's
    mon.close()


class _AddRes(nn.Module):
    def __init__(self, n=6):
        super().__init__()
        self.f = nn.Linear(n, n)

    def forward(self, x):
        return x + self.f(x)


def test_torchscript_submodule_is_skipped_and_reported_once(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), _AddRes(), torch.jit.script(_AddRes()), _AddRes(), nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        mon = gradwatch.Monitor(model, optimizer=opt, every=1, strict=True)
        for step in range(3):
            model(torch.randn(4, 6)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    notes = [r.getMessage() for r in caplog.records if "TorchScript" in r.getMessage()]
    assert len(notes) == 1 and "blocks: 2 (" in notes[0]
    assert {"1", "3"} <= set(flow_rows(mon).name)  # the scripted block's merge may be found by its parent
    assert set(flow_rows(mon).step) == {0, 1, 2}
    assert not mon.errors
    mon.close()


def _hooks_left(model, opt):
    mods = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return mods + len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


def test_failed_construction_leaves_no_hooks_and_no_writer(tmp_path, monkeypatch):
    import gradwatch.monitor as monitor_module

    model = resnet(8, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def broken(*args, **kwargs):
        raise RuntimeError("cannot hook")

    with monkeypatch.context() as m:
        m.setattr(monitor_module, "FlowProbe", broken)
        with pytest.raises(RuntimeError, match="cannot hook"):
            gradwatch.Monitor(model, optimizer=opt, log_dir=tmp_path / "a")
    assert _hooks_left(model, opt) == 0
    assert not (tmp_path / "a").exists()  # the probe is built before the writer opens
    with pytest.raises(TypeError, match="writer"):  # a failure after the probe: its hooks are removed
        gradwatch.Monitor(model, optimizer=opt, writer=object())
    assert _hooks_left(model, opt) == 0


def test_unfired_and_dead_norms_reuse_cached_constants(monkeypatch):
    import sys

    net = resnet(8, width=4, skip_fault={1: "detached"})
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    mon = gradwatch.Monitor(net, optimizer=opt, every=1, strict=True)

    def run(step):
        x, y = batch(seed=step)
        F.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()

    run(0)
    run(1)
    real = torch.tensor

    def guarded(*args, **kwargs):
        assert not sys._getframe(1).f_globals["__name__"].startswith("gradwatch.flow"), "a tensor per constant norm"
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", guarded)
    run(2)
    monkeypatch.undo()
    rows = flow_rows(mon)
    dead = rows[(rows.metric == "skip_grad") & (rows.step == 2)].value
    assert (dead == 0.0).sum() == 1
    mon.close()


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {}
        for label, kwargs in (("local", {"sync_ranks": False}), ("auto", {})):
            torch.manual_seed(0)
            net = DDP(resnet(8, width=4))
            opt = torch.optim.SGD(net.parameters(), lr=0.05)
            mon = gradwatch.Monitor(net, optimizer=opt, every=1, strict=True, rules=False, **kwargs)
            x, y = batch(seed=10 + rank)  # each rank its own data: its own activations
            F.cross_entropy(net(x), y).backward()
            opt.step()
            mon.close()
            rows = flow_rows(mon)
            result[label] = rows[rows.metric == "grad_out"].set_index("name").value.to_dict()
            del net  # DDP's reducer before the process group goes
        torch.save(result, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while the other still talks to it (one SIGABRT in a CI run)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_flow_norms_are_the_global_batches(tmp_path):
    """Each rank's mean loss makes its activation gradients 2x the global batch's (2 ranks): the synced norm is
    sqrt(sum of the ranks' squares) / 2, what one process over both batches gives (docs/distributed.md)."""

    spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["local"] and r0["local"].keys() == r1["local"].keys()
    assert r0["local"] != pytest.approx(r1["local"])  # unsynced: each rank its own values
    assert r0["auto"] == r1["auto"]  # DDP model: synced, every rank the same verdict
    for name, v in r0["auto"].items():
        global_sq = (r0["local"][name] ** 2 + r1["local"][name] ** 2) / 2 ** 2
        assert v == pytest.approx(global_sq ** 0.5, rel=1e-5)


def test_a_model_without_residual_merges_is_reported_as_none_not_unavailable(caplog):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    mon = gradwatch.Monitor(model, every=1, strict=True)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        for _ in range(5):
            model(torch.randn(3, 4)).sum().backward()
            mon.step()
            model.zero_grad()
    assert mon.flow_status.state == "none"
    assert "unavailable" not in caplog.text
    assert set(mon.history().metric) == {"grad_norm", "weight_norm", "grad_to_weight", *gradwatch.health.HEALTH}


class _ForwardCheckpointed(nn.Module):
    """What transformers 5.x does under gradient_checkpointing_enable(use_reentrant=True): the layer's own
    ``__call__`` checkpoints its bare ``forward``, so module hooks never see the recomputed graph."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)

    def __call__(self, x):
        if self.training:
            return checkpoint(self.block.forward, x, use_reentrant=True)
        return super().__call__(x)


def test_reentrant_checkpointing_that_hides_the_graph_says_so_once_and_how_to_fix_it(caplog):
    torch.manual_seed(0)
    net = resnet(8, width=4)
    stages = [net.layer1, net.layer2, net.layer3]
    for stage in stages:
        for i in range(len(stage)):
            stage[i] = _ForwardCheckpointed(stage[i])
    mon = gradwatch.Monitor(net, every=1, strict=True)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        for s in range(3):
            x, y = batch(seed=s)
            F.cross_entropy(net(x), y).backward()
            mon.step()
            net.zero_grad()
    status = mon.flow_status
    assert status.state == "unavailable" and "reentrant activation checkpointing" in status.reason
    assert "use_reentrant': False" in status.reason
    assert sum("reentrant" in r.getMessage() for r in caplog.records) == 1
    assert set(mon.history().step) == {0, 1, 2}  # parameter metrics go on


def _count_compiles(monitor: str | None) -> int:
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = resnet(8, width=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    mon = gradwatch.Monitor(net, optimizer=opt, every=1) if monitor == "before compile" else None
    compiled = torch.compile(net, backend=backend)
    if monitor == "on the compiled model":
        mon = gradwatch.Monitor(compiled, optimizer=opt, every=1)
    for s in range(4):
        x, y = batch(seed=s)
        F.cross_entropy(compiled(x), y).backward()
        opt.step()
        opt.zero_grad()
    if mon is not None:
        assert set(mon.history().step) == {0, 1, 2, 3} and not mon.errors
        mon.close()
    torch._dynamo.reset()
    return len(compiles)


@pytest.mark.parametrize("monitor", ["before compile", "on the compiled model"])
def test_the_monitor_causes_no_recompile(monitor):
    """dynamo guards on a module's hooks: a hook removed after the first compile would force a second one."""
    assert _count_compiles(monitor) == _count_compiles(None)


def test_a_second_backward_through_a_collected_step_changes_nothing(monkeypatch):
    # collected steps leave their hooks in place as no-ops (cheaper than removing them one by one)
    torch.manual_seed(0)
    net = resnet(8, width=4)
    mon = gradwatch.Monitor(net, every=1, strict=True)  # stepped by hand: no weight changes in between
    mon.probe.keep_vectors = True
    x, y = batch()
    loss = F.cross_entropy(net(x), y)
    loss.backward(retain_graph=True)
    mon.step()
    before = flow_rows(mon).sort_values(["step", "name", "metric"]).value.to_numpy()
    vectors = {k: {n: v.clone() for n, v in d.items()} for k, d in mon.probe.vectors.items()}
    net.zero_grad()
    norms = []
    norm = _hooks._norm
    monkeypatch.setattr(_hooks, "_norm", lambda g: norms.append(1) or norm(g))
    loss.backward()  # the retained graph: every hook of step 0 fires again, and must do nothing
    assert not norms
    after = flow_rows(mon).sort_values(["step", "name", "metric"]).value.to_numpy()
    np.testing.assert_array_equal(before, after)
    for k, d in vectors.items():
        assert all(torch.equal(v, mon.probe.vectors[k][n]) for n, v in d.items())
    assert not mon.errors


def test_a_block_added_mid_run_is_measured_within_eight_logging_steps():
    torch.manual_seed(0)
    net = resnet(8, width=4)
    seen = {}

    def grow(model, step):
        if step == 3:
            model.layer3.append(BasicBlock(16, 16))

    def names(step):
        rows = flow_rows(mon)
        return set(rows[rows.step == step].name)

    _, mon = train(net, 14, dict(every=1, strict=True), extra=grow)
    for step in range(14):
        seen[step] = names(step)
    assert "layer3.1" not in seen[2]
    assert "layer3.1" in seen[13] and seen[13] > seen[2]
    assert not mon.errors


def test_a_forward_that_raises_midway_leaves_the_next_steps_measured():
    # arming waits for the end of the model's forward; a forward that never ends must not hold it forever
    torch.manual_seed(0)
    net = resnet(8, width=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    mon = gradwatch.Monitor(net, optimizer=opt, every=1)
    boom = net.layer3.register_forward_pre_hook(lambda m, a: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # layer1 and layer2 have run and armed (deferred)
        net(batch()[0])
    boom.remove()
    sgd_steps(net, opt, range(3))
    rows = flow_rows(mon)
    assert sorted(rows.step.unique()) == [0, 1, 2] and np.isfinite(rows.value).all()
    assert set(rows[rows.step == 2].name) == {"layer1.0", "layer2.0", "layer3.0"}
    assert not mon.errors


def test_blocks_called_without_the_models_forward_are_measured():
    # e.g. a LightningModule whose training_step calls its backbone: the model's own forward never runs
    torch.manual_seed(0)
    net = resnet(8, width=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    mon = gradwatch.Monitor(net, optimizer=opt, every=1, strict=True)
    for step in range(3):
        x, y = batch(seed=step)
        h = net.relu(net.bn1(net.conv1(x)))
        h = net.layer3(net.layer2(net.layer1(h)))
        F.cross_entropy(net.fc(h.mean((2, 3))), y).backward()
        opt.step()
        opt.zero_grad()
    rows = flow_rows(mon)
    assert sorted(rows.step.unique()) == [0, 1, 2] and np.isfinite(rows.value).all()
    assert set(rows[rows.step == 2].name) == {"layer1.0", "layer2.0", "layer3.0"}


class _TiedRes(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc(torch.relu(x))


class _Tied(nn.Module):  # one block applied three times (ALBERT, universal transformers)
    def __init__(self, width):
        super().__init__()
        self.b = _TiedRes(width)

    def forward(self, x):
        return self.b(self.b(self.b(x)))


class _TiedNet(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.inp, self.enc, self.out = nn.Linear(4, width), _Tied(width), nn.Linear(width, 3)

    def forward(self, x):
        return self.out(self.enc(self.inp(x)))


def test_a_module_around_blocks_does_not_claim_their_merges_while_their_arming_waits():
    # blocks are armed at the end of the model's forward, but an enclosing module examined before then must
    # still see their merges as taken: the shared block's three calls (each a block of its own), nothing for
    # its container
    torch.manual_seed(0)
    net = _TiedNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    mon = gradwatch.Monitor(net, optimizer=opt, every=1, strict=True)
    sgd_steps(net, opt, range(3), data=lambda _: (torch.randn(6, 4), torch.randint(0, 3, (6,))))
    assert [b.name for b in mon.describe()] == ["enc.b@0", "enc.b@1", "enc.b@2"]
    assert {b.module for b in mon.describe()} == {"enc.b"}
    rows = flow_rows(mon)
    assert set(rows.name) == {"enc.b@0", "enc.b@1", "enc.b@2"} and np.isfinite(rows.value).all()
    assert not mon.errors


def test_watching_a_stage_after_the_first_step_adds_no_duplicate_blocks():
    torch.manual_seed(0)
    net = resnet(14, width=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    mon = gradwatch.Monitor(net, optimizer=opt, every=1)
    sgd_steps(net, opt, [0])
    before = [b.name for b in mon.describe()]
    mon.watch_block(net.layer2, name="stage2")  # a container of blocks, not a block: its merges are theirs
    sgd_steps(net, opt, [1, 2])
    after = [b.name for b in mon.describe()]
    assert after == before and len(set(after)) == len(after)
    rows = flow_rows(mon)
    assert set(rows[rows.step == 2].name) == set(before)
