"""GradWatchCallback's cost inside a real Lightning Trainer with a TensorBoardLogger (run by hand).

Lightning's own logging is the baseline: every fit logs its loss with ``self.log`` to the same kind of
TensorBoardLogger. Short fits alternate in rounds (bare, callback at every=50, callback at every=1, bare again
as the noise control), the order rotating every round; a callback times each iteration from one batch start to
the next (the batch, the optimizer step, gradwatch's hooks, Lightning's logging, the data loader), dropping the
first ``--warmup``. Reports the median iteration per config over all rounds and the median per-round ratio to
bare. This machine's speed drifts over minutes, so many short rounds beat a few long ones (with 3 rounds of 20
steps the noise control read 1.07-1.42). Fits cannot interleave step by step in one process: run in threads,
four Trainers slowed each other 2.5-3x (a lone bare fit of the stack: 86 ms per iteration; four in threads:
211 ms), which would understate the ratio.

    .venv/bin/python benchmarks/lightning_overhead.py --model resnet56 --steps 12 --rounds 8
    .venv/bin/python benchmarks/lightning_overhead.py --model stack --steps 20 --rounds 8
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from _bench import build

from gradwatch.integrations.lightning import GradWatchCallback

import lightning.pytorch as pl  # noqa: E402  (after gradwatch: the adapter says what to install if missing)


class Timer(pl.Callback):
    """Iteration times: from one batch start to the next (the last one ends at the end of training)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t: float | None = None

    def on_train_batch_start(self, *args) -> None:
        now = time.perf_counter()
        if self._t is not None:
            self.times.append(now - self._t)
        self._t = now


class Lit(pl.LightningModule):
    def __init__(self, model, x, y) -> None:
        super().__init__()
        self.model, self.x, self.y = model, x, y

    def training_step(self, batch, i):
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(10_000), batch_size=1)


def fit(name: str, tensors: int, steps: int, warmup: int, callback) -> list[float]:
    torch.manual_seed(0)
    model, batch = build(name, tensors)
    x, y = batch(32)
    timer = Timer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps + warmup + 1, log_every_n_steps=1,
                         logger=pl.loggers.TensorBoardLogger(tempfile.mkdtemp()), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer] + ([callback] if callback else []))
    trainer.fit(Lit(model, x, y))
    return timer.times[warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--tensors", type=int, default=1202)
    parser.add_argument("--steps", type=int, default=12, help="timed iterations per fit")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="first iterations of each fit not timed")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    configs = {"bare": None, "every=50": lambda: GradWatchCallback(every=50),
               "every=1": lambda: GradWatchCallback(every=1), "bare #2": None}
    per: dict[str, list[float]] = {k: [] for k in configs}
    rounds: list[dict[str, float]] = []
    labels = list(configs)
    for r in range(args.rounds):
        med = {}
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            make = configs[label]
            ts = fit(args.model, args.tensors, args.steps, args.warmup, make() if make else None)
            per[label].extend(ts)
            med[label] = statistics.median(ts)
        rounds.append(med)
    print(f"Lightning {pl.__version__}, {args.model}, {args.rounds} rounds x {args.steps} timed steps, "
          f"TensorBoardLogger, self.log('loss') every step, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads (every=50 logs step 0 only, in the warm-up: it times non-logging steps)")
    print(f"{'config':<10} {'median ms':>10} {'ratio':>8}")
    for label in configs:
        ratio = statistics.median(r[label] / r["bare"] for r in rounds)
        print(f"{label:<10} {1e3 * statistics.median(per[label]):10.2f} {ratio:8.4f}")


if __name__ == "__main__":
    main()
