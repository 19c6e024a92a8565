"""``quantlab build MODEL``: write the INT8 / FP16 / mixed model, its provenance and effective plan.

    quantlab build model.onnx --table calib/calib_entropy.json --precision int8 --target tensorrt --out build/
    quantlab build model.onnx --table calib.json --plan plan.toml --backend tensorrt-rtx --out build/

Writes ``DIR/model.onnx``, ``DIR/provenance.json`` (original -> written tensor
and node map, Q/DQ parameters, hashes, versions) and ``DIR/plan.json`` (the
effective plan: one entry per fusion group, ready to edit and pass back with
``--plan``). With ``--backend tensorrt`` or ``tensorrt-rtx`` it also builds
``DIR/model.engine``. Everything is computed before the first file is written,
so an error leaves the folder as it was.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..atomic import write_bytes, write_json
from ..backends import BACKEND_NAMES, get_backend
from ..errors import PlanError, QuantlabError
from ..fingerprint import sha256_bytes
from ..graph import load_model
from ..plan import PRECISIONS, PrecisionPlan, load_plan, uniform_plan
from ..quantize import (
    DEFAULT_FP32_OPS,
    WriteOptions,
    WrittenModel,
    save_written,
    write_model,
)
from ..table import CalibrationTable, read_table, read_trt_cache

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "build",
        help="write an INT8 (Q/DQ) / FP16 / mixed model, its provenance and effective plan",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("model", type=Path, help="the FP32 ONNX model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--table", type=Path, help="calibration table written by `quantlab calibrate` (JSON)")
    src.add_argument("--trt-cache", type=Path, help="a TensorRT calibration cache to take the ranges from")
    p.add_argument("--plan", type=Path, help="precision plan (.json/.toml); implies --precision mixed")
    p.add_argument("--precision", choices=[*PRECISIONS, "mixed"], default=None,
                   help="int8, fp16 or fp32 for every group, or mixed (needs --plan); default int8, "
                        "or mixed when --plan is given")
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
    p.add_argument("--fp16-simulation", action="store_true",
                   help="(--backend ort only) float32 kernels with every fp16 tensor rounded through "
                        "float16: ONNX Runtime's CPU provider does not round a native fp16 model's activations")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")


def _plan(args: argparse.Namespace) -> tuple[PrecisionPlan, str]:
    if args.plan is not None:
        if args.precision not in (None, "mixed"):
            raise PlanError(f"--plan {args.plan} and --precision {args.precision} disagree: the plan decides "
                            "each group's precision; drop --precision (or set 'default' in the plan)")
        return load_plan(args.plan), "mixed"
    precision = args.precision or "int8"
    if precision == "mixed":
        raise PlanError("--precision mixed needs --plan PLAN (a .json/.toml file; `quantlab build` "
                        "writes the effective plan of any build as DIR/plan.json to start from)")
    return uniform_plan(precision), precision


def _table(args: argparse.Namespace) -> CalibrationTable | None:
    if args.table is not None:
        return read_table(args.table)
    if args.trt_cache is not None:
        return read_trt_cache(args.trt_cache)
    return None


def _options(args: argparse.Namespace) -> WriteOptions:
    target = args.target or ("ort" if args.backend == "ort" else "tensorrt")
    fp32_ops = DEFAULT_FP32_OPS
    if args.keep_fp32 is not None:
        fp32_ops = tuple(op.strip() for op in args.keep_fp32.split(",") if op.strip())
    if args.fp16_simulation and args.backend != "ort":
        raise QuantlabError(f"--fp16-simulation writes a float32 model for measuring FP16 accuracy on ONNX "
                            f"Runtime; it is not for --backend {args.backend}. Drop the flag.")
    return WriteOptions(target=target, per_channel_weights=not args.per_tensor_weights, fp32_ops=fp32_ops,
                        fp16_simulation=args.fp16_simulation)


def _engine(args: argparse.Namespace, written: WrittenModel) -> tuple[bytes | None, dict[str, Any] | None, str]:
    """(engine bytes, description, message) for TensorRT backends; ORT only has to load the model."""
    backend = get_backend(args.backend)
    if args.backend == "ort":
        runner = backend.build(written.proto)
        runner.close()
        return None, None, f"ONNX Runtime {backend.describe().version} loads the model"
    build_engine = getattr(backend, "build_engine", None)
    if build_engine is None:
        return None, None, f"{args.backend}: this backend cannot build engines yet; wrote the ONNX only"
    engine = build_engine(written.proto, label=str(args.model))
    info = {
        "backend": backend.describe().as_dict(),
        "engine_sha256": sha256_bytes(engine),
        "engine_bytes": len(engine),
        "model_sha256": written.sha256,
        "plan_hash": written.plan.plan_hash(),
    }
    return engine, info, f"{args.backend} built an engine of {len(engine) / 1e6:.1f} MB"


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    plan, label = _plan(args)
    table = _table(args)
    options = _options(args)
    written = write_model(model, plan, table, options)
    engine, engine_info, message = _engine(args, written)

    paths = save_written(written, args.out)
    if engine is not None and engine_info is not None:
        paths["engine"] = write_bytes(args.out / "model.engine", engine)
        paths["engine_info"] = write_json(args.out / "engine.json", engine_info)

    counts = written.plan.counts()
    print(f"quantlab build: {model.label} -> {args.out}  ({label}, target {options.target})")
    print(f"  fusion groups: {len(written.plan.groups)}  int8 {counts['int8']}  fp16 {counts['fp16']}  "
          f"fp32 {counts['fp32']}  (int8 on {written.plan.int8_fraction():.0%} of quantizable groups)")
    print(f"  plan {written.plan.plan_hash()[:12]}  table {written.table_method or '-'}  {message}")
    for note in written.provenance.notes:
        print(f"  note: {note}")
    for name, path in paths.items():
        print(f"  {name:12s} {path}")
    sys.stdout.flush()
    return 0
