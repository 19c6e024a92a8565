"""Experiments: one TOML file takes a model and two data sets to an HTML accuracy report.

    quantlab run experiments/NAME.toml

runs the stages below and writes ``reports/NAME/``::

    model ─► calibrate (one statistics pass, every calibrator) ─► build (FP16, INT8 per calibrator)
          ─► compare (FP32 reference vs candidates) ─► search (if the threshold is missed) ─► report

Each stage writes its output folder under ``reports/NAME/stages/`` through
:func:`quantlab.atomic.atomic_dir`, with ``key.json`` holding the hash of its
inputs (model, data, settings, upstream outputs, tool versions). A rerun whose
inputs hash the same reuses the folder; an interrupted run leaves only whole
stage folders, so it restarts cleanly from the first missing one. The
report's ``index.html`` is removed when a run starts and written last:
a failed run never leaves a page that looks finished.

The experiment file (paths are relative to the file itself)::

    name = "demo"                       # report folder name (default: file stem)
    seed = 0
    backend = "ort"                     # ort | tensorrt | tensorrt-rtx
    threshold = "cosine>=0.995"         # end-to-end gate; omit for no verdict

    [model]
    zoo = "efficientnet_lite0"          # or: path = "model.onnx"

    [data]
    calibration = "../calib_sets/demo_calib.toml"
    validation = "../calib_sets/demo_val.toml"

    [calibrate]
    methods = ["entropy", "minmax", "percentile"]
    percentile = 99.99

    [candidates]
    fp16 = true
    int8 = ["entropy", "minmax", "percentile"]    # one INT8 candidate per calibrator
    target = "tensorrt"                            # Q/DQ form: tensorrt | ort

    [search]
    enabled = true
    calibrator = "best"                 # ranges the search starts from: a method or "best"
    budget = 0                          # max full evaluations; 0 = the search's default bound

    [report]
    worst_tensors = 6                   # histograms drawn for this many tensors
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ExperimentError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ExperimentConfig",
    "load_experiment",
    "parse_experiment",
    "CALIBRATORS",
    "TARGETS",
]

CALIBRATORS = ("entropy", "minmax", "percentile")
TARGETS = ("tensorrt", "ort")
_BACKENDS = ("ort", "tensorrt", "tensorrt-rtx")


@dataclass(frozen=True)
class ExperimentConfig:
    """A validated experiment file. Paths are absolute; defaults are defined here only."""

    name: str
    source: Path | None
    calibration: Path
    validation: Path
    model_path: Path | None = None
    zoo: str | None = None
    seed: int = 0
    backend: str = "ort"
    threshold: str | None = None
    calibrators: tuple[str, ...] = CALIBRATORS
    percentile: float = 99.99
    fp16: bool = True
    int8: tuple[str, ...] = CALIBRATORS
    target: str = "tensorrt"
    search: bool = True
    search_calibrator: str = "best"
    search_budget: int = 0
    worst_tensors: int = 6

    def settings(self) -> dict[str, Any]:
        """Everything that shapes results, as plain data (recorded in the manifest)."""
        return {
            "name": self.name, "model": str(self.model_path) if self.model_path else None, "zoo": self.zoo,
            "calibration": str(self.calibration), "validation": str(self.validation), "seed": self.seed,
            "backend": self.backend, "threshold": self.threshold, "calibrators": list(self.calibrators),
            "percentile": self.percentile, "fp16": self.fp16, "int8": list(self.int8), "target": self.target,
            "search": self.search, "search_calibrator": self.search_calibrator,
            "search_budget": self.search_budget, "worst_tensors": self.worst_tensors,
        }


# --------------------------------------------------------------------------- schema and validation


@dataclass(frozen=True)
class _Key:
    """One allowed key: its type check, a description for errors, and the config field it fills."""

    kind: str  # "str", "int", "float", "bool", "list[str]", "path"
    field: str
    choices: tuple[str, ...] = ()


_SCHEMA: dict[str, Any] = {
    "name": _Key("str", "name"),
    "seed": _Key("int", "seed"),
    "backend": _Key("str", "backend", _BACKENDS),
    "threshold": _Key("str", "threshold"),
    "model": {"path": _Key("path", "model_path"), "zoo": _Key("str", "zoo")},
    "data": {"calibration": _Key("path", "calibration"), "validation": _Key("path", "validation")},
    "calibrate": {"methods": _Key("list[str]", "calibrators", CALIBRATORS),
                  "percentile": _Key("float", "percentile")},
    "candidates": {"fp16": _Key("bool", "fp16"), "int8": _Key("list[str]", "int8", CALIBRATORS),
                   "target": _Key("str", "target", TARGETS)},
    "search": {"enabled": _Key("bool", "search"), "calibrator": _Key("str", "search_calibrator"),
               "budget": _Key("int", "search_budget")},
    "report": {"worst_tensors": _Key("int", "worst_tensors")},
}


class _Locator:
    """Finds the line of a (dotted) key in the TOML text, for error messages.

    tomllib gives values without positions, so this scans the text: table
    headers ``[a]`` / ``[a.b]``, ``key =`` lines, dotted keys and inline tables.
    """

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def line(self, dotted: str) -> int | None:
        parts = dotted.split(".")
        table: list[str] = []
        header = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
        for number, raw in enumerate(self.lines, start=1):
            m = header.match(raw)
            if m:
                table = [p.strip().strip('"') for p in m.group(1).split(".")]
                if table == parts:
                    return number
                continue
            km = re.match(r"^\s*([A-Za-z0-9_\-\".]+)\s*=", raw)
            if not km:
                continue
            key = [p.strip().strip('"') for p in km.group(1).split(".")]
            full = table + key
            if full == parts:
                return number
            if full == parts[: len(full)] and "{" in raw:  # inline table holding the rest
                if re.search(rf"\b{re.escape(parts[-1])}\s*=", raw):
                    return number
        return None


def _where(source: Path | None, locator: _Locator, dotted: str) -> str:
    line = locator.line(dotted)
    label = str(source) if source else "<experiment>"
    return f"{label}:{line}" if line else label


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def _check_value(key: _Key, value: Any, dotted: str, where: str, base: Path) -> Any:
    """The value converted for the config, or an ExperimentError naming the key and line."""
    def fail(expected: str) -> ExperimentError:
        return ExperimentError(f"{where}: key '{dotted}' must be {expected}, not {_type_name(value)} "
                               f"({value!r}).")

    if key.kind == "bool":
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if key.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        if value < 0:
            raise ExperimentError(f"{where}: key '{dotted}' must be 0 or more, not {value}.")
        return value
    if key.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail("a finite number")
        return float(value)
    if key.kind in ("str", "path"):
        if not isinstance(value, str) or not value.strip():
            raise fail("a non-empty string")
        if key.choices and value not in key.choices:
            raise ExperimentError(f"{where}: key '{dotted}' is {value!r}; choose one of "
                                  f"{', '.join(repr(c) for c in key.choices)}.")
        if key.kind == "path":
            path = (base / value).resolve() if not Path(value).is_absolute() else Path(value)
            if not path.is_file():
                raise ExperimentError(f"{where}: key '{dotted}' names {value!r}, but there is no file "
                                      f"{path}. Paths are relative to the experiment file's folder.")
            return path
        return value
    if key.kind == "list[str]":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise fail("a non-empty list of strings")
        bad = [v for v in value if key.choices and v not in key.choices]
        if bad:
            raise ExperimentError(f"{where}: key '{dotted}' holds {', '.join(map(repr, bad))}; each entry "
                                  f"must be one of {', '.join(repr(c) for c in key.choices)}.")
        if len(set(value)) != len(value):
            raise ExperimentError(f"{where}: key '{dotted}' lists an entry twice: {value!r}.")
        return tuple(value)
    raise AssertionError(key.kind)  # pragma: no cover


def _walk(data: Mapping[str, Any], schema: Mapping[str, Any], prefix: str, source: Path | None,
          locator: _Locator, base: Path, out: dict[str, Any]) -> None:
    for k, value in data.items():
        dotted = f"{prefix}{k}"
        where = _where(source, locator, dotted)
        spec = schema.get(k)
        if spec is None:
            allowed = ", ".join(f"'{prefix}{a}'" for a in schema)
            raise ExperimentError(f"{where}: unknown key '{dotted}'. Allowed here: {allowed}.")
        if isinstance(spec, dict):
            if not isinstance(value, dict):
                raise ExperimentError(f"{where}: key '{dotted}' must be a table ([{dotted}]), "
                                      f"not {_type_name(value)}.")
            _walk(value, spec, dotted + ".", source, locator, base, out)
        else:
            out[spec.field] = _check_value(spec, value, dotted, where, base)


def parse_experiment(text: str, *, source: Path | None = None, base: Path | None = None) -> ExperimentConfig:
    """Validate experiment TOML ``text``; every problem is an ExperimentError naming the key and line."""
    label = str(source) if source else "<experiment>"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(f"{label}: not valid TOML: {exc}") from None
    base = base if base is not None else (source.parent if source else Path.cwd())
    locator = _Locator(text)
    values: dict[str, Any] = {}
    _walk(data, _SCHEMA, "", source, locator, base, values)
    has_path, has_zoo = "model_path" in values, "zoo" in values
    if has_path == has_zoo:
        raise ExperimentError(f"{_where(source, locator, 'model')}: give exactly one of 'model.path' (an ONNX "
                              "file) or 'model.zoo' (e.g. \"efficientnet_lite0\").")
    if has_zoo:
        from .zoo import ZOO_MODELS

        if values["zoo"] not in ZOO_MODELS:
            raise ExperimentError(f"{_where(source, locator, 'model.zoo')}: key 'model.zoo' is "
                                  f"{values['zoo']!r}; available: {', '.join(ZOO_MODELS)}.")
    for required in ("calibration", "validation"):
        if required not in values:
            raise ExperimentError(f"{_where(source, locator, 'data')}: missing key 'data.{required}' (the "
                                  f"{required} set manifest, e.g. calib_sets/NAME.toml).")
    calibrators = values.get("calibrators", CALIBRATORS)
    int8 = values.get("int8", calibrators)
    missing = [m for m in int8 if m not in calibrators]
    if missing:
        raise ExperimentError(f"{_where(source, locator, 'candidates.int8')}: key 'candidates.int8' asks for "
                              f"{', '.join(missing)}, which 'calibrate.methods' does not compute; add it there.")
    search_cal = values.get("search_calibrator", "best")
    if search_cal != "best" and search_cal not in calibrators:
        raise ExperimentError(f"{_where(source, locator, 'search.calibrator')}: key 'search.calibrator' is "
                              f"{search_cal!r}; use \"best\" or one of {', '.join(calibrators)}.")
    if "threshold" in values:
        _check_threshold(values["threshold"], _where(source, locator, "threshold"))
    if not 0 < values.get("percentile", 99.99) <= 100:
        raise ExperimentError(f"{_where(source, locator, 'calibrate.percentile')}: key 'calibrate.percentile' "
                              "must be in (0, 100].")
    name = values.pop("name", None) or (source.stem if source else "experiment")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
        raise ExperimentError(f"{_where(source, locator, 'name')}: key 'name' is {name!r}; use letters, digits, "
                              "'_', '-', '.' (it names the report folder).")
    values.setdefault("int8", int8)
    return ExperimentConfig(name=name, source=source, **values)


def _check_threshold(expr: str, where: str) -> None:
    """Parse the threshold with the comparator's own language (quantlab.threshold)."""
    from .errors import ThresholdError
    from .threshold import parse_threshold

    try:
        parse_threshold(expr)
    except ThresholdError as exc:
        raise ExperimentError(f"{where}: key 'threshold': {exc}") from None


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment file (see the module docstring for its keys)."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"{path}: no such experiment file. Give the path of a TOML file such as "
                              "experiments/demo.toml.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExperimentError(f"{path}: cannot read it ({exc}).") from None
    return parse_experiment(text, source=path.resolve())


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class StageRecord:
    """What one stage did: its folder, the hash of its inputs, reused or run, wall time (s)."""

    name: str
    path: Path
    key_sha256: str
    reused: bool
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "key_sha256": self.key_sha256,
                "reused": self.reused, "seconds": round(self.seconds, 3)}


