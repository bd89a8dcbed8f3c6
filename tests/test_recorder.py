"""The flight recorder and ``gradwatch report``'s verdict: when an incident opens, the last N logging steps'
records go to one file next to alerts.jsonl (read back equal to the monitor's own history), the record, the log
line and the webhook name it, the report shows the lead-up, and the exit status says how bad the run was."""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import gradwatch
from gradwatch.cli import main
from gradwatch.reference.blocks import resnet
from helpers.webhook_server import WebhookServer
from helpers.processes import spawn

N = 3  # the ring's length in these runs: shorter than the lead-up, so the oldest steps must have been let go
STEPS = 7
NAN_AT = 5


def _train(log_dir, *, fault=None, nan_at=None, steps=STEPS, **kw):
    """resnet(8) on random batches, every step logged; ``fault="detached"`` cuts the first block's skip (a
    warning: skip_collapse), ``nan_at`` makes every gradient NaN from that step on (critical: nonfinite)."""
    torch.manual_seed(0)
    model = resnet(8, width=4, skip_fault={0: fault} if fault else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kw.setdefault("flight_recorder", N)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, log_dir=log_dir, pictures=0, **kw)
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        loss = F.cross_entropy(model(torch.randn(8, 3, 8, 8, generator=g)), torch.randint(0, 10, (8,), generator=g))
        if nan_at is not None and s >= nan_at:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        opt.zero_grad()
    mon.close()
    return mon


def _opened(log_dir):
    with open(os.path.join(log_dir, "alerts.jsonl"), encoding="utf-8") as f:
        return [e for e in map(json.loads, f) if e.get("event") == "opened"]


def _read(path):
    return pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)


