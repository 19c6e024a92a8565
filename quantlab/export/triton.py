"""``export_triton``: a quantlab model as a Triton Inference Server model repository entry.

    REPOSITORY/NAME/
    ├── config.pbtxt            ModelConfig (quantlab.export.config)
    ├── quantlab_export.json    what quantlab wrote here: config hash, versions, sources
    ├── warmup/                 one validation sample, raw row-major bytes per input
    └── V/
        ├── model.onnx          --platform onnxruntime (ONNX Runtime + TensorRT execution provider)
        │   or model.plan       --platform tensorrt (the engine quantlab built) + engine.json
        └── export.json         source, hashes, settings and tool versions of this version

A repository that already holds NAME gains a new version; a version folder or
a config quantlab did not write (or that was edited since) is never replaced.
Each version folder is assembled beside its place and renamed into it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_dir, remove_empty_folders, write_bytes, write_json, write_text
from ..data import DataSet, open_dataset
from ..errors import ExperimentError
from ..fingerprint import sha256_bytes, sha256_file, tool_versions
from ..graph import TensorSpec, load_model
from .config import ModelIO, TritonOptions, model_config, precision_mode, precision_note
from .pbtxt import render
from .source import ExportSource

__all__ = ["ExportResult", "export_triton", "RECORD_FILE"]

RECORD_FILE = "quantlab_export.json"
VERSION_RECORD = "export.json"
VERSION_FILES = ("model.onnx", "model.plan", "engine.json", VERSION_RECORD)
"""What an export writes into a version folder: the only files a later export of that version may replace."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


@dataclass(frozen=True)
class ExportResult:
    """Where the export went and what it chose (batching, precision, warm-up)."""

    model_dir: Path
    version: int
    config_path: Path
    model_file: Path
    max_batch_size: int
    precision: str
    warmup_inputs: tuple[str, ...]
    notes: tuple[str, ...] = ()
    """What the deployed model does otherwise than measured (:func:`.config.precision_note`)."""


def _check_options(options: TritonOptions, io: ModelIO, source: ExportSource) -> int:
    """The max_batch_size to write; refuses settings that cannot work with this model."""
    if not _NAME.fullmatch(options.name):
        raise ExperimentError(f"--name {options.name!r}: use letters, digits, '_', '-', '.' (it names a folder).")
    if options.platform == "tensorrt" and source.engine_path is None:
        raise ExperimentError(f"{source.folder}: holds no TensorRT engine; build one with `quantlab build "
                              "--backend tensorrt` or export with --platform onnxruntime.")
    if options.platform == "tensorrt" and (source.engine_info or {}).get("backend", {}).get("name") == "tensorrt-rtx":
        raise ExperimentError(f"{source.engine_path}: was built by TensorRT-RTX, whose engines Triton's "
                              "tensorrt_plan backend cannot load; rebuild with --backend tensorrt, or export "
                              "with --platform onnxruntime.")
    if options.instances < 1:
        raise ExperimentError(f"--instances {options.instances}: must be 1 or more.")
    if options.max_batch_size is None:
        return options.default_max_batch_size if io.batch_is_dynamic else 0
    if options.max_batch_size > 0 and not io.batch_is_dynamic:
        raise ExperimentError(f"{source.model_path}: tensor {io.fixed_batch_tensor()!r} has no dynamic batch "
                              "axis 0, so Triton cannot batch this model; use --max-batch-size 0.")
    if options.max_batch_size < 0:
        raise ExperimentError(f"--max-batch-size {options.max_batch_size}: must be 0 or more.")
    return options.max_batch_size


def _next_version(model_dir: Path, record: Mapping[str, Any], asked: int | None) -> int:
    existing = sorted(int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit())
    if asked is None:
        return (existing[-1] + 1) if existing else 1
    if asked < 1:
        raise ExperimentError(f"--version {asked}: Triton versions are 1 or more.")
    folder = model_dir / str(asked)
    if folder.exists() and str(asked) not in record.get("versions", {}):
        raise ExperimentError(f"{folder}: exists and was not written by quantlab; choose another --version "
                              f"(the next free one is {(existing[-1] + 1) if existing else 1}).")
    return asked


def _record(model_dir: Path) -> dict[str, Any]:
    path = model_dir / RECORD_FILE
    if not path.is_file():
        if (model_dir / "config.pbtxt").exists():
            raise ExperimentError(f"{model_dir / 'config.pbtxt'}: was not written by quantlab; export under "
                                  "another --name or into another repository.")
        return {}
    record = json.loads(path.read_text(encoding="utf-8"))
    config = model_dir / "config.pbtxt"
    if config.is_file() and sha256_file(config) != record.get("config_sha256"):
        raise ExperimentError(f"{config}: was edited since quantlab wrote it; quantlab will not overwrite it. "
                              "Move your edits elsewhere, or export under another --name.")
    return record


def _warmup_files(data: DataSet, io: ModelIO, batched: bool) -> dict[str, tuple[TensorSpec, list[int], bytes]]:
    """Per model input: (spec, concrete dims, raw bytes) of the data set's first sample."""
    if len(data) == 0:
        raise ExperimentError(f"data set {data.name!r} is empty; it cannot give a warm-up sample.")
    feeds = data.sample(0).feeds
    out = {}
    for spec in io.inputs:
        if spec.name not in feeds:
            raise ExperimentError(f"data set {data.name!r} gives no input {spec.name!r}; warm-up needs every input.")
        array = np.ascontiguousarray(feeds[spec.name], dtype=np.dtype(spec.dtype))
        dims = list(array.shape)
        if not batched and spec.shape is not None and len(spec.shape) == array.ndim + 1:
            dims = [1, *dims]
        out[spec.name] = (spec, dims, array.tobytes(order="C"))
    return out


