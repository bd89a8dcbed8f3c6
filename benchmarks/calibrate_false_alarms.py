"""Issue 25 (3): record healthy runs of stock models where the spike, the early-layer ratio and skip_collapse
used to raise false alarms, and replay the alert rules over them.

    PYTHONPATH=$PWD /work/zoovenv/bin/python benchmarks/calibrate_false_alarms.py record MODEL [...] --out DIR
    PYTHONPATH=$PWD /work/zoovenv/bin/python benchmarks/calibrate_false_alarms.py replay DIR

``record`` trains one model from its library constructor (no weights) on a small *fixed* set of generated
images (``--n`` images, batch ``--batch``, reshuffled each epoch) so that a long enough run fits it to
near-zero loss, under a monitor with no rules (``rules=False``) logging every ``--every`` steps; it saves the
history (``DIR/<tag>.csv.gz``) and the layer kinds, block skip kinds and losses (``DIR/<tag>.json``).
``replay`` runs the default rules over every saved history and prints, per run, each warning or critical
finding (first of each kind, and how many). ``sensitivity`` plants explosions (a sustained jump to 30x/100x
the recent upper range, steady ramps of 1.3-2x per logging step) into a calm synthetic series and into a
recorded run's norms, and prints how many logging steps after the start the spike reference of
:class:`~gradwatch.alerts.Exploding` warns, next to the geometric running mean it replaced.

    PYTHONPATH=$PWD python benchmarks/calibrate_false_alarms.py sensitivity DIR/<tag>   # a recorded run
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


def _running_mean_factors(norms: Any, weight: float = 0.1, warmup: int = 5, cap: float = 10.0) -> Any:
    """The reference before issue 25: a geometric moving average of the norms (a spike moves it by <= log(cap))."""
    import numpy as np
    out, base = [], None
    for i, g in enumerate(norms):
        out.append(math.exp(math.log(g) - base) if base is not None and i >= warmup else math.nan)
        x = math.log(g) if base is None else min(math.log(g), base + math.log(cap))
        base = x if base is None else (1 - weight) * base + weight * x
    return np.array(out)


def sensitivity(args: argparse.Namespace) -> None:
    import numpy as np
    import pandas as pd

    from gradwatch.alerts._spike import spike_factors
    hist = pd.read_csv(args.run + ".csv.gz")
    rec = hist[(hist.name == "_global") & (hist.metric == "grad_norm")].sort_values("step").value.to_numpy()
    calm = np.exp(np.random.default_rng(0).normal(0, 0.2, 300))

    def told(f: Any, at: int) -> str:  # the rule's verdict: critical at once, warning after 3 steps past 10x
        run = 0
        for i in range(at, len(f)):
            if f[i] > 1e3:
                return f"critical +{i - at}"
            run = run + 1 if f[i] > 10 else 0
            if run >= 3:
                return f"warning +{i - at}"
        return "none in 30"

    for label, base, at in (("calm", calm, 150), ("recorded", rec, len(rec) - 150)):
        upper = float(np.quantile(base[at - 64:at], 0.9))
        for what in ("jump 30x", "jump 100x", "ramp 1.3x", "ramp 1.5x", "ramp 2x"):
            g, k = base.copy(), float(what.split()[1][:-1])
            g[at:at + 30] = upper * k if what.startswith("jump") else g[at:at + 30] * k ** np.arange(1, 31)
            print(f"{label:8s} {what:9s}  recent upper range: {told(spike_factors(g, 10.0), at):12s} "
                  f"running mean: {told(_running_mean_factors(g), at)}")


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
    v = sub.add_parser("sensitivity")
    v.add_argument("run", help="a recorded run: DIR/<tag> (without .csv.gz)")
    args = p.parse_args(argv)
    if args.cmd == "record":
        os.makedirs(args.out, exist_ok=True)
        record(args)
    elif args.cmd == "replay":
        replay_dir(args)
    else:
        sensitivity(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
