"""Drawing the pictures in a child process, so matplotlib never holds the training process's GIL.

Drawn on the TensorBoard sink's thread, matplotlib's Python held the GIL for the whole drawing (about a second
for ResNet-56) and its allocations set off full garbage collections over the training process's heap: a
Python-bound training loop ran ~5x slower while a drawing lasted, with stalls of up to 460 ms
(``benchmarks/picture_stall.py``). A child process draws instead: one per training process, started at the
first drawing and shared by every sink. The child imports the drawing modules only (numpy and matplotlib, not
torch nor the rest of gradwatch), reads :class:`~gradwatch.sinks.tensorboard.pictures.Scene` values on its stdin and answers with
the PNGs. The sink's thread waits for the answer without the GIL.

Where a child cannot run (a frozen executable, a sandbox without subprocesses) or stops answering, the pictures
are drawn in the process as before, and a warning says so once; ``GRADWATCH_DRAW_IN_PROCESS=1`` asks for that
without a warning. The child takes ~90 MB of memory (matplotlib) for the life of the training process.
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
from typing import IO, Any, BinaryIO

from ._card import HealthCard
from .pictures import Picture, Scene, draw

log = logging.getLogger("gradwatch")

__all__ = ["draw_pictures"]

_TIMEOUT = 300.0  # seconds for one drawing, the child's start included (a first matplotlib import builds caches)
_HEADER = struct.Struct("<Q")
_PACKAGE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # gradwatch/
_HELLO = b"gradwatch-drawer 1\n"  # the child's first words: it started, and it is ours
# The child's program. Ctrl-C is for the training process (the child exits when its input ends); the first
# message on stdin is this process's import path (pickled: any entry, any length); ``gradwatch`` and the
# packages down to this one become bare namespaces for their folders (argv[1] is gradwatch's), so no
# ``__init__`` runs: gradwatch's imports torch.
_BOOT = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
         "import os, pickle, struct, sys, types\n"
         "n = struct.unpack('<Q', sys.stdin.buffer.read(8))[0]; sys.path[:0] = pickle.loads(sys.stdin.buffer.read(n))\n"
         "for name, path in (('gradwatch', sys.argv[1]), ('gradwatch.sinks', 'sinks'), "
         "('gradwatch.sinks.tensorboard', 'sinks/tensorboard')):\n"
         "    p = types.ModuleType(name); p.__path__ = [os.path.join(sys.argv[1], path)]; sys.modules[name] = p\n"
         "from gradwatch.sinks.tensorboard._drawer import serve; serve()")


class _Unavailable(Exception):
    """The child could not be started or stopped answering."""


def _send(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError("the drawing process closed its output")
    size = _HEADER.unpack(head)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the drawing process closed its output")
    return pickle.loads(data)  # noqa: S301 - our own child's answer


def _import_path() -> list[str]:
    return [os.fspath(p) for p in sys.path if isinstance(p, (str, os.PathLike))]


class _Child:
    """The drawing process and its pipes."""

    def __init__(self) -> None:
        if getattr(sys, "frozen", False) or not sys.executable:
            raise _Unavailable("no Python interpreter to start (a frozen executable)")
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # Windows: no console window for it
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _BOOT, _PACKAGE], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, close_fds=True, creationflags=flags)
            stdin, stdout = self.proc.stdin, self.proc.stdout
            assert stdin is not None and stdout is not None  # both were asked for as pipes
            self.stdin, self.stdout = stdin, stdout
            _send(self.stdin, _import_path())
        except Exception as err:  # noqa: BLE001 - whatever stops the start, drawing goes on in the process
            proc = getattr(self, "proc", None)
            if proc is not None:
                _end(proc)
            raise _Unavailable(f"{type(err).__name__}: {err}") from err
        self._hello = False
        self._expired = False

    def _expire(self) -> None:
        self._expired = True
        self.proc.kill()

    def ask(self, request: Any) -> Any:
        # A watchdog, not a read timeout: reads on pipes cannot time out on every platform; killing the child
        # ends the read.
        timer = threading.Timer(_TIMEOUT, self._expire)
        timer.daemon = True
        timer.start()
        try:
            if not self._hello:
                if self.stdout.read(len(_HELLO)) != _HELLO:
                    raise EOFError("the child did not start as a drawing process")
                self._hello = True
            _send(self.stdin, request)
            return _receive(self.stdout)
        except (OSError, EOFError, pickle.UnpicklingError) as err:
            code = self.proc.poll()
            why = f"no answer in {_TIMEOUT:.0f} s" if self._expired else f"{type(err).__name__}: {err}"
            raise _Unavailable(why + ("" if code is None else f" (exit status {code})")) from err
        finally:
            timer.cancel()

    def close(self) -> None:
        try:
            self.stdin.close()  # the child exits at the end of its input
        except OSError:
            pass
        _end(self.proc)


def _end(proc: subprocess.Popen, wait: float = 5.0) -> None:
    """Wait ``wait`` seconds for ``proc`` to exit, then kill it; close its pipes. Never raises."""
    try:
        proc.wait(timeout=wait)
    except Exception:  # noqa: BLE001 - make sure it is gone
        proc.kill()
        proc.wait()
    for stream in (proc.stdin, proc.stdout):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass


class _Drawer:
    """The one child of this process, shared by every sink's thread (one drawing at a time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._child: _Child | None = None
        self._off = False
        self._stale: list[_Child] = []  # a forked process's copies of the parent's child: kept, never used

    def draw(self, sc: Scene | HealthCard | None) -> list[Picture]:
        if sc is None:
            return []
        with self._lock:
            if not self._off and os.environ.get("GRADWATCH_DRAW_IN_PROCESS", "") not in ("", "0"):
                self._off = True
                self._stop()
            if not self._off:
                try:
                    return self._remote(sc)
                except _Unavailable as err:
                    self._off = True
                    self._stop()
                    log.warning("gradwatch: drawing the pictures in a child process failed (%s); drawing them in "
                                "this process from now on (GRADWATCH_DRAW_IN_PROCESS=1 skips the child)", err)
            return draw(sc)

    def _remote(self, sc: Scene | HealthCard) -> list[Picture]:
        if self._child is None:
            self._child = _Child()
        try:
            kind, value = self._child.ask(sc)
        except _Unavailable:
            raise
        except BaseException:
            # interrupted (Ctrl-C) between question and answer: the answer would be read for the next question
            self._stop(kill=True)
            raise
        if kind == "error" and isinstance(value, ImportError):  # the child's environment, not the drawing
            raise _Unavailable(f"{type(value).__name__}: {value}")
        if kind == "error":  # the drawing itself failed: raised as it would have been here
            raise value
        return value

    def _stop(self, kill: bool = False) -> None:
        child, self._child = self._child, None
        if child is not None:
            if kill:
                child.proc.kill()
            child.close()

    def close(self) -> None:
        with self._lock:
            self._stop()

    def shutdown(self) -> None:
        """At interpreter exit: end the child. Sinks closed after this (their own exit handlers run later) draw
        their last pictures here rather than start a child while the interpreter goes down. A drawing still in
        flight is not waited for: its child is killed (the drawing then falls back here)."""
        self._off = True
        if not self._lock.acquire(blocking=False):
            child = self._child
            if child is not None:
                child.proc.kill()
            if not self._lock.acquire(timeout=5):
                return
        try:
            self._stop()
        finally:
            self._lock.release()

    def _forget(self) -> None:
        """In a forked process: the pipes are the parent's. They are pointed at the null device and closed (a
        buffered write flushed here must not reach the parent's child), the Popen kept (it is not this process's
        child to wait for), and this process starts its own child if it draws."""
        self._lock = threading.Lock()
        child, self._child = self._child, None
        if child is not None:
            null = os.open(os.devnull, os.O_RDWR)
            try:
                for stream in (child.stdin, child.stdout):
                    os.dup2(null, stream.fileno())
                    stream.close()
            except (OSError, ValueError):
                pass
            finally:
                os.close(null)
            self._stale.append(child)


