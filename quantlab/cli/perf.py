"""``quantlab perf MODEL``: trtexec-style latency and throughput for each available backend.

    quantlab perf model.onnx --backend all --batch-size 8 --iterations 200 --json perf.json

Each backend builds the model once, runs ``--warmup`` untimed batches of random
data (or of the first batch of ``--data``), then times ``--iterations`` batches (and at least ``--duration``
seconds).
Backends that cannot run here (not installed, no GPU) are listed with the reason.

For INT8 Q/DQ models ONNX Runtime's fused integer kernels are the fast path;
``--qdq-fusion auto`` (the default) uses them unless they could saturate on
this CPU (x86 without VNNI and full-range weights: see quantlab.backends.ort),
``on`` times them regardless, ``off`` times the unfused Q/DQ graph.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import add_bind_option, add_command, add_progress_option, bound_inputs, non_negative_int, path_arg, positive_int

if TYPE_CHECKING:
    from ..perf import LatencyResult

__all__ = ["HELP", "register", "run"]

HELP = "latency (mean, p50, p90, p99) and throughput per backend"


def _dim(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME=SIZE with SIZE >= 1, got {text!r}")
    return name, int(value)


def register(subparsers: Any) -> None:
    # NOTE: BACKEND_NAMES should live in a light module: quantlab.backends imports numpy and onnx.
    from ..backends import BACKEND_NAMES

    p = add_command(subparsers, "perf", __doc__, HELP)
    add_bind_option(p)
    p.add_argument("model", type=path_arg, help="ONNX model file")
    p.add_argument("--backend", choices=[*BACKEND_NAMES, "all"], default="all",
                   help="backend to measure; 'all' measures every one available here (default)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="samples per run (default 1, or the batch a static export fixes)")
    p.add_argument("--warmup", type=non_negative_int, default=10, help="untimed runs first (default 10)")
    p.add_argument("--iterations", type=positive_int, default=100, help="timed runs (default 100)")
    p.add_argument("--duration", type=float, default=None,
                   help="also keep timing until this many seconds have passed")
    p.add_argument("--threads", type=non_negative_int, default=0,
                   help="ONNX Runtime intra-op threads (0 = one per core)")
    p.add_argument("--dim", type=_dim, action="append", default=[], metavar="NAME=SIZE",
                   help="size of a named dynamic input axis other than the batch (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input data")
    p.add_argument("--data", type=path_arg, default=None, metavar="TOML",
                   help="time the first batch of this data set (manifest) instead of random data: where the values "
                        "decide the work (a while loop's steps, the boxes NMS keeps, a TTS model's output length, "
                        "ids where 0 is padding) random data times other work")
    p.add_argument("--shapes", action="append", default=None, metavar="NAME:MIN,OPT,MAX",
                   help="TensorRT engine shape ranges, trtexec-style (e.g. image:1x3x48x64,8x3x48x320,32x3x48x1600); "
                        "the named inputs are timed at their OPT shape, batch included (it replaces --batch-size)")
    p.add_argument("--qdq-fusion", choices=["auto", "on", "off"], default="auto",
                   help="ONNX Runtime: fuse Q/DQ into integer kernels (on), run them as written (off), "
                        "or fuse unless the kernels could saturate on this CPU (auto, default)")
    p.add_argument("--engine-cache", type=path_arg, default=None,
                   help="folder for TensorRT engines (reused when model, version and GPU match)")
    p.add_argument("--json", type=path_arg, default=None, metavar="OUT", help="also write the results as JSON")
    add_progress_option(p)  # perf shows no bar; taken so that a script can pass --no-progress to every command


def _measure(
    name: str, args: argparse.Namespace, model: Any, feeds: dict[str, Any]
) -> tuple[dict[str, Any], LatencyResult]:
    from ..backends import get_backend
    from ..perf import measure_latency

    fused: bool | None = None
    if name == "ort":
        fusion = {"auto": None, "on": True, "off": False}[args.qdq_fusion]
        backend = get_backend("ort", threads=args.threads, qdq_fusion=fusion)
        runner = backend.build(model.proto)
        fused = bool(getattr(runner, "qdq_fusion", True))
    else:
        backend = get_backend(name, cache_dir=args.engine_cache, shapes=args.ranges)
        runner = backend.build(model.proto, profiles_from={k: v.shape for k, v in feeds.items()})  # type: ignore[call-arg]
    try:
        result = measure_latency(runner, feeds, warmup=args.warmup, iterations=args.iterations,
                                 duration_s=args.duration, batch_size=args.batch_size)
    finally:
        runner.close()
    info = backend.describe().as_dict()
    if fused is not None:
        info["details"]["qdq_fusion_used"] = fused
    return info, result


def _ranges(shapes: list[str] | None, model: Any) -> dict[str, Any] | None:
    """``--shapes`` parsed and checked against the model's inputs (None without the flag)."""
    if not shapes:
        return None
    from ..shapes import check_ranges, network_shapes, parse_shapes

    return check_ranges(parse_shapes(shapes), network_shapes(model.inputs))


