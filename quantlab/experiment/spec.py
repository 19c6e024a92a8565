"""The experiment file: its schema, its validation, and the frozen config it becomes.

Every default is defined once, on :class:`ExperimentConfig`; every problem is an
:class:`~quantlab.errors.ExperimentError` naming the file, the line and the key
(the checker is :mod:`quantlab.schema`, shared with data-set manifests).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..compare.options import DECISION_THRESHOLD
from ..coverage.gate import parse_gate
from ..errors import ExperimentError, InputMismatchError, ThresholdError
from ..fingerprint import sha256_file
from ..methods import DEFAULT_PERCENTILE, METHOD_NAMES, percentile_error
from ..schema import (Key, Where, check_table, parse_toml, read_toml_text, is_int, is_num, is_probability,
                      non_empty_str, one_of, show)
from ..shapes import SHAPES_GRAMMAR, parse_shapes
from ..threshold import parse_threshold
from ..zoo import ZOO_MODELS

__all__ = ["ExperimentConfig", "load_experiment", "parse_experiment", "CALIBRATORS", "TARGETS"]

CALIBRATORS = ("entropy", "minmax", "percentile")
"""The methods an experiment computes by default (any of :data:`quantlab.methods.METHOD_NAMES` may be asked)."""
TARGETS = ("tensorrt", "ort")
BACKENDS = ("ort", "tensorrt", "tensorrt-rtx")
GUIDE = "the docstring of quantlab.experiment, or experiments/demo.toml"


@dataclass(frozen=True)
class ExperimentConfig:
    """A validated experiment file. Paths are absolute; defaults are defined here only."""

    name: str
    source: Path | None
    calibration: Path
    validation: Path
    model_path: Path | None = None
    zoo: str | None = None
    shapes: str | None = None
    bind: tuple[tuple[str, Any], ...] = ()
    seed: int = 0
    backend: str = "ort"
    threshold: str | None = None
    metric: str | None = None
    """A user metric, ``file.py:function`` (the file's path made absolute) or ``module:function``, as --metric."""
    calibrators: tuple[str, ...] = CALIBRATORS
    percentile: float = DEFAULT_PERCENTILE
    fp16: bool = True
    int8: tuple[str, ...] = CALIBRATORS
    target: str = "tensorrt"
    search: bool = True
    search_calibrator: str = "best"
    search_budget: int = 0
    worst_tensors: int = 6
    export_repository: Path | None = None
    export_name: str | None = None
    export_platform: str = "onnxruntime"
    export_max_batch_size: int | None = None
    export_dynamic_batching: bool = False
    export_instances: int = 1
    coverage: bool = True
    coverage_gate: str | None = None
    coverage_sets: tuple[Path, ...] = ()
    equalize: bool = False
    smoothquant: float | None = None
    search_bias_correction: bool = True
    batch_size: int | None = None
    """Samples per model run in every stage; None: each stage's default, or the batch a model fixes at 1."""
    int8_bodies: bool = False
    """INT8 candidates (and the search) write calibrated Loop/Scan/If bodies in INT8 (``WriteOptions.int8_bodies``)."""
    ctc_blank: int | None = None
    """The blank class of CTC outputs (``CompareOptions.ctc_blank``): comparisons add text_agreement and cer."""
    decision_threshold: float = DECISION_THRESHOLD
    """The probability above which an output a Sigmoid writes marks its mask (``CompareOptions.decision_threshold``)."""
    class_maps: tuple[str, ...] = ()
    """Outputs ``[N, C, H, W]`` read as class scores per pixel (``CompareOptions.class_maps``)."""

    def batch_size_option(self) -> dict[str, int]:
        """``{"batch_size": n}`` when the experiment sets one (or its model fixes it at 1), else {} (each stage's
        own default)."""
        return {} if self.batch_size is None else {"batch_size": self.batch_size}

    def settings(self) -> dict[str, Any]:
        """Everything that shapes results, as plain data (recorded in the manifest)."""
        out = {
            "name": self.name, "model": str(self.model_path) if self.model_path else None, "zoo": self.zoo,
            "calibration": str(self.calibration), "validation": str(self.validation), "seed": self.seed,
            "backend": self.backend, "threshold": self.threshold, "calibrators": list(self.calibrators),
            "percentile": self.percentile, "fp16": self.fp16, "int8": list(self.int8), "target": self.target,
            "search": self.search, "search_calibrator": self.search_calibrator,
            "search_budget": self.search_budget, "worst_tensors": self.worst_tensors,
            "coverage": {"enabled": self.coverage, "gate": self.coverage_gate,
                         "sets": [str(p) for p in self.coverage_sets]},
        }
        if self.metric is not None:  # absent when unset: older manifests stay comparable
            out["metric"] = {"spec": self.metric, "sha256": metric_file_sha256(self.metric)}
        if self.shapes is not None:
            out["shapes"] = self.shapes
        if self.bind:
            out["bind"] = dict(self.bind)
        if self.int8_bodies:  # absent when off: older manifests stay comparable
            out["int8_bodies"] = True
        if self.ctc_blank is not None:  # absent when unset: older manifests stay comparable
            out["ctc_blank"] = self.ctc_blank
        if self.decision_threshold != DECISION_THRESHOLD:  # absent when default: older manifests stay comparable
            out["decision_threshold"] = self.decision_threshold
        if self.class_maps:  # absent when unset: older manifests stay comparable
            out["class_maps"] = list(self.class_maps)
        if self.equalize or self.smoothquant is not None:  # absent when off: older manifests stay comparable
            out["rewrites"] = {"equalize": self.equalize, "smoothquant": self.smoothquant}
        if not self.search_bias_correction:
            out["search_bias_correction"] = False
        if self.batch_size is not None:
            out["batch_size"] = self.batch_size
        if self.export_repository is not None:
            out["export"] = {"repository": str(self.export_repository), "name": self.export_name or self.name,
                             "platform": self.export_platform, "max_batch_size": self.export_max_batch_size,
                             "dynamic_batching": self.export_dynamic_batching, "instances": self.export_instances}
        return out


def _methods(v: Any) -> bool:
    return (isinstance(v, list) and bool(v) and all(isinstance(m, str) and m in METHOD_NAMES for m in v)
            and len(set(v)) == len(v))


_METHODS_EXPECT = f"a non-empty list of distinct methods from {', '.join(map(repr, METHOD_NAMES))}"
_COUNT = "an integer >= 0"


def _count(v: Any) -> bool:
    return is_int(v) and v >= 0


def _coverage_sets(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, dict) and set(t) == {"data"} and non_empty_str(t["data"])
                                       for t in v)


