"""What TensorBoard itself serves from a gradwatch run: a real `tensorboard` server on 127.0.0.1, read over HTTP.

The run holds the user's own scalars next to gradwatch's, written to the same ``SummaryWriter`` as a Lightning
``TensorBoardLogger`` does (``epoch``, ``train_loss``), and a second run with the HF Trainer's ``train/*``.
The order of the groups is TensorBoard's own: its Time Series sorts the tags with the comparison of its web
app (``compareTagNames`` in tensorboard/webapp/util/string.ts, re-implemented in :func:`_tb_compare`), groups
them by the text before the first ``/`` in that order and opens the first two groups.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

import gradwatch
from gradwatch.reference.blocks import resnet
from gradwatch.sinks.tags import MAX_SCALAR_TAGS

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tb_compare(a: str, b: str) -> int:
    """TensorBoard's tag order: numbers compare as numbers, digits and ``/`` before any other character,
    otherwise by character code."""
    def special(c: str) -> bool:
        return c == "/" or c.isdigit()

    i = j = 0
    while True:
        if i == len(a):
            return 0 if j == len(b) else -1
        if j == len(b):
            return 1
        if a[i].isdigit() and b[j].isdigit():
            si, sj = i, j
            while i < len(a) and a[i].isdigit():
                i += 1
            while j < len(b) and b[j].isdigit():
                j += 1
            if int(a[si:i]) != int(b[sj:j]):
                return -1 if int(a[si:i]) < int(b[sj:j]) else 1
            continue
        if special(a[i]) and not special(b[j]):
            return -1
        if special(b[j]) and not special(a[i]):
            return 1
        if a[i] != b[j]:
            return -1 if a[i] < b[j] else 1
        i += 1
        j += 1


def _groups(tags: list[str]) -> list[str]:
    """The groups of Time Series, in its order (the first two are open)."""
    out: list[str] = []
    for tag in sorted(tags, key=functools.cmp_to_key(_tb_compare)):
        group = tag.split("/", 1)[0]
        if group not in out:
            out.append(group)
    return out


@pytest.fixture
def served(tmp_path):
    torch.manual_seed(0)
    model = resnet(8, width=4, skip_fault={1: "detached"})  # a collapsed skip: an incident from step 2
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = SummaryWriter(str(tmp_path / "lightning"))
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, writer=writer, pictures=2)
    for step in range(5):
        loss = F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.randint(0, 10, (4,)))
        loss.backward()
        opt.step()
        opt.zero_grad()
        writer.add_scalar("train_loss", loss.item(), step)  # what self.log("train_loss") gives
        writer.add_scalar("epoch", 0, step)  # what Lightning adds
    mon.close()
    writer.close()
    hf = SummaryWriter(str(tmp_path / "hf_trainer"))
    for step in range(3):
        for key in ("loss", "grad_norm", "learning_rate", "epoch"):
            hf.add_scalar(f"train/{key}", 1.0, step)
    hf.close()
    port = _free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    proc = subprocess.Popen([exe, "--logdir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port),
                             "--reload_interval", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def get(path: str):
        with urllib.request.urlopen(url + path, timeout=10) as r:
            return json.loads(r.read())

    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if {"lightning", "hf_trainer"} <= set(get("/data/runs")):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("tensorboard did not serve the runs within 90 s")
            time.sleep(0.5)
        yield mon, get
    finally:
        proc.terminate()
        proc.wait(10)


def test_tensorboard_serves_a_bounded_dashboard_health_first_and_the_users_groups_before_the_bulk(served):
    mon, get = served
    scalars = get("/data/plugin/scalars/tags")
    ours = [t for t in scalars["lightning"] if t not in ("train_loss", "epoch")]
    assert 20 <= len(ours) <= MAX_SCALAR_TAGS  # (1): bounded, though the model has 20 layers x 4 metrics
    assert not any(n in t for t in ours for n in mon.layer_names)  # per-layer values are not scalar tags
    images = get("/data/plugin/images/tags")["lightning"]
    histograms = get("/data/plugin/histograms/tags")["lightning"]
    # (3): Time Series' groups over both runs, in its order: the health section, the user's, gradwatch's bulk
    every = [*scalars["lightning"], *scalars["hf_trainer"], *images, *histograms]
    assert _groups(every) == ["_gradwatch", "epoch", "train", "train_loss", "zz_gradwatch.alerts",
                              "zz_gradwatch.blocks", "zz_gradwatch.health", "zz_gradwatch.layers",
                              "zz_gradwatch.pictures"]
    assert _groups([*scalars["hf_trainer"], *scalars["lightning"], *images])[:2] == ["_gradwatch", "epoch"]
    assert _groups([*scalars["hf_trainer"]] + [t for t in [*scalars["lightning"], *images] if "/" in t])[:2] == \
        ["_gradwatch", "train"]  # HF: the two groups TensorBoard opens are the health section and train/
    # (2): the health section is one card (one row: the user's first group stays on the first screen), the
    # figures' curves in priority order further down
    assert [t for t in [*scalars["lightning"], *images] if t.startswith("_gradwatch/")] == ["_gradwatch/1_health"]
    curves = sorted((t for t in scalars["lightning"] if t.startswith("zz_gradwatch.health/")),
                    key=functools.cmp_to_key(_tb_compare))
    assert curves == ["zz_gradwatch.health/2_skip_share_min", "zz_gradwatch.health/3_grad_to_weight_early_log10",
                      "zz_gradwatch.health/4_grad_norm_log10", "zz_gradwatch.health/5_transmission_end_to_end_log10",
                      "zz_gradwatch.health/6_effective_depth"]
    opened = [e for r in mon.records for e in r.events if e.kind == "opened"]
    assert [(e.rule, e.name) for e in opened] == [("skip_collapse", "layer2.0")]
    # the card lists what is open (rule, block, since which step): drawn when it opened, and with the pictures
    assert mon._out.owned[0]._pictures.incidents.rows() == [("warning", "skip_collapse", "layer2.0", opened[0].step)]
    q = urllib.parse.urlencode({"run": "lightning", "tag": "_gradwatch/1_health"})
    cards = get(f"/data/plugin/images/images?{q}")
    assert opened[0].step in [c["step"] for c in cards] and cards[-1]["step"] == 4
    points = get("/data/plugin/scalars/scalars?" + urllib.parse.urlencode(
        {"run": "lightning", "tag": "zz_gradwatch.health/3_grad_to_weight_early_log10"}))
    assert [p[1] for p in points] == [0, 1, 2, 3, 4]
    assert 10 ** points[-1][2] == pytest.approx(mon.latest.health["grad_to_weight_early"], rel=1e-5)
    layout = get("/data/plugin/custom_scalars/layout")
    assert [c["title"] for c in layout["category"]] == ["gradwatch: health"]  # no per-layer charts to fill