def _opt_dims(ranges: dict[str, Any] | None, model: Any) -> dict[str, int]:
    """Named dynamic axes (``W``) at the OPT size ``--shapes`` gives them (the batch axis aside)."""
    dims: dict[str, int] = {}
    for spec in model.inputs:
        if ranges and spec.name in ranges:
            for axis, d in enumerate(spec.shape or ()):
                if isinstance(d, str) and axis > 0:
                    dims.setdefault(d, ranges[spec.name].opt[axis])
    return dims


def _at_opt_shapes(feeds: dict[str, Any], ranges: dict[str, Any], seed: int) -> None:
    """The inputs ``--shapes`` names, as random data of their OPT shape (batch included): what is timed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for name, shape_range in ranges.items():
        feeds[name] = rng.standard_normal(shape_range.opt).astype(feeds[name].dtype)


def _table(rows: list[dict[str, Any]]) -> str:
    import pandas as pd

    frame = pd.DataFrame([{
        "backend": r["backend"]["name"],
        "version": r["backend"]["version"],
        "device": r["backend"]["device"],
        "batch": r["latency"]["batch_size"],
        "mean ms": r["latency"]["mean_ms"],
        "p50 ms": r["latency"]["p50_ms"],
        "p90 ms": r["latency"]["p90_ms"],
        "p99 ms": r["latency"]["p99_ms"],
        "min ms": r["latency"]["min_ms"],
        "max ms": r["latency"]["max_ms"],
        "samples/s": r["latency"]["throughput_per_s"],
    } for r in rows])
    return frame.to_string(index=False, float_format=lambda v: f"{v:.3f}")


def _check_json_target(path: Path) -> None:
    """--json replaces a file: only one `quantlab perf --json` wrote, and only where we may write."""
    from ..atomic import check_writable
    from ..errors import OutputError

    label = f"--json {path}"
    if path.is_dir():
        raise OutputError(f"{label} is a folder; give a file name such as {path / 'perf.json'}")
    if path.exists():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            doc = None
        if not (isinstance(doc, dict) and {"results", "unavailable", "settings"} <= doc.keys()):
            raise OutputError(f"{label} exists and was not written by `quantlab perf --json`; it would be "
                              "replaced. Give a new file name, or move that file away.")
    check_writable(path, label=label)


def _batch_size(model: Any, asked: int | None) -> int:
    """``--batch-size``, else the batch every input fixes on axis 0 (Swin exported at batch 2 was timed as batch 1,
    its samples/s halved), else 1; a size the model's fixed batch refuses is refused."""
    from ..errors import InputMismatchError
    from ..shapes import fixed_batch_size

    fixed = fixed_batch_size({s.name: s.shape for s in model.inputs}, all_inputs=True)
    if asked is None:
        if fixed and fixed > 1:
            print(f"quantlab perf: note: {model.label} fixes its batch at {fixed}: batch size {fixed}",
                  file=sys.stderr, flush=True)
        return fixed or 1
    if fixed and asked != fixed:
        raise InputMismatchError(f"--batch-size {asked}: {model.label} fixes its batch at {fixed}; time it at "
                                 f"{fixed} (leave --batch-size out), or re-export it with a dynamic batch axis")
    return asked


