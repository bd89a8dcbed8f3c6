"""Drawing in a child process: the same PNGs as drawn here, without torch, errors raised as here, and a fallback
to drawing here when the child cannot start or stops answering."""

from __future__ import annotations

import io
import logging
import os
import pathlib
import pickle
import subprocess
import sys
import signal
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import gradwatch
from gradwatch.sinks.tensorboard import _drawer
from gradwatch.reference.blocks import resnet
from gradwatch.sinks.tensorboard.pictures import Timeline, draw, scene


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


def _path_message() -> bytes:
    buf = io.BytesIO()
    _drawer._send(buf, _drawer._import_path())  # the parent's first message, framed as every other
    return buf.getvalue()


def test_the_child_imports_the_drawing_modules_without_torch():
    probe = _drawer._BOOT.replace(
        "from gradwatch.sinks.tensorboard._drawer import serve; serve()",
        "import gradwatch.sinks.tensorboard._drawer; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'matplotlib'}))")
    out = subprocess.run([sys.executable, "-c", probe, _drawer._PACKAGE], input=_path_message(), capture_output=True,
                         check=True)
    assert out.stdout.decode().strip() == "[]"  # matplotlib is imported at the first drawing, torch never


def test_any_import_path_entry_reaches_the_child(sc, drawer, monkeypatch):
    monkeypatch.setattr(sys, "path", [pathlib.Path("/nonexistent"), b"/bytes-entry", *sys.path])
    assert [p.png for p in drawer.draw(sc)] == [p.png for p in draw(sc)] and drawer._child is not None


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
    assert caplog.records[0].levelno == logging.WARNING


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


def test_a_child_that_does_not_answer_in_time_is_killed(sc, drawer, monkeypatch, caplog):
    monkeypatch.setattr(_drawer, "_TIMEOUT", 0.5)
    monkeypatch.setattr(_drawer, "_BOOT", "import time; time.sleep(60)")
    t = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        pictures = drawer.draw(sc)
    assert time.perf_counter() - t < 30 and [p.png for p in pictures] == [p.png for p in draw(sc)]
    assert "no answer in 0 s" in caplog.text


def test_a_child_without_matplotlib_hands_drawing_back(sc, drawer, monkeypatch, caplog):
    monkeypatch.setattr(_drawer, "_BOOT", _drawer._BOOT.replace("from gradwatch.sinks.tensorboard._drawer", "sys.modules['matplotlib'] = None\nfrom gradwatch.sinks.tensorboard._drawer"))
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        pictures = drawer.draw(sc)
    assert [p.png for p in pictures] == [p.png for p in draw(sc)] and "ModuleNotFoundError" in caplog.text


def test_an_interrupted_drawing_does_not_leave_its_answer_for_the_next(sc, drawer, monkeypatch):
    drawer.draw(sc)
    first = drawer._child.proc
    receive = _drawer._receive

    def interrupted(stream):
        raise KeyboardInterrupt

    monkeypatch.setattr(_drawer, "_receive", interrupted)
    with pytest.raises(KeyboardInterrupt):
        drawer.draw(sc)
    monkeypatch.setattr(_drawer, "_receive", receive)
    other = sc._replace(step=sc.step + 1)  # another scene: its own profile
    assert [p.png for p in drawer.draw(other)] == [p.png for p in draw(other)]
    assert first.poll() is not None and drawer._child.proc is not first  # a new child answers


def test_a_forked_process_lets_go_of_the_parents_child(sc, drawer):
    drawer.draw(sc)
    old = drawer._child.proc
    drawer._forget()  # what a fork runs in the new process: the pipes now lead nowhere
    old.wait(timeout=10)  # the only write end is gone: the old child saw its input end and exited
    assert old.returncode == 0
    assert [p.png for p in drawer.draw(sc)] == [p.png for p in draw(sc)] and drawer._child.proc.pid != old.pid


def test_the_child_answers_an_exception_the_parent_can_read_back(sc, monkeypatch):
    class Odd(Exception):  # its __init__ takes two arguments: pickled, it cannot be rebuilt
        def __init__(self, a, b):
            super().__init__(f"{a}/{b}")

    for raised, expected in ((ValueError("bad"), ValueError("bad")), (Odd(1, 2), RuntimeError("Odd: 1/2"))):
        def failing(scene, raised=raised):
            raise raised

        monkeypatch.setattr(_drawer, "draw", failing)
        kind, value = pickle.loads(pickle.dumps(_drawer._answer(sc)))  # the trip through the pipe
        assert kind == "error" and type(value) is type(expected) and str(value) == str(expected)


def test_the_environment_can_keep_drawing_in_this_process(sc, drawer, monkeypatch, caplog):
    drawer.draw(sc)
    child = drawer._child.proc
    monkeypatch.setenv("GRADWATCH_DRAW_IN_PROCESS", "1")  # read at each drawing, not at import
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        assert [p.name for p in drawer.draw(sc)][-1] == "profile"
    assert drawer._child is None and child.poll() == 0 and not caplog.text


def test_closing_ends_the_child(sc, drawer):
    drawer.draw(sc)
    proc = drawer._child.proc
    drawer.close()
    assert proc.poll() == 0 and drawer._child is None and proc.stdout.closed


def test_shutdown_does_not_wait_for_a_drawing_in_flight(sc, drawer, monkeypatch):
    drawer.draw(sc)
    proc = drawer._child.proc
    os.kill(proc.pid, signal.SIGSTOP) if hasattr(signal, "SIGSTOP") else pytest.skip("POSIX signals")
    worker = threading.Thread(target=drawer.draw, args=(sc,))
    worker.start()
    time.sleep(0.5)  # the drawing waits for a stopped child, holding the lock
    t = time.perf_counter()
    drawer.shutdown()
    worker.join(timeout=60)
    assert time.perf_counter() - t < 30 and not worker.is_alive() and proc.poll() is not None


def test_a_sink_draws_through_the_process_drawer(tmp_path, sc, drawer, monkeypatch):
    monkeypatch.setattr(_drawer, "_DRAWER", drawer)
    torch.manual_seed(0)
    model = resnet(8, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, log_dir=tmp_path, pictures=2)
    for _ in range(2):
        F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.randint(0, 10, (4,))).backward()
        opt.step()
        opt.zero_grad()
    mon.close()
    assert drawer._child is not None and drawer._child.proc.poll() is None  # the sink's drawings went there
