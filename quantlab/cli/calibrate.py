"""``quantlab calibrate MODEL``: per-tensor INT8 ranges from one streaming pass over a calibration set.

    quantlab calibrate model.onnx --calib calib_sets/NAME.toml --method entropy --out runs/calib
    quantlab calibrate model.onnx --calib calib_sets/NAME.toml --method all --trt-cache --out runs/calib
    quantlab calibrate model.onnx --calib calib_sets/NAME.toml --method entropy --entropy-keep-zeros --out runs/calib
    quantlab calibrate model.onnx --stats runs/calib/statistics.npz --stats runs/cov/prod/statistics.npz --out runs/c2
    quantlab calibrate model.onnx --calib calib_sets/NAME.toml --equalize --out runs/calib_cle

Writes into ``--out`` (atomically: a failed run leaves the previous folder or nothing):

- ``calib_<method>.json``   the calibration table of each method (what ``quantlab build`` reads)
- ``calibration.cache``     TensorRT 10 calibration cache, with ``--trt-cache``
                            (``calibration_<method>.cache`` when several methods are asked)
- ``statistics.npz``        per-tensor histograms, min/max, counts (for the report)
- ``data_summary.json``     what went in: sample count, content hash, per-input ranges, duplicates
- ``calibrate_run.json``    the command's settings, model hash and tool versions
- ``smoothquant.json``      with ``--smoothquant``: the per-channel scales (``quantlab build --smoothquant-scales``)

``--equalize`` / ``--smoothquant ALPHA`` rewrite the float model first (cross-layer
equalization, SmoothQuant; :func:`quantlab.quantize.prepare_model`) and calibrate the rewritten
model: its tables fit only a build with the same rewrites (``quantlab build --equalize``).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import add_bind_option, add_command, add_progress_option, bound_inputs, path_arg, positive_int, prepare_output, resolve_batch_size, text_arg

if TYPE_CHECKING:
    from ..calibrate import CalibrationResult
    from ..table import CalibrationTable

__all__ = ["HELP", "register", "run", "summary_frame", "RUN_RECORD", "owned_files", "alpha_arg"]

HELP = "per-tensor INT8 ranges (entropy, minmax, percentile, mse) from a calibration set"

RUN_RECORD = "calibrate_run.json"
"""Marks a folder as a calibrate output, so a rerun may replace it (and nothing else)."""

TOP_TENSORS = 10


def _percentile(text: str) -> float:
    from ..methods import percentile_error

    value = float(text)
    error = percentile_error(value)
    if error:
        raise argparse.ArgumentTypeError(error)
    return value


def alpha_arg(text: str) -> float:
    """argparse type of --smoothquant: SmoothQuant's alpha, a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (0.5 is SmoothQuant's usual value), got {value}")
    return value