def run(args: argparse.Namespace) -> int:
    from ..atomic import write_json
    from ..backends import BACKEND_NAMES
    from ..errors import BackendError, BackendUnavailableError, QuantlabError
    from ..fingerprint import tool_versions
    from ..graph import load_model
    from ..graph.topology import holds_qdq
    from ..backends.coupling import batch_coupling
    from ..data import open_dataset
    from ..errors import InputMismatchError
    from ..perf import data_feeds, random_feeds

    if args.json is not None:
        _check_json_target(args.json)
    model = load_model(args.model, bind=bound_inputs(args))
    asked = args.batch_size
    args.batch_size = _batch_size(model, args.batch_size)
    args.ranges = _ranges(args.shapes, model)
    if args.data is not None:
        if args.dim:
            raise InputMismatchError("--dim sizes random data; with --data the data's own sizes are timed: give one "
                                     "or the other")
        dataset = open_dataset(args.data)
        streams = getattr(dataset, "sequence_streams", None)
        if asked is None and streams:  # interleaved streams: a step of each is one run
            args.batch_size = streams
            print(f"quantlab perf: note: the data interleaves {streams} streams ([sequence] streams): batch size "
                  f"{streams}", file=sys.stderr, flush=True)
        feeds, args.batch_size = data_feeds(model, dataset, args.batch_size)
        coupled = batch_coupling(model, dataset, args.batch_size) if args.batch_size > 1 else None
        if coupled:  # a while loop until the whole batch converges: its steps, so its time, follow the batch
            print(f"quantlab perf: {coupled.note(model.label, args.batch_size)}", file=sys.stderr, flush=True)
        if getattr(dataset, "sequence_carry", None):  # a T5 step timed on its first chunk: an empty past
            print(f"quantlab perf: note: {args.data} is a sequence ([sequence] carry): its first batch is timed with "
                  "the state the data holds (the first step's), not the state later steps carry; time a later step "
                  "with a manifest of such samples", file=sys.stderr, flush=True)
    else:
        feeds = random_feeds(model, args.batch_size, seed=args.seed,
                             dims={**_opt_dims(args.ranges, model), **dict(args.dim)})
    if args.ranges and args.data is None:
        _at_opt_shapes(feeds, args.ranges, args.seed)
        args.batch_size = next(iter(args.ranges.values())).opt[0]  # what is timed: the OPT batch (axis 0)
    names = list(BACKEND_NAMES) if args.backend == "all" else [args.backend]
    rows: list[dict[str, Any]] = []
    unavailable: list[dict[str, str]] = []
    for name in names:
        print(f"quantlab perf: measuring {name} ...", file=sys.stderr, flush=True)
        try:
            info, result = _measure(name, args, model, feeds)
        except BackendUnavailableError as exc:
            if args.backend != "all":
                raise
            unavailable.append({"backend": name, "reason": str(exc)})
            continue
        except BackendError as exc:
            if args.data is not None:
                raise
            raise type(exc)(f"{exc}\n  The run was on random data (sizes from --dim/--shapes, values drawn at "
                            "random): sizes may have to agree with each other (a cache's total length = its past + "
                            "1) and values may decide the work (token ids routed to experts, boxes kept by NMS). "
                            "Time the model on real samples: --data MANIFEST.") from None
        rows.append({"backend": info, "latency": result.as_dict()})
    timed = f"the first batch of {args.data}" if args.data is not None else f"random data, seed {args.seed}"
    print(f"model: {model.label}  (sha256 {model.sha256[:12]}, batch {args.batch_size}, "
          f"warm-up {args.warmup}, iterations {args.iterations}, {timed})")
    if rows:
        print(_table(rows))
    has_qdq = holds_qdq(model.proto)
    for r in rows:
        if has_qdq and r["backend"]["details"].get("qdq_fusion_used") is False:
            why = ("--qdq-fusion off" if args.qdq_fusion == "off" else
                   "its fused integer kernels could saturate on this CPU (x86 without VNNI)")
            print(f"{r['backend']['name']}: ran the Q/DQ model unfused ({why}): exact, not the fast path. "
                  "`--qdq-fusion on` times the fused kernels; `quantlab build --reduce-range` makes them exact here.")
    for item in unavailable:
        print(f"{item['backend']}: not measured: {item['reason']}")
    if args.json is not None:
        write_json(args.json, {
            "model": {"path": str(args.model), "sha256": model.sha256},
            "settings": {"batch_size": args.batch_size, "warmup": args.warmup, "iterations": args.iterations,
                         "duration_s": args.duration, "threads": args.threads, "seed": args.seed,
                         "dims": dict(args.dim), "qdq_fusion": args.qdq_fusion,
                         "data": None if args.data is None else str(args.data),
                         "feeds": {k: [list(v.shape), str(v.dtype)] for k, v in feeds.items()}},
            "results": rows,
            "unavailable": unavailable,
            "tool_versions": tool_versions(),
        })
        print(f"wrote {args.json}")
    if not rows:
        raise QuantlabError("no backend could run the model here: " +
                            "; ".join(f"{u['backend']}: {u['reason']}" for u in unavailable))
    return 0
