"""The tag layout (gradwatch.sinks.tags): one namespace, health first, every tag readable back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gradwatch
from gradwatch.reference.blocks import resnet
from gradwatch.sinks.tags import Tags


def _record():
    model = resnet(8, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, strict=True)
    F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.randint(0, 10, (4,))).backward()
    opt.step()
    mon.close()
    return mon.latest


def test_sections_sit_together_in_one_namespace_with_health_first():
    t = Tags()
    assert t.health("grad_norm") == "gradwatch/grad_norm"
    assert t.layer("grad_to_weight", "layer1.0.conv1") == "gradwatch.layers/grad_to_weight/layer1.0.conv1"
    assert t.block("skip_share", "layer1.0") == "gradwatch.blocks/skip_share/layer1.0"
    assert t.histogram("grad_norm", block=False) == "gradwatch.layers/grad_norm"
    assert t.alert_count == "gradwatch.alerts/count" and t.picture("profile") == "gradwatch.pictures/profile"
    groups = [t.health_group, t.alerts_group, t.blocks_group, t.layers_group, t.pictures_group]
    assert sorted(groups) == groups and groups[0] == "gradwatch"  # TensorBoard sorts groups: health first of ours
    bare = Tags("")
    assert bare.health("grad_norm") == "health/grad_norm" and bare.layer("a", "b") == "layers/a/b"


def test_a_prefix_with_a_slash_is_refused_by_the_sinks_that_take_one(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from gradwatch.sinks import ScalarsSink

    with pytest.raises(ValueError, match=r"prefix must not contain '/'.*got 'gw/'"):
        gradwatch.TensorBoardSink(SummaryWriter(str(tmp_path)), prefix="gw/")  # it would make "gw/.layers/..."
    with pytest.raises(ValueError, match="prefix must not contain '/'"):
        ScalarsSink(print, prefix="a/b")
    with pytest.raises(TypeError, match="prefix must be a str"):
        Tags(None)


@pytest.mark.parametrize("namespace", ["gradwatch", "", "gradwatch.optimizer_1"])
def test_every_scalar_of_a_record_parses_back_to_its_name_and_metric(namespace):
    r = _record()
    t = Tags(namespace)
    flat = t.scalars(r, counts=True)
    parsed = {t.parse(tag): v for tag, v in flat.items() if t.parse(tag) is not None}
    for metric, names, values in r.series():
        for n, v in zip(names, values.tolist()):
            assert parsed.pop((n, metric)) == v
    for figure, v in r.health.items():
        assert parsed.pop(("_global", figure)) == pytest.approx(v, nan_ok=True)
    assert parsed == {}  # nothing else reads as a value: counts, alerts and grad_norm's health copy are not
    assert t.parse(t.nonfinite("grad_norm", block=False)) is None and t.parse(t.kinds) is None
    assert t.parse("train_loss") is None and t.parse("gradwatch_other/x") is None


def test_a_failed_self_check_shows_on_every_record_as_unverified_in_the_health_section():
    import dataclasses

    rec, t = _record(), Tags()
    assert rec.verified is None  # one process: the self-check does not run
    assert "gradwatch/unverified" not in t.scalars(rec)
    assert "gradwatch/unverified" not in t.scalars(dataclasses.replace(rec, verified=True))
    marked = dataclasses.replace(rec, verified=False)
    assert t.health_scalars(marked)["gradwatch/unverified"] == 1.0 == t.scalars(marked)["gradwatch/unverified"]
    assert t.parse("gradwatch/unverified") is None  # a mark on the values, not one of them
