"""Say a thing once: the one owner of "warn once" (a leaf).

Two channels, one rule: a misuse of gradwatch's API (``step()`` after ``close()``) is a Python warning, which
points at the caller's line; a condition of the model or the run (a TorchScript block, flow unavailable under
torch.compile) goes to the ``gradwatch`` logger, beside the alerts.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["Once"]

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
