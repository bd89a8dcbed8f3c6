"""The release check (``make wheel-check``): the built wheel installs and runs from a clean environment.

Given the sdist and wheel that ``python -m build`` wrote into ``--dist``, this checks the wheel's file list,
creates a fresh venv (not the editable ``.venv``), installs the wheel into it, and from a folder outside the
checkout (so that the source tree cannot stand in for the install): imports gradwatch, runs the README's
raw-PyTorch quickstart for 20 steps, runs ``gradwatch --help``; then installs the ``[lightning]`` and
``[transformers]`` extras and imports the three adapters. Exits non-zero with the reason on the first failure.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# An unpinned torch from plain PyPI is a multi-GB CUDA build: install the CPU build first, as the Makefile does.
TORCH = "torch==2.13.0"

# What the quickstart takes as given, then the README's own block, then what it must have produced.
SMOKE = '''
import os, sys, warnings, torch, torch.nn.functional as F
import gradwatch

warnings.filterwarnings("error", message="gradwatch")  # the quickstart as written must not draw a warning from us
from gradwatch.reference.blocks import resnet

assert os.path.realpath(gradwatch.__file__).startswith(os.path.realpath(sys.prefix)), gradwatch.__file__
torch.manual_seed(0)
model = resnet(8, width=4)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
loader = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))) for _ in range(20)]
loss_fn = F.cross_entropy
steps = 0
def count(*_):
    global steps
    steps += 1
optimizer.register_step_post_hook(count)

exec(compile(README_BLOCK, "README.md raw-PyTorch quickstart", "exec"))

assert steps == 20, steps
assert os.listdir("runs/exp"), "no event file in runs/exp"
assert list(df.columns) == ["step", "name", "metric", "value"] and len(df), df
print(f"gradwatch {gradwatch.__version__} from {os.path.dirname(gradwatch.__file__)}: "
      f"{steps} steps, {len(df)} history rows")
'''

ADAPTERS = "import gradwatch.integrations.lightning, gradwatch.integrations.transformers, gradwatch.integrations.accelerate"


def readme_quickstart() -> str:
    """The README's raw-PyTorch quickstart: its first python block that calls ``mon.step()``."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    for block in blocks:
        if "Monitor(" in block and "mon.step()" in block:
            return block
    raise SystemExit("wheel-check: README.md has no python block with Monitor(...) and mon.step()")


def wheel_problems(wheel: str) -> list[str]:
    """What is wrong with the wheel's file list: tests or benchmarks shipped, py.typed or a package missing."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    problems = [f"ships {n}" for n in sorted(names) if n.split("/")[0] in ("tests", "benchmarks")
                or "/tests/" in n or "/benchmarks/" in n]
    expected = {"gradwatch/py.typed", "gradwatch/integrations/__init__.py"}
    # every package in the source tree: a folder with an __init__.py (integrations/ installs as gradwatch.integrations)
    for top, installed in (("gradwatch", "gradwatch"), ("integrations", "gradwatch/integrations")):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files:
                rel = os.path.relpath(folder, os.path.join(ROOT, top)).replace(os.sep, "/")
                expected.add(f"{installed}/{'' if rel == '.' else rel + '/'}__init__.py")
    problems += [f"lacks {n}" for n in sorted(expected - names)]
    return problems


START = time.perf_counter()


def say(text: str) -> None:
    print(f"wheel-check [{time.perf_counter() - START:4.0f} s] {text}", flush=True)


def run(cmd: list[str], label: str = "", **kwargs) -> None:
    say(label or " ".join(cmd))
    subprocess.run(cmd, check=True, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", default=os.path.join(ROOT, "dist"), help="where python -m build wrote")
    parser.add_argument("--venv", default=os.path.join(ROOT, ".venv-wheel"), help="the fresh venv (replaced)")
    args = parser.parse_args(argv)
    venv = os.path.abspath(args.venv)  # the checks run from another folder

    wheels = glob.glob(os.path.join(args.dist, "gradwatch-*.whl"))
    sdists = glob.glob(os.path.join(args.dist, "gradwatch-*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        raise SystemExit(f"wheel-check: expected one wheel and one sdist in {args.dist}, found {wheels + sdists}")
    wheel = os.path.abspath(wheels[0])
    problems = wheel_problems(wheel)
    if problems:
        raise SystemExit(f"wheel-check: {os.path.basename(wheel)}: " + "; ".join(problems))
    say(f"{os.path.basename(wheel)}: file list ok")

    shutil.rmtree(venv, ignore_errors=True)
    run([sys.executable, "-m", "venv", venv])
    py = os.path.join(venv, "bin", "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    run(pip + [TORCH])
    run(pip + [wheel])
    # outside the checkout, so that `import gradwatch` can only find the installed wheel
    with tempfile.TemporaryDirectory() as cwd:
        env = dict(os.environ, README_BLOCK=readme_quickstart())
        env.pop("PYTHONPATH", None)
        run([py, "-c", "import os; README_BLOCK = os.environ['README_BLOCK']\n" + SMOKE],
            "the README's raw-PyTorch quickstart, 20 steps", cwd=cwd, env=env)
        say("gradwatch --help")
        usage = subprocess.run([os.path.join(venv, "bin", "gradwatch"), "--help"], cwd=cwd, env=env,
                               capture_output=True, text=True, check=True).stdout
        if not all(cmd in usage for cmd in ("demo", "inspect", "report", "validate")):
            raise SystemExit(f"wheel-check: gradwatch --help lacks a command:\n{usage}")
        run(pip + [f"{wheel}[lightning,transformers]"])
        run([py, "-c", ADAPTERS], cwd=cwd, env=env)
        run([py, "-m", "pip", "check", "--disable-pip-version-check"], cwd=cwd, env=env)
    say("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
