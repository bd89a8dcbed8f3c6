"""Fixtures shared by every test folder; plain helpers live in ``tests/helpers`` (``from helpers import ...``)."""

from __future__ import annotations

import gc
import os

import pytest
import torch
from helpers import read_events


@pytest.fixture
def events():
    return read_events


#: this process's share of torch's default intra-op threads, read when this file is imported (before
#: pytest_configure sets one): all of them when pytest runs alone; under pytest-xdist (``make test``: a worker
#: per core) the worker's share, as two threads in each worker would oversubscribe the cores
_DEFAULT_THREADS = max(1, torch.get_num_threads() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


@pytest.fixture
def all_threads():
    """This process's share of torch's default intra-op threads for one test of a model large enough to use them
    (a ResNet-56, 60 steps with a monitor, back to back: 8.0 s with 1 thread, 7.0 s with 2), then one again."""
    torch.set_num_threads(_DEFAULT_THREADS)
    yield
    torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    _one_thread()
    _fast_event_reading()


def _one_thread() -> None:
    """One intra-op thread here and in every process a test starts (the variable is inherited): most tests' models
    are tiny, where a second thread only adds synchronisation, and the multi-process tests run 2-4 workers on
    2 cores. Measured on the 2-core machine: tests/flow, test_monitor and test_recorder 63 s with 2 threads,
    54 s with 1; the 4-process transformer test 37 s, 17 s; on a shared 2-core runner 2 threads once ran a zoo
    model ~50x slower. No test depends on the thread count; ``all_threads`` gives a large model its threads."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _fast_event_reading() -> None:
    """TensorBoard's reader checks every record's CRC-32C in pure Python when TensorFlow is absent (~0.5 ms a
    record: ~5 s of the 10,000-step test's read-back). The tests read event files with that reader; here it
    checks them with the C function gradwatch writes with, which gradwatch first checks against tensorboard's."""
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

    from gradwatch.sinks.tensorboard import _fastcrc

    fast = _fastcrc.checked(pywrap_tensorflow.masked_crc32c)
    if fast is not None:
        pywrap_tensorflow.masked_crc32c = fast


def pytest_collection_finish(session: pytest.Session) -> None:
    """Collecting imports every test module and what it imports (torch, Lightning, transformers, pandas): a heap
    that lives to the end, and that every full pass of the garbage collector walks (with those libraries
    imported, 450,000 objects: the 10-layer MLP's 3,000 logging steps made 7 full passes, 1.1 s). Frozen, the
    passes skip it; objects the tests make are collected as usual. The 10,000-step test: 68 s alone, 93 s after
    collecting the whole suite, 87 s with the heap frozen."""
    gc.collect()
    gc.freeze()
