"""quantlab's sensitivity search vs NNCF's ``quantize_with_accuracy_control`` (ONNX backend), side by side.

    python bench/search.py [--cosine 0.995] [--top1-agreement 0] [--samples 160] [--skip-nncf]
                           [--out bench/results/search.json]

Same model (EfficientNet-Lite0 from quantlab.zoo), same calibration photos
(calib_sets/demo_calib.toml, 128 views), same validation photos
(calib_sets/demo_val.toml, 160 labelled views), same threshold on the same metric:

- ``cosine``: the mean over samples of the cosine similarity between the candidate's and the
  FP32 model's logits, the comparator's ``cosine`` column; the threshold ``cosine >= c`` is
  NNCF's ``max_drop = 100 * (1 - c)`` on a validation function that returns that mean
  (x 100, FP32 scores 100) and the per-sample values for its ranking;
- optionally (``--top1-agreement A``) a second row with ``top1_agreement >= A`` (% of
  samples whose top-1 class matches FP32).

Columns: full validations (passes over the whole validation set; NNCF's per-sample ranking
calls are counted apart), wall time (calibration / statistics included for both), the final
metric measured afterwards by one independent numpy/onnxruntime function on each tool's
final model, twice: with Q/DQ run as written ("exact": the ONNX semantics, what TensorRT
computes, and what quantlab's ORT backend runs on this CPU) and with ONNX Runtime's default
fused integer kernels ("ORT fused": what NNCF validates with; on x86 CPUs without VNNI those
kernels saturate, see quantlab.backends.ort), and the INT8 fraction: for quantlab the plan's share of quantizable fusion
groups in INT8, and for both the share of Conv/Gemm nodes whose data input comes from a
DequantizeLinear (the same count on both ONNX files).

quantlab runs as a user would: percentile calibration, Q/DQ written for TensorRT
(simulated on ONNX Runtime, FP16 groups rounded as a GPU would), default budget. NNCF
runs its own quantizer (ONNX Runtime Q/DQ, fast bias correction) and reverts groups to
FP32 one by one until the drop is met.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantlab.atomic import write_json  # noqa: E402
from quantlab.fingerprint import tool_versions  # noqa: E402

CALIB = ROOT / "calib_sets" / "demo_calib.toml"
VAL = ROOT / "calib_sets" / "demo_val.toml"


def _session(model: onnx.ModelProto | str, exact: bool = False) -> Any:
    """A CPU session; ``exact`` keeps Q/DQ as written (ONNX semantics, what TensorRT computes)
    instead of letting ORT fuse integer kernels, which saturate on x86 CPUs without VNNI
    (see quantlab.backends.ort)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if exact:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _logits(model: onnx.ModelProto | str, x: np.ndarray, batch: int = 16, exact: bool = False) -> np.ndarray:
    s = _session(model, exact)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def _cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    ref = ref.reshape(len(ref), -1).astype(np.float64)
    out = out.reshape(len(out), -1).astype(np.float64)
    return (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))