STAGE_KEY_FILE = "key.json"


def stage_key_hash(key: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a stage's inputs."""
    from .atomic import json_dumps
    from .fingerprint import sha256_bytes

    return sha256_bytes(json_dumps(key).encode())


def run_stage(root: Path, name: str, key: Mapping[str, Any], produce: Any, *, force: bool = False) -> StageRecord:
    """Reuse ``root/stages/name`` when its ``key.json`` equals ``key``, else rebuild it.

    ``produce(folder: Path) -> None`` writes the stage's files into a fresh
    temporary folder; ``key.json`` is written last and the folder is renamed
    into place only when ``produce`` returned (:func:`quantlab.atomic.atomic_dir`),
    so a stage folder with a key is always complete.
    """
    import time

    from .atomic import atomic_dir, json_dumps

    folder = Path(root) / "stages" / name
    text = json_dumps(dict(key))
    digest = stage_key_hash(key)
    key_file = folder / STAGE_KEY_FILE
    if not force and key_file.is_file() and key_file.read_text(encoding="utf-8") == text:
        return StageRecord(name, folder, digest, True, 0.0)
    start = time.perf_counter()
    with atomic_dir(folder) as tmp:
        produce(tmp)
        (tmp / STAGE_KEY_FILE).write_text(text, encoding="utf-8")
    return StageRecord(name, folder, digest, False, time.perf_counter() - start)


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Candidate:
    """One model to compare against the FP32 reference: whole-model FP16 or INT8 with one calibrator's ranges."""

    name: str
    precision: str
    method: str | None = None

    @property
    def description(self) -> str:
        if self.precision == "fp16":
            return "every layer in FP16 (numerically risky ops kept in FP32)"
        return f"INT8 Q/DQ everywhere it is possible, activation ranges from the {self.method} calibrator"


def experiment_candidates(config: ExperimentConfig) -> tuple[Candidate, ...]:
    """FP16 (if asked) then one INT8 candidate per calibrator in ``candidates.int8``."""
    out = [Candidate("fp16", "fp16")] if config.fp16 else []
    out += [Candidate(f"int8-{m}", "int8", m) for m in config.int8]
    return tuple(out)


@dataclass(frozen=True)
class ExperimentResult:
    """Where the report is and what it says."""

    config: ExperimentConfig
    report_dir: Path
    index_html: Path
    verdict: Any
    stages: tuple[StageRecord, ...]
    messages: tuple[str, ...]
    seconds: float


MANIFEST_FILE = "manifest.json"


def data_key(dataset: Any) -> dict[str, Any]:
    """What identifies a data set's samples without reading them: its manifest record plus,
    for sources on disk, every file's name, size and modification time."""
    import os

    record = dict(dataset.manifest_record())
    files: list[list[Any]] = []
    manifest = getattr(dataset, "manifest", None)
    for source in getattr(manifest, "sources", ()):
        root = Path(source.root)
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        for p in paths:
            st = os.stat(p)
            files.append([str(p), st.st_size, st.st_mtime_ns])
    record["files"] = files
    return record


def _package_versions() -> dict[str, str]:
    from .fingerprint import tool_versions

    return {k: v for k, v in tool_versions().items() if k != "platform"}


def _start_run(report_dir: Path, config: ExperimentConfig, command: str, force: bool) -> None:
    """Remove what made the previous run look finished (page, results, plots); keep reusable stages."""
    import shutil

    from .atomic import write_json

    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "index.html").unlink(missing_ok=True)
    for sub in ("results", "plots"):
        shutil.rmtree(report_dir / sub, ignore_errors=True)
    if force:
        for sub in ("stages", "search-log"):
            shutil.rmtree(report_dir / sub, ignore_errors=True)
    write_json(report_dir / MANIFEST_FILE, {"status": "running", "experiment": config.settings(),
                                            "command": command})


