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
from .environment import available_memory_bytes, format_bytes, shape_bytes
from .errors import InputMismatchError
from .graph import LoadedModel, TensorSpec

__all__ = ["LatencyResult", "measure_latency", "random_feeds", "data_feeds", "latency_from_samples",
           "feed_batch_size", "check_feeds_fit"]

_RANDOM_TEMP_ITEMSIZE = 8
"""numpy draws random numbers as float64 / int64 before the cast: 8 more bytes per value while a feed is made."""


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
            name = d if isinstance(d, str) else "NAME"
            raise InputMismatchError(
                f"input {spec.name!r} has a dynamic axis {axis} ({label}) that is not the batch; give its size: "
                f"quantlab perf --dim {name}=128 (from Python: dims={{{name!r}: 128}})"
            )
    return tuple(shape)


def _with_batch(model: LoadedModel, batch_size: int, dims: Mapping[str, int] | None) -> dict[str, int]:
    """``dims`` with every batch symbol (an input's axis-0 symbol) at ``batch_size``, wherever it appears: a GRU's
    state ``h0 [2, batch, 48]`` beside ``feats [batch, 16, time]`` gets the batch on axis 1 too (asked for a size
    of its own, ``--dim batch=4`` ran batch 4 while perf said 1 and divided by 1). A size ``dims`` gives a batch
    symbol is refused: ``batch_size`` sets it."""
    from .graph.samples import batch_named, batch_symbols

    symbols = batch_symbols(model, {})
    given = sorted(set(dims or {}) & symbols)
    if given:
        raise InputMismatchError(f"{model.label}: {', '.join(map(repr, given))} is the batch (axis 0 of an input); "
                                 "its size is the batch size: give --batch-size (batch_size=), not --dim. For a model "
                                 "whose samples are on another axis (a sequence-first RNN's [T, batch, F]), time real "
                                 "data whose manifest says so: --data MANIFEST with its batch_axis")
    elsewhere = sorted({d for spec in model.inputs for d in (spec.shape or ())[1:]
                        if batch_named(d) and d not in symbols})
    if elsewhere:  # random data would put the batch on axis 0 and size the real one by --dim: wrong samples/s
        raise InputMismatchError(
            f"{model.label}: {', '.join(map(repr, elsewhere))} names a batch but is not on axis 0 of any input, "
            f"where {', '.join(map(repr, sorted(symbols))) or 'no symbol'} is: perf cannot tell which axis holds the "
            "samples of random data. Time real data whose manifest says where the batch is: --data MANIFEST (with "
            "[inputs] NAME = { field = ..., batch_axis = 1 })")
    return {**dict.fromkeys(symbols, batch_size), **(dims or {})}


def _check_sized(model: LoadedModel, dims: Mapping[str, int]) -> None:
    """InputMismatchError naming every named dynamic axis besides the batch that ``dims`` gives no size, all at once
    (one per run made a decoder step with two lengths fail twice)."""
    missing: dict[str, list[str]] = {}
    for spec in model.inputs:
        for axis, d in enumerate(spec.shape or ()):
            if axis and isinstance(d, str) and d not in dims:
                missing.setdefault(d, []).append(f"{spec.name!r} axis {axis}")
    if len(missing) > 1:
        where = "; ".join(f"{d!r} ({', '.join(at)})" for d, at in missing.items())
        flags = " ".join(f"--dim {d}=128" for d in missing)
        python = ", ".join(f"{d!r}: 128" for d in missing)
        raise InputMismatchError(f"{model.label}: dynamic axes other than the batch need sizes: {where}; give them: "
                                 f"quantlab perf {flags} (from Python: dims={{{python}}})")


def _feed_dtype(spec: TensorSpec) -> np.dtype:
    if spec.dtype in ("undefined", "bfloat16"):
        raise InputMismatchError(f"input {spec.name!r} has type {spec.dtype}; numpy cannot make data for it")
    return np.dtype(spec.dtype)


