"""Sweeps: a grid of models × calibration methods × settings × precisions, each cell an experiment.

    quantlab sweep experiments/sweep_demo.toml                  # local: one process
    quantlab sweep experiments/sweep_demo.toml --processes 2    # local process pool
    quantlab sweep experiments/sweep_demo.toml --ray auto       # a local Ray instance
    quantlab sweep experiments/sweep_demo.toml --ray ray://head:10001

Package layout (each module reads only those above it)::

    spec.py       the sweep file and its validation (quantlab.schema)
    cells.py      one cell = one experiment; its key, its run, its rows of the sweep table
    report.py     the sweep table, plots per model, index.html linking each cell's report
    executors.py  where cells run: this process, a process pool, or Ray tasks
    run.py        run_sweep: cached cells skipped, the rest run, results gathered
"""

from __future__ import annotations

from .cells import CellResult, CellSpec, sweep_cells
from .executors import RAY_HINT
from .run import SweepOptions, SweepResult, run_sweep
from .spec import SweepModel, SweepSpec, load_sweep, parse_sweep

__all__ = ["SweepSpec", "SweepModel", "load_sweep", "parse_sweep", "CellSpec", "CellResult", "sweep_cells",
           "SweepOptions", "SweepResult", "run_sweep", "RAY_HINT"]