def _fail_run(report_dir: Path, config: ExperimentConfig, command: str, exc: BaseException) -> None:
    from .atomic import write_json

    if report_dir.is_dir():
        write_json(report_dir / MANIFEST_FILE, {
            "status": "failed", "experiment": config.settings(), "command": command,
            "error": f"{type(exc).__name__}: {exc}",
        })


def _calibrate_stage(folder: Path, model: Any, dataset: Any, config: ExperimentConfig, progress: bool) -> None:
    from .atomic import write_json
    from .calibrate import calibrate
    from .stats import save_statistics
    from .table import write_table, write_trt_cache

    result = calibrate(model, dataset, config.calibrators, percentile=config.percentile, progress=progress)
    save_statistics(result.statistics, folder / "statistics.npz")
    for method, table in result.tables.items():
        write_table(table, folder / f"table-{method}.json")
        write_trt_cache(table, folder / f"table-{method}.cache")
    write_json(folder / "data_summary.json", result.data.as_dict())
    notes = sorted({n for t in result.tables.values() for n in t.notes})
    write_json(folder / "notes.json", notes)


def _build_stage(folder: Path, model: Any, candidate: Candidate, table: Any, config: ExperimentConfig) -> None:
    from .plan import uniform_plan
    from .quantize import WriteOptions, save_written, write_model

    written = write_model(model, uniform_plan(candidate.precision), table, WriteOptions(target=config.target))
    save_written(written, folder)


