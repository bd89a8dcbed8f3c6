"""TensorBoard histograms made in one pass: the same proto as ``add_histogram``, and no lost step when every
value lies beyond the bins."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import read_events
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import make_histogram

import gradwatch
from gradwatch.sinks.tensorboard._histogram import Bins


@pytest.fixture(scope="module")
def edges(tmp_path_factory):
    return SummaryWriter(str(tmp_path_factory.mktemp("bins"))).default_bins


def test_protos_equal_tensorboards_field_for_field(edges):
    rng = np.random.default_rng(0)
    e = np.asarray(edges)
    cases = [
        rng.lognormal(0, 3, 57),  # norms over decades
        rng.standard_normal(1000),  # both signs, zero bin
        np.array([0.0]), np.array([1.0, 1.0]), np.array([-3.5]),
        e[[0, 3, 100, 774, -2, -1]],  # exactly on edges, the first and the closed last one
        np.array([1e25, 3.0, -1e30]),  # some beyond the bins: counted out, still in min/max/sum
    ]
    bins = Bins(edges)
    for values in cases:
        assert bins.protos([values])[0] == make_histogram(values, e), values
    together = bins.protos([*cases, np.array([2e25])])  # one pass for a step's histograms
    assert together[:-1] == [make_histogram(values, e) for values in cases] and together[-1] is None


def test_every_value_beyond_the_bins_gives_none_and_bad_edges_are_refused(edges):
    assert Bins(edges).protos([np.array([1e25, 2e30])])[0] is None
    with pytest.raises(ValueError, match="at least one value"):
        Bins(edges).protos([np.zeros(0)])
    with pytest.raises(ValueError, match="increasing"):
        Bins([1.0, 0.5, 2.0])


def test_a_step_whose_norms_are_all_beyond_the_bins_keeps_its_scalars(tmp_path):
    # make_histogram raises there: the whole event, alerts included, was lost at the moment of an explosion
    writer = SummaryWriter(str(tmp_path))
    sink = gradwatch.TensorBoardSink(writer, pictures=0, layer_scalars=True)  # the per-layer scalar is asserted
    record = gradwatch.StepRecord.build(7, ["a", "b"], {"grad_norm": [3e25, 4e25], "weight_norm": [1.0, 2.0]},
                                        {"grad_norm": 5e25, "weight_norm": 2.2})
    sink.write(record)
    sink.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    grad = [t for t in tags["scalars"] if "grad_norm" in t and t.endswith("/a")]
    assert grad and acc.Scalars(grad[0])[0].value == pytest.approx(3e25, rel=1e-6)
    assert any("weight_norm" in t for t in tags["histograms"])  # the metric inside the bins keeps its histogram
    assert not any("grad_norm" in t for t in tags["histograms"])


def test_by_default_a_step_beyond_the_bins_keeps_its_per_layer_series(tmp_path):
    # Without per-layer scalar tags (the default), the values live in the series tensors: they must survive too.
    writer = SummaryWriter(str(tmp_path))
    sink = gradwatch.TensorBoardSink(writer, pictures=0)
    record = gradwatch.StepRecord.build(7, ["a", "b"], {"grad_norm": [3e25, 4e25], "weight_norm": [1.0, 2.0]},
                                        {"grad_norm": 5e25, "weight_norm": 2.2})
    sink.write(record)
    sink.close()
    series = read_events(str(tmp_path))["series"]
    (tag,) = [t for t in series if t.endswith("grad_norm/a")]
    assert series[tag][7] == pytest.approx(3e25, rel=1e-6)
