"""Activation statistics: one streaming pass of the FP32 model gives every method its histograms.

    stats/
      scope.py    which tensors: every float activation, or without the pre-activations TensorRT fuses
      budget.py   samples per model run for each batch shape (run budget) and passes (tensor groups
                  within the memory budget)
      collect.py  the pass: data ──> model with exposed outputs ──> per-tensor histograms (quantlab.histogram)
      pairs.py    which Relu / Clip(x, 0, h) outputs are derived from their input's pass (quantlab.clipped)
      reductions.py  one run's reductions on the thread pool while the model computes the next run
      prefetch.py the next batch is made in a thread while the model runs this one
      record.py   the result (Statistics) and its .npz file

Everything public is importable from ``quantlab.stats``.
"""

from __future__ import annotations

from .budget import (
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_RUN_BUDGET,
    RunRows,
    plan_groups,
    resolved_sizes,
    samples_per_run,
)
from .collect import batch_axes_of, batch_feeds, batch_size_of, collect_statistics, sample_rows
from .reductions import sample_weights
from .record import STATISTICS_FORMAT, Statistics, load_statistics, save_statistics
from .scope import (
    TENSOR_SCOPES,
    fused_preactivations,
    probability_tensors,
    quantizable_tensors,
    scope_tensors,
    unquantized_tensors,
)

__all__ = [
    "STATISTICS_FORMAT",
    "DEFAULT_MEMORY_BUDGET",
    "DEFAULT_RUN_BUDGET",
    "RunRows",
    "samples_per_run",
    "Statistics",
    "collect_statistics",
    "save_statistics",
    "load_statistics",
    "batch_feeds",
    "batch_axes_of",
    "batch_size_of",
    "sample_rows",
    "sample_weights",
    "plan_groups",
    "resolved_sizes",
    "TENSOR_SCOPES",
    "fused_preactivations",
    "quantizable_tensors",
    "unquantized_tensors",
    "probability_tensors",
    "scope_tensors",
]
