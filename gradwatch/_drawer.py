"""Drawing the pictures in a child process, so matplotlib never holds the training process's GIL.

Drawn on the TensorBoard sink's thread, matplotlib's Python held the GIL for the whole drawing (about a second
for ResNet-56) and its allocations set off full garbage collections over the training process's heap: a
Python-bound training loop ran ~5x slower while a drawing lasted, with stalls of up to 460 ms
(``benchmarks/picture_stall.py``). A child process draws instead: one per training process, started at the
first drawing and shared by every sink. The child imports the drawing modules only (numpy and matplotlib, not
torch nor the rest of gradwatch), reads :class:`~gradwatch.pictures.Scene` values on its stdin and answers with
the PNGs. The sink's thread waits for the answer without the GIL.

Where a child cannot run (a frozen executable, a sandbox without subprocesses, ``GRADWATCH_DRAW_IN_PROCESS=1``)
or stops answering, the pictures are drawn in the process as before, and that is logged once.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
from typing import Any, BinaryIO

from .pictures import Picture, Scene, draw

log = logging.getLogger("gradwatch")

__all__ = ["draw_pictures"]

_TIMEOUT = 300.0  # seconds for one drawing, the child's start included (a first matplotlib import builds caches)
_HEADER = struct.Struct("<Q")
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_HELLO = b"gradwatch-drawer 1\n"  # the child's first words: it started, and it is ours
# The child's program: this process's import path, then ``gradwatch`` as a bare namespace for this package's
# folder (its __init__, which imports torch, does not run), then serve. argv[1]: the folder; argv[2]: the path.
_BOOT = ("import os, sys, types; sys.path[:0] = sys.argv[2].split(os.pathsep); "
         "p = types.ModuleType('gradwatch'); p.__path__ = [sys.argv[1]]; sys.modules['gradwatch'] = p; "
         "from gradwatch._drawer import serve; serve()")


class _Unavailable(Exception):
    """The child could not be started or stopped answering."""


def _send(stream: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream: BinaryIO) -> Any:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError("the drawing process closed its output")
    size = _HEADER.unpack(head)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the drawing process closed its output")
    return pickle.loads(data)  # noqa: S301 - our own child's answer


class _Child:
    """The drawing process and its pipes."""

    def __init__(self) -> None:
        if getattr(sys, "frozen", False) or not sys.executable:
            raise _Unavailable("no Python interpreter to start (a frozen executable)")
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _BOOT, _PACKAGE, os.pathsep.join(sys.path)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        except OSError as err:
            raise _Unavailable(f"{type(err).__name__}: {err}") from err
        self._hello = False

    def ask(self, request: Any) -> Any:
        # A watchdog, not a read timeout: reads on pipes cannot time out on every platform; killing the child
        # ends the read.
        timer = threading.Timer(_TIMEOUT, self.proc.kill)
        timer.daemon = True
        timer.start()
        try:
            if not self._hello:
                if self.proc.stdout.read(len(_HELLO)) != _HELLO:
                    raise EOFError("the child did not start as a drawing process")
                self._hello = True
            _send(self.proc.stdin, request)
            return _receive(self.proc.stdout)
        except (OSError, EOFError, pickle.UnpicklingError) as err:
            code = self.proc.poll()
            why = f"no answer in {_TIMEOUT:.0f} s" if not timer.is_alive() else f"{type(err).__name__}: {err}"
            raise _Unavailable(why + ("" if code is None else f" (exit status {code})")) from err
        finally:
            timer.cancel()

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # the child exits at the end of its input
            self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - closing must not raise; make sure it is gone
            self.proc.kill()
            self.proc.wait()


class _Drawer:
    """The one child of this process, shared by every sink's thread (one drawing at a time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._child: _Child | None = None
        self._off = os.environ.get("GRADWATCH_DRAW_IN_PROCESS", "") not in ("", "0")

    def draw(self, sc: Scene | None) -> list[Picture]:
        if sc is None:
            return []
        with self._lock:
            if not self._off:
                try:
                    return self._remote(sc)
                except _Unavailable as err:
                    self._off = True
                    self._stop()
                    log.info("gradwatch: drawing the pictures in a child process failed (%s); drawing them in "
                             "this process from now on", err)
            return draw(sc)

    def _remote(self, sc: Scene) -> list[Picture]:
        if self._child is None:
            self._child = _Child()
        kind, value = self._child.ask(sc)
        if kind == "error" and isinstance(value, ImportError):  # the child's environment, not the drawing
            raise _Unavailable(f"{type(value).__name__}: {value}")
        if kind == "error":  # the drawing itself failed: raised as it would have been here
            raise value
        return value

    def _stop(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.close()

    def close(self) -> None:
        with self._lock:
            self._stop()

    def shutdown(self) -> None:
        """At interpreter exit: end the child. Sinks closed after this (their own exit handlers run later) draw
        their last pictures here rather than start a child while the interpreter goes down."""
        with self._lock:
            self._stop()
            self._off = True

    def _forget(self) -> None:
        """In a forked child: the pipes are the parent's; start afresh if this process draws."""
        self._lock = threading.Lock()
        self._child = None


_DRAWER = _Drawer()
atexit.register(_DRAWER.shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_DRAWER._forget)


def draw_pictures(sc: Scene | None) -> list[Picture]:
    """The pictures of ``sc``, drawn in this process's drawing child (or here, where there is none)."""
    return _DRAWER.draw(sc)


def serve(stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> None:
    """The child's loop: a Scene in, ``("ok", pictures)`` or ``("error", message)`` out, until its input ends."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the training process; it closes our input
    if stdout is None:
        # the answers get their own descriptor; anything printed goes to stderr, not into the answers
        stdout = os.fdopen(os.dup(1), "wb")
        os.dup2(2, 1)
    stdin = stdin if stdin is not None else sys.stdin.buffer
    stdout.write(_HELLO)
    stdout.flush()
    while True:
        try:
            request = _receive(stdin)
        except EOFError:
            return
        try:
            answer: tuple[str, Any] = ("ok", draw(request))
        except Exception as err:  # noqa: BLE001 - raised in the parent, which logs it
            answer = ("error", err)
        try:
            _send(stdout, answer)
        except (pickle.PicklingError, TypeError, AttributeError):  # an exception that does not pickle
            _send(stdout, ("error", RuntimeError(f"{type(answer[1]).__name__}: {answer[1]}")))
