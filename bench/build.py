"""Build time, size on disk and ONNX Runtime CPU latency: FP32 vs INT8 (both Q/DQ forms) vs FP16.

    python bench/build.py [--models demo,resnet] [--iterations 60] [--out bench/results/build.json]

For the demo model (EfficientNet-Lite0 from quantlab.zoo, needs the ``demo``
extra) and a generated ResNet-18-style model (224x224, deterministic weights):

- writer time and size on disk of each candidate: INT8 in TensorRT form (int8
  symmetric activations, float bias), INT8 in ONNX Runtime form (uint8
  activations, int32 bias), the same with 7-bit weights (``reduce_range``),
  FP16 (every layer float16);
- backend build time: ONNX Runtime session creation, TensorRT-RTX engine
  build (parser + builder, on the CPU: no GPU needed);
- ONNX Runtime CPU latency at batch 1 (p50 / mean / p99) and the speed-up over
  FP32, with ORT's fused integer kernels (the fast path) and, for Q/DQ models,
  unfused (Q/DQ run as written: exact, what quantlab's ORT backend uses when the
  fused kernels could saturate on this CPU);
- the error of each candidate against FP32 (max / mean relative error of the
  outputs, top-1 agreement) in both modes: on x86 CPUs without VNNI the fused
  uint8 x int8 kernels saturate with full-range weights (see quantlab.backends.ort);
- which ops ONNX Runtime actually runs after its graph optimisations: an INT8
  model is fast only when its Q/DQ pairs become integer kernels (QLinearConv,
  ConvInteger...) instead of float Convs wrapped in Quantize/Dequantize.

The issue's target: the INT8 ONNX Runtime model >= 1.5x faster than FP32 on the
demo model. As a cross-check of the placement, ONNX Runtime's own
``quantize_static`` (QDQ, uint8 activations, per-channel int8 weights, same
calibration samples) is measured too, labelled "reference".

Calibration ranges here are MinMax: over real photos (calib_sets/demo_calib.toml)
for the demo model, evaluated on other photos (demo_val.toml); over uniform
random inputs for the generated model (its accuracy numbers only compare
candidates with each other). Latency, size and build time do not depend on
how good the ranges are.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantlab.atomic import write_json  # noqa: E402
from quantlab.backends import get_backend  # noqa: E402
from quantlab.backends.ort import int8_dot_saturates  # noqa: E402
from quantlab.errors import QuantlabError  # noqa: E402
from quantlab.fingerprint import tool_versions  # noqa: E402
from quantlab.graph import LoadedModel, activation_names, load_model  # noqa: E402
from quantlab.perf import LatencyResult, latency_from_samples, random_feeds  # noqa: E402
from quantlab.table import CalibrationTable, TensorRange  # noqa: E402

TARGET_SPEEDUP = 1.5
"""The issue's target: INT8 (ONNX Runtime form) p50 latency at least 1.5x lower than FP32 on the demo model."""

INTEGER_KERNELS = {"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm",
                   "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearSigmoid",
                   "QLinearLeakyRelu", "QLinearConcat", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
FLOAT_COMPUTE = {"Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul", "FusedGemm"}


# --------------------------------------------------------------------------- models


def resnet18_style(seed: int = 0, size: int = 224, classes: int = 1000) -> onnx.ModelProto:
    """ResNet-18 layout (7x7/2 stem, max-pool, 4 stages x 2 basic blocks, 1x1 projection shortcuts).

    BatchNorm is folded (conv bias); He-initialised weights with the residual
    branch scaled by 0.2 keep activations bounded through 8 blocks.
    """
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def conv(x: str, cin: int, cout: int, k: int, stride: int, name: str, gain: float = 1.0) -> str:
        w = rng.normal(0, gain * np.sqrt(2.0 / (cin * k * k)), (cout, cin, k, k)).astype(np.float32)
        b = rng.normal(0, 0.01, (cout,)).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")])
        pad = k // 2
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name,
                                      kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4))
        return name

    def relu(x: str, name: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [name], name=name))
        return name

    x = relu(conv("input", 3, 64, 7, 2, "stem"), "stem_relu")
    nodes.append(helper.make_node("MaxPool", [x], ["pool0"], name="pool0", kernel_shape=[3, 3],
                                  strides=[2, 2], pads=[1, 1, 1, 1]))
    x, cin = "pool0", 64
    for stage, cout in enumerate([64, 128, 256, 512]):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            p = f"s{stage}b{block}"
            h = relu(conv(x, cin, cout, 3, stride, f"{p}_conv1"), f"{p}_relu1")
            h = conv(h, cout, cout, 3, 1, f"{p}_conv2", gain=0.2)
            skip = conv(x, cin, cout, 1, stride, f"{p}_proj") if (stride != 1 or cin != cout) else x
            nodes.append(helper.make_node("Add", [h, skip], [f"{p}_add"], name=f"{p}_add"))
            x, cin = relu(f"{p}_add", f"{p}_out"), cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
    wf = rng.normal(0, np.sqrt(1.0 / cin), (classes, cin)).astype(np.float32)
    inits.extend([numpy_helper.from_array(wf, "fc.w"), numpy_helper.from_array(np.zeros(classes, np.float32), "fc.b")])
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "resnet18_style",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="quantlab-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def photo_samples(manifest: str, count: int) -> list[dict[str, np.ndarray]]:
    """The first ``count`` samples (batch 1) of a data-set manifest under calib_sets/."""
    from quantlab.data import open_dataset

    out: list[dict[str, np.ndarray]] = []
    for batch in open_dataset(ROOT / "calib_sets" / manifest).batches(1):
        out.append({k: np.asarray(v) for k, v in batch.feeds.items()})
        if len(out) >= count:
            break
    return out


