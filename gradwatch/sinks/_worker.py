"""A background thread that runs a sink's slow work in order, off the training thread. A leaf module.

Writing a logging step to TensorBoard is CPU work in Python (a protobuf per value, histograms) and a hand-off
to the writer's own queue; done in the training thread it costs milliseconds per logging step. A
:class:`Worker` takes it over: :meth:`submit` only queues (it blocks only when ``size`` jobs are waiting,
which is back-pressure from a writer that cannot keep up, not data loss), :meth:`drain` waits for the queue
to empty. The records it is given are immutable, so the training thread never waits on them. Errors are
logged once and counted, never raised into training.

The webhook sink's thread is one too: it queues with :meth:`offer` (never waits: a full queue is the caller's
to record as dropped) and closes with ``close(timeout, left=...)`` (what is still queued then is handed back,
not run).
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

log = logging.getLogger("gradwatch")

__all__ = ["Worker", "close_at_exit", "forget_at_exit"]

_STOP = object()
_LIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # object -> seconds its close(timeout) gets


def close_at_exit(obj: Any, timeout: float) -> None:
    """Call ``obj.close(timeout)`` at interpreter exit unless :func:`forget_at_exit` ran first (a background
    thread's queue would otherwise die with the daemon thread). Holds ``obj`` weakly."""
    _LIVE[obj] = timeout


def forget_at_exit(obj: Any) -> None:
    _LIVE.pop(obj, None)


@atexit.register
def _close_live() -> None:  # pragma: no cover - exercised at interpreter exit
    for obj, timeout in list(_LIVE.items()):
        obj.close(timeout)


class Worker:
    """One daemon thread running submitted calls in order.

    Args:
        name: the thread's name (and the name in error messages).
        size: calls waiting at most (:meth:`submit` then waits, :meth:`offer` refuses).
        at_exit: close it at interpreter exit (5 s); False when its owner does that.
    """

    def __init__(self, name: str, size: int = 256, *, at_exit: bool = True) -> None:
        self.name = name
        self.errors = 0
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._unfinished = 0
        self._idle = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        if at_exit:
            close_at_exit(self, 5.0)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the thread, after what was submitted before; inline once closed."""
        if self._closed:
            self._call(fn, args)
            return
        with self._idle:
            self._unfinished += 1
        self._queue.put((fn, args))

    def offer(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Like :meth:`submit` but never waits: False (nothing queued) when ``size`` calls are waiting or the
        worker is closed."""
        if self._closed:
            return False
        with self._idle:
            self._unfinished += 1
        try:
            self._queue.put_nowait((fn, args))
        except queue.Full:
            self._finished()
            return False
        return True

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted has run (at most ``timeout`` seconds); whether it all ran."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._unfinished > 0:
                left = None if end is None else end - time.monotonic()
                if (left is not None and left <= 0) or not self._thread.is_alive():
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float | None = None, left: Callable[..., Any] | None = None) -> None:
        """Drain (at most ``timeout`` seconds), then stop the thread; later submissions run inline. With
        ``left``, the calls still queued after the timeout are not run: ``left(*args)`` is called for each (the
        thread finishes the call it is in, at most 1 s more); without, the thread runs them before it stops."""
        if self._closed:
            return
        self.drain(timeout)
        self._closed = True
        if left is not None:
            while True:
                try:
                    _, args = self._queue.get_nowait()
                except queue.Empty:
                    break
                self._finished()
                left(*args)
        self._queue.put((_STOP, ()))
        self._thread.join(1.0)
        forget_at_exit(self)

    def _run(self) -> None:
        while True:
            fn, args = self._queue.get()
            if fn is _STOP:
                return
            try:
                self._call(fn, args)
            finally:
                self._finished()

    def _finished(self) -> None:
        with self._idle:
            self._unfinished -= 1
            if self._unfinished <= 0:
                self._idle.notify_all()

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception as err:  # never let the thread die, never raise into training
            self.errors += 1
            if self.errors <= 3:
                log.error("gradwatch: %s failed (%s: %s); training goes on", self.name, type(err).__name__, err,
                          exc_info=err)
