"""``quantlab build MODEL``: write the INT8 / FP16 / mixed model, its provenance and effective plan.

    quantlab build model.onnx --table calib/calib_entropy.json --precision int8 --target tensorrt --out build/
    quantlab build model.onnx --table calib.json --plan plan.toml --backend tensorrt-rtx --out build/
    quantlab build model.onnx --table calib_cle/calib_entropy.json --equalize --per-tensor-weights --out build/

Writes ``DIR/model.onnx``, ``DIR/provenance.json`` (original -> written tensor
and node map, Q/DQ parameters, hashes, versions) and ``DIR/plan.json`` (the
effective plan: one entry per fusion group, ready to edit and pass back with
``--plan``). With ``--backend tensorrt`` or ``tensorrt-rtx`` it also builds
``DIR/model.engine`` and ``DIR/engine.json`` (which records the optimisation
``profiles``: ``--shapes NAME:MIN,OPT,MAX`` as trtexec takes them, else the
shapes the calibration data had when the table recorded them, else a guess
that names itself if the build fails). Everything is computed before the
first file is written, and the folder is assembled beside DIR and renamed into
place: an error or a crash leaves DIR as it was, never a mix of two builds (so
DIR must be new or hold only the files of an earlier build).

``--equalize`` / ``--smoothquant-scales FILE`` redo the float rewrites the table was
calibrated after (``quantlab calibrate --equalize`` / ``--smoothquant ALPHA``, which writes
FILE); provenance.json records them with the rewritten model's hash.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING, Any

from ..errors import BackendError, BackendUnavailableError, UnsupportedOpError
from . import add_bind_option, add_command, add_progress_option, bound_inputs, path_arg, prepare_output

if TYPE_CHECKING:
    from ..plan import PrecisionPlan
    from ..quantize import WriteOptions, WrittenModel
    from ..table import CalibrationTable

__all__ = ["HELP", "register", "run", "BUILD_FILES"]

HELP = "write an INT8 (Q/DQ) / FP16 / mixed model, its provenance and effective plan"

BUILD_FILES = frozenset({"model.onnx", "provenance.json", "plan.json", "model.engine", "engine.json"})
"""What a build writes into DIR: the only files it may replace."""


def register(subparsers: Any) -> None:
    from ..backends import BACKEND_NAMES
    from ..precision import PRECISIONS
    from ..quantize import DEFAULT_FP32_OPS

    p = add_command(subparsers, "build", __doc__, HELP)
    add_bind_option(p)
    p.add_argument("model", type=path_arg, help="the FP32 ONNX model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--table", type=path_arg, help="calibration table written by `quantlab calibrate` (JSON)")
    src.add_argument("--trt-cache", type=path_arg, help="a TensorRT calibration cache to take the ranges from")
    p.add_argument("--plan", type=path_arg, help="precision plan (.json/.toml); implies --precision mixed")
    p.add_argument("--precision", choices=[*PRECISIONS, "mixed"], default=None,
                   help="int8, fp16 or fp32 for every group, or mixed (needs --plan); default int8, "
                        "or mixed when --plan is given")
    p.add_argument("--fallback", choices=["fp16", "fp32"], default=None,
                   help="precision of the groups that cannot be INT8 under --precision int8 (an LSTM, a "
                        "Softmax): fp32 (default) or fp16, TensorRT's classic INT8 + FP16 build")
    p.add_argument("--backend", choices=BACKEND_NAMES, default="ort",
                   help="ort (check that ONNX Runtime loads the model) or tensorrt / tensorrt-rtx "
                        "(also build DIR/model.engine); default ort")
    p.add_argument("--target", choices=["tensorrt", "ort"], default=None,
                   help="Q/DQ form: tensorrt (int8 symmetric, float bias) or ort (uint8, int32 bias, "
                        "fast ORT kernels); default: tensorrt for TensorRT backends, ort for ort")
    p.add_argument("--keep-fp32", default=None, metavar="OP,OP",
                   help="op types kept float32 inside fp16 regions "
                        f"(default {','.join(DEFAULT_FP32_OPS[:4])},...); '' for none")
    p.add_argument("--per-tensor-weights", action="store_true",
                   help="one weight scale per tensor instead of per output channel")
    p.add_argument("--reduce-range", action="store_true",
                   help="7-bit weights ([-64, 64]): ONNX Runtime's fast uint8 x int8 kernels saturate on x86 "
                        "CPUs without VNNI with full-range weights; this makes them exact there")
    p.add_argument("--int8-bodies", action="store_true",
                   help="also write the bodies of Loop/Scan nodes (If branches) the table calibrated (quantlab calibrate runs them "
                        "step by step) in INT8, under an int8 plan; the search cannot revert such a body")
    p.add_argument("--equalize", action="store_true",
                   help="cross-layer equalization of consecutive convs (exact in FP32); the table must come from "
                        "`quantlab calibrate --equalize`")
    p.add_argument("--smoothquant-scales", type=path_arg, default=None, metavar="FILE",
                   help="SmoothQuant scales (smoothquant.json of `quantlab calibrate --smoothquant ALPHA`, whose "
                        "table this build must use)")
    p.add_argument("--bias-correction", type=path_arg, default=None, metavar="FILE",
                   help="apply the bias correction a search measured (its bias_correction.json, beside plan.json) "
                        "to the INT8 layers: with the search's --plan, this rebuilds its final model")
    p.add_argument("--fp16-simulation", action="store_true",
                   help="(--backend ort only) float32 kernels with every fp16 tensor rounded through "
                        "float16: ONNX Runtime's CPU provider does not round a native fp16 model's activations")
    p.add_argument("--shapes", action="append", default=None, metavar="NAME:MIN,OPT,MAX",
                   help="engine shape ranges per dynamic input, trtexec-style, e.g. "
                        "image:1x3x48x64,8x3x48x320,32x3x48x1600 (several inputs: space-separated or repeat "
                        "the flag; one shape = fixed); default: the shapes of the calibration data")
    p.add_argument("--out", type=path_arg, required=True, metavar="DIR", help="output folder")
    add_progress_option(p)


def _plan(args: argparse.Namespace) -> tuple[PrecisionPlan, str]:
    from ..errors import PlanError
    from ..plan import load_plan, uniform_plan

    if args.plan is not None:
        if args.fallback is not None:
            raise PlanError(f"--plan {args.plan} and --fallback {args.fallback}: the plan file sets its own "
                            "fallback; set fallback = \"fp16\" there")
        if args.precision not in (None, "mixed"):
            raise PlanError(f"--plan {args.plan} and --precision {args.precision} disagree: the plan decides "
                            "each group's precision; drop --precision (or set 'default' in the plan)")
        return load_plan(args.plan), "mixed"
    precision = args.precision or "int8"
    if precision == "mixed":
        raise PlanError("--precision mixed needs --plan PLAN (a .json/.toml file; `quantlab build` "
                        "writes the effective plan of any build as DIR/plan.json to start from)")
    if args.fallback is not None:
        if precision != "int8":
            raise PlanError(f"--fallback {args.fallback} applies to --precision int8 (the groups INT8 cannot "
                            f"run); --precision {precision} runs every group in {precision} already")
        return dataclasses.replace(uniform_plan(precision), fallback=args.fallback), f"int8, fallback {args.fallback}"
    return uniform_plan(precision), precision


def _check_int8_bodies(args: argparse.Namespace, plan: PrecisionPlan, label: str) -> None:
    """--int8-bodies writes bodies in INT8 only under a plan whose default is int8: say so rather than ignore it."""
    from ..errors import PlanError

    if args.int8_bodies and plan.default != "int8":
        where = f"the plan {args.plan} defaults to {plan.default}" if args.plan is not None else f"--precision {label}"
        raise PlanError(f"--int8-bodies writes the calibrated Loop/Scan/If bodies in INT8 under an int8 plan, but "
                        f"{where}: nothing would be written in INT8 there. Drop --int8-bodies, or build with "
                        "--precision int8 (a plan with default = \"int8\")")


def _table(args: argparse.Namespace, model: Any, options: WriteOptions) -> CalibrationTable | None:
    """The --table / --trt-cache ranges, checked against the model as the options rewrite it (the error names
    the file)."""
    from ..errors import CalibrationError
    from ..quantize import check_prepared_table, prepare_model
    from ..table import read_table
    from ..trt_cache import read_trt_cache

    path = args.table if args.table is not None else args.trt_cache
    if path is None:
        return None
    table = read_table(path) if args.table is not None else read_trt_cache(path)
    try:
        check_prepared_table(table, model, prepare_model(model, options))
    except CalibrationError as exc:
        raise CalibrationError(f"{path}: {exc}") from None
    return table


def _options(args: argparse.Namespace) -> WriteOptions:
    from ..errors import QuantlabError
    from ..quantize import DEFAULT_FP32_OPS, Equalization, WriteOptions, load_bias_correction, load_smoothquant

    target = args.target or ("ort" if args.backend == "ort" else "tensorrt")
    fp32_ops = DEFAULT_FP32_OPS
    if args.keep_fp32 is not None:
        fp32_ops = tuple(op.strip() for op in args.keep_fp32.split(",") if op.strip())
    if args.fp16_simulation and args.backend != "ort":
        raise QuantlabError(f"--fp16-simulation writes a float32 model for measuring FP16 accuracy on ONNX "
                            f"Runtime; it is not for --backend {args.backend}. Drop the flag.")
    smooth = load_smoothquant(args.smoothquant_scales) if args.smoothquant_scales is not None else None
    correction = load_bias_correction(args.bias_correction) if args.bias_correction is not None else None
    return WriteOptions(target=target, per_channel_weights=not args.per_tensor_weights, fp32_ops=fp32_ops,
                        fp16_simulation=args.fp16_simulation, reduce_range=args.reduce_range,
                        equalization=Equalization() if args.equalize else None, smoothquant=smooth,
                        bias_correction=correction, int8_bodies=args.int8_bodies)


def _saturation_note(options: WriteOptions, written: WrittenModel) -> str | None:
    from ..backends.ort import int8_dot_saturates

    if options.target != "ort" or options.reduce_range or not written.plan.groups_at("int8"):
        return None
    if not int8_dot_saturates():
        return None
    return ("this CPU has no VNNI: ONNX Runtime's fused uint8 x int8 kernels saturate with full-range "
            "weights, so quantlab's ORT backend runs this model unfused (exact Q/DQ semantics, slower); "
            "--reduce-range writes 7-bit weights that run fused and exact here")


def _shapes(args: argparse.Namespace, model: Any, table: CalibrationTable | None) -> tuple[Any, str]:
    """(ranges or None, where they come from) for the engine's optimisation profiles."""
    from ..errors import QuantlabError
    from ..shapes import network_shapes, shapes_for_table

    if args.shapes and args.backend == "ort":
        raise QuantlabError("--shapes sets TensorRT optimisation profiles; ONNX Runtime runs any shape. Drop "
                            "--shapes, or build with --backend tensorrt / tensorrt-rtx.")
    ranges = shapes_for_table(args.shapes, table.calib_set if table is not None else None,
                              network_shapes(model.inputs), where=str(args.table))
    static = all(spec.shape is not None and all(isinstance(d, int) and d > 0 for d in spec.shape)
                 for spec in model.inputs)
    return ranges, ("--shapes" if args.shapes else "the calibration data" if ranges
                    else "none: every input has a static shape" if static else "a guess")


