"""The writer's event file, opened again when its log directory disappears during a run (an ``rm -rf`` of the
run, a cleanup job).

tensorboard's event-file writer appends each record to its file on a thread of its own. When the directory is
gone the append fails, that thread dies keeping the error, and every later call on the writer — ``add_summary``,
``flush``, and ``close`` at the end of the run — raises it: the rest of the run is lost and the script ends on a
``FileNotFoundError``. So before each write (on the sink's thread: one ``stat``) :class:`LogDir` checks that the
event file is still there; when it is gone it warns once on the ``gradwatch`` logger, re-creates the directory and
gives the ``SummaryWriter`` a new event file there, which receives the events from then on (those written before
went with the directory). A ``FileNotFoundError`` from the writer (the file went between the check and the
writer's append) is recovered the same way and the call made once more.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..._compat import detach_event_files, event_file_path, event_file_writer, reopen_event_file
from ..._once import recreate_folder

__all__ = ["LogDir"]

log = logging.getLogger("gradwatch")
T = TypeVar("T")


class LogDir:
    """Watches the log directory of ``writer`` (one with ``get_logdir()``; others are not watched).

    Attributes:
        events: the writer's current event-file writer when ``plain`` (None otherwise).
        generation: how many times the event file was replaced (the sink writes its layout again into a new one).
    """

    def __init__(self, writer: Any, plain: bool) -> None:
        self.writer = writer
        get = getattr(writer, "get_logdir", None)
        path = get() if callable(get) else None
        self.path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
        self.events: Any = None
        self._watched = self.path  # the event file when the writer says which, else the directory
        self._use(event_file_writer(writer) if plain else None)
        self.generation = 0
        self._opened = time.monotonic()  # when the current event file was opened
        self._lost = False  # the directory could not be re-created: nothing more is written

    def ready(self, step: int | None = None) -> bool:
        """Whether the writer can take a write now; opens a new event file first when the old one is gone."""
        if self._lost:
            return False
        if self._watched is None or os.path.exists(self._watched):
            return True
        return self._reopen(step)

    def call(self, fn: Callable[[], T], step: int | None = None) -> T | None:
        """``fn()``; once more after opening a new event file when it raises ``FileNotFoundError`` or the
        directory is gone (other errors are raised)."""
        try:
            return fn()
        except OSError as err:
            if self.path is None or not (isinstance(err, FileNotFoundError) or not os.path.isdir(self.path)):
                raise
        return fn() if self._reopen(step) else None

    def _use(self, events: Any) -> None:
        if events is not None:
            self.events = events
            self._watched = event_file_path(events) or self.path

    def _reopen(self, step: int | None) -> bool:
        try:
            recreated = None if self.path is None else recreate_folder(self.path, self._opened)
            new = reopen_event_file(self.writer)
        except OSError as err:
            new, recreated, why = None, True, f"cannot be re-created ({err.strerror or err})"
            detach_event_files(self.writer)  # their dead threads' error must not come out of close()
        else:
            why = "its writer cannot open a new event file"
        if new is None:
            self._lost = True
            log.warning("gradwatch: the log directory %s was deleted during the run and %s; TensorBoard events "
                        "are no longer written", self.path, why)
            return False
        self.generation += 1
        self._opened = time.monotonic()
        self._use(new if self.events is not None else None)
        when = "" if step is None else f" from step {step} on"
        if recreated is None:  # only the event file went
            log.warning("gradwatch: the event file in %s was deleted during the run; the events%s go to a new "
                        "event file there", self.path, when)
        else:  # the directory went: the first part of gradwatch to notice warns, the other says it at INFO level
            log.log(logging.WARNING if recreated else logging.INFO,
                    "gradwatch: the log directory %s was deleted during the run; re-created it, and the events%s "
                    "go to a new event file there (those written before went with the directory)", self.path, when)
        return True