def _bindings(value: Any) -> bool:
    """``bind = { sr = 16000 }``: input names to numbers, booleans (a bool input: ``use_cache_branch = true``) or
    lists of them."""
    def number_or_list(v: Any) -> bool:
        return is_num(v) or isinstance(v, bool) or isinstance(v, list) and all(number_or_list(x) for x in v)
    return isinstance(value, dict) and bool(value) and all(number_or_list(v) for v in value.values())


# (table, key) -> (Key, the ExperimentConfig field it fills); table "" is the top level
_SCHEMA: dict[str, dict[str, tuple[Key, str]]] = {
    "": {
        "name": (Key("a non-empty string", non_empty_str, 'name = "my_experiment"'), "name"),
        "seed": (Key(_COUNT, _count, "seed = 0"), "seed"),
        "backend": (Key(f"one of {', '.join(map(repr, BACKENDS))}", one_of(BACKENDS), 'backend = "ort"'), "backend"),
        "threshold": (Key("a threshold expression", non_empty_str, 'threshold = "cosine>=0.995"'), "threshold"),
        "metric": (Key("a user metric, 'file.py:function' (relative to the experiment file) or 'module:function'",
                       lambda v: non_empty_str(v) and ":" in v, 'metric = "ctc_metric.py:line_accuracy"'), "metric"),
        "ctc_blank": (Key("the blank class index of CTC outputs, " + _COUNT, _count, "ctc_blank = 0"), "ctc_blank"),
        "decision_threshold": (Key("a probability in (0, 1): outputs a Sigmoid writes are read as the masks p > it",
                                   is_probability, "decision_threshold = 0.3"), "decision_threshold"),
        "class_maps": (Key("a list of output names read as class scores per pixel [N, C, H, W]",
                           lambda v: isinstance(v, list) and bool(v) and all(non_empty_str(o) for o in v),
                           'class_maps = ["logits"]'), "class_maps"),
        "coverage": (Key("[[coverage]] tables, each with data = a manifest path", _coverage_sets,
                         '[[coverage]]\ndata = "../calib_sets/night.toml"'), "coverage_sets"),
    },
    "model": {
        "path": (Key("a path string (relative to the experiment file)", non_empty_str, 'path = "model.onnx"'),
                 "model_path"),
        "zoo": (Key("a zoo model name", non_empty_str, 'zoo = "efficientnet_lite0"'), "zoo"),
        "shapes": (Key(f"engine shape ranges as --shapes takes them: {SHAPES_GRAMMAR}", non_empty_str,
                       'shapes = "image:1x3x48x64,8x3x48x320,32x3x48x1600"'), "shapes"),
        "bind": (Key("an inline table of input name = number, true/false or list (the value the data always "
                     "feeds it)",
                     _bindings, "bind = { sr = 16000 }"), "bind"),
    },
    "data": {
        "calibration": (Key("a manifest path string", non_empty_str,
                            'calibration = "../calib_sets/demo_calib.toml"'), "calibration"),
        "validation": (Key("a manifest path string", non_empty_str,
                           'validation = "../calib_sets/demo_val.toml"'), "validation"),
        "batch_size": (Key("an integer >= 1", lambda v: _count(v) and v >= 1, "batch_size = 8"), "batch_size"),
    },
    "calibrate": {
        "methods": (Key(_METHODS_EXPECT, _methods, 'methods = ["entropy", "minmax"]'), "calibrators"),
        "percentile": (Key("a number in (0, 100]", lambda v: is_num(v) and percentile_error(v) is None,
                           f"percentile = {DEFAULT_PERCENTILE}"), "percentile"),
        "equalize": (Key("true or false", lambda v: isinstance(v, bool), "equalize = true"), "equalize"),
        "smoothquant": (Key("a number in [0, 1] (SmoothQuant's alpha)", lambda v: is_num(v) and 0 <= v <= 1,
                            "smoothquant = 0.5"), "smoothquant"),
    },
    "candidates": {
        "fp16": (Key("true or false", lambda v: isinstance(v, bool), "fp16 = true"), "fp16"),
        "int8": (Key(_METHODS_EXPECT, _methods, 'int8 = ["entropy"]'), "int8"),
        "target": (Key(f"one of {', '.join(map(repr, TARGETS))}", one_of(TARGETS), 'target = "tensorrt"'), "target"),
        "int8_bodies": (Key("true or false", lambda v: isinstance(v, bool), "int8_bodies = true"), "int8_bodies"),
    },
    "search": {
        "enabled": (Key("true or false", lambda v: isinstance(v, bool), "enabled = true"), "search"),
        "calibrator": (Key('"best" or a method name', non_empty_str, 'calibrator = "best"'), "search_calibrator"),
        "budget": (Key(_COUNT, _count, "budget = 0"), "search_budget"),
        "bias_correction": (Key("true or false", lambda v: isinstance(v, bool), "bias_correction = true"),
                            "search_bias_correction"),
    },
    "report": {
        "worst_tensors": (Key(_COUNT, _count, "worst_tensors = 6"), "worst_tensors"),
        "coverage": (Key("true or false", lambda v: isinstance(v, bool), "coverage = true"), "coverage"),
        "coverage_gate": (Key("a coverage threshold", non_empty_str, 'coverage_gate = "saturated_max>0.01"'),
                          "coverage_gate"),
    },
    "export": {
        "repository": (Key("a folder path string (relative to the experiment file)", non_empty_str,
                           'repository = "../models"'), "export_repository"),
        "name": (Key("a model name", non_empty_str, 'name = "efficientnet"'), "export_name"),
        "platform": (Key("one of 'onnxruntime', 'tensorrt'", one_of(("onnxruntime", "tensorrt")),
                         'platform = "onnxruntime"'), "export_platform"),
        "max_batch_size": (Key(_COUNT, _count, "max_batch_size = 8"), "export_max_batch_size"),
        "dynamic_batching": (Key("true or false", lambda v: isinstance(v, bool), "dynamic_batching = true"),
                             "export_dynamic_batching"),
        "instances": (Key("an integer >= 1", lambda v: is_int(v) and v >= 1, "instances = 1"), "export_instances"),
    },
}
_PATH_FIELDS = ("model_path", "calibration", "validation")


