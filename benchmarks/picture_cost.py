"""What drawing the TensorBoard pictures costs in CPU: the figure docs/dashboard.md and docs/performance.md quote.

A CIFAR ResNet-56 (116 layers, 27 blocks) is trained ``--steps`` steps with a monitor logging every step (no
writer, no pictures: only the records). The records then fill the pictures' :class:`Timeline` as the
TensorBoard sink fills it, and the four pictures (``pictures.draw``, what the drawing process runs) and the
health card are drawn here, in this process, ``--repeats`` times after one warm-up drawing (the first one
loads matplotlib's fonts). CPU time is ``time.thread_time()`` of the drawing thread, median over repeats;
wall time beside it. Maps grow with the number of logging steps drawn (at most 256 columns), so each is
measured at every length in ``--at``.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/picture_cost.py --steps 120 --at 20 120 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def _timed(fn, repeats: int) -> tuple[float, float, object]:  # noqa: ANN001
    fn()  # warm-up: fonts, colour maps, first-use imports
    cpu, wall, out = [], [], None
    for _ in range(repeats):
        c0, w0 = time.thread_time(), time.perf_counter()
        out = fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--at", type=int, nargs="+", default=[20, 120], help="logging steps in the maps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--depth", type=int, default=56)
    args = ap.parse_args()

    import gradwatch
    from gradwatch.reference.blocks import resnet
    from gradwatch.sinks.tensorboard._card import HealthCard, OpenIncidents, card_figures
    from gradwatch.sinks.tensorboard.pictures import Timeline, draw, scene

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = resnet(args.depth)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mon = gradwatch.Monitor(model, optimizer=opt, every=1, pictures=0)
    for s in range(args.steps):
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    records = mon.records
    mon.close()
    last = records[-1]
    print(f"ResNet-{args.depth}: {len(last.layers)} layers, {len(last.blocks)} blocks, {len(records)} records; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread")
    print("| what | logging steps drawn | CPU s (median) | wall s (median) |")
    print("|---|---|---|---|")
    for n in args.at:
        timeline = Timeline()
        for r in records[:n]:
            timeline.add(r)
        cpu, wall, pics = _timed(lambda: draw(scene(timeline)), args.repeats)
        names = ", ".join(p.name for p in pics)  # type: ignore[attr-defined]
        print(f"| four pictures ({names}) | {n} | {cpu:.3f} | {wall:.3f} |")
    incidents = OpenIncidents()
    for r in records:
        incidents.add(r)
    card = HealthCard(last.step, incidents.rows(), card_figures(last), incidents.alerting)
    cpu, wall, _ = _timed(lambda: draw(card), args.repeats)
    print(f"| health card | - | {cpu:.3f} | {wall:.3f} |")


if __name__ == "__main__":
    main()
