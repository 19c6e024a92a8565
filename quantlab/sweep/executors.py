"""Where cells run: in this process, in a local process pool, or on Ray.

    local (default)            --processes N: a pool of N worker processes (spawned), each runs
                               whole cells in place under reports/SWEEP/cells/
    Ray (--ray auto | ADDRESS) each cell is a Ray task. The model file and the materialised data
                               sets go to Ray's object store once (ray.put) and every task reads
                               them from there; the task runs the cell in a scratch folder on its
                               node and returns its table rows and its report folder (a zip),
                               which the driver unpacks under reports/SWEEP/cells/.

Ray start-up, the attempt counter and the fault hook are shared with sharded comparisons
(:mod:`quantlab.compare.cluster`). Ray retries a task whose worker died (``max_retries``); every
attempt is counted by a small actor, so a retried cell says so in the sweep table.
A cell whose experiment fails keeps its error in the table; the sweep goes on.

Fault injection for tests: ``QUANTLAB_SWEEP_KILL_ONCE=CELL:MARKER`` makes the
first attempt of CELL kill its own worker process (SIGKILL) after creating the
file MARKER; the retry then runs normally.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import multiprocessing
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..compare.cluster import RAY_HINT, AttemptCounter, maybe_kill_once, ray_session
from ..data import DataSet
from ..errors import DataError
from ..experiment import ExperimentConfig
from .cells import CellResult, CellSpec, run_cell

__all__ = ["CellJob", "run_local", "run_on_ray", "materialise", "RAY_HINT"]

KILL_ONCE = "QUANTLAB_SWEEP_KILL_ONCE"


@dataclass(frozen=True)
class CellJob:
    """A cell and the experiment it runs (paths as the driver sees them)."""

    cell: CellSpec
    config: ExperimentConfig


def _run_job(job: CellJob, reports_dir: str) -> CellResult:
    return run_cell(job.config, job.cell, Path(reports_dir))


def run_local(jobs: Sequence[CellJob], reports_dir: Path, processes: int) -> Iterator[CellResult]:
    """Cells in this process (``processes`` 1) or a pool of spawned processes; results as they finish."""
    if processes <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _run_job(job, str(reports_dir))
        return
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=min(processes, len(jobs)), mp_context=context) as pool:
        futures = [pool.submit(_run_job, job, str(reports_dir)) for job in jobs]
        for future in cf.as_completed(futures):
            yield future.result()


# --------------------------------------------------------------------------- Ray


def materialise(dataset: DataSet) -> tuple[bytes, str | None]:
    """A data set as one batched ``.npz`` (inputs stacked on axis 0, labels in ``__label__``) and its label dtype.

    This is what crosses to other nodes: the samples exactly as the manifest
    produced them (preprocessing, augmentation and order applied).
    """
    samples = [dataset.sample(i) for i in range(len(dataset))]
    if not samples:
        raise DataError(f"data set {dataset.name!r} is empty; a sweep needs samples.")
    arrays = {name: np.stack([s.feeds[name] for s in samples]) for name in samples[0].feeds}
    label_dtype = dataset.label_dtype
    if label_dtype is not None:
        arrays["__label__"] = np.asarray([s.label for s in samples], dtype=None if label_dtype == "str" else label_dtype)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue(), label_dtype


def _manifest_text(name: str, role: str, label_dtype: str | None) -> str:
    text = f'name = "{name}"\nrole = "{role}"\nshuffle = false\n\n[[source]]\nkind = "npz"\npath = "{name}.npz"\n' \
           "batched = true\n"
    if label_dtype is not None:
        text += f'\n[labels]\ncolumn = "__label__"\ndtype = "{label_dtype}"\n'
    return text


def _ray_cell(job: CellJob, model: bytes, calib: tuple[bytes, str | None], val: tuple[bytes, str | None],
              counter: Any) -> tuple[CellResult, bytes]:
    """A Ray task: the cell in a scratch folder, from object-store bytes; (result, zipped report folder)."""
    import ray

    attempt = ray.get(counter.attempt.remote(job.cell.name))
    maybe_kill_once(KILL_ONCE, job.cell.name)
    with tempfile.TemporaryDirectory(prefix="quantlab-cell-") as tmp:
        folder = Path(tmp)
        (folder / "model.onnx").write_bytes(model)
        paths = {}
        for role, (data, label_dtype) in (("calibration", calib), ("validation", val)):
            (folder / f"{role}.npz").write_bytes(data)
            paths[role] = folder / f"{role}.toml"
            paths[role].write_text(_manifest_text(role, role, label_dtype), encoding="utf-8")
        config = _with_paths(job.config, folder / "model.onnx", paths["calibration"], paths["validation"])
        result = run_cell(config, job.cell, folder / "reports", attempts=attempt)
        return result, _zip_folder(folder / "reports" / job.cell.name)


def _with_paths(config: ExperimentConfig, model: Path, calibration: Path, validation: Path) -> ExperimentConfig:
    import dataclasses

    return dataclasses.replace(config, model_path=model, zoo=None, calibration=calibration, validation=validation)


def _zip_folder(folder: Path) -> bytes:
    buf = io.BytesIO()
    if folder.is_dir():
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    z.write(path, path.relative_to(folder).as_posix())
    return buf.getvalue()


def unzip_folder(data: bytes, folder: Path) -> None:
    """Unpack a cell's zipped report folder; member names that would leave ``folder`` are refused."""
    root = folder.resolve()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for member in z.namelist():
            target = (folder / member).resolve()
            if root not in target.parents:
                raise DataError(f"a cell's report archive names {member!r}, outside {folder}; refused.")
        z.extractall(folder)


def run_on_ray(jobs: Sequence[CellJob], address: str, model_paths: Mapping[str, Path],
               data: Mapping[str, DataSet], on_report: Callable[[CellResult, bytes], None],
               *, max_retries: int = 3, runtime_env: Mapping[str, Any] | None = None) -> Iterator[CellResult]:
    """Cells as Ray tasks on a local instance (``address`` "auto") or a cluster (``ray://host:port``)."""
    with ray_session(address, what="--ray", runtime_env=runtime_env) as ray:
        yield from _submit(ray, jobs, model_paths, data, on_report, max_retries)


def _submit(ray: Any, jobs: Sequence[CellJob], model_paths: Mapping[str, Path], data: Mapping[str, DataSet],
            on_report: Callable[[CellResult, bytes], None], max_retries: int) -> Iterator[CellResult]:
    counter = ray.remote(AttemptCounter).remote()
    models = {label: ray.put(path.read_bytes()) for label, path in model_paths.items()}  # once per model
    sets = {role: ray.put(materialise(ds)) for role, ds in data.items()}  # once per data set
    task = ray.remote(max_retries=max_retries, num_cpus=1)(_ray_cell)
    pending = {task.remote(job, models[job.cell.model], sets["calibration"], sets["validation"], counter): job
               for job in jobs}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(done[0])
        try:
            result, archive = ray.get(done[0])
        except Exception as exc:  # the task failed past its retries (e.g. killed every time)
            yield CellResult(cell=job.cell, status="failed", seconds=0.0,
                             error=f"Ray task failed after {max_retries} retries: {type(exc).__name__}: {exc}",
                             attempts=max_retries + 1)
            continue
        on_report(result, archive)
        yield result
