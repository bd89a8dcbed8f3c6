"""Drawing in a child process: the same PNGs as drawn here, without torch, errors raised as here, and a fallback
to drawing here when the child cannot start or stops answering."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import gradwatch
from gradwatch import _drawer
from gradwatch.blocks import resnet
from gradwatch.pictures import Timeline, draw, scene


@pytest.fixture(scope="module")
def sc():
    torch.manual_seed(0)
    model = resnet(8, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, pictures=0)
    tl = Timeline()
    for s in range(4):
        g = torch.Generator().manual_seed(s)
        F.cross_entropy(model(torch.randn(4, 3, 8, 8, generator=g)), torch.randint(0, 10, (4,), generator=g)).backward()
        opt.step()
        opt.zero_grad()
        tl.add(mon.latest)
    mon.close()
    return scene(tl, title="run: ")


@pytest.fixture()
def drawer():
    d = _drawer._Drawer()
    yield d
    d.close()


def test_the_child_draws_the_same_pngs_as_this_process(sc, drawer):
    there = drawer.draw(sc)
    assert drawer._child is not None and drawer._child.proc.poll() is None  # drawn in a live child
    here = draw(sc)
    assert [p.name for p in there] == [p.name for p in here] == ["grad_to_weight", "skip_share", "effective_depth",
                                                                 "profile"]
    assert [(p.png, p.width, p.height) for p in there] == [(p.png, p.width, p.height) for p in here]
    assert drawer.draw(None) == []


def test_the_child_imports_the_drawing_modules_without_torch():
    probe = _drawer._BOOT.replace(
        "from gradwatch._drawer import serve; serve()",
        "import gradwatch._drawer; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'matplotlib'}))")
    out = subprocess.run([sys.executable, "-c", probe, _drawer._PACKAGE, ""], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"  # matplotlib is imported at the first drawing, torch never


def test_a_drawing_that_fails_in_the_child_raises_here_and_the_child_draws_on(sc, drawer):
    bad = sc._replace(g2w=sc.g2w[:, 0])  # a row where the map needs a matrix: matplotlib refuses it
    with pytest.raises(TypeError, match="Invalid shape") as there:
        drawer.draw(bad)
    with pytest.raises(TypeError, match="Invalid shape") as here:
        draw(bad)
    assert str(there.value) == str(here.value)
    assert [p.name for p in drawer.draw(sc)][-1] == "profile" and drawer._child.proc.poll() is None


def test_no_child_to_start_draws_here_and_says_so_once(sc, drawer, monkeypatch, caplog):
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        first, second = drawer.draw(sc), drawer.draw(sc)
    assert [p.png for p in first] == [p.png for p in second] == [p.png for p in draw(sc)]
    assert caplog.text.count("drawing the pictures in a child process failed (FileNotFoundError") == 1


def test_a_child_that_dies_is_not_restarted_and_drawing_goes_on_here(sc, drawer, caplog):
    drawer.draw(sc)
    drawer._child.proc.kill()
    drawer._child.proc.wait()
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        pictures = drawer.draw(sc)
    assert [p.png for p in pictures] == [p.png for p in draw(sc)]
    assert "drawing them in this process from now on" in caplog.text and drawer._child is None


def test_a_child_that_is_not_a_drawing_process_is_refused(sc, drawer, monkeypatch, caplog):
    monkeypatch.setattr(_drawer, "_BOOT", "print('hello')")  # an executable that answers something else
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        pictures = drawer.draw(sc)
    assert [p.png for p in pictures] == [p.png for p in draw(sc)]
    assert "did not start as a drawing process" in caplog.text


def test_the_environment_can_keep_drawing_in_this_process(sc, monkeypatch):
    monkeypatch.setenv("GRADWATCH_DRAW_IN_PROCESS", "1")
    d = _drawer._Drawer()
    assert [p.name for p in d.draw(sc)][-1] == "profile" and d._child is None


def test_closing_ends_the_child(sc, drawer):
    drawer.draw(sc)
    proc = drawer._child.proc
    drawer.close()
    assert proc.poll() == 0 and drawer._child is None
