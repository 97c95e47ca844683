"""The ``fimhooks`` command: ``fimhooks demo`` and ``fimhooks report DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage text
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_integer(text: str) -> int:
    """An integer of at least 1; anything else is refused, naming what was given."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fimhooks`` command."""
    from fimhooks.show.demo import DATASETS

    parser = _Parser(prog="fimhooks", description="Online Fisher information with its variance.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = commands.add_parser(
        "demo",
        help="train a small MLP on bundled data and report",
        description="Train a small MLP on a data set bundled with scikit-learn, with a "
        "monitor attached; write the log, the plots and the report to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        default="digits",
        help="digits: categorical, breast_cancer: Bernoulli, diabetes: Gaussian",
    )
    demo.add_argument(
        "--epochs", type=positive_integer, default=20, help="passes over the data set"
    )
    demo.add_argument(
        "--out", type=Path, default=Path("fimhooks-demo"), help="folder for log, plots, report"
    )
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    report = commands.add_parser(
        "report",
        help="rebuild plots and report from a log",
        description="Rebuild the plots, report.md and report.html from a folder's log.",
    )
    report.add_argument("dir", type=Path, help="folder holding fimhooks_log.jsonl")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command; returns the exit status."""
    args = build_parser().parse_args(argv)
    from fimhooks.show.demo import LOG_NAME, console_summary, run_demo
    from fimhooks.show.jsonlog import read_log
    from fimhooks.show.report import REPORT_HTML, write_report

    try:
        if args.command == "demo":
            monitor = run_demo(args.dataset, args.epochs, args.out, progress=not args.no_progress)
            print(console_summary(monitor.estimates()))
            out = args.out
        else:
            out = args.dir
            write_report(read_log(out / LOG_NAME), out)
    except (ValueError, ImportError, OSError) as error:
        print(f"fimhooks: error: {error}", file=sys.stderr)
        return 1
    print(f"\nReport: {out / REPORT_HTML} (plots and {LOG_NAME} beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
