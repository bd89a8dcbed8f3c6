"""gradwatch validate: planted faults are found and named, a miss fails the run, the summary is written."""

from __future__ import annotations

import json
import math

import pytest

from gradwatch.cli import main
from gradwatch.reference import validate
from gradwatch.reference._json import dump_json
from gradwatch.reference.blocks import resnet


def test_faults_are_found_naming_the_layer_or_block_and_the_summary_is_written(tmp_path, capsys):
    code = main(["validate", "--quick", "--only", "detached-skip", "zero-lr", "nan-gradient", "--steps", "55",
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    def refuse(token):  # what JavaScript or jq would do with a bare NaN / Infinity
        raise ValueError(f"not strict JSON: {token}")

    summary = json.loads((tmp_path / "validate.json").read_text(), parse_constant=refuse)
    got = {c["case"]: c for c in summary["cases"]}
    assert set(got) == {"detached-skip", "zero-lr", "nan-gradient"} and all(c["passed"] for c in got.values())
    assert got["detached-skip"]["observed"][0].startswith("skip_collapse@10 (layer2.1)")
    assert got["nan-gradient"]["observed"][0] == "nonfinite@50 (layer2.0.conv1) [critical]"
    assert (tmp_path / "zero-lr").is_dir()  # TensorBoard logs per case
    assert "3/3 passed" in out and "| detached-skip | fault |" in out


def test_a_miss_or_a_false_alarm_fails_the_verdict(tmp_path):
    healthy_but_expected = validate.Case("healthy-expecting-collapse", "fault", "a healthy net cannot show a "
                                         "collapse", lambda: resnet(8, width=4), expect=(("skip_collapse", None),))
    o = validate.run_case(healthy_but_expected, str(tmp_path), steps=15)
    assert o.missed == ["skip_collapse (any)"] and not o.passed
    broken_but_healthy = validate.Case("broken-called-healthy", "healthy", "a collapse on a 'healthy' net",
                                       lambda: resnet(8, width=4, skip_fault={0: "detached"}))
    o = validate.run_case(broken_but_healthy, str(tmp_path), steps=20)
    assert o.false_alarms and o.false_alarms[0].startswith("skip_collapse@") and "(layer1.0)" in o.false_alarms[0]
    assert not o.passed


def test_unknown_cases_get_a_clear_message(capsys, tmp_path):
    assert main(["validate", "--only", "no-such-case", "--out", str(tmp_path)]) == 2
    assert "no case matches ['no-such-case']" in capsys.readouterr().err


def test_summaries_are_strict_json(tmp_path):
    doc = {"a": math.nan, "b": [1.5, math.inf, (-math.inf, 2)], "c": {"d": 0.0}}
    dump_json(str(tmp_path / "s.json"), doc)
    text = (tmp_path / "s.json").read_text()
    assert json.loads(text, parse_constant=lambda t: pytest.fail(f"bare {t}")) == {
        "a": "nan", "b": [1.5, "inf", ["-inf", 2]], "c": {"d": 0.0}}


def test_shortcut_variants_are_judged_attenuated_and_the_near_identity_gate_is_quiet(tmp_path, capsys):
    """--quick trains the 110-layer variants 20 steps: constant scaling must raise attenuated_identity (at the
    third logging step), shortcut-only gating at b_g = -6 (a near-identity skip) must not."""
    code = main(["validate", "--quick", "--only", "constant-scaling-110", "shortcut-only-gating-110-bg-6",
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    got = {c["case"]: c for c in json.loads((tmp_path / "validate.json").read_text())["cases"]}
    assert all(c["passed"] for c in got.values()), got
    assert any(o.startswith("attenuated_identity@10 (-) [warning]") for o in got["constant-scaling-110"]["observed"])
    assert not any(o.startswith("attenuated_identity") for o in got["shortcut-only-gating-110-bg-6"]["observed"])