def score(ref: np.ndarray, out: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The independent measure applied to both tools' final models."""
    return {
        "cosine": float(_cosines(ref, out).mean()),
        "top1_agreement": float((ref.argmax(1) == out.argmax(1)).mean() * 100),
        "top1_drop": float(((ref.argmax(1) == labels).mean() - (out.argmax(1) == labels).mean()) * 100),
        "sqnr_db": float(10 * np.log10((ref.astype(np.float64) ** 2).sum()
                                       / ((ref.astype(np.float64) - out) ** 2).sum())),
    }


def int8_compute_fraction(model: onnx.ModelProto) -> float:
    """Share of Conv/ConvTranspose/Gemm/MatMul nodes whose data input is a DequantizeLinear output."""
    producer = {o: n for n in model.graph.node for o in n.output}
    compute = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    if not compute:
        return 0.0

    def from_dq(tensor: str) -> bool:
        node = producer.get(tensor)
        # a Cast of a DQ output (fp16 regions) is not INT8
        return node is not None and node.op_type == "DequantizeLinear"

    return sum(from_dq(n.input[0]) for n in compute) / len(compute)


def load_data(samples: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from quantlab.data import open_dataset

    cal = np.concatenate([b.feeds["input"] for b in open_dataset(CALIB).batches(16)])
    batches = list(open_dataset(VAL).batches(16))
    x = np.concatenate([b.feeds["input"] for b in batches])
    y = np.concatenate([b.labels for b in batches]).astype(np.int64)
    if samples is not None:
        x, y = x[:samples], y[:samples]
    return cal, x, y


# --------------------------------------------------------------------------- quantlab


def run_quantlab(model_path: Path, x: np.ndarray, y: np.ndarray, ref: np.ndarray, threshold: str) -> dict[str, Any]:
    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays, open_dataset
    from quantlab.graph import load_model
    from quantlab.quantize import WriteOptions, write_model
    from quantlab.search import SearchOptions, search

    start = time.perf_counter()
    model = load_model(model_path)
    table = calibrate(model, open_dataset(CALIB), ["percentile"]).tables["percentile"]
    t_cal = time.perf_counter() - start
    val = from_arrays({"input": x}, labels=y, role="validation", name="demo_val")
    options = SearchOptions(threshold=threshold)
    with tempfile.TemporaryDirectory() as work:
        result = search(model, table, val, options, workdir=work)
    wall = time.perf_counter() - start
    traj = result.trajectory
    evaluated = traj[~traj["cached"]]
    sim = write_model(model, result.plan, table, WriteOptions(target=options.target, fp16_simulation=True))
    final = score(ref, _logits(sim.proto, x, exact=True), y)
    fused = score(ref, _logits(sim.proto, x), y)
    return {
        "tool": "quantlab search",
        "met": bool(result.met),
        "full_validations": int(result.evaluations),
        "bound": int(result.bound),
        "subset_evaluations": int((~evaluated["full"]).sum()),
        "subset_samples": int(evaluated.loc[~evaluated["full"], "samples"].max()) if (~evaluated["full"]).any() else 0,
        "wall_s": round(wall, 1),
        "calibration_s": round(t_cal, 1),
        "final": final,
        "final_ort_fused": fused,
        "int8_fraction_groups": round(result.plan.int8_fraction(), 4),
        "int8_fraction_compute": round(int8_compute_fraction(result.final.proto), 4),
        "pinned": {g: p for g, p in result.plan.precision.items()
                   if p != "int8" and result.plan.group_map[g].quantizable},
        "all_int8": {k: traj[k].iloc[0] for k in ("metric", "value")},
        "message": result.message,
        "trajectory": [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()}
                       for r in traj[["step", "phase", "n_pinned", "value", "passed", "samples", "full", "cached",
                                      "seconds"]].to_dict("records")],
    }


# --------------------------------------------------------------------------- NNCF


class _NncfValidation:
    """NNCF's validation_fn: the mean cosine to the FP32 logits (x 100) and per-sample values.

    Sessions are cached per model object (the model is kept alive with it, so its id cannot
    be reused), because NNCF's ranking calls the function once per sample.
    """

    def __init__(self, ref: np.ndarray, size: int, top1: bool = False) -> None:
        self.ref = ref
        self.size = size
        self.top1 = top1
        self.full = 0
        self.partial_calls = 0
        self.partial_samples = 0
        self._cache: dict[int, tuple[Any, Any]] = {}

    def _session(self, model: onnx.ModelProto) -> Any:
        key = id(model)
        if key not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = (model, _session(model))
        return self._cache[key][1]

    def __call__(self, model: onnx.ModelProto, data: Any) -> tuple[float, list[float]]:
        s = self._session(model)
        name = s.get_inputs()[0].name
        values = []
        for index, x in data:
            out = s.run(None, {name: x})[0]
            ref = self.ref[index:index + 1]
            if self.top1:
                values.append(float(out.argmax(1)[0] == ref.argmax(1)[0]) * 100)
            else:
                values.append(float(_cosines(ref, out)[0]) * 100)
        if len(values) == self.size:
            self.full += 1
        else:
            self.partial_calls += 1
            self.partial_samples += len(values)
        return float(np.mean(values)), values


def run_nncf(model_path: Path, cal: np.ndarray, x: np.ndarray, y: np.ndarray, ref: np.ndarray, max_drop: float,
             top1: bool) -> dict[str, Any]:
    import nncf

    logging.getLogger("nncf").setLevel(logging.WARNING)
    start = time.perf_counter()
    proto = onnx.load(str(model_path))
    caldata = nncf.Dataset([cal[i:i + 1] for i in range(len(cal))], lambda a: {"input": a})
    valdata = nncf.Dataset([(i, x[i:i + 1]) for i in range(len(x))], lambda item: {"input": item[1]})
    validation = _NncfValidation(ref, len(x), top1=top1)
    quantized = nncf.quantize_with_accuracy_control(proto, caldata, valdata, validation, max_drop=max_drop,
                                                    subset_size=len(cal))
    wall = time.perf_counter() - start
    final = score(ref, _logits(quantized, x, exact=True), y)
    fused = score(ref, _logits(quantized, x), y)
    return {
        "tool": f"NNCF {nncf.__version__} quantize_with_accuracy_control",
        "full_validations": validation.full,
        "ranking_calls": validation.partial_calls,
        "ranking_samples": validation.partial_samples,
        "wall_s": round(wall, 1),
        "final": final,
        "final_ort_fused": fused,
        "int8_fraction_compute": round(int8_compute_fraction(quantized), 4),
        "max_drop": max_drop,
    }


# --------------------------------------------------------------------------- table


def _row(cells: Sequence[Any], widths: Sequence[int]) -> str:
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))


