"""GradWatchCallback with real Lightning Trainers on CPU; TensorBoard event files read back.

Every value gradwatch writes is compared with an independent float64 computation made by a second callback
(``Recorder``) at ``on_before_optimizer_step`` and, for ``update_to_weight``, across the optimizer step.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
import types
import urllib.parse

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import gradwatch
from gradwatch.reference.blocks import resnet

NAMESPACES = [
    pytest.param("lightning.pytorch", id="lightning"),
    pytest.param("pytorch_lightning", id="pytorch_lightning"),
]
RTOL = 1e-5
METRICS = ("grad_norm", "weight_norm", "grad_to_weight", "update_to_weight")


def ns(name: str):
    return pytest.importorskip(name)


def dataset(n: int = 48, size: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))


def make_module(pl, *, manual: bool = False, two_optimizers: bool = False, fused: bool = False, batch: int = 8):
    """A LightningModule over ``resnet(20, width=8)`` for the namespace ``pl``."""

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = resnet(20, width=8)
            self.automatic_optimization = not manual

        def forward(self, x):
            return self.net(x)

        def training_step(self, b, i):
            x, y = b
            loss = F.cross_entropy(self.net(x), y)
            self.log("loss", loss)
            if not manual:
                return loss
            opts = self.optimizers()
            opts = opts if isinstance(opts, list) else [opts]
            self.manual_backward(loss)
            for opt in opts:
                opt.step()
                opt.zero_grad()
            return None

        def configure_optimizers(self):
            if two_optimizers:
                early = [p for n, p in self.net.named_parameters() if n.startswith(("conv1", "bn1", "layer1"))]
                late = [p for n, p in self.net.named_parameters() if not n.startswith(("conv1", "bn1", "layer1"))]
                return [torch.optim.SGD(early, lr=0.05), torch.optim.Adam(late, lr=1e-3)]
            if fused:
                return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

        def train_dataloader(self):
            return DataLoader(dataset(), batch_size=batch)

    return Lit()


def make_recorder(pl):
    """An independent reference: per-layer norms in float64 at on_before_optimizer_step, per optimizer."""

    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.values: dict[tuple[int, int, str, str], float] = {}  # (opt index, step, layer, metric)
            self._before: dict = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            k = [id(o) for o in trainer.optimizers].index(id(optimizer))
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            scale = 1.0
            if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
                scale = scaler.get_scale()
            tot_g = tot_w = 0.0
            for name, mod in pl_module.named_modules():
                own = [p for p in mod._parameters.values() if p is not None and id(p) in held and p.grad is not None]
                if not own:
                    continue
                g2 = sum(float((p.grad.double() / scale).pow(2).sum()) for p in own)
                w2 = sum(float(p.detach().double().pow(2).sum()) for p in own)
                tot_g, tot_w = tot_g + g2, tot_w + w2
                self._put(k, step, name, g2, w2)
                self._before[(k, step, name)] = (own, [p.detach().double().clone() for p in own], w2)
            self._put(k, step, "_global", tot_g, tot_w)

        def _put(self, k, step, name, g2, w2):
            self.values[(k, step, name, "grad_norm")] = math.sqrt(g2)
            self.values[(k, step, name, "weight_norm")] = math.sqrt(w2)
            self.values[(k, step, name, "grad_to_weight")] = math.sqrt(g2) / math.sqrt(w2)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            totals: dict = {}
            for (k, step, name), (own, before, w2) in self._before.items():
                d2 = sum(float((p.detach().double() - b).pow(2).sum()) for p, b in zip(own, before))
                self.values[(k, step, name, "update_to_weight")] = math.sqrt(d2) / math.sqrt(w2)
                t = totals.setdefault((k, step), [0.0, 0.0])
                t[0] += d2
                t[1] += w2
            for (k, step), (d2, w2) in totals.items():
                self.values[(k, step, "_global", "update_to_weight")] = math.sqrt(d2) / math.sqrt(w2)
            self._before.clear()

        def steps(self, k: int = 0) -> set[int]:
            return {s for (kk, s, _, _) in self.values if kk == k}

    return Recorder()


def trainer_kwargs(tmp_path, **kw):
    base = dict(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    base.update(kw)
    return base


def tb_logger(pl, tmp_path, name="tb"):
    return importlib.import_module(pl.__name__ + ".loggers").TensorBoardLogger(str(tmp_path), name=name, version=0)


def values(ev):
    """The scalars and the per-layer series of an event folder read back, in one dict of tags."""
    return {**ev["scalars"], **ev["series"]}


def check_against(recorder, scalars, k=0, namespace="gradwatch", steps=None):
    """Every gradwatch scalar at every recorded step equals the recorder's value."""
    steps = recorder.steps(k) if steps is None else steps
    checked = 0
    for (kk, step, name, metric), ref in recorder.values.items():
        if kk != k or step not in steps:
            continue
        tag = gradwatch.sinks.tags.Tags(namespace).layer(metric, name)
        assert tag in scalars, f"missing {tag}"
        got = scalars[tag][step]
        assert got == pytest.approx(ref, rel=RTOL, abs=1e-12), (tag, step, got, ref)
        checked += 1
    assert checked
    return checked