def load_bench_models(names: list[str], folder: Path) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    for name in names:
        if name == "demo":
            try:
                from quantlab.zoo import efficientnet_lite0_onnx

                paths["efficientnet_lite0"] = efficientnet_lite0_onnx(progress=True)
            except (ImportError, QuantlabError) as exc:
                print(f"bench: skipping the demo model: {exc}", file=sys.stderr)
        elif name == "resnet":
            path = folder / "resnet18_style.onnx"
            onnx.save(resnet18_style(), path)
            paths["resnet18_style"] = path
        else:
            raise SystemExit(f"unknown model {name!r}: choose demo and/or resnet")
    return paths


# --------------------------------------------------------------------------- calibration


def calibration_samples(model: LoadedModel, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Uniform [-1, 1] inputs (the range the demo's (x-127)/128 preprocessing produces)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        feeds = random_feeds(model, 1, seed=int(rng.integers(1 << 31)))
        out.append({k: rng.uniform(-1, 1, v.shape).astype(v.dtype) for k, v in feeds.items()})
    return out


def minmax_table(model: LoadedModel, samples: list[dict[str, np.ndarray]]) -> CalibrationTable:
    """Per-tensor MinMax ranges of every float activation over ``samples``."""
    names = activation_names(model.proto)
    runner = get_backend("ort").build(model.proto, outputs=[n for n in names if n not in model.input_names])
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for feeds in samples:
        values = {**feeds, **runner.run(feeds)}
        for name in names:
            v = values[name]
            lo[name] = min(lo.get(name, np.inf), float(v.min()))
            hi[name] = max(hi.get(name, -np.inf), float(v.max()))
    ranges = {n: TensorRange(amax=max(abs(lo[n]), abs(hi[n])), min=lo[n], max=hi[n]) for n in names}
    return CalibrationTable(method="minmax", ranges=ranges, model_sha256=model.sha256,
                            settings={"samples": len(samples), "source": "bench/build.py uniform[-1,1]"})


# --------------------------------------------------------------------------- candidates


def writer_candidates(model: LoadedModel, table: CalibrationTable) -> dict[str, Callable[[], onnx.ModelProto]]:
    """name -> function writing that candidate with quantlab's writer (timed by the caller)."""
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, write_model

    def written(precision: str, target: str) -> Callable[[], onnx.ModelProto]:
        def make() -> onnx.ModelProto:
            plan = uniform_plan(precision)
            result = write_model(model, plan, table, WriteOptions(target=target))
            return result if isinstance(result, onnx.ModelProto) else result.proto

        return make

    def written_rr() -> onnx.ModelProto:
        return write_model(model, uniform_plan("int8"), table, WriteOptions(target="ort", reduce_range=True)).proto

    return {
        "int8 tensorrt-form": written("int8", "tensorrt"),
        "int8 ort-form": written("int8", "ort"),
        "int8 ort-form reduce_range": written_rr,
        "fp16": written("fp16", "tensorrt"),
    }


def ort_reference_int8(model_path: Path, samples: list[dict[str, np.ndarray]]) -> Callable[[], onnx.ModelProto]:
    """ONNX Runtime's own quantize_static (QDQ, uint8 activations, per-channel weights): a placement cross-check."""

    def make() -> onnx.ModelProto:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._it = iter(samples)

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self._it, None)

        logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" notice
        with tempfile.TemporaryDirectory(prefix="quantlab-bench-") as tmp:
            out = Path(tmp) / "ref.onnx"
            quantize_static(str(model_path), str(out), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
            return onnx.load(str(out))

    return make


# --------------------------------------------------------------------------- measurement


def op_summary(optimized: onnx.ModelProto) -> dict[str, Any]:
    """What ONNX Runtime runs: integer kernels vs float compute ops vs leftover Q/DQ."""
    ops = Counter(n.op_type for n in optimized.graph.node)
    return {
        "integer_kernels": sum(v for k, v in ops.items() if k in INTEGER_KERNELS),
        "float_compute": sum(v for k, v in ops.items() if k in FLOAT_COMPUTE),
        "quantize": ops.get("QuantizeLinear", 0) + ops.get("DynamicQuantizeLinear", 0),
        "dequantize": ops.get("DequantizeLinear", 0),
        "ops": dict(sorted(ops.items())),
    }


def accuracy(runner: Any, samples: list[dict[str, np.ndarray]],
             reference: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Error of ``runner``'s outputs against FP32 over ``samples``: max / mean relative, top-1 agreement."""
    max_rel, abs_err, abs_ref, agree = 0.0, 0.0, 0.0, 0
    for feeds, ref in zip(samples, reference, strict=True):
        got = runner.run(feeds)
        for name, want in ref.items():
            diff = np.abs(got[name].astype(np.float64) - want)
            max_rel = max(max_rel, float(diff.max() / max(np.abs(want).max(), 1e-12)))
            abs_err, abs_ref = abs_err + float(diff.mean()), abs_ref + float(np.abs(want).mean())
        first = next(iter(ref))
        agree += int(np.argmax(got[first]) == np.argmax(ref[first]))
    return {"max_rel_err": max_rel, "mean_rel_err": abs_err / max(abs_ref, 1e-12),
            "top1_agree": agree / len(samples)}


def measure_candidate(name: str, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], *,
                      write_s: float | None, folder: Path,
                      eval_samples: list[dict[str, np.ndarray]],
                      reference: list[dict[str, np.ndarray]],
                      timed: dict[str, Any], threads: int = 1) -> dict[str, Any]:
    """Size, session / engine build time, accuracy and ORT's fused graph of one candidate.

    Its ORT runners go into ``timed`` (key -> runner) for :func:`interleaved_latency`.
    """
    path = folder / f"{name.replace(' ', '_')}.onnx"
    onnx.save(model, path)
    row: dict[str, Any] = {"candidate": name, "write_s": write_s, "size_mb": path.stat().st_size / 1e6}
    ort = get_backend("ort", qdq_fusion=True, threads=threads)  # the fast path: Q/DQ fused into integer kernels
    t0 = time.perf_counter()
    runner = ort.build(model)
    row["ort_session_s"] = time.perf_counter() - t0
    timed[name] = runner
    row["accuracy_fused"] = accuracy(runner, eval_samples, reference)
    row["ort_graph"] = op_summary(ort.optimized_model(model))
    if name in ("fp32", "int8 ort-form"):
        row["ort_time_by_kind_ms"] = time_by_kind(model, feeds, threads)
    if any(n.op_type == "DequantizeLinear" for n in model.graph.node):
        plain = get_backend("ort", qdq_fusion=False, threads=threads).build(model)
        timed[f"{name} (unfused)"] = plain
        row["accuracy_unfused"] = accuracy(plain, eval_samples, reference)
        row["ort_auto_fuses"] = get_backend("ort").fuses(model)
    try:
        rtx = get_backend("tensorrt-rtx")
        t0 = time.perf_counter()
        engine = rtx.build_engine(model, profiles_from={k: v.shape for k, v in feeds.items()}, label=name)
        row["rtx_build_s"] = time.perf_counter() - t0
        row["rtx_engine_mb"] = len(engine) / 1e6
        row["rtx_error"] = None
    except QuantlabError as exc:
        row["rtx_build_s"] = None
        row["rtx_engine_mb"] = None
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        row["rtx_error"] = " | ".join(lines[:2])
    return row


def time_by_kind(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], threads: int) -> dict[str, float]:
    """Milliseconds per run spent in dense convs, depthwise convs and everything else (ORT's profiler).

    Depthwise convolutions are where INT8 gains least on a CPU: this split says
    how much of the FP32 time INT8 can speed up at all.
    """
    ort = get_backend("ort", qdq_fusion=True, threads=threads)
    groups = {}
    for node in ort.optimized_model(model).graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        groups[node.name] = "depthwise conv" if group > 1 else ("dense conv" if "Conv" in node.op_type else "other")
    out = {"dense conv": 0.0, "depthwise conv": 0.0, "other": 0.0}
    for node, entry in ort.profile(model, feeds, runs=20).items():
        out[groups.get(node, "other")] += entry["ms"]
    return out


def interleaved_latency(runners: Mapping[str, Any], feeds: Mapping[str, np.ndarray], *, iterations: int,
                        warmup: int, per_round: int = 3) -> dict[str, LatencyResult]:
    """Batch-1 latency of every runner, timed in interleaved rounds.

    This machine is shared: load that comes and goes would bias a ratio of two
    candidates timed one after the other. Each round runs ``per_round`` timed
    calls of every runner, in an order that rotates from round to round, so all
    candidates see the same background; each keeps ``iterations`` samples.
    """
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name].run(feeds)
    samples: dict[str, list[float]] = {n: [] for n in names}
    rounds = -(-iterations // per_round)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            for _ in range(per_round):
                t0 = time.perf_counter()
                runners[name].run(feeds)
                samples[name].append(time.perf_counter() - t0)
    return {n: latency_from_samples(np.array(v), wall_seconds=float(np.sum(v)), batch_size=1, warmup=warmup)
            for n, v in samples.items()}


def bench_model(label: str, path: Path, args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    model = load_model(path)
    feeds = {k: np.random.default_rng(1).uniform(-1, 1, v.shape).astype(v.dtype)
             for k, v in random_feeds(model, 1).items()}
    if label == "efficientnet_lite0":
        samples = photo_samples("demo_calib.toml", args.calib_samples)
        eval_samples = photo_samples("demo_val.toml", args.eval_samples)
        source = "photos: demo_calib.toml / demo_val.toml"
    else:
        samples = calibration_samples(model, args.calib_samples)
        eval_samples = calibration_samples(model, args.eval_samples, seed=1)
        source = "uniform [-1, 1] random inputs"
    print(f"bench: {label}: calibrating (minmax, {len(samples)} samples, {source})", file=sys.stderr, flush=True)
    table = minmax_table(model, samples)
    fp32_runner = get_backend("ort").build(model.proto)
    reference = [{k: v.astype(np.float64) for k, v in fp32_runner.run(f).items()} for f in eval_samples]
    timed: dict[str, Any] = {}
    measure = {"folder": folder, "eval_samples": eval_samples, "reference": reference, "timed": timed,
               "threads": args.threads}
    rows = []
    print(f"bench: {label}: fp32", file=sys.stderr, flush=True)
    rows.append(measure_candidate("fp32", model.proto, feeds, write_s=None, **measure))
    candidates: dict[str, Callable[[], onnx.ModelProto]] = {}
    try:
        candidates.update(writer_candidates(model, table))
    except ImportError as exc:
        print(f"bench: quantlab's writer is not available ({exc}); measuring the reference only", file=sys.stderr)
    candidates["int8 ort quantize_static (reference)"] = ort_reference_int8(path, samples)
    for name, make in candidates.items():
        print(f"bench: {label}: {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            proto = make()
        except Exception as exc:  # record and go on: one broken candidate must not hide the others
            rows.append({"candidate": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        write_s = time.perf_counter() - t0
        rows.append(measure_candidate(name, proto, feeds, write_s=write_s, **measure))
    print(f"bench: {label}: ORT CPU latency of {len(timed)} sessions, interleaved", file=sys.stderr, flush=True)
    latency = interleaved_latency(timed, feeds, iterations=args.iterations, warmup=args.warmup)
    for row in rows:
        for key, suffix in ((row.get("candidate"), ""), (f"{row.get('candidate')} (unfused)", "_unfused")):
            if key in latency:
                lat = latency[key]
                row.update({f"p50{suffix}_ms": lat.p50_ms, f"mean{suffix}_ms": lat.mean_ms,
                            f"p99{suffix}_ms": lat.p99_ms, f"latency{suffix}": lat.as_dict()})
    fp32 = rows[0]["p50_ms"]
    for row in rows:
        row["model"] = label
        row["data"] = source
        if "p50_ms" in row:
            row["speedup_vs_fp32"] = fp32 / row["p50_ms"]
        if "p50_unfused_ms" in row:
            row["speedup_unfused_vs_fp32"] = fp32 / row["p50_unfused_ms"]
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    cols = ["model", "candidate", "size_mb", "write_s", "ort_session_s", "rtx_build_s", "p50_ms", "mean_ms",
            "p99_ms", "speedup_vs_fp32", "p50_unfused_ms"]
    frame = pd.DataFrame([{c: r.get(c) for c in cols} | {
        "int8 kernels": r.get("ort_graph", {}).get("integer_kernels"),
        "float convs": r.get("ort_graph", {}).get("float_compute"),
        "Q/DQ left": (r["ort_graph"]["quantize"] + r["ort_graph"]["dequantize"]) if "ort_graph" in r else None,
    } for r in rows])
    accuracy_frame = pd.DataFrame([{
        "model": r["model"], "candidate": r["candidate"],
        "max rel err fused": r.get("accuracy_fused", {}).get("max_rel_err"),
        "mean rel err fused": r.get("accuracy_fused", {}).get("mean_rel_err"),
        "top1 fused": r.get("accuracy_fused", {}).get("top1_agree"),
        "max rel err unfused": r.get("accuracy_unfused", {}).get("max_rel_err"),
        "mean rel err unfused": r.get("accuracy_unfused", {}).get("mean_rel_err"),
        "top1 unfused": r.get("accuracy_unfused", {}).get("top1_agree"),
        "auto fuses": r.get("ort_auto_fuses"),
    } for r in rows if "accuracy_fused" in r])
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print()
        print("error against FP32 (ORT CPU; fused = integer kernels, unfused = Q/DQ as written):")
        print(accuracy_frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for r in rows:
        if r.get("error"):
            print(f"{r['model']} / {r['candidate']}: failed: {r['error']}")
        if r.get("rtx_error"):
            print(f"{r['model']} / {r['candidate']}: TensorRT-RTX refused it: {r['rtx_error']}")


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    """Sentences on the 1.5x target and, when missed, what ORT's optimised graph shows."""
    notes = []
    for row in rows:
        if not str(row.get("candidate", "")).startswith("int8 ") or "speedup_vs_fp32" not in row:
            continue
        g = row["ort_graph"]
        text = (f"{row['model']} {row['candidate']}: {row['speedup_vs_fp32']:.2f}x FP32 (p50, fused); ORT runs "
                f"{g['integer_kernels']} integer kernels, {g['float_compute']} float conv/matmul/gemm, "
                f"{g['quantize']} Quantize + {g['dequantize']} Dequantize left after fusion")
        if row["candidate"].startswith("int8 ort-form") and row["model"] == "efficientnet_lite0":
            ok = row["speedup_vs_fp32"] >= TARGET_SPEEDUP
            text += f" -> target >= {TARGET_SPEEDUP}x {'met' if ok else 'MISSED'}"
        fp32 = next((r for r in rows if r.get("model") == row["model"] and r.get("candidate") == "fp32"), None)
        mine = row.get("ort_time_by_kind_ms")
        if mine and fp32 and fp32.get("ort_time_by_kind_ms"):
            base = fp32["ort_time_by_kind_ms"]
            parts = [f"{kind} {base[kind]:.1f} -> {mine[kind]:.1f} ms ({base[kind] / max(mine[kind], 1e-9):.2f}x)"
                     for kind in ("dense conv", "depthwise conv") if base[kind] > 0]
            share = base["depthwise conv"] / max(sum(base.values()), 1e-9)
            text += f"; ORT profile: {', '.join(parts)}; depthwise = {share:.0%} of FP32 time"
        fused, plain = row.get("accuracy_fused"), row.get("accuracy_unfused")
        if fused and plain:
            text += (f"; error vs FP32 fused {fused['mean_rel_err']:.4f} (top-1 {fused['top1_agree']:.0%}) / "
                     f"unfused {plain['mean_rel_err']:.4f} (top-1 {plain['top1_agree']:.0%}); quantlab's "
                     f"ORT backend {'fuses' if row.get('ort_auto_fuses') else 'runs it unfused'} on this CPU")
        notes.append(text)
    return notes


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,resnet", help="comma list: demo, resnet")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="ORT intra-op threads for the timed sessions (default 1: a per-core ratio that "
                             "other processes on a shared machine disturb least; 0 = one per core)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "build.json")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="quantlab-bench-") as tmp:
        folder = Path(tmp)
        for label, path in load_bench_models(args.models.split(","), folder).items():
            sub = folder / label
            sub.mkdir()
            rows.extend(bench_model(label, path, args, sub))
    print_table(rows)
    notes = verdict(rows)
    for line in notes:
        print(line)
    write_json(args.out, {
        "rows": rows,
        "verdict": notes,
        "settings": {"iterations": args.iterations, "warmup": args.warmup, "batch_size": 1, "timing": "interleaved",
                     "calib_samples": args.calib_samples, "eval_samples": args.eval_samples,
                     "threads": args.threads, "cpus": os.cpu_count()},
        "machine": {"cpu": cpu_name(), "int8_dot_saturates": int8_dot_saturates()},
        "tool_versions": tool_versions(),
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
