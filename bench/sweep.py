"""Sweep scaling: the same small sweep locally with 1 and 2 processes and on a local Ray instance.

    python bench/sweep.py [--calib 32] [--val 48] [--out bench/results/sweep.json]

The sweep: the demo model (EfficientNet-Lite0, needs the ``demo`` extra) x {minmax, entropy,
percentile 99.99} INT8 + the FP16 cell = 4 cells, on the first ``--calib`` / ``--val`` samples of
the demo's calibration and validation sets (manifests written to a temporary folder with
``count``). Each mode runs the sweep from scratch (``force``) into its own temporary reports
folder, so nothing is reused between modes.

Printed and saved: wall time per mode, the mean wall time of a cell (from the cells' own timers,
1-process run), and the fixed overhead (wall - cells' sum for 1 process; for Ray: start-up and
object-store transfer included). The estimate for N nodes of c cores each:

    T(N) ~= overhead_ray + ceil(cells / (N * c)) * cell_time

(cells are independent; the driver only gathers small tables and zipped reports). It holds while
the object store's one copy of the model and data per node is small next to a cell's work.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantlab.sweep import SweepOptions, load_sweep, run_sweep  # noqa: E402


def _sweep_file(folder: Path, calib: int, val: int) -> Path:
    for name, count in (("demo_calib", calib), ("demo_val", val)):
        text = (ROOT / "calib_sets" / f"{name}.toml").read_text(encoding="utf-8")
        lines = [line for line in text.splitlines() if not line.startswith("count")]
        at = next(i for i, line in enumerate(lines) if line.startswith("[["))
        lines.insert(at, f"count = {count}\n")
        (folder / f"{name}.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    path = folder / "bench_sweep.toml"
    path.write_text('''name = "bench_sweep"
threshold = "cosine>=0.995"
[data]
calibration = "demo_calib.toml"
validation = "demo_val.toml"
[[model]]
zoo = "efficientnet_lite0"
label = "lite0"
[grid]
methods = ["minmax", "entropy", "percentile"]
percentile = [99.99]
fp16 = true
''', encoding="utf-8")
    return path


def _manifests_use_package_data(folder: Path) -> None:
    """The copied manifests name package data (skimage, foolbox...), not paths: nothing else to copy."""
    for name in ("demo_calib", "demo_val"):
        text = (folder / f"{name}.toml").read_text(encoding="utf-8")
        if "package =" not in text:
            raise SystemExit(f"{name}.toml no longer reads package data; copy its files for the bench")


def measure(path: Path, options: SweepOptions, reports: Path) -> dict[str, Any]:
    start = time.perf_counter()
    result = run_sweep(load_sweep(path), options, reports_dir=reports)
    wall = time.perf_counter() - start
    cells = [r.seconds for r in result.results]
    return {"wall_s": round(wall, 2), "cells": len(cells), "cells_sum_s": round(sum(cells), 2),
            "failed": [r.cell.name for r in result.failed], "attempts": sum(r.attempts for r in result.results)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--val", type=int, default=48)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sweep.json")
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="quantlab-bench-sweep-") as tmp:
        folder = Path(tmp)
        path = _sweep_file(folder, args.calib, args.val)
        _manifests_use_package_data(folder)
        modes = [("local, 1 process", SweepOptions(processes=1, force=True)),
                 ("local, 2 processes", SweepOptions(processes=2, force=True))]
        if not args.no_ray:
            modes.append(("Ray (local instance, 2 CPUs)", SweepOptions(ray="auto", force=True)))
        for label, options in modes:
            rows[label] = measure(path, options, folder / label.split(",")[0].split(" ")[0] / str(len(rows)))
            print(f"{label:<30} {rows[label]['wall_s']:>8.1f} s  ({rows[label]['cells']} cells, "
                  f"cells' own time {rows[label]['cells_sum_s']:.1f} s)", flush=True)
    one = rows["local, 1 process"]
    cell_time = one["cells_sum_s"] / max(1, one["cells"])
    overhead_local = one["wall_s"] - one["cells_sum_s"]
    ray_row = rows.get("Ray (local instance, 2 CPUs)")
    overhead_ray = (ray_row["wall_s"] - math.ceil(one["cells"] / 2) * cell_time) if ray_row else None
    estimate = {}
    if overhead_ray is not None:
        for nodes in (1, 2, 4, 8):
            for cells in (4, 40, 400):
                estimate[f"{nodes} nodes x 2 cores, {cells} cells"] = round(
                    overhead_ray + math.ceil(cells / (nodes * 2)) * cell_time, 1)
    summary = {"modes": rows, "cell_time_s": round(cell_time, 2), "overhead_local_s": round(overhead_local, 2),
               "overhead_ray_s": None if overhead_ray is None else round(overhead_ray, 2),
               "estimate_s": estimate, "calib_samples": args.calib, "val_samples": args.val,
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "load_avg": os.getloadavg()}}
    print(f"\nmean cell {cell_time:.1f} s; overhead local {overhead_local:.1f} s"
          + (f", Ray {overhead_ray:.1f} s" if overhead_ray is not None else ""))
    for k, v in estimate.items():
        print(f"  estimate {k}: {v:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