def load_written(folder: Path, model: Any) -> Any:
    """A :class:`quantlab.quantize.WrittenModel` back from a build stage folder."""
    import onnx

    from .plan import load_plan, resolve_plan
    from .quantize import WriteOptions, WrittenModel, load_provenance

    provenance = load_provenance(folder / "provenance.json")
    meta = provenance.meta
    opts = meta.get("options", {})
    options = WriteOptions(target=opts.get("target", "tensorrt"),
                           per_channel_weights=opts.get("per_channel_weights", True),
                           fp32_ops=tuple(opts.get("fp32_ops", WriteOptions().fp32_ops)))
    proto = onnx.load(str(folder / "model.onnx"))
    plan = resolve_plan(load_plan(folder / "plan.json"), model.proto)
    return WrittenModel(proto=proto, provenance=provenance, plan=plan, options=options,
                        table_method=meta.get("table_method"), source_sha256=model.sha256)


# --------------------------------------------------------------------------- from saved results to report inputs

HISTOGRAM_BINS_SHOWN = 120


def histogram_view(name: str, state: Any, tables: Mapping[str, Any]) -> Any:
    """A :class:`quantlab.report.HistogramView` of one tensor's |x| histogram and each table's amax.

    The statistics hold 16k fine bins over ``[0, R)``; the view re-bins them to
    :data:`HISTOGRAM_BINS_SHOWN` bins over ``[0, 1.05 * max(absmax, every amax)]``.
    """
    from .report import HistogramView

    amaxes = {m: float(t.ranges[name].amax) for m, t in tables.items() if name in t.ranges}
    top = max([state.absmax, *amaxes.values()]) * 1.05 or 1.0
    counts = state.rebin_to(HISTOGRAM_BINS_SHOWN, top)
    edges = [top * i / HISTOGRAM_BINS_SHOWN for i in range(HISTOGRAM_BINS_SHOWN + 1)]
    note_parts = []
    excluded = sum(state.excluded.values())
    if excluded:
        note_parts.append(f"{excluded} non-finite or huge values left out of the statistics")
    return HistogramView(
        tensor=name, edges=tuple(edges), counts=tuple(float(c) for c in counts),
        ranges={m: (-a, a) for m, a in amaxes.items()},
        clipped={m: float(tables[m].ranges[name].clipped_fraction) for m in amaxes},
        abs_values=True, note="; ".join(note_parts),
    )


