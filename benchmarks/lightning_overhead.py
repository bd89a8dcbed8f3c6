"""GradWatchCallback's cost inside a real Lightning Trainer with a TensorBoardLogger (run by hand).

Lightning's own logging is the baseline: every fit logs its loss with ``self.log`` to the same kind of
TensorBoardLogger. Four real ``Trainer.fit`` runs (bare, the callback at every=50 and at every=1, bare again as
the noise control) run at once, each in a process of its own, and take turns step by step: a callback hands the
turn back at the start of each batch, so one fit runs at a time and its timed iteration is everything from one
batch start to the next (the batch, the optimizer step, gradwatch's hooks, Lightning's logging, the data
loader). The order rotates every round, as in ``overhead.py``. Reports the median iteration per config, the
median per-round ratio to bare, and what a logging step adds at every=1.

Why processes: sequential fits put minutes between the configs and this machine's speed drifts over minutes
(noise controls 0.95-1.42), and fits in threads of one process slowed each other 3x: every thread gets its own
OpenMP team, and with more OpenMP threads than cores libgomp stops spinning between parallel regions (a bare
1,202-tensor stack fit: 96 ms per iteration alone, 300-360 ms in threads, 350 ms alone with
OMP_WAIT_POLICY=PASSIVE). A process per fit keeps the runtime each fit would have alone. Background threads (the
loggers' writers, gradwatch's pictures) keep running while their fit waits for its turn, as in ``overhead.py``.

    .venv/bin/python benchmarks/lightning_overhead.py --model resnet56 --steps 100
    .venv/bin/python benchmarks/lightning_overhead.py --model stack --steps 150
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import statistics
import tempfile
import time
import warnings

CONFIGS = {"bare": None, "every=50": {"every": 50}, "every=1": {"every": 1},
           "every=1 no pictures": {"every": 1, "pictures": 0}, "bare #2": None}


def _fit(label: str, options: dict | None, name: str, tensors: int, steps: int, conn) -> None:
    """One fit in its own process: waits for the turn at each batch start, reports each iteration's time."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    import torch
    import torch.nn.functional as F
    from _bench import build

    from gradwatch.integrations.lightning import GradWatchCallback

    import lightning.pytorch as pl  # after gradwatch: the adapter says what to install if missing

    class Turn(pl.Callback):
        def __init__(self) -> None:
            self.t: float | None = None

            self.marks: list[float] = []

        def _lap(self) -> tuple[float, list[float]]:
            now = time.perf_counter()
            return now - self.t, [b - a for a, b in zip([self.t] + self.marks, self.marks + [now])]

        def on_train_batch_start(self, *args) -> None:
            conn.send(("ready", None) if self.t is None else ("step", self._lap()))
            conn.recv()  # the turn
            self.t, self.marks = time.perf_counter(), []

        def _mark(self, *args) -> None:
            self.marks.append(time.perf_counter())

        on_before_backward = on_after_backward = on_before_optimizer_step = on_train_batch_end = _mark

        def on_train_end(self, *args) -> None:
            self.last = self._lap()  # sent once teardown is over: it runs inside the turn

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
            return torch.utils.data.DataLoader(range(10_000_000), batch_size=1)

    try:
        torch.manual_seed(0)
        model, batch = build(name, tensors)
        x, y = batch(32)
        turn = Turn()
        callbacks = [turn] + ([GradWatchCallback(**options)] if options else [])
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, log_every_n_steps=1,
                             logger=pl.loggers.TensorBoardLogger(tempfile.mkdtemp()), enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
        trainer.fit(Lit(model, x, y))
        conn.send(("end", turn.last))
    except BaseException as err:  # the coordinator must not wait for a fit that died
        conn.send(("error", f"{label}: {type(err).__name__}: {err}"))


PHASES = ("forward", "backward", "clip", "optimizer", "after")  # the Lightning hooks between them: see Turn


def _run(args) -> tuple[dict[str, list[float]], dict[str, list[list[float]]]]:
    ctx = mp.get_context("spawn")
    conns, procs = {}, []
    for label, options in CONFIGS.items():
        here, there = ctx.Pipe()
        p = ctx.Process(target=_fit, args=(label, options, args.model, args.tensors, args.steps + args.warmup, there))
        p.start()
        conns[label], procs = here, procs + [p]
    for label, conn in conns.items():  # set-up runs in parallel, before the first turn
        kind, msg = conn.recv()
        if kind == "error":
            raise SystemExit(msg)
    times: dict[str, list[float]] = {k: [] for k in CONFIGS}
    phases: dict[str, list[list[float]]] = {k: [] for k in CONFIGS}
    active, labels = list(CONFIGS), list(CONFIGS)
    r = 0
    while active:
        k = r % len(labels)
        for label in [x for x in labels[k:] + labels[:k] if x in active]:
            conns[label].send("go")
            kind, msg = conns[label].recv()
            if kind == "error":
                raise SystemExit(msg)
            times[label].append(msg[0])
            phases[label].append(msg[1])
            if kind == "end":
                active.remove(label)
        r += 1
    for p in procs:
        p.join()
    return ({k: v[args.warmup:] for k, v in times.items()},
            {k: [p for p in v[args.warmup:] if len(p) == len(PHASES)] for k, v in phases.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--tensors", type=int, default=1202)
    parser.add_argument("--steps", type=int, default=100, help="timed iterations per fit")
    parser.add_argument("--warmup", type=int, default=5, help="first iterations of each fit not timed")
    args = parser.parse_args()
    times, phases = _run(args)
    import lightning.pytorch as pl
    import torch

    n = min(len(v) for v in times.values())
    base = times["bare"][:n]
    print(f"Lightning {pl.__version__}, {args.model}, {n} interleaved iterations per config after {args.warmup} "
          f"warm-up, one process per fit, TensorBoardLogger, self.log('loss') every step, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads (every=50 logs iteration 0, in the warm-up, and then every 50th)")
    print(f"{'config':<20} {'median ms':>10} {'ratio':>8} {'log-step +ms':>13}")
    for label, options in CONFIGS.items():
        ts = times[label][:n]
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        cost = ""
        if options and options["every"] == 1:
            cost = f"{1e3 * statistics.median(t - b for t, b in zip(ts, base)):13.2f}"
        print(f"{label:<20} {1e3 * statistics.median(ts):10.2f} {ratio:8.4f} {cost}")
    print("median ms per phase (batch start > before_backward > after_backward > before_optimizer_step > "
          "train_batch_end > next batch start):")
    print(f"{'config':<20} " + " ".join(f"{p:>9}" for p in PHASES))
    for label in CONFIGS:
        cols = zip(*phases[label]) if phases[label] else [[] for _ in PHASES]
        print(f"{label:<20} " + " ".join(f"{1e3 * statistics.median(c):9.2f}" if c else f"{'-':>9}" for c in cols))
    quiet = [t / b for i, (t, b) in enumerate(zip(times["every=50"][:n], base)) if (i + args.warmup) % 50]
    print(f"every=50 on its non-logging iterations: ratio {statistics.median(quiet):.4f} over {len(quiet)}")


if __name__ == "__main__":
    main()
