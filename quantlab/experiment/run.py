"""``run_experiment``: the stages in order, each reused when its inputs are unchanged."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..atomic import atomic_dir, write_json
from ..backends.coupling import batch_coupling
from ..compare.determinism import NOISE_OFF, unjudged_reason
from ..data import DataSet, fixed_batch, open_dataset
from ..graph import LoadedModel, load_model
from ..methods import DEFAULT_BATCH_SIZE, method_settings
from ..precision import INT8
from ..quantize import PreparedModel, WriteOptions, WrittenModel, beyond_fp16
from ..quantize.write_notes import FP32_FALLBACK_PHRASE
from ..report import Verdict, save_report_inputs, write_report
from ..table import CalibrationTable, read_table
from ..threshold import parse_threshold
from ..zoo import zoo_model_path
from .coverage import quantized_tensors, run_coverage
from .report_inputs import assemble_report_inputs
from .spec import ExperimentConfig
from .stages import (
    COMPARE_FRAMES,
    SEARCH_CANDIDATE,
    best_candidate,
    build_stage,
    candidate_table,
    calibrate_stage,
    compare_stage,
    engine_shapes_for,
    experiment_candidates,
    load_frames,
    load_written,
    measured_candidates,
    simulated_candidates,
    simulated_note,
    read_json,
    search_end_to_end,
    bias_correction_note,
    float_candidates,
    float_bodies_note,
    float_candidates_note,
    search_notes,
    rewrite_note,
    search_stage,
    stage_rewrites,
    verdict_for,
)
from .store import (
    MANIFEST_FILE,
    StageRecord,
    data_key,
    fail_run,
    package_versions,
    run_stage,
    stage_key_hash,
    start_run,
)

__all__ = ["ExperimentResult", "run_experiment"]


@dataclass(frozen=True)
class ExperimentResult:
    """Where the report is and what it says."""

    config: ExperimentConfig
    report_dir: Path
    index_html: Path
    verdict: Verdict | None
    stages: tuple[StageRecord, ...]
    messages: tuple[str, ...]
    seconds: float
    unjudged: str = ""  # why a threshold was set and no verdict given ("" with a verdict or without a threshold)


def _rewrite_key(config: ExperimentConfig) -> dict[str, Any]:
    """The float rewrites, for stage keys (nothing when off, so earlier stage folders stay reusable)."""
    if not config.equalize and config.smoothquant is None:
        return {}
    return {"rewrites": {"equalize": config.equalize, "smoothquant": config.smoothquant}}


def _write_key(config: ExperimentConfig) -> dict[str, Any]:
    """What else shapes a written model, for the build and search stage keys: the rewrites and INT8 bodies
    (nothing when off, so earlier stage folders stay reusable)."""
    return {**_rewrite_key(config), **({"int8_bodies": True} if config.int8_bodies else {})}


def run_experiment(config: ExperimentConfig, *, reports_dir: Path = Path("reports"), progress: bool = False,
                   force: bool = False, command: str = "") -> ExperimentResult:
    """Run every stage of ``config`` and write ``reports_dir/NAME/`` (see the package docstring).

    Stages whose inputs are unchanged are reused (``force`` redoes them all).
    On any error the report folder holds no ``index.html`` and its
    ``manifest.json`` says ``"status": "failed"`` with the error.
    """
    start = time.perf_counter()
    report_dir = Path(reports_dir) / config.name
    start_run(report_dir, config, command, force)
    try:
        return _Run(config, report_dir, progress, command).go(start)
    except BaseException as exc:
        fail_run(report_dir, config, command, exc)
        raise


@dataclass
class _Run:
    """One run's state as the stages fill it in."""

    config: ExperimentConfig
    report_dir: Path
    progress: bool
    command: str
    stages: list[StageRecord] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    common: dict[str, Any] = field(default_factory=dict)
    shapes: str | None = None  # the TensorRT engines' shape ranges (stages.engine_shapes_for)
    unjudged: str = ""  # why the threshold got no verdict
    judged_table: str | None = None  # the calibrator behind the verdict (the search's, or the verdict candidate's)

    def go(self, start: float) -> ExperimentResult:
        config = self.config
        model_path = config.model_path if config.model_path else zoo_model_path(config.zoo or "",
                                                                                progress=self.progress)
        model = load_model(model_path, bind=dict(config.bind))
        calib, val = open_dataset(config.calibration), open_dataset(config.validation)
        streams = next((s for s in (getattr(d, "sequence_streams", None) for d in (calib, val)) if s), None)
        if config.batch_size is None and streams is not None:  # interleaved streams: one sample of each per batch
            config = self.config = replace(config, batch_size=streams)
            self.messages.append(f"the data interleaves {streams} streams ([sequence] streams): batch size {streams}")
        fixed_size = fixed_batch(model, calib)
        fixed = fixed_size == 1
        if config.batch_size is None and fixed_size and fixed_size > 1:  # a static export at batch B: B per run
            config = self.config = replace(config, batch_size=fixed_size)
            self.messages.append(f"{model.label} fixes its batch at {fixed_size}: batch size {fixed_size}")
        coupled = batch_coupling(model, calib, 1 if fixed else int(config.batch_size or DEFAULT_BATCH_SIZE))
        if config.batch_size is None and fixed:  # a static export: one sample per run
            config = self.config = replace(config, batch_size=1)
            self.messages.append(f"{model.label} takes one sample per run (its batch fixed at 1, or no input with a "
                                 "sample axis): every stage runs one sample at a time")
        elif config.batch_size is None and coupled:
            config = self.config = replace(config, batch_size=1)
            self.messages.append(coupled.note(model.label, 1))
        elif coupled and (config.batch_size or 1) > 1:
            self.messages.append(coupled.note(model.label, int(config.batch_size or 1)))
        self.common = {"versions": package_versions(), "model_sha256": model.sha256}
        if config.batch_size is not None:  # absent by default: the stage keys of earlier runs stay valid
            self.common["batch_size"] = config.batch_size
        tables, cal_dir = self._calibrate(model, calib)
        rewrites = stage_rewrites(model, config, cal_dir) if config.equalize or config.smoothquant is not None else None
        if rewrites is not None:
            self.messages.append(rewrite_note(rewrites))
        written, build_keys = self._build(model, tables, rewrites)
        empty = float_candidates_note(model, written, config)
        if empty:
            self.messages.append(empty)
        elif bodies := float_bodies_note(model, config, written):
            self.messages.append(bodies)
        fallback = next((f"{name}: {note}" for name, w in written.items() for note in w.provenance.notes
                         if FP32_FALLBACK_PHRASE in note), None)
        if fallback:  # ddddocr's LSTM: 31 % of the weights FP32 under "PASS: int8-mse"
            self.messages.append(fallback)
        self.shapes = engine_shapes_for(config, model, next(iter(tables.values()), None), val)
        # with float rewrites the comparator's reference is the rewritten FP32 model (same outputs up to
        # rounding): the INT8 models' rescaled tensors exist only there
        reference = rewrites.model if rewrites is not None and rewrites.changed else model
        simulated = simulated_candidates(written, config)
        if simulated:
            self.messages.append(simulated_note(simulated))
        frames, cmp_dir = self._compare(
            reference, lambda: measured_candidates(model, written, tables, config, rewrites), build_keys, val, cal_dir,
            simulated)
        record = read_json(cmp_dir / "compare.json")
        self.messages += [w for w in record.get("warnings", []) if w not in self.messages]  # the batch note: said once
        noise = unjudged_reason(record.get("settings", {}).get("reference_noise") or {})
        verdict, search_dir = self._verdict_and_search(model, val, tables, written, frames["end_to_end"], calib,
                                                       rewrites, noise)
        coverage = None
        if config.coverage:
            rec, coverage, message = run_coverage(self.report_dir, reference, config, val, tables, cal_dir, self.common,
                                                  self.stages[0].key_sha256, self.progress,
                                                  quantized_tensors(written), judged=self.judged_table)
            self.stages.append(rec)
            self.messages.append(message)
        t0 = time.perf_counter()
        inputs = assemble_report_inputs(config, model, tables, cal_dir, frames, written, verdict, search_dir,
                                        self.stages, self.messages, self.command, reference=reference,
                                        cmp_dir=cmp_dir, unjudged=self.unjudged)
        inputs = replace(inputs, coverage=coverage)
        with atomic_dir(self.report_dir / "results") as tmp:
            save_report_inputs(tmp, inputs)
        index = write_report(self.report_dir, inputs)
        self.stages.append(StageRecord("report", self.report_dir, "", False, time.perf_counter() - t0))
        seconds = time.perf_counter() - start
        self._write_manifest(model_path, model, cal_dir, val, verdict, seconds)
        return ExperimentResult(config=config, report_dir=self.report_dir, index_html=index, verdict=verdict,
                                stages=tuple(self.stages), messages=tuple(self.messages), seconds=seconds,
                                unjudged=self.unjudged)

    def _calibrate(self, model: LoadedModel, calib: DataSet) -> tuple[dict[str, CalibrationTable], Path]:
        config = self.config
        # the methods' settings, not only their names: a changed default (e.g. entropy skipping zeros) redoes it
        key = {"stage": "calibrate", **self.common, "data": data_key(calib), "methods": list(config.calibrators),
               "percentile": config.percentile,
               "method_settings": {m: method_settings(m, percentile=config.percentile) for m in config.calibrators},
               **_rewrite_key(config)}
        self.stages.append(run_stage(self.report_dir, "calibrate", key,
                                     lambda f: calibrate_stage(f, model, calib, config, self.progress)))
        cal_dir = self.stages[-1].path
        return {m: read_table(cal_dir / f"table-{m}.json") for m in config.calibrators}, cal_dir

    def _build(self, model: LoadedModel, tables: dict[str, CalibrationTable], rewrites: PreparedModel | None,
               ) -> tuple[dict[str, WrittenModel], dict[str, str]]:
        written: dict[str, WrittenModel] = {}
        build_keys: dict[str, str] = {}
        for cand in experiment_candidates(self.config):
            key = {"stage": "build", **self.common, "candidate": cand.name, "precision": cand.precision,
                   "table": self.stages[0].key_sha256 if cand.method else None, "method": cand.method,
                   "target": self.config.target, **_write_key(self.config)}
            table = candidate_table(cand, tables)
            if not cand.method and table is not None:  # FP16 reads only what went beyond float16
                key["beyond_fp16"] = {t: f"{v:.3g}" for t, v in sorted(
                    beyond_fp16(table, WriteOptions().fp16_data_max).items())}
            rec = run_stage(self.report_dir, f"build-{cand.name}", key,
                            lambda f, c=cand, t=table: build_stage(f, model, c, t, self.config, rewrites))
            self.stages.append(rec)
            build_keys[cand.name] = rec.key_sha256
            written[cand.name] = load_written(rec.path, model)
        return written, build_keys

    def _compare(self, model: LoadedModel, written: Callable[[], dict[str, WrittenModel]],
                 build_keys: dict[str, str], val: DataSet, cal_dir: Path,
                 simulated: list[str]) -> tuple[dict[str, Any], Path]:
        """The compare stage on the models ``written()`` gives (made only when the stage is not reused)."""
        key = {"stage": "compare", **self.common, "candidates": build_keys, "data": data_key(val),
               "backend": self.config.backend, "seed": self.config.seed, **self._shapes_key(),
               **({"fp16_simulation": simulated} if simulated else {}), **self._metric_key()}
        rec = run_stage(self.report_dir, "compare", key,
                        lambda f: compare_stage(f, model, written(), val, self.config, self.progress, cal_dir,
                                                self.shapes))
        self.stages.append(rec)
        return load_frames(rec.path, COMPARE_FRAMES), rec.path

    def _verdict_and_search(self, model: LoadedModel, val: DataSet, tables: dict[str, CalibrationTable],
                            written: dict[str, WrittenModel], e2e: Any, calib: DataSet,
                            rewrites: PreparedModel | None, noise: str) -> tuple[Verdict | None, Path | None]:
        """The verdict of the best candidate; when every INT8 candidate misses the threshold, the search's. None
        (and why in ``self.unjudged``) when the threshold cannot be judged: ``noise`` says the reference is not
        deterministic, or no candidate computes in INT8 or FP16."""
        config = self.config
        if not config.threshold:
            return None, None
        if noise:  # every figure holds the reference's own noise: no verdict, and no search chasing it
            self.unjudged = f"{config.threshold!r} was not judged: {noise}; see the WARNING below. {NOISE_OFF}"
            return None, None
        floating = set(float_candidates(written, config))  # they compute in float32: not judged
        int8_names = [c.name for c in experiment_candidates(config) if c.precision == INT8 and c.name not in floating]
        verdicts = {n: verdict_for(e2e, n, config.threshold) for n in e2e["candidate"] if n not in floating}
        if not verdicts:
            self.unjudged = (f"no candidate computes in INT8 or FP16, so {config.threshold!r} was not checked (see "
                             "the WARNING below)")
            return None, None
        unjudged = parse_threshold(config.threshold).unjudged_note(e2e[e2e["candidate"].isin(list(verdicts))])
        self.messages.extend([unjudged] if unjudged else [])
        best = best_candidate(verdicts, int8_names or list(verdicts))
        self.judged_table = written[best].table_method if best in written else None
        if not (config.search and int8_names and not any(verdicts[n].passed for n in int8_names)):
            return verdicts[best], None
        method = self.judged_table = (config.search_calibrator if config.search_calibrator != "best"
                                      else written[best].table_method or config.calibrators[0])
        key = {"stage": "search", **self.common, "table": self.stages[0].key_sha256, "method": method,
               "data": data_key(val), "threshold": config.threshold, "budget": config.search_budget,
               "backend": config.backend, "target": config.target, "seed": config.seed,
               "bias_correction": config.search_bias_correction, **_write_key(config), **self._shapes_key(),
               **self._metric_key()}
        log_dir = self.report_dir / "search-log" / stage_key_hash(key)[:16]
        rec = run_stage(self.report_dir, "search", key,
                        lambda f: search_stage(f, model, val, tables[method], config, self.progress, log_dir,
                                               self.shapes, calib, rewrites))
        self.stages.append(rec)
        summary = read_json(rec.path / "search.json")
        self.messages.extend(search_notes(summary, self.config.int8_bodies))
        self.messages.append(bias_correction_note(summary.get("settings", {})))
        final = search_end_to_end(rec.path)
        verdict = verdict_for(final, SEARCH_CANDIDATE, config.threshold) if final is not None else verdicts[best]
        return verdict, rec.path

    def _metric_key(self) -> dict[str, Any]:
        """The user metric and its file's hash (absent without one: earlier stage keys stay valid)."""
        return {} if self.config.metric is None else {"metric": self.config.settings()["metric"]}

    def _shapes_key(self) -> dict[str, str]:
        """The engine shapes in a stage key (none on ONNX Runtime: the keys of earlier runs stay valid)."""
        return {"shapes": self.shapes} if self.shapes else {}

    def _write_manifest(self, model_path: Path, model: LoadedModel, cal_dir: Path, val: DataSet,
                        verdict: Verdict | None, seconds: float) -> None:
        config = self.config
        write_json(self.report_dir / MANIFEST_FILE, {
            "status": "complete", "experiment": config.settings(), "command": self.command,
            "experiment_file": str(config.source) if config.source else None,
            "model": {"path": str(model_path), "sha256": model.sha256},
            "calibration": {"manifest": str(config.calibration), "samples": read_json(cal_dir / "data_summary.json")},
            "validation": {"manifest": str(config.validation), "record": val.manifest_record()},
            "seed": config.seed, "versions": self.common["versions"],
            "stages": [s.as_dict() for s in self.stages], "seconds": round(seconds, 2),
            "verdict": None if verdict is None else {k: getattr(verdict, k) for k in verdict.__dataclass_fields__},
            "unjudged": self.unjudged or None,
            "messages": self.messages,
        })
