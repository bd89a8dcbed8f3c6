"""A C CRC-32C for TensorBoard's event files. A leaf module.

Without TensorFlow, ``tensorboard`` checksums every record it writes with a pure-Python CRC-32C that loops
over the bytes one by one (``tensorboard.compat.tensorflow_stub.pywrap_tensorflow.crc32c``): 19 ms for the
120 KB event of one logging step of a 1,202-tensor model, measured, on the writer's thread, holding the GIL
the training thread needs. It was the largest single cost of writing to TensorBoard (torch's
``SummaryWriter`` and Lightning's ``TensorBoardLogger`` both go through it).

:func:`install` points the record writer at ``google-crc32c``'s C implementation (0.06 ms for the same
120 KB) — only after checking, on test records, that it returns exactly what tensorboard's own function does,
so the event files stay byte-identical (:func:`checked` makes and checks that function). It changes nothing
when ``google-crc32c`` is missing or has only its pure-Python fallback, and can be turned off with
``GRADWATCH_FAST_CRC=0``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

log = logging.getLogger("gradwatch")

__all__ = ["install", "installed", "checked"]

_STATE = {"tried": False, "on": False}


def installed() -> bool:
    """Whether TensorBoard's record writer uses the C CRC-32C."""
    return _STATE["on"]


def install() -> bool:
    """Make TensorBoard's event-file checksums fast (once per process); whether it is in place."""
    if _STATE["tried"]:
        return _STATE["on"]
    _STATE["tried"] = True
    if os.environ.get("GRADWATCH_FAST_CRC", "1") == "0":
        return False
    try:
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return False
    fast = checked(record_writer.masked_crc32c)
    if fast is None:
        return False
    record_writer.masked_crc32c = fast
    _STATE["on"] = True
    return True


def checked(reference: Callable[[bytes], int]) -> Callable[[bytes], int] | None:
    """google-crc32c's masked CRC-32C (the checksum of TFRecord framing), or None when google-crc32c is missing,
    has only its pure-Python fallback, or disagrees with ``reference`` (tensorboard's own function) on test
    records."""
    try:
        import google_crc32c
    except ImportError:
        log.debug("gradwatch: google-crc32c not installed; TensorBoard checksums stay pure Python")
        return None
    if getattr(google_crc32c, "implementation", "c") != "c":
        return None

    def masked_crc32c(data: bytes) -> int:
        x = google_crc32c.value(bytes(data))
        return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    samples = (b"", b"\x00", b"gradwatch", bytes(range(256)) * 3)
    if any(masked_crc32c(s) != reference(s) for s in samples):  # never write a file tensorboard cannot read
        log.warning("gradwatch: google-crc32c disagrees with tensorboard's CRC-32C; not used")
        return None
    return masked_crc32c