def print_table(results: Sequence[Mapping[str, Any]]) -> None:
    head = ["threshold", "tool", "met", "full evals", "other evals", "wall s", "final (exact Q/DQ)",
            "final (ORT fused)", "top1 agree", "INT8 (compute)", "INT8 (groups)"]
    rows = []
    for r in results:
        metric = r["metric"]
        other = (f"{r['subset_evaluations']} x {r['subset_samples']} samples" if "subset_evaluations" in r
                 else f"{r['ranking_calls']} calls / {r['ranking_samples']} samples")
        met = r.get("met", r["final_ort_fused"][metric] >= r["target"])  # NNCF validated with ORT's fused kernels
        rows.append([r["threshold"], r["tool"].split(" quantize")[0], "yes" if met else "no",
                     f"{r['full_validations']}" + (f" (bound {r['bound']})" if "bound" in r else ""), other,
                     r["wall_s"], f"{metric}={r['final'][metric]:.5g}",
                     f"{metric}={r['final_ort_fused'][metric]:.5g}", f"{r['final']['top1_agreement']:.1f}%",
                     f"{r['int8_fraction_compute']:.0%}",
                     f"{r['int8_fraction_groups']:.0%}" if "int8_fraction_groups" in r else "-"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    print(_row(head, widths))
    print(_row(["-" * w for w in widths], widths))
    for row in rows:
        print(_row(row, widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cosine", type=float, default=0.995, help="threshold cosine >= C (default 0.995)")
    parser.add_argument("--top1-agreement", type=float, default=0.0,
                        help="also run top1_agreement >= A (percent; 0 = skip)")
    parser.add_argument("--samples", type=int, default=None, help="first N validation samples (default all)")
    parser.add_argument("--skip-nncf", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "search.json")
    args = parser.parse_args(argv)

    from quantlab.zoo import efficientnet_lite0_onnx

    model_path = efficientnet_lite0_onnx()
    cal, x, y = load_data(args.samples)
    ref = _logits(str(model_path), x)
    cases = [("cosine", args.cosine, f"cosine>={args.cosine:g}", 100 * (1 - args.cosine))]
    if args.top1_agreement:
        cases.append(("top1_agreement", args.top1_agreement, f"top1_agreement>={args.top1_agreement:g}",
                      100 - args.top1_agreement))
    results = []
    for metric, target, threshold, max_drop in cases:
        print(f"== {threshold}: quantlab search", flush=True)
        q = run_quantlab(model_path, x, y, ref, threshold)
        results.append({"threshold": threshold, "metric": metric, "target": target, **q})
        if not args.skip_nncf:
            print(f"== {threshold}: NNCF quantize_with_accuracy_control (max_drop {max_drop:g})", flush=True)
            n = run_nncf(model_path, cal, x, y, ref, max_drop, top1=metric == "top1_agreement")
            results.append({"threshold": threshold, "metric": metric, "target": target, **n})
    print()
    print_table(results)
    write_json(args.out, {
        "bench": "search",
        "model": "efficientnet_lite0 (quantlab.zoo)",
        "calibration": str(CALIB.relative_to(ROOT)),
        "validation": str(VAL.relative_to(ROOT)),
        "validation_samples": len(x),
        "results": results,
        "versions": tool_versions(),
    })
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
