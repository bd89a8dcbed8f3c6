"""The TensorBoard sink's fast path: scalars encoded once per tag, written off the training thread, with a C
CRC-32C behind tensorboard's record writer — and event files that read back exactly as before."""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as slow_crc
from helpers import read_events
from torch.utils.tensorboard import SummaryWriter

import gradwatch
from gradwatch.sinks.tensorboard import _fastcrc
from gradwatch.sinks._worker import Worker
from gradwatch.reference.blocks import resnet
from gradwatch.sinks.tensorboard.sink import _ScalarBytes


def test_encoded_scalars_are_byte_identical_to_summary_values():
    names = tuple(f"layer{i}.conv" for i in range(200)) + ("_global", "é/ü" * 40, "")
    values = np.random.default_rng(0).standard_normal(len(names))
    values[3], values[4], values[5] = math.nan, math.inf, -math.inf
    enc = _ScalarBytes()
    got = Summary.FromString(enc.encode("gw/grad_norm/", names, values))
    ref = Summary(value=[Summary.Value(tag=f"gw/grad_norm/{n}", simple_value=v) for n, v in zip(names, values.tolist())])
    assert got.SerializeToString() == ref.SerializeToString()
    again = Summary.FromString(enc.encode("gw/grad_norm/", names, values * 2))  # the cached tags, new values
    assert [v.simple_value for v in again.value][:3] == pytest.approx((values[:3] * 2).tolist(), rel=1e-6)


def test_the_c_crc_matches_tensorboards_and_is_installed_by_the_sink(tmp_path):
    pytest.importorskip("google_crc32c")
    gradwatch.TensorBoardSink(SummaryWriter(str(tmp_path)))
    assert _fastcrc.installed()
    from tensorboard.summary.writer import record_writer

    for data in (b"", os.urandom(1), os.urandom(1000), os.urandom(123_457)):
        assert record_writer.masked_crc32c(data) == slow_crc(data)


def test_the_step_is_written_on_the_sinks_thread_and_reads_back_after_flush(tmp_path):
    model = resnet(8, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, log_dir=tmp_path)
    sink = mon._out.owned[0]  # the TensorBoard sink the monitor made for log_dir
    threads = []
    add = sink._events.add_summary
    sink._events.add_summary = lambda *a, **k: (threads.append(threading.current_thread().name), add(*a, **k))
    for s in range(3):
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    mon.flush()
    assert threads == ["gradwatch-tensorboard"] * 3
    got = read_events(str(tmp_path))["series"]["zz_gradwatch.layers/grad_norm/conv1"]
    assert sorted(got) == [0, 1, 2]
    assert got[2] == pytest.approx(mon.latest.value("conv1", "grad_norm"), rel=1e-6)
    mon.close()
    assert not any(t.name == "gradwatch-tensorboard" and t.is_alive() for t in threading.enumerate()
                   if t is sink._worker._thread)


def test_the_worker_runs_in_order_contains_errors_and_drains(caplog):
    worker = Worker("test-worker")
    seen = []
    worker.submit(seen.append, 1)
    worker.submit(lambda: 1 / 0)
    worker.submit(seen.append, 2)
    assert worker.drain(5.0) and seen == [1, 2] and worker.errors == 1
    assert "test-worker failed (ZeroDivisionError" in caplog.text
    worker.close()
    worker.submit(seen.append, 3)  # closed: runs inline
    assert seen == [1, 2, 3]


def test_the_worker_offers_without_waiting_and_hands_back_what_a_close_leaves():
    gate = threading.Event()
    worker = Worker("test-offer", size=2)
    ran, left = [], []
    assert worker.offer(gate.wait)  # the thread is in this one until the gate opens
    time.sleep(0.05)
    assert worker.offer(ran.append, 1) and worker.offer(ran.append, 2)
    t = time.perf_counter()
    assert not worker.offer(ran.append, 3)  # two waiting: refused at once, not queued
    assert time.perf_counter() - t < 0.05 and not worker.drain(0.05)
    threading.Timer(0.3, gate.set).start()
    worker.close(0.1, left=left.append)  # the gate is still shut at the timeout: 1 and 2 are handed back
    assert left == [1, 2] and ran == [] and worker.drain(1.0)
    assert not worker.offer(ran.append, 4) and ran == []  # closed: offers are refused


