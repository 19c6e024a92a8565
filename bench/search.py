"""quantlab's sensitivity search vs NNCF's ``quantize_with_accuracy_control`` (ONNX backend), side by side.

    python bench/search.py [--model lite0|lite2] [--per-tensor-weights] [--cosine 0.995]
                           [--agreement 99.5 ...] [--samples 160] [--skip-nncf] [--out ...json]

Same model (EfficientNet-Lite0 or -Lite2 from quantlab.zoo), same calibration photos
(calib_sets/demo_calib.toml, 128 views; 260-pixel crops for Lite2), same validation photos
(calib_sets/demo_val.toml, 160 labelled views), same threshold on the same metric. First
the all-INT8 baselines (quantlab without and with bias correction, NNCF's plain
``nncf.quantize``: agreement and cosine), then per threshold:

- ``cosine``: the mean over samples of the cosine similarity between the candidate's and the
  FP32 model's logits, the comparator's ``cosine`` column; the threshold ``cosine >= c`` is
  NNCF's ``max_drop = 100 * (1 - c)`` on a validation function that returns that mean
  (x 100, FP32 scores 100) and the per-sample values for its ranking;
- ``--agreement A``: ``top1_agreement >= A`` (% of samples whose top-1 class matches FP32),
  NNCF's ``max_drop = 100 - A`` on a validation function returning that percentage.

"items": samples run through a candidate model on validation data (quantlab: full
validations plus the ranking subset passes; NNCF: its full validations plus its per-sample
ranking calls).

Columns: full validations (passes over the whole validation set; NNCF's per-sample ranking
calls are counted apart), wall time (calibration / statistics included for both), the final
metric measured afterwards by one independent numpy/onnxruntime function on each tool's
final model, twice: with Q/DQ run as written ("exact": the ONNX semantics, what TensorRT
computes, and what quantlab's ORT backend runs on this CPU) and with ONNX Runtime's default
fused integer kernels ("ORT fused": what NNCF validates with; on x86 CPUs without VNNI those
kernels saturate, see quantlab.backends.ort), and the INT8 fraction: for quantlab the plan's share of quantizable fusion
groups in INT8, and for both the share of Conv/Gemm nodes whose data input comes from a
DequantizeLinear (the same count on both ONNX files).

quantlab runs as a user would: percentile calibration, bias correction (its default, on the
calibration set), Q/DQ written for TensorRT (simulated on ONNX Runtime with Q/DQ run as
written, so its own validations measure what the "exact" column measures; FP16 groups rounded
as a GPU would), default budget; "cpu s" is the process's CPU time (calibration included), the
honest figure on a shared machine where wall time depends on the other jobs. NNCF runs its own quantizer (ONNX Runtime Q/DQ, fast bias
correction) and reverts groups to FP32 one by one until the drop is met.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
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


def _manifest(path: Path, resolution: int, tmp: Path) -> Path:
    """The demo manifest, or a copy cropping ``resolution`` pixels (0.875 crop ratio) for Lite2."""
    if resolution == 224:
        return path
    text = path.read_text().replace("resize = 256", f"resize = {round(resolution / 0.875)}")
    text = text.replace("center_crop = 224", f"center_crop = {resolution}")
    out = tmp / path.name
    out.write_text(text)
    return out


def load_data(samples: int | None, resolution: int, tmp: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    from quantlab.data import open_dataset

    calib = _manifest(CALIB, resolution, tmp)
    cal = np.concatenate([b.feeds["input"] for b in open_dataset(calib).batches(16)])
    batches = list(open_dataset(_manifest(VAL, resolution, tmp)).batches(16))
    x = np.concatenate([b.feeds["input"] for b in batches])
    y = np.concatenate([b.labels for b in batches]).astype(np.int64)
    if samples is not None:
        x, y = x[:samples], y[:samples]
    return calib, cal, x, y


# --------------------------------------------------------------------------- quantlab


def quantlab_baselines(model_path: Path, calib: Path, x: np.ndarray, y: np.ndarray, ref: np.ndarray,
                       per_channel: bool) -> dict[str, Any]:
    """All-INT8 (TensorRT form) without and with bias correction: the scores and the correction's cost."""
    from quantlab.calibrate import calibrate
    from quantlab.data import open_dataset
    from quantlab.graph import load_model
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, measure_bias_correction, write_model

    model = load_model(model_path)
    table = calibrate(model, open_dataset(calib), ["percentile"]).tables["percentile"]
    opts = WriteOptions(target="tensorrt", per_channel_weights=per_channel)
    start = time.perf_counter()
    bc = measure_bias_correction(model, table, open_dataset(calib), opts)
    t_bc = time.perf_counter() - start
    out = {}
    for name, o in (("quantlab all-INT8", opts), ("quantlab all-INT8 + bias correction",
                                                  WriteOptions(target="tensorrt", per_channel_weights=per_channel,
                                                               bias_correction=bc))):
        w = write_model(model, uniform_plan("int8"), table, o)
        out[name] = score(ref, _logits(w.proto, x, exact=True), y)
    out["bias_correction_s"] = round(t_bc, 1)
    return out


