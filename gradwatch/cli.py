"""The ``gradwatch`` command (also ``python -m gradwatch``)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import report
from .report._html import render_html
from .flow import inspect
from .reference import validate
from .reference.demo import run_demo
from .version import __version__

__all__ = ["main", "build_parser"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected sizes >= 1 separated by commas, e.g. 2,3,32,32, got {text!r}")
    return shape


def _depth(text: str) -> int:
    value = int(text)
    if value < 8 or (value - 2) % 6:
        raise argparse.ArgumentTypeError(f"depth must be 6n+2 (8, 20, 32, 44, 56, 110, ...), got {value}")
    return value


def _cmd_demo(args: argparse.Namespace) -> int:
    run_demo(
        out=args.out,
        steps=args.steps,
        depth=args.depth,
        every=args.every,
        batch_size=args.batch_size,
        nets=args.nets,
        seed=args.seed,
    )
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    kwargs = {}
    for item in args.kwargs or ():
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"gradwatch inspect: --kwargs takes KEY=VALUE, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    try:
        blocks, status = inspect(args.factory, args.input_shape, kwargs)
    except (ValueError, ImportError) as err:
        print(f"gradwatch inspect: {err}", file=sys.stderr)
        return 1
    if args.json:
        rows = [dataclasses.asdict(b) for b in blocks]
        print(json.dumps({"status": status.state, "reason": status.reason, "blocks": rows}, indent=1))
    else:
        print(blocks)  # the table, then the status line
    return 0


#: ``gradwatch report``'s exit status: its verdict on the runs (0, 1, 2), or why there is none (3, 4, 64), so a CI
#: script or a scheduler can act on it (docs/cli.md).
REPORT_STATUS = {
    "ok": 0,  # no incident at warning or above (info incidents are not a verdict)
    "warning": 1,  # an incident reached warning, none critical
    "critical": 2,  # an incident reached critical
    "unreadable": 3,  # LOGDIR missing or not a folder, no gradwatch run in it, its files unreadable
    "unwritable": 4,  # an output (--csv, --parquet, --html) cannot be written: checked before anything is read
    "usage": 64,  # bad arguments (EX_USAGE of sysexits.h: argparse's own 2 would read as "critical")
}

_REPORT_EPILOG = """exit status:
  0   no incident at warning or above in any run (info incidents do not count)
  1   an incident reached warning, none critical
  2   an incident reached critical
  3   LOGDIR cannot be read: missing, not a folder, no gradwatch run in it
  4   an output (--csv, --parquet, --html) cannot be written
  64  bad arguments
