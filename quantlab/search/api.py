"""The entry point: :func:`search` a model for the plan with the most INT8 that meets a threshold.

It resolves the all-INT8 plan, opens the search log (``workdir``), runs the search
(:func:`quantlab.search.run.run_search`) on the real evaluator
(:class:`~quantlab.search.evaluator.CompareEvaluator`) and writes the final, deployable model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..compare import CompareResult, load_comparison
from ..compare.copied import copied_prefixes
from ..compare.determinism import NOISE_OFF, differing_outputs, drawn_ops, reference_noise
from ..compare.free_running import free_running, free_running_note
from ..compare.shards import truncated_batches
from ..compare.probabilities import probability_outputs
from ..data import DataSet, DataSummary, beyond_calibration, check_inputs, summarize
from ..errors import SearchError
from ..fingerprint import sha256_bytes, tool_versions
from ..graph import LoadedModel
from ..graph.topology import random_nodes
from ..plan import ResolvedPlan, resolve_plan, uniform_plan
from ..quantize import BiasCorrection, measure_bias_correction
from ..sequence import SequenceData, with_carry
from ..table import CalibrationTable, table_to_dict
from ..threshold import parse_threshold
from ..version import __version__
from .evaluation import Evaluation
from .evaluator import CompareEvaluator, exact_backend, write_options
from .ledger import StepEvent, is_nan
from .log import SearchLog, log_line, normalise
from .options import SearchOptions
from .ranking import output_sqnr
from .result import SearchResult
from .run import run_search


def search_settings(model: LoadedModel, table: CalibrationTable, dataset: DataSet, options: SearchOptions,
                    *, data_sha256: str | None = None) -> dict[str, Any]:
    """What a search's evaluations depend on: a resumed search must match every key."""
    opts = options.as_dict()
    for k in ("budget", "time_budget_s", "threshold"):  # a rerun may extend the budgets
        opts.pop(k, None)
    versions = tool_versions()
    versions.pop("platform", None)
    return {
        "quantlab": __version__,
        "threshold": options.threshold,
        "options": opts,
        "model_sha256": model.sha256,
        "table_sha256": sha256_bytes(log_line(table_to_dict(table)).encode()),
        "table_method": table.method,
        # since issue 13 every evaluation on ONNX Runtime runs Q/DQ as written (CompareEvaluator): logs of
        # searches that ran ORT's fused kernels lack this key and are refused instead of replayed
        "evaluation": "qdq-as-written",
        "data": {"count": len(dataset), "sha256": data_sha256, "record": normalise(dataset.manifest_record())},
        "versions": versions,
    }


