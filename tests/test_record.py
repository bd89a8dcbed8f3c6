"""The per-step record and the sinks that receive it: history, TensorBoard, user sinks."""

from __future__ import annotations

import glob
import logging
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import small_batch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

import gradwatch
from gradwatch.reference.blocks import resnet


class Collect(gradwatch.Sink):
    def __init__(self) -> None:
        self.records: list[gradwatch.StepRecord] = []
        self.flushed = self.closed = 0

    def write(self, record):
        self.records.append(record)

    def flush(self):
        self.flushed += 1

    def close(self):
        self.closed += 1


def train(model, mon, steps, opt=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05)
    for s in range(steps):
        x, y = small_batch(seed=s)
        F.cross_entropy(model(x), y).backward()
        mon.step()
        opt.step()
        opt.zero_grad()


def test_a_custom_sink_receives_exactly_the_records_the_history_holds():
    model = resnet(8, width=4)
    sink = Collect()
    mon = gradwatch.Monitor(model, every=2, sinks=[sink], strict=True)
    train(model, mon, 5)
    mon.close()
    assert [r.step for r in sink.records] == [0, 2, 4]
    assert sink.records == mon.records and sink.records[-1] is mon.latest
    rows = sum(len(r) for r in sink.records)
    hist = mon.history()
    assert rows == len(hist)
    # Value for value: the long frame is the records, flattened.
    for r in sink.records:
        for metric, names, values in r.series():
            got = hist[(hist.step == r.step) & (hist.metric == metric)].set_index("name").value
            assert list(got.index) == list(names)
            np.testing.assert_array_equal(got.to_numpy(), values)
    assert sink.closed == 0 and sink.flushed == 1  # a sink passed in is flushed at close, not closed


def test_a_record_is_immutable_and_reads_by_name():
    model = resnet(8, width=4)
    mon = gradwatch.Monitor(model, every=1, strict=True)
    train(model, mon, 1)
    r = mon.latest
    with pytest.raises(ValueError):
        r.layer_values[0, 0] = 1.0  # read-only
    with pytest.raises(AttributeError):
        r.step = 3  # frozen
    assert r.layer_metrics == ("grad_norm", "weight_norm", "grad_to_weight")  # no optimizer: no update_to_weight
    g = r.value("conv1", "grad_norm")
    assert g == pytest.approx(r.value("conv1", "grad_to_weight") * r.value("conv1", "weight_norm"))
    assert r.global_value("grad_norm") == pytest.approx(np.sqrt((r.layer("grad_norm") ** 2).sum()))
    assert r.value(r.blocks[0], "skip_share") == r.block("skip_share")[0]
    flat = gradwatch.sinks.tags.Tags("gw").scalars(r, layer_scalars=True)
    assert flat["zz_gw.layers/grad_norm/conv1"] == g and flat["zz_gw.alerts/count"] == 0.0
    assert flat["zz_gw.alerts/open/warning"] == 0.0 and r.open_incidents == (0, 0, 0)
    assert flat["zz_gw.health/4_grad_norm_log10"] == pytest.approx(np.log10(r.global_value("grad_norm")), rel=1e-15)
    assert flat["zz_gw.health/2_skip_share_min"] == r.block("skip_share").min() == r.value("_global", "skip_share_min")
    # every value (the health figures once), grad_norm in the health section, the event count, open per severity
    assert len(flat) == len(r) + 1 + 1 + 3
    with pytest.raises(KeyError):
        r.value("no.such.layer", "grad_norm")
    mon.close()


def test_a_record_pickles_whole_and_stays_immutable():
    # records cross process boundaries (multiprocessing, an offline replay of a rule): pickle keeps every field
    # and the unpickled record is as read-only as the original
    model = resnet(8, width=4)
    mon = gradwatch.Monitor(model, every=1, strict=True)
    mon.loss(torch.tensor(2.5))
    train(model, mon, 2)
    r = mon.latest
    q = pickle.loads(pickle.dumps(r))
    assert (q.step, q.layers, q.layer_metrics, q.blocks, q.kinds, q.loss) == (r.step, r.layers, r.layer_metrics,
                                                                              r.blocks, r.kinds, r.loss)
    np.testing.assert_array_equal(q.layer_values, r.layer_values)
    np.testing.assert_array_equal(q.block_values, r.block_values)
    assert dict(q.health) == dict(r.health) and len(q.health) > 0
    with pytest.raises(ValueError):
        q.layer_values[0, 0] = 1.0
    with pytest.raises(TypeError):
        q.health["x"] = 1.0  # type: ignore[index]
    mon.close()


def test_a_broken_user_sink_is_contained_like_a_broken_hook(caplog):
    class Broken(gradwatch.Sink):
        def write(self, record):
            raise OSError("disk full")

    model = resnet(8, width=4)
    good = Collect()
    mon = gradwatch.Monitor(model, every=1, sinks=[Broken(), good])
    with caplog.at_level(logging.ERROR, logger="gradwatch"):
        train(model, mon, 3)
    mon.close()
    assert [r.step for r in good.records] == [0, 1, 2]  # the sinks after it still get every record
    assert set(mon.history().step) == {0, 1, 2}  # nothing lost
    assert len(mon.errors) == 3 and all("disk full" in e and "Broken" in e for e in mon.errors)
    assert any("disk full" in r.getMessage() for r in caplog.records)
    strict = gradwatch.Monitor(model, every=1, sinks=[Broken()], strict=True)
    with pytest.raises(OSError, match="disk full"):
        train(model, strict, 1)
    strict.close()


def test_sinks_must_have_a_write_method():
    model = resnet(8, width=4)
    with pytest.raises(TypeError, match="sinks"):
        gradwatch.Monitor(model, sinks=[print])
    with pytest.raises(TypeError, match="sinks"):
        gradwatch.Monitor(model, sinks=Collect())  # a sink, not a list of them


