"""The sweep file: models × calibration methods × method settings × candidate precisions.

    name = "demo-sweep"
    seed = 0
    backend = "ort"
    threshold = "cosine>=0.995"         # optional: a verdict per cell
    target = "tensorrt"                 # Q/DQ form: tensorrt | ort
    # ctc_blank = 0                     # CTC outputs (OCR, speech): their blank class; cells add text_agreement, cer
    # decision_threshold = 0.3          # Sigmoid outputs (text maps, tags) read as masks p > it; cells add mask_iou

    [data]
    calibration = "../calib_sets/demo_calib.toml"
    validation = "../calib_sets/demo_val.toml"

    [[model]]
    zoo = "efficientnet_lite0"          # or: path = "model.onnx"; label = "lite0" names its cells

    [grid]
    methods = ["entropy", "minmax", "percentile"]
    percentile = [99.9, 99.99]          # one percentile cell per value
    fp16 = true                         # one FP16 cell per model
    search = false                      # run the sensitivity search in cells that miss the threshold

Paths are relative to the sweep file. Every problem is an ExperimentError naming
the file, line and key (:mod:`quantlab.schema`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..compare.options import DECISION_THRESHOLD
from ..errors import ExperimentError, ThresholdError
from ..experiment import CALIBRATORS, TARGETS
from ..methods import DEFAULT_PERCENTILE, METHOD_NAMES, percentile_error
from ..schema import (Key, Where, check_table, parse_toml, read_toml_text, is_int, is_num, is_probability,
                      non_empty_str, one_of)
from ..threshold import parse_threshold
from ..zoo import ZOO_MODELS

__all__ = ["SweepModel", "SweepSpec", "load_sweep", "parse_sweep"]

GUIDE = "the docstring of quantlab.sweep.spec, or experiments/sweep_demo.toml"
BACKENDS = ("ort", "tensorrt", "tensorrt-rtx")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


@dataclass(frozen=True)
class SweepModel:
    """One model of the grid: an ONNX file or a zoo name, and the label its cells are named by."""

    label: str
    path: Path | None = None
    zoo: str | None = None


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep file; defaults are defined here only."""

    name: str
    source: Path | None
    calibration: Path
    validation: Path
    models: tuple[SweepModel, ...]
    methods: tuple[str, ...] = CALIBRATORS
    percentiles: tuple[float, ...] = (DEFAULT_PERCENTILE,)
    fp16: bool = True
    search: bool = False
    seed: int = 0
    backend: str = "ort"
    threshold: str | None = None
    target: str = "tensorrt"
    ctc_blank: int | None = None
    decision_threshold: float = DECISION_THRESHOLD