def search(
    model: LoadedModel,
    table: CalibrationTable,
    dataset: DataSet,
    options: SearchOptions,
    *,
    workdir: str | Path | None = None,
    progress: bool = False,
    on_step: Callable[[StepEvent], None] | None = None,
    calib: DataSet | None = None,
    calibration_summary: DataSummary | None = None,
) -> SearchResult:
    """Find the plan with the most INT8 that meets ``options.threshold`` (see the module docstring).

    ``workdir``: where the search log lives; a rerun with the same workdir resumes.
    ``on_step``: called after every step with a :class:`StepEvent` (the CLI prints it).
    ``calib``: the calibration set, for ``options.bias_correction`` (measured once, applied to
    every plan's INT8 layers). ``calibration_summary``: what the table was calibrated on (``CalibrationResult.data``,
    or the ``data_summary.json`` beside a table), for notes on validation sizes and values it did not cover.
    Raises SearchError for unusable options or a log written with other settings.
    """
    start = time.perf_counter()
    options.check()
    parse_threshold(options.threshold)
    dataset = with_carry(dataset, model, streams=options.batch_size)
    check_inputs(dataset, model)
    _refuse_random_reference(model, dataset, options)
    base = resolve_plan(uniform_plan("int8"), model.proto)
    correction = None
    correction_check: dict[str, Any] = {}
    if options.bias_correction and calib is not None:
        correction = measure_bias_correction(model, table, with_carry(calib, model, streams=options.batch_size),
                                             write_options(options),
                                             batch_size=options.batch_size)
        if correction.layers:
            correction, correction_check = _correction_if_it_helps(model, table, dataset, options, correction, base)
        else:  # no layer it can correct (tf2onnx's MatMul -> Reshape -> Add): two full validations of one plan
            correction, correction_check = None, {"why": "no INT8 layer with a bias it can correct"}
    log = None
    data_sha = None
    summary = summarize(dataset, options.batch_size) if workdir is not None or calibration_summary is not None \
        else None
    if workdir is not None:
        data_sha = summary.sha256
        settings = search_settings(model, table, dataset, options, data_sha256=data_sha)
    else:
        settings = search_settings(model, table, dataset, options)
    settings["bias_correction"] = (
        {**correction.describe(), **correction_check} if correction is not None
        else f"measured, not applied: {correction_check['why']}" if correction_check
        else "not applied: no calibration set given" if options.bias_correction else None)
    if workdir is not None:
        log = SearchLog(workdir, settings)
    evaluator = CompareEvaluator(model, table, dataset, options, correction)
    outcome = run_search(base, evaluator, options, log=log, on_step=on_step, progress=progress)
    comparison = outcome.evaluation.comparison
    if comparison is None and log is not None:
        comparison = _load_logged_comparison(log, outcome.evaluation)
    if comparison is None:  # the log lost it: measure the final plan again rather than return nothing
        comparison = evaluator.evaluate(outcome.plan, evaluator.size).comparison
    final = evaluator.write(outcome.plan, deploy=True)
    notes = (outcome.notes + _free_running_notes(model, evaluator, outcome.plan, comparison, dataset, options)
             + shape_mismatch_notes(comparison, options.threshold)
             + tuple(f"final comparison: {w}" for w in comparison.warnings)  # a dead output passed at 103 dB
             + _beyond_calibration_notes(summary, calibration_summary))
    return SearchResult(
        met=outcome.met, plan=outcome.plan, final=final, comparison=comparison, trajectory=outcome.trajectory,
        sensitivity=outcome.sensitivity, evaluations=outcome.evaluations, bound=outcome.bound,
        message=outcome.message, settings={**settings, "workdir": None if workdir is None else str(workdir),
                                           "budget": outcome.budget, "time_budget_s": options.time_budget_s,
                                           "fp16_simulation": options.simulate_fp16,
                                           "probe_samples_used": min(options.probe_samples,
                                                                     max(1, len(dataset) // 2))},
        notes=notes, budget=outcome.budget, executed=outcome.executed,
        seconds=time.perf_counter() - start, correction=correction,
    )


def _beyond_calibration_notes(validation: DataSummary | None, calibration: DataSummary | None) -> tuple[str, ...]:
    """The validation inputs that go where calibration did not (sizes, values): compare --calib and run said so,
    search did not (YOLOS calibrated at 64-80 px and searched at 96). Not WARNINGs: `quantlab run`, which forwards
    those, says it from its comparison already."""
    if validation is None or calibration is None:
        return ()
    return tuple(f"beyond calibration: {w}" for w in beyond_calibration(validation, calibration))


def shape_mismatch_notes(comparison: CompareResult, threshold: str) -> tuple[str, ...]:
    """A WARNING per output of the final comparison that had another shape than the FP32 model's on some samples
    (``shape_mismatch``): its figures leave those samples out, so a plan that changes more of them (an INT8 NMS
    keeping a box more) was not judged worse. None when the threshold names ``shape_mismatch`` itself."""
    e2e = comparison.end_to_end
    if "shape_mismatch" not in e2e.columns or "shape_mismatch" in parse_threshold(threshold).metrics:
        return ()
    return tuple(
        f"WARNING output {r.output!r} of the final plan had another shape than the FP32 model's on "
        f"{int(r.shape_mismatch)} of {int(r.samples)} validation sample(s) (a data-sized output: the boxes NMS "
        f"keeps, the steps a loop takes): {threshold!r} was judged without them, so a plan changing more of them "
        f"did not look worse; add 'and shape_mismatch<=0' to the threshold to require FP32's shapes"
        for r in e2e[e2e["shape_mismatch"] > 0].itertuples())


def _refuse_random_reference(model: LoadedModel, dataset: DataSet, options: SearchOptions) -> None:
    """Raise SearchError when the FP32 reference draws other random numbers on a second run of the first batch:
    every plan's figures would hold that noise (a ranking subset draws what the reference drew for other
    samples), and the search would pin layers chasing it, or meet the threshold by luck."""
    if not random_nodes(model.proto):  # most models: no data read, no session built
        return
    first = next(iter(truncated_batches(dataset, options.batch_size, len(dataset))), None)
    if first is None:
        return
    noise = reference_noise(model, exact_backend(options), first, model.output_names)
    if noise:
        raise SearchError(
            f"{model.label}: cannot search: the FP32 reference is not deterministic: it draws random numbers "
            f"({drawn_ops(model)}) and two runs of the first batch differ ({differing_outputs(noise, 2)}), so no "
            f"plan's figures can be judged against {options.threshold!r}. {NOISE_OFF}")


def _free_running_notes(model: LoadedModel, evaluator: CompareEvaluator, plan: ResolvedPlan, comparison: Any,
                        dataset: DataSet, options: SearchOptions) -> tuple[str, ...]:
    """Sequence mode: the final plan over the streams on its own state, beside its teacher-forced figures (the
    verdict's). The search's evaluations skip this pass unless its threshold names a free-running figure."""
    if not isinstance(dataset, SequenceData) or comparison is None:
        return ()
    name = str(comparison.end_to_end["candidate"].iloc[0])
    rows = comparison.settings.get("free_running")  # measured with the plan: the threshold names free_ figures
    if not rows:
        backend = evaluator.exact_backend()
        decided = probability_outputs(model)
        rows = free_running(model, {name: evaluator.write(plan)}, dataset, options.batch_size, lambda _: backend,
                            decisions=(options.decision_threshold, decided), copied=copied_prefixes(model, {}))
    forced = {(name, r.output): float(r.sqnr_db) for r in comparison.end_to_end.itertuples()}
    return (free_running_note(rows, forced, kept=""),) if rows else ()


def _correction_if_it_helps(model: LoadedModel, table: CalibrationTable, dataset: DataSet, options: SearchOptions,
                            correction: BiasCorrection, base: ResolvedPlan,
                            ) -> tuple[BiasCorrection | None, dict[str, Any]]:
    """``correction`` when the all-INT8 plan's combined output SQNR on the whole validation set is no lower with it
    than without, else None; and what was measured.

    Bias correction is mixed (README): on a wav2vec2-style encoder it lowered the all-INT8 SQNR by 0.3 dB, and
    every plan of the search inherited it. Two evaluations of the all-INT8 plan on every sample decide: on the
    ranking subset (16 of 32 text lines) an OCR model read 28.89 dB with it and 28.77 without, on all 32 27.77
    and 29.57, and the search kept 44 % INT8 where 97 % passed without it.
    """
    n = len(dataset)
    threshold = parse_threshold(options.threshold)

    def rows(fix: BiasCorrection | None) -> tuple[Mapping[str, Any], ...]:
        return CompareEvaluator(model, table, dataset, options, fix).evaluate_many([base], n)[0].rows

    rows_with, rows_without = rows(correction), rows(None)
    with_it, without = output_sqnr(rows_with), output_sqnr(rows_without)
    margin_with, margin_without = threshold.check(rows_with).margin, threshold.check(rows_without).margin
    check = {"check_samples": n, "int8_sqnr_db_with": with_it, "int8_sqnr_db_without": without,
             "threshold_margin_with": margin_with, "threshold_margin_without": margin_without}
    # the threshold's own metric decides (ddddocr: +1.2 dB SQNR but 2 of 48 more lines misread), SQNR on a tie
    if margin_with != margin_without and not (is_nan(margin_with) or is_nan(margin_without)):
        if margin_with > margin_without:
            return correction, check
        why = (f"it moved the all-INT8 plan further from the threshold {threshold.text!r} on {n} validation "
               f"sample(s) (margin {margin_without:.4g} without, {margin_with:.4g} with)")
        return None, {**check, "why": why}
    if is_nan(with_it) or is_nan(without) or with_it >= without:
        return correction, check
    why = (f"it lowered the all-INT8 output SQNR (the outputs' noise summed) on {n} validation sample(s) from "
           f"{without:.2f} to {with_it:.2f} dB")
    return None, {**check, "why": why}


def _load_logged_comparison(log: SearchLog, ev: Evaluation) -> CompareResult | None:
    rel = log.comparison_dirs.get(ev.key)
    if not rel or not (log.workdir / rel).is_dir():
        return None
    try:
        return load_comparison(log.workdir / rel)
    except Exception:  # noqa: BLE001 - a damaged saved comparison is measured again instead
        return None

