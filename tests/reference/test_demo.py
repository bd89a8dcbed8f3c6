"""`gradwatch demo` says first what it will do and about how long it will take, then prints each net's line of
the comparison as that net finishes, then the comparison: run through the command line, as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_demo_says_what_and_how_long_first_then_each_net_as_it_finishes(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "gradwatch")
    # stdout and stderr in one pipe, as on a terminal: the order of what arrives is the order it was written,
    # so a net's line landing before the next net's progress bar shows it was printed (and flushed) as it finished
    # with Python's default buffering, which keeps a piped stdout until exit unless the demo flushes
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(
        [exe, "demo", "--steps", "3", "--depth", "8", "--every", "2", "--nets", "plain", "preact",
         "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, env=env,
    )
    text = done.stdout
    assert done.returncode == 0, text
    plan = text.index("gradwatch demo: trains 2 nets (plain, preact) of depth 8 for 3 steps each at batch 32")
    estimate = re.search(r"^Estimated time: about \d+ (s|min) \(\d+ (s|min) per net", text, re.M)
    first = re.search(r"^\[1/2\] plain +\d+ (s|min): grad_to_weight first/last \S+ \(at init \S+\); alerts: none; "
                      r"about \d+ (s|min) to go$", text, re.M)
    second_bar = text.index("  preact       [")
    second = re.search(r"^\[2/2\] preact .*alerts: none$", text, re.M)
    table = text.index("grad_to_weight, median over logged steps")
    assert estimate and first and second
    assert plan < estimate.start() < first.start() < second_bar < second.start() < table
    # the final comparison still has every net's row
    assert re.search(r"^  plain .* plain 8-layer BN net", text[table:], re.M)
    assert re.search(r"^  preact .* ResNet-8, pre-activation", text[table:], re.M)