def _engine(args: argparse.Namespace, model: Any, written: WrittenModel, shapes: tuple[Any, str]
            ) -> tuple[bytes | None, dict[str, Any] | None, str]:
    """(engine bytes, description, message) for TensorRT backends; ORT only has to load the model."""
    from ..backends import get_backend
    from ..fingerprint import sha256_bytes
    from ..shapes import data_profile_note, network_shapes

    backend = get_backend(args.backend)
    if args.backend == "ort":
        runner = backend.build(written.proto)
        runner.close()
        return None, None, f"ONNX Runtime {backend.describe().version} loads the model"
    build_engine = getattr(backend, "build_engine", None)
    if build_engine is None:
        return None, None, f"{args.backend}: this backend cannot build engines yet; wrote the ONNX only"
    ranges, source = shapes
    try:
        engine = build_engine(written.proto, label=f"the model written from {args.model} ({written.options.target} form)",
                              shapes=ranges, progress=not args.no_progress)
    except BackendError as error:
        told = _with_fp32_verdict(error, build_engine, model, written, args, ranges)
        if told is error:
            raise
        raise told from error
    profiles = backend.profiles_for(written.proto, shapes=ranges)
    info = {
        "backend": backend.describe().as_dict(),
        "engine_sha256": sha256_bytes(engine),
        "engine_bytes": len(engine),
        "model_sha256": written.sha256,
        "plan_hash": written.plan.plan_hash(),
        "profiles": profiles,
        "profiles_from": source,
    }
    shown = " ".join(f"{k}:{','.join('x'.join(map(str, s)) for s in v)}" for k, v in profiles.items())
    narrow = data_profile_note(ranges, network_shapes(model.inputs)) if ranges and not args.shapes else None
    info["profile_note"] = narrow
    return engine, info, (f"{args.backend} built an engine of {len(engine) / 1e6:.1f} MB"
                          + (f"; profiles from {source}: {shown}" if profiles else "")
                          + (f"\n  note: {narrow}" if narrow else ""))


