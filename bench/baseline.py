"""The all-INT8 baseline step by step: cross-layer equalization (CLE) and bias correction, each on its own.

    python bench/baseline.py [--model lite0|lite2] [--samples N] [--out bench/results/baseline.json]

EfficientNet-Lite (quantlab.zoo), the demo's calibration photos (calib_sets/demo_calib.toml,
percentile calibration as bench/search.py) and validation photos (demo_val.toml); Q/DQ
written for TensorRT and run as written on ONNX Runtime (``session.disable_quant_qdq``:
the ONNX semantics TensorRT computes). For per-channel and per-tensor weights, every
all-INT8 model is scored against the FP32 model's logits (top-1 agreement, mean cosine,
SQNR), with CLE off / "skip" (pairs joined by a bounded Clip left alone) / "split"
(ReLU6 rewritten exactly as Relu + per-channel Min; no activation channel enlarged, the default)
/ "split, unbounded" (Nagel's scales from the weights alone), each without and with bias correction.
Each CLE mode calibrates its own rewritten model (ranges change). Also printed: how far
the equalized FP32 model's logits are from the original's (float32 rounding only).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quantlab.atomic import write_json  # noqa: E402
from quantlab.fingerprint import tool_versions  # noqa: E402
from search import MODELS, load_data, score  # noqa: E402

MODES = ("off", "skip", "split", "split, unbounded")
"""CLE off; skip pairs joined by a bounded Clip; split (the default: no activation channel grows);
split with Nagel's unconstrained scales (``max_activation_growth=inf``)."""


def logits(model: onnx.ModelProto | str, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """Outputs with Q/DQ run as written (no fused integer kernels), batch by batch."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    data = model if isinstance(model, str) else model.SerializeToString()
    s = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def measure_mode(model_path: Path, calib: Path, mode: str, x: np.ndarray, y: np.ndarray,
                 ref: np.ndarray) -> dict[str, Any]:
    """One CLE mode: calibrate its model, then all-INT8 with per-channel/per-tensor weights, +/- bias correction."""
    from quantlab.calibrate import calibrate
    from quantlab.data import open_dataset
    from quantlab.graph import load_model
    from quantlab.plan import uniform_plan
    from quantlab.quantize import (Equalization, WriteOptions, measure_bias_correction, prepare_model,
                                   write_model)

    model = load_model(model_path)
    eq = {"off": None, "skip": Equalization(clip="skip"), "split": Equalization(),
          "split, unbounded": Equalization(max_activation_growth=float("inf"))}[mode]
    start = time.perf_counter()
    prepared = prepare_model(model, WriteOptions(equalization=eq))
    t_eq = time.perf_counter() - start
    fp32 = logits(prepared.model.proto, x)
    out: dict[str, Any] = {
        "pairs": len(prepared.equalized.pairs) if prepared.equalized is not None else 0,
        "equalize_s": round(t_eq, 2),
        "fp32_max_abs_diff": float(np.abs(fp32 - ref).max()),
        "fp32_max_abs_logit": float(np.abs(ref).max()),
    }
    table = calibrate(prepared.model, open_dataset(calib), ["percentile"]).tables["percentile"]
    for per_channel in (True, False):
        opts = WriteOptions(target="tensorrt", per_channel_weights=per_channel, equalization=eq)
        bc = measure_bias_correction(model, table, open_dataset(calib), opts)
        weights = "per-channel" if per_channel else "per-tensor"
        for label, o in (("", opts), (" + bias correction", WriteOptions(
                target="tensorrt", per_channel_weights=per_channel, equalization=eq, bias_correction=bc))):
            w = write_model(model, uniform_plan("int8"), table, o)
            out[f"{weights}{label}"] = score(ref, logits(w.proto, x), y)
    return out


def print_table(model: str, results: dict[str, Any]) -> None:
    head = ["weights", "bias corr.", *(f"CLE {m}: agree % / cosine" for m in MODES)]
    rows = []
    for weights in ("per-channel", "per-tensor"):
        for label, key in (("off", weights), ("on", f"{weights} + bias correction")):
            cells = [f"{results[m][key]['top1_agreement']:.2f} / {results[m][key]['cosine']:.4f}" for m in MODES]
            rows.append([weights, label, *cells])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    print(f"{model}: all-INT8 (TensorRT form) vs FP32 on the validation photos")
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    for m in MODES:
        r = results[m]
        print(f"CLE {m}: {r['pairs']} pairs, {r['equalize_s']} s; FP32 logits max |diff| {r['fp32_max_abs_diff']:.3g} "
              f"(max |logit| {r['fp32_max_abs_logit']:.3g})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="lite0")
    parser.add_argument("--samples", type=int, default=None, help="first N validation samples (default all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "baseline.json")
    args = parser.parse_args(argv)

    from quantlab.zoo import zoo_model_path

    name, resolution = MODELS[args.model]
    model_path = zoo_model_path(name)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        calib, _, x, y = load_data(args.samples, resolution, Path(tmp))
        ref = logits(str(model_path), x)
        for mode in MODES:
            print(f"== CLE {mode}", flush=True)
            start = time.perf_counter()
            results[mode] = measure_mode(model_path, calib, mode, x, y, ref)
            results[mode]["wall_s"] = round(time.perf_counter() - start, 1)
    print()
    print_table(name, results)
    write_json(args.out, {"bench": "baseline", "model": f"{name} (quantlab.zoo)", "samples": int(len(x)),
                          "calibration": "percentile, calib_sets/demo_calib.toml", "target": "tensorrt",
                          "results": results, "versions": tool_versions()})
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