def _train(model, mon, opt, steps, start):
    for step in range(start, start + steps):
        F.cross_entropy(model(torch.randn(4, 8)), torch.randint(0, 3, (4,))).backward()
        mon.step(step)
        opt.step()
        opt.zero_grad()


def test_deleting_log_dir_mid_run_warns_once_recreates_it_and_keeps_the_later_steps(tmp_path, caplog):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    run = tmp_path / "run"
    with caplog.at_level(logging.DEBUG, logger="gradwatch"):
        with gradwatch.Monitor(model, log_dir=run, every=1) as mon:  # the block's exit closes it: nothing raised
            _train(model, mon, opt, 3, start=0)
            mon.flush()
            shutil.rmtree(run)
            _train(model, mon, opt, 4, start=3)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING, [r.getMessage() for r in warnings]
    assert str(run) in warnings[0].getMessage() and "re-created" in warnings[0].getMessage()
    assert not mon.errors
    # the steps after the deletion are in a new event file in the re-created directory, the layout with them
    grad = read_events(str(run))["series"]["zz_gradwatch.layers/grad_norm/0"]
    assert sorted(grad) == [3, 4, 5, 6]
    assert grad[6] == pytest.approx(mon.latest.value("0", "grad_norm"), rel=1e-6)
    acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    assert "custom_scalars__config__" in acc.Tags()["tensors"]


def test_a_log_dir_that_cannot_be_recreated_stops_the_events_with_one_warning_and_close_does_not_raise(tmp_path, caplog):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    parent = tmp_path / "parent"
    run = parent / "run"
    mon = gradwatch.Monitor(model, log_dir=run, every=1, alerts_path=False)
    _train(model, mon, opt, 2, start=0)
    mon.flush()
    shutil.rmtree(parent)
    parent.write_text("a file where the directory was")  # makedirs cannot put the run back
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        _train(model, mon, opt, 3, start=2)
        mon.close()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert str(run) in caplog.records[0].getMessage() and "no longer written" in caplog.records[0].getMessage()


@pytest.mark.parametrize("cls", ["TensorBoardSink", "ScalarsSink", "WebhookSink", "LoggingSink", "CallableSink",
                                 "AlertSink"])
def test_sink_options_are_typed_keyword_only_and_documented(cls):
    """What a sink is fed (a writer, a callable, a URL, a logger) may come first; every option after it is a
    typed keyword-only parameter with an Args entry, visible to help() and IDEs."""
    import inspect
    import re

    sink = getattr(gradwatch.sinks, cls)
    params = list(inspect.signature(sink.__init__).parameters.values())[1:]
    positional = [p.name for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert len(positional) <= 1, f"{cls} takes {positional} positionally"
    doc = inspect.getdoc(sink)
    args = doc[doc.index("Args:"):]
    for p in params:
        assert p.annotation is not inspect.Parameter.empty, f"{cls}({p.name}) has no type"
        assert re.search(rf"^\s+{p.name}: \S", args, re.M), f"{cls}'s docstring has no Args entry for {p.name}"


def test_sink_options_are_checked_with_a_clear_error(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    with pytest.raises(TypeError, match="histograms"):
        gradwatch.TensorBoardSink(writer, histograms="yes")
    with pytest.raises(ValueError, match="pictures"):
        gradwatch.TensorBoardSink(writer, pictures=-1)
    with pytest.raises(TypeError, match="writer"):
        gradwatch.TensorBoardSink("runs/x")
    with pytest.raises(ValueError, match="min_severity"):
        gradwatch.sinks.LoggingSink(min_severity="loud")
    with pytest.raises(TypeError, match="counts"):
        gradwatch.sinks.ScalarsSink(print, counts=1)
    writer.close()