def _files(log_dir):
    return sorted(glob.glob(os.path.join(log_dir, "flight-*")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three real runs (healthy, a warning, a critical one), the last two told to a JSON and a Slack webhook
    on 127.0.0.1, with the gradwatch log lines they made."""
    root = tmp_path_factory.mktemp("runs")
    out = {"root": str(root), "lines": {}, "posts": {}}
    logger = logging.getLogger("gradwatch")
    for name, kw in [("healthy", {}), ("warning", {"fault": "detached"}), ("critical", {"nan_at": NAN_AT})]:
        lines: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record, lines=lines: lines.append(record.getMessage())
        logger.addHandler(handler)
        out["lines"][name] = lines
        try:
            if name == "healthy":  # nothing to tell: no webhook
                out[name] = _train(str(root / name), **kw)
                continue
            with WebhookServer() as json_srv, WebhookServer() as slack_srv:
                sinks = [gradwatch.WebhookSink(json_srv.url, format="json", min_interval=0),
                         gradwatch.WebhookSink(slack_srv.url, format="slack", min_interval=0, summary=False)]
                out[name] = _train(str(root / name), alert_sinks=sinks, **kw)
                for sink in sinks:
                    sink.close()
                out["posts"][name] = {"json": [r["json"] for r in json_srv.received],
                                      "slack": [r["json"]["text"] for r in slack_srv.received]}
        finally:
            logger.removeHandler(handler)
    return out


def test_an_incident_writes_one_file_of_the_last_n_records_equal_to_the_history(runs):
    log_dir = os.path.join(runs["root"], "warning")
    (opened,) = _opened(log_dir)  # one incident: the cut skip
    assert (opened["rule"], opened["name"]) == ("skip_collapse", "layer1.0")
    assert _files(log_dir) == [opened["recording"]]
    assert opened["recording"].endswith(".parquet" if importlib.util.find_spec("pyarrow") else ".csv")
    step = opened["step"]
    assert os.path.basename(opened["recording"]).startswith(f"flight-step{step}-skip_collapse-")
    frame = _read(opened["recording"])
    assert list(frame.columns) == ["step", "name", "metric", "value"]
    assert sorted(frame.step.unique()) == list(range(step - N + 1, step + 1))  # the last N, up to the opening
    history = runs["warning"].history()
    want = history[history.step.between(step - N + 1, step)].set_index(["step", "name", "metric"]).value.sort_index()
    got = frame.set_index(["step", "name", "metric"]).value.sort_index()
    assert got.index.equals(want.index)  # every layer, block and health value of those steps
    np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())  # exactly: float64 round-trips


def test_the_log_line_the_record_and_both_webhooks_name_the_file(runs):
    for name in ("warning", "critical"):
        (opened,) = _opened(os.path.join(runs["root"], name))
        path = opened["recording"]
        assert any(line.startswith("gradwatch [") and line.endswith(f"| recording: {path}")
                   for line in runs["lines"][name]), runs["lines"][name]
        posted = [p for p in runs["posts"][name]["json"] if p.get("event") == "opened"]
        assert [p["recording"] for p in posted] == [path]
        assert sum(f"_lead-up:_ `{path}`" in text for text in runs["posts"][name]["slack"]) == 1
        summary = [p for p in runs["posts"][name]["json"] if p.get("event") == "summary"]
        assert summary and summary[0]["incidents"][0]["recording"] == path  # later events keep naming it


def test_a_nonfinite_gradient_is_recorded_with_its_nans(runs):
    log_dir = os.path.join(runs["root"], "critical")
    (opened,) = _opened(log_dir)  # nonfinite inhibits the rest: one incident told, one file
    assert (opened["rule"], opened["severity"], opened["step"]) == ("nonfinite", "critical", NAN_AT)
    assert _files(log_dir) == [opened["recording"]]
    frame = _read(opened["recording"])
    assert sorted(frame.step.unique()) == list(range(NAN_AT - N + 1, NAN_AT + 1))
    grad = frame[(frame.metric == "grad_norm") & (frame.name == "_global")].set_index("step").value
    assert np.isfinite(grad.loc[: NAN_AT - 1]).all() and np.isnan(grad.loc[NAN_AT])


def test_a_healthy_run_writes_nothing_and_starts_no_thread(runs):
    log_dir = os.path.join(runs["root"], "healthy")
    assert _opened(log_dir) == [] and _files(log_dir) == []
    assert os.listdir(log_dir) and not any(name.startswith(".flight") for name in os.listdir(log_dir))
    assert not any(t.name == "gradwatch flight recorder" for t in threading.enumerate())


def test_report_shows_the_lead_up_and_exits_0_1_2_by_the_worst_incident(runs, capsys):
    root = runs["root"]
    assert main(["report", os.path.join(root, "healthy")]) == 0
    assert "incidents: none" in capsys.readouterr().out
    assert main(["report", os.path.join(root, "warning")]) == 1
    out = capsys.readouterr().out
    (opened,) = _opened(os.path.join(root, "warning"))
    step = opened["step"]
    assert f"lead-up ({os.path.basename(opened['recording'])}: steps {step - N + 1}–{step}, {N} logging steps)" in out
    history = runs["warning"].history()
    share = history[(history.name == "layer1.0") & (history.metric == "skip_share")].set_index("step").value
    row = next(line for line in out.splitlines() if line.strip().startswith("layer1.0 skip_share"))
    assert row.split()[2:2 + N] == [f"{share[s]:.3g}" for s in range(step - N + 1, step + 1)]  # the subject's values
    page = os.path.join(root, "critical.html")
    assert main(["report", os.path.join(root, "critical"), "--html", page]) == 2
    out = capsys.readouterr().out
    assert "[critical] nonfinite" in out and "lead-up (flight-step5-nonfinite-" in out
    with open(page, encoding="utf-8") as f:
        assert "<pre>lead-up (flight-step5-nonfinite-" in f.read()  # the page shows it too
    assert main(["report", root]) == 2  # the worst run of the folder decides
    capsys.readouterr()
    assert main(["report", os.path.join(root, "critical"), "--json"]) == 2
    (run,) = json.loads(capsys.readouterr().out)
    (incident,) = run["incidents"]
    lead = incident["lead_up"]
    assert incident["peak"] == "critical" and lead["steps"] == [NAN_AT - N + 1, NAN_AT, N]
    first = next(s for s in lead["signals"] if (s["name"], s["metric"]) == (incident["name"], "grad_norm"))
    assert incident["name"] == "conv1" and first["subject"] and first["values"][str(NAN_AT)] == "nan"
    history = runs["critical"].history()
    before = history[(history.name == "conv1") & (history.metric == "grad_norm") & (history.step == NAN_AT - 1)]
    assert first["values"][str(NAN_AT - 1)] == before.value.item()


def test_report_exit_status_in_a_real_process_and_the_error_statuses(runs, tmp_path, capsys):
    done = subprocess.run([sys.executable, "-m", "gradwatch", "report", os.path.join(runs["root"], "critical")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "lead-up" in done.stdout, done.stderr
    with pytest.raises(SystemExit) as stop:
        main(["report", "--help"])
    help_text = capsys.readouterr().out
    assert stop.value.code == 0 and "exit status:" in help_text and "64  bad arguments" in help_text
    assert main(["report", str(tmp_path / "missing")]) == 3  # unreadable input
    assert main(["report", os.path.join(runs["root"], "warning"), "--csv", str(tmp_path / "x.txt")]) == 4
    for argv in (["report"], ["report", str(tmp_path), "--no-such-option"], ["report", str(tmp_path), "--top", "0"]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 64, argv  # not argparse's 2: that is "critical" here
    err = capsys.readouterr().err
    assert "unrecognized arguments: --no-such-option" in err and "gradwatch report: error:" in err


def test_a_warning_escalated_to_critical_counts_as_critical_and_untold_incidents_do_not_count(runs, tmp_path,
                                                                                              capsys):
    run = tmp_path / "run"
    shutil.copytree(os.path.join(runs["root"], "healthy"), run)
    base = {"incident": "ab12cd-1", "key": "exploding:_global", "rule": "exploding", "name": None, "message": "m"}
    with open(run / "alerts.jsonl", "a", encoding="utf-8") as f:  # what the engine writes for such a run
        for line in ({**base, "event": "opened", "step": 2, "severity": "warning", "peak": "warning"},
                     {**base, "event": "opened", "incident": "ab12cd-2", "key": "x", "step": 2, "severity": "critical",
                      "peak": "critical", "told": False, "why": "inhibited by ab12cd-0 (nonfinite)"}):
            f.write(json.dumps(line) + "\n")
    assert main(["report", str(run)]) == 1  # the inhibited critical was never told
    capsys.readouterr()
    with open(run / "alerts.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({**base, "event": "escalated", "step": 4, "severity": "critical", "peak": "critical",
                            "previous": "warning"}) + "\n")
    assert main(["report", str(run)]) == 2
    assert "[warning → critical] exploding from step 2" in capsys.readouterr().out


def test_without_alerts_jsonl_the_verdict_comes_from_the_event_files(tmp_path, capsys):
    _train(str(tmp_path / "run"), fault="detached", alerts_path=False, steps=5)
    assert not os.path.exists(tmp_path / "run" / "alerts.jsonl") and _files(str(tmp_path / "run")) == []
    assert main(["report", str(tmp_path / "run")]) == 1  # skip_collapse (a warning) open in the event files
    assert "incidents: no alerts.jsonl in the run's folder; its event files show an incident at warning" in \
        capsys.readouterr().out


def test_off_switch_writes_no_file_and_names_none(tmp_path):
    _train(str(tmp_path), fault="detached", flight_recorder=0, steps=5)
    (opened,) = _opened(str(tmp_path))
    assert opened["recording"] is None and _files(str(tmp_path)) == []


def test_an_unwritable_folder_is_a_logged_skip_and_training_goes_on(tmp_path, caplog):
    (tmp_path / "a_file").write_text("")
    path = tmp_path / "a_file" / "alerts.jsonl"  # its folder is a file: neither the record nor the recording
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        mon = _train(None, fault="detached", alerts_path=path, steps=6)
    assert mon.measured_steps == 6 and not mon.errors and [i.rule for i in mon.incidents] == ["skip_collapse"]
    skipped = [r.getMessage() for r in caplog.records if "flight recorder" in r.getMessage()]
    assert len(skipped) == 1 and "not written" in skipped[0] and "skipped, training goes on" in skipped[0]
    assert mon.incidents[0].recording in skipped[0]


def test_a_bad_option_is_refused():
    with pytest.raises(ValueError, match="flight_recorder"):
        gradwatch.Config(flight_recorder=-1)
    with pytest.raises(TypeError, match="flight_recorder"):
        gradwatch.Monitor(resnet(8, width=4), flight_recorder=True)


def _ddp_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(resnet(8, width=4))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        mon = gradwatch.Monitor(model, optimizer=opt, every=1, log_dir=out, pictures=0, flight_recorder=N)
        for s in range(4):
            g = torch.Generator().manual_seed(10 * s + rank)
            loss = F.cross_entropy(model(torch.randn(4, 3, 8, 8, generator=g)), torch.randint(0, 10, (4,), generator=g))
            (loss * float("nan") if s >= 2 else loss).backward()
            opt.step()
            opt.zero_grad()
        mon.close()
        assert [i.rule for i in mon.incidents] == ["nonfinite"]  # found on both ranks
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_under_ddp_only_the_rank_that_writes_alerts_writes_the_recording(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch built without distributed")
    out = str(tmp_path / "run")
    spawn(_ddp_worker, args=(str(tmp_path / "init"), out), nprocs=2)
    (opened,) = _opened(out)  # incident ids differ per rank: a second writer would leave a second file
    assert _files(out) == [opened["recording"]] and sorted(_read(opened["recording"]).step.unique()) == [0, 1, 2]


def test_the_lead_up_lists_the_subject_then_what_moved_at_least_2x():
    from gradwatch.report.leadup import lead_up

    steps = [10, 20, 30, 40]
    series = {("layer1", "grad_norm"): [1.0, 1.1, 0.9, 1.2],  # the subject: listed whatever it did
              ("layer2", "grad_norm"): [1.0, 1.0, 1.0, 1.5],  # 1.5x: not a mover
              ("layer3", "grad_norm"): [2.0, 2.0, 2.0, 0.02],  # 1/100
              ("layer4", "grad_norm"): [1.0, 1.0, 1.0, float("inf")],  # turned infinite: first
              ("layer5", "grad_norm"): [1.0, 1.0, 1.0, 10.0],  # 10x
              ("layer6", "grad_norm"): [1.0, 1.0, 1.0, 3.0]}  # 3x: a mover, but the fourth
    frame = pd.DataFrame([(s, n, m, v[i]) for (n, m), v in series.items() for i, s in enumerate(steps)],
                         columns=["step", "name", "metric", "value"])
    got = lead_up(frame, "layer1")
    assert got["steps"] == [10, 40, 4]
    assert [(s["name"], s["subject"]) for s in got["signals"]] == [("layer1", True), ("layer4", False),
                                                                   ("layer3", False), ("layer5", False)]
    assert got["signals"][0]["values"] == {"10": 1.0, "20": 1.1, "30": 0.9, "40": 1.2}
    assert got["signals"][1]["change"] == "inf" and got["signals"][2]["change"] == pytest.approx(0.01)
