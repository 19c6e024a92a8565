"""What each stage writes into its folder, and how its results are read back.

These are the only functions that know the calibrator's, comparator's and
search's result types: everything after them works on tables saved in the
stage folders (Parquet, JSON), so a reused stage and a fresh one look alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from ..atomic import write_json
from ..calibrate import calibrate
from ..backends import is_onnxruntime
from ..compare import CompareOptions, compare, computes_in_float16, holds_float16, load_candidate
from ..data import DataSet, DataSummary
from ..errors import ExperimentError
from ..graph import LoadedModel
from ..plan import uniform_plan
from ..precision import FP16, INT8
from ..quantize import (PreparedModel, WriteOptions, WrittenModel, load_smoothquant, mark_table, prepare_model,
                        prepare_rewrites, save_smoothquant, save_written, write_model)
from ..report import Verdict
from ..search import SearchOptions, search
from ..shapes import engine_shapes, network_shapes, parse_shapes
from ..stats import save_statistics
from ..table import CalibrationTable, write_table
from ..trt_cache import write_trt_cache
from ..threshold import parse_threshold
from .spec import ExperimentConfig

__all__ = ["Candidate", "candidate_table", "experiment_candidates", "calibrate_stage", "build_stage", "compare_stage", "search_stage",
           "engine_shapes_for", "float_bodies_note", "float_candidates", "float_candidates_note",
           "measured_candidates", "search_notes", "simulated_candidates", "simulated_note", "stage_rewrites",
           "SMOOTHQUANT_FILE", "rewrite_note",
           "bias_correction_note", "load_written", "load_frames", "read_json", "verdict_for", "best_candidate",
           "search_end_to_end", "COMPARE_FRAMES", "SEARCH_CANDIDATE"]

COMPARE_FRAMES = ("end_to_end", "per_layer", "per_sample")
SEARCH_CANDIDATE = "mixed (search)"
"""The name the search's final plan goes by in the report (the search log names it by plan hash)."""


@dataclass(frozen=True)
class Candidate:
    """One model to compare against the FP32 reference: whole-model FP16 or INT8 with one calibrator's ranges."""

    name: str
    precision: str
    method: str | None = None

    @property
    def description(self) -> str:
        if self.precision == FP16:
            return "every layer in FP16 (numerically risky ops kept in FP32)"
        return f"INT8 Q/DQ everywhere it is possible, activation ranges from the {self.method} calibrator"


def experiment_candidates(config: ExperimentConfig) -> tuple[Candidate, ...]:
    """FP16 (if asked) then one INT8 candidate per calibrator in ``candidates.int8``."""
    out = [Candidate(FP16, FP16)] if config.fp16 else []
    out += [Candidate(f"{INT8}-{m}", INT8, m) for m in config.int8]
    return tuple(out)


SMOOTHQUANT_FILE = "smoothquant.json"


def calibrate_stage(folder: Path, model: LoadedModel, dataset: DataSet, config: ExperimentConfig,
                    progress: bool) -> None:
    """Calibrate the model as ``[calibrate] equalize`` / ``smoothquant`` rewrite it (the scales saved beside)."""
    batch = config.batch_size_option()
    prepared = prepare_rewrites(model, dataset, equalize=config.equalize,
                                smoothquant_alpha=None if config.smoothquant is None else float(config.smoothquant),
                                **batch)
    if prepared.smooth is not None:
        save_smoothquant(prepared.smooth, folder / SMOOTHQUANT_FILE)
    result = calibrate(prepared.model, dataset, config.calibrators, percentile=config.percentile, progress=progress,
                       **batch)
    save_statistics(result.statistics, folder / "statistics.npz")
    for method, table in result.tables.items():
        table = mark_table(table, prepared)
        write_table(table, folder / f"table-{method}.json")
        write_trt_cache(table, folder / f"table-{method}.cache")
    write_json(folder / "data_summary.json", result.data.as_dict())
    notes = sorted({n for t in result.tables.values() for n in t.notes})
    write_json(folder / "notes.json", notes)