def _table_keys(section: str) -> dict[str, Key]:
    keys = {k: spec for k, (spec, _) in _SCHEMA[section].items()}
    if section == "":
        keys.update({t: Key("a table", lambda v: isinstance(v, dict), f"[{t}]") for t in _SCHEMA if t})
    return keys


def _values(data: Mapping[str, Any], where: Where, base: Path) -> dict[str, Any]:
    """Checked values keyed by config field; paths resolved against ``base``, lists made tuples."""
    check_table(data, _table_keys(""), where, "", error=ExperimentError, guide=GUIDE)
    out: dict[str, Any] = {}
    for section, keys in _SCHEMA.items():
        table = data if section == "" else data.get(section, {})
        check_table(table, _table_keys(section), where, section, error=ExperimentError, guide=GUIDE)
        for key, (_, field) in keys.items():
            if key in table and (not isinstance(table[key], dict) or field == "bind"):
                out[field] = _converted(field, table[key], where.at(section, None, key), base)
    return out


def _converted(field: str, value: Any, where: str, base: Path) -> Any:
    if field == "bind":
        return tuple(sorted(value.items()))
    if field == "coverage_sets":
        return tuple(_converted("validation", t["data"], where, base) for t in value)
    if isinstance(value, list):
        return tuple(value)
    if field == "shapes":
        try:
            parse_shapes(value)
        except InputMismatchError as exc:
            raise ExperimentError(f"{where}: {exc}") from None
        return value
    if field == "metric":
        return _metric_spec(value, where, base)
    if field == "export_repository":
        return (base / value).resolve() if not Path(value).is_absolute() else Path(value)
    if field in _PATH_FIELDS:
        path = (base / value).resolve() if not Path(value).is_absolute() else Path(value)
        if not path.is_file():
            raise ExperimentError(f"{where}: names {value!r}, but there is no file {path}. Paths are relative "
                                  "to the experiment file's folder.")
        return path
    return value


