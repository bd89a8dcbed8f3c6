"""Worker processes for the multi-process tests (real gloo process groups), started cheaply.

``torch.multiprocessing.spawn`` starts each worker as a fresh interpreter that imports torch, torch.distributed
and gradwatch again: ~4 s of CPU a process, more than most of these tests' own work on a 2-core machine. A fork
server started once per test session with those modules already imported forks each worker in milliseconds.
The fork server imports modules only (no tensor op, no thread pool, no process group), so forking it is safe;
each worker still gets ``spawn``'s contract: a picklable module-level function, its own process group, the
parent's ``sys.path``, and an error in any worker raised here."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

# imported once by the fork server; what every worker imports anyway
_PRELOAD = ["torch", "torch.distributed", "torch.distributed.fsdp", "torch.distributed.tensor", "numpy", "gradwatch",
            "tensorboard.compat.proto.event_pb2"]


def spawn(fn: Callable[..., Any], args: tuple = (), nprocs: int = 2) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs, join=True)``, each worker forked from the session's fork
    server (``fn(rank, *args)`` in each)."""
    import torch.multiprocessing as mp

    multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)  # used when the server starts
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")
