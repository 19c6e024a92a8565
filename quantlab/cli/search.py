"""``quantlab search MODEL``: pin the most sensitive layers to FP16/FP32 until a threshold holds.

    quantlab search model.onnx --calib calib_sets/C.toml --data calib_sets/V.toml --threshold "top1_drop<=0.5" --out DIR
    quantlab search model.onnx --table calib/calib_entropy.json --data V.toml --threshold "cosine>=0.999" \\
        --budget 12 --objective latency --fallback fp32 --out DIR
    quantlab search rec.onnx --calib C.toml --data V.toml --backend tensorrt-rtx \\
        --shapes image:1x3x48x64,8x3x48x320,32x3x48x1600 --threshold "cosine>=0.99" --out DIR

Calibrates (``--method``, default entropy) unless ``--table`` gives the ranges, then
searches (see :mod:`quantlab.search`) and writes into ``--out``. On a TensorRT backend every
engine is built with the ``--shapes`` ranges, else with those of the shapes the calibration
table recorded and the validation batches had (``search.json`` records them under ``options``).
Writes:

- ``plan.json`` / ``plan.toml``   the final precision plan (edit it and pass it to `quantlab build --plan`)
- ``final/``                      the built model: model.onnx, provenance.json, plan.json
- ``trajectory.csv`` / ``.parquet``  one row per evaluation (phase, pins, metric with its CI, latency)
- ``sensitivity.csv`` / ``.parquet`` the ranking of the quantizable groups
- ``final_compare/``              the comparator's result for the final plan
- ``search.json``                 the outcome, settings, versions
- ``work/search_log.jsonl``       the search log (``--workdir``): rerun the same command to resume

When no plan meets the threshold the best plan found is still written, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from . import add_bind_option, add_command, add_progress_option, bound_inputs, non_negative_int, path_arg, positive_int, prepare_output, probability_arg, resolve_batch_size, text_arg
from .calibrate import alpha_arg

if TYPE_CHECKING:
    from ..search import SearchOptions, StepEvent

__all__ = ["HELP", "register", "run", "format_step", "owned_files"]

HELP = "pin the most sensitive layers to FP16/FP32 until a threshold is met, keeping the most INT8"


def owned_files(own_workdir: bool) -> tuple[str, ...]:
    """What a search writes into --out (and ``work/``, its log, unless --workdir puts the log elsewhere)."""
    from ..quantize import BIAS_CORRECTION_FILE
    from .compare import owned_files as comparison_files

    names = ("plan.json", "plan.toml", "final/model.onnx", "final/provenance.json", "final/plan.json",
             "trajectory.csv", "trajectory.parquet", "sensitivity.csv", "sensitivity.parquet", "search.json",
             BIAS_CORRECTION_FILE,
             *(f"final_compare/{name}" for name in comparison_files()))
    return (*names, "work/*") if own_workdir else names


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {value}")
    return value


def register(subparsers: Any) -> None:
    from ..backends import BACKEND_NAMES
    from ..methods import DEFAULT_METHOD, METHOD_NAMES
    from ..search import SearchOptions

    defaults = SearchOptions(threshold="")
    p = add_command(subparsers, "search", __doc__, HELP)
    add_bind_option(p)
    p.add_argument("model", type=path_arg, help="the FP32 ONNX model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--calib", type=path_arg, metavar="TOML", help="calibration set manifest (calibrate first)")
    src.add_argument("--table", type=path_arg, metavar="JSON", help="a calibration table from `quantlab calibrate`")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHOD_NAMES),
                   help=f"calibrator used with --calib (default {DEFAULT_METHOD})")
    p.add_argument("--data", type=path_arg, required=True, metavar="TOML", help="validation set manifest")
    p.add_argument("--threshold", type=text_arg, required=True, metavar="EXPR",
                   help="what the final plan must meet, e.g. 'top1_drop<=0.5' or 'cosine>=0.999 and sqnr_db>=30'")
    p.add_argument("--budget", type=positive_int, default=None, metavar="N",
                   help="most full validations (default ceil(log2 G) + 5, G = quantizable groups)")
    p.add_argument("--time-budget", type=_seconds, default=None, metavar="S",
                   help="start no evaluation after S seconds")
    p.add_argument("--objective", choices=["int8", "latency"], default=defaults.objective,
                   help="among plans that meet the threshold: the most INT8 (default) or the fastest")
    p.add_argument("--fallback", choices=["fp16", "fp32"], default=defaults.fallback,
                   help="precision tried first for pinned groups (default fp16; fp32 when fp16 is not enough)")
    p.add_argument("--target", choices=["tensorrt", "ort"], default=defaults.target,
                   help="Q/DQ form written: tensorrt (default; its accuracy is simulated on ONNX Runtime) or ort")
    p.add_argument("--backend", choices=BACKEND_NAMES, default=defaults.backend,
                   help="backend that runs the candidates (default ort)")
    p.add_argument("--shapes", action="append", default=None, metavar="NAME:MIN,OPT,MAX",
                   help="(TensorRT backends) engine shape ranges for every engine the search builds, as `quantlab "
                        "build --shapes` takes them, e.g. image:1x3x48x64,8x3x48x320,32x3x48x1600; default: the "
                        "shapes of the calibration and validation data")
    p.add_argument("--probe-samples", type=positive_int, default=defaults.probe_samples, metavar="N",
                   help=f"validation subset on which each group's impact is measured (reverted alone) for the "
                        f"ranking (default {defaults.probe_samples})")
    p.add_argument("--probe-top", type=non_negative_int, default=defaults.probe_top, metavar="N",
                   help="unused since the impact ranking measures every group (kept for old command lines)")
    p.add_argument("--per-tensor-weights", action="store_true",
                   help="one weight scale per tensor instead of per output channel")
    p.add_argument("--no-bias-correction", action="store_true",
                   help="with --calib: do not fold the per-channel mean shift INT8 causes into the biases")
    p.add_argument("--equalize", action="store_true",
                   help="cross-layer equalization of consecutive convs before calibrating (a --table must come from "
                        "`quantlab calibrate --equalize`); the search runs on the equalized FP32 model")
    p.add_argument("--smoothquant", type=alpha_arg, default=None, metavar="ALPHA",
                   help="with --calib: SmoothQuant (alpha in [0, 1]) for MatMul/Gemm inputs with outlier channels")
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                   help=f"samples per model run (default {defaults.batch_size}, 1 for a model that fixes its "
                        "batch at 1)")
    p.add_argument("--latency", action="store_true",
                   help="measure every full validation's latency (always on with --objective latency)")
    p.add_argument("--metric", type=text_arg, default=None, metavar="MODULE:FUNCTION",
                   help="a user metric for the comparator; the threshold may name its columns")
    p.add_argument("--ctc-blank", type=non_negative_int, default=None, metavar="K",
                   help="as compare --ctc-blank: CTC outputs with blank class K also report text_agreement and cer, "
                        "which the threshold may name (e.g. cer<=1)")
    p.add_argument("--class-map", action="append", type=text_arg, default=None, metavar="OUTPUT",
                   help="as compare --class-map: output OUTPUT [N, C, H, W] is class scores per pixel (miou, which "
                        "the threshold may name); repeatable")
    p.add_argument("--decision-threshold", type=probability_arg, default=defaults.decision_threshold, metavar="P",
                   help="as compare --decision-threshold: outputs a Sigmoid writes are read as the masks p > P "
                        f"(default {defaults.decision_threshold}); the threshold may name mask_iou (e.g. mask_iou>=95)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--workdir", type=path_arg, default=None, metavar="DIR",
                   help="where the search log lives (default OUT/work); rerun with it to resume")
    p.add_argument("--out", type=path_arg, required=True, metavar="DIR", help="output folder")
    add_progress_option(p)


def format_step(event: StepEvent) -> str:
    """One progress line: step, phase, what is pinned, the metric, and the best plan so far."""
    from ..report.markup import fmt  # 0.999665 read 0.9997 beside a threshold of 0.9997: the 9s matter

    r = event.row
    pinned = r["pinned"] or "-"
    if len(pinned) > 40:
        pinned = pinned[:37] + "..."
    verdict = "pass" if r["passed"] else "miss"
    where = "full" if r["full"] else f"{r['samples']} samples"
    extra = " (cached)" if r["cached"] else ""
    latency = f"  {r['latency_ms']:.2f} ms" if r["latency_ms"] == r["latency_ms"] else ""
    best = event.best
    best_text = "-"
    if best is not None:
        best_text = (f"{best['metric']}={fmt(float(best['value']))} {'pass' if best['passed'] else 'miss'}, "
                     f"{best['n_pinned']} pinned, int8 {best['int8_fraction']:.0%}")
    what = (f"only INT8  [{r['only_int8']}]" if r.get("only_int8")  # every other group pinned: name the one left
            else f"pinned {r['n_pinned']:>3} [{pinned}]")
    return (f"  step {r['step']:>3}  {r['phase']:<11} {what}  "
            f"{r['metric']}={fmt(float(r['value']))} {verdict} ({where}{extra}){latency}  "
            f"best: {best_text}  full {event.full_used}/{event.budget}")


def _with_engine_shapes(options: SearchOptions, args: argparse.Namespace, model: Any, table: Any,
                        val: Any) -> SearchOptions:
    """``options`` with the engine shapes of a TensorRT search: --shapes checked against the model, else those
    of the calibration table's recorded shapes and the validation batches (see quantlab.shapes.engine_shapes)."""
    import dataclasses

    from ..shapes import engine_shapes, network_shapes

    batches = val.batches(args.batch_size) if options.backend != "ort" and not args.shapes else None
    shapes = engine_shapes(options.backend, args.shapes, table.calib_set, network_shapes(model.inputs), batches,
                           where=str(args.table or "the calibration"), batch=args.batch_size)
    return dataclasses.replace(options, shapes=shapes)