def stage_rewrites(model: LoadedModel, config: ExperimentConfig, cal_dir: Path) -> PreparedModel:
    """The float rewrites the calibrate stage in ``cal_dir`` applied (redone: equalization is deterministic,
    SmoothQuant's scales are read back)."""
    from ..quantize import Equalization

    smooth = load_smoothquant(cal_dir / SMOOTHQUANT_FILE) if config.smoothquant is not None else None
    return prepare_model(model, WriteOptions(equalization=Equalization() if config.equalize else None,
                                             smoothquant=smooth))


def rewrite_note(rewrites: PreparedModel) -> str:
    """The report's line on the float rewrites every INT8 model of the run was calibrated and written after."""
    parts = []
    if rewrites.equalized is not None:
        parts.append(f"cross-layer equalization of {len(rewrites.equalized.pairs)} conv pair(s)")
    if rewrites.smooth is not None:
        parts.append(f"SmoothQuant (alpha {rewrites.smooth.alpha:g}) on {len(rewrites.smooth.activations)} "
                     "MatMul/Gemm input(s)")
    return ("float rewrites before calibration: " + (", ".join(parts) or "none applied")
            + f"; the INT8 models derive from the rewritten model (sha256 {rewrites.model.sha256[:12]})")


def bias_correction_note(settings: Mapping[str, Any]) -> str:
    """The report's line on the search's bias correction (from its saved settings)."""
    bc = settings.get("bias_correction")
    if isinstance(bc, Mapping):
        checked = (f"; all-INT8 SQNR on {bc['check_samples']} validation sample(s) (the outputs' noise summed, "
                   f"not the threshold's figure) {bc['int8_sqnr_db_with']:.2f} dB with it, "
                   f"{bc['int8_sqnr_db_without']:.2f} without" if "check_samples" in bc else "")
        return (f"search: bias correction on {bc.get('layers')} layer(s), measured on {bc.get('samples')} "
                f"calibration sample(s) (largest shift {float(bc.get('max_abs_shift', 0.0)):.3g}){checked}")
    return f"search: bias correction {bc if bc else 'off'}"


def search_notes(search: Mapping[str, Any], int8_bodies: bool = False) -> list[str]:
    """The report's line on what the search's final plan keeps in INT8 (search.json), with a warning when nothing:
    "PASS: mixed (search)" read like a mixed plan when every layer had gone to FP16; then the search's own
    warnings (a mostly-pinned end whose impacts do not add up). ``int8_bodies``: the search wrote calibrated
    Loop/Scan/If bodies in INT8 where it did not pin their group."""
    pinned = search.get("pinned") or {}
    groups = int(search.get("quantizable_groups") or 0)
    fraction = float(search.get("int8_fraction") or 0.0)
    line = (f"search: final plan pins {len(pinned)} of {groups} quantizable group(s) above INT8; INT8 on "
            f"{fraction:.0%} of them")
    if groups and fraction == 0.0 and int8_bodies:
        line += ("; the calibrated Loop/Scan/If bodies it did not pin stay INT8 ([candidates] int8_bodies; SLANet's "
                 "INT8 decoder body cost 33 points of sequence agreement)")
    elif groups and fraction == 0.0:
        fp32 = sum(1 for p in pinned.values() if str(p) == "fp32")
        what = ("so this plan is the FP16 model; compare the fp16 candidate" if not fp32 else
                f"{fp32} group(s) are FP32 and the rest FP16, so no INT8 speed-up is left (the fp16 candidate is "
                "not this plan: it computes those groups in float16 too)")
        line = ("WARNING " + line + f": no layer is INT8, {what}, or calibrate on more representative data if INT8 "
                "should fit")
    warned = [n for n in search.get("notes") or () if str(n).startswith(("WARNING", "sequence mode"))]
    return [line, *(f"search: {n}" for n in warned)]


def float_candidates(written: Mapping[str, WrittenModel], config: ExperimentConfig) -> list[str]:
    """The candidates that compute in float32 all the same: INT8 ones that quantize no activation (every layer
    inside If/Loop bodies left float: no ``int8_bodies``), FP16 ones that hold no float16 tensor."""
    out = []
    for c in experiment_candidates(config):
        w = written.get(c.name)
        if w is None:
            continue
        if c.precision == INT8 and not w.provenance.quantized_activations() and not int8_bodies({c.name: w}):
            out.append(c.name)
        elif c.precision == FP16 and not holds_float16(w.proto):
            out.append(c.name)
    return out