def _metric_spec(value: str, where: str, base: Path) -> str:
    """``value`` with a metric file's path made absolute (checked to exist), as quantlab compare's --metric takes it."""
    module, _, function = value.rpartition(":")
    if not (module.endswith(".py") or "/" in module):
        return value  # an importable module
    path = Path(module) if Path(module).is_absolute() else (base / module).resolve()
    if not path.is_file():
        raise ExperimentError(f"{where}: names {module!r}, but there is no file {path}. Paths are relative to the "
                              "experiment file's folder.")
    return f"{path}:{function}"


def metric_file_sha256(spec: str) -> str | None:
    """The sha256 of a user metric's file (what the run's figures depend on); None for an importable module."""
    module = spec.rpartition(":")[0]
    path = Path(module)
    return sha256_file(path) if module.endswith(".py") and path.is_file() else None


def parse_experiment(text: str, *, source: Path | None = None, base: Path | None = None) -> ExperimentConfig:
    """Validate experiment TOML ``text``; every problem is an ExperimentError naming the key and line."""
    label = str(source) if source else "<experiment>"
    data, where = parse_toml(text, label, error=ExperimentError)
    base = base if base is not None else (source.parent if source else Path.cwd())
    values = _values(data, where, base)
    _check_model(values, where)
    _check_candidates(values, where)
    if "shapes" in values and values.get("backend", "ort") == "ort":
        raise ExperimentError(f"{where.at('model', None, 'shapes')}: engine shape ranges set TensorRT optimisation "
                              "profiles and ONNX Runtime runs any shape; drop 'shapes', or set backend = "
                              '"tensorrt-rtx" (or "tensorrt") at the top of the file.')
    exports = [k for k in values if k.startswith("export_")]
    if exports and "export_repository" not in values:
        raise ExperimentError(f"{where.at('export')}: give 'repository' (the Triton model repository folder) "
                              "for the [export] table.")
    if "threshold" in values:
        _check_threshold(values["threshold"], where.at("", None, "threshold"), user_metric="metric" in values,
                         ctc="ctc_blank" in values)
    if "coverage_gate" in values:
        _check_threshold(values["coverage_gate"], where.at("report", None, "coverage_gate"), coverage=True)
    name = values.pop("name", None) or (source.stem if source else "experiment")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
        raise ExperimentError(f"{where.at('', None, 'name')}: is {name!r}; use letters, digits, '_', '-', '.' "
                              "(it names the report folder).")
    return ExperimentConfig(name=name, source=source, **values)


