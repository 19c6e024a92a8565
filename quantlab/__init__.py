"""quantlab: INT8 quantization and accuracy validation for ONNX models bound for TensorRT.

The curated public API lives here; submodules are importable but this is the
surface that stays stable::

    import quantlab as ql

    model = ql.load_model("model.onnx")
    calib = ql.open_dataset("calib_sets/NAME.toml")
    tables = ql.calibrate(model, calib, ["entropy", "minmax"]).tables
    int8 = ql.write_model(model, ql.uniform_plan("int8"), tables["entropy"], ql.WriteOptions(target="tensorrt"))
    result = ql.compare(model, {"int8": int8}, ql.open_dataset("calib_sets/VAL.toml"))

Names are resolved on first use (PEP 562 ``__getattr__``): ``import quantlab``
loads only the version and the exception tree, so the ``quantlab`` command
starts without importing ONNX Runtime, pandas, numba or matplotlib.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

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
from .version import __version__

_LAZY: dict[str, str] = {
    # models
    "load_model": "graph", "model_from_proto": "graph", "LoadedModel": "graph", "TensorSpec": "graph",
    "efficientnet_lite0_onnx": "zoo", "zoo_model_path": "zoo",
    # data
    "open_dataset": "data", "load_manifest": "data", "from_arrays": "data", "DataSet": "data",
    "DataSummary": "data", "check_inputs": "data", "summarize": "data", "overlap": "data",
    # calibration
    "calibrate": "calibrate", "CalibrationResult": "calibrate", "CalibrationTable": "table",
    "TensorRange": "table", "read_table": "table", "write_table": "table", "METHOD_NAMES": "methods",
    # precision plans and the writer
    "Precision": "precision", "PRECISIONS": "precision", "PrecisionPlan": "plan", "Rule": "plan",
    "ResolvedPlan": "plan", "load_plan": "plan", "save_plan": "plan", "uniform_plan": "plan",
    "resolve_plan": "plan", "WriteOptions": "quantize", "WrittenModel": "quantize", "Provenance": "quantize",
    "write_model": "quantize", "save_written": "quantize",
    # backends
    "get_backend": "backends",
    # comparison, thresholds, search
    "compare": "compare", "CompareOptions": "compare", "CompareResult": "compare",
    "load_candidate": "compare", "load_comparison": "compare", "Threshold": "threshold",
    "parse_threshold": "threshold", "search": "search", "SearchOptions": "search", "SearchResult": "search",
    # reports, experiments, sweeps, export
    "ReportInputs": "report", "Verdict": "report", "write_report": "report", "render_report": "report",
    "run_experiment": "experiment", "load_experiment": "experiment", "verdict_for": "experiment",
    "per_layer_for_report": "experiment", "histogram_view": "experiment",
    "run_sweep": "sweep", "load_sweep": "sweep", "SweepOptions": "sweep",
    "export_triton": "export", "resolve_source": "export", "TritonOptions": "export",
    "tool_versions": "fingerprint",
    # calibration coverage
    "check_coverage": "coverage", "CoverageOptions": "coverage", "load_coverage": "coverage",
    "merge_statistics": "coverage", "recalibrate": "coverage",
}

__all__ = [  # noqa: PLE0604 - _LAZY's keys are the lazily imported names (strings)
    "__version__",
    *_LAZY,
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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'quantlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _PublicApi(types.ModuleType):
    """Keeps ``quantlab.calibrate`` / ``.compare`` / ``.search`` the functions when their submodules load.

    Importing a submodule binds it as an attribute of the package; where the
    public function has the submodule's name, the function is what this
    package's API promises (``from quantlab.compare import ...`` still reads
    the submodule through ``sys.modules``).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            return  # the submodule stays in sys.modules; the name resolves to the function on first use
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _PublicApi
