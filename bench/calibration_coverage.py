"""Calibration coverage demo: a biased calibration set, caught by `quantlab coverage`, fixed by merged statistics.

    python bench/calibration_coverage.py [--method entropy] [--work /tmp/quantlab-coverage] [--out FILE.json]

Real data shipped by installed packages, EfficientNet-Lite0 from quantlab.zoo (the demo extra):

1. calibrate on a BIASED set: the demo calibration photos darkened to 30 % brightness
   (bench/coverage_sets/demo_calib_dark.toml, preprocessing hook dark.py), and on the same photos
   at normal brightness (calib_sets/demo_calib.toml: the unbiased calibration);
2. `quantlab coverage` of the dark table on the representative validation set (demo_val.toml: 20
   labelled ImageNet photos from foolbox) and on the normal-brightness photos (standing in for
   production samples): which tensors and which samples fall outside the calibrated ranges;
3. recalibrate WITHOUT running the model: merge the dark statistics with the production set's
   statistics that coverage wrote (`quantlab calibrate --stats A --stats B`: merged histograms);
4. build INT8 (TensorRT Q/DQ form, simulated on ONNX Runtime) from the dark, unbiased and merged
   tables and compare each with FP32 on the validation set: top-1 accuracy and drop, cosine;
5. coverage of the unbiased and merged tables on the validation set (the gate should pass), and of the
   unbiased table on other random views of its own photos (demo_calib_views.toml: the same distribution,
   must not be flagged).

Prints a table and writes JSON (bench/results/calibration_coverage.json). Every step runs the `quantlab` CLI
in a subprocess, as a user would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DARK = ROOT / "bench" / "coverage_sets" / "demo_calib_dark.toml"
NORMAL = ROOT / "calib_sets" / "demo_calib.toml"
VAL = ROOT / "calib_sets" / "demo_val.toml"
VIEWS = ROOT / "bench" / "coverage_sets" / "demo_calib_views.toml"


def _quantlab(*args: str, ok: tuple[int, ...] = (0,)) -> tuple[int, float]:
    """Run ``python -m quantlab ARGS`` from the repository root; (exit code, seconds)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "quantlab", *args], cwd=ROOT, text=True,
                          capture_output=True, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - start
    if proc.returncode not in ok:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"quantlab {' '.join(args[:2])} exited {proc.returncode}")
    print(f"  quantlab {' '.join(a if len(a) < 60 else '...' for a in args[:1])}: exit {proc.returncode}, "
          f"{seconds:.0f} s", flush=True)
    return proc.returncode, seconds


def _accuracy(compare_dir: Path) -> dict[str, dict[str, float]]:
    import pandas as pd

    df = pd.read_csv(compare_dir / "end_to_end.csv")
    cols = ["ref_top1", "top1", "top1_drop", "top1_drop_ci_low", "top1_drop_ci_high", "top1_agreement", "cosine"]
    return {row["candidate"]: {c: float(row[c]) for c in cols if c in row} for _, row in df.iterrows()}


def _coverage_summary(folder: Path) -> dict[str, Any]:
    doc = json.loads((folder / "coverage.json").read_text())
    out: dict[str, Any] = {"verdict": doc["verdict"], "sets": {}}
    for d in doc["datasets"]:
        rows = [r for r in doc["rows"] if r["dataset"] == d["name"]]
        worst = sorted(rows, key=lambda r: -(r["psi_excess"] if r["psi_excess"] == r["psi_excess"] else -1))[:5]
        out["sets"][d["name"]] = {
            "samples": d["samples"],
            "tensors": len(rows),
            "tensors_flagged": sum(1 for f in doc["verdict"]["failing_tensors"] if f["dataset"] == d["name"]),
            "saturated_max": max(r["saturated"] for r in rows),
            "outside_samples_max": max(r["outside_samples"] for r in rows),
            "psi_max": max(r["psi"] for r in rows),
            "worst_tensors": [{k: r[k] for k in ("tensor", "psi", "psi_ci_low", "psi_ci_high", "psi_noise",
                                                  "saturated", "saturated_samples", "outside_samples")}
                              for r in worst],
            "worst_samples": d["worst_samples"][:5],
        }
    return out


