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
    # A checkout that was never installed: drop the editable install's finder so only the source tree is seen,
    # and check that gradwatch's own fallback (not setuptools) bound the top-level integrations/ folder.
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
        "sys.path_hooks[:] = [h for h in sys.path_hooks if 'editable' not in getattr(h, '__module__', '')]\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import gradwatch\n"
        "import gradwatch.integrations as m\n"
        "assert 'editable' not in type(m.__spec__.loader).__module__\n"
        "print(m.__file__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # gradwatch/ holds no integrations package, so only the fallback can have found the top-level folder
    assert not os.path.exists(os.path.join(ROOT, "gradwatch", "integrations"))
    assert os.path.samefile(done.stdout.strip(), os.path.join(ROOT, "integrations", "__init__.py"))


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