def run(args: argparse.Namespace) -> int:
    from ..atomic import remove_empty_folders

    new = [p for p in (args.out, args.workdir) if p is not None and not p.exists()]
    try:
        return _run(args)
    except BaseException:
        for folder in new:  # a search that failed early leaves no empty folders behind (its log files stay)
            remove_empty_folders(folder)
        raise


def _rewritten(model: Any, args: argparse.Namespace) -> Any:
    """The model as --equalize / --smoothquant rewrite it (the search has no rewrite option yet: it searches
    the rewritten FP32 model, whose outputs are the original's up to float32 rounding)."""
    if not args.equalize and args.smoothquant is None:
        return model
    from ..data import open_dataset
    from ..errors import QuantlabError
    from ..quantize import prepare_rewrites

    if args.smoothquant is not None and args.calib is None:
        raise QuantlabError("--smoothquant measures activation maxima on the calibration set: give --calib "
                            "(or calibrate with `quantlab calibrate --smoothquant` and search that model)")
    calib = open_dataset(args.calib) if args.calib is not None else None
    return prepare_rewrites(model, calib, equalize=args.equalize, smoothquant_alpha=args.smoothquant,
                            batch_size=args.batch_size).model


def _run(args: argparse.Namespace) -> int:
    from ..atomic import check_writable
    from ..data import open_dataset
    from ..graph import load_model
    from ..search import SearchOptions, search
    from ..table import read_table
    from ..threshold import parse_threshold
    from .compare import check_label_metrics, known_metrics

    inputs = [p for p in (args.model, args.data, args.calib, args.table) if p is not None]
    prepare_output(args.out, owned_files(args.workdir is None), command="search", inputs=inputs)
    if args.workdir is not None:
        check_writable(args.workdir, label=f"--workdir {args.workdir}")
    model = load_model(args.model, bind=bound_inputs(args))
    val = open_dataset(args.data)
    resolve_batch_size(args, model, val, SearchOptions.batch_size, "search")
    if args.metric is None:  # a threshold naming what no evaluation reports fails now, not after the first
        threshold = parse_threshold(args.threshold)
        check_label_metrics(threshold, "--threshold", args.data, val, False)
        parse_threshold(threshold.text, known_metrics=known_metrics(model, bool(getattr(val, "has_labels", False)), val,
                                                                  args.ctc_blank, args.class_map))
    options = SearchOptions(
        threshold=args.threshold, backend=args.backend, target=args.target, fallback=args.fallback,
        budget=args.budget, time_budget_s=args.time_budget, objective=args.objective,
        probe_samples=args.probe_samples, probe_top=args.probe_top, batch_size=args.batch_size, seed=args.seed,
        latency=True if args.latency else None, metric=args.metric, ctc_blank=args.ctc_blank,
        class_maps=tuple(args.class_map or ()),
        decision_threshold=args.decision_threshold,
        per_channel_weights=not args.per_tensor_weights, bias_correction=not args.no_bias_correction,
        shapes=" ".join(args.shapes) if args.shapes else None,
    )
    options.check()  # refuses --shapes on ONNX Runtime and bad --shapes text before any work
    model = _rewritten(model, args)
    calib = summary = None
    if args.table is not None:
        from .coverage import calibration_summary

        table = read_table(args.table)
        source = f"table {args.table} ({table.method})"
        summary = calibration_summary(args.table)  # data_summary.json beside it, when calibrate wrote one
    else:
        from ..calibrate import calibrate

        print(f"quantlab search: calibrating {model.label} on {args.calib} ({args.method})", flush=True)
        calib = open_dataset(args.calib)
        calibrated = calibrate(model, calib, [args.method], batch_size=args.batch_size, progress=not args.no_progress)
        table, summary = calibrated.tables[args.method], calibrated.data
        source = f"{args.method} calibration on {args.calib}"
    options = _with_engine_shapes(options, args, model, table, val)
    workdir = args.workdir if args.workdir is not None else args.out / "work"
    print(f"quantlab search: {model.label}, {len(val)} validation samples, threshold {args.threshold!r}, "
          f"target {args.target}, backend {args.backend}, ranges from {source}; log {workdir}", flush=True)

    if options.shapes:
        print(f"quantlab search: engine profiles {options.shapes}"
              + ("" if args.shapes else " (from the calibration and validation data)"), flush=True)

    def on_step(event: StepEvent) -> None:
        print(format_step(event), flush=True)

    result = search(model, table, val, options, workdir=workdir, progress=False, on_step=on_step, calib=calib,
                    calibration_summary=summary)
    _print_result(result, result.save(args.out))
    return 0 if result.met else 1


def _print_result(result: Any, paths: dict[str, Any]) -> None:
    """The verdict, the notes, what the cache answered and where each output went."""
    from ..experiment.stages import bias_correction_note

    print(("met: " if result.met else "NOT MET: ") + result.message)
    for note in result.notes:
        print(f"  note: {note}")
    if result.settings.get("bias_correction") is not None:  # applied to every plan, or why not: say which
        print(f"  note: {bias_correction_note(result.settings).removeprefix('search: ')}")
    if result.executed < len(result.trajectory) - 1:
        reused = sum(bool(c) for c in result.trajectory["cached"])
        print(f"  {result.executed} evaluation(s) run now, {reused} step(s) answered from the cache/log")
    for name in ("plan", "plan_toml", "final_model", "trajectory", "sensitivity", "final_compare", "search"):
        if name in paths:
            print(f"  {name:12s} {paths[name]}")
    sys.stdout.flush()
