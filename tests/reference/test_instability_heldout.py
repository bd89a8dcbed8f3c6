"""The instability suite's held-out set: runs no rule was tuned on, kept apart from the calibration set in the
suite and in its scorecard, and one of its triggers (the data shift) checked to make a real spike."""

from __future__ import annotations

import dataclasses
import re

import pytest

from gradwatch.reference.instability import Run, RunOutcome, run_one, runs, spike_step
from gradwatch.reference.instability_report import scores, scores_by_group, summary_lines, table, write_markdown


def _config(r: Run) -> Run:  # what a run trains: everything but its label and set
    return dataclasses.replace(r, name="", group="")


def test_the_held_out_runs_share_no_name_seed_or_configuration_with_the_calibration_runs():
    calibration, heldout = runs(), runs(heldout=True)
    assert len(calibration) == 30 and {r.group for r in calibration} == {"calibration"}
    # the calibration set is the one the rule was tuned on: its names stay as they were
    expected = {f"lr{lr}{qk}-s{s}" for s in range(3) for lr in ("0.03", "0.1", "0.3", "0.5") for qk in ("", "-qk")}
    expected |= {f"{t}-s{s}" for s in range(3) for t in ("restart", "beta2")}
    assert {r.name for r in calibration} == expected
    assert 15 <= len(heldout) <= 25 and {r.group for r in heldout} == {"held-out"}
    assert len({r.name for r in heldout}) == len(heldout)
    assert not {r.name for r in heldout} & {r.name for r in calibration}
    assert not {_config(r) for r in heldout} & {_config(r) for r in calibration}
    assert not {r.seed for r in heldout} & {r.seed for r in calibration}
    # the new triggers and the other model shape are in the held-out set only
    assert {r.trigger for r in heldout} - {r.trigger for r in calibration} == {"shape", "eps", "shift", "warmup"}
    assert {(r.dim, r.depth) for r in calibration} == {(64, 2)} and (128, 4) in {(r.dim, r.depth) for r in heldout}
    assert all(r.shift is None and r.eps == 1e-8 for r in calibration)
    # quick stays the two calibration runs
    assert [r.name for r in runs(quick=True)] == ["lr0.03-s0", "lr0.5-s0"]


def _o(name, group, spike, warning):
    lead = spike - warning if spike is not None and warning is not None and warning < spike else None
    return RunOutcome(name, "lr", spike, warning, "instability" if warning is not None else None, None, lead,
                      group=group)


def test_the_scorecard_scores_each_set_apart(tmp_path):
    cal = [_o("c1", "calibration", 100, 80), _o("c2", "calibration", 50, 60), _o("c3", "calibration", None, None)]
    held = [_o("h1", "held-out", 90, 60), _o("h2", "held-out", 70, 66), _o("h3", "held-out", 40, None),
            _o("h4", "held-out", None, 12), _o("h5", "held-out", None, None)]
    by = scores_by_group(held + cal)  # reported in the set order, whatever the runs' order
    assert list(by) == ["calibration", "held-out"]
    c, h = by["calibration"], by["held-out"]
    assert (c.runs, c.spiked, c.warned_ahead, c.misses, c.stable, c.false_alarms) == (3, 2, 1, 1, 1, 0)
    assert c.recall == 0.5 and c.median_lead == 20
    assert (h.runs, h.spiked, h.warned_ahead, h.misses, h.stable, h.false_alarms) == (5, 3, 2, 1, 2, 1)
    assert h.recall == pytest.approx(2 / 3) and h.median_lead == 17  # leads 30 and 4
    assert scores(cal + held).runs == 8  # pooled, only when asked
    lines = summary_lines(cal + held)
    assert lines[0].startswith("calibration: 3 runs, 2 spiked or diverged: recall 1/2 (50%), median lead 20 steps, 1 missed")
    assert lines[1].startswith("held-out: 5 runs, 3 spiked or diverged: recall 2/3 (67%), median lead 17 steps, 1 missed")
    assert lines[1].endswith("1 of 2 runs that did neither got a warning")
    rows = table(cal + held).splitlines()
    assert rows[0].startswith("| run | set | trigger |")
    assert "| h4 | held-out | lr | none | 12 | instability | – | – | false alarm | 0 |" in rows
    assert "| c2 | calibration | lr | 50 | 60 | instability | – | – | late | 0 |" in rows
    page = tmp_path / "validation.md"
    write_markdown(cal + held, str(page), "gradwatch validate --only instability", "2026-12-07", 1.0)
    text = page.read_text()
    assert f"- **{lines[0]}.**" in text and f"- **{lines[1]}.**" in text
    assert "**Held-out set**" in text and "no longer out of sample" in text
    assert len(re.findall(r"^\| h\d \| held-out \|", text, re.M)) == 5


@pytest.mark.slow
def test_a_data_shift_makes_a_spike_at_the_shift_step_and_the_same_run_without_it_does_not():
    # the held-out shift trigger, shortened: peak 0.05 over 50 steps, the other grammar from step 70 (~2.5 s)
    shifted = Run("shift", "shift", 0.05, seed=3, warmup=50, shift=70, steps=80, group="held-out")
    plain = dataclasses.replace(shifted, name="plain", shift=None)
    a, b = run_one(shifted), run_one(plain)
    assert a.losses[:70] == b.losses[:70]  # the same run up to the shift
    assert spike_step(b.losses) is None and b.spike is None
    assert spike_step(a.losses) == a.spike == 70
    assert a.losses[70] - max(a.losses[50:70]) > 1.0 and a.group == "held-out"
