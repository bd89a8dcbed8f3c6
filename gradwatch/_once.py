"""Say a thing once: the one owner of "warn once" (a leaf), and of "this folder was deleted" said once
whichever part of gradwatch notices it.

Two channels, one rule: a misuse of gradwatch's API (``step()`` after ``close()``) is a Python warning, which
points at the caller's line; a condition of the model or the run (a TorchScript block, flow unavailable under
torch.compile) goes to the ``gradwatch`` logger, beside the alerts.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import warnings

__all__ = ["Once", "recreate_folder"]

log = logging.getLogger("gradwatch")


class Once:
    """Remembers which keys were said; each method says its message only the first time its key comes."""

    def __init__(self) -> None:
        self._said: set[str] = set()

    def _first(self, key: str) -> bool:
        if key in self._said:
            return False
        self._said.add(key)
        return True

    def warn(self, key: str, message: str, stacklevel: int = 3) -> None:
        """A Python warning (API misuse). ``stacklevel`` counts from this method: 3 names the line that called
        the gradwatch method which called this one."""
        if self._first(key):
            warnings.warn(message, stacklevel=stacklevel)

    def log(self, key: str, message: str) -> None:
        """A warning on the ``gradwatch`` logger (a condition of the model or the run)."""
        if self._first(key):
            log.warning(message)



_recreated: dict[str, float] = {}  # folder -> when (time.monotonic()) gradwatch last re-created it
_recreated_lock = threading.Lock()


def recreate_folder(path: str | os.PathLike[str], since: float) -> bool | None:
    """Re-create the folder ``path`` if it is gone, for a file in it that was deleted during the run.

    Returns True when this call re-created it (the caller warns: the folder was deleted), False when another
    part of gradwatch re-created it after ``since`` (the ``time.monotonic()`` at which the caller opened its
    file: it already warned, the caller says it at INFO level), None when it was there all along (only the
    caller's file went). The TensorBoard sink and the alert record both notice when ``log_dir`` goes; the
    user is told once. Raises ``OSError`` when the folder cannot be created."""
    key = os.path.abspath(path)
    with _recreated_lock:
        if not os.path.isdir(key):
            os.makedirs(key, exist_ok=True)
            _recreated[key] = time.monotonic()
            return True
        return False if _recreated.get(key, -math.inf) > since else None