def register(subparsers: Any) -> None:
    from ..methods import (
        ALL,
        ALL_METHODS,
        DEFAULT_BATCH_SIZE,
        DEFAULT_METHOD,
        DEFAULT_PERCENTILE,
        METHOD_NAMES,
        TENSOR_SCOPES,
    )
    from ..trt_cache import TRT_CACHE_VERSION

    p = add_command(subparsers, "calibrate", __doc__, HELP)
    add_bind_option(p)
    p.add_argument("model", type=path_arg, help="FP32 ONNX model file")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--calib", type=path_arg, metavar="TOML",
                        help="calibration set manifest, e.g. calib_sets/NAME.toml")
    source.add_argument("--stats", type=path_arg, action="append", metavar="NPZ",
                        help="recalibrate from statistics.npz files instead (repeat: their histograms are merged, "
                             "no model run), e.g. a calibrate output's and a `quantlab coverage` OUT/SET/statistics.npz")
    p.add_argument("--method", choices=[*METHOD_NAMES, ALL], action="append", default=None,
                   help=f"calibration method, repeatable (--method entropy --method mse); '{ALL}' = "
                        + ", ".join(ALL_METHODS) + f", all from one pass (default {DEFAULT_METHOD})")
    p.add_argument("--percentile", type=_percentile, default=DEFAULT_PERCENTILE,
                   help=f"percentile of |x| kept by the percentile method (default {DEFAULT_PERCENTILE})")
    p.add_argument("--entropy-keep-zeros", action="store_true",
                   help="entropy: TensorRT's algorithm exactly as published (exact zeros kept, no smoothing, no "
                        "point-mass rule); by default zeros are left out, the histograms smoothed and no spike may "
                        "be saturated (kept, the zeros after ReLU/ReLU6 pull the threshold far below the tail and "
                        "saturate 10-20 %% of the values)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"samples per model run (default {DEFAULT_BATCH_SIZE}, 1 for a model that fixes its batch at "
                        "1; does not change the ranges)")
    p.add_argument("--tensors", choices=TENSOR_SCOPES, default="all",
                   help="'all' float activations (default) or 'quantizable': only those an INT8 plan can put a "
                        "Q/DQ on (no pre-activation TensorRT fuses away, no LayerNorm internals or masks: a third of "
                        "the tensors on transformers)")
    p.add_argument("--out", type=path_arg, required=True, metavar="DIR", help="output folder")
    p.add_argument("--trt-cache", action="store_true",
                   help="also write a TensorRT calibration cache (for TensorRT 10 implicit INT8)")
    p.add_argument("--trt-version", type=text_arg, default=TRT_CACHE_VERSION,
                   help=f"TensorRT version for the cache header, e.g. 10.13.0 (default {TRT_CACHE_VERSION}); "
                        "TensorRT ignores a cache made for another version")
    p.add_argument("--equalize", action="store_true",
                   help="cross-layer equalization of consecutive convs before calibrating (exact in FP32; helps "
                        "per-tensor weights most); build with --equalize too")
    p.add_argument("--smoothquant", type=alpha_arg, default=None, metavar="ALPHA",
                   help="SmoothQuant: move outlier activation channels' range into the MatMul/Gemm weights reading "
                        "them (alpha in [0, 1], 0.5 typical; needs --calib); writes smoothquant.json for "
                        "`quantlab build --smoothquant-scales`")
    add_progress_option(p)


def _load_dataset(path: Path) -> Any:
    from .. import data

    return data.load_dataset(path)


def summary_frame(table: CalibrationTable, top: int = TOP_TENSORS, unquantized: Collection[str] = (),
                  shape_only: Collection[str] = ()) -> Any:
    """The widest, the most clipped, the most zeroed tensors of ``table`` (those that round more than half
    their non-zero values to 0) and the quantized ones predicted to keep the least SQNR, as a pandas DataFrame.
    A tensor no Q/DQ reads that held one value throughout (shape arithmetic: a padding's length, 512, filled
    EnCodec's widest ten) is left out, and so is any of ``shape_only`` (arithmetic on shapes alone, never
    quantized: MobileViT's Cast/Ceil/Div of its sizes filled the widest ten of every method)."""
    import pandas as pd

    from ..range_notes import LOW_SQNR_DB, ZERO_NOTE_FRACTION

    rows = [{
        "tensor": name,
        "amax": r.amax,
        "min": r.min,
        "max": r.max,
        "amax/absmax": r.amax / max(abs(r.min), abs(r.max)) if max(abs(r.min), abs(r.max)) > 0 else 1.0,
        "clipped %": 100.0 * r.clipped_fraction,
        "zeroed %": 100.0 * r.zeroed_fraction,
        "SQNR dB": r.predicted_sqnr_db,
        "excluded": sum(r.excluded.values()),
    } for name, r in table.ranges.items()]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame = frame[~(frame["tensor"].isin(set(unquantized)) & (frame["min"] == frame["max"]))
                  & ~frame["tensor"].isin(set(shape_only))]
    widest = frame.nlargest(top, "amax")
    clipped = frame[frame["clipped %"] > 0].nlargest(top, "clipped %")
    zeroed = frame[frame["zeroed %"] > 100.0 * ZERO_NOTE_FRACTION].nlargest(top, "zeroed %")
    quantized = frame[~frame["tensor"].isin(set(unquantized))]
    noisy = quantized[quantized["SQNR dB"] < LOW_SQNR_DB].nsmallest(top, "SQNR dB")
    return pd.concat([widest, clipped, zeroed, noisy]).drop_duplicates("tensor").reset_index(drop=True)


def methods_frame(tables: Mapping[str, CalibrationTable], unquantized: Collection[str] = ()) -> Any:
    """Per method, the predicted INT8 SQNR of the quantized tensors (``TensorRange.predicted_sqnr_db``): median,
    worst (and which tensor), how many fall under :data:`quantlab.range_notes.LOW_SQNR_DB`. A pandas DataFrame."""
    import numpy as np
    import pandas as pd

    from ..range_notes import LOW_SQNR_DB

    rows = []
    for method, table in tables.items():
        known = {n: r.predicted_sqnr_db for n, r in table.ranges.items()
                 if n not in unquantized and math.isfinite(r.predicted_sqnr_db)}
        worst = min(known, key=known.__getitem__) if known else ""
        rows.append({"method": method, "tensors": len(known),
                     "median dB": float(np.median(list(known.values()))) if known else math.nan,
                     "worst dB": known[worst] if known else math.nan, "worst tensor": worst,
                     f"under {LOW_SQNR_DB:g} dB": sum(v < LOW_SQNR_DB for v in known.values())})
    return pd.DataFrame(rows)


def owned_files() -> tuple[str, ...]:
    """The files a calibrate run writes into --out (the only ones a rerun may replace)."""
    from ..methods import METHOD_NAMES

    names = [RUN_RECORD, "statistics.npz", "data_summary.json", "calibration.cache", "smoothquant.json"]
    for method in METHOD_NAMES:
        names += [f"calib_{method}.json", f"calibration_{method}.cache"]
    return tuple(names)


def _write(out: Path, result: CalibrationResult, args: argparse.Namespace, model: Any, prepared: Any) -> list[Path]:
    from ..atomic import atomic_dir, write_json
    from ..fingerprint import tool_versions
    from ..quantize import mark_table, save_smoothquant
    from ..stats import save_statistics
    from ..table import write_table
    from ..trt_cache import write_trt_cache

    written: list[Path] = []
    with atomic_dir(out, owned=owned_files()) as tmp:
        if prepared.smooth is not None:
            save_smoothquant(prepared.smooth, tmp / "smoothquant.json")
            written.append(out / "smoothquant.json")
        for method, table in result.tables.items():
            write_table(mark_table(table, prepared), tmp / f"calib_{method}.json")
            written.append(out / f"calib_{method}.json")
            if args.trt_cache:
                name = "calibration.cache" if len(result.tables) == 1 else f"calibration_{method}.cache"
                write_trt_cache(table, tmp / name, version=args.trt_version)
                written.append(out / name)
        save_statistics(result.statistics, tmp / "statistics.npz")
        write_json(tmp / "data_summary.json", result.data.as_dict())
        write_json(tmp / RUN_RECORD, {
            "command": "calibrate",
            "model": str(args.model),
            "model_sha256": model.sha256,
            "calibrated_model_sha256": prepared.model.sha256,
            "prepared": prepared.record(),
            "calib": str(args.calib) if args.calib else [str(p) for p in args.stats],
            "methods": list(result.tables),
            "percentile": args.percentile,
            "entropy_skip_zeros": not args.entropy_keep_zeros,
            "batch_size": args.batch_size,
            "tensors": args.tensors,
            "samples": result.statistics.samples,
            "passes": result.statistics.passes,
            "backend": dict(result.statistics.backend),
            "versions": tool_versions(),
        })
        written += [out / "statistics.npz", out / "data_summary.json", out / RUN_RECORD]
    return written


def _rewrites(prepared: Any) -> str:
    """One line on what the float rewrites did."""
    parts = []
    if prepared.equalized is not None:
        parts.append(f"equalized {len(prepared.equalized.pairs)} conv pair(s) in {prepared.equalized.iterations} "
                     "sweep(s)")
    if prepared.smooth is not None:
        parts.append(f"SmoothQuant (alpha {prepared.smooth.alpha:g}) on {len(prepared.smooth.activations)} "
                     "activation(s)")
    return ", ".join(parts) or "no rewrite applied"


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from ..calibrate import calibrate
    from ..methods import DEFAULT_BATCH_SIZE, DEFAULT_METHOD, resolve_methods
    from ..graph import load_model
    from ..quantize import prepare_rewrites
    from ..stats import scope_tensors, unquantized_tensors
    from ..graph.topology import shape_determined_nodes

    inputs = [args.model, *([args.calib] if args.calib else args.stats)]
    prepare_output(args.out, owned_files(), command="calibrate", inputs=inputs)
    source = load_model(args.model, bind=bound_inputs(args))
    methods = list(resolve_methods(args.method or [DEFAULT_METHOD]))
    dataset = _load_dataset(args.calib) if args.calib else None
    resolve_batch_size(args, source, dataset, DEFAULT_BATCH_SIZE, "calibrate")
    prepared = prepare_rewrites(source, dataset, equalize=args.equalize, smoothquant_alpha=args.smoothquant,
                                batch_size=args.batch_size)
    model = prepared.model
    if prepared.changed:
        print(f"quantlab calibrate: {_rewrites(prepared)}; calibrating the rewritten model "
              f"(sha256 {model.sha256[:12]})", file=sys.stderr, flush=True)
    if args.stats:  # merged histograms: no model run (quantlab.coverage.recalibrate)
        from ..coverage import recalibrate

        result = recalibrate(model, args.stats, methods, percentile=args.percentile,
                             entropy_skip_zeros=not args.entropy_keep_zeros)
    else:
        tensors = scope_tensors(model.proto, args.tensors)
        print(f"quantlab calibrate: {model.label}: {len(tensors)} tensors, method(s) {', '.join(methods)}",
              file=sys.stderr, flush=True)
        result = calibrate(model, dataset, methods, percentile=args.percentile, batch_size=args.batch_size,
                           progress=not args.no_progress, tensors=tensors,
                           entropy_skip_zeros=not args.entropy_keep_zeros)
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.max_rows", 100):
        print("\ncalibration data")
        frame = result.data.to_frame() if hasattr(result.data, "to_frame") else pd.DataFrame([result.data.as_dict()])
        print(frame.to_string())
        shown: set[str] = set()  # a note every table has (a bind hint, huge values) is printed once
        unquantized = unquantized_tensors(model.proto)
        nodes = model.proto.graph.node
        shape_only = {o for i in shape_determined_nodes(model.proto) for o in nodes[i].output if o}
        for method, table in result.tables.items():
            print(f"\n{method}: widest, most clipped, most zeroed and noisiest tensors (of {len(table.ranges)}; "
                  "SQNR dB: predicted for INT8 at amax)")
            print(summary_frame(table, unquantized=unquantized, shape_only=shape_only).to_string(
                index=False, float_format=lambda v: f"{v:.4g}"))
            for note in (n for n in table.notes if n not in shown):
                print(f"note: {note}")
                shown.add(note)
        if len(result.tables) > 1:
            print("\npredicted INT8 SQNR of the tensors a Q/DQ may go on (either target: the TensorRT form quantizes "
                  "layer inputs, the ORT form also outputs), per method (higher keeps more of the signal)")
            print(methods_frame(result.tables, unquantized).to_string(index=False, float_format=lambda v: f"{v:.1f}"))
            from ..range_notes import method_gap_notes

            for note in method_gap_notes(result.tables, unquantized):
                print(f"note: {note}")
        from ..table import bodies_frame

        bodies = bodies_frame(result.tables)
        if not bodies.empty:
            print("\ncontrol-flow bodies calibrated (`quantlab build --int8-bodies` writes them in INT8)")
            print(bodies.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    written = _write(args.out, result, args, source, prepared)
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0