def _with_fp32_verdict(error: BackendError, build_engine: Any, model: Any, written: WrittenModel,
                       args: argparse.Namespace, ranges: Any) -> BackendError:
    """``error`` (a failed engine build of the written model) with whether the FP32 model itself builds: if not,
    the backend cannot take the graph (a Loop it trips on), whatever quantlab writes; if so, the precision plan
    is what it refuses."""
    counts = written.plan.counts()
    if isinstance(error, BackendUnavailableError) or counts["int8"] + counts["fp16"] == 0 or (
            counts["int8"] and written.options.target != "tensorrt"):  # the parser's error says: target tensorrt
        return error
    if isinstance(error, UnsupportedOpError) and error.foreign_ops:
        return error  # ONNX Runtime's own ops: the error says so; no upstream bug to report
    from ..backends.tensorrt.builder import GUESSED_PHRASE  # a TensorRT build ran: the module is loaded

    try:
        build_engine(model.proto, label=str(args.model), shapes=ranges)
    except BackendError as fp32_error:
        if GUESSED_PHRASE in str(fp32_error) and _guessed_beyond_batch(model, ranges):  # no verdict on the graph
            return type(error)(f"{error}\n  The FP32 model fails to build with these guessed profiles too: give the "
                               "real ranges (above) before judging the graph.")
        verdict = (f"\n  The FP32 model fails to build too (same profiles, no Q/DQ, no FP16): {args.backend} cannot "
                   "build this graph as it is, whatever precision quantlab writes. Check it with trtexec or "
                   "polygraphy on the FP32 model and report it upstream; meanwhile compare, search and the report "
                   "run on --backend ort, whose figures simulate the TensorRT form's accuracy.")
    else:
        verdict = ("\n  The FP32 model builds with the same profiles: the precision plan is what fails. Keep the "
                   "node(s) the error names out of INT8/FP16 (a plan's fp32 list, or `quantlab build --keep-fp32 "
                   "OP`) and build again.")
    return type(error)(f"{error}{verdict}")