def _output_shapes(model: LoadedModel, batch_size: int, dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Output shapes that follow from the inputs' resolved dims (outputs with other unknown dims are left out)."""
    symbols = dict(dims)
    for spec in model.inputs:
        if spec.shape is not None:
            for d, n in zip(spec.shape, _resolve_shape(spec, batch_size, dims)):
                if isinstance(d, str):
                    symbols.setdefault(d, n)
    known: dict[str, tuple[int, ...]] = {}
    for spec in model.outputs:
        if spec.shape is None or spec.dtype in ("undefined", "bfloat16"):
            continue
        shape = [d if isinstance(d, int) and d > 0 else symbols.get(d) if isinstance(d, str) else None
                 for d in spec.shape]
        if all(isinstance(d, int) for d in shape):
            known[spec.name] = tuple(shape)  # type: ignore[arg-type]
    return known


def _too_big_advice(spec: TensorSpec | None, shape: tuple[int, ...], itemsize: int, available: int) -> str:
    """What to change: the model's fixed dims when they alone do not fit, else the batch or --dim sizes."""
    declared = spec.shape if spec is not None and spec.shape is not None else ()
    fixed = [d for d in declared if isinstance(d, int) and d > 0]
    if shape_bytes(fixed, itemsize) > available:
        return ("its fixed dims alone do not fit, whatever the batch size: the model declares an input larger than "
                "this machine can hold; re-export it with the input size it is really used at")
    fixes = []
    if declared and not (isinstance(declared[0], int) and declared[0] > 0):
        fixes.append(f"a smaller --batch-size than {shape[0]} (batch_size=)")
    named = [f"{d}={n}" for d, n in zip(declared[1:], shape[1:]) if isinstance(d, str)]
    if named:
        fixes.append(f"smaller --dim sizes than {', '.join(named)} (dims=)")
    return "use " + " and ".join(fixes) if fixes else "run it on a machine with more memory"


def _batch_note(spec: TensorSpec | None, batch_size: int) -> str:
    first = spec.shape[0] if spec is not None and spec.shape else None
    if isinstance(first, int) and first > 0:
        return f"(the model fixes its batch at {first})"
    return f"at batch size {batch_size}"


def check_feeds_fit(model: LoadedModel, batch_size: int, dims: Mapping[str, int] | None = None, *,
                    available: int | None = None) -> int:
    """Bytes random feeds (and the outputs whose shapes are known) need; InputMismatchError when they cannot fit.

    Checked before anything is allocated, against ``available`` (default:
    :func:`quantlab.environment.available_memory_bytes`), so a model with a
    dimension of 10^12 is refused with the input, its shape and its bytes
    instead of a numpy allocation error. Counts the float64/int64 values numpy
    draws before the cast to the input's type.
    """
    dims = _with_batch(model, batch_size, dims)
    _check_sized(model, dims)
    tensors: list[tuple[str, TensorSpec | None, tuple[int, ...], int]] = []
    need = 0
    for spec in model.inputs:
        shape = _resolve_shape(spec, batch_size, dims)
        item = _feed_dtype(spec).itemsize
        tensors.append((f"input {spec.name!r} ({spec.dtype})", spec, shape, item))
        need += shape_bytes(shape, item + _RANDOM_TEMP_ITEMSIZE)
    specs = {s.name: s for s in model.outputs}
    for name, shape in _output_shapes(model, batch_size, dims).items():
        item = np.dtype(specs[name].dtype).itemsize
        tensors.append((f"output {name!r} ({specs[name].dtype})", None, shape, item))
        need += shape_bytes(shape, item)
    available = available_memory_bytes() if available is None else available
    if available is None or need <= available:
        return need
    what, spec, shape, item = max(tensors, key=lambda t: shape_bytes(t[2], t[3]))
    own = shape_bytes(shape, item)
    raise InputMismatchError(
        f"{model.label}: {what} of shape {list(shape)} is {format_bytes(own)} ({own} bytes) "
        f"{_batch_note(spec, batch_size)}; the feeds, known outputs and numpy's float64/int64 draws need "
        f"{format_bytes(need)}, and this machine has {format_bytes(available)} available. Refusing before "
        f"allocating: {_too_big_advice(spec, shape, item, available)}."
    )


def random_feeds(
    model: LoadedModel, batch_size: int, seed: int = 0, *, dims: Mapping[str, int] | None = None,
    available: int | None = None,
) -> dict[str, np.ndarray]:
    """Deterministic random data for every model input, dynamic dims resolved.

    A dynamic leading axis becomes ``batch_size``, and so does its symbol on any other axis (a recurrent state's
    batch on axis 1); other dynamic axes need a size in ``dims`` (by symbol name). Floats are N(0, 1) in the input's float
    type; integers are 0 or 1 (valid ids, masks and token types); bools random.
    Refuses sizes that cannot fit in memory first (:func:`check_feeds_fit`).
    """
    if batch_size < 1:
        raise InputMismatchError(f"batch_size must be >= 1, got {batch_size}")
    check_feeds_fit(model, batch_size, dims, available=available)
    sized = _with_batch(model, batch_size, dims)
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in model.inputs:
        shape = _resolve_shape(spec, batch_size, sized)
        dtype = _feed_dtype(spec)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise InputMismatchError(f"input {spec.name!r} has type {spec.dtype}; quantlab makes only numeric data")
    return feeds


def data_feeds(model: LoadedModel, dataset: Any, batch_size: int) -> tuple[dict[str, np.ndarray], int]:
    """The first batch of ``dataset`` (up to ``batch_size`` samples) as feeds for ``model``, and how many samples
    it holds: what a latency of real work is measured on. Random data misleads where the values decide the work:
    a TTS model fed padding ids (0) made half its waveform, a while loop stops after other steps, NMS keeps other
    boxes. Raises InputMismatchError for data that does not fit the model (named by input) or an empty set."""
    from .data import check_inputs

    check_inputs(dataset, model, batch_size=batch_size)
    batch = next(iter(dataset.batches(batch_size)), None)
    if batch is None:
        raise InputMismatchError(f"data set {getattr(dataset, 'label', dataset)!s} holds no sample to time; give "
                                 "a manifest with at least one")
    return {k: np.asarray(v) for k, v in batch.feeds.items()}, len(batch)
