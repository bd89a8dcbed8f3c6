"""What TensorBoard itself serves from a gradwatch run: a real `tensorboard` server on 127.0.0.1, read over HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
import torch.nn.functional as F

import gradwatch
from gradwatch.reference.blocks import resnet

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path):
    torch.manual_seed(0)
    model = resnet(8, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, log_dir=tmp_path / "run", pictures=2)
    for _ in range(4):
        F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.randint(0, 10, (4,))).backward()
        opt.step()
        opt.zero_grad()
    mon.close()
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
                if "run" in get("/data/runs"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("tensorboard did not serve the run within 90 s")
            time.sleep(0.5)
        yield mon, get
    finally:
        proc.terminate()
        proc.wait(10)


def test_tensorboard_serves_the_health_section_layout_and_pictures(served):
    mon, get = served
    tags = get("/data/plugin/scalars/tags")["run"]
    health = sorted(t for t in tags if t.split("/")[0] == "gradwatch")
    assert health == ["gradwatch/effective_depth", "gradwatch/grad_norm", "gradwatch/grad_to_weight_early",
                      "gradwatch/open_incidents", "gradwatch/skip_share_min", "gradwatch/transmission_end_to_end"]
    assert len([t for t in tags if t.startswith("gradwatch.layers/grad_to_weight/")]) == len(mon.layer_names) + 1
    layout = get("/data/plugin/custom_scalars/layout")
    titles = [c["title"] for c in layout["category"]]
    assert titles[0] == "gradwatch: health" and "gradwatch: skip_share by block" in titles
    assert all(len(c["chart"]) >= 1 for c in layout["category"])
    images = get("/data/plugin/images/tags")["run"]
    assert set(images) == {"gradwatch.pictures/grad_to_weight", "gradwatch.pictures/skip_share",
                           "gradwatch.pictures/profile", "gradwatch.pictures/effective_depth"}
    points = get("/data/plugin/scalars/scalars?run=run&tag=gradwatch%2Fskip_share_min")
    assert [p[1] for p in points] == [0, 1, 2, 3]
    assert points[-1][2] == pytest.approx(mon.latest.health["skip_share_min"], rel=1e-6)
