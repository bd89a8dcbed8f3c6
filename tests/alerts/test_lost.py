"""The ``lost_skip`` rule on hand-made measurements: it reads ``Measurements.lost`` and nothing else."""

from __future__ import annotations

import numpy as np

from gradwatch.alerts import LostSkip, Measurements, build_rules


def step(n, lost, share=0.0):
    m = Measurements(step=n)
    m.add(["a", "b"], "skip_share", np.array([0.4, share]))
    m.lost = list(lost)
    return m


def test_fires_at_once_naming_the_block_and_the_step_it_was_lost_and_stops_when_it_is_back():
    rule = LostSkip()
    assert rule.check(step(0, [], share=0.3)) == []
    first = rule.check(step(2, ["b"]))
    assert [(a.rule, a.severity, a.name, a.step) for a in first] == [("lost_skip", "critical", "b", 2)]
    assert "since step 2" in first[0].message
    again = rule.check(step(4, ["b"]))
    assert [a.name for a in again] == ["b"] and "since step 2" in again[0].message
    assert rule.check(step(6, [], share=0.3)) == []
    assert "since step 8" in rule.check(step(8, ["b"]))[0].message  # lost anew: a new date


def test_a_zero_share_alone_is_not_a_lost_merge():
    rule = LostSkip()
    assert rule.check(step(0, [], share=0.0)) == []


def test_is_a_default_rule_and_can_be_turned_off():
    assert "lost_skip" in [r.name for r in build_rules(None)]
    assert "lost_skip" not in [r.name for r in build_rules({"lost_skip": False})]
