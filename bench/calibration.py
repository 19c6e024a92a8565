"""Calibration cost: quantlab's streaming statistics vs ONNX Runtime's calibrators, same model, same samples.

    python bench/calibration.py [--samples 16,64,256] [--batch-size 8] [--repeat 1] [--skip-ort]
                                [--out bench/results/calibration.json]

Model: the demo model (EfficientNet-Lite0 from quantlab.zoo, needs the ``demo``
extra) when available, else the generated ResNet-18-style model of
bench/build.py, both at 224x224. Samples: crops and flips of the photos that
ship with scikit-image, preprocessed like the demo ((x - 127) / 128, NCHW),
made batch by batch from a seed so the data set itself is never held in memory.

Every configuration runs in its own subprocess, which reports its wall time
(session build + pass over the data + range computation, not the imports) and
its peak RSS (``ru_maxrss``); with ``--repeat N`` each runs N times, in turn
with the others, and the fastest run counts (on a shared machine the minimum
is the stable statistic):

- ``plain``: FP32 inference only (ONNX Runtime, default optimisations): the yardstick;
- ``quantlab``: ``collect_statistics`` + the method's table, scope ``all``
  (every float activation, the default) and ``quantizable`` (without the
  pre-activation tensors TensorRT fuses away: see
  ``quantlab.stats.fused_preactivations``);
- ``onnxruntime``: ``create_calibrator`` + ``collect_data`` + ``compute_data``
  (MinMax / Percentile symmetric, 2048 bins, 99.99 / Entropy with its defaults).

Targets (issue 3): quantlab's peak RSS grows <= 10 % from 16 to 256 samples for
every method; quantlab's entropy and percentile take <= 3x the plain inference time.
ONNX Runtime's histogram calibrators keep every activation of every sample
(~13 MB per 224x224 image on EfficientNet-Lite0); a run whose projected peak
exceeds 85 % of the available memory is skipped and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
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

METHODS = ("minmax", "percentile", "entropy")
TARGET_RSS_GROWTH = 0.10
TARGET_TIME_RATIO = 3.0
PERCENTILE = 99.99
SIZE = 224


# --------------------------------------------------------------------------- data


def _base_images() -> list[np.ndarray]:
    """The scikit-image photos, resized to 256 on the shorter side (uint8 HWC RGB); noise if not installed."""
    try:
        from PIL import Image
        from skimage import data as skdata
    except ImportError:
        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(8)]
    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "cat",
             "retina", "motorcycle_left")
    images = []
    for name in names:
        loader = getattr(skdata, name, None)
        if loader is None:
            continue
        try:
            img = np.asarray(loader())
        except Exception:  # some loaders need a download: skip those
            continue
        if img.ndim != 3 or img.shape[2] < 3:
            continue
        pil = Image.fromarray(np.ascontiguousarray(img[..., :3]))
        scale = 256 / min(pil.size)
        pil = pil.resize((max(256, round(pil.size[0] * scale)), max(256, round(pil.size[1] * scale))))
        images.append(np.asarray(pil))
    return images


def make_batches(n: int, batch: int, seed: int = 0):
    """A factory of feed dicts: sample i is a seeded crop (224) + flip of photo i % k, (x - 127) / 128, NCHW."""
    bases = _base_images()

    def sample(i: int) -> np.ndarray:
        rng = np.random.default_rng([seed, i])
        img = bases[i % len(bases)]
        y = int(rng.integers(0, img.shape[0] - SIZE + 1))
        x = int(rng.integers(0, img.shape[1] - SIZE + 1))
        crop = img[y:y + SIZE, x:x + SIZE]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        return ((crop.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1)

    def batches():
        for start in range(0, n, batch):
            yield {"input": np.stack([sample(i) for i in range(start, min(start + batch, n))])}

    return batches


# --------------------------------------------------------------------------- workers


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _worker(cfg: dict[str, Any]) -> dict[str, Any]:
    model_path, tool, method, n, bs = cfg["model"], cfg["tool"], cfg["method"], cfg["samples"], cfg["batch_size"]
    batches = make_batches(n, bs)
    if tool == "plain":
        import onnxruntime as ort

        start = time.perf_counter()
        session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
        for feeds in batches():
            session.run(None, feeds)
    elif tool == "quantlab":
        from quantlab.calibrate import table_from_statistics
        from quantlab.graph import load_model
        from quantlab.stats import collect_statistics, scope_tensors

        model = load_model(model_path)
        start = time.perf_counter()
        stats = collect_statistics(model, batches, tensors=scope_tensors(model.proto, cfg["scope"]))
        table_from_statistics(stats, method, percentile=PERCENTILE, versions={})
    elif tool == "onnxruntime":
        from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

        kind = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                "entropy": CalibrationMethod.Entropy}[method]
        extra: dict[str, Any] = {"symmetric": True}
        if method == "percentile":
            extra.update(num_bins=2048, percentile=PERCENTILE)

        class Reader:
            def __init__(self) -> None:
                self._it = iter(batches())

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self._it, None)

        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            start = time.perf_counter()
            calibrator = create_calibrator(model_path, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                           calibrate_method=kind, extra_options=extra)
            calibrator.collect_data(Reader())
            calibrator.compute_data()
    else:
        raise ValueError(tool)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb()}


def _run_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- driver


def _model_path(tmp: Path) -> tuple[str, str]:
    try:
        from quantlab.zoo import efficientnet_lite0_onnx

        return str(efficientnet_lite0_onnx()), "efficientnet_lite0 (demo, quantlab.zoo)"
    except Exception as exc:  # demo extra not installed
        sys.path.insert(0, str(ROOT / "bench"))
        import onnx
        from build import resnet18_style

        path = tmp / "resnet18_style.onnx"
        onnx.save(resnet18_style(), path)
        return str(path), f"resnet18_style 224x224 (generated; demo model unavailable: {exc})"


def _mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0
    return float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", default="16,64,256")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "calibration.json"))
    parser.add_argument("--skip-ort", action="store_true", help="only quantlab and plain inference")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration; the fastest counts")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0

    import pandas as pd

    from quantlab.atomic import write_json
    from quantlab.fingerprint import tool_versions

    sizes = [int(s) for s in args.samples.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_path, model_label = _model_path(Path(tmp))
        print(f"model: {model_label}\nsamples: {sizes}, batch size {args.batch_size}\n", flush=True)
        configs: list[dict[str, Any]] = []
        for n in sizes:
            configs.append({"tool": "plain", "method": "-", "scope": "-", "samples": n})
            for method in METHODS:
                for scope in ("all", "quantizable"):
                    configs.append({"tool": "quantlab", "method": method, "scope": scope, "samples": n})
                if not args.skip_ort:
                    configs.append({"tool": "onnxruntime", "method": method, "scope": "all", "samples": n})
        best: dict[int, dict[str, Any]] = {}
        for round_ in range(max(1, args.repeat)):
            for index, cfg in enumerate(configs):
                cfg.update(model=model_path, batch_size=args.batch_size)
                skip = _projected_skip(cfg, list(best.values()))
                result = {"skipped": skip} if skip else _run_worker(cfg)
                row = {k: cfg[k] for k in ("tool", "method", "scope", "samples")} | result
                best[index] = _faster(best.get(index), row)
                shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
                print(f"[{round_ + 1}/{max(1, args.repeat)}]", shown, flush=True)
        rows = [best[i] for i in range(len(configs))]

    frame = pd.DataFrame(rows)
    summary = _summarise(frame, sizes)
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print()
        print(frame.drop(columns=[c for c in ("error", "skipped") if c in frame and frame[c].isna().all()])
              .to_string(index=False))
        print()
        print(pd.DataFrame(summary["rows"]).to_string(index=False))
    record = {
        "model": model_label,
        "batch_size": args.batch_size,
        "samples": sizes,
        "repeat": max(1, args.repeat),
        "machine": {"cpus": os.cpu_count(), "mem_available_mb_at_end": round(_mem_available_mb())},
        "versions": tool_versions(),
        "targets": {"rss_growth_16_to_256": TARGET_RSS_GROWTH, "time_vs_plain_inference": TARGET_TIME_RATIO},
        "results": json.loads(frame.to_json(orient="records")),
        "summary": summary,
    }
    write_json(args.out, record)
    print(f"\nwrote {args.out}")
    return 0


def _faster(previous: dict[str, Any] | None, row: dict[str, Any]) -> dict[str, Any]:
    """The run to keep of two of one configuration: the faster, with the larger peak RSS of both."""
    if previous is None or "seconds" not in previous:
        return row
    if "seconds" not in row:
        return previous
    kept = dict(row if row["seconds"] < previous["seconds"] else previous)
    kept["peak_rss_mb"] = max(row["peak_rss_mb"], previous["peak_rss_mb"])
    return kept


def _projected_skip(cfg: dict[str, Any], rows: list[dict[str, Any]]) -> str | None:
    """Skip an ONNX Runtime histogram run whose peak RSS, extrapolated from smaller runs, would not fit."""
    if cfg["tool"] != "onnxruntime" or cfg["method"] == "minmax":
        return None
    done = sorted((r["samples"], r["peak_rss_mb"]) for r in rows if r["tool"] == "onnxruntime"
                  and r["method"] == cfg["method"] and "peak_rss_mb" in r)
    if len(done) < 2:
        return None
    (n0, m0), (n1, m1) = done[-2], done[-1]
    projected = m1 + (m1 - m0) / max(n1 - n0, 1) * (cfg["samples"] - n1)
    available = _mem_available_mb()
    if projected > 0.85 * available:
        return f"projected peak {projected:.0f} MB > 85% of available {available:.0f} MB"
    return None


def _summarise(frame: Any, sizes: list[int]) -> dict[str, Any]:
    """Per tool/method/scope: RSS growth from the smallest to the largest run, time vs plain inference."""
    out_rows = []
    plain = {r["samples"]: r["seconds"] for _, r in frame[frame.tool == "plain"].iterrows() if "seconds" in r}
    for (tool, method, scope), group in frame[frame.tool != "plain"].groupby(["tool", "method", "scope"]):
        ok = group.dropna(subset=["seconds"]) if "seconds" in group else group.iloc[0:0]
        rss = dict(zip(ok.samples, ok.peak_rss_mb))
        growth = None
        if sizes[0] in rss and sizes[-1] in rss:
            growth = rss[sizes[-1]] / rss[sizes[0]] - 1.0
        ratios = {int(n): round(s / plain[n], 2) for n, s in zip(ok.samples, ok.seconds) if plain.get(n)}
        row = {"tool": tool, "method": method, "scope": scope,
               "rss_growth": None if growth is None else round(growth, 3),
               "time_vs_plain": ratios}
        if tool == "quantlab":
            row["rss_target_met"] = growth is not None and growth <= TARGET_RSS_GROWTH
            if method in ("entropy", "percentile") and ratios:
                row["time_target_met"] = max(ratios.values()) <= TARGET_TIME_RATIO
        out_rows.append(row)
    return {"rows": out_rows}


if __name__ == "__main__":
    sys.exit(main())