The verdict is the most severe incident told in alerts.jsonl (in the run's folder), else the open-incident
counts in the event files."""


def _report_error(err: BaseException, status: str) -> int:
    print(f"gradwatch report: {err}", file=sys.stderr)
    return REPORT_STATUS[status]


def _cmd_report(args: argparse.Namespace) -> int:
    try:  # the outputs first: a path that cannot be written fails before the report is read and printed
        for path, is_table in ((args.csv, True), (args.parquet, True), (args.html, False)):
            if path:
                report.check_output(path, table=is_table)
    except (ValueError, ImportError) as err:
        return _report_error(err, "unwritable")
    try:
        table, reports = report.read(args.logdir, top=args.top)
    except (ValueError, OSError) as err:
        return _report_error(err, "unreadable")
    print(report.to_json(reports) if args.json else report.render_text(reports))
    try:
        for path in (args.csv, args.parquet):
            if path:
                report.write_table(table, path)
                print(f"wrote {len(table):,} rows to {path}", file=sys.stderr)
        if args.html:
            frames = {str(run): rows for run, rows in table.groupby("run", sort=False)}
            with open(args.html, "w", encoding="utf-8") as f:
                f.write(render_html(reports, frames, f"gradwatch report: {args.logdir}"))
            print(f"wrote {args.html}", file=sys.stderr)
    except (ValueError, ImportError, OSError) as err:
        return _report_error(err, "unwritable")
    if not reports:
        return REPORT_STATUS["unreadable"]
    worst = report.worst_severity(reports)
    return REPORT_STATUS[worst if worst in ("warning", "critical") else "ok"]


def _cmd_validate(args: argparse.Namespace) -> int:
    try:
        outcomes = validate.run(quick=args.quick, out=args.out, steps=args.steps, every=args.every,
                                jobs=args.jobs, only=args.only or (), out_md=args.out_md, seeds=args.seeds,
                                device=args.device, threads=args.threads)
    except ValueError as err:
        print(f"gradwatch validate: {err}", file=sys.stderr)
        return 2
    return 0 if all(o.passed for o in outcomes) else 1


class _Parser(argparse.ArgumentParser):
    """argparse's parser with the exit status of a usage error chosen per command (``usage_status``; argparse's
    own is 2, which ``gradwatch report`` uses for a verdict)."""

    def __init__(self, *args: Any, usage_status: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.usage_status = usage_status
        self.commands: dict[str, _Parser] = {}

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(self.usage_status, f"{self.prog}: error: {message}\n")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # argparse reports them from the top parser: said by the command's, with its status
            command = self.commands.get(getattr(parsed, "command", None) or "", self)
            command.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    """The ``gradwatch`` argument parser: one sub-command per command (``docs/cli.md``)."""
    parser = _Parser(
        prog="gradwatch", description="Gradient diagnostics for deep networks."
    )
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train plain, post-act, pre-act and broken-skip ResNets on generated data; log to TensorBoard",
    )
    demo.add_argument("--out", default="runs/demo", help="TensorBoard log folder (default: runs/demo)")
    demo.add_argument("--steps", type=_positive, default=200, help="training steps per net (default: 200)")
    demo.add_argument("--depth", type=_depth, default=56, help="network depth, 6n+2 (default: 56)")
    demo.add_argument("--every", type=_positive, default=5, help="log every N steps (default: 5)")
    demo.add_argument("--batch-size", type=_positive, default=32, help="batch size (default: 32)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument(
        "--nets", nargs="+", choices=["plain", "postact", "preact", "broken_skip"], help="run only these nets"
    )
    demo.set_defaults(func=_cmd_demo)

    insp = sub.add_parser(
        "inspect", help="list the residual blocks gradwatch finds in a model (name, skip kind, depth index)"
    )
    insp.add_argument("factory", help="MODULE:FACTORY or path/file.py:FACTORY returning a model "
                                      "(or (model, example_input)), e.g. gradwatch.reference.blocks:resnet")
    insp.add_argument("--input-shape", type=_shape, help="example input shape, e.g. 2,3,32,32 (filled with randn)")
    insp.add_argument("--kwargs", nargs="+", metavar="KEY=VALUE", help="factory arguments, e.g. depth=56")
    insp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    insp.set_defaults(func=_cmd_inspect)

    rep = sub.add_parser("report", help="summarise the runs under LOGDIR from their event files: health, the "
                                        "layers and blocks to look at, incidents and their lead-up; export the "
                                        "table or one HTML page; the exit status is the verdict (0, 1, 2)",
                         usage_status=REPORT_STATUS["usage"], epilog=_REPORT_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    rep.add_argument("logdir", help="a folder of TensorBoard runs (searched recursively)")
    rep.add_argument("--csv", metavar="FILE", help="write the long table (run, step, name, metric, value)")
    rep.add_argument("--parquet", metavar="FILE", help="the same as Parquet (needs pyarrow)")
    rep.add_argument("--html", metavar="FILE", help="write one self-contained page with pictures and tables")
    rep.add_argument("--json", action="store_true", help="print JSON instead of text")
    rep.add_argument("--top", type=_positive, default=5, help="rows per ranking (default: 5)")
    rep.set_defaults(func=_cmd_report)

    val = sub.add_parser("validate", help="prove the diagnostics on reference nets where the truth is known "
                                          "(healthy, plain controls, planted faults, He 2016 shortcut variants)")
    val.add_argument("--quick", action="store_true", help="depths 20 and 56 only (a few minutes on 2 cores)")
    val.add_argument("--out", default="runs/validate", help="TensorBoard logs and validate.json (default: "
                                                            "runs/validate)")
    val.add_argument("--steps", type=_positive, help="training steps per case (default: 120 quick, 300 full)")
    val.add_argument("--every", type=_positive, default=5, help="log every N steps (default: 5)")
    val.add_argument("--jobs", type=_positive, default=min(4, os.cpu_count() or 1),
                     help="cases trained in parallel processes, one thread each (default: cores, at most 4)")
    val.add_argument("--only", nargs="+", metavar="CASE", help="only these cases or groups (healthy, control, "
                                                                "fault, variant, instability)")
    val.add_argument("--seeds", type=_positive, default=1, help="run every case with seeds 0..N-1 (default: 1)")
    val.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    val.add_argument("--threads", type=_positive, default=1, help="torch threads per process (default: 1)")
    val.add_argument("--out-md", metavar="FILE", help="write the scorecard into this page's section "
                                                       "(docs/validation.md)")
    val.set_defaults(func=_cmd_validate)
    parser.commands = {name: command for name, command in sub.choices.items() if isinstance(command, _Parser)}
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradwatch`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