def float_candidates_note(model: LoadedModel, written: Mapping[str, WrittenModel], config: ExperimentConfig) -> str | None:
    """A warning naming the :func:`float_candidates`: their figures measure float32 (an optimum-style merged
    decoder, whose layers all sit inside an ``If`` on ``use_cache_branch``, passed at ``sqnr_db = inf`` without
    a word); None when there is none."""
    names = float_candidates(written, config)
    if not names:
        return None
    from ..controlflow import deciding_inputs

    deciding = deciding_inputs(model.proto)
    line = (f"WARNING {', '.join(names)}: no tensor got a Q/DQ or float16, so these candidates compute in float32, "
            "their figures say nothing about INT8 or FP16, and the verdict leaves them out")
    if deciding:
        which = "; ".join(f"{name!r} decides {', '.join(nodes)}" for name, nodes in deciding.items())
        line += (f". The layers sit inside control flow the data decides ({which}): bind each such input to the "
                 "value you deploy, `[model] bind = { NAME = VALUE }` (quantlab calibrate/build: --bind NAME=VALUE), "
                 "to inline that branch, one experiment per branch")
    return line


def float_bodies_note(model: LoadedModel, config: ExperimentConfig,
                      written: Mapping[str, WrittenModel] | None = None) -> str | None:
    """A note on the Conv/MatMul/Gemm layers inside If/Loop/Scan bodies that stay float in the INT8 candidates
    (``written``: those whose bodies hold Q/DQ in one of them are left out); a WARNING when they are at least half of
    the model's: a scripted RNN's Scan body held 4 of its 6 MatMuls (96 % of the MACs), and the run said "PASS:
    int8-entropy" of a model 4 % INT8. None without INT8 candidates."""
    from ..controlflow import compute_layers_in_bodies, compute_layers_outside

    if not any(c.precision == INT8 for c in experiment_candidates(config)):
        return None
    written_int8 = int8_bodies(written or {})
    done = (f"INT8 inside control flow ([candidates] int8_bodies): the bodies of "
            f"{', '.join(map(repr, sorted(written_int8)))}, their ranges calibrated as the data ran them") if written_int8 else ""
    inside = compute_layers_in_bodies(model.proto, skip=written_int8)
    if not inside:
        return done or None
    k, outside = sum(inside.values()), compute_layers_outside(model.proto)
    where = ", ".join(f"{name} ({n})" for name, n in inside.items())
    line = (f"{k} of {k + outside} Conv/MatMul/Gemm layers sit inside control-flow bodies that stay float in every "
            f"INT8 candidate: {where}; INT8 figures and speed cover the other {outside} only")
    if k >= outside:
        line = ("WARNING " + line + ". A Loop whose trip count the data cannot change is unrolled (and an If whose "
                "condition is an input you can bind is inlined, `[model] bind`); the body of a Loop, Scan or If of the "
                "main graph, which calibration runs as the data takes it, is written INT8 with `[candidates] "
                "int8_bodies = true` (`quantlab build --int8-bodies`); nested control flow stays float")
    return f"{line}; {done}" if done else line


def int8_bodies(written: Mapping[str, WrittenModel]) -> set[str]:
    """The main-graph nodes whose bodies hold a QuantizeLinear in some written model (quantlab.stats.bodies)."""
    from ..folding import subgraphs

    return {node.name for w in written.values() for node in w.proto.graph.node
            if any(n.op_type == "QuantizeLinear" for body in subgraphs(node) for n in body.node)}


def _write_options(config: ExperimentConfig, rewrites: PreparedModel | None) -> WriteOptions:
    return (rewrites.write_options(target=config.target, int8_bodies=config.int8_bodies) if rewrites is not None
            else WriteOptions(target=config.target, int8_bodies=config.int8_bodies))


