"""``quantlab report``: re-render a report from saved results, or put two experiments side by side.

    quantlab report reports/demo                      # rewrite reports/demo/index.html
    quantlab report --compare reports/A reports/B     # reports/compare-A-vs-B/index.html

Nothing is re-run: the report reads the results a run saved in ``results/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import add_command, path_arg, prepare_output

__all__ = ["HELP", "register", "run"]

HELP = "re-render an experiment's HTML report, or compare two experiments (--compare A B)"

COMPARISON_FILES = ("index.html", "comparison.json")
"""What ``report --compare`` writes into --out."""


def register(subparsers: Any) -> None:
    p = add_command(subparsers, "report", __doc__, HELP)
    p.add_argument("report_dir", type=path_arg, nargs="?", help="a report folder written by `quantlab run`")
    p.add_argument("--compare", type=path_arg, nargs=2, metavar=("A", "B"), help="two report folders to compare")
    p.add_argument("--out", type=path_arg, default=None,
                   help="where the comparison goes (default: reports/compare-A-vs-B next to A)")


def _existing_folder(path: Path, what: str) -> Path:
    """``path`` if it is a folder; else the error says it does not exist (or is a file)."""
    from ..errors import ExperimentError

    if not path.exists():
        raise ExperimentError(f"{what} {path} does not exist; give a report folder written by `quantlab run` "
                              "(e.g. reports/demo)")
    if not path.is_dir():
        raise ExperimentError(f"{what} {path} is a file, not a report folder; give the folder `quantlab run` "
                              "wrote (e.g. reports/demo)")
    return path


def run(args: Any) -> int:
    from ..atomic import check_writable
    from ..errors import ExperimentError
    from ..report import load_report_inputs, write_comparison, write_report

    if args.compare and args.report_dir:
        raise ExperimentError("give either one report folder or --compare A B, not both")
    if args.compare:
        a_dir, b_dir = (_existing_folder(p, "--compare") for p in args.compare)
        out = args.out or a_dir.parent / f"compare-{a_dir.name}-vs-{b_dir.name}"
        prepare_output(out, COMPARISON_FILES, command="report --compare", inputs=[a_dir, b_dir],
                       marker="comparison.json")
        a, b = load_report_inputs(a_dir), load_report_inputs(b_dir)
        path = write_comparison(out, a, b, label_a=str(a_dir), label_b=str(b_dir))
        print(f"comparison: {path}")
        return 0
    if args.out is not None:
        raise ExperimentError("--out is for --compare A B; `quantlab report DIR` rewrites DIR/index.html")
    if not args.report_dir:
        raise ExperimentError("give a report folder (e.g. reports/demo) or --compare A B")
    report_dir = _existing_folder(args.report_dir, "report folder")
    check_writable(report_dir / "index.html", label=f"report folder {report_dir}")  # rewrites only its own files
    inputs = load_report_inputs(report_dir)
    path = write_report(report_dir, inputs)
    print(f"report: {path}")
    return 0