def _guessed_beyond_batch(model: Any, ranges: Any) -> bool:
    """Whether an input's dynamic dim other than its batch got a guessed profile (no --shapes, no table shapes for
    it): a failure on such a profile says nothing of the graph (the batch's default range is no guess)."""
    covered = set(ranges or {})
    return any(not isinstance(d, int) for s in model.inputs if s.name not in covered for d in (s.shape or ())[1:])


def run(args: argparse.Namespace) -> int:
    from ..atomic import atomic_dir, write_bytes, write_json
    from ..graph import check_not_quantized, load_model
    from ..quantize import BIAS_CORRECTION_FILE, save_written, write_model

    prepare_output(args.out, BUILD_FILES, command="build")
    model = load_model(args.model, bind=bound_inputs(args))
    check_not_quantized(model)  # before the table's checks, which would blame the table
    plan, label = _plan(args)
    _check_int8_bodies(args, plan, label)
    options = _options(args)
    table = _table(args, model, options)
    shapes = _shapes(args, model, table)
    written = write_model(model, plan, table, options)
    engine, engine_info, message = _engine(args, model, written, shapes)

    with atomic_dir(args.out, owned=BUILD_FILES) as tmp:
        names = {key: path.name for key, path in save_written(written, tmp).items()}
        if engine is not None and engine_info is not None:
            names["engine"] = write_bytes(tmp / "model.engine", engine).name
            names["engine_info"] = write_json(tmp / "engine.json", engine_info).name
    paths = {key: args.out / name for key, name in names.items()}

    counts = written.plan.counts()
    print(f"quantlab build: {model.label} -> {args.out}  ({label}, target {options.target})")
    print(f"  fusion groups: {len(written.plan.groups)}  int8 {counts['int8']}  fp16 {counts['fp16']}  "
          f"fp32 {counts['fp32']}  (int8 on {written.plan.int8_fraction():.0%} of quantizable groups)")
    print(f"  plan {written.plan.plan_hash()[:12]}  table {written.table_method or '-'}  {message}")
    prepared = written.provenance.meta.get("prepared")
    if prepared:
        eq, sq = prepared.get("equalization"), prepared.get("smoothquant")
        done = ([f"cross-layer equalization of {eq['pair_count']} conv pair(s)"] if eq else []) + \
            ([f"SmoothQuant (alpha {sq['alpha']:g}) on {len(sq['activations'])} input(s)"] if sq else [])
        print(f"  rewritten before writing: {', '.join(done)} (sha256 {prepared['prepared_sha256'][:12]})")
    notes = list(written.provenance.notes)
    beside = args.plan.parent / BIAS_CORRECTION_FILE if args.plan is not None else None
    if beside is not None and beside.is_file() and args.bias_correction is None:
        notes.append(f"the search that wrote {args.plan} applied bias correction to its final model: add "
                     f"--bias-correction {beside} to build that model (without it, this one differs)")
    applied = written.provenance.meta.get("bias_correction")
    if applied:
        notes.append(f"bias correction from {args.bias_correction} on {len(applied.get('applied', []))} INT8 "
                     "layer(s)")
    saturation = _saturation_note(options, written)
    if saturation:
        notes.append(saturation)
    if table is None and written.plan.groups_at("fp16"):
        notes.append("no --table: nothing is known of the activations' ranges, so none is kept out of float16 "
                     f"(with a calibration table of any method, nodes whose activations pass "
                     f"{options.fp16_data_max:g} compute in FP32; float16 ends at 65504)")
    if args.target is None and options.target == "ort" and written.plan.groups_at("int8"):
        notes.append("target ort (the default for --backend ort): uint8 activations with zero points and int32 "
                     "biases, the form ONNX Runtime runs fast; TensorRT's parsers reject both. For the model to "
                     "deploy on TensorRT, build with --target tensorrt")
    for note in notes:
        print(f"  note: {note}")
    for name, path in paths.items():
        print(f"  {name:12s} {path}")
    sys.stdout.flush()
    return 0
