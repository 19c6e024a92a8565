"""Calibration coverage: does the calibration set represent the data the model will see?

    coverage/
      bins.py     coarse |x| bins per tensor, fixed from the calibration statistics (zero, deciles, amax, absmax)
      blocks.py   per-sample reducers: block counts for the bootstrap (bounded), worst samples (bounded heap)
      collect.py  the streaming pass over one data set
      distance.py PSI with a block-bootstrap interval and noise level, Wasserstein-1 on |x|
      gate.py     the gate's metrics and default in the threshold language (light)
      result.py   rows, the gate's verdict, coverage.json / statistics.npz
      check.py    check_coverage: the whole check over several data sets
      merge.py    merged statistics (calibrate on A ∪ B from A's and B's histograms)
      recalibrate.py  tables from several statistics files (and their merged data summaries)
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "CoverageOptions": "check", "check_coverage": "check", "coverage_of": "check",
    "merge_states": "merge", "merge_statistics": "merge",
    "merge_summaries": "recalibrate", "recalibrate": "recalibrate", "summary_beside": "recalibrate",
    "DEFAULT_GATE": "gate", "TENSOR_METRICS": "gate", "known_metrics": "gate", "parse_gate": "gate",
    "GATE_SEPARATOR": "gate", "join_gates": "gate",
    "COVERAGE_FILE": "result", "OWNED_FILES": "result", "CoverageResult": "result", "DataSetCoverage": "result",
    "gate_check": "result", "load_coverage": "result", "summary_row": "result", "worst_first": "result",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = list(_EXPORTS)
