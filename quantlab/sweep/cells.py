"""Cells: one experiment each, named, keyed, run, and summarised as rows of the sweep table.

A cell is one model with one INT8 calibration (a method and its setting) or
the model's FP16 candidate. It runs as an ordinary experiment
(:func:`quantlab.experiment.run_experiment`) in ``reports/SWEEP/cells/CELL``, so
its own report, stage cache and manifest are those of any experiment. Its
record ``cells/CELL.cell.json`` holds the hash of everything the cell depends on: a cell whose
key is unchanged and whose run completed is not run again.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..compare.options import DECISION_THRESHOLD
from ..atomic import json_dumps, write_json
from ..errors import QuantlabError
from ..experiment import ExperimentConfig, data_key, run_experiment
from ..fingerprint import sha256_bytes, sha256_file
from ..experiment.store import package_versions
from .spec import SweepSpec

__all__ = ["CellSpec", "CellResult", "sweep_cells", "cell_config", "cell_key", "run_cell", "cached_result",
           "CELL_RECORD"]

CELL_RECORD = "{cell}.cell.json"
"""A cell's record, beside (not inside) its experiment's report folder, which holds only what a run writes."""


@dataclass(frozen=True)
class CellSpec:
    """One cell of the grid. ``method`` is None for the FP16 cell."""

    name: str
    model: str
    precision: str
    method: str | None = None
    percentile: float | None = None

    def setting(self) -> str:
        """The cell's setting as a short label for tables and plots."""
        if self.method is None:
            return "fp16"
        return f"{self.method} {self.percentile:g}" if self.percentile is not None else self.method


@dataclass(frozen=True)
class CellResult:
    """What a cell gave: ``status`` ok | reused | failed; ``rows`` its end-to-end table as records."""

    cell: CellSpec
    status: str
    seconds: float
    rows: tuple[dict[str, Any], ...] = ()
    verdict: dict[str, Any] | None = None
    error: str = ""
    attempts: int = 1
    report: str = field(default="", compare=False)


def sweep_cells(spec: SweepSpec) -> tuple[CellSpec, ...]:
    """Per model: the FP16 cell (if asked), then one INT8 cell per method (per percentile value)."""
    out: list[CellSpec] = []
    for model in spec.models:
        if spec.fp16:
            out.append(CellSpec(name=f"{model.label}--fp16", model=model.label, precision="fp16"))
        for method in spec.methods:
            if method == "percentile":
                out += [CellSpec(name=f"{model.label}--percentile-{p:g}", model=model.label, precision="int8",
                                 method=method, percentile=p) for p in spec.percentiles]
            else:
                out.append(CellSpec(name=f"{model.label}--{method}", model=model.label, precision="int8",
                                    method=method))
    return tuple(out)


def cell_config(spec: SweepSpec, cell: CellSpec, model_path: Path, calibration: Path,
                validation: Path) -> ExperimentConfig:
    """The cell as an experiment: one candidate; the FP16 cell calibrates with minmax for its histograms."""
    method = cell.method or "minmax"
    return ExperimentConfig(
        name=cell.name, source=spec.source, calibration=calibration, validation=validation, model_path=model_path,
        seed=spec.seed, backend=spec.backend, threshold=spec.threshold, calibrators=(method,),
        percentile=cell.percentile if cell.percentile is not None else ExperimentConfig.percentile,
        fp16=cell.precision == "fp16", int8=(method,) if cell.precision == "int8" else (), target=spec.target,
        search=spec.search and cell.precision == "int8", ctc_blank=spec.ctc_blank,
        decision_threshold=spec.decision_threshold,
    )


def cell_key(spec: SweepSpec, cell: CellSpec, model_path: Path, calib: Any, val: Any) -> str:
    """Hash of everything a cell's results depend on (model bytes, data, settings, tool versions)."""
    key = {"cell": asdict(cell), "model_sha256": sha256_file(model_path), "calibration": data_key(calib),
           "validation": data_key(val), "seed": spec.seed, "backend": spec.backend, "threshold": spec.threshold,
           "target": spec.target, "search": spec.search, "versions": package_versions()}
    if spec.ctc_blank is not None:  # absent when unset: the keys of earlier sweeps' cells stay valid
        key["ctc_blank"] = spec.ctc_blank
    if spec.decision_threshold != DECISION_THRESHOLD:  # absent when default, as above
        key["decision_threshold"] = spec.decision_threshold
    return sha256_bytes(json_dumps(key).encode())


def cached_result(cells_dir: Path, cell: CellSpec, key: str) -> CellResult | None:
    """The recorded result of a cell whose key is unchanged and whose run completed, else None."""
    record_path = cells_dir / CELL_RECORD.format(cell=cell.name)
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if record.get("key") != key or record.get("status") != "ok":
        return None
    return CellResult(cell=cell, status="reused", seconds=0.0, rows=tuple(record["rows"]),
                      verdict=record.get("verdict"), report=f"cells/{cell.name}/index.html")


def record_result(cells_dir: Path, result: CellResult, key: str) -> None:
    """Write the cell record (only a completed cell is reused later; a failed one keeps its error)."""
    write_json(cells_dir / CELL_RECORD.format(cell=result.cell.name), {
        "key": key, "status": "ok" if result.status in ("ok", "reused") else result.status,
        "cell": asdict(result.cell), "rows": list(result.rows), "verdict": result.verdict,
        "error": result.error, "seconds": round(result.seconds, 3), "attempts": result.attempts})


def _rows(report_dir: Path) -> tuple[tuple[dict[str, Any], ...], dict[str, Any] | None]:
    e2e = pd.read_parquet(report_dir / "results" / "end_to_end.parquet")
    manifest = json.loads((report_dir / "manifest.json").read_text(encoding="utf-8"))
    rows = tuple(json.loads(e2e.to_json(orient="records", double_precision=15)))
    return rows, manifest.get("verdict")


def run_cell(config: ExperimentConfig, cell: CellSpec, reports_dir: Path, *, attempts: int = 1) -> CellResult:
    """Run one cell's experiment; an error becomes a failed result (the sweep goes on), never an exception."""
    start = time.perf_counter()
    try:
        result = run_experiment(config, reports_dir=reports_dir, progress=False, command=f"quantlab sweep ({cell.name})")
        rows, verdict = _rows(result.report_dir)
        return CellResult(cell=cell, status="ok", seconds=time.perf_counter() - start, rows=rows, verdict=verdict,
                          attempts=attempts, report=f"cells/{cell.name}/index.html")
    except (QuantlabError, OSError, ValueError, RuntimeError) as exc:
        kind = type(exc).__name__
        detail = str(exc) if isinstance(exc, QuantlabError) else "".join(traceback.format_exception_only(exc)).strip()
        return CellResult(cell=cell, status="failed", seconds=time.perf_counter() - start,
                          error=f"{kind}: {detail}", attempts=attempts)


def sweep_table(results: Sequence[CellResult]) -> pd.DataFrame:
    """One row per cell and candidate output: the cell's settings, status and end-to-end figures."""
    rows = []
    for r in results:
        base = {"cell": r.cell.name, "model": r.cell.model, "precision": r.cell.precision,
                "method": r.cell.method or "", "percentile": r.cell.percentile, "setting": r.cell.setting(),
                "status": r.status, "error": r.error, "seconds": round(r.seconds, 2), "attempts": r.attempts,
                "passed": None if r.verdict is None else bool(r.verdict.get("passed")), "report": r.report}
        if not r.rows:
            rows.append(base)
        for row in r.rows:
            rows.append({**base, **{k: v for k, v in row.items() if k not in base}})
    return pd.DataFrame(rows)