def _events_per_step(log_dir):
    (path,) = glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))
    per_step: dict[int, list[int]] = {}
    for event in EventFileLoader(path).Load():
        if event.HasField("summary") and not event.summary.value[0].tag.startswith(("zz_gradwatch.alerts/summary",
                                                                                    "zz_gradwatch.pictures/")):
            per_step.setdefault(event.step, []).append(len(event.summary.value))
    return per_step


def test_tensorboard_gets_one_event_per_logging_step(tmp_path, events):
    model = resnet(8, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.Monitor(model, optimizer=opt, every=1, log_dir=tmp_path, pictures=0) as mon:
        for s in range(3):
            x, y = small_batch(seed=s)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    per_step = _events_per_step(tmp_path)
    assert sorted(per_step) == [0, 1, 2]
    m = len(mon.latest.layer_metrics) + 6  # layer metrics and flow metrics
    # health: grad_norm and 4 figures (effective_depth's details: 4 more), _global per layer metric,
    # nonfinite/<metric>, alerts: count and open per severity
    scalars = 5 + 4 + len(mon.latest.layer_metrics) + m + 4
    tensors = 3 + m  # layer names, kinds, block names, one series per metric
    for step, counts in per_step.items():
        assert len(counts) == 1  # the whole step in one event: scalars, series and histograms together
        layout = 1 if step == 0 else 0  # the Custom Scalars layout, with the first step
        assert counts[0] == scalars + tensors + m + layout  # + one histogram per metric
    read = events(str(tmp_path))
    got = read["series"]["zz_gradwatch.layers/grad_norm/conv1"][2]
    assert got == pytest.approx(mon.latest.value("conv1", "grad_norm"), rel=1e-6)
    assert "zz_gradwatch.blocks/skip_share" in read["histograms"]


def test_a_writer_that_is_not_a_summary_writer_gets_one_call_per_value():
    class Recorder:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

        def flush(self):
            pass

    w = Recorder()
    model = resnet(8, width=4)
    mon = gradwatch.Monitor(model, every=1, writer=w, histograms=False, strict=True)
    train(model, mon, 1)
    mon.close()
    tags = {t for t, _, _ in w.calls}
    assert "zz_gradwatch.layers/grad_norm/_global" in tags and "zz_gradwatch.blocks/skip_share/layer1.0" not in tags
    assert "zz_gradwatch.alerts/count" in tags and "zz_gradwatch.health/4_grad_norm_log10" in tags
    assert len(w.calls) == 5 + 4 + len(mon.latest.layer_metrics) + 4  # bounded: no per-layer calls
    w.calls.clear()
    mon = gradwatch.Monitor(model, every=1, writer=w, histograms=False, strict=True, layer_scalars=True)
    train(model, mon, 1)
    mon.close()
    tags = {t for t, _, _ in w.calls}
    assert {"zz_gradwatch.blocks/skip_share/layer1.0", "zz_gradwatch.layers/grad_norm/conv1"} <= tags
    assert len(w.calls) == len(mon.latest) + 1 + 4  # one per value and health figure, + health grad_norm, alerts


def test_records_compare_by_identity_and_check_their_shapes():
    r = gradwatch.StepRecord.build(3, ["a", "b"], {"grad_norm": [1.0, 2.0]}, {"grad_norm": 2.2})
    twin = gradwatch.StepRecord.build(3, ["a", "b"], {"grad_norm": [1.0, 2.0]}, {"grad_norm": 2.2})
    assert r == r and r != twin and r in [r] and len({r, twin}) == 2  # no ambiguous array comparisons
    with pytest.raises(ValueError, match="layer_values"):
        gradwatch.StepRecord(0, ("a",), ("grad_norm",), np.zeros((2, 3)), np.zeros(1))
    direct = gradwatch.StepRecord(0, ("a",), ("grad_norm",), np.ones((1, 1)), np.ones(1))
    assert not direct.layer_values.flags.writeable and not direct.block_values.flags.writeable
    assert r.nonfinite_counts() == {"grad_norm": 0}


def test_a_summary_writer_subclass_that_overrides_add_scalar_gets_its_calls(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    class Counting(SummaryWriter):
        calls = 0

        def add_scalar(self, *args, **kwargs):
            Counting.calls += 1
            super().add_scalar(*args, **kwargs)

    w = Counting(str(tmp_path))
    model = resnet(8, width=4)
    mon = gradwatch.Monitor(model, every=1, writer=w, histograms=False, strict=True)
    train(model, mon, 1)
    mon.close()
    w.close()
    assert Counting.calls == 5 + 4 + len(mon.latest.layer_metrics) + 4  # health, depth details, _global, alerts


def test_a_writer_without_flush_is_fine():
    class Minimal:
        def add_scalar(self, tag, value, step):
            pass

    model = resnet(8, width=4, skip_fault={1: "detached"})
    mon = gradwatch.Monitor(model, every=1, writer=Minimal(), strict=True)
    train(model, mon, 4)  # a skip_collapse alert flushes the writer: there is nothing to flush
    mon.close()
    assert mon.alerts and not mon.errors


def test_under_strict_a_failing_sink_is_raised_at_close_after_everything_is_closed(tmp_path):
    class FailsOnFlush(Collect):
        def flush(self):
            raise OSError("flush failed")

    model = resnet(8, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, log_dir=tmp_path, sinks=[FailsOnFlush()], strict=True)
    with pytest.raises(OSError, match="flush failed"):
        mon.close()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks  # hooks gone all the same
    mon.close()  # closed once: nothing left to do
