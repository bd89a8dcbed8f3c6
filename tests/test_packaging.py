"""gradwatch.integrations is importable from the editable install, a bare checkout and a built wheel; the wheel
ships every module of the tree and no tests or benchmarks (``make wheel-check`` installs it into a fresh venv)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

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


def _source_files() -> set[str]:
    """The modules and data files the source tree holds, named as a wheel names them (integrations/ is
    installed as gradwatch/integrations/)."""
    found = set()
    for top, installed in (("gradwatch", "gradwatch"), ("integrations", "gradwatch/integrations")):
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            rel = os.path.relpath(folder, os.path.join(ROOT, top)).replace(os.sep, "/")
            prefix = installed if rel == "." else f"{installed}/{rel}"
            found.update(f"{prefix}/{f}" for f in files if f.endswith(".py") or f == "py.typed")
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    """A wheel built from a copy of the checkout: building in place would leave a build/ folder whose stale
    copies of deleted modules setuptools puts in the next wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "runs", "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(src)],
        check=True, capture_output=True,
    )
    return glob.glob(str(tmp / "gradwatch-*.whl"))[0]


@pytest.mark.slow
def test_the_wheel_ships_the_package_and_nothing_else(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert not [n for n in names if n.split("/")[0] in ("tests", "benchmarks", "integrations")]
    assert "gradwatch/py.typed" in names
    shipped = {n for n in names if n.startswith("gradwatch/")}
    # every module of every subpackage, so a subpackage left out of pyproject's package list fails here, and
    # nothing that is not in the tree (a stale copy of a deleted module)
    assert shipped == _source_files()
    assert {"gradwatch/sinks/tensorboard/__init__.py", "gradwatch/integrations/lightning.py"} <= shipped


@pytest.mark.slow
def test_integrations_import_from_a_built_wheel(wheel, tmp_path):
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
