"""Incidents end to end, on real nets with every sink a user has: the console (the ``gradwatch`` logger),
TensorBoard (event files read back), ``alerts.jsonl``, a webhook (a real HTTP server on 127.0.0.1) and a
callable. The acceptance runs of the incidents issue: a condition held for 10,000 steps, a skip broken and
repaired, a NaN, a resume in the middle of an incident."""

from __future__ import annotations

import collections
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from helpers.webhook_server import WebhookServer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradwatch
from gradwatch.alerts import read_events
from gradwatch.reference.blocks import resnet, set_skip_fault
from gradwatch.reference.data import synthetic_images


class Run:
    """A monitor with every sink, and what each sink received."""

    def __init__(self, model, opt, tmp_path, server, **kw):
        self.got: list = []  # the callable sink
        self.webhook = gradwatch.WebhookSink(server.url, format="json", min_severity="info", min_interval=0)
        self.path = tmp_path
        self.mon = gradwatch.Monitor(model, optimizer=opt, every=1, log_dir=tmp_path,
                                     alert_sinks=[self.webhook, self.got.append], **kw)

    def close(self):
        self.mon.close()
        self.webhook.close(10)

    def console(self, caplog):
        return [r.getMessage() for r in caplog.records if r.name == "gradwatch" and "gradwatch [" in r.getMessage()]

    def posts(self, server):
        return [r["json"] for r in server.received]

    def texts(self):
        acc = EventAccumulator(str(self.path), size_guidance={"tensors": 0, "scalars": 0})
        acc.Reload()
        out = {t.removesuffix("/text_summary"): [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(t)]
               for t in acc.Tags()["tensors"] if t.startswith("zz_gradwatch.alerts/")}
        scalars = {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"] if t.startswith("zz_gradwatch.alerts/")}
        return out, scalars


def count(kinds):
    return collections.Counter(kinds)


# ------------------------------------------------------------------------------------ one condition, 10,000 steps
@pytest.mark.slow
def test_a_condition_held_for_10000_steps_is_one_incident_and_a_few_reminders_on_every_sink(tmp_path, caplog):
    """The issue's run: a 10-layer ReLU MLP (width 32, default init, SGD), every=1, 10,000 steps. Its gradient
    decays ~1,000x toward the input for the whole run (``depth_trend``, info). Reminders every 200, 400, 800...
    logging steps (a wall-time schedule would send none in the ~90 s this takes)."""
    torch.manual_seed(0)
    layers = [m for _ in range(9) for m in (nn.Linear(32, 32), nn.ReLU())]
    model = nn.Sequential(*layers, nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(512, 32), torch.randint(0, 10, (512,))
    with WebhookServer() as server, caplog.at_level(logging.INFO, logger="gradwatch"):
        run = Run(model, opt, tmp_path, server, remind_steps=200, remind_backoff=2.0, histograms=False)
        for _ in range(10_000):
            i = torch.randint(0, 512, (32,))
            opt.zero_grad()
            F.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
        run.close()
        posts = run.posts(server)
    expected = {"opened": 1, "reminder": 5}  # reminders at +200, +600, +1400, +3000, +6200 logging steps
    assert count(e.kind for e in run.got) == expected
    assert {e.rule for e in run.got} == {"depth_trend"} and len({e.id for e in run.got}) == 1
    assert count(p["event"] for p in posts if p["event"] != "summary") == expected
    assert {p["incident"] for p in posts if p["event"] != "summary"} == {run.got[0].id}
    console = run.console(caplog)
    assert len(console) == 6 and all("\n" not in line for line in console)  # one line per event
    assert sum("hint:" in line for line in console) == 1  # the hint once per incident
    events = [d for d in read_events(tmp_path / "alerts.jsonl") if d["event"] != "summary"]
    assert count(d["event"] for d in events) == expected
    texts, scalars = run.texts()
    assert len(texts["zz_gradwatch.alerts/3_info/depth_trend"]) == 6
    open_info = scalars["zz_gradwatch.alerts/open/info"]
    assert len(open_info) == 10_000 and open_info[0] == 0 and open_info[9_999] == 1
    # the end-of-run summary, once per sink
    (summary,) = [p for p in posts if p["event"] == "summary"]
    assert [i["rule"] for i in summary["incidents"]] == ["depth_trend"]
    assert any(r.getMessage().startswith("gradwatch run summary at step 9999: 1 incident (1 still open")
               for r in caplog.records)
    assert "still open" in texts["zz_gradwatch.alerts/summary"][0][1]
    assert run.mon.suppressed_alerts == 10_000 - 2 - 6  # a finding at every step from step 2, six told


# ------------------------------------------------------------------------------------ broken, then repaired
def train_resnet(model, opt, steps, x, y, start=0):
    for s in range(start, start + steps):
        i = torch.arange(s * 8, s * 8 + 8) % len(x)
        opt.zero_grad()
        F.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()


def test_a_detached_skip_repaired_mid_run_opens_then_resolves_its_incident(tmp_path, caplog):
    torch.manual_seed(0)
    model = resnet(20, width=8, skip_fault={4: "detached"})  # block 4 = layer2.1
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = synthetic_images(256, size=8)
    with WebhookServer() as server, caplog.at_level(logging.INFO, logger="gradwatch"):
        run = Run(model, opt, tmp_path, server)
        train_resnet(model, opt, 12, x, y)
        set_skip_fault(model, {4: None})  # repaired
        train_resnet(model, opt, 12, x, y, start=12)
        run.close()
        posts = [p for p in run.posts(server) if p["event"] != "summary"]
    told = [(e.kind, e.rule, e.name, e.step) for e in run.got if e.rule == "skip_collapse"]
    assert told == [("opened", "skip_collapse", "layer2.1", 2), ("resolved", "skip_collapse", "layer2.1", 16)]
    resolved = run.got[-1]
    assert resolved.incident.worst_value == 0.0 and resolved.incident.last_step == 11
    assert [(p["event"], p["state"]) for p in posts if p["rule"] == "skip_collapse"] == [
        ("opened", "open"), ("resolved", "resolved")]
    assert len({p["incident"] for p in posts if p["rule"] == "skip_collapse"}) == 1
    (resolved_line,) = [r for r in caplog.records if "skip_collapse resolved at step 16 (layer2.1)" in r.getMessage()]
    assert resolved_line.levelno == logging.WARNING  # at the incident's level: a console that showed it opening
    summary_line = next(r for r in caplog.records if r.getMessage().startswith("gradwatch run summary"))
    assert summary_line.levelno == logging.WARNING and "1 resolved" in summary_line.getMessage()
    _, scalars = run.texts()
    warning = scalars["zz_gradwatch.alerts/open/warning"]
    assert warning[1] == 0 and warning[2] == 1 and warning[15] == 1 and warning[16] == 0  # when it started, ended
    assert [i.open for i in run.mon.incidents if i.rule == "skip_collapse"] == [False]


# ------------------------------------------------------------------------------------ NaN: one critical, no storm
def test_a_nan_is_one_critical_incident_and_no_warning_storm_after_it(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    step = {"i": 0}
    model[2].weight.register_hook(lambda g: g * math.nan if step["i"] == 5 else g)  # NaN reaches the weights
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    with WebhookServer() as server:
        run = Run(model, opt, tmp_path, server)
        for i in range(40):
            step["i"] = i
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        run.close()
        posts = [p for p in run.posts(server) if p["event"] != "summary"]
    assert [(e.kind, e.rule, e.severity, e.step) for e in run.got] == [("opened", "nonfinite", "critical", 5)]
    assert [(p["event"], p["rule"]) for p in posts] == [("opened", "nonfinite")]
    assert run.mon.incidents[0].open and run.mon.incidents[0].held == 35


# ------------------------------------------------------------------------------------ resume mid-incident
def test_resume_mid_incident_does_not_open_it_again_and_still_resolves_it(tmp_path):
    torch.manual_seed(0)
    model = resnet(20, width=8, skip_fault={4: "detached"})
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = synthetic_images(256, size=8)
    with WebhookServer() as server:
        first = Run(model, opt, tmp_path / "a", server)
        train_resnet(model, opt, 8, x, y)
        checkpoint = json.loads(json.dumps({"gradwatch": first.mon.state_dict()}))  # JSON-like, as saved
        first.close()
        opened = [e for e in first.got if e.kind == "opened"]
        assert [(e.rule, e.step) for e in opened] == [("skip_collapse", 2)]

        second = Run(model, opt, tmp_path / "b", server)
        second.mon.load_state_dict(checkpoint["gradwatch"])
        assert [i.id for i in second.mon.incidents if i.open] == [opened[0].id]
        assert [a.rule for a in second.mon.alerts] == ["skip_collapse"]  # restored
        train_resnet(model, opt, 4, x, y, start=8)
        set_skip_fault(model, {4: None})
        train_resnet(model, opt, 8, x, y, start=12)
        second.close()
        posts = [p for p in second.posts(server) if p["event"] != "summary"]
    assert [(e.kind, e.step) for e in second.got] == [("resolved", 16)]
    assert second.got[0].id == opened[0].id and second.got[0].incident.opened_step == 2
    assert [p["event"] for p in posts].count("opened") == 1  # the first run's, not a second one


# ------------------------------------------------------------------------------------ the webhook's rate limit
class NewLayerEveryStep(gradwatch.Rule):
    """A new condition at every step (a storm): warning, and critical at step 5."""

    name = "storm"

    def __init__(self):
        super().__init__(patience=1)

    def check(self, m):
        sev = "critical" if m.step == 5 else "warning"
        return [self.alert(m, sev, f"layer{m.step}", 1.0, 0.5, f"storm {m.step}", "none")]


def test_the_webhook_rate_limit_holds_back_counts_and_lets_critical_through(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with WebhookServer() as server:
        sink = gradwatch.WebhookSink(server.url, min_interval=0, max_per_hour=3)
        mon = gradwatch.Monitor(model, optimizer=opt, every=1, rules=[NewLayerEveryStep()], alert_sinks=[sink],
                                alerts_path=tmp_path / "a.jsonl", resolve_after=100)
        for _ in range(10):
            opt.zero_grad()
            F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,))).backward()
            opt.step()
        mon.close()
        sink.close(10)
        texts = [r["json"]["text"] for r in server.received]
    # steps 0-2 posted (3 in the hour), 3-4 held, the critical at 5 goes through and says what was held,
    # 6-9 held, and the summary (never held) says so too
    assert len(texts) == 5 and sink.held == 6
    assert "storm 5" in texts[3] and "2 earlier messages held back" in texts[3]
    assert texts[4].startswith(":clipboard: *gradwatch* — run summary at step 9: 10 incidents (10 still open")
    assert "4 earlier messages held back" in texts[4]
    assert len([d for d in read_events(tmp_path / "a.jsonl") if d["event"] == "opened"]) == 10  # none lost


def test_slack_groups_a_steps_events_into_one_message(tmp_path):
    class Three(gradwatch.Rule):
        name = "three"

        def __init__(self):
            super().__init__(patience=1)

        def check(self, m):
            return [self.alert(m, "warning", f"block{k}", 0.0, 1e-3, f"block{k} collapsed", "fix it")
                    for k in range(3)] if m.step == 0 else []

    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with WebhookServer() as server:
        sink = gradwatch.WebhookSink(server.url, min_interval=0)
        mon = gradwatch.Monitor(model, optimizer=opt, every=1, rules=[Three()], alert_sinks=[sink],
                                alerts_path=False, resolve_after=2)
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            opt.step()
        mon.close()
        sink.close(10)
        texts = [r["json"]["text"] for r in server.received]
    assert len(texts) == 3  # opened x3 in one message, resolved x3 in one message, the summary
    assert texts[0].count("opened at step 0") == 3 and texts[0].count("_hint:_") == 3
    assert texts[1].count("resolved* — `three`") == 3 and texts[1].count("at step 2") == 3
