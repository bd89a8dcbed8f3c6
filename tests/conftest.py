"""Fixtures shared by every test folder; plain helpers live in ``tests/helpers`` (``from helpers import ...``)."""

from __future__ import annotations

import pytest
from helpers import read_events


@pytest.fixture
def events():
    return read_events
