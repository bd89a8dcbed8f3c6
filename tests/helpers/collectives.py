"""Counting collectives: the tests pin how many ``all_reduce`` calls a logging step makes (and none elsewhere)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def all_reduces() -> Iterator[list[int]]:
    """Counts the ``torch.distributed.all_reduce`` calls made inside the block (gradwatch looks the function up on
    the module at each call, so replacing the module attribute sees every one)."""
    import torch.distributed as dist

    calls: list[int] = []
    real = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    dist.all_reduce = counting
    try:
        yield calls
    finally:
        dist.all_reduce = real
