"""Before/after in ONE interleaved run: this checkout's gradwatch against an older one (run by hand).

Copy the older package under another name, then time both side by side (plus two bare nets, the second the
noise control), every monitor writing TensorBoard as users do:

    git worktree add /tmp/base <commit> && mkdir -p /tmp/basepkg && cp -r /tmp/base/gradwatch /tmp/basepkg/gradwatch_base
    PYTHONPATH=/tmp/basepkg .venv/bin/python benchmarks/ab.py --model resnet56 --steps 60

The C CRC-32C (``gradwatch/sinks/tensorboard/_fastcrc.py``) is process-wide once installed, so it would speed
up the older version too: ``GRADWATCH_FAST_CRC=0`` compares the rest of the changes; the CRC's own share shows in
a run without that variable (``overhead.py``).
"""

from __future__ import annotations

import argparse
import importlib
import tempfile

import torch
from _bench import build, floor, interleave, table, train_step

import gradwatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--tensors", type=int, default=1202)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--base", default="gradwatch_base", help="the older package's import name")
    args = parser.parse_args()
    base = importlib.import_module(args.base)
    versions = {"before": base, "after": gradwatch}
    configs = {"bare": None, "bare #2": None}
    for tag in versions:
        configs[f"{tag} defaults/1"] = (tag, {"every": 1})
        configs[f"{tag} params/1"] = (tag, {"every": 1, "blocks": None, "rules": False})
    runs, mons = {}, []
    x = y = None
    for label, spec in configs.items():
        torch.manual_seed(0)
        model, batch = build(args.model, args.tensors)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if x is None:
            x, y = batch(args.batch)
        if spec:
            tag, options = spec
            mons.append(versions[tag].Monitor(model, optimizer=opt, log_dir=tempfile.mkdtemp(), **options))
        runs[label] = (lambda m=model, o=opt: train_step(m, o, x, y))
    floor_s = floor(build(args.model, args.tensors)[0], x, y)
    times = interleave(runs, args.steps)
    print(f"{args.model}, batch {args.batch}, {args.steps} interleaved steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, floor {1e3 * floor_s:.2f} ms; before = {base.__file__}")
    for line in table(times, "bare", {k: 1 for k, v in configs.items() if v}, floor_s, offset=5):
        print(line)
    for mon in mons:
        mon.close()


if __name__ == "__main__":
    main()
