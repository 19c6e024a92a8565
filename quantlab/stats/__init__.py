"""Activation statistics: one streaming pass of the FP32 model gives every method its histograms.

    stats/
      scope.py    which tensors: every float activation, or without the pre-activations TensorRT fuses
      budget.py   how many passes: group tensors so one batch of each group fits the memory budget
      collect.py  the pass: data ──> model with exposed outputs ──> per-tensor histograms (quantlab.histogram)
      record.py   the result (Statistics) and its .npz file

Everything public is importable from ``quantlab.stats``.
"""

from __future__ import annotations

from .budget import DEFAULT_MEMORY_BUDGET, plan_groups, resolved_sizes
from .collect import batch_feeds, collect_statistics
from .record import STATISTICS_FORMAT, Statistics, load_statistics, save_statistics
from .scope import TENSOR_SCOPES, fused_preactivations, scope_tensors

__all__ = [
    "STATISTICS_FORMAT",
    "DEFAULT_MEMORY_BUDGET",
    "Statistics",
    "collect_statistics",
    "save_statistics",
    "load_statistics",
    "batch_feeds",
    "plan_groups",
    "resolved_sizes",
    "TENSOR_SCOPES",
    "fused_preactivations",
    "scope_tensors",
]