# ---------------------------------------------------------------------------------------------- construction
def test_callback_is_a_callback_of_every_installed_namespace():
    from gradwatch.integrations.lightning import NAMESPACES as found
    from gradwatch.integrations.lightning import GradWatchCallback

    cb = GradWatchCallback()
    assert found
    for name in found:
        assert isinstance(cb, importlib.import_module(name).Callback)
    assert cb.monitor is None and cb.history().empty


@pytest.mark.parametrize(
    "kwargs, exc, text",
    [
        ({"every": 0}, ValueError, "every"),
        ({"every": 2.5}, TypeError, "every"),
        ({"every": True}, TypeError, "every"),
        ({"granularity": "block"}, ValueError, "granularity"),
        ({"include": 3}, TypeError, "include"),
        ({"exclude_types": [int]}, TypeError, "exclude_types"),
        ({"prefix": 1}, TypeError, "prefix"),
        ({"prog_bar": "yes"}, TypeError, "prog_bar"),
        ({"histograms": None}, TypeError, "histograms"),
        ({"model": object()}, TypeError, "model"),  # the callback sets it
        ({"no_such_option": 1}, TypeError, "no_such_option"),  # neither the callback's nor Monitor's
        # Monitor's alert arguments, checked by gradwatch's own alert code now rather than at fit start
        ({"on_critical": "bogus"}, ValueError, "on_critical"),
        ({"rules": {"nope": {}}}, ValueError, "nope"),
        ({"rules": {"vanishing": {"no_such_option": 1}}}, TypeError, "vanishing"),
        ({"rules": "nonfinite"}, TypeError, "rules"),
        ({"remind_steps": -3}, ValueError, "remind_steps"),
        ({"remind_steps": 1.5}, TypeError, "remind_steps"),  # a wrong type is a TypeError, never coerced
        ({"alert_cooldown": 3}, TypeError, "alert_cooldown"),  # the pre-release spelling is gone
        ({"alert_sinks": "http://hook"}, TypeError, "alert_sinks"),
    ],
)
def test_arguments_are_validated_at_construction(kwargs, exc, text):
    from gradwatch.integrations.lightning import GradWatchCallback

    with pytest.raises(exc, match=text):
        GradWatchCallback(**kwargs)


# ---------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("name", NAMESPACES)
def test_fit_writes_reference_values_to_tensorboard(name, tmp_path, events):
    pl = ns(name)
    from gradwatch.integrations.lightning import GradWatchCallback

    cb, rec = GradWatchCallback(), make_recorder(pl)
    trainer = pl.Trainer(
        callbacks=[cb, rec], logger=tb_logger(pl, tmp_path), log_every_n_steps=2, **trainer_kwargs(tmp_path, max_steps=6)
    )
    trainer.fit(make_module(pl))
    scalars = values(events(os.path.join(tmp_path, "tb", "version_0")))

    # every=None follows log_every_n_steps=2: step 0, then the steps self.log writes at (1, 3, 5).
    loss_steps = set(scalars["loss"])
    assert loss_steps == {1, 3, 5}
    assert set(scalars["zz_gradwatch.layers/grad_norm/_global"]) == {0} | loss_steps
    assert cb.every is None and cb.monitor.every == 2
    n = check_against(rec, scalars, steps={0, 1, 3, 5})
    assert n == 4 * 4 * len(cb.monitor.layer_names + ["_global"])
    assert "zz_gradwatch.layers/grad_to_weight" in events(os.path.join(tmp_path, "tb", "version_0"))["histograms"]
    # Block flow (forward-side hooks) is armed on the callback's logging batches, not the Monitor's own cadence.
    flow = [t for t in scalars if t.startswith("zz_gradwatch.blocks/skip_share/")]
    assert len(flow) == 9 and all(set(scalars[t]) == {0, 1, 3, 5} for t in flow)
    # The in-memory history holds the same values.
    hist = cb.monitor.history()
    row = hist[(hist.step == 3) & (hist.name == "net.conv1") & (hist.metric == "grad_norm")]
    assert row.value.item() == pytest.approx(rec.values[(0, 3, "net.conv1", "grad_norm")], rel=RTOL)
    assert not cb.errors and not cb.monitor.errors


@pytest.mark.parametrize("name", NAMESPACES)
def test_the_training_loss_reaches_the_records_one_step_late(name, tmp_path):
    # Lightning hands the loss over in on_train_batch_end, after the step's measurement: each record carries
    # the previous step's loss (the instability rule reads its trend over 10 logging steps)
    pl = ns(name)
    from gradwatch.integrations.lightning import GradWatchCallback

    class Losses(pl.Callback):
        def __init__(self) -> None:
            self.seen: dict[int, float] = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen[trainer.global_step - 1] = float(outputs["loss"])

    cb, losses = GradWatchCallback(every=1), Losses()
    pl.Trainer(callbacks=[cb, losses], logger=False, **trainer_kwargs(tmp_path, max_steps=4)).fit(make_module(pl))
    got = {r.step: r.loss for r in cb.monitor.records}
    assert got[0] is None and {s: got[s] for s in (1, 2, 3)} == {s: pytest.approx(losses.seen[s - 1]) for s in (1, 2, 3)}
    assert not cb.errors and not cb.monitor.errors