def _profiles(io: ModelIO, max_batch_size: int, recorded: Mapping[str, Any] | None = None,
              ) -> dict[str, tuple[str, str, str]]:
    """TensorRT EP profiles (min, opt, max shapes): the build's own (``engine.json`` ``profiles``), else
    batch 1 .. max_batch_size when the batch is the only dynamic dim."""
    if recorded:
        return {name: tuple("x".join(str(d) for d in shape) for shape in shapes)  # type: ignore[misc]
                for name, shapes in recorded.items()}
    if max_batch_size <= 0:
        return {}
    profiles = {}
    for spec in io.inputs:
        rest = list(spec.shape or ())[1:]
        if not all(isinstance(d, int) for d in rest):
            return {}
        dims = "x".join(str(d) for d in rest)
        profiles[spec.name] = tuple(f"{b}x{dims}" if dims else str(b) for b in (1, max_batch_size, max_batch_size))
    return profiles  # type: ignore[return-value]


def _engine_parameters(source: ExportSource) -> dict[str, str]:
    info = source.engine_info or {}
    backend = info.get("backend", {})
    return {"quantlab_engine_library": str(backend.get("library", "")),
            "quantlab_engine_version": str(backend.get("version", "")),
            "quantlab_engine_compute_capability": str(backend.get("details", {}).get("compute_capability", ""))}


def export_triton(source: ExportSource, repository: str | Path, options: TritonOptions, *,
                  data: str | Path | DataSet | None = None) -> ExportResult:
    """Write ``repository/NAME/{config.pbtxt, warmup/, V/}`` for ``source`` (see the module docstring).

    ``data`` (a manifest or data set) gives the warm-up sample; by default the
    experiment's validation set when the source is a report folder.
    """
    model = load_model(source.model_path)
    io = ModelIO(inputs=tuple(model.inputs), outputs=tuple(model.outputs))
    max_batch = _check_options(options, io, source)
    model_dir = Path(repository) / options.name
    record = _record(model_dir)
    version = _next_version(model_dir, record, options.version)
    data = data if data is not None else source.validation
    dataset = data if isinstance(data, DataSet) or data is None else open_dataset(data)
    warm = _warmup_files(dataset, io, max_batch > 0) if dataset is not None else {}
    precision = precision_mode(source.group_counts)
    parameters = {"quantlab_source": source.label, "quantlab_model_sha256": model.sha256,
                  "quantlab_precision_groups": ",".join(f"{k}={v}" for k, v in sorted(source.group_counts.items()))}
    if options.platform == "tensorrt":
        parameters.update(_engine_parameters(source))
    preferred = sorted({max(1, max_batch // 2), max_batch}) if max_batch > 0 else []
    names = {name: f"{i:02d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}" for i, name in enumerate(warm)}
    config = render(model_config(
        options, io, max_batch_size=max_batch, precision=precision, preferred_batch_sizes=preferred,
        profiles=(_profiles(io, max_batch, (source.engine_info or {}).get("profiles"))
                  if options.platform == "onnxruntime" else {}),
        warmup={n: (spec, dims, names[n]) for n, (spec, dims, _) in warm.items()},
        parameters=parameters))
    made = [d for d in (model_dir, *model_dir.parents) if not d.exists()]  # what a failure must not leave
    try:
        model_file = _write_version(model_dir, version, source, options, config)
        _write_warmup(model_dir, {names[n]: raw for n, (_, _, raw) in warm.items()}, record.get("warmup_files", []))
        config_path = write_text(model_dir / "config.pbtxt", config)
    except BaseException:
        if made:  # a failed first export leaves no empty folders behind
            remove_empty_folders(made[-1])
        raise
    versions = dict(record.get("versions", {}))
    versions[str(version)] = {"source": source.label, "model_sha256": sha256_file(model_file)}
    write_json(model_dir / RECORD_FILE, {"format": "quantlab.triton_export/1", "config_sha256": sha256_file(config_path),
                                         "versions": versions, "warmup_files": sorted(names.values())})
    return ExportResult(model_dir=model_dir, version=version, config_path=config_path, model_file=model_file,
                        max_batch_size=max_batch, precision=precision, warmup_inputs=tuple(warm),
                        notes=tuple(filter(None, [precision_note(source.group_counts, options.platform)])))


def _write_version(model_dir: Path, version: int, source: ExportSource, options: TritonOptions,
                   config: str) -> Path:
    target = model_dir / str(version)
    with atomic_dir(target, owned=VERSION_FILES) as tmp:
        if options.platform == "tensorrt":
            assert source.engine_path is not None
            filename = "model.plan"
            shutil.copyfile(source.engine_path, tmp / filename)
            write_json(tmp / "engine.json", source.engine_info)
        else:
            filename = "model.onnx"
            shutil.copyfile(source.model_path, tmp / filename)
        write_json(tmp / VERSION_RECORD, {
            "source": source.label, "source_folder": str(source.folder), "options": dataclasses.asdict(options),
            "model_sha256": sha256_bytes((tmp / filename).read_bytes()), "config_sha256": sha256_bytes(config.encode()),
            "versions": tool_versions(),
        })
    return target / filename


def _write_warmup(model_dir: Path, files: Mapping[str, bytes], previous: list[str]) -> None:
    """The warm-up files of this export; those an earlier export wrote go (and nothing else in warmup/)."""
    folder = model_dir / "warmup"
    for name in previous:
        if name not in files and "/" not in name:
            (folder / name).unlink(missing_ok=True)
    for name, raw in files.items():
        write_bytes(folder / name, raw)
