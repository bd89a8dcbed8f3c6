"""Alert rules on the reference nets and in real integrations: planted skip faults, healthy ResNets trained
200 steps (no false alarms), Lightning ``on_critical="stop"``/``"raise"``, and DDP (one alert sent)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from helpers.webhook_server import WebhookServer, free_port
from helpers.processes import spawn

import gradwatch
from gradwatch.alerts import read_alerts
from gradwatch.reference.blocks import resnet
from gradwatch.reference.data import synthetic_images
from gradwatch.reference.demo import train


def train_net(model, steps, every, batch=8, size=16, seed=0, **kw):
    """The demo's recipe on generated images; returns the monitor."""
    x, y = synthetic_images(512, size=size, seed=seed)
    return train(model, x, y, steps=steps, batch_size=batch, seed=seed, every=every, alerts_path=False, **kw)


# ---------------------------------------------------------------------------------------------- planted faults
@pytest.mark.parametrize("fault", ["detached", ("scaled", 1e-4)], ids=["detached", "scaled"])
def test_planted_skip_fault_fires_skip_collapse_naming_the_block_within_patience(fault):
    torch.manual_seed(0)
    model = resnet(20, width=8, skip_fault={4: fault})  # block 4 = layer2.1
    mon = train_net(model, steps=4, every=1, size=8, rules={"skip_collapse": {"patience": 3}})
    assert "skip_share" in set(mon.history().metric)  # block flow measured the blocks
    hits = [a for a in mon.alerts if a.rule == "skip_collapse"]
    assert [(a.step, a.name) for a in hits] == [(2, "layer2.1")]  # 3rd logging step, only that block
    assert hits[0].value < 1e-6 and hits[0].severity == "warning"


# ---------------------------------------------------------------------------------------------- no false alarms
@pytest.mark.slow
@pytest.mark.parametrize("depth,block", [(56, "postact"), (56, "preact"), (110, "postact"), (110, "preact")])
def test_healthy_resnets_trained_200_steps_fire_no_warning(depth, block, all_threads):
    torch.manual_seed(0)
    mon = train_net(resnet(depth, block=block), steps=200, every=5)
    loud = [a.headline() for a in mon.alerts if a.severity != "info"]
    assert loud == []
    assert mon.measured_steps == 40


# ---------------------------------------------------------------------------------------------- Lightning
def lit_module(pl, nan_from: int | None):
    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
            if nan_from is not None:
                self.net[2].weight.register_hook(
                    lambda g: g * math.nan if self.trainer.global_step >= nan_from else g)

        def training_step(self, b, i):
            return F.cross_entropy(self.net(b[0]), b[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)

    return Lit()


def lit_trainer(pl, tmp_path, cb, max_steps=8):
    return pl.Trainer(callbacks=[cb], accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=str(tmp_path))


def test_lightning_on_critical_stop_ends_fit_early(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatchCallback

    got = []
    cb = GradWatchCallback(every=1, on_critical="stop", alert_sinks=[got.append])
    trainer = lit_trainer(pl, tmp_path, cb)
    trainer.fit(lit_module(pl, nan_from=3))
    assert trainer.global_step == 4  # the NaN step (3) ran, then fit stopped
    assert [(a.rule, a.step, a.name) for a in got] == [("nonfinite", 3, "net.2")]
    assert cb.monitor.alerts == [e.alert for e in got] and cb.monitor.should_stop
    assert [a.rule for a in read_alerts(tmp_path / "gradwatch" / "alerts.jsonl")] == ["nonfinite"]


def test_lightning_on_critical_raise_propagates_out_of_fit(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatchCallback

    trainer = lit_trainer(pl, tmp_path, GradWatchCallback(every=1, on_critical="raise"))
    with pytest.raises(gradwatch.GradientAlarm, match="nonfinite"):
        trainer.fit(lit_module(pl, nan_from=2))
    assert trainer.global_step <= 3


def test_lightning_healthy_run_does_not_stop(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatchCallback

    cb = GradWatchCallback(every=1, on_critical="stop")
    trainer = lit_trainer(pl, tmp_path, cb, max_steps=6)
    trainer.fit(lit_module(pl, nan_from=None))
    assert trainer.global_step == 6 and not cb.monitor.should_stop


# ---------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, port: int, url: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        box = {"i": 0}
        if rank == 0:  # only rank 0's local gradient goes bad; the all-reduce carries it to rank 1
            net[2].weight.register_hook(lambda g: g * math.nan if box["i"] >= 2 else g)
        model = DDP(net)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sink = gradwatch.WebhookSink(url, format="json", min_interval=0, timeout=2)
        mon = gradwatch.Monitor(model, optimizer=opt, every=1, on_critical="stop", alert_sinks=[sink],
                                log_dir=f"{out}/rank{rank}")
        g = torch.Generator().manual_seed(rank)
        steps = 0
        for i in range(6):
            box["i"] = i
            opt.zero_grad()
            F.cross_entropy(model(torch.randn(8, 8, generator=g)), torch.randint(0, 3, (8,), generator=g)).backward()
            opt.step()
            steps += 1
            if mon.should_stop:
                break
        mon.close()
        with open(f"{out}/result{rank}.json", "w") as f:
            json.dump({"alerts": [a.to_dict() for a in mon.alerts], "steps": steps, "stop": mon.should_stop}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_same_verdict_one_alert_sent(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch built without distributed")
    with WebhookServer() as srv:
        spawn(_ddp_worker, args=(free_port(), srv.url, str(tmp_path)), nprocs=2)
        posts = srv.wait_for(2, timeout=5)
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in (0, 1)]
    for res in results:  # the same verdict on both ranks, at the same step
        assert [(a["rule"], a["step"], a["name"]) for a in res["alerts"]] == [("nonfinite", 2, "2")]
        assert res["stop"] and res["steps"] == 3
    # sent once, by rank 0: the incident, then the run's summary
    assert [(p["json"]["event"], p["json"].get("rule")) for p in posts] == [("opened", "nonfinite"), ("summary", None)]
    assert [a.rule for a in read_alerts(tmp_path / "rank0" / "alerts.jsonl")] == ["nonfinite"]
    assert not (tmp_path / "rank1").exists()


# ---------------------------------------------------------------------------------------------- demo
def test_demo_prints_alerts_for_the_broken_net_only(tmp_path, capsys):
    from gradwatch.reference.demo import run_demo

    run_demo(out=str(tmp_path), steps=6, depth=20, every=1, batch_size=8, nets=["postact", "broken_skip"])
    text = capsys.readouterr().out.split("\nAlerts (")[1]
    rows = {line.split()[0]: line.split(None, 1)[1] for line in text.splitlines()[1:3]}
    assert rows["postact"] == "none"
    assert rows["broken_skip"].startswith("skip_collapse@2 (layer2.1)")  # the middle block of ResNet-20