def candidate_table(candidate: Candidate, tables: Mapping[str, CalibrationTable]) -> CalibrationTable | None:
    """The table a candidate is written with: its method's; an FP16 candidate gets the first one too, for the
    activations it saw beyond float16's range (``WriteOptions.fp16_data_max``: the observed extremes are the
    same in every method's table)."""
    if candidate.method:
        return tables[candidate.method]
    return next(iter(tables.values()), None)


def build_stage(folder: Path, model: LoadedModel, candidate: Candidate, table: CalibrationTable | None,
                config: ExperimentConfig, rewrites: PreparedModel | None = None) -> None:
    written = write_model(model, uniform_plan(candidate.precision), table, _write_options(config, rewrites))
    save_written(written, folder)


def simulated_candidates(written: Mapping[str, WrittenModel], config: ExperimentConfig) -> list[str]:
    """The candidates the compare stage measures in FP16 simulation (quantlab.quantize.WriteOptions): on ONNX
    Runtime, those computing in float16, whose activations ORT's CPU provider would compute in float32,
    overstating their accuracy (the search measures its candidates the same way)."""
    if not is_onnxruntime(config.backend):
        return []
    return [n for n, w in written.items() if computes_in_float16(w) and holds_float16(w.proto)]  # not all in If


def measured_candidates(model: LoadedModel, written: Mapping[str, WrittenModel],
                        tables: Mapping[str, CalibrationTable], config: ExperimentConfig,
                        rewrites: PreparedModel | None = None) -> dict[str, WrittenModel]:
    """The models the compare stage runs: the built ones, those of :func:`simulated_candidates` written again
    with FP16 simulation (the build folders keep the deployable, native float16 models)."""
    out = dict(written)
    simulated = set(simulated_candidates(written, config))
    for cand in experiment_candidates(config):
        if cand.name in simulated:
            options = replace(_write_options(config, rewrites), fp16_simulation=True)
            out[cand.name] = write_model(model, uniform_plan(cand.precision), candidate_table(cand, tables), options)
    return out


def simulated_note(names: Sequence[str]) -> str:
    """The report's note on the candidates measured in FP16 simulation."""
    return (f"{', '.join(names)}: measured with every float16 tensor rounded in float32 kernels (FP16 simulation), "
            "as ONNX Runtime's CPU provider computes float16 models mostly in float32, which would misstate their "
            "accuracy; the models to deploy are the build folders' (native float16)")


def load_written(folder: Path, model: LoadedModel) -> WrittenModel:
    """A :class:`quantlab.quantize.WrittenModel` back from a build stage folder (the comparator's loader)."""
    candidate = load_candidate(folder, model)
    if not isinstance(candidate, WrittenModel):
        raise ExperimentError(f"{folder}: holds no provenance.json, so it is not a build stage; re-run the "
                              "experiment with --force.")
    return candidate


def engine_shapes_for(config: ExperimentConfig, model: LoadedModel, table: CalibrationTable | None,
                      val: DataSet) -> str | None:
    """The engine shape ranges (``--shapes`` text) of the comparison's and the search's TensorRT engines:
    ``[model] shapes``, else those of the calibration shapes ``table`` recorded and of the validation batches
    with the batch axis up to the larger of the two stages' batch sizes; None on ONNX Runtime."""
    batch = config.batch_size or max(CompareOptions.batch_size, SearchOptions.batch_size)
    batches = val.batches(batch) if config.backend != "ort" and not config.shapes else None
    return engine_shapes(config.backend, config.shapes, table.calib_set if table is not None else None,
                         network_shapes(model.inputs), batches, batch=batch)


def _backend_options(shapes: str | None) -> dict[str, Any]:
    return {"shapes": parse_shapes(shapes)} if shapes else {}


def compare_stage(folder: Path, model: LoadedModel, written: Mapping[str, WrittenModel], dataset: DataSet,
                  config: ExperimentConfig, progress: bool, cal_dir: Path, shapes: str | None = None) -> None:
    options = CompareOptions(backend=config.backend, seed=config.seed, backend_options=_backend_options(shapes),
                             metric=config.metric, ctc_blank=config.ctc_blank,
                             decision_threshold=config.decision_threshold, class_maps=config.class_maps,
                             **config.batch_size_option())
    calibration = DataSummary.from_dict(read_json(cal_dir / "data_summary.json"))  # for the overlap warning
    result = compare(model, dict(written), dataset, options, progress=progress, calibration=calibration)
    result.save(folder)


