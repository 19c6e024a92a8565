"""Activation statistics in one streaming pass of the FP32 model (after NNCF's statistics collection).

The model is built once with every wanted tensor exposed as an extra output;
each batch's outputs go straight into per-tensor reducers
(:class:`quantlab.histogram.AbsHistogram`) and are dropped, so peak memory
is one batch of activations plus a fixed 128 KiB histogram per tensor, however
many samples the set holds::

    batches() ──> feeds ──> runner(exposed outputs) ──> {tensor: array} ──> reducers
                     │                                        (dropped after each batch)
                     └──> on_batch(item)   (first pass only: data fingerprint, NaN check)

When one batch of all exposed tensors would exceed ``memory_budget_bytes``,
tensors are split into groups and the data is run once per group; that is why
``batches`` is a factory that can be called again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .atomic import atomic_path
from .backends.base import Backend
from .errors import CalibrationError, DataError
from .graph import LoadedModel, activation_names, consumer_map, producer_map, tensor_specs
from .histogram import DEFAULT_BINS, DEFAULT_HUGE_THRESHOLD, AbsHistogram, HistogramState

__all__ = [
    "STATISTICS_FORMAT",
    "DEFAULT_MEMORY_BUDGET",
    "Statistics",
    "collect_statistics",
    "save_statistics",
    "load_statistics",
    "batch_feeds",
    "plan_groups",
    "TENSOR_SCOPES",
    "fused_preactivations",
    "scope_tensors",
]

STATISTICS_FORMAT = "quantlab.statistics/1"

DEFAULT_MEMORY_BUDGET = 2 << 30
"""Bytes of exposed activations per batch before statistics are collected in several passes."""


@dataclass(frozen=True)
class Statistics:
    """Per-tensor histograms of |x| with min/max/counts, from one pass over a data set.

    ``tensors`` maps a tensor name to its :class:`HistogramState`, in
    topological order; ``samples``/``batches`` count what was run; ``passes``
    is the number of runs over the data (1 unless the memory budget split the
    tensors into groups).
    """

    tensors: Mapping[str, HistogramState]
    samples: int
    batches: int
    model_sha256: str
    bins: int = DEFAULT_BINS
    huge_threshold: float = DEFAULT_HUGE_THRESHOLD
    passes: int = 1
    backend: Mapping[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def __getitem__(self, name: str) -> HistogramState:
        return self.tensors[name]

    def metadata(self) -> dict[str, Any]:
        """Everything but the counts, as JSON-ready data."""
        return {
            "format": STATISTICS_FORMAT,
            "samples": self.samples,
            "batches": self.batches,
            "model_sha256": self.model_sha256,
            "bins": self.bins,
            "huge_threshold": self.huge_threshold,
            "passes": self.passes,
            "backend": dict(self.backend),
            "tensors": list(self.tensors),
        }


TENSOR_SCOPES = ("all", "quantizable")
"""``all``: every float activation; ``quantizable``: without :func:`fused_preactivations`."""

_FUSING_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization")
_FUSED_ACTIVATIONS = ("Relu", "Clip")


def fused_preactivations(proto: onnx.ModelProto) -> list[str]:
    """Conv/Gemm/MatMul/BatchNorm outputs read only by a Relu or Clip (and not graph outputs).

    TensorRT (and ONNX Runtime's QLinearConv) fuse the activation into the
    producer, so no Q/DQ ever sits on these tensors: their ranges are never
    used. On CNNs they hold about half of all activation values, so leaving them
    out halves the statistics work::

        x ─► Conv ─► t ─► Clip ─► y ─► [Q/DQ] ─► next Conv       t: fused pre-activation
    """
    producers = producer_map(proto)
    consumers = consumer_map(proto)
    outputs = {o.name for o in proto.graph.output}
    return [
        name for name in activation_names(proto, include_inputs=False)
        if name in producers and producers[name].op_type in _FUSING_PRODUCERS and name not in outputs
        and consumers.get(name) and all(c.op_type in _FUSED_ACTIVATIONS for c in consumers[name])
    ]


def scope_tensors(proto: onnx.ModelProto, scope: str = "all") -> list[str]:
    """The tensors calibrated for ``scope`` (one of :data:`TENSOR_SCOPES`), in topological order."""
    names = activation_names(proto)
    if scope == "all":
        return names
    if scope == "quantizable":
        fused = set(fused_preactivations(proto))
        return [n for n in names if n not in fused]
    raise CalibrationError(f"unknown tensor scope {scope!r}; choose one of {', '.join(TENSOR_SCOPES)}")


def batch_feeds(item: Any) -> Mapping[str, np.ndarray]:
    """The feed mapping of a batch item: the item itself, or its ``.feeds`` (a ``quantlab.data.Batch``)."""
    feeds = getattr(item, "feeds", item)
    if not isinstance(feeds, Mapping):
        raise DataError(
            f"a calibration batch must be a mapping of input name -> array or have .feeds; got {type(item).__name__}"
        )
    return feeds


def _batch_size(feeds: Mapping[str, np.ndarray]) -> int:
    for value in feeds.values():
        arr = np.asarray(value)
        return int(arr.shape[0]) if arr.ndim else 1
    return 0


def _resolved_sizes(model: LoadedModel, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> dict[str, int | None]:
    """Bytes per tensor for this batch's input shapes (None when shape inference cannot tell)."""
    symbols: dict[str, int] = {}
    for spec in model.inputs:
        if spec.name in feeds and spec.shape is not None:
            for dim, actual in zip(spec.shape, np.shape(feeds[spec.name])):
                if isinstance(dim, str):
                    symbols.setdefault(dim, int(actual))

    def size_of(specs: Mapping[str, Any]) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for name in names:
            spec = specs.get(name)
            if spec is None or spec.shape is None:
                out[name] = None
                continue
            numel = 1
            for dim in spec.shape:
                value = dim if isinstance(dim, int) else symbols.get(dim) if isinstance(dim, str) else None
                if value is None:
                    numel = -1
                    break
                numel *= value
            itemsize = np.dtype(spec.dtype).itemsize if spec.dtype not in ("undefined", "bfloat16") else 4
            out[name] = None if numel < 0 else numel * itemsize
        return out

    sizes = size_of(tensor_specs(model.proto))
    if all(v is not None for v in sizes.values()):
        return sizes
    concrete = onnx.ModelProto()
    concrete.CopyFrom(model.proto)
    del concrete.graph.value_info[:]
    for inp in concrete.graph.input:
        if inp.name in feeds:
            shape = np.shape(feeds[inp.name])
            dims = inp.type.tensor_type.shape.dim
            if len(dims) == len(shape):
                for d, actual in zip(dims, shape):
                    d.Clear()
                    d.dim_value = int(actual)
    try:
        concrete = onnx.shape_inference.infer_shapes(concrete, strict_mode=False, data_prop=True)
    except Exception:  # estimation only: fall back to what the symbolic shapes gave
        return sizes
    again = size_of(tensor_specs(concrete))
    return {n: sizes[n] if sizes[n] is not None else again[n] for n in names}


def plan_groups(sizes: Mapping[str, int | None], budget: int) -> list[list[str]]:
    """Split tensors (in order) into groups whose summed bytes stay within ``budget``.

    A tensor of unknown size counts as the largest known one; a tensor larger
    than the budget gets a group of its own.
    """
    known = [v for v in sizes.values() if v is not None]
    fallback = max(known) if known else 0
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, size in sizes.items():
        nbytes = fallback if size is None else size
        if current and used + nbytes > budget:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        groups.append(current)
    return groups


def _check_tensors(model: LoadedModel, tensors: Sequence[str]) -> None:
    produced = set(producer_map(model.proto)) | set(model.input_names)
    unknown = [t for t in tensors if t not in produced]
    if unknown:
        shown = ", ".join(repr(t) for t in unknown[:5])
        raise CalibrationError(
            f"{model.label}: no node or input produces tensor(s) {shown}; "
            "calibrate activations by the names of node outputs or graph inputs."
        )
    if len(set(tensors)) != len(tensors):
        raise CalibrationError(f"{model.label}: the tensor list names a tensor twice")


def _progress_bar(progress: bool, total: int | None, desc: str) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True, leave=True)


