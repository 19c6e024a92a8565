"""Comparator cost: per-layer compare of EfficientNet-Lite0 INT8 vs FP32, against running both models alone.

    python bench/compare.py [--samples 64,256,1024] [--repeats 1] [--out bench/results/compare.json]

Model: the demo model (quantlab.zoo.efficientnet_lite0_onnx(), needs the ``demo`` extra),
calibrated with quantlab.calibrate (entropy) on calib_sets/demo_calib.toml and written INT8
by quantize.write_model with the default options (TensorRT's Q/DQ form, simulated on ONNX
Runtime). Data: the 160 labelled views of calib_sets/demo_val.toml, repeated as horizontally
flipped / rolled copies up to the size asked; samples are made one at a time from the 160
base images, so the data set's own memory does not grow with the sample count.

Each configuration runs in a fresh subprocess that reports its wall time (session builds +
the pass over the data + the tables; not the imports and model loading) and its peak RSS
(``ru_maxrss``):

- ``alone``: the reference and the candidate each run over the data (ORT, batch 8): the yardstick;
- ``e2e``: ``compare(per_layer=False)``: end to end only;
- ``accumulated``: per layer, accumulated mode only;
- ``local``: per layer, local mode only;
- ``per_layer``: ``compare()`` with its defaults: per layer, both modes (the target's subject).

Targets (issue 5): the per-layer compare's peak RSS grows <= 10 % from the smallest to the
largest sample count, and its wall time is <= 1.5x the ``alone`` time. The machine may be
shared: ``alone`` and ``per_layer`` run ``--repeats`` times, interleaved, and the fastest run
of each counts; the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantlab.data import DataSet, Sample  # noqa: E402

MODES = ("alone", "e2e", "accumulated", "local", "per_layer")
TARGET_RSS_GROWTH = 0.10
TARGET_TIME_RATIO = 1.5
BATCH = 8


class AugmentedSet(DataSet):
    """``n`` samples from base images: sample i is image i % B, flipped / rolled by i // B."""

    role = "validation"
    input_names = ("input",)
    label_dtype = "int64"

    def __init__(self, images: np.ndarray, labels: np.ndarray, n: int) -> None:
        self.images = images
        self.labels = labels
        self.n = n
        self.name = f"demo_val_x{n}"

    def __len__(self) -> int:
        return self.n

    def _load(self, i: int) -> Sample:
        base, k = i % len(self.images), i // len(self.images)
        x = self.images[base]
        if k % 2:
            x = x[:, :, ::-1]
        if k >= 2:
            x = np.roll(x, shift=7 * (k // 2), axis=1 + (k // 2) % 2)
        return Sample(index=i, key=f"val{base}/aug{k}", feeds={"input": np.ascontiguousarray(x)},
                      label=int(self.labels[base]))

    def manifest_record(self) -> dict[str, Any]:
        return {"path": None, "sha256": None, "name": self.name, "role": self.role, "count": self.n,
                "settings": {"source": "calib_sets/demo_val.toml, flipped / rolled copies"}}


# --------------------------------------------------------------------------- child


def _child(mode: str, n: int, work: Path) -> dict[str, Any]:
    from quantlab.backends import get_backend
    from quantlab.compare import CompareOptions, compare, load_candidate
    from quantlab.graph import load_model

    reference = load_model(work / "reference.onnx")
    candidate = load_candidate(work / "int8", reference)
    base = np.load(work / "val.npz")
    data = AugmentedSet(base["images"], base["labels"], n)
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if mode == "alone":
        backend = get_backend("ort")
        runners = [backend.build(reference.proto), backend.build(candidate.proto)]
        for batch in data.batches(BATCH):
            for r in runners:
                r.run(batch.feeds)
    else:
        opts = {"e2e": CompareOptions(batch_size=BATCH, per_layer=False),
                "accumulated": CompareOptions(batch_size=BATCH, local=False),
                "local": CompareOptions(batch_size=BATCH, accumulated=False),
                "per_layer": CompareOptions(batch_size=BATCH)}[mode]
        result = compare(reference, {"int8": candidate}, data, opts)
        row = result.end_to_end.iloc[0]
        extra = {"cosine": float(row["cosine"]), "top1_agreement": float(row["top1_agreement"]),
                 "top1_drop": float(row["top1_drop"]), "per_layer_rows": len(result.per_layer),
                 "segments": result.settings["segments"]}
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "samples": n, "seconds": seconds, "ms_per_sample": 1000 * seconds / n,
            "peak_rss_mb": rss, "setup_rss_mb": rss_setup, **extra}


# --------------------------------------------------------------------------- parent


def _prepare(work: Path) -> dict[str, Any]:
    from quantlab import zoo
    from quantlab.calibrate import calibrate
    from quantlab.data import open_dataset
    from quantlab.graph import load_model
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, save_written, write_model

    path = zoo.efficientnet_lite0_onnx()
    reference = load_model(path)
    (work / "reference.onnx").write_bytes(Path(path).read_bytes())
    t0 = time.perf_counter()
    table = calibrate(reference, open_dataset(ROOT / "calib_sets" / "demo_calib.toml"), "entropy").tables["entropy"]
    calib_s = time.perf_counter() - t0
    written = write_model(reference, uniform_plan("int8"), table, WriteOptions())
    save_written(written, work / "int8")
    val = open_dataset(ROOT / "calib_sets" / "demo_val.toml")
    images, labels = [], []
    for batch in val.batches(16):
        images.append(batch.feeds["input"])
        labels.append(batch.labels)
    np.savez(work / "val.npz", images=np.concatenate(images), labels=np.concatenate(labels))
    return {"model": str(path), "nodes": len(reference.proto.graph.node), "calibration_seconds": calib_s,
            "write_options": written.options.as_dict(), "base_samples": int(sum(len(x) for x in images))}


def _run_child(mode: str, n: int, work: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(n), str(work)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} {n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", default="64,256,1024")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of 'alone' and 'per_layer' (the target's pair) per size, interleaved; the fastest "
                        "counts (other modes run once)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compare.json")
    p.add_argument("--child", nargs=3, metavar=("MODE", "N", "WORK"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        mode, n, work = args.child
        print(json.dumps(_child(mode, int(n), Path(work))))
        return 0

    import pandas as pd

    from quantlab.atomic import write_json
    from quantlab.fingerprint import tool_versions

    sizes = [int(s) for s in args.samples.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quantlab-bench-compare-") as tmp:
        work = Path(tmp)
        info = _prepare(work)
        runs: list[dict[str, Any]] = []
        for n in sizes:
            for rep in range(args.repeats):
                for mode in modes:  # interleaved, so a busy moment hits every mode alike
                    if rep and mode not in ("alone", "per_layer"):
                        continue
                    load = os.getloadavg()[0]
                    r = _run_child(mode, n, work)
                    r["repeat"] = rep
                    r["load_avg_1min_before"] = load
                    runs.append(r)
                    print(f"  {mode:12s} n={n:5d}  {r['seconds']:7.2f} s  {r['peak_rss_mb']:7.0f} MB  "
                          f"(load {load:.2f})", flush=True)
    frame = pd.DataFrame(runs)
    best = frame.sort_values("seconds").groupby(["samples", "mode"], sort=False).first().reset_index()
    alone = best[best["mode"] == "alone"].set_index("samples")["seconds"]
    best["ratio_vs_alone"] = [s / alone.get(n, np.nan) for n, s in zip(best["samples"], best["seconds"])]
    smallest = min(sizes)
    base_rss = best[best["samples"] == smallest].set_index("mode")["peak_rss_mb"]
    best["rss_vs_smallest"] = [r / base_rss.get(m, np.nan) - 1 for m, r in zip(best["mode"], best["peak_rss_mb"])]
    best["mode"] = pd.Categorical(best["mode"], categories=[m for m in MODES if m in modes], ordered=True)
    best = best.sort_values(["samples", "mode"]).reset_index(drop=True)
    cols = ["samples", "mode", "seconds", "ms_per_sample", "ratio_vs_alone", "peak_rss_mb", "rss_vs_smallest"]
    print(best[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))

    per_layer = best[best["mode"] == "per_layer"]
    summary = {
        "rss_growth_per_layer": float(per_layer["rss_vs_smallest"].max()) if not per_layer.empty else None,
        "time_ratio_per_layer": {int(n): float(r) for n, r in zip(per_layer["samples"], per_layer["ratio_vs_alone"])},
        "time_ratio_accumulated": {int(n): float(r) for n, r in
                                   zip(best[best["mode"] == "accumulated"]["samples"],
                                       best[best["mode"] == "accumulated"]["ratio_vs_alone"])},
    }
    summary["rss_target_met"] = summary["rss_growth_per_layer"] is not None and \
        summary["rss_growth_per_layer"] <= TARGET_RSS_GROWTH
    largest = max(sizes)
    summary["time_target_met_at_largest"] = summary["time_ratio_per_layer"].get(largest, np.inf) <= TARGET_TIME_RATIO
    record = {
        "targets": {"rss_growth": TARGET_RSS_GROWTH, "time_ratio": TARGET_TIME_RATIO},
        "summary": summary,
        "setup": info,
        "batch_size": BATCH,
        "samples": sizes,
        "repeats": args.repeats,
        "results": best[cols + [c for c in ("cosine", "top1_agreement", "top1_drop", "per_layer_rows")
                                if c in best.columns]].to_dict("records"),
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        "versions": tool_versions(),
        "bench_seconds": time.perf_counter() - started,
    }
    write_json(args.out, record)
    print(f"\nper-layer compare: peak RSS growth {summary['rss_growth_per_layer']:+.1%} "
          f"(target <= {TARGET_RSS_GROWTH:.0%}), time vs alone "
          + ", ".join(f"{n}: {r:.2f}x" for n, r in summary["time_ratio_per_layer"].items())
          + f" (target <= {TARGET_TIME_RATIO}x)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