def _steps(model: str, w: Path, m: str) -> tuple[dict[str, float], dict[str, int]]:
    """Run the five steps of the module docstring; (seconds per step, coverage exit codes)."""
    times: dict[str, float] = {}
    codes: dict[str, int] = {}
    print("1. calibrate (biased: dark photos; unbiased: the same photos)")
    times["calibrate_dark"] = _quantlab("calibrate", model, "--calib", str(DARK), "--method", "all",
                                        "--no-progress", "--out", str(w / "calib_dark"))[1]
    times["calibrate_normal"] = _quantlab("calibrate", model, "--calib", str(NORMAL), "--method", "all",
                                          "--no-progress", "--out", str(w / "calib_normal"))[1]
    print("2. coverage of the dark table on the validation set and on production samples")
    codes["dark"], times["coverage_dark"] = _quantlab(
        "coverage", model, "--table", str(w / "calib_dark" / f"calib_{m}.json"), "--data", str(VAL),
        "--data", str(NORMAL), "--out", str(w / "coverage_dark"), ok=(0, 1))
    print("3. recalibrate from merged statistics (dark + production, no model run)")
    times["recalibrate_merged"] = _quantlab(
        "calibrate", model, "--stats", str(w / "calib_dark" / "statistics.npz"), "--stats",
        str(w / "coverage_dark" / "demo_calib" / "statistics.npz"), "--method", "all",
        "--out", str(w / "calib_merged"))[1]
    merged = w / "calib_merged" / f"calib_{m}.json"
    print("4. build INT8 from each table and compare with FP32 on the validation set")
    builds = {}
    for name, table in (("dark", w / "calib_dark" / f"calib_{m}.json"),
                        ("unbiased", w / "calib_normal" / f"calib_{m}.json"), ("merged", merged)):
        builds[name] = w / "build" / name
        _quantlab("build", model, "--table", str(table), "--precision", "int8", "--target", "tensorrt",
                  "--out", str(builds[name]))
    times["compare"] = _quantlab("compare", model, *[str(p) for p in builds.values()], "--data", str(VAL),
                                 "--no-per-layer", "--no-progress", "--out", str(w / "compare"))[1]
    print("5. coverage of the unbiased and merged tables on the validation set (unbiased: also on other views of "
          "its own photos, the same distribution)")
    for name, table, extra in (("unbiased", w / "calib_normal" / f"calib_{m}.json", ["--data", str(VIEWS)]),
                               ("merged", merged, [])):
        codes[name], times[f"coverage_{name}"] = _quantlab("coverage", model, "--table", str(table), "--data",
                                                           str(VAL), *extra, "--out", str(w / f"coverage_{name}"),
                                                           ok=(0, 1))
    return times, codes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="entropy", choices=["entropy", "minmax", "percentile"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantlab-coverage"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "calibration_coverage.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from quantlab.zoo import zoo_model_path

    w = args.work
    times, codes = _steps(str(zoo_model_path("efficientnet_lite0")), w, args.method)
    accuracy = _accuracy(w / "compare")
    coverage = {name: _coverage_summary(w / f"coverage_{name}") for name in ("dark", "unbiased", "merged")}
    result = {"model": "efficientnet_lite0", "method": args.method, "times_s": times, "coverage_exit_codes": codes,
              "accuracy": accuracy, "coverage": coverage}
    print(f"\n{'calibration':<10} {'top1 %':>7} {'drop pp':>8} {'cosine':>8} {'coverage exit':>14} "
          f"{'outside_samples_max':>20} {'psi_max':>8} {'flagged':>8}   (coverage on demo_val)")
    for name in ("dark", "unbiased", "merged"):
        acc, val = accuracy.get(name, {}), coverage[name]["sets"]["demo_val"]
        print(f"{name:<10} {acc.get('top1', float('nan')):>7.2f} {acc.get('top1_drop', float('nan')):>8.2f} "
              f"{acc.get('cosine', float('nan')):>8.4f} {codes[name]:>14} {val['outside_samples_max']:>20.3f} "
              f"{val['psi_max']:>8.3f} {val['tensors_flagged']:>8}")
    same = coverage["unbiased"]["sets"]["demo_calib_views"]
    print(f"same distribution (unbiased table on other views of its photos): outside_samples_max "
          f"{same['outside_samples_max']:.3f}, psi_max {same['psi_max']:.3f}, "
          f"{same['tensors_flagged']} tensors flagged")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True, default=float) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