def _run_pass(
    model: LoadedModel,
    items: Iterator[Any],
    group: Sequence[str],
    reducers: Mapping[str, AbsHistogram],
    backend: Any,
    on_batch: Callable[[Any], None] | None,
    bar: Any,
    pool: Any,
    first: Any = None,
) -> tuple[int, int]:
    """Run every batch once, feeding the group's tensors into their reducers; (samples, batches)."""
    input_names = set(model.input_names)
    exposed = [t for t in group if t not in input_names]
    runner = backend.build(model.proto, outputs=exposed) if exposed else None
    samples = batches = 0
    try:
        stream = items if first is None else _chain_first(first, items)
        for item in stream:
            if on_batch is not None:
                on_batch(item)
            feeds = batch_feeds(item)
            for t in group:
                if t in input_names:
                    reducers[t].update(np.asarray(feeds[t]))
            if runner is not None:
                outputs = runner.run(feeds, exposed)
                _reduce(outputs, reducers, pool)
                del outputs
            n = _batch_size(feeds)
            samples += n
            batches += 1
            if bar is not None:
                bar.update(n)
    finally:
        if runner is not None:
            runner.close()
    return samples, batches


def _reduce(outputs: Mapping[str, np.ndarray], reducers: Mapping[str, AbsHistogram], pool: Any) -> None:
    """Feed each output to its reducer; largest first over the pool's threads (the kernels release the GIL)."""
    names = sorted(outputs, key=lambda t: -np.size(outputs[t]))
    if pool is None or len(names) < 2:
        for t in names:
            reducers[t].update(outputs[t])
        return
    for future in [pool.submit(reducers[t].update, outputs[t]) for t in names]:
        future.result()


