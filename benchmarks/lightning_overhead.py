"""GradWatchCallback's cost inside a real Lightning Trainer with a TensorBoardLogger (run by hand).

Lightning's own logging is the baseline: every fit logs its loss with ``self.log`` to the same kind of
TensorBoardLogger. Four real ``Trainer.fit`` runs (bare, the callback at every=50 and at every=1, bare again as
the noise control) run at once in one process, each in a thread of its own, and take turns step by step: a
callback hands the turn on at the start of each batch, so one fit runs at a time and its timed iteration is
everything from one batch start to the next (the batch, the optimizer step, gradwatch's hooks, Lightning's
logging, the data loader). The order rotates every round, as in ``overhead.py``. Reports the median iteration
per config and the median per-round ratio to bare.

Sequential fits (an earlier version of this script) put minutes between the configs, and this machine's speed
drifts over minutes: the noise control read 1.07-1.42. Interleaved steps share the drift.

    .venv/bin/python benchmarks/lightning_overhead.py --model resnet56 --steps 60
    .venv/bin/python benchmarks/lightning_overhead.py --model stack --steps 100
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import threading
import time
import warnings

import torch
import torch.nn.functional as F
from _bench import build

from gradwatch.integrations.lightning import GradWatchCallback

import lightning.pytorch as pl  # noqa: E402  (after gradwatch: the adapter says what to install if missing)


class Turns:
    """Round-robin turns between threads (one fit each), the order rotating every round."""

    def __init__(self, labels: list[str]) -> None:
        self.labels, self.active = list(labels), set(labels)
        self.cv = threading.Condition()
        self.round, self.pos = 0, 0

    def _order(self) -> list[str]:
        k = self.round % len(self.labels)
        return [x for x in self.labels[k:] + self.labels[:k] if x in self.active]

    def _current(self) -> str | None:
        order = self._order()
        return order[self.pos] if self.pos < len(order) else None

    def wait(self, label: str) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self._current() == label)

    def done(self, label: str, finished: bool = False) -> None:
        with self.cv:
            if finished:
                self.active.discard(label)
            else:
                self.pos += 1
            if self.pos >= len(self._order()):
                self.round, self.pos = self.round + 1, 0
            self.cv.notify_all()


class Timer(pl.Callback):
    """Times each iteration (batch start to the next batch start) while holding the turn."""

    def __init__(self, label: str, turns: Turns) -> None:
        self.label, self.turns = label, turns
        self.times: list[float] = []
        self._t: float | None = None

    def on_train_batch_start(self, *args) -> None:
        if self._t is not None:
            self.times.append(time.perf_counter() - self._t)
            self.turns.done(self.label)
        self.turns.wait(self.label)
        self._t = time.perf_counter()

    def on_train_end(self, *args) -> None:
        if self._t is not None:
            self.times.append(time.perf_counter() - self._t)
        self.turns.done(self.label, finished=True)


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


def fit(name: str, tensors: int, steps: int, callback, timer: Timer, errors: list) -> None:
    try:
        torch.manual_seed(0)
        model, batch = build(name, tensors)
        x, y = batch(32)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, log_every_n_steps=1,
                             logger=pl.loggers.TensorBoardLogger(tempfile.mkdtemp()), enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[timer] + ([callback] if callback else []))
        trainer.fit(Lit(model, x, y))
    except BaseException as err:  # a failed fit must not leave the others waiting for its turn
        errors.append(err)
        timer.turns.done(timer.label, finished=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--tensors", type=int, default=1202)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5, help="first iterations of each fit not timed")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    configs = {"bare": None, "every=50": lambda: GradWatchCallback(every=50),
               "every=1": lambda: GradWatchCallback(every=1), "bare #2": None}
    turns = Turns(list(configs))
    timers = {label: Timer(label, turns) for label in configs}
    errors: list[BaseException] = []
    threads = [threading.Thread(target=fit, args=(args.model, args.tensors, args.steps + args.warmup,
                                                  make() if make else None, timers[label], errors))
               for label, make in configs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    times = {label: timer.times[args.warmup:] for label, timer in timers.items()}
    n = min(len(v) for v in times.values())
    print(f"Lightning {pl.__version__}, {args.model}, {n} interleaved steps per config (after {args.warmup} warm-up), "
          f"TensorBoardLogger, self.log('loss') every step, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'config':<10} {'median ms':>10} {'ratio':>8}")
    for label in configs:
        ratio = statistics.median(t / b for t, b in zip(times[label][:n], times["bare"][:n]))
        print(f"{label:<10} {1e3 * statistics.median(times[label]):10.2f} {ratio:8.4f}")


if __name__ == "__main__":
    main()
