"""trtexec-style latency measurement of any backend's runner.

    warm-up: run ``warmup`` times, untimed (allocations, JIT, caches)
    timed:   run until ``iterations`` runs are done and, if given, ``duration_s``
             seconds have passed; each run timed with perf_counter
    report:  mean / p50 / p90 / p99 / min / max latency in milliseconds, and
             throughput = samples per second of wall time over the timed loop

One run is one call to ``Runner.run`` on the same feeds: for ONNX Runtime that
is the session call; for TensorRT it includes the host<->device copies and the
stream synchronization, as trtexec's end-to-end ("H2D + GPU compute + D2H") times do.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .backends.base import Runner
from .errors import InputMismatchError
from .graph import LoadedModel, TensorSpec

__all__ = ["LatencyResult", "measure_latency", "random_feeds", "latency_from_samples", "feed_batch_size"]


@dataclass(frozen=True)
class LatencyResult:
    """Latency of one batch in milliseconds, and samples per second.

    ``throughput_per_s`` is ``batch_size * iterations / wall seconds`` of the
    timed loop, so it also counts the time between runs (it is at most
    ``batch_size * 1000 / mean_ms``).
    """

    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    throughput_per_s: float
    batch_size: int
    iterations: int
    warmup: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def latency_from_samples(
    seconds: np.ndarray, *, wall_seconds: float, batch_size: int, warmup: int
) -> LatencyResult:
    """Summarise per-run latencies (seconds) into a :class:`LatencyResult` (milliseconds).

    Percentiles use linear interpolation between ranks (numpy's default).
    """
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise ValueError("no timed runs to summarise")
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return LatencyResult(
        mean_ms=float(ms.mean()),
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        min_ms=float(ms.min()),
        max_ms=float(ms.max()),
        throughput_per_s=float(batch_size * ms.size / wall_seconds) if wall_seconds > 0 else float("inf"),
        batch_size=int(batch_size),
        iterations=int(ms.size),
        warmup=int(warmup),
    )


def feed_batch_size(feeds: Mapping[str, np.ndarray]) -> int:
    """The leading dimension shared by the feeds (1 for scalars)."""
    sizes = {int(np.shape(a)[0]) for a in feeds.values() if np.ndim(a) >= 1}
    if len(sizes) > 1:
        raise InputMismatchError(
            f"feeds disagree on the batch size (leading dims {sorted(sizes)}); pass batch_size= explicitly"
        )
    return sizes.pop() if sizes else 1


def measure_latency(
    runner: Runner,
    feeds: Mapping[str, np.ndarray],
    *,
    warmup: int = 10,
    iterations: int = 100,
    duration_s: float | None = None,
    batch_size: int | None = None,
) -> LatencyResult:
    """Warm up, then time ``runner.run(feeds)`` at least ``iterations`` times (and ``duration_s``).

    ``batch_size`` defaults to the feeds' shared leading dimension.
    """
    if warmup < 0 or iterations < 1:
        raise ValueError(f"need warmup >= 0 and iterations >= 1, got warmup={warmup}, iterations={iterations}")
    if duration_s is not None and duration_s < 0:
        raise ValueError(f"duration_s must be >= 0, got {duration_s}")
    batch = batch_size if batch_size is not None else feed_batch_size(feeds)
    for _ in range(warmup):
        runner.run(feeds)
    samples: list[float] = []
    clock = time.perf_counter
    start = clock()
    deadline = start + duration_s if duration_s is not None else start
    while len(samples) < iterations or clock() < deadline:
        t0 = clock()
        runner.run(feeds)
        samples.append(clock() - t0)
    wall = clock() - start
    return latency_from_samples(np.array(samples), wall_seconds=wall, batch_size=batch, warmup=warmup)


def _resolve_shape(spec: TensorSpec, batch_size: int, dims: Mapping[str, int]) -> tuple[int, ...]:
    if spec.shape is None:
        raise InputMismatchError(
            f"input {spec.name!r} has no shape in the model; quantlab cannot make random data for it"
        )
    shape = []
    for axis, d in enumerate(spec.shape):
        if isinstance(d, int) and d > 0:
            shape.append(d)
        elif isinstance(d, str) and d in dims:
            shape.append(int(dims[d]))
        elif axis == 0:
            shape.append(batch_size)
        else:
            label = repr(d) if isinstance(d, str) else "an unnamed dim"
            raise InputMismatchError(
                f"input {spec.name!r} has a dynamic axis {axis} ({label}) that is not the batch; "
                f"give its size, e.g. dims={{{d if isinstance(d, str) else 'name'!r}: 128}} "
                "(quantlab perf --dim NAME=SIZE)"
            )
    return tuple(shape)


def random_feeds(
    model: LoadedModel, batch_size: int, seed: int = 0, *, dims: Mapping[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Deterministic random data for every model input, dynamic dims resolved.

    A dynamic leading axis becomes ``batch_size``; other dynamic axes need a
    size in ``dims`` (by symbol name). Floats are N(0, 1) in the input's float
    type; integers are 0 or 1 (valid ids, masks and token types); bools random.
    """
    if batch_size < 1:
        raise InputMismatchError(f"batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in model.inputs:
        shape = _resolve_shape(spec, batch_size, dims or {})
        dtype = np.dtype(spec.dtype) if spec.dtype not in ("undefined", "bfloat16") else None
        if dtype is None:
            raise InputMismatchError(f"input {spec.name!r} has type {spec.dtype}; numpy cannot make data for it")
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise InputMismatchError(f"input {spec.name!r} has type {spec.dtype}; quantlab makes only numeric data")
    return feeds