def _methods(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(m in METHOD_NAMES for m in v) and len(set(v)) == len(v)


def _percentiles(v: Any) -> bool:
    return (isinstance(v, list) and bool(v) and all(is_num(p) and percentile_error(p) is None for p in v)
            and len(set(v)) == len(v))


_TOP = {
    "name": Key("a name (letters, digits, '_', '-', '.')", lambda v: isinstance(v, str) and bool(_NAME.fullmatch(v)),
                'name = "my_sweep"'),
    "seed": Key("an integer >= 0", lambda v: is_int(v) and v >= 0, "seed = 0"),
    "backend": Key(f"one of {', '.join(map(repr, BACKENDS))}", one_of(BACKENDS), 'backend = "ort"'),
    "threshold": Key("a threshold expression", non_empty_str, 'threshold = "cosine>=0.995"'),
    "target": Key(f"one of {', '.join(map(repr, TARGETS))}", one_of(TARGETS), 'target = "tensorrt"'),
    "ctc_blank": Key("the blank class index of CTC outputs, an integer >= 0", lambda v: is_int(v) and v >= 0,
                     "ctc_blank = 0"),
    "decision_threshold": Key("a probability in (0, 1): outputs a Sigmoid writes are read as the masks p > it",
                              is_probability, "decision_threshold = 0.3"),
    "data": Key("a table", lambda v: isinstance(v, dict), "[data]"),
    "model": Key("[[model]] tables", lambda v: isinstance(v, list) and bool(v) and all(isinstance(m, dict) for m in v),
                 '[[model]]\nzoo = "efficientnet_lite0"'),
    "grid": Key("a table", lambda v: isinstance(v, dict), "[grid]"),
}
_DATA = {
    "calibration": Key("a manifest path string", non_empty_str, 'calibration = "../calib_sets/demo_calib.toml"'),
    "validation": Key("a manifest path string", non_empty_str, 'validation = "../calib_sets/demo_val.toml"'),
}
_MODEL = {
    "path": Key("an ONNX file path string", non_empty_str, 'path = "model.onnx"'),
    "zoo": Key(f"one of {', '.join(map(repr, ZOO_MODELS))}", one_of(ZOO_MODELS), 'zoo = "efficientnet_lite0"'),
    "label": Key("a name (letters, digits, '_', '-', '.')", lambda v: isinstance(v, str) and bool(_NAME.fullmatch(v)),
                 'label = "lite0"'),
}
_GRID = {
    "methods": Key(f"a non-empty list of distinct methods from {', '.join(map(repr, METHOD_NAMES))}", _methods,
                   'methods = ["entropy", "minmax"]'),
    "percentile": Key("a non-empty list of distinct numbers in (0, 100]", _percentiles, "percentile = [99.9, 99.99]"),
    "fp16": Key("true or false", lambda v: isinstance(v, bool), "fp16 = true"),
    "search": Key("true or false", lambda v: isinstance(v, bool), "search = false"),
}


def _path(base: Path, value: str, where: str, *, must_exist: bool = True) -> Path:
    path = (base / value).resolve() if not Path(value).is_absolute() else Path(value)
    if must_exist and not path.is_file():
        raise ExperimentError(f"{where}: names {value!r}, but there is no file {path}. Paths are relative to "
                              "the sweep file's folder.")
    return path


def _models(tables: list[dict[str, Any]], where: Where, base: Path) -> tuple[SweepModel, ...]:
    out: list[SweepModel] = []
    for i, table in enumerate(tables):
        check_table(table, _MODEL, where, "model", i, error=ExperimentError, guide=GUIDE)
        if ("path" in table) == ("zoo" in table):
            raise ExperimentError(f"{where.at('model', i)}: give exactly one of 'path' or 'zoo'.")
        path = _path(base, table["path"], where.at("model", i, "path")) if "path" in table else None
        label = table.get("label") or (path.stem if path else table["zoo"])
        out.append(SweepModel(label=label, path=path, zoo=table.get("zoo")))
    labels = [m.label for m in out]
    if len(set(labels)) != len(labels):
        raise ExperimentError(f"{where.at('model')}: two models have the label "
                              f"{next(x for x in labels if labels.count(x) > 1)!r}; give each a distinct 'label'.")
    return tuple(out)


def parse_sweep(text: str, *, source: Path | None = None, base: Path | None = None) -> SweepSpec:
    """Validate sweep TOML ``text``; every problem is an ExperimentError naming the key and line."""
    label = str(source) if source else "<sweep>"
    data, where = parse_toml(text, label, error=ExperimentError)
    base = base if base is not None else (source.parent if source else Path.cwd())
    check_table(data, _TOP, where, "", error=ExperimentError, guide=GUIDE)
    for section, schema in (("data", _DATA), ("grid", _GRID)):
        check_table(data.get(section, {}), schema, where, section, error=ExperimentError, guide=GUIDE)
    if "model" not in data:
        raise ExperimentError(f"{label}: no [[model]] table; add one per model, e.g. [[model]] zoo = "
                              "\"efficientnet_lite0\".")
    paths = {}
    for key in ("calibration", "validation"):
        if key not in data.get("data", {}):
            raise ExperimentError(f"{where.at('data')}: missing key '{key}' (a data-set manifest).")
        paths[key] = _path(base, data["data"][key], where.at("data", None, key))
    if "threshold" in data:
        try:
            parse_threshold(data["threshold"])
        except ThresholdError as exc:
            raise ExperimentError(f"{where.at('', None, 'threshold')}: {exc}") from None
    grid = data.get("grid", {})
    top = ("seed", "backend", "threshold", "target", "ctc_blank", "decision_threshold")
    kwargs = {k: data[k] for k in top if k in data}
    kwargs.update({"methods": tuple(grid["methods"])} if "methods" in grid else {})
    kwargs.update({"percentiles": tuple(float(p) for p in grid["percentile"])} if "percentile" in grid else {})
    kwargs.update({k: grid[k] for k in ("fp16", "search") if k in grid})
    return SweepSpec(name=data.get("name") or (source.stem if source else "sweep"), source=source,
                     calibration=paths["calibration"], validation=paths["validation"],
                     models=_models(data["model"], where, base), **kwargs)


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file (see the module docstring for its keys)."""
    text = read_toml_text(path, kind="sweep file", example="experiments/sweep_demo.toml", error=ExperimentError)
    return parse_sweep(text, source=Path(path).resolve())
