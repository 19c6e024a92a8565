"""``quantlab demo``: the README's main command.

Runs the shipped ``experiments/demo.toml``: EfficientNet-Lite0 (pretrained,
exported to ONNX by quantlab and cached), real photos for calibration and
validation, all three calibrators, FP16 and INT8 candidates, a strict threshold
and the sensitivity search; then prints where the HTML report is.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from . import add_command, add_progress_option, path_arg

__all__ = ["HELP", "register", "run", "demo_experiment_path"]

HELP = "run the EfficientNet-Lite0 demo experiment and write its report"


def demo_experiment_path() -> Path:
    """``experiments/demo.toml`` of this checkout (next to the ``quantlab`` package), or of the current folder."""
    from ..errors import ExperimentError

    candidates = [Path(__file__).resolve().parents[2] / "experiments" / "demo.toml",
                  Path.cwd() / "experiments" / "demo.toml"]
    for path in candidates:
        if path.is_file():
            return path
    raise ExperimentError(
        "experiments/demo.toml was not found next to the quantlab package nor in the current folder; "
        "run the demo from a clone of the quantlab repository."
    )


def register(subparsers: Any) -> None:
    p = add_command(subparsers, "demo", __doc__, HELP)
    p.add_argument("--reports-dir", type=path_arg, default=Path("reports"),
                   help="folder that receives reports/demo/ (default: ./reports)")
    p.add_argument("--force", action="store_true", help="redo every stage")
    add_progress_option(p, "--quiet")


def run(args: Any) -> int:
    from ..experiment import load_experiment, run_experiment
    from .run import prepare_report_dir, print_result

    start = time.perf_counter()
    path = demo_experiment_path()
    config = load_experiment(path)
    prepare_report_dir(args.reports_dir, config.name, "demo", [path])
    print(f"quantlab demo: {path}", file=sys.stderr)
    result = run_experiment(config, reports_dir=args.reports_dir, progress=not args.no_progress, force=args.force,
                            command="quantlab " + " ".join(sys.argv[1:]))
    print_result(result)
    print(f"demo finished in {time.perf_counter() - start:.0f} s; open {result.index_html.resolve().as_uri()}")
    return 0
