"""What an export starts from: a ``quantlab build`` folder, or an experiment's report folder.

    build folder                      report folder (quantlab run)
    ├── model.onnx                    ├── manifest.json      verdict, validation manifest
    ├── provenance.json               └── stages/
    ├── plan.json                         ├── search/final/  the search's plan, when it ran
    └── model.engine + engine.json        └── build-<candidate>/
        (TensorRT backends only)

A report folder exports the model its verdict is about (the search's final
plan when the search ran), unless ``candidate`` names another.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ExperimentError
from ..experiment import MANIFEST_FILE, SEARCH_CANDIDATE

__all__ = ["ExportSource", "resolve_source"]

MODEL_FILE = "model.onnx"
ENGINE_FILE = "model.engine"
ENGINE_INFO = "engine.json"
PROVENANCE_FILE = "provenance.json"


@dataclass(frozen=True)
class ExportSource:
    """A written model ready to export, with what it was built from.

    ``group_counts`` maps a precision ("int8", "fp16", "fp32") to its number of
    fusion groups; ``validation`` is the validation manifest of the experiment
    (None for a bare build folder); ``engine_info`` is the build's ``engine.json``.
    """

    folder: Path
    label: str
    group_counts: Mapping[str, int]
    validation: Path | None = None
    engine_info: Mapping[str, Any] | None = field(default=None, repr=False)

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def engine_path(self) -> Path | None:
        path = self.folder / ENGINE_FILE
        return path if path.is_file() and self.engine_info is not None else None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ExperimentError(f"{path}: not valid JSON ({exc}); {what}") from None


def _build_folder(folder: Path, label: str, validation: Path | None) -> ExportSource:
    if not (folder / MODEL_FILE).is_file() or not (folder / PROVENANCE_FILE).is_file():
        raise ExperimentError(f"{folder}: not a `quantlab build` folder (it needs {MODEL_FILE} and "
                              f"{PROVENANCE_FILE}); give a build folder or a `quantlab run` report folder.")
    provenance = _read_json(folder / PROVENANCE_FILE, "rebuild the model with `quantlab build`")
    counts = dict(provenance.get("meta", {}).get("group_counts", {}))
    info_path = folder / ENGINE_INFO
    info = _read_json(info_path, "rebuild the engine with `quantlab build --backend tensorrt`") \
        if info_path.is_file() else None
    return ExportSource(folder=folder, label=label, group_counts=counts, validation=validation, engine_info=info)


def _report_candidate_folder(report: Path, manifest: Mapping[str, Any], candidate: str | None) -> tuple[Path, str]:
    verdict = manifest.get("verdict") or {}
    chosen = candidate or verdict.get("candidate")
    if not chosen:
        stages = sorted(p.name[len("build-"):] for p in (report / "stages").glob("build-*"))
        raise ExperimentError(f"{report}: the experiment set no threshold, so there is no verdict to say which "
                              f"model to release; choose one with --candidate ({', '.join(stages)}).")
    # the run's own stages: an earlier run's folders stay on disk (reused when their inputs come back)
    on_disk = {p.name for p in (report / "stages").glob("*") if p.is_dir()}
    ran = ({str(s.get("name")) for s in manifest["stages"] if isinstance(s, Mapping)}
           if isinstance(manifest.get("stages"), list) else on_disk) & on_disk  # no list: a manifest by hand
    builds = sorted(name[len("build-"):] for name in ran if name.startswith("build-"))
    if chosen == SEARCH_CANDIDATE:
        if "search" not in ran:
            raise ExperimentError(f"{report}: this run made no search (no threshold, or a candidate passed it), so "
                                  "stages/search holds an earlier run's plan; choose one of this run's candidates "
                                  f"with --candidate ({', '.join(builds)}), or re-run with a threshold that "
                                  "searches.")
        return report / "stages" / "search" / "final", chosen
    folder = report / "stages" / f"build-{chosen}"
    if f"build-{chosen}" not in ran:
        raise ExperimentError(f"{report}: this run has no candidate {chosen!r}; candidates: {', '.join(builds)}"
                              + (f", {SEARCH_CANDIDATE!r}" if "search" in ran else ""))
    return folder, chosen


def resolve_source(path: str | Path, *, candidate: str | None = None) -> ExportSource:
    """The model to export from ``path`` (a build folder or a report folder); errors say which to give."""
    path = Path(path)
    if not path.is_dir():
        raise ExperimentError(f"{path}: no such folder; give a `quantlab build --out` folder or a "
                              "`quantlab run` report folder (reports/NAME).")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        if candidate:
            raise ExperimentError(f"{path}: --candidate applies to report folders; this is a build folder.")
        return _build_folder(path, f"build {path}", None)
    manifest = _read_json(manifest_path, "re-run the experiment with `quantlab run`")
    if manifest.get("status") != "complete":
        raise ExperimentError(f"{path}: the experiment did not finish (status {manifest.get('status')!r}); "
                              "re-run it with `quantlab run` before exporting.")
    folder, chosen = _report_candidate_folder(path, manifest, candidate)
    validation = manifest.get("validation", {}).get("manifest")
    return _build_folder(folder, f"report {path}, candidate {chosen}", Path(validation) if validation else None)