_DRAWER = _Drawer()
atexit.register(_DRAWER.shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_DRAWER._forget)


def draw_pictures(sc: Scene | HealthCard | None) -> list[Picture]:
    """The pictures of ``sc``, drawn in this process's drawing child (or here, where there is none)."""
    return _DRAWER.draw(sc)


def serve(stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> None:
    """The child's loop: a Scene in, ``("ok", pictures)`` or ``("error", exception)`` out, until its input ends
    (or the parent is gone: then it exits quietly)."""
    if stdout is None:
        # the answers get their own descriptor; anything printed goes to stderr, not into the answers
        stdout = os.fdopen(os.dup(1), "wb")
        os.dup2(2, 1)
    stdin = stdin if stdin is not None else sys.stdin.buffer
    try:
        stdout.write(_HELLO)
        stdout.flush()
        while True:
            try:
                request = _receive(stdin)
            except EOFError:
                return
            _send(stdout, _answer(request))
    except (OSError, ValueError):  # the parent closed the pipes (killed, or gone): nobody to tell
        os._exit(0)


def _answer(request: Any) -> tuple[str, Any]:
    try:
        return "ok", draw(request)
    except Exception as err:  # noqa: BLE001 - raised in the parent, which logs it
        try:
            pickle.loads(pickle.dumps(err))  # the parent must be able to read it back
            return "error", err
        except Exception:  # noqa: BLE001
            return "error", RuntimeError(f"{type(err).__name__}: {err}")
