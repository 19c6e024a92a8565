"""``quantlab sweep SWEEP.toml``: every cell of a grid (models × methods × settings × precisions).

    quantlab sweep experiments/sweep_demo.toml
    quantlab sweep experiments/sweep_demo.toml --processes 2
    quantlab sweep experiments/sweep_demo.toml --ray auto
    quantlab sweep experiments/sweep_demo.toml --ray ray://head-node:10001

Writes ``reports/NAME/``: ``sweep.parquet`` / ``sweep.csv`` (one row per cell
and output), ``plots/``, ``index.html`` linking each cell's own report under
``cells/``. An interrupted sweep resumes: cells whose inputs did not change are
not run again. A cell that fails keeps its error in the table; the sweep goes on
and exits 2 at the end (a failed cell is an error, not a verdict).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from . import ExitCode, add_command, path_arg, positive_int, prepare_output, text_arg

__all__ = ["HELP", "register", "run"]

HELP = "a grid of calibration experiments, locally or on Ray"

"""What a sweep writes into reports/NAME (each cell's report under cells/)."""


def register(subparsers: Any) -> None:
    p = add_command(subparsers, "sweep", __doc__, HELP)
    p.add_argument("sweep", type=path_arg, help="sweep file (TOML), e.g. experiments/sweep_demo.toml")
    p.add_argument("--processes", type=positive_int, default=1, metavar="N",
                   help=f"local worker processes (default 1; this machine has {os.cpu_count()} cores)")
    p.add_argument("--ray", type=text_arg, default=None, metavar="ADDRESS",
                   help="run cells as Ray tasks: 'auto' starts a local Ray instance, ray://host:port joins a "
                        "cluster (needs: pip install 'quantlab[ray]')")
    p.add_argument("--reports-dir", type=path_arg, default=Path("reports"), metavar="DIR",
                   help="where reports/NAME goes (default reports)")
    p.add_argument("--force", action="store_true", help="run every cell again, even unchanged ones")
    p.add_argument("--quiet", action="store_true", help="no line per finished cell")


def run(args: argparse.Namespace) -> int:
    from ..errors import ExperimentError
    from ..sweep import SweepOptions, load_sweep, run_sweep, sweep_cells
    from ..sweep.run import SWEEP_FILES

    spec = load_sweep(args.sweep)
    prepare_output(args.reports_dir / spec.name, SWEEP_FILES, command="sweep", flag="report folder",
                   inputs=[args.sweep], marker="sweep.json")
    total = len(sweep_cells(spec))
    done = [0]

    def progress(result: Any) -> None:
        done[0] += 1
        if not args.quiet:
            what = result.error if result.status == "failed" else f"{result.seconds:.1f} s"
            print(f"  [{done[0]}/{total}] {result.cell.name:<40} {result.status:<7} {what}", flush=True)

    where = "locally" if args.ray is None else f"on Ray ({args.ray})"
    print(f"quantlab sweep: {spec.name}: {total} cells {where}")
    result = run_sweep(spec, SweepOptions(processes=args.processes, ray=args.ray, force=args.force),
                       reports_dir=args.reports_dir, on_result=progress)
    print(f"sweep finished in {result.seconds:.0f} s; {len(result.failed)} failed; "
          f"open {result.index_html.resolve().as_uri()}", flush=True)
    if result.failed:
        first = result.failed[0]
        raise ExperimentError(f"{len(result.failed)} of {total} cells failed (first: {first.cell.name}: "
                              f"{first.error}); their errors are in {result.index_html.parent / 'sweep.csv'}; "
                              "fix them and rerun (the other cells are reused)")
    return ExitCode.OK
