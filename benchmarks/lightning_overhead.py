"""GradWatchCallback's cost inside a real Lightning Trainer with a TensorBoardLogger (run by hand).

Lightning's own logging is the baseline: every fit logs its loss with ``self.log`` to the same kind of
TensorBoardLogger. Fits alternate in rounds (bare, callback at every=50, callback at every=1, bare again as
the noise control), ``--steps`` optimizer steps each; a callback times each batch (``on_train_batch_start``
to ``on_train_batch_end``, which includes the optimizer step and gradwatch's hooks). Reports the median batch
time per config over all rounds and the median per-round ratio to bare.

    .venv/bin/python benchmarks/lightning_overhead.py --model resnet56 --steps 20 --rounds 3
    .venv/bin/python benchmarks/lightning_overhead.py --model stack --steps 40 --rounds 3
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
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._t)


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


def fit(name: str, tensors: int, steps: int, callback) -> list[float]:
    torch.manual_seed(0)
    model, batch = build(name, tensors)
    x, y = batch(32)
    timer = Timer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, log_every_n_steps=1,
                         logger=pl.loggers.TensorBoardLogger(tempfile.mkdtemp()), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer] + ([callback] if callback else []))
    trainer.fit(Lit(model, x, y))
    return timer.times[3:]  # after warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--tensors", type=int, default=1202)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    configs = {"bare": None, "every=50": lambda: GradWatchCallback(every=50),
               "every=1": lambda: GradWatchCallback(every=1), "bare #2": None}
    per: dict[str, list[float]] = {k: [] for k in configs}
    rounds: list[dict[str, float]] = []
    for _ in range(args.rounds):
        med = {}
        for label, make in configs.items():
            ts = fit(args.model, args.tensors, args.steps, make() if make else None)
            per[label].extend(ts)
            med[label] = statistics.median(ts)
        rounds.append(med)
    print(f"Lightning {pl.__version__}, {args.model}, {args.rounds} rounds x {args.steps} steps, TensorBoardLogger, "
          f"self.log('loss') every step, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'config':<10} {'median ms':>10} {'ratio':>8}")
    for label in configs:
        ratio = statistics.median(r[label] / r["bare"] for r in rounds)
        print(f"{label:<10} {1e3 * statistics.median(per[label]):10.2f} {ratio:8.4f}")


if __name__ == "__main__":
    main()
