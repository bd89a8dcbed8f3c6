"""The instability suite: the spike definition, the rule warning ahead of a real spike and quiet on a stable run
(through `gradwatch validate --quick --only instability`), and the scorecard's numbers checked against the
run's own alert record and losses."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from gradwatch.cli import main
from gradwatch.reference.instability import SPIKE_NATS, RunOutcome, blowup, divergence_step, spike_step
from gradwatch.reference.instability_report import scores, table


def test_the_spike_is_the_first_step_a_nat_above_the_median_of_the_twenty_before():
    calm = [4.0 - 0.01 * t + (0.3 if t % 2 else -0.3) for t in range(60)]  # falling, noisy by ±0.3 nat
    assert spike_step(calm) is None
    # calm[40] = 3.3, the median of the 20 before it 3.7: +1.5 is 1.1 nat above it, +1.3 only 0.9
    assert spike_step(calm[:40] + [calm[40] + 1.5] + calm[41:]) == 40
    assert spike_step(calm[:40] + [calm[40] + 1.3] + calm[41:]) is None  # under a nat: not a spike
    assert spike_step(calm[:30] + [math.nan] + calm[31:]) == 30  # a non-finite loss is one
    creep = [2.0 + 0.03 * t for t in range(60)]  # 1.8 nats up in all, never 1 nat above the last 20's median
    assert spike_step(creep) is None
    assert spike_step([4.0] * 5 + [9.0] + [4.0] * 20) is None  # before step 10: still falling from init
    assert spike_step([4.0] * 12 + [9.0]) == 12


def _divergence(losses):  # the documented definition again, written out independently
    levels = {t: statistics.median(losses[max(0, t - 19):t + 1]) for t in range(10, len(losses))}
    return next((t for t in levels if levels[t] - min((levels[s] for s in range(10, t)), default=math.inf)
                 >= SPIKE_NATS), None)


def test_a_divergence_is_a_median_loss_a_nat_above_its_lowest_and_a_run_blew_up_at_the_first_of_the_two():
    creep = [2.0 + 0.03 * t for t in range(60)]  # never a spike, 1.8 nats up in all
    drift = [3.0 - 0.02 * t for t in range(50)] + [2.0 + 0.025 * t for t in range(80)]  # down to 2.0, then up 2 nats
    for losses in (creep, drift):
        assert spike_step(losses) is None
        assert divergence_step(losses) == _divergence(losses) is not None
        assert blowup(losses) == (_divergence(losses), "divergence")
    # lowest at step 10 (the median of steps 0-10: 2.15); from step 19 the median is creep at t - 9.5, which
    # reaches 3.15 at t = 47.8
    assert divergence_step(creep) == 48
    calm = [4.0 - 0.01 * t + (0.3 if t % 2 else -0.3) for t in range(60)]
    assert divergence_step(calm) is None and blowup(calm) == (None, None)
    assert divergence_step([2.0 + 0.015 * t for t in range(60)]) is None  # 0.9 nat up: no divergence
    spiked = calm[:40] + [calm[40] + 1.5] + [9.0] * 30  # it spikes at 40; the median follows 10 steps later
    assert blowup(spiked) == (40, "spike") and divergence_step(spiked) == _divergence(spiked) == 50
    assert divergence_step([math.nan] * 30) is None  # no finite loss: nothing to compare (a spike, at 10)
    assert blowup([math.nan] * 30) == (10, "spike")


def _spike(losses):  # the documented definition again, written out independently
    for t in range(10, len(losses)):
        ref = statistics.median(losses[max(0, t - 20):t])
        if not math.isfinite(losses[t]) or losses[t] - ref >= SPIKE_NATS:
            return t
    return None


@pytest.mark.slow
def test_quick_suite_warns_ahead_of_the_spike_and_is_quiet_on_the_stable_run(tmp_path, capsys):
    code = main(["validate", "--quick", "--only", "instability", "--jobs", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads((tmp_path / "validate.json").read_text())
    runs = {r["run"]: r for r in summary["instability"]["runs"]}
    stable, unstable = runs["lr0.03-s0"], runs["lr0.5-s0"]
    assert stable["spike"] is None and _spike(stable["losses"]) is None and stable["warning"] is None
    record = (tmp_path / "instability" / "lr0.03-s0" / "alerts.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in record] == ["summary"]  # not one incident, not even info
    assert unstable["spike"] == _spike(unstable["losses"]) is not None
    # the first warning and its layers, read back from the run's own alert record
    events = [json.loads(line) for line in
              (tmp_path / "instability" / "lr0.5-s0" / "alerts.jsonl").read_text().splitlines()]
    first = next(e for e in events if e.get("event") == "opened" and e["severity"] != "info")
    assert first["rule"] == "instability" and first["step"] == unstable["warning"] < unstable["spike"]
    assert unstable["lead"] == unstable["spike"] - first["step"]
    assert unstable["layers"].split(", ")[0] in first["message"] and unstable["layers"].startswith("blocks.")
    # the warning needs the whole model's gradient grown with the layer's (round 2, docs/alerts.md): at peak LR
    # 0.5 that comes the step before the spike (the dead MLP branch alone warned 21 steps ahead, and warned on
    # runs that never spiked too)
    assert unstable["lead"] >= 1 and "the whole model's gradient at" in first["message"]
    assert "lower the peak learning rate" in first["hint"]
    s = summary["instability"]["scores"]
    assert (s["spiked"], s["warned_ahead"], s["recall"], s["median_lead"], s["false_alarms"], s["misses"]) == (
        1, 1, 1.0, unstable["lead"], 0, 0)
    assert summary["instability"]["scores_by_set"] == {"calibration": s}  # --quick runs no held-out set
    assert "| lr0.5-s0 | calibration | lr |" in out and "calibration: 2 runs, 1 spiked or diverged: recall 1/1 (100%)" in out


def test_scores_count_recall_lead_false_alarms_and_misses():
    def o(name, spike, warning):
        lead = spike - warning if spike is not None and warning is not None and warning < spike else None
        return RunOutcome(name, "lr", spike, warning, "instability" if warning is not None else None, None, lead)

    runs = [o("a", 100, 80), o("b", 50, 45), o("c", 60, 70), o("d", 90, None), o("e", None, None),
            o("f", None, 30), o("g", 120, 100)]
    s = scores(runs)
    assert (s.spiked, s.warned_ahead, s.misses, s.stable, s.false_alarms) == (5, 3, 2, 2, 1)
    assert s.recall == pytest.approx(0.6) and s.median_lead == 20  # leads 20, 5, 20
    rows = table(runs).splitlines()
    assert "| c | calibration | lr | 60 | 70 | instability | – | – | late | 0 |" in rows
    assert rows[-2].endswith("| false alarm | 0 |") and "| missed |" in rows[5]


def test_the_scorecard_names_the_layers_of_a_layer_warning_and_of_a_climb():
    from types import SimpleNamespace

    from gradwatch.alerts import Alert
    from gradwatch.reference.instability import Run, score

    def said(message):
        warn = Alert("instability", "warning", 40, None, 1.8, 1.75, message, "lower the peak learning rate")
        mon = SimpleNamespace(alerts=[warn], records=[], errors=[])
        return score(Run("r", "lr", 0.5), mon, [3.0] * 45 + [9.0] * 5, 1.0)

    layer = said("the update and the gradient of 2 of 9 weight layers grew together ..., first a.qkv (update 1.9x, "
                 "gradient 4.9x, since step 38); m.fc1 (update 1.6x, gradient 1.9x, since step 39)")
    assert (layer.spike, layer.warning, layer.lead, layer.layers) == (45, 40, 5, "a.qkv, m.fc1")
    climb = said("the whole model's gradient has stayed above 1.75x its median over the last 50 logging steps since "
                 "step 36 (now 1.8x), most in m.fc2 (2.3x), a.proj (1.7x)")
    assert climb.layers == "m.fc2, a.proj"


def test_a_run_s_records_replay_the_rule_exactly_as_it_judged_live():
    # how every rule change is tried (benchmarks/instability_replay.py): the records, pickled and fed again to a
    # fresh rule, give the live first warning; the loss the rule's gate and climb read travels in the record
    import pickle

    from gradwatch.alerts import Measurements
    from gradwatch.alerts.instability import Instability
    from gradwatch.reference.instability import Run, train_run

    mon, losses, _ = train_run(Run("lr0.5-s0", "lr", 0.5, steps=120))
    live = next(a.step for a in mon.alerts if a.rule == "instability" and a.severity != "info")
    records = pickle.loads(pickle.dumps(mon.records))
    assert [r.loss for r in records] == pytest.approx(losses)
    rule = Instability()
    replayed = next(r.step for r in records
                    if rule.check(Measurements.from_record(r, dict(zip(r.layers, r.kinds)))))
    assert replayed == live
