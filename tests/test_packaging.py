"""gradwatch.integrations is importable from the editable install, a bare checkout and a built wheel."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_integrations_import_from_the_install():
    import gradwatch.integrations as integrations

    assert os.path.samefile(os.path.dirname(integrations.__file__), os.path.join(ROOT, "integrations"))


def test_integrations_import_from_a_bare_checkout(tmp_path):
    # no install: only the source tree on sys.path (python -I ignores site-packages' editable finder)
    code = "import sys; sys.path.insert(0, %r); import gradwatch.integrations as m; print(m.__file__)" % ROOT
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "integrations" in done.stdout


@pytest.mark.slow
def test_integrations_import_from_a_built_wheel(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), ROOT],
        check=True, capture_output=True,
    )
    wheel = glob.glob(str(tmp_path / "gradwatch-*.whl"))[0]
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), wheel],
        check=True, capture_output=True,
    )
    code = "import gradwatch, gradwatch.integrations as m; print(gradwatch.__file__); print(m.__file__)"
    env = dict(os.environ, PYTHONPATH=str(target))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert all(line.startswith(str(target)) for line in done.stdout.split())