def disagreeing_tensors(tables: Mapping[str, Any], n: int) -> list[str]:
    """Tensors whose calibrators disagree most (largest max/min amax ratio): where the choice matters."""
    import math as _math

    names = set.intersection(*(set(t.ranges) for t in tables.values())) if tables else set()
    scored = []
    for name in names:
        amaxes = [t.ranges[name].amax for t in tables.values()]
        lo, hi = min(amaxes), max(amaxes)
        if lo > 0:
            scored.append((_math.log(hi / lo), name))
    scored.sort(key=lambda x: (-x[0], x[1]))
    return [name for _, name in scored[:n]]


# --------------------------------------------------------------------------- comparator and search adapters
# The only places that know the comparator's and the search's result types: everything after
# them works on DataFrames saved in the stage folders.

_COMPARE_FRAMES = ("end_to_end", "per_layer", "per_sample")


def _load_frames(folder: Path, names: Sequence[str]) -> dict[str, Any]:
    import pandas as pd

    return {n: pd.read_parquet(folder / f"{n}.parquet") for n in names if (folder / f"{n}.parquet").is_file()}


def _compare_stage(folder: Path, model: Any, written: Mapping[str, Any], dataset: Any, config: ExperimentConfig,
                   progress: bool, cal_dir: Path) -> None:
    from .compare import CompareOptions, compare
    from .data import DataSummary

    options = CompareOptions(backend=config.backend, seed=config.seed)
    calibration = DataSummary.from_dict(_read_json(cal_dir / "data_summary.json"))  # for the overlap warning
    result = compare(model, dict(written), dataset, options, progress=progress, calibration=calibration)
    result.save(folder)


def verdict_for(end_to_end: Any, candidate: str, threshold: str) -> Any:
    """The :class:`quantlab.report.Verdict` of ``candidate``'s rows of the end-to-end table.

    ``passed`` is the whole threshold (every condition, every output); the
    figures shown are those of the condition with the smallest margin.
    """
    from .report import Verdict
    from .threshold import parse_threshold

    parsed = parse_threshold(threshold)
    rows = end_to_end[end_to_end["candidate"] == candidate]
    if rows.empty:
        raise ExperimentError(f"no end-to-end results for candidate {candidate!r}")
    check = parsed.check(rows)
    cond = min(parsed.conditions, key=lambda c: check.margins[str(c)])
    value = check.values[str(cond)]
    row = rows.iloc[0]
    lo = row.get(f"{cond.metric}_ci_low")
    hi = row.get(f"{cond.metric}_ci_high")
    return Verdict(threshold=threshold, candidate=candidate, metric=cond.metric, op=cond.op, target=cond.value,
                   value=value, passed=check.passed,
                   ci_low=None if lo is None or lo != lo else float(lo),
                   ci_high=None if hi is None or hi != hi else float(hi))


def _search_stage(folder: Path, model: Any, val: Any, table: Any, config: ExperimentConfig, progress: bool,
                  log_dir: Path) -> None:
    from .search import SearchOptions, search

    options = SearchOptions(threshold=config.threshold, backend=config.backend,
                            budget=config.search_budget or None, seed=config.seed, target=config.target)
    # the log lives outside the stage's temporary folder, so an interrupted search resumes from it
    result = search(model, table, val, options, workdir=log_dir, progress=progress)
    result.save(folder)


