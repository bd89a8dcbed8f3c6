"""The pictures: drawn from real records, bounded in memory, off the scalars' path when they fail."""

from __future__ import annotations

import logging
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradwatch
from gradwatch.sinks.tensorboard import _drawer, pictures
from gradwatch.reference.blocks import resnet
from gradwatch.sinks.tensorboard.pictures import Timeline, render_all


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])


def _train(log_dir=None, steps=6, **kw):
    torch.manual_seed(0)
    model = resnet(8, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, log_dir=log_dir, strict=True, **kw)
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        F.cross_entropy(model(torch.randn(4, 3, 8, 8, generator=g)), torch.randint(0, 10, (4,), generator=g)).backward()
        opt.step()
        opt.zero_grad()
    return mon


def test_maps_hold_the_weight_layers_and_blocks_over_the_steps():
    mon = _train(steps=5)
    mon.close()
    tl = Timeline()
    for r in mon.records:
        tl.add(r)
    names, values = tl.matrix("layers")
    weights = [n for n, k in zip(mon.latest.layers, mon.latest.kinds) if k == "weight"]
    assert names == weights and values.shape == (len(weights), 5)  # norm layers would stripe the map
    np.testing.assert_array_equal(values[:, -1], mon.latest.layer("grad_to_weight")[
        [i for i, k in enumerate(mon.latest.kinds) if k == "weight"]])
    bnames, share = tl.matrix("blocks")
    assert bnames == list(mon.latest.blocks) and share.shape == (len(bnames), 5)
    drawn = {p.name: p for p in render_all(tl)}
    assert set(drawn) == {"grad_to_weight", "skip_share", "profile", "effective_depth"}
    for p in drawn.values():
        assert _png_size(p.png) == (p.width, p.height)


def test_a_block_that_disappears_keeps_its_row_in_depth_order_and_reads_not_measured():
    import dataclasses

    mon = _train(steps=3)
    mon.close()
    tl = Timeline()
    r = mon.records[0]
    tl.add(r)
    tl.add(dataclasses.replace(mon.records[1], blocks=r.blocks[::2], block_values=r.block_values[::2]))  # middle gone
    names, share = tl.matrix("blocks")
    assert names == list(r.blocks)  # not moved to the bottom
    measured = tl.matrix("blocks", fill=-1.0)[1] != -1.0
    assert measured[:, 0].all() and measured[:, 1].tolist() == [True, False, True]
    assert np.isnan(share[1, 1])
    sc = pictures.scene(tl)
    assert sc.share_measured is not None and not sc.share_measured[1, 1]


def test_the_health_card_draws_incidents_and_figures_at_a_fixed_width():
    from gradwatch.sinks.tensorboard._card import HealthCard, draw_card

    rows = [("info", "depth_trend", "whole model", 40), ("warning", "skip_collapse", "layer2.4", 10)]
    p = draw_card(HealthCard(120, rows, [("skip_share_min", 0.0), ("grad_to_weight_early", 1.1)]))
    assert p.name == "health" and _png_size(p.png) == (p.width, p.height) and p.width == 560
    more = draw_card(HealthCard(120, rows * 4, []))  # more than it lists: a "+ n more" line, not a taller card
    assert more.height == draw_card(HealthCard(120, rows * 3, [])).height


def test_the_timeline_is_bounded_and_keeps_the_newest_step():
    mon = _train(steps=1)
    mon.close()
    tl = Timeline(max_steps=8)
    r = mon.latest
    for step in range(100):
        tl.add(type(r)(**{**r.__dict__, "step": step}))
    assert len(tl.steps) <= 8 and tl.steps[-1] == 99 and tl.steps == sorted(tl.steps)


def test_pictures_reach_tensorboard_every_k_steps_and_at_close(tmp_path):
    mon = _train(tmp_path, steps=7, pictures=3)
    mon._out.owned[0]._pictures.budget = None  # this test pins the cadence, not the time budget
    mon.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    maps = ("grad_to_weight", "skip_share", "profile", "effective_depth")
    assert set(acc.Tags()["images"]) == {f"zz_gradwatch.pictures/{n}" for n in maps} | {"_gradwatch/1_health"}
    steps = [e.step for e in acc.Images("zz_gradwatch.pictures/profile")]
    assert steps == [2, 5, 6]  # every 3 records, then the last at close
    assert _drawer._DRAWER._child.proc.poll() is None  # drawn in the process's drawing child
    image = acc.Images("zz_gradwatch.pictures/grad_to_weight")[-1]
    assert _png_size(image.encoded_image_string) == (image.width, image.height)


def test_a_failing_drawing_costs_only_the_pictures(tmp_path, monkeypatch, caplog):
    def broken(scene):
        raise RuntimeError("no fonts")

    monkeypatch.setattr("gradwatch.sinks.tensorboard.sink.draw_pictures", broken)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        mon = _train(tmp_path, steps=3, pictures=1)
        mon.close()
    assert "drawing the pictures failed (RuntimeError: no fonts)" in caplog.text
    # drawn at each of the 3 steps, failing each time: said once per kind, not once per drawing (no storm)
    assert caplog.text.count("drawing the pictures failed") == 1
    assert caplog.text.count("drawing the health card failed") == 1
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("zz_gradwatch.health/4_grad_norm_log10")] == [0, 1, 2]
    assert not acc.Tags()["images"]


def test_pictures_zero_draws_nothing_and_a_time_budget_defers_drawing(tmp_path):
    mon = _train(tmp_path / "off", steps=3, pictures=0)
    mon.close()
    acc = EventAccumulator(str(tmp_path / "off"))
    acc.Reload()
    assert not acc.Tags()["images"]
    mon = _train(tmp_path / "budget", steps=6, pictures=1)  # 1% of a sub-second run: one drawing, then the last
    mon.close()
    acc = EventAccumulator(str(tmp_path / "budget"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("zz_gradwatch.pictures/profile")] == [0, 5]


def test_heatmap_marks_alert_steps_and_survives_nan_and_zero():
    values = np.array([[1e-3, 0.0, np.nan], [1e-2, 1e-1, np.inf]])
    p = pictures.heatmap("grad_to_weight", ["a", "b"], [0, 5, 10], values, log=True, alerts=[(5, "warning")])
    assert _png_size(p.png) == (p.width, p.height)


@pytest.mark.parametrize("grad_norm", [np.full(4, np.nan), np.zeros(4), np.array([1e-30, 1e30, np.inf, 1.0]),
                                       np.array([0.02, 0.03, 0.05, 0.07])])
def test_profile_draws_any_gradient_norms(grad_norm):
    # the bars are one collection from the bottom of the log axis; nothing to draw must still give a picture
    p = pictures.profile([f"l{i}.w" for i in range(4)], grad_norm, grad_norm, ["b0"], np.array([0.5]), 5)
    assert _png_size(p.png) == (p.width, p.height) == (900, 620)
