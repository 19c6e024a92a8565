"""``quantlab report``: re-render a report from saved results, or put two experiments side by side.

    quantlab report reports/demo                      # rewrite reports/demo/index.html
    quantlab report --compare reports/A reports/B     # reports/compare-A-vs-B/index.html

Nothing is re-run: the report reads the results a run saved in ``results/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "report",
        help="re-render an experiment's HTML report, or compare two experiments (--compare A B)",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n\n")[1:2]),
    )
    p.add_argument("report_dir", type=Path, nargs="?", help="a report folder written by `quantlab run`")
    p.add_argument("--compare", type=Path, nargs=2, metavar=("A", "B"), help="two report folders to compare")
    p.add_argument("--out", type=Path, default=None,
                   help="where the comparison goes (default: reports/compare-A-vs-B next to A)")


def run(args: Any) -> int:
    from ..errors import ExperimentError
    from ..report import load_report_inputs, write_comparison, write_report

    if args.compare and args.report_dir:
        raise ExperimentError("give either one report folder or --compare A B, not both")
    if args.compare:
        a_dir, b_dir = args.compare
        a, b = load_report_inputs(a_dir), load_report_inputs(b_dir)
        out = args.out or a_dir.parent / f"compare-{a_dir.name}-vs-{b_dir.name}"
        path = write_comparison(out, a, b, label_a=str(a_dir), label_b=str(b_dir))
        print(f"comparison: {path}")
        return 0
    if not args.report_dir:
        raise ExperimentError("give a report folder (e.g. reports/demo) or --compare A B")
    inputs = load_report_inputs(args.report_dir)
    path = write_report(args.report_dir, inputs)
    print(f"report: {path}")
    return 0
