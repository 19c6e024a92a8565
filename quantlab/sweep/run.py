"""``run_sweep``: every cell of a sweep file, reusing unchanged cells, then the sweep table and report."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..atomic import check_replaceable, write_json
from ..data import open_dataset
from ..experiment.store import package_versions
from ..zoo import zoo_model_path
from .cells import CellResult, cached_result, cell_config, cell_key, record_result, sweep_cells, sweep_table
from .executors import CellJob, run_local, run_on_ray, unzip_folder
from .report import write_sweep_report
from .spec import SweepSpec

__all__ = ["SweepOptions", "SweepResult", "run_sweep", "SWEEP_FILES"]

SWEEP_FILES = ("sweep.json", "sweep.parquet", "sweep.csv", "index.html", "plots/*", "cells/*")
"""What a sweep writes into reports/NAME/ (the only files a later sweep may replace)."""


@dataclass(frozen=True)
class SweepOptions:
    """Where cells run: ``ray`` None (local), "auto" (a local Ray instance) or a cluster address."""

    processes: int = 1
    ray: str | None = None
    force: bool = False
    ray_max_retries: int = 3


@dataclass(frozen=True)
class SweepResult:
    report_dir: Path
    table: pd.DataFrame
    index_html: Path
    results: tuple[CellResult, ...]
    seconds: float

    @property
    def failed(self) -> tuple[CellResult, ...]:
        return tuple(r for r in self.results if r.status == "failed")


def run_sweep(spec: SweepSpec, options: SweepOptions = SweepOptions(), *, reports_dir: Path = Path("reports"),
              on_result: Callable[[CellResult], None] | None = None) -> SweepResult:
    """Run the sweep; ``on_result`` is called as each cell finishes (for progress)."""
    start = time.perf_counter()
    report_dir = Path(reports_dir) / spec.name
    cells_dir = report_dir / "cells"
    check_replaceable(report_dir, SWEEP_FILES, label=f"sweep report folder {report_dir}", writer="sweep",
                      marker="sweep.json")
    write_json(report_dir / "sweep.json", {"name": spec.name, "status": "running"})  # marks the folder as a sweep's
    cells_dir.mkdir(parents=True, exist_ok=True)
    model_paths = {m.label: m.path if m.path else zoo_model_path(m.zoo or "") for m in spec.models}
    calib, val = open_dataset(spec.calibration), open_dataset(spec.validation)
    results: list[CellResult] = []
    jobs: list[CellJob] = []
    keys: dict[str, str] = {}
    for cell in sweep_cells(spec):
        keys[cell.name] = cell_key(spec, cell, model_paths[cell.model], calib, val)
        cached = None if options.force else cached_result(cells_dir, cell, keys[cell.name])
        if cached is not None:
            results.append(cached)
            if on_result:
                on_result(cached)
            continue
        jobs.append(CellJob(cell, cell_config(spec, cell, model_paths[cell.model], spec.calibration, spec.validation)))

    def unpack(result: CellResult, archive: bytes) -> None:
        if archive:
            unzip_folder(archive, cells_dir / result.cell.name)

    finished = (run_local(jobs, cells_dir, options.processes) if options.ray is None else
                run_on_ray(jobs, options.ray, model_paths, {"calibration": calib, "validation": val}, unpack,
                           max_retries=options.ray_max_retries))
    for result in finished:
        record_result(cells_dir, result, keys[result.cell.name])
        results.append(result)
        if on_result:
            on_result(result)
    order = {c.name: i for i, c in enumerate(sweep_cells(spec))}
    results.sort(key=lambda r: order[r.cell.name])
    table = sweep_table(results)
    index = write_sweep_report(report_dir, spec, table)
    seconds = time.perf_counter() - start
    write_json(report_dir / "sweep.json", {
        "name": spec.name, "status": "complete", "source": str(spec.source) if spec.source else None,
        "cells": len(results),
        "failed": [r.cell.name for r in results if r.status == "failed"],
        "where": "local" if options.ray is None else f"ray {options.ray}", "processes": options.processes,
        "versions": package_versions(), "seconds": round(seconds, 2)})
    return SweepResult(report_dir=report_dir, table=table, index_html=index, results=tuple(results), seconds=seconds)
