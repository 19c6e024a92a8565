"""quantlab: INT8 quantization and accuracy validation for ONNX models bound for TensorRT.

The curated public API lives here; submodules are importable but this is the
surface that stays stable.
"""

from __future__ import annotations

from .errors import (
    BackendError,
    BackendUnavailableError,
    CalibrationError,
    CompareError,
    DataError,
    ExperimentError,
    InputMismatchError,
    ManifestError,
    ModelError,
    PlanError,
    QuantlabError,
    SearchError,
    ThresholdError,
    UnsupportedOpError,
)
from .graph import LoadedModel, TensorSpec, load_model, model_from_proto
from .data import DataSet, DataSummary, check_inputs, load_manifest, open_dataset, overlap, summarize
from .plan import PrecisionPlan, ResolvedPlan, Rule, load_plan, resolve_plan, save_plan, uniform_plan
from .quantize import Provenance, WriteOptions, WrittenModel, save_written, write_model
from .table import CalibrationTable, TensorRange
from .calibrate import CalibrationResult, calibrate
from .threshold import Threshold, parse_threshold
from .compare import CompareOptions, CompareResult, compare, load_candidate, load_comparison
from .search import SearchOptions, SearchResult, search

from .version import __version__

__all__ = [
    "__version__",
    "load_model",
    "model_from_proto",
    "LoadedModel",
    "TensorSpec",
    "open_dataset",
    "load_manifest",
    "DataSet",
    "DataSummary",
    "check_inputs",
    "summarize",
    "overlap",
    "CalibrationTable",
    "TensorRange",
    "PrecisionPlan",
    "Rule",
    "ResolvedPlan",
    "load_plan",
    "save_plan",
    "uniform_plan",
    "resolve_plan",
    "WriteOptions",
    "WrittenModel",
    "Provenance",
    "write_model",
    "save_written",
    "calibrate",
    "CalibrationResult",
    "Threshold",
    "parse_threshold",
    "CompareOptions",
    "CompareResult",
    "compare",
    "load_comparison",
    "load_candidate",
    "SearchOptions",
    "SearchResult",
    "search",
    "QuantlabError",
    "ModelError",
    "DataError",
    "ManifestError",
    "InputMismatchError",
    "CalibrationError",
    "PlanError",
    "BackendError",
    "BackendUnavailableError",
    "UnsupportedOpError",
    "CompareError",
    "ThresholdError",
    "SearchError",
    "ExperimentError",
]
