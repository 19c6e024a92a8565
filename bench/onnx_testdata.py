"""Robustness survey: every small model of the ``onnx`` wheel's backend test data through quantlab.

    python bench/onnx_testdata.py [--out bench/results/onnx_testdata.json]

The wheel ships ``onnx/backend/test/data/{pytorch-converted,pytorch-operator,simple}``: ~140 one- to
few-layer models (Conv1d/2d/3d, grouped, depthwise with multiplier, dilated, ConvTranspose, Linear,
Embedding, PReLU, pooling, sequences, expand...) with their own inputs (``test_data_set_0/input_*.pb``,
some of them uninitialised float64 memory). Each model runs in its own process (a crash would show as
its exit status, not end the survey): load -> statistics over its input -> entropy table -> INT8 write
(TensorRT form) -> TensorRT-RTX parse + build of the FP32 model and, when that builds, of the INT8 one.

Each row's outcome is one of: ``ok`` (with the INT8 groups written and whether the FP32 model itself
builds with TensorRT-RTX), ``clear error`` (a quantlab error naming the model/tensor: a model quantlab
refuses, e.g. an opset-6 Pad it cannot upgrade), ``crash`` (any other exception: a quantlab bug), or
``process`` (the process died). The survey passes when there is no crash, no dead process and no model
whose INT8 write fails to build where its FP32 model builds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = Path(onnx.__file__).parent / "backend/test/data"
SETS = ("pytorch-converted", "pytorch-operator", "simple")


def model_dirs() -> list[Path]:
    return sorted(p for s in SETS if (DATA / s).is_dir() for p in (DATA / s).iterdir() if (p / "model.onnx").is_file())


def run_one(folder: Path) -> dict[str, Any]:
    """One model, in this process (``--one``)."""
    import numpy as np
    from onnx import numpy_helper

    import quantlab as ql
    from quantlab.backends.tensorrt import TensorRTBackend
    from quantlab.calibrate import table_from_statistics
    from quantlab.errors import QuantlabError
    from quantlab.stats import collect_statistics

    row: dict[str, Any] = {"model": f"{folder.parent.name}/{folder.name}"}
    step = "load"
    try:
        model = ql.load_model(folder / "model.onnx")
        feeds: dict[str, np.ndarray] = {}
        for i, spec in enumerate(model.inputs):
            tensor = onnx.TensorProto()
            tensor.ParseFromString((folder / "test_data_set_0" / f"input_{i}.pb").read_bytes())
            feeds[spec.name] = numpy_helper.to_array(tensor)
        step = "calibrate"
        table = table_from_statistics(collect_statistics(model, lambda: [feeds]), "entropy")
        step = "write"
        written = ql.write_model(model, ql.uniform_plan("int8"), table, ql.WriteOptions(target="tensorrt"))
        row["int8_groups"] = written.plan.counts().get("int8", 0)
        backend = TensorRTBackend("tensorrt-rtx")
        step = "tensorrt-rtx fp32"
        try:
            backend.build_engine(model.proto, label=row["model"])
            row["fp32_builds"] = True
        except QuantlabError as exc:
            row.update(fp32_builds=False, fp32_error=str(exc).splitlines()[0][:160])
        if row["fp32_builds"]:
            step = "tensorrt-rtx int8"
            backend.build_engine(written.proto, label=row["model"])
        row["outcome"] = "ok"
    except QuantlabError as exc:
        row.update(outcome="clear error", step=step, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    except Exception as exc:  # noqa: BLE001 - the survey records bugs
        row.update(outcome="crash", step=step, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/onnx_testdata.json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return 0
    import pandas as pd

    from quantlab.atomic import write_json
    from quantlab.fingerprint import tool_versions

    rows = []
    for folder in model_dirs():
        done = subprocess.run([sys.executable, __file__, "--one", str(folder)], capture_output=True, text=True,
                              timeout=600)
        lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
        row = (json.loads(lines[-1]) if done.returncode == 0 and lines else
               {"model": f"{folder.parent.name}/{folder.name}", "outcome": "process",
                "error": f"exit status {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"})
        rows.append(row)
        print(f"{row['model']}: {row['outcome']} {row.get('error', '')}", flush=True)
    frame = pd.DataFrame(rows)
    print(frame["outcome"].value_counts().to_string())
    print(f"INT8 written with >= 1 group: {int((frame.get('int8_groups', 0) > 0).sum())}; FP32 builds with "
          f"TensorRT-RTX: {int(frame.get('fp32_builds', False).fillna(False).sum())}")
    write_json(args.out, {"results": rows, "outcomes": dict(Counter(r["outcome"] for r in rows)),
                          "versions": tool_versions()})
    bad = [r for r in rows if r["outcome"] in ("crash", "process")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
