"""Incidents: open once, remind with back-off, escalate at once, resolve with hysteresis, inhibit, resume.

Engine-level tests drive the real rules and the real tracker with records built by hand (the statistic is
known exactly); the end-to-end tests train real nets in ``test_incident_runs.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import gradwatch
from gradwatch.alerts import AlertEngine, IncidentTracker, Rule, SkipCollapse, read_alerts, read_events
from gradwatch.alerts.incident import format_duration


class Scripted(Rule):
    """Fires what the script says at each step: a severity, or (severity, value), or None."""

    name = "scripted"

    def __init__(self, script, name="conv1"):
        super().__init__(patience=1)
        self.script, self.layer = script, name

    def check(self, m):
        entry = self.script[m.step] if m.step < len(self.script) else None
        if entry is None:
            return []
        sev, value = entry if isinstance(entry, tuple) else (entry, 1.0)
        return [self.alert(m, sev, self.layer, value, 0.5, f"value {value}", "a hint")]


class Clock:
    def __init__(self, start=1_000_000.0):
        self.now = start

    def __call__(self):
        return self.now


def record(step, skip_share=None):
    """A one-layer record; with ``skip_share``, one block ``b`` with that share."""
    blocks, cols = (), None
    if skip_share is not None:
        blocks = ("b",)
        cols = {"grad_out": [1.0], "grad_in": [1.0], "skip_grad": [skip_share ** 0.5],
                "branch_grad": [(1 - skip_share) ** 0.5], "skip_share": [skip_share], "transmission": [1.0]}
    return gradwatch.StepRecord.build(step, ["conv1"], {"grad_norm": [1.0]}, {"grad_norm": 1.0}, blocks, cols)


def drive(engine, steps, clock=None, dt=0.0, share=None):
    events = []
    for s in steps:
        if clock is not None:
            clock.now += dt
        events.extend(engine.evaluate(record(s, None if share is None else share(s))))
    return events


def kinds(events):
    return [(e.kind, e.step) for e in events]


def test_a_condition_held_for_a_week_opens_once_and_reminds_with_back_off():
    """Default schedule: 1 h, then 4x longer each time. One logging step a minute for a week = 10,080 steps."""
    clock = Clock()
    engine = AlertEngine([Scripted(["warning"] * 10_080)], tracker=IncidentTracker(clock=clock))
    events = drive(engine, range(10_080), clock, dt=60.0)
    assert kinds(events) == [("opened", 0), ("reminder", 60), ("reminder", 300), ("reminder", 1260),
                             ("reminder", 5100)]  # 1 h, 5 h, 21 h, 85 h
    assert len(engine.alerts) == 5 and engine.suppressed == 10_080 - 5
    reminder = events[1]
    assert reminder.incident.reminders == 1 and "still open" in reminder.format() and "1h00m" in reminder.format()
    assert "hint" not in reminder.format()  # the hint once per incident, not per reminder
    assert "hint: a hint" in events[0].format()


def test_reminders_by_logging_steps_double():
    engine = AlertEngine([Scripted(["warning"] * 10_000)],
                         tracker=IncidentTracker(remind_after=None, remind_steps=200, backoff=2))
    events = drive(engine, range(10_000))
    assert kinds(events) == [("opened", 0), ("reminder", 200), ("reminder", 600), ("reminder", 1400),
                             ("reminder", 3000), ("reminder", 6200)]


def test_escalation_is_told_at_once_and_restarts_the_back_off():
    script = ["warning"] * 5 + ["critical"] * 5 + ["warning"] * 5
    engine = AlertEngine([Scripted(script)], tracker=IncidentTracker(remind_after=None, remind_steps=3, backoff=1))
    events = drive(engine, range(15))
    assert kinds(events) == [("opened", 0), ("reminder", 3), ("escalated", 5), ("reminder", 8),
                             ("reminder", 11), ("reminder", 14)]
    assert events[2].previous == "warning" and events[2].severity == "critical"
    inc = engine.tracker.open[0]
    assert inc.peak == "critical" and inc.severity == "warning"  # de-escalation is not told, the peak is kept


def test_resolved_after_the_clear_window_with_duration_and_worst_value(tmp_path):
    script = [("warning", 0.9), ("warning", 0.7), ("warning", 2.0), None, None, ("warning", 0.8), None, None,
              None, None, None, None]
    clock = Clock()
    engine = AlertEngine([Scripted(script)], tracker=IncidentTracker(clock=clock, resolve_after=5),
                         path=str(tmp_path / "a.jsonl"))
    events = drive(engine, range(len(script)), clock, dt=30.0)
    # a 2-step gap (3, 4) is not a resolution; 5 clear steps after step 5 are
    assert kinds(events) == [("opened", 0), ("resolved", 10)]
    done = events[-1].incident
    assert not done.open and done.opened_step == 0 and done.resolved_step == 10 and done.last_step == 5
    assert done.first_value == 0.9 and done.worst_value == 2.0  # above a 0.5 ceiling: higher is worse
    assert done.duration() == pytest.approx(300.0)
    assert "resolved at step 10" in events[-1].format() and "worst 2" in events[-1].format()
    engine.close()
    lines = read_events(tmp_path / "a.jsonl")
    assert [(d["event"], d["incident"], d["state"]) for d in lines] == [
        ("opened", done.id, "open"), ("resolved", done.id, "resolved")]
    assert [a.step for a in read_alerts(tmp_path / "a.jsonl")] == [0]


def test_a_value_wobbling_around_the_threshold_for_500_steps_is_one_incident():
    """skip_share around the 1e-3 floor: below it 3 steps in 5, above it (but under the 2x clear margin) the rest,
    plus random noise; a rule without hysteresis would open an incident every few steps. The block starts at
    0.05 (its own early level, from which skip_collapse judges a fall)."""
    rng = np.random.default_rng(0)
    wobble = [0.05] * 5 + [1e-3 * (0.7 if s % 5 < 3 else 1.4) * float(rng.uniform(0.9, 1.1)) for s in range(5, 500)]
    engine = AlertEngine([SkipCollapse()], tracker=IncidentTracker(remind_after=None))
    events = drive(engine, range(500), share=lambda s: wobble[s])
    assert kinds(events) == [("opened", 7)]
    # without the rule's margin the same series flaps: each excursion above the floor clears the streak
    flapping = AlertEngine([SkipCollapse(clear_margin=1.0)], tracker=IncidentTracker(remind_after=None,
                                                                                     resolve_after=1))
    assert sum(e.kind == "opened" for e in drive(flapping, range(500), share=lambda s: wobble[s])) > 50
    # clear past the margin for the window: resolved once
    events = drive(engine, range(500, 520), share=lambda s: 0.01)
    assert kinds(events) == [("resolved", 504)]


def test_a_critical_nonfinite_incident_inhibits_the_others(tmp_path):
    class NaNFrom(Rule):
        name = "nonfinite"

        def check(self, m):
            if m.step < 3:
                return []
            return [self.alert(m, "critical", "fc", float("nan"), float("inf"), "nan", "h", subject="model")]

    class Noisy(Rule):  # fires about a new layer every step from step 3 on: what garbage statistics would do
        name = "vanishing"

        def check(self, m):
            return [] if m.step < 3 else [self.alert(m, "warning", f"layer{m.step % 4}", 0.0, 1.0, "low", "h")]

    engine = AlertEngine([NaNFrom(1), Noisy(1)], tracker=IncidentTracker(remind_after=None),
                         path=str(tmp_path / "a.jsonl"), on_critical="raise")
    events = drive(engine, range(3))
    assert events == []
    events = engine.evaluate(record(3))
    assert [(e.kind, e.rule, e.severity) for e in events] == [("opened", "nonfinite", "critical")]
    with pytest.raises(gradwatch.GradientAlarm):
        engine.raise_pending()
    events = drive(engine, range(4, 50))
    assert events == []  # no warning storm: the NaN explains them, nothing new is raised either
    engine.raise_pending()
    engine.close()
    quiet = [d for d in read_events(tmp_path / "a.jsonl") if d.get("told") is False]
    assert {d["rule"] for d in quiet} == {"vanishing"} and len(quiet) == 4  # each recorded once, with why
    assert all(d["why"].startswith("inhibited by") for d in quiet)


def test_open_incidents_survive_a_resume_without_a_second_opening():
    script = ["warning"] * 10 + [None] * 10
    engine = AlertEngine([Scripted(script)], tracker=IncidentTracker(remind_after=None))
    first = drive(engine, range(6))
    state = json.loads(json.dumps(engine.state_dict()))  # what a checkpoint holds: JSON-like
    resumed = AlertEngine([Scripted(script)], tracker=IncidentTracker(remind_after=None))
    resumed.load_state_dict(state)
    assert [a.step for a in resumed.alerts] == [0] and resumed.tracker.open[0].id == first[0].incident.id
    later = drive(resumed, range(6, 20))
    assert kinds(later) == [("resolved", 14)]
    assert later[0].incident.id == first[0].incident.id and later[0].incident.opened_step == 0


def test_run_summary_lists_open_and_resolved_incidents():
    script = [("warning", 0.1)] * 3 + [None] * 6
    clock = Clock()
    engine = AlertEngine([Scripted(script), Scripted(["critical"] * 9, name="fc")],
                         tracker=IncidentTracker(clock=clock))
    drive(engine, range(9), clock, dt=60)
    summary = engine.summary()
    text = summary.format()
    assert summary.headline() == "gradwatch run summary at step 8: 2 incidents (1 still open, 1 resolved)"
    lines = text.splitlines()
    assert lines[1].startswith("  still open: [critical] scripted (fc): since step 0")
    assert lines[2].startswith("  resolved:   [warning] scripted (conv1): steps 0–7")
    assert summary.at_least("critical").incidents == (summary.still_open[0],)


def test_options_are_checked():
    with pytest.raises(ValueError, match="remind_backoff"):
        gradwatch.Config(remind_backoff=0.5)
    with pytest.raises(TypeError, match="remind_steps"):
        gradwatch.Config(remind_steps=2.5)
    with pytest.raises(ValueError, match="resolve_after"):
        gradwatch.Config(resolve_after=0)
    with pytest.raises(TypeError, match="alert_cooldown"):  # the pre-release option incidents replaced is gone
        gradwatch.Config(alert_cooldown=7)
    with pytest.raises(ValueError, match="clear_margin"):
        SkipCollapse(clear_margin=0.5)


@pytest.mark.parametrize(("seconds", "text"), [(5, "5s"), (125, "2m"), (3 * 3600 + 300, "3h05m"),
                                               (2 * 86400 + 4 * 3600, "2d04h")])
def test_durations_read_well(seconds, text):
    assert format_duration(seconds) == text