def run_experiment(config: ExperimentConfig, *, reports_dir: Path = Path("reports"), progress: bool = False,
                   force: bool = False, command: str = "") -> ExperimentResult:
    """Run every stage of ``config`` and write ``reports_dir/NAME/`` (see the module docstring).

    Stages whose inputs are unchanged are reused (``force`` redoes them all).
    On any error the report folder holds no ``index.html`` and its
    ``manifest.json`` says ``"status": "failed"`` with the error.
    """
    import time

    start = time.perf_counter()
    report_dir = Path(reports_dir) / config.name
    _start_run(report_dir, config, command, force)
    try:
        return _run(config, report_dir, progress, command, start)
    except BaseException as exc:
        _fail_run(report_dir, config, command, exc)
        raise


def _run(config: ExperimentConfig, report_dir: Path, progress: bool, command: str, start: float) -> ExperimentResult:
    import time

    from .calibrate import method_settings
    from .data import open_dataset
    from .graph import load_model
    from .table import read_table
    from .zoo import zoo_model_path

    messages: list[str] = []
    model_path = config.model_path if config.model_path else zoo_model_path(config.zoo or "", progress=progress)
    model = load_model(model_path)
    calib = open_dataset(config.calibration)
    val = open_dataset(config.validation)
    versions = _package_versions()
    common = {"versions": versions, "model_sha256": model.sha256}
    stages: list[StageRecord] = []

    # the methods' settings, not only their names: a changed default (e.g. entropy skipping zeros) redoes it
    cal_key = {"stage": "calibrate", **common, "data": data_key(calib), "methods": list(config.calibrators),
               "percentile": config.percentile,
               "method_settings": {m: method_settings(m, percentile=config.percentile) for m in config.calibrators}}
    stages.append(run_stage(report_dir, "calibrate", cal_key,
                            lambda f: _calibrate_stage(f, model, calib, config, progress)))
    cal_dir = stages[-1].path
    tables = {m: read_table(cal_dir / f"table-{m}.json") for m in config.calibrators}

    written: dict[str, Any] = {}
    build_keys: dict[str, str] = {}
    for cand in experiment_candidates(config):
        key = {"stage": "build", **common, "candidate": cand.name, "precision": cand.precision,
               "table": stages[0].key_sha256 if cand.method else None, "method": cand.method,
               "target": config.target}
        table = tables[cand.method] if cand.method else None
        rec = run_stage(report_dir, f"build-{cand.name}", key,
                        lambda f, c=cand, t=table: _build_stage(f, model, c, t, config))
        stages.append(rec)
        build_keys[cand.name] = rec.key_sha256
        written[cand.name] = load_written(rec.path, model)

    cmp_key = {"stage": "compare", **common, "candidates": build_keys, "data": data_key(val),
               "backend": config.backend, "seed": config.seed}
    rec = run_stage(report_dir, "compare", cmp_key,
                    lambda f: _compare_stage(f, model, written, val, config, progress, cal_dir))
    stages.append(rec)
    frames = _load_frames(rec.path, _COMPARE_FRAMES)
    e2e = frames["end_to_end"]

    cal_summary = _read_json(cal_dir / "data_summary.json")
    messages += list(_read_json(rec.path / "compare.json").get("warnings", []))

    search_dir: Path | None = None
    verdict = None
    int8_names = [c.name for c in experiment_candidates(config) if c.precision == "int8"]
    if config.threshold:
        verdicts = {n: verdict_for(e2e, n, config.threshold) for n in e2e["candidate"]}
        best = _best_candidate(verdicts, int8_names or list(verdicts))
        verdict = verdicts[best]
        needs_search = config.search and int8_names and not any(verdicts[n].passed for n in int8_names)
        if needs_search and _has_search():
            start_method = (config.search_calibrator if config.search_calibrator != "best"
                            else written[best].table_method or config.calibrators[0])
            key = {"stage": "search", **common, "table": stages[0].key_sha256, "method": start_method,
                   "data": data_key(val), "threshold": config.threshold, "budget": config.search_budget,
                   "backend": config.backend, "target": config.target, "seed": config.seed}
            rec = run_stage(report_dir, "search", key,
                            lambda f: _search_stage(f, model, val, tables[start_method], config, progress,
                                                         report_dir / "search-log" / stage_key_hash(key)[:16]))
            stages.append(rec)
            search_dir = rec.path
            final = _search_end_to_end(search_dir)
            if final is not None:
                verdict = verdict_for(final, SEARCH_CANDIDATE, config.threshold)
        elif needs_search:
            messages.append("the threshold is missed and the sensitivity search is not installed in this "
                            "quantlab (quantlab/search.py); no search ran")

    t0 = time.perf_counter()
    inputs = assemble_report_inputs(config, model, tables, cal_dir, frames, written, verdict, search_dir,
                                    stages, messages, command)
    from .atomic import atomic_dir, write_json
    from .report import save_report_inputs, write_report

    with atomic_dir(report_dir / "results") as tmp:
        save_report_inputs(tmp, inputs)
    index = write_report(report_dir, inputs)
    stages.append(StageRecord("report", report_dir, "", False, time.perf_counter() - t0))
    seconds = time.perf_counter() - start
    write_json(report_dir / MANIFEST_FILE, {
        "status": "complete", "experiment": config.settings(), "command": command,
        "experiment_file": str(config.source) if config.source else None,
        "model": {"path": str(model_path), "sha256": model.sha256},
        "calibration": {"manifest": str(config.calibration), "samples": cal_summary},
        "validation": {"manifest": str(config.validation), "record": val.manifest_record()},
        "seed": config.seed, "versions": versions,
        "stages": [s.as_dict() for s in stages], "seconds": round(seconds, 2),
        "verdict": None if verdict is None else {k: getattr(verdict, k) for k in verdict.__dataclass_fields__},
        "messages": messages,
    })
    return ExperimentResult(config=config, report_dir=report_dir, index_html=index, verdict=verdict,
                            stages=tuple(stages), messages=tuple(messages), seconds=seconds)