def run_quantlab(model_path: Path, calib: Path, x: np.ndarray, y: np.ndarray, ref: np.ndarray, threshold: str,
                 per_channel: bool) -> dict[str, Any]:
    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays, open_dataset
    from quantlab.graph import load_model
    from quantlab.quantize import write_model
    from quantlab.search import SearchOptions, search

    start = time.perf_counter()
    cpu0 = time.process_time()
    model = load_model(model_path)
    table = calibrate(model, open_dataset(calib), ["percentile"]).tables["percentile"]
    t_cal = time.perf_counter() - start
    val = from_arrays({"input": x}, labels=y, role="validation", name="demo_val")
    options = SearchOptions(threshold=threshold, per_channel_weights=per_channel)
    with tempfile.TemporaryDirectory() as work:
        result = search(model, table, val, options, workdir=work, calib=open_dataset(calib))
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    traj = result.trajectory
    evaluated = traj[~traj["cached"]]
    sim = write_model(model, result.plan, table, dataclasses.replace(result.final.options, fp16_simulation=True))
    final = score(ref, _logits(sim.proto, x, exact=True), y)
    fused = score(ref, _logits(sim.proto, x), y)
    groups = [g for g in result.plan.groups if g.quantizable]
    return {
        "tool": "quantlab search",
        "met": bool(result.met),
        "full_validations": int(result.evaluations),
        "bound": int(result.bound),
        "subset_evaluations": int((~evaluated["full"]).sum()),
        "subset_samples": int(evaluated.loc[~evaluated["full"], "samples"].max()) if (~evaluated["full"]).any() else 0,
        "items": int(evaluated["samples"].sum()),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "calibration_s": round(t_cal, 1),
        "final": final,
        "final_ort_fused": fused,
        "int8_fraction_groups": round(result.plan.int8_fraction(), 4),
        "groups_int8": f"{sum(result.plan.precision[g.name] == 'int8' for g in groups)} of {len(groups)}",
        "int8_fraction_compute": round(int8_compute_fraction(result.final.proto), 4),
        "pinned": {g: p for g, p in result.plan.precision.items()
                   if p != "int8" and result.plan.group_map[g].quantizable},
        "all_int8": {k: traj[k].iloc[0] for k in ("metric", "value")},
        "message": result.message,
        "notes": list(result.notes),
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

    def __init__(self, ref: np.ndarray, size: int, top1: bool = False, deadline: float = math.inf) -> None:
        self.deadline = deadline
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
        if time.perf_counter() > self.deadline:
            raise _OutOfTime
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


class _OutOfTime(Exception):
    """Raised by the validation function once NNCF's time cap is spent (NNCF has no time budget)."""


def _nncf_advanced(per_channel: bool) -> Any:
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    return None if per_channel else AdvancedQuantizationParameters(
        weights_quantization_params=QuantizationParameters(per_channel=False))


def _nncf_data(cal: np.ndarray) -> Any:
    import nncf

    return nncf.Dataset([cal[i:i + 1] for i in range(len(cal))], lambda a: {"input": a})


def nncf_baseline(model_path: Path, cal: np.ndarray, x: np.ndarray, y: np.ndarray, ref: np.ndarray,
                  per_channel: bool) -> dict[str, Any]:
    """NNCF's plain ``nncf.quantize`` (fast bias correction on, its default): the all-INT8 scores."""
    import nncf

    logging.getLogger("nncf").setLevel(logging.WARNING)
    quantized = nncf.quantize(onnx.load(str(model_path)), _nncf_data(cal), subset_size=len(cal),
                              advanced_parameters=_nncf_advanced(per_channel))
    return score(ref, _logits(quantized, x, exact=True), y)


def run_nncf(model_path: Path, cal: np.ndarray, x: np.ndarray, y: np.ndarray, ref: np.ndarray, max_drop: float,
             top1: bool, per_channel: bool, cap_s: float) -> dict[str, Any]:
    import nncf

    logging.getLogger("nncf").setLevel(logging.WARNING)
    start = time.perf_counter()
    cpu0 = time.process_time()
    proto = onnx.load(str(model_path))
    valdata = nncf.Dataset([(i, x[i:i + 1]) for i in range(len(x))], lambda item: {"input": item[1]})
    validation = _NncfValidation(ref, len(x), top1=top1, deadline=start + cap_s)
    out: dict[str, Any] = {"tool": f"NNCF {nncf.__version__} quantize_with_accuracy_control", "max_drop": max_drop}
    try:
        quantized = nncf.quantize_with_accuracy_control(
            proto, _nncf_data(cal), valdata, validation, max_drop=max_drop, subset_size=len(cal),
            advanced_quantization_parameters=_nncf_advanced(per_channel))
    except _OutOfTime:
        quantized = None
    out.update({
        "finished": quantized is not None,
        "full_validations": validation.full,
        "ranking_calls": validation.partial_calls,
        "ranking_samples": validation.partial_samples,
        "items": validation.full * len(x) + validation.partial_samples,
        "wall_s": round(time.perf_counter() - start, 1),
        "cpu_s": round(time.process_time() - cpu0, 1),
    })
    if quantized is None:
        out["message"] = f"not finished within the {cap_s:g} s cap"
        return out
    out.update({"final": score(ref, _logits(quantized, x, exact=True), y),
                "final_ort_fused": score(ref, _logits(quantized, x), y),
                "int8_fraction_compute": round(int8_compute_fraction(quantized), 4)})
    return out


# --------------------------------------------------------------------------- table


def _row(cells: Sequence[Any], widths: Sequence[int]) -> str:
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))


