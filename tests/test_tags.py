"""The tag layout (gradwatch.sinks.tags): health first, the bulk after the user's groups, a bounded number of
scalar tags, every value readable back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gradwatch
from gradwatch.reference.blocks import resnet
from gradwatch.sinks.tags import Tags


def _record(depth=8):
    model = resnet(depth, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, strict=True)
    F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.randint(0, 10, (4,))).backward()
    opt.step()
    mon.close()
    return mon.latest


def test_health_sorts_before_the_users_groups_and_the_bulk_after_them():
    t = Tags()
    assert t.health("grad_norm") == "zz_gradwatch.health/4_grad_norm_log10" and t.card == "_gradwatch/1_health"
    assert t.layer("grad_to_weight", "layer1.0.conv1") == "zz_gradwatch.layers/grad_to_weight/layer1.0.conv1"
    assert t.block("skip_share", "layer1.0") == "zz_gradwatch.blocks/skip_share/layer1.0"
    assert t.histogram("grad_norm", block=False) == "zz_gradwatch.layers/grad_norm"
    assert t.alert_count == "zz_gradwatch.alerts/count" and t.picture("profile") == "zz_gradwatch.pictures/profile"
    user = ["epoch", "eval", "hp_metric", "loss", "lr-Adam", "train", "train_loss", "val_acc", "validation"]
    groups = sorted([t.health_group, t.figures_group, t.alerts_group, t.blocks_group, t.layers_group,
                     t.pictures_group, *user])
    assert groups[0] == "_gradwatch" and groups[1:len(user) + 1] == user  # the user's in between
    # the health cards: alphabetical order is priority order
    cards = [t.health(f) for f in ("unverified", "card", "skip_share_min", "grad_to_weight_early", "grad_norm",
                                   "transmission_end_to_end", "effective_depth")]
    assert sorted(cards) == cards
    assert sorted([t.alert_text("depth_trend", "info"), t.alert_text("vanishing", "warning"),
                   t.alert_text("nonfinite", "critical")]) == [
        "zz_gradwatch.alerts/1_critical/nonfinite", "zz_gradwatch.alerts/2_warning/vanishing",
        "zz_gradwatch.alerts/3_info/depth_trend"]  # TEXT: the most severe first
    bare = Tags("")
    assert bare.health("skip_share_min") == "zz_health/2_skip_share_min" and bare.layer("a", "b") == "zz_layers/a/b"
    assert bare.card == "_health/1_health"
    for ns in ("gradwatch", "", "gradwatch.optimizer_1", "my.run", "health"):
        assert Tags.namespace_of(Tags(ns).layer("grad_norm", "_global")) == ns
    assert Tags.namespace_of("train/loss") is None and Tags.namespace_of("zz_other/x") is None


def test_a_deep_model_gets_no_more_scalar_tags_than_a_shallow_one():
    from gradwatch.sinks.tags import MAX_SCALAR_TAGS

    counts = {}
    for depth in (8, 56):
        r, t = _record(depth), Tags()
        counts[depth] = len(t.scalars(r, counts=True))
        assert len(t.scalars(r, counts=True, layer_scalars=True)) > 4 * len(r.layers)  # the opt-in: one per value
    assert counts[8] == counts[56] <= MAX_SCALAR_TAGS


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
    flat = t.scalars(r, counts=True, layer_scalars=True)
    parsed = {t.parse(tag)[:2]: 10 ** v if t.parse(tag).log10 else v for tag, v in flat.items() if t.parse(tag)}
    for metric, names, values in r.series():
        for n, v in zip(names, values.tolist()):
            assert parsed.pop((n, metric)) == v
    for figure, v in r.health.items():
        assert parsed.pop(("_global", figure)) == pytest.approx(v, nan_ok=True, rel=1e-12)
    assert parsed == {}  # nothing else reads as a value: counts, alerts and grad_norm's health copy are not
    assert t.parse(t.nonfinite("grad_norm", block=False)) is None and t.parse(t.kinds) is None
    assert t.parse(t.series("grad_norm", block=False)) is None
    assert t.parse("train_loss") is None and t.parse("gradwatch_other/x") is None


def test_a_failed_self_check_shows_on_every_record_as_unverified_in_the_health_section():
    import dataclasses

    rec, t = _record(), Tags()
    assert rec.verified is None  # one process: the self-check does not run
    tag = "_gradwatch/0_unverified"  # sorts first of all cards
    assert tag not in t.scalars(rec)
    assert tag not in t.scalars(dataclasses.replace(rec, verified=True))
    marked = dataclasses.replace(rec, verified=False)
    assert t.health_scalars(marked)[tag] == 1.0 == t.scalars(marked)[tag]
    assert t.parse(tag) is None  # a mark on the values, not one of them