def _chain_first(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def collect_statistics(
    model: LoadedModel,
    batches: Callable[[], Iterable[Any]],
    *,
    tensors: Sequence[str] | None = None,
    backend: Backend | None = None,
    bins: int = DEFAULT_BINS,
    huge_threshold: float = DEFAULT_HUGE_THRESHOLD,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    on_batch: Callable[[Any], None] | None = None,
    progress: bool = False,
    total: int | None = None,
    threads: int | None = None,
) -> Statistics:
    """Histograms of |x| (plus min/max/counts) of ``tensors`` over every batch ``batches()`` yields.

    ``batches`` is a factory returning a fresh iterable of batch items: feed
    mappings (input name -> array batched on axis 0) or objects with a
    ``.feeds`` mapping (``quantlab.data.Batch``). It is called once per pass.
    ``tensors`` defaults to every float activation
    (:func:`quantlab.graph.activation_names`); ``backend`` to ONNX Runtime.
    ``on_batch(item)`` runs on each item of the first pass before the model
    sees it (fingerprinting, NaN checks). ``total`` is the expected number of
    samples, for the progress bar. ``threads`` (default: all cores) reduce
    several tensors at once; results do not depend on it.

    Raises DataError when the data is empty or a later pass sees different
    data, CalibrationError for a tensor name the model does not produce.
    """
    if backend is None:
        from .backends import get_backend

        backend = get_backend("ort")
    names = list(tensors) if tensors is not None else activation_names(model.proto)
    _check_tensors(model, names)
    source = iter(batches())
    first = next(source, None)
    if first is None:
        raise DataError("the calibration data yielded no batches; give it at least one sample")
    groups = plan_groups(_resolved_sizes(model, names, batch_feeds(first)), memory_budget_bytes) if names else [[]]
    reducers = {t: AbsHistogram(bins, huge_threshold) for t in names}
    workers = threads if threads is not None else (os.cpu_count() or 1)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="quantlab-stats") if workers > 1 else None
    try:
        samples, n_batches = _run_groups(model, batches, source, first, groups, reducers, backend,
                                         on_batch, progress, total, pool)
    finally:
        if pool is not None:
            pool.shutdown()
    info = backend.describe().as_dict() if hasattr(backend, "describe") else {}
    return Statistics(
        tensors={t: reducers[t].state() for t in names},
        samples=samples,
        batches=n_batches,
        model_sha256=model.sha256,
        bins=bins,
        huge_threshold=float(huge_threshold),
        passes=len(groups),
        backend=info,
    )


