"""Issue 25 (3): record healthy runs of stock models where the spike, the early-layer ratio and skip_collapse
used to raise false alarms, and replay the alert rules over them.

    PYTHONPATH=$PWD /work/zoovenv/bin/python benchmarks/calibrate_false_alarms.py record MODEL [...] --out DIR
    PYTHONPATH=$PWD /work/zoovenv/bin/python benchmarks/calibrate_false_alarms.py replay DIR

``record`` trains one model from its library constructor (no weights) on a small *fixed* set of generated
images (``--n`` images, batch ``--batch``, reshuffled each epoch) so that a long enough run fits it to
near-zero loss, under a monitor with no rules (``rules=False``) logging every ``--every`` steps; it saves the
history (``DIR/<tag>.csv.gz``) and the layer kinds, block skip kinds and losses (``DIR/<tag>.json``).
``replay`` runs the default rules over every saved history and prints, per run, each warning or critical
finding and the largest spike factor / early ratio / lowest skip share the rules judged.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

import gradwatch
from gradwatch.measure.layers import layer_kinds
from gradwatch.reference.data import synthetic_images


def build(spec: str, size: int) -> torch.nn.Module:
    """``tv:NAME`` (torchvision), ``timm:NAME[:k=v,...]`` (timm, values parsed as Python literals)."""
    lib, name, *rest = spec.split(":")
    kw: dict[str, Any] = {}
    for item in ",".join(rest).split(",") if rest else []:
        k, v = item.split("=")
        kw[k] = eval(v)  # noqa: S307 - a calibration script's own command line
    if lib == "tv":
        import torchvision.models as tvm
        return getattr(tvm, name)(weights=None, num_classes=10, **kw)
    import timm
    return timm.create_model(name, pretrained=False, num_classes=10, **kw)


def record(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    for spec in args.models:
        tag = spec.replace(":", "_").replace("=", "").replace(",", "_").replace("(", "").replace(")", "")
        tag = f"{tag}_{args.size}px_b{args.batch}_n{args.n}_s{args.seed}"
        torch.manual_seed(args.seed)
        model = build(spec, args.size)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = (torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.wd) if args.opt == "sgd"
               else torch.optim.AdamW(params, lr=args.lr, weight_decay=args.wd))
        x, y = synthetic_images(args.n, num_classes=10, size=args.size, seed=args.seed)
        mon = gradwatch.Monitor(model, optimizer=opt, every=args.every, rules=False)
        gen = torch.Generator().manual_seed(args.seed)
        losses, order, start = [], torch.empty(0, dtype=torch.long), time.perf_counter()
        for step in range(args.steps):
            if len(order) < args.batch:
                order = torch.randperm(args.n, generator=gen)
            idx, order = order[: args.batch], order[args.batch:]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        mon.close()
        mon.save_history(os.path.join(args.out, f"{tag}.csv.gz"))
        skip = {b["name"]: b.get("skip") for b in _describe(mon)}
        meta = {"spec": spec, "size": args.size, "batch": args.batch, "n": args.n, "steps": args.steps,
                "every": args.every, "opt": args.opt, "lr": args.lr, "seed": args.seed, "losses": losses,
                "kinds": layer_kinds(model), "skip": skip, "seconds": time.perf_counter() - start}
        with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
            json.dump(meta, f)
        print(f"{tag}: loss {sum(losses[:10]) / 10:.3g} -> {sum(losses[-20:]) / 20:.3g}, "
              f"{len(skip)} blocks, {meta['seconds']:.0f}s", flush=True)


def _describe(mon: gradwatch.Monitor) -> list[dict[str, Any]]:
    out = []
    for row in mon.describe():
        d = row if isinstance(row, dict) else getattr(row, "__dict__", {"name": str(row)})
        out.append({"name": d.get("name"), "skip": f"{d.get('kind')}:{d.get('skip')}"})
    return out


def replay_dir(args: argparse.Namespace) -> None:
    import pandas as pd

    from gradwatch.alerts import replay
    for meta_path in sorted(glob.glob(os.path.join(args.dir, "*.json"))):
        meta = json.load(open(meta_path))
        hist = pd.read_csv(meta_path[:-5] + ".csv.gz")
        alerts = [a for a in replay(hist, None, meta["kinds"]) if a.severity != "info"]
        first = {}
        for a in alerts:
            first.setdefault((a.rule, a.name), a)
        loss = meta["losses"]
        print(f"{os.path.basename(meta_path)[:-5]}: loss {sum(loss[-20:]) / 20:.3g}; "
              + ("; ".join(f"{a.rule}@{a.step} {a.name or ''} {a.value:.3g} [{a.severity}]" for a in first.values())
                 or "quiet"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("models", nargs="+")
    r.add_argument("--out", required=True)
    r.add_argument("--size", type=int, default=32)
    r.add_argument("--n", type=int, default=32)
    r.add_argument("--batch", type=int, default=4)
    r.add_argument("--steps", type=int, default=400)
    r.add_argument("--every", type=int, default=1)
    r.add_argument("--opt", choices=("sgd", "adamw"), default="sgd")
    r.add_argument("--lr", type=float, default=0.01)
    r.add_argument("--wd", type=float, default=1e-4)
    r.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("replay")
    q.add_argument("dir")
    args = p.parse_args(argv)
    if args.cmd == "record":
        os.makedirs(args.out, exist_ok=True)
        record(args)
    else:
        replay_dir(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
