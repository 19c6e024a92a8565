"""Per-layer precision plans: which fusion group runs in int8, fp16 or fp32.

A plan is a small JSON or TOML file a user keeps next to the model and edits
by hand. It says what precision each *fusion group* gets: TensorRT fuses a
convolution with its bias, batch norm, residual add and activation into one
kernel, so a pin on one of those nodes is a pin on the whole kernel.

Layout (each module imports only those above it, and
:mod:`quantlab.precision` / graph / errors / atomic)::

    quantlab/plan/
      groups.py    FusionGroup, fusion_groups, node_names, constant_names:
                   how TensorRT fuses the model's nodes (changes with TensorRT's fusions)
      rules.py     Rule, PrecisionPlan, uniform_plan: what the user asks for and its precedence
      files.py     plan_to_dict, plan_from_dict, load_plan, save_plan: the JSON/TOML file form
      resolve.py   ResolvedPlan, resolve_plan: a plan applied to one model's groups, checked

The precision type itself (``Precision``, ``PRECISIONS``, the defaults and the
per-group ``GroupPrecision``) lives in :mod:`quantlab.precision`, which needs
no ONNX; it is re-exported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports
from ..precision import PRECISIONS, GroupPrecision, Precision

if TYPE_CHECKING:
    from .files import PLAN_FORMAT, load_plan, plan_from_dict, plan_to_dict, save_plan
    from .groups import (
        COMPUTE_OPS,
        QUANTIZABLE_STANDALONE_OPS,
        FusionGroup,
        constant_names,
        fusion_groups,
        node_names,
    )
    from .resolve import ResolvedPlan, resolve_plan
    from .rules import PrecisionPlan, Rule, uniform_plan

# lazy: the statistics pass reads fusion groups (quantlab.stats.scope) without pandas, which resolve.py needs
__getattr__, __dir__ = lazy_exports(__name__, {
    "PLAN_FORMAT": "files", "load_plan": "files", "plan_from_dict": "files", "plan_to_dict": "files",
    "save_plan": "files",
    "COMPUTE_OPS": "groups", "QUANTIZABLE_STANDALONE_OPS": "groups", "FusionGroup": "groups",
    "constant_names": "groups", "fusion_groups": "groups", "node_names": "groups",
    "ResolvedPlan": "resolve", "resolve_plan": "resolve",
    "PrecisionPlan": "rules", "Rule": "rules", "uniform_plan": "rules",
})

__all__ = [
    "Precision",
    "PRECISIONS",
    "PLAN_FORMAT",
    "COMPUTE_OPS",
    "QUANTIZABLE_STANDALONE_OPS",
    "FusionGroup",
    "GroupPrecision",
    "Rule",
    "PrecisionPlan",
    "ResolvedPlan",
    "fusion_groups",
    "node_names",
    "constant_names",
    "uniform_plan",
    "load_plan",
    "save_plan",
    "plan_from_dict",
    "plan_to_dict",
    "resolve_plan",
]