def _run_groups(
    model: LoadedModel,
    batches: Callable[[], Iterable[Any]],
    source: Iterator[Any],
    first: Any,
    groups: Sequence[Sequence[str]],
    reducers: Mapping[str, AbsHistogram],
    backend: Any,
    on_batch: Callable[[Any], None] | None,
    progress: bool,
    total: int | None,
    pool: Any,
) -> tuple[int, int]:
    """One pass per group of tensors; the first pass reuses the already-started iterator."""
    samples = n_batches = 0
    for index, group in enumerate(groups):
        desc = "statistics" if len(groups) == 1 else f"statistics pass {index + 1}/{len(groups)}"
        bar = _progress_bar(progress, total, desc)
        try:
            if index == 0:
                samples, n_batches = _run_pass(model, source, group, reducers, backend, on_batch, bar, pool, first)
            else:
                again = _run_pass(model, iter(batches()), group, reducers, backend, None, bar, pool)
                if again != (samples, n_batches):
                    raise DataError(
                        f"pass {index + 1} over the calibration data saw {again[0]} samples in {again[1]} "
                        f"batches, the first saw {samples} in {n_batches}: the batches() factory must "
                        "yield the same data every time"
                    )
        finally:
            if bar is not None:
                bar.close()
    return samples, n_batches


_SCALARS = ("upper", "min", "max", "count", "nonfinite", "huge", "zeros")
_OPTIONAL_SCALARS = ("zeros",)
"""Scalars files from older quantlab versions lack; read as 0 (e.g. no exact-zero count: entropy keeps zeros)."""


def save_statistics(stats: Statistics, path: str | os.PathLike[str]) -> Path:
    """Write ``stats`` as one ``.npz`` (no pickles): counts [tensors, bins], per-tensor scalars, JSON metadata.

    The scalars include ``zeros`` (exact-zero count); files written before it
    existed still load, with ``zeros`` 0.
    """
    names = list(stats.tensors)
    states = [stats.tensors[n] for n in names]
    arrays: dict[str, np.ndarray] = {
        "metadata": np.frombuffer(json.dumps(stats.metadata(), sort_keys=True).encode(), dtype=np.uint8),
        "counts": np.stack([s.counts for s in states]) if states else np.zeros((0, stats.bins), np.int64),
    }
    for key in _SCALARS:
        dtype = np.int64 if key in ("count", "nonfinite", "huge", "zeros") else np.float64
        arrays[key] = np.array([getattr(s, key) for s in states], dtype=dtype)
    target = Path(path)
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return target


def load_statistics(path: str | os.PathLike[str]) -> Statistics:
    """Read a file written by :func:`save_statistics`; CalibrationError when it is not one."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(arrays["metadata"].tobytes().decode())
    except FileNotFoundError:
        raise CalibrationError(f"{path}: no such statistics file") from None
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{path}: not a quantlab statistics file ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != STATISTICS_FORMAT:
        raise CalibrationError(f"{path}: not a {STATISTICS_FORMAT} file (format {meta.get('format')!r})")
    names = meta["tensors"]
    missing = [k for k in ("counts", *_SCALARS) if k not in arrays and k not in _OPTIONAL_SCALARS]
    if missing or arrays["counts"].shape != (len(names), meta["bins"]):
        raise CalibrationError(f"{path}: statistics file is incomplete or inconsistent (missing {missing})")
    zeros = arrays["zeros"] if "zeros" in arrays else np.zeros(len(names), np.int64)
    tensors = {}
    for i, name in enumerate(names):
        counts = arrays["counts"][i].astype(np.int64)
        counts.setflags(write=False)
        try:
            tensors[name] = HistogramState(
                counts=counts,
                upper=float(arrays["upper"][i]),
                min=float(arrays["min"][i]),
                max=float(arrays["max"][i]),
                count=int(arrays["count"][i]),
                nonfinite=int(arrays["nonfinite"][i]),
                huge=int(arrays["huge"][i]),
                huge_threshold=float(meta["huge_threshold"]),
                zeros=int(zeros[i]),
            )
        except (ValueError, IndexError) as exc:
            raise CalibrationError(f"{path}: statistics of tensor {name!r} are inconsistent ({exc})") from None
    return Statistics(
        tensors=tensors,
        samples=int(meta["samples"]),
        batches=int(meta["batches"]),
        model_sha256=str(meta["model_sha256"]),
        bins=int(meta["bins"]),
        huge_threshold=float(meta["huge_threshold"]),
        passes=int(meta["passes"]),
        backend=meta.get("backend", {}),
    )
