"""Where the time of a calibration pass goes, stage by stage, per sample (issue 15's profile).

    python bench/calibration_profile.py [--models lite0,lite2,bert] [--samples 64] [--batch-size 8] [--repeat 3]
                                        [--out bench/results/calibration_profile.json]

Each stage runs alone, in one process, on the same batches (made once, before any timing), best of
``--repeat``: wall and CPU milliseconds per sample (CPU: user + system of all threads)::

    plain             ONNX Runtime, the model's outputs only (2 threads, idle threads sleep)
    exposed           every float activation exposed, each in its ONNX layout (ORT reorders NCHWc
                      tensors back, runs the activations unfused, reorders again)
    exposed-blocked   the same tensors, blocked (quantlab.backends.nchwc)
    exposed-measured  blocked, without the Relu/Clip outputs derived from their inputs: what the pass exposes
    histograms        every tensor's own histogram update, one thread (the reducers' work before derivation)
    histograms-derived  the pass's reducers, one thread: a derived pair's input binned once for both
    pass              the whole statistics pass (quantlab.stats.collect_statistics: run k+1 computes
                      while run k is reduced on the pool), its session build included; page faults per
                      sample (mostly the fresh session's first runs: on a VM a fault can cost ~10 us)
    pass-no-derive    the same with ``derive_clipped=False`` (every tensor exposed)
    tables            each method's table from the pass's statistics (ms per table, not per sample)

Also recorded once: import time of quantlab.calibrate, model load, session build of each kind, values
per sample. The table printed is the JSON's ``rows``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

_T0 = time.perf_counter()
from quantlab.calibrate import table_from_statistics

IMPORT_SECONDS = time.perf_counter() - _T0

import numpy as np
from calibration import _model, make_batches


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _best(fn: Callable[[], Any], repeat: int, samples: int) -> dict[str, float]:
    """Best-of-``repeat`` wall and CPU ms per sample of ``fn()``, and its page faults per sample."""
    best = {"wall_ms": float("inf"), "cpu_ms": float("inf"), "faults": float("inf")}
    for _ in range(repeat):
        w, c, f = time.perf_counter(), _cpu(), _faults()
        fn()
        best["wall_ms"] = min(best["wall_ms"], (time.perf_counter() - w) / samples * 1e3)
        best["cpu_ms"] = min(best["cpu_ms"], (_cpu() - c) / samples * 1e3)
        best["faults"] = min(best["faults"], (_faults() - f) / samples)
    return {k: round(v, 2) for k, v in best.items()}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - start, 3)


def profile(name: str, samples: int, batch: int, repeat: int, tmp: Path) -> dict[str, Any]:
    from quantlab.backends import get_backend
    from quantlab.backends.base import TensorValues
    from quantlab.clipped import ClippedPair
    from quantlab.graph import activation_names, load_model
    from quantlab.histogram import DEFAULT_BINS, DEFAULT_HUGE_THRESHOLD, AbsHistogram
    from quantlab.stats import collect_statistics
    from quantlab.stats.pairs import clipped_pairs

    path, label = _model(name, tmp)
    model, load_s = _timed(lambda: load_model(path))
    names = [t for t in activation_names(model.proto) if t not in model.input_names]
    batches = list(make_batches(samples, batch, model=name)())
    backend = get_backend("ort", spinning=False)
    plain, build_plain = _timed(lambda: backend.build(model.proto))
    exposed, build_exposed = _timed(lambda: backend.build(model.proto, outputs=names))
    blocked, build_blocked = _timed(lambda: backend.build_values(model.proto, names))
    pairs = clipped_pairs(model, names, DEFAULT_HUGE_THRESHOLD, names)
    derived = {y for y, _ in pairs.values()}
    measured = [t for t in names if t not in derived]
    blocked_measured = backend.build_values(model.proto, measured)
    rows = [{"stage": "plain", **_best(lambda: [plain.run(b) for b in batches], repeat, samples)},
            {"stage": "exposed", **_best(lambda: [exposed.run(b, names) for b in batches], repeat, samples)},
            {"stage": "exposed-blocked", **_best(lambda: [blocked.run(b, names) for b in batches], repeat, samples)},
            {"stage": "exposed-measured",
             **_best(lambda: [blocked_measured.run(b, measured) for b in batches], repeat, samples)}]
    outputs = [blocked.run(b, names) for b in batches]
    values = sum(v.size if isinstance(v, TensorValues) else np.size(v) for v in outputs[0].values()) / len(
        next(iter(batches[0].values())))

    def histograms(derive: bool) -> None:
        reducers = {t: ClippedPair(pairs[t][1], DEFAULT_BINS, DEFAULT_HUGE_THRESHOLD) if derive and t in pairs
                    else AbsHistogram() for t in (measured if derive else names)}
        for out in outputs:
            for t, reducer in reducers.items():
                v = out[t]
                if isinstance(v, TensorValues):
                    reducer.update_values(v.pieces, v.in_layout)
                else:
                    reducer.update(v)

    rows.append({"stage": "histograms", **_best(lambda: histograms(False), repeat, samples)})
    rows.append({"stage": "histograms-derived", **_best(lambda: histograms(True), repeat, samples)})
    outputs.clear()  # the arrays are freed before the whole pass runs
    stats: dict[str, Any] = {}

    def whole_pass() -> None:
        stats["s"] = collect_statistics(model, lambda: iter(batches), backend=backend)

    rows.append({"stage": "pass", **_best(whole_pass, repeat, samples)})
    rows.append({"stage": "pass-no-derive", **_best(
        lambda: collect_statistics(model, lambda: iter(batches), backend=backend, derive_clipped=False), repeat,
        samples)})
    tables = {}
    for method in ("minmax", "percentile", "entropy", "mse"):
        _, tables[method] = _timed(lambda m=method: table_from_statistics(stats["s"], m, versions={}))
    return {"model": name, "label": label, "tensors": len(names), "values_per_sample": int(values),
            "derived_tensors": len(derived),
            "blocked_tensors": sum(isinstance(v, TensorValues) for v in blocked.run(batches[0], names).values()),
            "seconds": {"import_quantlab_calibrate": round(IMPORT_SECONDS, 3), "load_model": load_s,
                        "build_plain": build_plain, "build_exposed": build_exposed, "build_blocked": build_blocked,
                        "tables": tables},
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    import tempfile

    import pandas as pd

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="lite0,lite2")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "calibration_profile.json"))
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            result = profile(name, args.samples, args.batch_size, args.repeat, Path(tmp))
            results.append(result)
            print(f"{result['label']}: {result['tensors']} tensors ({result['blocked_tensors']} blocked), "
                  f"{result['values_per_sample'] / 1e6:.1f} M values a sample, {result['derived_tensors']} derived; "
                  f"seconds: {result['seconds']}")
            table = pd.DataFrame(result["rows"]).set_index("stage")
            table["wall_x_plain"] = (table["wall_ms"] / table.loc["plain", "wall_ms"]).round(2)
            print(table.to_string(), "\n")
    doc = {"samples": args.samples, "batch_size": args.batch_size, "repeat": args.repeat,
           "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()}, "results": results}
    Path(args.out).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