def _check_model(values: Mapping[str, Any], where: Where) -> None:
    has_path, has_zoo = "model_path" in values, "zoo" in values
    if has_path == has_zoo:
        raise ExperimentError(f"{where.at('model')}: give exactly one of 'model.path' (an ONNX file) or "
                              "'model.zoo' (e.g. \"efficientnet_lite0\").")
    if has_zoo and values["zoo"] not in ZOO_MODELS:
        raise ExperimentError(f"{where.at('model', None, 'zoo')}: is {values['zoo']!r}; available: "
                              f"{', '.join(ZOO_MODELS)}.")
    for required in ("calibration", "validation"):
        if required not in values:
            raise ExperimentError(f"{where.at('data')}: missing key 'data.{required}' (the {required} set "
                                  "manifest, e.g. calib_sets/NAME.toml).")


def _check_candidates(values: dict[str, Any], where: Where) -> None:
    calibrators = values.get("calibrators", CALIBRATORS)
    int8 = values.setdefault("int8", calibrators)
    missing = [m for m in int8 if m not in calibrators]
    if missing:
        raise ExperimentError(f"{where.at('candidates', None, 'int8')}: asks for {', '.join(missing)}, which "
                              "'calibrate.methods' does not compute; add it there.")
    search_cal = values.get("search_calibrator", "best")
    if search_cal != "best" and search_cal not in calibrators:
        raise ExperimentError(f"{where.at('search', None, 'calibrator')}: is {show(search_cal)}; use \"best\" "
                              f"or one of {', '.join(calibrators)}.")


def _check_threshold(expr: str, where: str, coverage: bool = False, user_metric: bool = False,
                     ctc: bool = False) -> None:
    """Parse the threshold with the comparator's own language (quantlab.threshold); coverage gates name its metrics.
    A threshold must name a metric a comparison can report (for some model: ``top1_agreement`` needs a
    classifier, which only the run finds out), so a misspelt one fails here, before any work; with a user
    metric, whose names only its results tell, any name goes (as quantlab compare --metric)."""
    known = None if user_metric else _comparison_metrics(ctc)
    try:
        parse_gate(expr) if coverage else parse_threshold(expr, known_metrics=known)
    except ThresholdError as exc:
        raise ExperimentError(f"{where}: {exc}") from None


def _comparison_metrics(ctc: bool = False) -> set[str]:
    """Every end-to-end column a comparison may report; the CTC text's with ``ctc`` (``ctc_blank`` set)."""
    from ..compare.reported import reported_metrics

    return reported_metrics(ctc=ctc)


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment file (see the package docstring for its keys)."""
    text = read_toml_text(path, kind="experiment file", example="experiments/demo.toml", error=ExperimentError)
    return parse_experiment(text, source=Path(path).resolve())
