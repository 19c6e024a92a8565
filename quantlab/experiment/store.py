"""The experiment store: stage folders reused when their inputs hash the same, and the run manifest.

    reports/NAME/
    ├── manifest.json          status (running | failed | complete), settings, stages, verdict
    ├── stages/<stage>/        one folder per stage, written atomically, key.json last
    ├── search-log/<key>/      the search's resumable log (outside the stage's temporary folder)
    ├── results/ plots/        what the report is drawn from
    └── index.html             written last: a failed run never leaves a page that looks finished
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_dir, check_replaceable, json_dumps, write_json
from ..fingerprint import sha256_bytes, tool_versions
from .spec import ExperimentConfig

__all__ = ["StageRecord", "STAGE_KEY_FILE", "MANIFEST_FILE", "REPORT_FILES", "stage_key_hash", "run_stage", "data_key",
           "package_versions", "start_run", "fail_run"]

STAGE_KEY_FILE = "key.json"
MANIFEST_FILE = "manifest.json"
REPORT_FILES = ("index.html", MANIFEST_FILE, "results/*", "plots/*", "stages/*", "search-log/*")
"""What a run writes (and may remove or replace) in reports/NAME/; the manifest is written first."""


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


def stage_key_hash(key: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a stage's inputs."""
    return sha256_bytes(json_dumps(key).encode())


def run_stage(root: Path, name: str, key: Mapping[str, Any], produce: Callable[[Path], None], *,
              force: bool = False) -> StageRecord:
    """Reuse ``root/stages/name`` when its ``key.json`` equals ``key``, else rebuild it.

    ``produce(folder)`` writes the stage's files into a fresh temporary folder;
    ``key.json`` is written last and the folder is renamed into place only when
    ``produce`` returned (:func:`quantlab.atomic.atomic_dir`), so a stage folder
    with a key is always complete.
    """
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


def data_key(dataset: Any) -> dict[str, Any]:
    """What identifies a data set's samples without reading them: its manifest record plus,
    for sources on disk, every file's name, size and modification time."""
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


def package_versions() -> dict[str, str]:
    """Tool versions that results depend on (the platform string is left out: it names the host)."""
    return {k: v for k, v in tool_versions().items() if k != "platform"}


def start_run(report_dir: Path, config: ExperimentConfig, command: str, force: bool) -> None:
    """Remove what made the previous run look finished (page, results, plots); keep reusable stages.

    A folder holding files a run does not write, or not marked as a report by its manifest, is refused.
    """
    check_replaceable(report_dir, REPORT_FILES, label=f"report folder {report_dir}", writer="run",
                      marker=MANIFEST_FILE)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "index.html").unlink(missing_ok=True)
    for sub in ("results", "plots"):
        shutil.rmtree(report_dir / sub, ignore_errors=True)
    if force:
        for sub in ("stages", "search-log"):
            shutil.rmtree(report_dir / sub, ignore_errors=True)
    write_json(report_dir / MANIFEST_FILE, {"status": "running", "experiment": config.settings(),
                                            "command": command})


def fail_run(report_dir: Path, config: ExperimentConfig, command: str, exc: BaseException) -> None:
    if report_dir.is_dir():
        write_json(report_dir / MANIFEST_FILE, {
            "status": "failed", "experiment": config.settings(), "command": command,
            "error": f"{type(exc).__name__}: {exc}",
        })
