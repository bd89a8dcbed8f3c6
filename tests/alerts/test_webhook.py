"""WebhookSink against a real HTTP server on 127.0.0.1: formats, failures, 429, slowness, redaction."""

from __future__ import annotations

import json
import logging
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from helpers.webhook_server import WebhookServer, dead_url

import gradwatch
from gradwatch.alerts import read_alerts
from gradwatch.alerts import Rule

SECRET = "SECRETTOKEN"


class EveryStep(Rule):
    """Fires a warning about a different layer at every logging step (so no cooldown holds it back)."""

    name = "every_step"

    def __init__(self):
        super().__init__(patience=1)

    def check(self, m):
        return [self.alert(m, "warning", f"layer{m.step}", 1.0, 0.5, f"test alert {m.step}", "none needed")]


def run(sink, tmp_path, steps=3, **kw):
    """Train a tiny model for ``steps`` steps with one alert per step; returns (monitor, slowest mon.step())."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gradwatch.Monitor(model, every=1, rules=[EveryStep()], alert_sinks=[sink],
                            alerts_path=tmp_path / "alerts.jsonl", **kw)
    slowest = 0.0
    for i in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,))).backward()
        t = time.perf_counter()
        mon.step()
        slowest = max(slowest, time.perf_counter() - t)
        opt.step()
    return mon, slowest


def failures(tmp_path):
    lines = [json.loads(s) for s in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    return [ln for ln in lines if ln["event"] == "delivery_failed"]


@pytest.mark.parametrize("fmt", ["slack", "json"])
def test_alerts_arrive_in_slack_and_json_format(fmt, tmp_path):
    with WebhookServer() as srv:
        sink = gradwatch.WebhookSink(srv.url, format=fmt, min_interval=0, title="exp-7")
        mon, _ = run(sink, tmp_path, steps=2)
        mon.close()  # flushes the queue
        got = srv.received
    assert len(got) == 3 and sink.sent == 3 and sink.failed == 0  # two openings, then the run's summary
    assert all(r["path"] == "/services/T0/B0/SECRETTOKEN" for r in got)
    assert got[0]["headers"]["Content-Type"] == "application/json"
    if fmt == "slack":
        assert set(got[0]["json"]) == {"text"}
        text = got[1]["json"]["text"]
        assert text.startswith(":warning: *exp-7 warning* — `every_step` in `layer1` opened at step 1")
        assert "test alert 1" in text and "none needed" in text
        assert got[2]["json"]["text"].startswith(":clipboard: *exp-7* — run summary at step 1: 2 incidents")
    else:
        body = got[1]["json"]
        assert body["source"] == "exp-7"
        assert {k: body[k] for k in ("event", "state", "rule", "severity", "step", "name", "value", "threshold")} == {
            "event": "opened", "state": "open", "rule": "every_step", "severity": "warning", "step": 1,
            "name": "layer1", "value": 1.0, "threshold": 0.5}
        assert body["message"] == "test alert 1" and body["hint"] == "none needed"
        assert body["incident"] != got[0]["json"]["incident"] and body["held_back"] == 0
        assert got[2]["json"]["event"] == "summary" and len(got[2]["json"]["incidents"]) == 2
    assert failures(tmp_path) == []


def test_min_severity_keeps_info_local(tmp_path):
    class Info(EveryStep):
        def check(self, m):
            return [self.alert(m, "info", None, 0.0, 0.0, "fyi", "-")]

    with WebhookServer() as srv:
        sink = gradwatch.WebhookSink(srv.url, min_interval=0)  # default min_severity="warning"
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        mon = gradwatch.Monitor(model, every=1, rules=[Info()], alert_sinks=[sink], alerts_path=tmp_path / "a.jsonl")
        model(torch.randn(2, 3)).sum().backward()
        mon.step()
        mon.close()
        assert srv.received == [] and len(mon.alerts) == 1
    assert len(read_alerts(tmp_path / "a.jsonl")) == 1


def test_server_down_training_goes_on_failure_recorded_url_redacted(tmp_path, caplog):
    url = dead_url()
    sink = gradwatch.WebhookSink(url, timeout=0.5, retries=1, backoff=0.05, min_interval=0, summary=False)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        mon, slowest = run(sink, tmp_path, steps=3)
        mon.close()
    assert slowest < 0.5  # send() only queues
    assert [a.step for a in read_alerts(tmp_path / "alerts.jsonl")] == [0, 1, 2]  # the record has them all
    failed = failures(tmp_path)
    assert len(failed) == 3 and sink.failed == 3 and sink.sent == 0
    assert all("after 2 attempts" in f["error"] for f in failed)
    assert {f["alert"]["step"] for f in failed} == {0, 1, 2}
    assert any("not delivered" in r.getMessage() for r in caplog.records)
    everything = caplog.text + (tmp_path / "alerts.jsonl").read_text() + repr(sink) + sink.url
    assert SECRET not in everything and "/services/" not in everything
    assert sink.url == f"http://127.0.0.1:{url.split(':')[2].split('/')[0]}/…"


def test_server_answering_500_is_retried_then_recorded(tmp_path):
    with WebhookServer(script=[500, 200]) as srv:
        sink = gradwatch.WebhookSink(srv.url, timeout=1, retries=2, backoff=0.05, min_interval=0, summary=False)
        mon, _ = run(sink, tmp_path, steps=1)
        mon.close()
        assert len(srv.received) == 2  # one 500, then the retry succeeded
    assert sink.sent == 1 and failures(tmp_path) == []

    with WebhookServer(script=[500]) as srv:
        sink = gradwatch.WebhookSink(srv.url, timeout=1, retries=2, backoff=0.05, min_interval=0, summary=False)
        mon, _ = run(sink, tmp_path, steps=1)
        mon.close()
        assert len(srv.received) == 3
    (fail,) = failures(tmp_path)
    assert "HTTP 500" in fail["error"] and "after 3 attempts" in fail["error"]


def test_429_retry_after_is_honoured(tmp_path):
    with WebhookServer(script=[(429, 1), 200]) as srv:
        sink = gradwatch.WebhookSink(srv.url, timeout=1, retries=2, backoff=0.01, min_interval=0, summary=False)
        mon, slowest = run(sink, tmp_path, steps=1)
        mon.close()
        got = srv.received
    assert len(got) == 2 and sink.sent == 1 and failures(tmp_path) == []
    assert got[1]["time"] - got[0]["time"] >= 0.95  # waited as asked, not the 0.01 s backoff
    assert slowest < 0.5


def test_slow_server_never_blocks_training_and_close_waits_a_bounded_time(tmp_path):
    with WebhookServer(script=[("slow", 3.0)]) as srv:
        sink = gradwatch.WebhookSink(srv.url, timeout=0.3, retries=0, min_interval=0, wait=1.0, summary=False)
        mon, slowest = run(sink, tmp_path, steps=12)  # 12 x 0.3 s of timeouts > the 1 s + 1 s budgets
        t = time.perf_counter()
        mon.close()  # the monitor only flushes a sink it was given: bounded by the sink's wait, sink stays open
        flushing = time.perf_counter() - t
        assert not sink.closed
        t = time.perf_counter()
        sink.close()
        closing = time.perf_counter() - t
    assert slowest < 0.5 and flushing < 1.5 and closing < 2.0
    failed = failures(tmp_path)
    assert len(failed) == 12 and sink.sent == 0  # timed out, or left when the close time ran out
    assert any("timed out" in f["error"].lower() for f in failed)
    assert any("close timeout" in f["error"] for f in failed)
    assert [a.step for a in read_alerts(tmp_path / "alerts.jsonl")] == list(range(12))


def test_a_full_queue_drops_new_posts_as_failures_and_never_waits(tmp_path):
    with WebhookServer(script=[("slow", 0.5)]) as srv:
        sink = gradwatch.WebhookSink(srv.url, timeout=2.0, retries=0, min_interval=0, wait=5.0, summary=False,
                                     queue_size=2, max_per_hour=None)
        mon, slowest = run(sink, tmp_path, steps=8)  # one post in flight, two waiting: the rest are dropped
        mon.close()
        sink.close()
    dropped = [f for f in failures(tmp_path) if "queue full (2 posts waiting); dropped" in f["error"]]
    assert slowest < 0.25 and len(dropped) >= 4
    assert sink.sent + sink.failed == 8 and sink.sent == len(srv.received) >= 3
    assert SECRET not in json.dumps(failures(tmp_path))


def test_url_from_the_environment_and_validation(monkeypatch):
    monkeypatch.delenv(gradwatch.sinks.webhook.WEBHOOK_ENV, raising=False)
    with pytest.raises(ValueError, match="GRADWATCH_WEBHOOK_URL"):
        gradwatch.WebhookSink()
    with pytest.raises(ValueError, match="http"):
        gradwatch.WebhookSink("ftp://example.com/hook")
    with pytest.raises(ValueError, match="format"):
        gradwatch.WebhookSink("https://example.com/hook", format="xml")
    monkeypatch.setenv("GRADWATCH_WEBHOOK_URL", f"https://hooks.example.com/services/{SECRET}")
    sink = gradwatch.WebhookSink(format="json")
    assert sink.url == "https://hooks.example.com/…" and SECRET not in repr(sink)
    sink.close(0)


def test_nan_alert_reaches_the_webhook_once_with_the_layer(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    box = {"i": 0}
    model[2].weight.register_hook(lambda g: g * math.nan if box["i"] >= 1 else g)
    with WebhookServer() as srv:
        sink = gradwatch.WebhookSink(srv.url, min_interval=0)
        with gradwatch.Monitor(model, every=1, alert_sinks=[sink], log_dir=tmp_path) as mon:
            for i in range(4):
                box["i"] = i
                model.zero_grad()
                F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,))).backward()
                mon.step()
        texts = [r["json"]["text"] for r in srv.received]
    assert len(texts) == 2 and "nonfinite" in texts[0] and "`2`" in texts[0] and "critical" in texts[0]
    assert "1 incident (1 still open" in texts[1]  # the summary at close


def test_one_sink_shared_by_two_monitors_in_turn_delivers_both(tmp_path):
    # A sink passed in alert_sinks belongs to the caller: mon.close() flushes it, never closes it, so the
    # next monitor (or the next fit of a Lightning callback reusing it) still delivers.
    with WebhookServer() as srv:
        sink = gradwatch.WebhookSink(srv.url, format="json", min_interval=0, summary=False)
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        first, _ = run(sink, tmp_path / "a", steps=2)
        first.close()
        assert len(srv.received) == 2  # flushed at close (bounded wait)
        second, _ = run(sink, tmp_path / "b", steps=3)
        second.close()
        got = srv.wait_for(5)
        sink.close(5.0)
        sink.send(second.alerts[0])  # closed by its owner: now refused, and said so
    assert [r["json"]["step"] for r in got] == [0, 1, 0, 1, 2]
    assert sink.sent == 5 and sink.failed == 1
    assert failures(tmp_path / "a") == []
    assert [f["error"] for f in failures(tmp_path / "b")] == ["the sink is closed"]  # the last one attached

