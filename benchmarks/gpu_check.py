"""The GPU check: host syncs and step-time ratios on a real accelerator, as one prepared script.

Run it whenever a GPU machine is available (it needs nothing beyond torch, tensorboard and this checkout):

    python benchmarks/gpu_check.py --out gpu_check.json          # ~3-5 minutes on one GPU

1. **Syncs.** With ``torch.cuda.set_sync_debug_mode``: a non-logging step of a monitored model must not
   synchronise with the host at all (mode ``"error"``: any sync raises), and a logging step at most once (mode
   ``"warn"``: syncs are counted from the warnings; the one allowed is the step's single device-to-host
   transfer).
2. **Step ratios**, steps interleaved with a bare twin (and a second bare twin as the noise control), every
   monitor writing TensorBoard events as users do: a ResNet-50 (torchvision's layout, written out here, batch
   64 at 224x224, AMP bf16) and a GPT-2-small-sized transformer (12 layers, 768 wide, 12 heads, sequence 512,
   batch 8, bf16), at ``every`` 1 and 50, with the defaults (parameter metrics, block flow, rules).

Prints a table and writes the figures, the card, the torch version and the date to ``--out``. ``--tiny``
runs small models on any device (to check the script itself on a CPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


def resnet50(layers=(3, 4, 6, 3), base: int = 64, classes: int = 1000) -> nn.Module:
    mods: list[nn.Module] = [nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base), nn.ReLU(),
                             nn.MaxPool2d(3, 2, 1)]
    cin = base
    for i, n in enumerate(layers):
        for j in range(n):
            mods.append(Bottleneck(cin, base * 2 ** i, 2 if (j == 0 and i > 0) else 1))
            cin = base * 2 ** i * 4
    mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*mods)


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 50257, d: int = 768, layers: int = 12, heads: int = 12, seq: int = 512) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        t = idx.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=idx.device), 1)
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for b in self.blocks:
            x = b(x, mask)
        return self.head(self.ln(x))


def models(tiny: bool, device: str):
    if tiny:
        yield "resnet50-tiny", lambda: resnet50((1, 1, 1, 1), base=8, classes=10), \
            lambda: (torch.randn(4, 3, 64, 64, device=device), torch.randint(0, 10, (4,), device=device))
        yield "gpt2-tiny", lambda: GPT(vocab=128, d=64, layers=2, heads=2, seq=32), \
            lambda: (torch.randint(0, 128, (2, 32), device=device), torch.randint(0, 128, (2, 32), device=device))
        return
    yield "resnet50", resnet50, \
        lambda: (torch.randn(64, 3, 224, 224, device=device), torch.randint(0, 1000, (64,), device=device))
    yield "gpt2-small", GPT, \
        lambda: (torch.randint(0, 50257, (8, 512), device=device), torch.randint(0, 50257, (8, 512), device=device))


def loss_of(model, x, y):
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))


def step(model, opt, x, y, amp: bool, device: str):
    with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
        loss = loss_of(model, x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync_check(build, batch, device: str, amp: bool) -> dict:
    """Syncs of a non-logging step (must be 0) and of a logging step (at most 1), every=2."""
    torch.manual_seed(0)
    model = build().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
    x, y = batch()
    mon = gradwatch.Monitor(model, optimizer=opt, every=2, log_dir=tempfile.mkdtemp())
    for _ in range(4):  # warm up: discovery, first-step work
        step(model, opt, x, y, amp, device)
    out = {}
    torch.cuda.synchronize()
    assert mon.global_step % 2 == 0
    # logging step: count syncs (warn mode)
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(model, opt, x, y, amp, device)
    torch.cuda.set_sync_debug_mode(0)
    out["logging_step_syncs"] = sum("synchroniz" in str(w.message).lower() for w in caught)
    # non-logging step: any sync raises
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(model, opt, x, y, amp, device)
        out["non_logging_step_syncs"] = 0
    except RuntimeError as err:
        out["non_logging_step_syncs"] = f"sync: {err}"[:300]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    mon.close()
    return out


def ratios(build, batch, device: str, amp: bool, steps: int) -> dict:
    runs = {}
    for label, opts in (("bare", None), ("bare #2", None), ("every=50", {"every": 50}), ("every=1", {"every": 1})):
        torch.manual_seed(0)
        model = build().to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
        mon = gradwatch.Monitor(model, optimizer=opt, log_dir=tempfile.mkdtemp(), **opts) if opts else None
        runs[label] = (model, opt, mon)
    x, y = batch()
    times = {k: [] for k in runs}
    labels = list(runs)
    for i in range(steps + 5):
        k = i % len(labels)
        for label in labels[k:] + labels[:k]:
            model, opt, _ = runs[label]
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(model, opt, x, y, amp, device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= 5:
                times[label].append(time.perf_counter() - t)
    for _, _, mon in runs.values():
        if mon is not None:
            mon.close()
    base = times["bare"]
    return {label: {"median_ms": 1e3 * statistics.median(ts),
                    "ratio": statistics.median(t / b for t, b in zip(ts, base))} for label, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--tiny", action="store_true", help="small models (check the script on a CPU)")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if cuda else args.device, "python": sys.version.split()[0],
              "gradwatch": gradwatch.__version__, "results": {}}
    for name, build, batch in models(args.tiny, args.device):
        res = {}
        if cuda:
            res["syncs"] = sync_check(build, batch, args.device, amp=True)
        res["steps"] = ratios(build, batch, args.device, amp=cuda, steps=args.steps)
        report["results"][name] = res
        print(name, json.dumps(res, indent=1))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