SEARCH_CANDIDATE = "mixed (search)"
"""The name the search's final plan goes by in the report (the search log names it by plan hash)."""


def _search_end_to_end(search_dir: Path) -> Any:
    """The final candidate's end-to-end rows, renamed :data:`SEARCH_CANDIDATE`, or None."""
    final = _load_frames(search_dir / "final_compare", ["end_to_end"]).get("end_to_end")
    if final is None or final.empty:
        return None
    return final.assign(candidate=SEARCH_CANDIDATE)


def _has_search() -> bool:
    import importlib.util

    return importlib.util.find_spec("quantlab.search") is not None


def _best_candidate(verdicts: Mapping[str, Any], names: Sequence[str]) -> str:
    """The candidate closest to (or furthest past) the threshold, in the threshold's direction."""
    def score(n: str) -> float:
        v = verdicts[n]
        return v.value if v.op in (">=", ">") else -v.value
    present = [n for n in names if n in verdicts] or list(verdicts)
    return max(present, key=score)


def _read_json(path: Path) -> Any:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def per_layer_for_report(per_layer: Any, metric: str = "sqnr_db") -> Any:
    """The comparator's per-layer table in the report's shape (:data:`quantlab.report.PER_LAYER_COLUMNS`).

    Accepts a long table (a ``mode`` column with ``accumulated`` / ``local``
    rows) or a wide one (``<metric>_accumulated`` and ``<metric>_local``
    columns); the layer is the node (or tensor) name, the order the
    topological index.
    """
    import pandas as pd

    df = per_layer.copy()
    layer_col = next((c for c in ("layer", "node", "group", "tensor") if c in df.columns), None)
    order_col = next((c for c in ("order", "topo_index", "index", "position") if c in df.columns), None)
    if layer_col is None or "candidate" not in df.columns:
        raise ExperimentError("the per-layer results have no layer/node and candidate columns")
    keys = ["candidate", layer_col]
    if "mode" in df.columns:
        wide = df.pivot_table(index=keys, columns="mode", values=metric, aggfunc="first").reset_index()
        firsts = df.drop_duplicates(keys).set_index(keys)
        out = wide.rename(columns={layer_col: "layer"})
        extra = firsts[[c for c in (order_col, "op_type", "tensor") if c and c in firsts.columns and c != layer_col]]
        out = out.merge(extra.reset_index().rename(columns={layer_col: "layer"}), on=["candidate", "layer"],
                        how="left")
    else:
        acc = f"{metric}_accumulated" if f"{metric}_accumulated" in df.columns else metric
        loc = f"{metric}_local"
        out = pd.DataFrame({
            "candidate": df["candidate"], "layer": df[layer_col],
            "accumulated": df[acc] if acc in df.columns else float("nan"),
            "local": df[loc] if loc in df.columns else float("nan"),
        })
        for c in (order_col, "op_type", "tensor"):
            if c and c in df.columns and c != layer_col:
                out[c] = df[c].to_numpy()
    if order_col and order_col in out.columns and order_col != "order":
        out = out.rename(columns={order_col: "order"})
    if "order" not in out.columns:
        out["order"] = out.groupby("candidate").cumcount()
    if "op_type" not in out.columns:
        out["op_type"] = ""
    for c in ("accumulated", "local"):
        if c not in out.columns:
            out[c] = float("nan")
    cols = ["candidate", "order", "layer", "op_type", "accumulated", "local"]
    rest = [c for c in out.columns if c not in cols]
    return out[cols + rest].sort_values(["candidate", "order"], kind="stable").reset_index(drop=True)


