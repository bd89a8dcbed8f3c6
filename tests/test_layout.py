"""The Custom Scalars layout: charts of at most 12 lines along the network's structure, exact regexes."""

from __future__ import annotations

import re

from gradwatch.reference.blocks import resnet
from gradwatch.sinks.tensorboard.layout import MAX_LINES, build_layout, group_names
from gradwatch.sinks.tags import Tags


def _layers(model):
    return [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def test_resnet56_layers_are_cut_by_stage_into_charts_of_at_most_twelve():
    names = _layers(resnet(56, width=4))
    groups = group_names(names)
    assert [n for _, g in groups for n in g] == names  # every layer once, in model order
    assert all(len(g) <= MAX_LINES for _, g in groups)
    titles = [t for t, _ in groups]
    assert titles[0] == "conv1, bn1" and "layer1.0–2" in titles and titles[-1] == "fc"
    assert all(len({n.split(".")[0] for n in g}) == 1 for _, g in groups[1:-1])  # no chart spans two stages


def test_long_flat_lists_and_odd_names_are_cut_in_order():
    names = [f"blocks.{i}" for i in range(30)]
    groups = group_names(names)
    assert [len(g) for _, g in groups] == [12, 12, 6] and groups[0][0] == "blocks.0–11"
    assert group_names(["a", "b"]) == [("a, b", ["a", "b"])]


def test_every_tag_is_matched_by_exactly_one_chart_of_its_category():
    names = _layers(resnet(20, width=4)) + ["odd[0].name+x"]  # regex characters must match only themselves
    blocks = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    for namespace in ("gradwatch", ""):
        tags = Tags(namespace)
        layout = build_layout(tags, names, ("grad_norm", "grad_to_weight"), blocks, per_layer=True)
        cats = {c.title: c for c in layout.category}
        health = cats[f"{namespace or 'gradwatch'}: health"]
        assert not health.closed and len(health.chart) == 6  # 5 figures and the open incidents
        for metric, members, tag in (("grad_to_weight", names, tags.layer), ("skip_share", blocks, tags.block)):
            kind = "layer" if members is names else "block"
            cat = cats[f"{namespace or 'gradwatch'}: {metric} by {kind}"]
            regexes = [re.compile(c.multiline.tag[0]) for c in cat.chart]
            for n in members:
                assert sum(bool(r.search(tag(metric, n))) for r in regexes) == 1, n
            assert not any(r.search(tag(metric, "odd[0]Xname+x")) for r in regexes)
        assert f"{namespace or 'gradwatch'}: update_to_weight by layer" not in cats  # not measured: no category
        bounded = build_layout(tags, names, ("grad_norm", "grad_to_weight"), blocks)  # no per-layer scalars
        assert [c.title for c in bounded.category] == [f"{namespace or 'gradwatch'}: health"]
