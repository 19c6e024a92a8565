"""Calibration coverage: does the calibration set represent the data the model will see?

    coverage/
      bins.py     coarse |x| bins per tensor, fixed from the calibration statistics (zero, deciles, amax, absmax)
      blocks.py   per-sample reducers: block counts for the bootstrap (bounded), worst samples (bounded heap)
      collect.py  the streaming pass over one data set
      distance.py PSI with a block-bootstrap interval and noise level, Wasserstein-1 on |x|
      result.py   rows, the gate in the threshold language, coverage.json / statistics.npz
      check.py    check_coverage: the whole check over several data sets
      merge.py    merged statistics (calibrate on A ∪ B from A's and B's histograms)
      recalibrate.py  tables from several statistics files (and their merged data summaries)
"""

from __future__ import annotations

from .check import CoverageOptions, check_coverage, coverage_of
from .merge import merge_states, merge_statistics
from .recalibrate import merge_summaries, recalibrate, summary_beside
from .result import (
    COVERAGE_FILE,
    DEFAULT_GATE,
    TENSOR_METRICS,
    CoverageResult,
    DataSetCoverage,
    gate_check,
    known_metrics,
    load_coverage,
    parse_gate,
    summary_row,
)

__all__ = [
    "CoverageOptions", "check_coverage", "coverage_of", "merge_states", "merge_statistics", "COVERAGE_FILE",
    "DEFAULT_GATE", "TENSOR_METRICS", "CoverageResult", "DataSetCoverage", "gate_check", "known_metrics",
    "load_coverage", "parse_gate", "summary_row", "merge_summaries", "recalibrate", "summary_beside",
]
