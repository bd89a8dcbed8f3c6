"""The flight recorder: when an incident opens, the records of the logging steps that led up to it, written next
to ``alerts.jsonl`` — so the alert that comes at 3 a.m. comes with what led to it.

:class:`FlightRecorder` is a sink on rank 0 (the rank that writes ``alerts.jsonl``). It keeps the latest
``steps`` :class:`~gradwatch.StepRecord` s in a ring buffer of *references*: records are immutable (frozen
dataclass, read-only arrays, a read-only health mapping), so keeping one costs a pointer while the history
still holds it, and the record's own size once the history has dropped it (measured: ``docs/alerts.md``,
"Flight recorder"). Nothing is copied and nothing is written until an incident opens.

The alert engine asks :meth:`FlightRecorder.name` for the file of each incident told ``opened`` (a pure
function of the step, the rule and the incident id: no I/O), so ``alerts.jsonl``, the log line and the webhook
name it; :meth:`write` then gets the record of that step, with the event in it, and hands the ring's records
to a background :class:`~gradwatch.sinks._worker.Worker`, which writes one file per incident (to a temporary
name, then renamed: a reader never sees half a file). The training thread never waits on the disk: a worker
queue that is full, a folder that cannot be made or a disk that is full is a logged skip, never an error in
training.

Format: Parquet when pyarrow is importable (typed columns, exact float64 with NaN and infinities, compact),
otherwise CSV (pandas writes and reads it with nothing more installed; floats round-trip exactly, NaN as an empty
field, infinities as ``inf``). JSONL is not used: strict JSON has no NaN, and a blow-up is full of them. The
columns are :meth:`Monitor.history <gradwatch.Monitor.history>`'s: ``step, name, metric, value``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections import deque
from collections.abc import Sequence

from .._checks import check_int
from ..alerts.incident import IncidentEvent
from ..record import Sink, StepRecord
from ._worker import Worker
from .history import to_frame

log = logging.getLogger("gradwatch")

__all__ = ["FlightRecorder", "recording_format"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_QUEUE = 64  # incident files waiting at most; more at once are skipped (logged), never waited for


def recording_format() -> str:
    """``"parquet"`` when pyarrow can be imported, else ``"csv"`` (found without importing it)."""
    return "parquet" if importlib.util.find_spec("pyarrow") is not None else "csv"


class FlightRecorder(Sink):
    """Keep the last ``steps`` records; when an incident opens, write them to one file in ``folder``.

    Args:
        steps: logging steps kept (the ring buffer's length), at least 1.
        folder: where the files go: the folder of ``alerts.jsonl``.
        format: ``"parquet"`` or ``"csv"``; None: :func:`recording_format`.
    """

    def __init__(self, steps: int, folder: str, *, format: str | None = None) -> None:
        self.steps = check_int(steps, "steps", minimum=1, owner="FlightRecorder")
        self.folder = folder
        self.format = recording_format() if format is None else format
        if self.format not in ("parquet", "csv"):
            raise ValueError(f"FlightRecorder: format must be 'parquet' or 'csv', got {format!r}")
        self._ring: deque[StepRecord] = deque(maxlen=self.steps)
        self._worker: Worker | None = None  # started at the first incident: no thread in a healthy run
        #: The files written so far, oldest first (written on the worker thread).
        self.written: list[str] = []
        #: Files named but not written (a full queue, an unwritable folder), oldest first.
        self.skipped: list[str] = []

    def name(self, event: IncidentEvent) -> str:
        """The file of the incident ``event`` opens: ``flight-step<step>-<rule>-<incident id>.<format>`` in
        :attr:`folder` (the id keeps two incidents of one rule at one step apart)."""
        rule = _UNSAFE.sub("_", event.rule) or "rule"
        return os.path.join(self.folder, f"flight-step{event.step}-{rule}-{_UNSAFE.sub('_', event.id)}.{self.format}")

    def write(self, record: StepRecord) -> None:
        """Keep ``record`` (a reference); for each incident it opens with a named file, queue that file."""
        self._ring.append(record)
        for event in record.events:
            path = event.incident.recording
            if event.kind == "opened" and path and event.step == record.step:
                self._queue(path, tuple(self._ring))

    def _queue(self, path: str, records: Sequence[StepRecord]) -> None:
        if self._worker is None:
            self._worker = Worker("gradwatch flight recorder", size=_QUEUE)
        if not self._worker.offer(self._write, path, records):
            self._skip(path, f"{_QUEUE} files already wait to be written")

    def _write(self, path: str, records: Sequence[StepRecord]) -> None:
        """On the worker thread: the records as one long table, to a temporary file renamed into place."""
        folder, base = os.path.split(path)
        tmp = os.path.join(folder, f".{base}.tmp")
        try:
            os.makedirs(folder or ".", exist_ok=True)
            frame = to_frame(records)
            if path.endswith(".parquet"):
                frame.to_parquet(tmp, index=False)
            else:
                frame.to_csv(tmp, index=False)
            os.replace(tmp, path)
        except Exception as err:  # a full disk, a folder gone, pyarrow broken: a skip, on this thread
            try:
                os.remove(tmp)
            except OSError:
                pass
            self._skip(path, f"{type(err).__name__}: {err}")
            return
        self.written.append(path)

    def _skip(self, path: str, why: str) -> None:
        self.skipped.append(path)
        log.warning("gradwatch: flight recorder: %s not written (%s); skipped, training goes on", path, why)

    def flush(self) -> None:
        """Wait (at most 10 s) for the files queued so far."""
        if self._worker is not None:
            self._worker.drain(10.0)

    def close(self) -> None:
        """Write what is queued (at most 10 s more), then stop the thread; the ring is let go."""
        if self._worker is not None:
            self._worker.close(10.0)
        self._ring.clear()

    def __repr__(self) -> str:
        return f"FlightRecorder(steps={self.steps}, folder={self.folder!r}, format={self.format!r})"
