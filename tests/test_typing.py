"""gradwatch ships ``py.typed``, so its annotations are part of the API: mypy, configured by ``[tool.mypy]`` in
pyproject.toml, must pass on the whole package."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_mypy_passes_on_the_package():
    pytest.importorskip("mypy")  # in the dev extra; a bare install cannot run this check
    # no arguments: the files, the Python version and the strictness all come from pyproject.toml
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    assert "Success: no issues found" in done.stdout