def test_accumulated_gradients_are_measured_once_per_optimizer_step(tmp_path, events):
    pl = ns("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatchCallback

    cb, rec = GradWatchCallback(every=1), make_recorder(pl)
    trainer = pl.Trainer(
        callbacks=[cb, rec],
        logger=tb_logger(pl, tmp_path),
        accumulate_grad_batches=2,
        log_every_n_steps=1,
        **trainer_kwargs(tmp_path, max_steps=3),
    )
    trainer.fit(make_module(pl))
    scalars = values(events(os.path.join(tmp_path, "tb", "version_0")))
    assert set(scalars["zz_gradwatch.layers/grad_norm/_global"]) == {0, 1, 2} == set(scalars["loss"])
    check_against(rec, scalars)

    # Independent of Lightning: step 0 sees (grad(batch 0) + grad(batch 1)) / 2 at the initial weights.
    ref = make_module(pl)
    loader = iter(DataLoader(dataset(), batch_size=8))
    for _ in range(2):
        x, y = next(loader)
        (F.cross_entropy(ref.net(x), y) / 2).backward()
    g = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in ref.parameters()))
    assert scalars["zz_gradwatch.layers/grad_norm/_global"][0] == pytest.approx(g, rel=RTOL)


def test_gradients_are_measured_before_clipping(tmp_path, events):
    pl = ns("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatchCallback

    cb = GradWatchCallback(every=1)
    trainer = pl.Trainer(
        callbacks=[cb], logger=tb_logger(pl, tmp_path), gradient_clip_val=1e-3, **trainer_kwargs(tmp_path, max_steps=1)
    )
    trainer.fit(make_module(pl))
    scalars = values(events(os.path.join(tmp_path, "tb", "version_0")))
    ref = make_module(pl)
    x, y = dataset()[0:8]
    F.cross_entropy(ref.net(x), y).backward()
    g = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in ref.parameters()))
    assert g > 100 * 1e-3
    assert scalars["zz_gradwatch.layers/grad_norm/_global"][0] == pytest.approx(g, rel=RTOL)  # not clipped
    # The update across the step is the clipped one: SGD(lr=0.05), no momentum buffer yet -> ||dw|| <= 0.05 * 1e-3.
    w = scalars["zz_gradwatch.layers/weight_norm/_global"][0]
    assert scalars["zz_gradwatch.layers/update_to_weight/_global"][0] * w == pytest.approx(0.05 * 1e-3, rel=1e-3)


def test_bf16_mixed(tmp_path, events):
    pl = ns("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatchCallback

    cb, rec = GradWatchCallback(every=1), make_recorder(pl)
    trainer = pl.Trainer(
        callbacks=[cb, rec], logger=tb_logger(pl, tmp_path), precision="bf16-mixed", **trainer_kwargs(tmp_path)
    )
    trainer.fit(make_module(pl))
    scalars = values(events(os.path.join(tmp_path, "tb", "version_0")))
    assert set(scalars["zz_gradwatch.layers/grad_norm/_global"]) == {0, 1, 2, 3}
    check_against(rec, scalars)


@pytest.mark.parametrize(
    "fused, track_updates", [(True, True), (False, True), (True, False)], ids=["fused", "foreach", "fused-no-updates"]
)
def test_grad_scaler_values_are_unscaled_and_overflow_steps_are_not_recorded(fused, track_updates, tmp_path, events):
    """fp16 AMP on CPU: Lightning maps precision="16-mixed" to bf16 on CPU, so the plugin is passed explicitly.

    A huge initial scale makes steps 0 and 1 overflow (the scaler skips them and backs off 2**30 -> 2**20 -> 2**10).
    """
    pl = ns("lightning.pytorch")
    from lightning.pytorch.plugins import MixedPrecision

    from gradwatch.integrations.lightning import GradWatchCallback

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30, backoff_factor=2.0**-10)
    cb, rec = GradWatchCallback(every=1, track_updates=track_updates), make_recorder(pl)
    trainer = pl.Trainer(
        callbacks=[cb, rec],
        logger=tb_logger(pl, tmp_path),
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        **trainer_kwargs(tmp_path),
    )
    module = make_module(pl, fused=True) if fused else make_module(pl)
    if not fused:  # same optimizer family, unscaled by Lightning before on_before_optimizer_step
        module.configure_optimizers = lambda: torch.optim.Adam(module.parameters(), lr=1e-3)
    trainer.fit(module)
    scalars = values(events(os.path.join(tmp_path, "tb", "version_0")))

    assert not math.isfinite(rec.values[(0, 0, "_global", "grad_norm")])  # the overflow really happened
    assert set(scalars["zz_gradwatch.layers/grad_norm/_global"]) == {2, 3}  # skipped steps are not reported
    assert all(math.isfinite(v) for tag, d in scalars.items() if "/" in tag for v in d.values())
    if track_updates:
        check_against(rec, scalars, steps={2, 3})
    else:
        assert "zz_gradwatch.layers/update_to_weight/_global" not in scalars
        rec.values = {k: v for k, v in rec.values.items() if k[3] != "update_to_weight"}
        check_against(rec, scalars, steps={2, 3})

    # Unscaled: at step 2 the weights are still the initial ones (both earlier steps were skipped), so the
    # gradient must match a float32 computation on batch 2 up to fp16 autocast error, not be 1024 times larger.
    ref = make_module(pl)
    x, y = dataset()[16:24]
    F.cross_entropy(ref.net(x), y).backward()
    g = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in ref.parameters()))
    assert scalars["zz_gradwatch.layers/grad_norm/_global"][2] == pytest.approx(g, rel=2e-2)
    assert scaler.get_scale() == 2.0**10