def print_table(results: Sequence[Mapping[str, Any]]) -> None:
    head = ["threshold", "tool", "met", "full evals", "other evals", "items", "wall s", "cpu s", "final (exact Q/DQ)",
            "top1 agree", "cosine", "INT8 (compute)", "INT8 groups"]
    rows = []
    for r in results:
        metric = r["metric"]
        if "final" not in r:
            rows.append([r["threshold"], r["tool"].split(" quantize")[0], "no: " + r.get("message", "?"),
                         r["full_validations"], f"{r['ranking_calls']} calls / {r['ranking_samples']} samples",
                         r["items"], r["wall_s"], r.get("cpu_s", "-"), "-", "-", "-", "-", "-"])
            continue
        other = (f"{r['subset_evaluations']} x {r['subset_samples']} samples" if "subset_evaluations" in r
                 else f"{r['ranking_calls']} calls / {r['ranking_samples']} samples")
        met = r.get("met", r["final_ort_fused"][metric] >= r["target"])  # NNCF validated with ORT's fused kernels
        rows.append([r["threshold"], r["tool"].split(" quantize")[0], "yes" if met else "no",
                     f"{r['full_validations']}" + (f" (bound {r['bound']})" if "bound" in r else ""), other,
                     r["items"], r["wall_s"], r.get("cpu_s", "-"), f"{metric}={r['final'][metric]:.5g}",
                     f"{r['final']['top1_agreement']:.1f}%", f"{r['final']['cosine']:.4f}",
                     f"{r['int8_fraction_compute']:.0%}", r.get("groups_int8", "-")])
    _print_rows(head, rows)


def print_baselines(baselines: Mapping[str, Any]) -> None:
    head = ["all-INT8 baseline", "top1 agree", "cosine", "sqnr dB"]
    rows = [[k, f"{v['top1_agreement']:.2f}%", f"{v['cosine']:.4f}", f"{v['sqnr_db']:.2f}"]
            for k, v in baselines.items() if isinstance(v, Mapping)]
    _print_rows(head, rows)