def search_stage(folder: Path, model: LoadedModel, val: DataSet, table: CalibrationTable,
                 config: ExperimentConfig, progress: bool, log_dir: Path, shapes: str | None = None,
                 calib: DataSet | None = None, rewrites: PreparedModel | None = None) -> None:
    """The search, with bias correction measured on ``calib``. With float rewrites it searches the rewritten
    model (its FP32 outputs are the original's up to rounding; the search has no rewrite option yet)."""
    options = SearchOptions(threshold=config.threshold, backend=config.backend, metric=config.metric,
                            ctc_blank=config.ctc_blank, decision_threshold=config.decision_threshold,
                            class_maps=config.class_maps, budget=config.search_budget or None, seed=config.seed, target=config.target,
                            bias_correction=config.search_bias_correction, shapes=shapes,
                            int8_bodies=config.int8_bodies,
                            **config.batch_size_option())
    if rewrites is not None and rewrites.changed:
        model = rewrites.model
    # the log lives outside the stage's temporary folder, so an interrupted search resumes from it
    result = search(model, table, val, options, workdir=log_dir, progress=progress, calib=calib)
    result.save(folder)


def load_frames(folder: Path, names: Sequence[str]) -> dict[str, pd.DataFrame]:
    return {n: pd.read_parquet(folder / f"{n}.parquet") for n in names if (folder / f"{n}.parquet").is_file()}


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def verdict_for(end_to_end: pd.DataFrame, candidate: str, threshold: str) -> Verdict:
    """The :class:`quantlab.report.Verdict` of ``candidate``'s rows of the end-to-end table.

    ``passed`` is the whole threshold (every condition, every output); the
    figures shown are those of the condition with the smallest margin.
    """
    parsed = parse_threshold(threshold)
    rows = end_to_end[end_to_end["candidate"] == candidate]
    if rows.empty:
        raise ExperimentError(f"no end-to-end results for candidate {candidate!r}")
    check = parsed.check(rows)
    cond = min(parsed.conditions, key=lambda c: check.margins[str(c)])
    value = check.values[str(cond)]
    row = _row_of(rows, cond.metric, value)  # its interval is that output's (not the first output's)
    lo = row.get(f"{cond.metric}_ci_low")
    hi = row.get(f"{cond.metric}_ci_high")
    return Verdict(threshold=threshold, candidate=candidate, metric=cond.metric, op=cond.op, target=cond.value,
                   value=value, passed=check.passed,
                   ci_low=None if lo is None or lo != lo else float(lo),
                   ci_high=None if hi is None or hi != hi else float(hi))


def _row_of(rows: pd.DataFrame, metric: str, value: float) -> pd.Series:
    """The first of ``rows`` (one per output) whose ``metric`` is ``value`` (the worst output the threshold found);
    the first row when none is (a metric that is NaN everywhere)."""
    column = pd.to_numeric(rows[metric], errors="coerce") if metric in rows else None
    if column is not None:
        hits = column.index[column == value]
        if len(hits):
            return rows.loc[hits[0]]
    return rows.iloc[0]


def best_candidate(verdicts: Mapping[str, Verdict], names: Sequence[str]) -> str:
    """The candidate closest to (or furthest past) the threshold, in the threshold's direction."""
    def score(n: str) -> float:
        v = verdicts[n]
        return v.value if v.op in (">=", ">") else -v.value
    present = [n for n in names if n in verdicts] or list(verdicts)
    return max(present, key=score)


def search_end_to_end(search_dir: Path, frame: str = "end_to_end") -> pd.DataFrame | None:
    """The final candidate's end-to-end rows (or another of its comparison's frames: ``per_sample``), renamed
    :data:`SEARCH_CANDIDATE`, or None."""
    final = load_frames(search_dir / "final_compare", [frame]).get(frame)
    if final is None or final.empty:
        return None
    return final.assign(candidate=SEARCH_CANDIDATE)