def test_two_optimizers_each_measured_at_its_own_step_with_distinct_names(tmp_path, events):
    pl = ns("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatchCallback

    cb, rec = GradWatchCallback(every=1), make_recorder(pl)
    trainer = pl.Trainer(
        callbacks=[cb, rec], logger=tb_logger(pl, tmp_path), log_every_n_steps=1, **trainer_kwargs(tmp_path, max_steps=6)
    )
    trainer.fit(make_module(pl, manual=True, two_optimizers=True))
    scalars = values(events(os.path.join(tmp_path, "tb", "version_0")))

    assert set(cb.monitors) == {"optimizer_0", "optimizer_1"}
    # Two optimizer steps per batch: global_step is 6, the self.log axis counts 3 batches.
    assert trainer.global_step == 6 and set(scalars["loss"]) == {0, 1, 2}
    assert set(scalars["zz_gradwatch.optimizer_0.layers/grad_norm/_global"]) == {0, 1, 2} == set(scalars["zz_gradwatch.optimizer_1.layers/grad_norm/_global"])
    assert "zz_gradwatch.optimizer_0.layers/grad_norm/net.conv1" in scalars and "zz_gradwatch.optimizer_1.layers/grad_norm/net.fc" in scalars
    assert "zz_gradwatch.optimizer_1.layers/grad_norm/net.conv1" not in scalars and "zz_gradwatch.layers/grad_norm/_global" not in scalars
    # Block flow is measured once, with the first optimizer's monitor.
    assert any(t.startswith("zz_gradwatch.optimizer_0.blocks/skip_share/") for t in scalars)
    assert not any(t.startswith("zz_gradwatch.optimizer_1.blocks/skip_share/") for t in scalars)
    check_against(rec, scalars, k=0, namespace="gradwatch.optimizer_0")
    check_against(rec, scalars, k=1, namespace="gradwatch.optimizer_1")
    names = set(cb.history().name)
    assert {"optimizer_0/_global", "optimizer_1/_global", "optimizer_1/net.fc"} <= names


@pytest.mark.parametrize("name", NAMESPACES)
def test_manual_optimization(name, tmp_path, events):
    pl = ns(name)
    from gradwatch.integrations.lightning import GradWatchCallback

    cb, rec = GradWatchCallback(every=2), make_recorder(pl)
    trainer = pl.Trainer(callbacks=[cb, rec], logger=tb_logger(pl, tmp_path), **trainer_kwargs(tmp_path))
    trainer.fit(make_module(pl, manual=True))
    scalars = values(events(os.path.join(tmp_path, "tb", "version_0")))
    assert set(scalars["zz_gradwatch.layers/grad_norm/_global"]) == {0, 1, 3}
    check_against(rec, scalars, steps={0, 1, 3})


# ---------------------------------------------------------------------------------------------- destinations
def test_csv_logger_gets_flat_scalar_dicts(tmp_path):
    pl = ns("lightning.pytorch")
    import pandas as pd
    from lightning.pytorch.loggers import CSVLogger

    from gradwatch.integrations.lightning import GradWatchCallback

    cb, rec = GradWatchCallback(every=1, layer_scalars=True), make_recorder(pl)  # per-layer keys: opt-in
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = pl.Trainer(callbacks=[cb, rec], logger=logger, log_every_n_steps=1, **trainer_kwargs(tmp_path))
    trainer.fit(make_module(pl))
    df = pd.read_csv(os.path.join(tmp_path, "csv", "version_0", "metrics.csv"))
    col = "zz_gradwatch.layers/grad_to_weight/net.layer1.0.conv1"
    rows = df.dropna(subset=[col])
    assert sorted(rows.step) == [0, 1, 2, 3]
    for step, value in zip(rows.step, rows[col]):
        assert value == pytest.approx(rec.values[(0, step, "net.layer1.0.conv1", "grad_to_weight")], rel=RTOL)
    assert sorted(df.dropna(subset=["loss"]).step) == [0, 1, 2, 3]  # the same step axis as self.log


def test_without_logger_writes_under_default_root_dir_and_says_so_once(tmp_path, events, caplog):
    pl = ns("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatchCallback

    cb = GradWatchCallback(every=1)
    with caplog.at_level("INFO"):
        pl.Trainer(callbacks=[cb], logger=False, **trainer_kwargs(tmp_path, max_steps=2)).fit(make_module(pl))
        pl.Trainer(callbacks=[cb], logger=False, **trainer_kwargs(tmp_path, max_steps=2)).fit(make_module(pl))
    path = os.path.join(tmp_path, "gradwatch")
    assert cb.log_dir == path
    assert set(events(path)["scalars"]["zz_gradwatch.layers/grad_norm/_global"]) == {0, 1}
    assert sum("has no logger" in r.getMessage() for r in caplog.records) == 1


def test_prog_bar_shows_early_layer_ratio(tmp_path):
    pl = ns("lightning.pytorch")
    from gradwatch.integrations.lightning import PROG_BAR_KEY, GradWatchCallback

    cb = GradWatchCallback(every=1, prog_bar=True)
    trainer = pl.Trainer(callbacks=[cb], logger=False, **trainer_kwargs(tmp_path, max_steps=2))
    trainer.fit(make_module(pl))
    hist = cb.monitor.history()
    early = cb.monitor.layer_names[: gradwatch.names.early_count(len(cb.monitor.layer_names))]
    last = hist[(hist.step == 1) & (hist.metric == "grad_to_weight") & hist.name.isin(early)].value.max()
    assert float(trainer.progress_bar_metrics[PROG_BAR_KEY]) == pytest.approx(last, rel=1e-6)
    assert PROG_BAR_KEY not in trainer.logged_metrics


def test_filters_that_select_nothing_fail_at_fit_start(tmp_path):
    pl = ns("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatchCallback

    trainer = pl.Trainer(callbacks=[GradWatchCallback(include="no_such_layer*")], logger=False, **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match="nothing to measure"):
        trainer.fit(make_module(pl))


@pytest.mark.parametrize("on_critical", ["stop", "raise"])
def test_a_monitor_asking_to_stop_stops_the_trainer(on_critical, tmp_path, monkeypatch):
    """Alert policy ``on_critical="stop"`` sets ``Monitor.should_stop``; the callback turns it into
    ``trainer.should_stop`` through ``strategy.reduce_boolean_decision`` (the same decision on every rank)."""
    pl = ns("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatchCallback
    from gradwatch.monitor import Monitor

    monkeypatch.setattr(Monitor, "should_stop", property(lambda self: self.measured_steps >= 2), raising=False)
    cb = GradWatchCallback(every=1, on_critical=on_critical)
    trainer = pl.Trainer(callbacks=[cb], logger=False, **trainer_kwargs(tmp_path, max_steps=10))
    trainer.fit(make_module(pl))
    assert trainer.global_step == 2


@pytest.mark.parametrize(
    "kwargs, calls", [({}, 0), ({"rules": False, "on_critical": "stop"}, 0), ({"on_critical": "stop"}, 4)],
    ids=["warn", "alerting-off", "stop"],
)
def test_stop_decision_is_reduced_across_ranks_only_when_a_policy_can_stop(kwargs, calls, tmp_path, monkeypatch):
    """``reduce_boolean_decision`` is an all_reduce plus a host sync: under the default ``on_critical="warn"``
    (or with alerting off) no monitor can ever stop, so it must not run at all; under "stop" once per logging
    batch (all ranks take part)."""
    pl = ns("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatchCallback

    cb = GradWatchCallback(every=1, **kwargs)
    trainer = pl.Trainer(callbacks=[cb], logger=False, **trainer_kwargs(tmp_path, max_steps=4))
    seen = []
    real = trainer.strategy.reduce_boolean_decision
    monkeypatch.setattr(
        trainer.strategy, "reduce_boolean_decision", lambda d, all=True: seen.append(d) or real(d, all)
    )
    trainer.fit(make_module(pl))
    assert len(seen) == calls and trainer.global_step == 4


def test_fit_start_errors_other_than_empty_filters_are_not_reported_as_nothing_to_measure(tmp_path):
    pl = ns("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatchCallback

    cb = GradWatchCallback(blocks=[torch.nn.Linear(2, 2)])  # not a submodule: Monitor's own ValueError
    trainer = pl.Trainer(callbacks=[cb], logger=False, **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match="not a submodule") as info:
        trainer.fit(make_module(pl))
    assert "nothing to measure" not in str(info.value)


def _alert_rules(**nonfinite):
    """Only the ``nonfinite`` rule (with the given options): the fault below fires nothing else."""
    from gradwatch.alerts import RULES

    return {name: (nonfinite if name == "nonfinite" else False) for name in RULES}


def _nan_from(pl, first_step: int):
    """A module whose gradients are NaN from step ``first_step`` on (on the ``self.log`` step axis)."""
    module = make_module(pl)

    def on_after_backward():
        if module.trainer.fit_loop.epoch_loop._batches_that_stepped >= first_step:
            module.net.fc.weight.grad.fill_(float("nan"))

    module.on_after_backward = on_after_backward
    return module


def test_csv_logger_only_still_writes_the_alert_record(tmp_path):
    """Without a TensorBoard logger the monitors' writer has no directory of its own: alerts.jsonl goes to the
    CSVLogger's log_dir, so the record of a fired alert is never lost."""
    pl = ns("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger

    from gradwatch.alerts import read_alerts
    from gradwatch.integrations.lightning import GradWatchCallback

    cb = GradWatchCallback(every=1, rules=_alert_rules())
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = pl.Trainer(callbacks=[cb], logger=logger, **trainer_kwargs(tmp_path, max_steps=3))
    trainer.fit(_nan_from(pl, 1))
    assert [(a.rule, a.step) for a in cb.monitor.alerts] == [("nonfinite", 1)]
    path = os.path.join(tmp_path, "csv", "version_0", "alerts.jsonl")
    assert [(a.rule, a.step) for a in read_alerts(path)] == [("nonfinite", 1)]


def test_flat_logger_without_log_dir_gets_records_and_the_alert_record_falls_back_to_default_root_dir(tmp_path):
    pl = ns("lightning.pytorch")
    from lightning.pytorch.loggers import Logger

    from gradwatch.alerts import read_alerts
    from gradwatch.integrations.lightning import GradWatchCallback

    class NoDir(Logger):
        """A logger whose log_dir needs a live experiment (raises), like some remote trackers."""

        name, version = "nodir", 0
        logged: list = []

        @property
        def log_dir(self):
            raise RuntimeError("experiment not started")

        def log_metrics(self, metrics, step):
            self.logged.append((step, dict(metrics)))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    logger = NoDir()
    cb = GradWatchCallback(every=1, rules=_alert_rules())
    trainer = pl.Trainer(callbacks=[cb], logger=logger, **trainer_kwargs(tmp_path, max_steps=3))
    trainer.fit(_nan_from(pl, 1))
    ours = [(step, m) for step, m in logger.logged if "zz_gradwatch.layers/grad_norm/_global" in m]
    assert [step for step, _ in ours] == [0, 1, 2]  # one flat dict per logging step
    assert ours[1][1]["zz_gradwatch.alerts/count"] == 1.0 and "zz_gradwatch.layers/grad_norm" not in ours[0][1]
    assert ours[1][1]["zz_gradwatch.layers/nonfinite/grad_norm"] > 0 and ours[0][1]["zz_gradwatch.layers/nonfinite/grad_norm"] == 0  # as TensorBoard has
    path = os.path.join(tmp_path, "gradwatch", "alerts.jsonl")
    assert [(a.rule, a.step) for a in read_alerts(path)] == [("nonfinite", 1)]


# ---------------------------------------------------------------------------------------------- costs
def test_fused_amp_scale_is_passed_as_a_device_tensor_without_get_scale(tmp_path, monkeypatch):
    """``scaler.get_scale()`` is an ``.item()`` host sync: the callback hands the scale tensor to the driver."""
    pl = ns("lightning.pytorch")
    from lightning.pytorch.plugins import MixedPrecision

    from gradwatch.driver import StepDriver
    from gradwatch.integrations.lightning import GradWatchCallback

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    monkeypatch.setattr(scaler, "get_scale", lambda: pytest.fail("get_scale() called (a host sync)"))
    scales = []
    real = StepDriver.begin
    monkeypatch.setattr(
        StepDriver, "begin", lambda self, step, **kw: scales.append(kw["grad_scale"]) or real(self, step, **kw)
    )
    cb = GradWatchCallback(every=1, strict=True)
    trainer = pl.Trainer(
        callbacks=[cb], logger=False, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        **trainer_kwargs(tmp_path, max_steps=2),
    )
    trainer.fit(make_module(pl, fused=True))
    assert len(scales) == 2 and all(isinstance(s, torch.Tensor) for s in scales)
    assert set(cb.monitor.history().step) == {0, 1}


def test_overflow_step_is_discarded_without_a_host_transfer(tmp_path, monkeypatch):
    """A non-fused optimizer that GradScaler skipped: the pending measurement is dropped (StepDriver.discard),
    not finished (cat + .cpu()) and then thrown away."""
    pl = ns("lightning.pytorch")
    from lightning.pytorch.plugins import MixedPrecision

    from gradwatch.integrations.lightning import GradWatchCallback
    from gradwatch.measure.meter import Meter

    finished = []
    real = Meter.finish
    monkeypatch.setattr(Meter, "finish", lambda self, pending: finished.append(pending) or real(self, pending))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30, backoff_factor=2.0**-10)  # steps 0 and 1 overflow
    cb = GradWatchCallback(every=1, strict=True)
    trainer = pl.Trainer(
        callbacks=[cb], logger=False, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        **trainer_kwargs(tmp_path),
    )
    module = make_module(pl)
    module.configure_optimizers = lambda: torch.optim.Adam(module.parameters(), lr=1e-3)
    trainer.fit(module)
    assert len(finished) == 2  # only the steps taken (2 and 3) were moved to the host
    assert set(cb.monitor.history().step) == {2, 3} and cb.monitor.measured_steps == 4


def test_a_discarded_step_records_nothing():
    from gradwatch.driver import StepDriver
    from gradwatch.monitor import Monitor

    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    mon = Monitor(model, blocks=None, strict=True)
    driver = StepDriver(mon)
    assert driver.begin(0)
    driver.discard()
    driver.end()  # nothing pending any more
    assert mon.history().empty and mon.global_step == 1
    assert driver.begin(1)
    driver.end()
    assert set(mon.history().step) == {1}


@pytest.mark.parametrize("given, expected", [({}, True), ({"sync_ranks": False}, False)])
def test_monitors_sync_ranks_unless_told_otherwise(given, expected, tmp_path):
    """Every rank runs the callback, so per-rank block-flow norms can be all-reduced (Monitor(sync_ranks=...))."""
    pl = ns("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatchCallback

    cb = GradWatchCallback(every=1, **given)
    pl.Trainer(callbacks=[cb], logger=False, **trainer_kwargs(tmp_path, max_steps=1)).fit(make_module(pl))
    assert cb.monitor.config.sync_ranks is expected


# ---------------------------------------------------------------------------------------------- resume
def test_resume_from_checkpoint_continues_the_step_axis(tmp_path, events):
    pl = ns("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatchCallback

    kw = dict(log_every_n_steps=1)
    cb1 = GradWatchCallback(every=1)
    t1 = pl.Trainer(callbacks=[cb1], logger=tb_logger(pl, tmp_path), **kw, **trainer_kwargs(tmp_path, max_steps=3))
    t1.fit(make_module(pl))
    ckpt = os.path.join(tmp_path, "mid.ckpt")
    t1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"][cb1.state_key]
    assert saved["monitors"]["optimizer_0"]["step"] == 3

    cb2 = GradWatchCallback(every=1)
    t2 = pl.Trainer(callbacks=[cb2], logger=tb_logger(pl, tmp_path), **kw, **trainer_kwargs(tmp_path, max_steps=6))
    t2.fit(make_module(pl), ckpt_path=ckpt)
    scalars = values(events(os.path.join(tmp_path, "tb", "version_0")))
    assert set(scalars["zz_gradwatch.layers/grad_norm/_global"]) == set(range(6)) == set(scalars["loss"])
    assert set(cb2.monitor.history().step) == {3, 4, 5}
    assert cb2.monitor.global_step == 6 and cb2.state_dict()["monitors"]["optimizer_0"]["step"] == 6


def test_alert_rule_streaks_survive_a_resume(tmp_path):
    """nonfinite with patience 3, NaN gradients from step 2: steps 2 (first fit), 3 and 4 (resumed fit) make the
    streak; it fires at step 4, which it only does if the streak was saved in the checkpoint and restored."""
    pl = ns("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatchCallback

    kw = dict(log_every_n_steps=1, logger=False)
    cb1 = GradWatchCallback(every=1, rules=_alert_rules(patience=3))
    t1 = pl.Trainer(callbacks=[cb1], **kw, **trainer_kwargs(tmp_path, max_steps=3))
    t1.fit(_nan_from(pl, 2))
    assert cb1.monitor.alerts == []
    ckpt = os.path.join(tmp_path, "mid.ckpt")
    t1.save_checkpoint(ckpt)

    cb2 = GradWatchCallback(every=1, rules=_alert_rules(patience=3))
    t2 = pl.Trainer(callbacks=[cb2], **kw, **trainer_kwargs(tmp_path, max_steps=6))
    t2.fit(_nan_from(pl, 2), ckpt_path=ckpt)
    assert [(a.rule, a.step) for a in cb2.monitor.alerts] == [("nonfinite", 4)]


def test_an_open_incident_survives_a_resume_and_shows_in_the_progress_bar(tmp_path):
    """NaN gradients from step 1: the incident opens at step 1 in the first fit; the resumed fit restores it
    (no second "opened"), shows it as gw_alerts, and each fit's end sends its summary."""
    pl = ns("lightning.pytorch")
    from gradwatch.integrations.lightning import PROG_BAR_ALERTS_KEY, GradWatchCallback

    got = []
    kw = dict(log_every_n_steps=1, logger=False)
    cb1 = GradWatchCallback(every=1, rules=_alert_rules(), alert_sinks=[got.append])
    t1 = pl.Trainer(callbacks=[cb1], **kw, **trainer_kwargs(tmp_path, max_steps=3))
    t1.fit(_nan_from(pl, 1))
    assert float(t1.progress_bar_metrics[PROG_BAR_ALERTS_KEY]) == 1.0
    ckpt = os.path.join(tmp_path, "mid.ckpt")
    t1.save_checkpoint(ckpt)

    cb2 = GradWatchCallback(every=1, rules=_alert_rules(), alert_sinks=[got.append])
    t2 = pl.Trainer(callbacks=[cb2], **kw, **trainer_kwargs(tmp_path, max_steps=6))
    t2.fit(_nan_from(pl, 1), ckpt_path=ckpt)
    assert [(e.kind, e.rule, e.step) for e in got] == [("opened", "nonfinite", 1)]  # not again after resume
    (incident,) = cb2.monitor.incidents
    assert incident.open and incident.opened_step == 1 and incident.last_step == 5 and incident.held == 5
    assert [a.step for a in cb2.monitor.alerts] == [1]  # restored from the checkpoint
    assert float(t2.progress_bar_metrics[PROG_BAR_ALERTS_KEY]) == 1.0
    assert PROG_BAR_ALERTS_KEY not in t2.logged_metrics


# ---------------------------------------------------------------------------------------------- installs
_BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in {blocked!r}):
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)")
sys.meta_path.insert(0, Block())
"""


def _run_blocked(blocked: tuple[str, ...], body: str) -> subprocess.CompletedProcess:
    code = _BLOCKER.format(blocked=blocked) + textwrap.dedent(body)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)


@pytest.mark.parametrize(
    "blocked, present",
    [(("pytorch_lightning",), "lightning.pytorch"), (("lightning",), "pytorch_lightning")],
    ids=["only-lightning", "only-pytorch_lightning"],
)
def test_import_works_with_only_one_package_installed(blocked, present):
    pytest.importorskip(present)
    body = f"""
    import importlib
    from gradwatch.integrations.lightning import GradWatchCallback, NAMESPACES
    assert NAMESPACES == ({present!r},), NAMESPACES
    cb = GradWatchCallback(every=3)
    assert isinstance(cb, importlib.import_module({present!r}).Callback)
    print("ok")
    """
    out = _run_blocked(blocked, body)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_import_without_any_lightning_says_what_to_install():
    out = _run_blocked(
        ("lightning", "pytorch_lightning"),
        """
        try:
            import gradwatch.integrations.lightning
        except ImportError as err:
            print("ImportError:", err)
        """,
    )
    assert "pip install lightning" in out.stdout, out.stderr[-2000:]


def test_the_users_metrics_keep_their_place_on_the_trainers_tensorboard(tmp_path, caplog):
    """gradwatch's tags sit in their own sections; the trainer's TensorBoardLogger also gets the layout and the
    pictures; a CSV logger gets the same scalar tags."""
    pl = ns("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatchCallback

    def training_step(self, b, i):
        x, y = b
        out = self.net(x)
        loss = F.cross_entropy(out, y)
        self.log("train_loss", loss)
        self.log("train_acc", (out.argmax(1) == y).float().mean())
        return loss

    module = make_module(pl)
    module.training_step = types.MethodType(training_step, module)

    csv = importlib.import_module(pl.__name__ + ".loggers").CSVLogger(str(tmp_path), name="csv", version=0)
    cb = GradWatchCallback(every=2, pictures=2)
    trainer = pl.Trainer(callbacks=[cb], logger=[tb_logger(pl, tmp_path), csv],
                         log_every_n_steps=2, **trainer_kwargs(tmp_path, max_steps=6))
    with caplog.at_level("INFO"):
        trainer.fit(module)
    # TensorBoard opens _gradwatch and epoch: the link said once pins the user's charts (in their log order)
    # above them; its query is TensorBoard's pinnedCards JSON (docs/dashboard.md shows it in a browser)
    url = urllib.parse.urlsplit(cb.dashboard_link)
    assert (url.netloc, url.path, url.fragment) == ("localhost:6006", "/", "timeseries")
    pins = json.loads(urllib.parse.parse_qs(url.query)["pinnedCards"][0])
    assert pins == [{"plugin": "scalars", "tag": "train_loss"}, {"plugin": "scalars", "tag": "train_acc"}]
    assert sum(cb.dashboard_link in r.getMessage() for r in caplog.records) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(tmp_path, "tb", "version_0"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    groups = sorted({t.split("/")[0] for t in tags["scalars"] + tags["histograms"] + tags["images"]})
    # TensorBoard's order (character codes: "_" < lowercase): the health section first, the user's groups,
    # then gradwatch's bulk (tests/test_dashboard.py reads the same order from a real TensorBoard server)
    assert groups == ["_gradwatch", "epoch", "train_acc", "train_loss", "zz_gradwatch.alerts", "zz_gradwatch.blocks",
                      "zz_gradwatch.health", "zz_gradwatch.layers", "zz_gradwatch.pictures"]
    assert "custom_scalars__config__" in tags["tensors"] and "zz_gradwatch.pictures/profile" in tags["images"]
    header = open(os.path.join(tmp_path, "csv", "version_0", "metrics.csv")).readline().strip().split(",")
    assert "zz_gradwatch.health/4_grad_norm_log10" in header and "zz_gradwatch.layers/grad_to_weight/_global" in header
    assert "zz_gradwatch.layers/grad_to_weight/net.conv1" not in header  # bounded: per-layer values are opt-in