def _tensors_for_layers(layers: Sequence[str], written: Mapping[str, Any], known: set[str]) -> list[str]:
    """The activation tensors whose ranges feed ``layers`` (a layer's group inputs), in order, unique."""
    groups_by_node: dict[str, Any] = {}
    groups_by_output: dict[str, Any] = {}
    for w in written.values():
        for g in w.plan.groups:
            for n in g.nodes:
                groups_by_node.setdefault(n, g)
            for t in (g.output_tensor, *g.output_tensors):
                groups_by_output.setdefault(t, g)
        break
    out: list[str] = []
    for layer in layers:
        group = groups_by_node.get(layer) or groups_by_output.get(layer)
        names = list(group.input_tensors) if group is not None else [layer]
        for t in names:
            if t in known and t not in out:
                out.append(t)
    return out


def assemble_report_inputs(config: ExperimentConfig, model: Any, tables: Mapping[str, Any], cal_dir: Path,
                           frames: Mapping[str, Any], written: Mapping[str, Any], verdict: Any,
                           search_dir: Path | None, stages: Sequence[StageRecord], messages: Sequence[str],
                           command: str) -> Any:
    """Everything the report shows, from results already on disk (nothing is re-run)."""
    import pandas as pd

    from .report import WORST_LAYERS_SHOWN, ReportInputs, worst_layers
    from .stats import load_statistics

    e2e = frames["end_to_end"].copy()
    candidates = {c.name: c.description for c in experiment_candidates(config)}
    trajectory = sensitivity = plan = None
    if search_dir is not None:
        extra = _load_frames(search_dir, ["trajectory", "sensitivity"])
        trajectory, sensitivity = extra.get("trajectory"), extra.get("sensitivity")
        final = _search_end_to_end(search_dir)
        if final is not None:
            e2e = pd.concat([e2e, final], ignore_index=True)
            candidates[SEARCH_CANDIDATE] = "the sensitivity search's final mixed-precision plan"
        if (search_dir / "final" / "plan.json").is_file():
            plan = load_written(search_dir / "final", model).plan.to_frame()
            # the groups the search pinned first: they are what a reviewer checks
            plan = plan.sort_values("precision", key=lambda p: p != "int8", ascending=False, kind="stable")
    if plan is None and verdict is not None and verdict.candidate in written:
        plan = written[verdict.candidate].plan.to_frame()
    if plan is not None:
        plan = plan[[c for c in ("group", "anchor_op", "nodes", "precision", "reason") if c in plan.columns]]

    per_layer = None
    if frames.get("per_layer") is not None and not frames["per_layer"].empty:
        per_layer = per_layer_for_report(frames["per_layer"])
    stats = load_statistics(cal_dir / "statistics.npz")
    known = set(stats.tensors)
    wanted: list[str] = []
    if per_layer is not None:
        int8 = per_layer[per_layer["candidate"].astype(str).str.startswith("int8")]
        worst = worst_layers(int8 if not int8.empty else per_layer, True, WORST_LAYERS_SHOWN)
        wanted = _tensors_for_layers(list(worst["layer"]), written, known)
    for t in disagreeing_tensors(tables, config.worst_tensors):
        if t not in wanted:
            wanted.append(t)
    histograms = tuple(histogram_view(t, stats[t], tables) for t in wanted[: config.worst_tensors])

    cal_summary = _read_json(cal_dir / "data_summary.json")
    notes = sorted({n for t in tables.values() for n in t.notes}) + list(messages)
    model_info = {"name": Path(str(model.path)).name if model.path else model.label, "path": str(model.path),
                  "sha256": model.sha256, "opset": model.opset,
                  "inputs": [f"{s.name}: {s.dtype}{list(s.shape or ())}" for s in model.inputs],
                  "outputs": [f"{s.name}: {s.dtype}{list(s.shape or ())}" for s in model.outputs]}
    reproducibility = {
        "command": command, "experiment file": str(config.source) if config.source else None,
        "seed": config.seed, "settings": config.settings(),
        "calibration set": {"manifest": str(config.calibration), "samples": cal_summary.get("count"),
                            "content sha256": cal_summary.get("sha256")},
        "validation set": {"manifest": str(config.validation)},
        "stage keys": {s.name: s.key_sha256[:16] for s in stages if s.key_sha256},
    }
    return ReportInputs(
        title=config.name, model=model_info, end_to_end=e2e, per_layer=per_layer, verdict=verdict,
        candidates=candidates, layer_metric="sqnr_db", layer_metric_higher_is_better=True,
        histograms=histograms, sensitivity=sensitivity, trajectory=trajectory,
        trajectory_metric=verdict.metric if verdict is not None else "", plan=plan,
        environment=_package_versions(), reproducibility=reproducibility, notes=tuple(notes),
    )
