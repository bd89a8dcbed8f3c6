"""The command line: `gradwatch demo` end to end, `python -m gradwatch`, argument errors."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import read_events

from gradwatch.reference.data import synthetic_images
from gradwatch.reference.demo import run_demo


def test_demo_trains_four_nets_and_logs_each(tmp_path, capsys):
    out = tmp_path / "demo"
    histories = run_demo(out=str(out), steps=4, depth=8, every=2, batch_size=8)
    text = capsys.readouterr().out
    assert set(histories) == {"plain", "postact", "preact", "broken_skip"}
    for net in histories:
        assert net in text
        series = read_events(str(out / net))["series"]
        assert set(series["zz_gradwatch.layers/grad_to_weight/conv1"]) == {0, 2}
        assert "zz_gradwatch.layers/update_to_weight/fc" in series
    assert f"tensorboard --logdir {out}" in text and f"gradwatch report {out}" in text
    assert "first/last" in text


def test_console_script_and_module_entry_points(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "gradwatch")
    done = subprocess.run(
        [exe, "demo", "--steps", "2", "--depth", "8", "--nets", "preact", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ") and "e-" in line]
    assert rows == ["preact"]
    bad = subprocess.run([sys.executable, "-m", "gradwatch", "demo", "--depth", "21"], capture_output=True, text=True)
    assert bad.returncode == 2 and "6n+2" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "gradwatch", "demo", "--steps", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "steps" in bad.stderr


def test_generated_data_is_deterministic_and_labelled():
    x1, y1 = synthetic_images(32, seed=3)
    x2, y2 = synthetic_images(32, seed=3)
    assert x1.equal(x2) and y1.equal(y2)
    assert y1.min() >= 0 and y1.max() < 10
    assert not synthetic_images(32, seed=4)[0].equal(x1)


def test_inspect_with_a_wrong_input_shape_says_so_in_one_line_and_exits_non_zero(capsys):
    from gradwatch.cli import main

    net = ["inspect", "gradwatch.reference.blocks:resnet", "--kwargs", "depth=8"]
    assert main([*net, "--input-shape", "2,5,32,32"]) == 1  # the net takes 3 channels
    out, err = capsys.readouterr()
    assert not out and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("gradwatch inspect: the model's forward failed on an input of shape 2,5,32,32: RuntimeError:")
    assert "expected input[2, 5, 32, 32] to have 3 channels" in err  # the model's own message
    assert main(["inspect", "gradwatch.reference.blocks:resnet", "--kwargs", "dpth=8", "--input-shape", "2,3,8,8"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resnet(dpth=8) failed: TypeError:" in err and "dpth" in err
    # a shape that is not one: argparse's usage and one error line, exit 2 (the console script, as a user runs it)
    bad = subprocess.run([sys.executable, "-m", "gradwatch", *net, "--input-shape", "2,x"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "argument --input-shape: expected sizes >= 1 separated by commas, e.g. 2,3,32,32, got '2,x'" in bad.stderr