def _print_rows(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    print(_row(head, widths))
    print(_row(["-" * w for w in widths], widths))
    for row in rows:
        print(_row(row, widths))


def reuse_nncf(path: Path, baselines: dict[str, Any], results: list[dict[str, Any]]
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """NNCF's entries of an earlier run written to ``path`` (its baseline, its runs at the thresholds
    run now), placed as a full run would place them, each marked ``reused_from``."""
    import json

    if not path.is_file():
        return baselines, results
    old = json.loads(path.read_text())
    if "NNCF nncf.quantize" in old.get("baselines", {}):
        baselines["NNCF nncf.quantize"] = {**old["baselines"]["NNCF nncf.quantize"], "reused_from": str(path.name)}
    merged = []
    for r in results:
        merged.append(r)
        merged += [{**o, "reused_from": str(path.name)} for o in old.get("results", [])
                   if str(o.get("tool", "")).startswith("NNCF") and o.get("threshold") == r["threshold"]]
    return baselines, merged


MODELS = {"lite0": ("efficientnet_lite0", 224), "lite2": ("efficientnet_lite2", 260)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="lite0")
    parser.add_argument("--per-tensor-weights", action="store_true", help="per-tensor weight scales (both tools)")
    parser.add_argument("--cosine", type=float, default=0.995, help="threshold cosine >= C (default 0.995; 0 = skip)")
    parser.add_argument("--agreement", type=float, nargs="*", default=[99.5],
                        help="thresholds top1_agreement >= A (percent; default 99.5)")
    parser.add_argument("--samples", type=int, default=None, help="first N validation samples (default all)")
    parser.add_argument("--skip-nncf", action="store_true")
    parser.add_argument("--nncf-cap", type=float, default=600.0,
                        help="seconds after which NNCF's accuracy control is stopped (default 600)")
    parser.add_argument("--nncf-min-drop", type=float, default=0.0,
                        help="run NNCF's accuracy control only for drops >= this (it may not finish tighter ones)")
    parser.add_argument("--reuse-nncf", action="store_true",
                        help="with --skip-nncf: keep NNCF's baseline and runs (same thresholds) from the --out file")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "search.json")
    args = parser.parse_args(argv)

    from quantlab.zoo import zoo_model_path

    name, resolution = MODELS[args.model]
    per_channel = not args.per_tensor_weights
    model_path = zoo_model_path(name)
    with tempfile.TemporaryDirectory() as tmp:
        calib, cal, x, y = load_data(args.samples, resolution, Path(tmp))
        ref = _logits(str(model_path), x)
        cases = [("cosine", args.cosine, f"cosine>={args.cosine:g}", 100 * (1 - args.cosine))] if args.cosine else []
        cases += [("top1_agreement", a, f"top1_agreement>={a:g}", 100 - a) for a in args.agreement]
        print("== all-INT8 baselines", flush=True)
        baselines = quantlab_baselines(model_path, calib, x, y, ref, per_channel)
        if not args.skip_nncf:
            baselines["NNCF nncf.quantize"] = nncf_baseline(model_path, cal, x, y, ref, per_channel)
        results = []
        for metric, target, threshold, max_drop in cases:
            print(f"== {threshold}: quantlab search", flush=True)
            q = run_quantlab(model_path, calib, x, y, ref, threshold, per_channel)
            results.append({"threshold": threshold, "metric": metric, "target": target, **q})
            if not args.skip_nncf and max_drop >= args.nncf_min_drop:
                print(f"== {threshold}: NNCF quantize_with_accuracy_control (max_drop {max_drop:g})", flush=True)
                n = run_nncf(model_path, cal, x, y, ref, max_drop, metric == "top1_agreement", per_channel,
                             args.nncf_cap)
                results.append({"threshold": threshold, "metric": metric, "target": target, **n})
    if args.reuse_nncf and args.skip_nncf:
        baselines, results = reuse_nncf(args.out, baselines, results)
    print()
    print_baselines(baselines)
    print()
    print_table(results)
    write_json(args.out, {
        "bench": "search",
        "model": f"{name} (quantlab.zoo)",
        "weights": "per channel" if per_channel else "per tensor",
        "calibration": str(CALIB.relative_to(ROOT)),
        "validation": str(VAL.relative_to(ROOT)),
        "validation_samples": len(x),
        "baselines": baselines,
        "results": results,
        "versions": tool_versions(),
    })
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
