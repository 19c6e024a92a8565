"""TensorRT (10.x / 11.x) and TensorRT-RTX backends: parse, build, cache and run engines.

    ONNX (Q/DQ, casts) --OnnxParser--> strongly typed network --builder--> serialized engine
                                                                   |
                        <cache_dir>/<key>.engine + <key>.json  <----+
                                                                   |
    feeds --pinned host--H2D--> device buffers --execute_async_v3--> D2H --> outputs

Both flavors share one code path: ``tensorrt_rtx_bindings`` (TensorRT-RTX)
exposes the same Python API as ``tensorrt`` for everything used here. The
module is imported lazily, so quantlab works without either installed.

Precision comes from the ONNX only: networks are created STRONGLY_TYPED
(TensorRT 11 and TensorRT-RTX have no other mode; TensorRT 10 accepts the
flag), so the Q/DQ nodes and the float16 casts the writer puts in the graph
decide every layer's type; there are no FP16/INT8 builder flags to set.

Without a GPU the parser and builder still run (TensorRT-RTX builds
"CPU-only ahead-of-time" engines that are portable across Ampere and later
GPUs): :meth:`TensorRTBackend.build_engine` works here, :meth:`TensorRTBackend.build`
(which returns a runner that executes the engine) needs a CUDA GPU and says so.

Device memory uses cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart``
in older releases), the replacement for pycuda in NVIDIA's samples: one stream,
pinned host buffers, device buffers grown on demand.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import json
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import onnx

from ..atomic import json_dumps, write_bytes, write_text
from ..errors import BackendError, BackendUnavailableError, InputMismatchError, UnsupportedOpError
from ..fingerprint import sha256_bytes, tool_versions
from ..graph import serialize
from .base import Backend, BackendInfo, Runner

__all__ = [
    "Flavor",
    "FLAVORS",
    "DEFAULT_WORKSPACE_BYTES",
    "DEFAULT_DYNAMIC_DIM",
    "CPU_BUILD",
    "CudaDevice",
    "cuda_device",
    "ParserIssue",
    "EngineCacheKey",
    "EngineCache",
    "EngineCacheWarning",
    "EngineBuild",
    "TensorRTBackend",
    "TensorRTRunner",
    "profile_shapes",
]

Flavor = Literal["tensorrt", "tensorrt-rtx"]

DEFAULT_WORKSPACE_BYTES = 1 << 30
"""Builder workspace pool limit (bytes): 1 GiB, TensorRT's usual default order of magnitude."""

DEFAULT_DYNAMIC_DIM = (1, 1, 32)
"""(min, opt, max) for a dynamic dimension the data does not fix: batch 1 latency, up to 32."""

CPU_BUILD = "cpu-build"
"""Compute capability recorded for an engine built without a GPU."""

_NOT_PORTABLE = (
    "TensorRT engines are not portable across GPUs (compute capability) or TensorRT versions"
)


@dataclass(frozen=True)
class _FlavorSpec:
    module: str
    library: str
    extra: str
    distribution: str


FLAVORS: dict[str, _FlavorSpec] = {
    "tensorrt": _FlavorSpec("tensorrt", "tensorrt", "tensorrt", "tensorrt"),
    "tensorrt-rtx": _FlavorSpec(
        "tensorrt_rtx_bindings", "tensorrt_rtx", "tensorrt-rtx", "tensorrt-rtx-cu13-bindings"
    ),
}


def _import_flavor(flavor: str) -> tuple[_FlavorSpec, ModuleType]:
    if flavor not in FLAVORS:
        raise BackendUnavailableError(
            f"unknown TensorRT flavor {flavor!r}; choose one of {', '.join(FLAVORS)}"
        )
    spec = FLAVORS[flavor]
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the {flavor} backend needs the Python module {spec.module!r}, which is not "
            f"installed ({exc}). Install it with: pip install 'quantlab[{spec.extra}]'"
        ) from None
    return spec, module


# --------------------------------------------------------------------------- CUDA


def _import_cudart() -> ModuleType | None:
    """cuda-python's runtime module: ``cuda.bindings.runtime`` (>= 12.6) or ``cuda.cudart``."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


@dataclass(frozen=True)
class CudaDevice:
    """GPU 0 as cuda-python sees it; ``reason`` says why there is none."""

    available: bool
    name: str | None = None
    compute_capability: str | None = None
    reason: str = ""

    @property
    def capability_key(self) -> str:
        """What an engine cache key records: ``"8.6"``, or ``cpu-build`` without a GPU."""
        return self.compute_capability if self.available and self.compute_capability else CPU_BUILD

    def describe(self) -> str:
        if self.available:
            return f"{self.name} (compute capability {self.compute_capability})"
        return f"no GPU: parse/build only ({self.reason})"


def _cuda_error_text(cudart: ModuleType, err: Any) -> str:
    try:
        _, text = cudart.cudaGetErrorString(err)
        return text.decode() if isinstance(text, bytes) else str(text)
    except Exception:  # pragma: no cover - defensive: error string lookup itself failed
        return str(err)


def _cuda_ok(cudart: ModuleType, err: Any) -> bool:
    return err == cudart.cudaError_t.cudaSuccess


@functools.lru_cache(maxsize=1)
def cuda_device() -> CudaDevice:
    """Probe GPU 0 with cudaGetDeviceCount / cudaGetDeviceProperties (cached per process)."""
    cudart = _import_cudart()
    if cudart is None:
        return CudaDevice(False, reason="cuda-python is not installed, so no GPU can be used")
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception as exc:  # the runtime library itself failed to load
        return CudaDevice(False, reason=f"the CUDA runtime failed to load: {exc}")
    if not _cuda_ok(cudart, err):
        return CudaDevice(False, reason=f"no CUDA GPU: {_cuda_error_text(cudart, err)}")
    if count < 1:
        return CudaDevice(False, reason="no CUDA GPU: cudaGetDeviceCount found 0 devices")
    err, props = cudart.cudaGetDeviceProperties(0)
    if not _cuda_ok(cudart, err):
        return CudaDevice(False, reason=f"cannot query GPU 0: {_cuda_error_text(cudart, err)}")
    raw = props.name
    name = raw.decode(errors="replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
    return CudaDevice(True, name=name.rstrip("\x00").strip(),
                      compute_capability=f"{props.major}.{props.minor}")


def _cuda_call(cudart: ModuleType, result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, value...)`` tuple, raising BackendError on failure."""
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if not _cuda_ok(cudart, err):
        raise BackendError(f"CUDA call {what} failed: {_cuda_error_text(cudart, err)}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


# --------------------------------------------------------------------------- logging / errors


def _make_logger(trt: ModuleType) -> Any:
    """A TensorRT ILogger that keeps warnings and errors for error messages (never prints)."""

    class _CapturingLogger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[Any, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity <= trt.ILogger.Severity.WARNING:
                self.messages.append((severity, msg))

        def errors(self) -> list[str]:
            bad = (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR)
            return [_strip_no_gpu_noise(m) for s, m in self.messages if s in bad and _strip_no_gpu_noise(m)]

        def clear(self) -> None:
            self.messages.clear()

    return _CapturingLogger()


def _strip_no_gpu_noise(text: str) -> str:
    """Drop the lines TensorRT-RTX appends about the missing CUDA driver while building on a CPU."""
    keep = [line for line in text.splitlines()
            if "catchCudaError" not in line and "CUDA driver version is insufficient" not in line]
    return "\n".join(keep).strip()


@dataclass(frozen=True)
class ParserIssue:
    """One ONNX parser error: the node (index, name, op) and what went wrong."""

    code: str
    node_index: int
    node_name: str
    op_type: str
    message: str

    @property
    def is_unsupported_op(self) -> bool:
        """True when the parser has no importer for this op (or these types/attributes)."""
        if self.node_index < 0 or not self.op_type:
            return False
        return self.code.startswith("UNSUPPORTED_NODE") or "Plugin not found" in self.message

    def describe(self) -> str:
        where = (f"node {self.node_name or '#' + str(self.node_index)!r} (op {self.op_type})"
                 if self.node_index >= 0 else "the graph")
        return f"{where}: {self.code}: {self.message}"


def _parser_issues(parser: Any) -> list[ParserIssue]:
    issues = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        code = str(err.code()).rsplit(".", 1)[-1]
        issues.append(ParserIssue(
            code=code, node_index=int(err.node()), node_name=str(err.node_name() or ""),
            op_type=str(err.node_operator() or ""), message=_strip_no_gpu_noise(str(err.desc())),
        ))
    return issues


def _parse_error(library: str, version: str, label: str, issues: list[ParserIssue]) -> BackendError:
    unsupported = [i for i in issues if i.is_unsupported_op]
    listing = "\n  ".join(i.describe() for i in issues) or "(the parser gave no detail)"
    if unsupported:
        ops = ", ".join(sorted({f"{i.node_name or '#' + str(i.node_index)} ({i.op_type})" for i in unsupported}))
        return UnsupportedOpError(
            f"{library} {version} cannot parse {label}: unsupported op at node(s) {ops}.\n  {listing}\n"
            "Pin these nodes to a precision the backend supports, replace the op, or use the "
            "ONNX Runtime backend (--backend ort)."
        )
    hint = ""
    if any(i.op_type in ("QuantizeLinear", "DequantizeLinear") for i in issues):
        hint = ("\nTensorRT wants int8 symmetric Q/DQ (zero point 0) and float biases: write the "
                "model with target 'tensorrt' (the 'ort' form is for ONNX Runtime only).")
    return BackendError(f"{library} {version} failed to parse {label}:\n  {listing}{hint}")


# --------------------------------------------------------------------------- profiles


def profile_shapes(
    name: str, network_shape: Sequence[int], data_shape: Sequence[int] | None
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes for one input with dynamic dims (-1).

    A dynamic dim the data fixes to ``d`` gets ``(1, d, d)``: the data's own
    shape is the one to optimise for, smaller (e.g. a last partial batch) still
    runs. A dynamic dim without data gets :data:`DEFAULT_DYNAMIC_DIM`.
    """
    net = [int(d) for d in network_shape]
    if data_shape is not None:
        data = [int(d) for d in data_shape]
        if len(data) != len(net):
            raise InputMismatchError(
                f"input {name!r}: the data has rank {len(data)} (shape {tuple(data)}) but the "
                f"model expects rank {len(net)} (shape {tuple(net)}, -1 = dynamic)"
            )
        for axis, (n, d) in enumerate(zip(net, data, strict=True)):
            if n >= 0 and n != d:
                raise InputMismatchError(
                    f"input {name!r}: the data has {d} at axis {axis} but the model fixes it to {n}"
                )
    lo, opt, hi = [], [], []
    for axis, n in enumerate(net):
        if n >= 0:
            lo.append(n), opt.append(n), hi.append(n)
        elif data_shape is not None:
            d = int(data_shape[axis])
            lo.append(1), opt.append(d), hi.append(d)
        else:
            lo.append(DEFAULT_DYNAMIC_DIM[0]), opt.append(DEFAULT_DYNAMIC_DIM[1]), hi.append(DEFAULT_DYNAMIC_DIM[2])
    return tuple(lo), tuple(opt), tuple(hi)


# --------------------------------------------------------------------------- engine cache


class EngineCacheWarning(UserWarning):
    """A cached engine was unusable (other TensorRT version, other GPU, corrupt) and is rebuilt."""


@dataclass(frozen=True)
class EngineCacheKey:
    """Everything that makes an engine valid: model, plan, library, GPU and build settings.

    ``compute_capability`` is ``"8.6"``-style or :data:`CPU_BUILD`; ``settings_sha256``
    hashes the exposed outputs, optimisation profiles and workspace limit.
    """

    model_sha256: str
    plan_sha256: str | None
    library: str
    version: str
    compute_capability: str
    settings_sha256: str

    @property
    def digest(self) -> str:
        return sha256_bytes(json.dumps(asdict(self), sort_keys=True).encode())

    def same_build(self, other: EngineCacheKey) -> bool:
        """Same model, plan, library and settings (version / GPU may differ)."""
        return (self.model_sha256, self.plan_sha256, self.library, self.settings_sha256) == (
            other.model_sha256, other.plan_sha256, other.library, other.settings_sha256)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EngineBuild:
    """An engine and where it came from: ``status`` is built, cached, rebuilt or uncached."""

    engine: bytes = field(repr=False)
    key: EngineCacheKey
    status: Literal["built", "cached", "rebuilt", "uncached"]
    message: str
    path: Path | None
    build_seconds: float


class EngineCache:
    """``<folder>/<key digest>.engine`` plus a JSON sidecar recording what built it.

    A cached engine is used only when its sidecar matches the current library
    version and GPU compute capability and the engine bytes match their hash;
    otherwise :meth:`lookup` explains why (engines are not portable across GPUs
    or TensorRT versions) and the caller rebuilds.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def engine_path(self, key: EngineCacheKey) -> Path:
        return self.folder / f"{key.digest}.engine"

    def sidecar_path(self, key: EngineCacheKey) -> Path:
        return self.folder / f"{key.digest}.json"

    def _sidecars(self) -> list[tuple[Path, dict[str, Any]]]:
        out = []
        if not self.folder.is_dir():
            return out
        for path in sorted(self.folder.glob("*.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                EngineCacheKey(**data["key"])
            except Exception:
                continue
            out.append((path, data))
        return out

    def lookup(self, key: EngineCacheKey) -> tuple[bytes | None, bool, str]:
        """(cached engine or None, whether an unusable entry was found, a sentence saying what)."""
        engine_path, sidecar = self.engine_path(key), self.sidecar_path(key)
        if engine_path.is_file() and sidecar.is_file():
            try:
                meta = json.loads(sidecar.read_text(encoding="utf-8"))
                recorded = EngineCacheKey(**meta["key"])
            except Exception as exc:
                return None, True, f"the sidecar {sidecar} is unreadable ({exc}); rebuilding the engine"
            if (recorded.version, recorded.compute_capability) != (key.version, key.compute_capability):
                return None, True, self._mismatch_text(engine_path, recorded, key)
            data = engine_path.read_bytes()
            if sha256_bytes(data) != meta.get("engine_sha256"):
                return None, True, (f"the cached engine {engine_path} does not match its recorded hash "
                                    "(truncated or edited); rebuilding it")
            return data, False, f"using the cached engine {engine_path}"
        for path, meta in self._sidecars():
            other = EngineCacheKey(**meta["key"])
            if other.same_build(key) and other != key:
                return None, True, self._mismatch_text(path.with_suffix(".engine"), other, key)
        return None, False, "no cached engine for this model, plan, library version and GPU; building one"

    @staticmethod
    def _mismatch_text(path: Path, recorded: EngineCacheKey, current: EngineCacheKey) -> str:
        return (
            f"the cached engine {path} was built by {recorded.library} {recorded.version} for "
            f"compute capability {recorded.compute_capability}, but this is {current.library} "
            f"{current.version} on {current.compute_capability}. {_NOT_PORTABLE}: rebuilding "
            "(the old engine is left in place for the machine it was built for)."
        )

    def store(self, key: EngineCacheKey, engine: bytes, settings: Mapping[str, Any]) -> Path:
        """Write the engine, then its sidecar (a reader never sees a sidecar without its engine)."""
        path = write_bytes(self.engine_path(key), engine)
        meta = {
            "key": key.as_dict(),
            "engine_sha256": sha256_bytes(engine),
            "engine_bytes": len(engine),
            "settings": dict(settings),
            "tool_versions": tool_versions(),
            "note": f"{_NOT_PORTABLE}; quantlab rebuilds when either differs.",
        }
        write_text(self.sidecar_path(key), json_dumps(meta))
        return path


# --------------------------------------------------------------------------- backend


class TensorRTBackend(Backend):
    """TensorRT or TensorRT-RTX: ONNX -> strongly typed network -> engine -> runner.

    ``cache_dir`` enables the engine cache (and, for TensorRT-RTX, its JIT
    runtime cache); ``timing_cache`` is a file the TensorRT builder loads and
    updates (TensorRT-RTX ignores timing caches since 1.2).
    """

    def __init__(
        self,
        flavor: Flavor = "tensorrt",
        *,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
        cache_dir: Path | None = None,
        timing_cache: Path | None = None,
    ) -> None:
        self.flavor = flavor
        self.name = flavor
        self._spec, self._trt = _import_flavor(flavor)
        if workspace_bytes <= 0:
            raise BackendError(f"workspace_bytes must be positive, got {workspace_bytes}")
        self.workspace_bytes = int(workspace_bytes)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.timing_cache = Path(timing_cache) if timing_cache is not None else None
        self._logger = _make_logger(self._trt)

    # -- identity ---------------------------------------------------------------

    @property
    def library(self) -> str:
        return self._spec.library

    @property
    def version(self) -> str:
        return str(getattr(self._trt, "__version__", "unknown"))

    @property
    def is_rtx(self) -> bool:
        return self.flavor == "tensorrt-rtx"

    def describe(self) -> BackendInfo:
        device = cuda_device()
        details: dict[str, Any] = {
            "strongly_typed": True,
            "workspace_bytes": self.workspace_bytes,
            "engine_cache": str(self.cache_dir) if self.cache_dir else None,
            "compute_capability": device.capability_key,
        }
        parser_version = getattr(self._trt, "get_nv_onnx_parser_version", None)
        if parser_version is not None:
            details["onnx_parser_version"] = int(parser_version())
        if self.is_rtx:
            details["timing_cache"] = "not used: timing caches are no-ops in TensorRT-RTX >= 1.2"
            details["portability"] = "CPU-only AOT engines run on Ampere and later GPUs"
        else:
            details["timing_cache"] = str(self.timing_cache) if self.timing_cache else None
        return BackendInfo(name=self.name, library=self.library, version=self.version,
                           device=device.describe(), details=details)

    # -- building ---------------------------------------------------------------

    def _network_flags(self) -> int:
        flag = getattr(self._trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if flag is None:
            raise BackendUnavailableError(
                f"{self.library} {self.version} has no strongly typed networks; quantlab needs "
                "TensorRT >= 10 (explicit Q/DQ precision). Upgrade: pip install -U 'quantlab[tensorrt]'"
            )
        return 1 << int(flag)

    def _settings(self, outputs: Sequence[str], profiles: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "flavor": self.flavor,
            "outputs": list(outputs),
            "profiles": {k: [list(s) for s in v] for k, v in sorted(profiles.items())},
            "workspace_bytes": self.workspace_bytes,
            "strongly_typed": True,
        }

    def _parse(self, model: onnx.ModelProto, label: str) -> tuple[Any, Any, Any]:
        trt = self._trt
        self._logger.clear()
        builder = trt.Builder(self._logger)
        network = builder.create_network(self._network_flags())
        parser = trt.OnnxParser(network, self._logger)
        ok = parser.parse(serialize(model))
        issues = _parser_issues(parser)
        if not ok or issues:
            raise _parse_error(self.library, self.version, label, issues)
        return builder, network, parser

    def _mark_outputs(self, network: Any, names: Sequence[str], label: str) -> None:
        """Expose intermediate tensors: mark them as network outputs (types stay as the graph says)."""
        if not names:
            return
        existing = {network.get_output(i).name for i in range(network.num_outputs)}
        tensors: dict[str, Any] = {}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            for j in range(layer.num_outputs):
                t = layer.get_output(j)
                tensors.setdefault(t.name, t)
        for name in names:
            if name in existing:
                continue
            if name not in tensors:
                raise BackendError(
                    f"{label}: tensor {name!r} does not exist in the {self.library} network "
                    "(it is not an activation of the ONNX graph, or the parser folded it into a "
                    "constant); ask for an activation produced by a node."
                )
            network.mark_output(tensors[name])
            existing.add(name)

    def _profiles(
        self, network: Any, profiles_from: Mapping[str, Sequence[int]] | None
    ) -> dict[str, tuple[tuple[int, ...], ...]]:
        shapes = dict(profiles_from or {})
        inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
        unknown = sorted(set(shapes) - set(inputs))
        if unknown:
            raise InputMismatchError(
                f"profiles_from names {', '.join(map(repr, unknown))}, which are not inputs of the "
                f"model; its inputs are {', '.join(map(repr, inputs))}"
            )
        return {name: profile_shapes(name, shape, shapes.get(name))
                for name, shape in inputs.items() if any(d < 0 for d in shape)}

    def _config(self, builder: Any, profiles: Mapping[str, tuple[tuple[int, ...], ...]]) -> tuple[Any, Any]:
        trt = self._trt
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        if profiles:
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in profiles.items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)
        timing = None
        if self.timing_cache is not None and not self.is_rtx:
            blob = self.timing_cache.read_bytes() if self.timing_cache.is_file() else b""
            timing = config.create_timing_cache(blob)
            # ignore_mismatch=False: a cache from another GPU or version is refused, not misused.
            if not config.set_timing_cache(timing, ignore_mismatch=False):
                timing = config.create_timing_cache(b"")
                config.set_timing_cache(timing, ignore_mismatch=False)
        return config, timing

    def _save_timing_cache(self, config: Any) -> None:
        if self.timing_cache is None or self.is_rtx:
            return
        cache = config.get_timing_cache()
        if cache is not None:
            write_bytes(self.timing_cache, bytes(cache.serialize()))

    def build_engine(
        self,
        model: onnx.ModelProto,
        *,
        profiles_from: Mapping[str, tuple[int, ...]] | None = None,
        outputs: Sequence[str] | None = None,
        label: str = "the model",
    ) -> bytes:
        """Parse ``model`` and build a serialized engine (no GPU needed for TensorRT-RTX).

        ``profiles_from`` maps input names to data shapes; dynamic dims get
        (1, d, d) profiles from them. ``outputs`` are intermediate tensors to
        expose as extra engine outputs.
        """
        return self._build(model, profiles_from=profiles_from, outputs=outputs, label=label)[0]

    def _build(
        self,
        model: onnx.ModelProto,
        *,
        profiles_from: Mapping[str, Sequence[int]] | None,
        outputs: Sequence[str] | None,
        label: str,
    ) -> tuple[bytes, dict[str, Any]]:
        builder, network, _parser = self._parse(model, label)  # parser must outlive the build
        self._mark_outputs(network, list(outputs or []), label)
        profiles = self._profiles(network, profiles_from)
        config, _timing = self._config(builder, profiles)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            errors = "\n  ".join(self._logger.errors()) or "(no error was logged)"
            raise BackendError(
                f"{self.library} {self.version} failed to build an engine for {label}:\n  {errors}"
            )
        self._save_timing_cache(config)
        return bytes(serialized), self._settings(list(outputs or []), profiles)

    def cache_key(
        self,
        model: onnx.ModelProto,
        *,
        plan_sha256: str | None = None,
        settings: Mapping[str, Any],
    ) -> EngineCacheKey:
        """The engine-cache key of ``model`` built with ``settings`` on this library and GPU."""
        return EngineCacheKey(
            model_sha256=sha256_bytes(serialize(model)),
            plan_sha256=plan_sha256,
            library=self.library,
            version=self.version,
            compute_capability=cuda_device().capability_key,
            settings_sha256=sha256_bytes(json.dumps(dict(settings), sort_keys=True).encode()),
        )

    def _settings_for(
        self, model: onnx.ModelProto, outputs: Sequence[str], profiles_from: Mapping[str, Sequence[int]] | None
    ) -> dict[str, Any]:
        """Build settings computed from the ONNX inputs alone (no parse), for the cache key."""
        inits = {i.name for i in model.graph.initializer}
        profiles = {}
        for inp in model.graph.input:
            if inp.name in inits:
                continue
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim]
            if any(d < 0 for d in dims):
                profiles[inp.name] = profile_shapes(inp.name, dims, (profiles_from or {}).get(inp.name))
        return self._settings(list(outputs), profiles)

    def engine_for(
        self,
        model: onnx.ModelProto,
        *,
        outputs: Sequence[str] | None = None,
        profiles_from: Mapping[str, tuple[int, ...]] | None = None,
        plan_sha256: str | None = None,
        cache_dir: Path | None = None,
        label: str = "the model",
    ) -> EngineBuild:
        """An engine for ``model``: from the engine cache when it fits, else built (and cached).

        A cached engine from another TensorRT version or GPU is never used: the
        returned ``message`` (also issued as an :class:`EngineCacheWarning`) says
        so and a new one is built.
        """
        folder = Path(cache_dir) if cache_dir is not None else self.cache_dir
        outputs = list(outputs or [])
        settings = self._settings_for(model, outputs, profiles_from)
        key = self.cache_key(model, plan_sha256=plan_sha256, settings=settings)
        if folder is None:
            t0 = time.perf_counter()
            engine, _ = self._build(model, profiles_from=profiles_from, outputs=outputs, label=label)
            return EngineBuild(engine, key, "uncached", "engine cache disabled (no cache_dir)", None,
                               time.perf_counter() - t0)
        cache = EngineCache(folder)
        cached, stale, message = cache.lookup(key)
        if cached is not None:
            return EngineBuild(cached, key, "cached", message, cache.engine_path(key), 0.0)
        if stale:
            warnings.warn(message, EngineCacheWarning, stacklevel=2)
        t0 = time.perf_counter()
        engine, _ = self._build(model, profiles_from=profiles_from, outputs=outputs, label=label)
        seconds = time.perf_counter() - t0
        path = cache.store(key, engine, settings)
        return EngineBuild(engine, key, "rebuilt" if stale else "built", message, path, seconds)

    def require_gpu(self) -> CudaDevice:
        """GPU 0, or BackendUnavailableError saying why a TensorRT engine cannot run here."""
        device = cuda_device()
        if not device.available:
            raise BackendUnavailableError(
                f"{self.flavor}: {device.reason}. TensorRT engines need one to run (building them "
                f"works without: see build_engine); the ONNX Runtime backend runs on the CPU "
                "(--backend ort)."
            )
        return device

    def build(
        self,
        model: onnx.ModelProto,
        *,
        outputs: Sequence[str] | None = None,
        cache_dir: Path | None = None,
        profiles_from: Mapping[str, tuple[int, ...]] | None = None,
        plan_sha256: str | None = None,
    ) -> TensorRTRunner:
        """A runner executing ``model`` on GPU 0 (needs a CUDA GPU and cuda-python)."""
        self.require_gpu()
        cudart = _import_cudart()
        assert cudart is not None  # require_gpu succeeded, so cuda-python imported
        build = self.engine_for(model, outputs=outputs, profiles_from=profiles_from,
                                plan_sha256=plan_sha256, cache_dir=cache_dir)
        graph_outputs = [o.name for o in model.graph.output]
        exposed = graph_outputs + [n for n in (outputs or []) if n not in graph_outputs]
        runtime_cache = None
        if self.is_rtx and build.path is not None:
            runtime_cache = build.path.with_suffix(".runtime-cache")
        return TensorRTRunner(self._trt, cudart, build.engine, self._logger, exposed,
                              label=f"{self.library} {self.version}", runtime_cache=runtime_cache)


# --------------------------------------------------------------------------- runner


class _HostDeviceBuffer:
    """A pinned host buffer and a device buffer of the same byte size, grown on demand."""

    def __init__(self, cudart: ModuleType) -> None:
        self._cudart = cudart
        self.nbytes = 0
        self.device = 0
        self.host_ptr = 0
        self.host = np.empty(0, np.uint8)

    def ensure(self, nbytes: int) -> None:
        if nbytes <= self.nbytes:
            return
        self.free()
        size = max(int(nbytes), 1)
        self.host_ptr = int(_cuda_call(self._cudart, self._cudart.cudaMallocHost(size), "cudaMallocHost"))
        self.device = int(_cuda_call(self._cudart, self._cudart.cudaMalloc(size), "cudaMalloc"))
        pointer = ctypes.cast(self.host_ptr, ctypes.POINTER(ctypes.c_uint8))
        self.host = np.ctypeslib.as_array(pointer, (size,))
        self.nbytes = size

    def free(self) -> None:
        if self.device:
            self._cudart.cudaFree(self.device)
        if self.host_ptr:
            self._cudart.cudaFreeHost(self.host_ptr)
        self.device = self.host_ptr = self.nbytes = 0
        self.host = np.empty(0, np.uint8)


class TensorRTRunner(Runner):
    """Runs a deserialized engine on one CUDA stream with pinned host staging buffers.

    Per :meth:`run`: set the shapes of dynamic inputs (within the engine's
    optimisation profile), copy inputs host->device, ``execute_async_v3``,
    copy the requested outputs device->host, synchronize once.
    """

    def __init__(
        self,
        trt: ModuleType,
        cudart: ModuleType,
        engine_bytes: bytes,
        logger: Any,
        output_names: Sequence[str],
        *,
        label: str,
        runtime_cache: Path | None = None,
    ) -> None:
        self._trt, self._cudart, self._label = trt, cudart, label
        self._buffers: dict[str, _HostDeviceBuffer] = {}
        # the stream first: it creates the CUDA context the runtime cache check needs
        self._stream = _cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._runtime = trt.Runtime(logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self._engine is None:
            errors = "; ".join(logger.errors()) or "no detail logged"
            raise BackendError(
                f"{label} could not load the engine ({errors}). {_NOT_PORTABLE}: rebuild it on "
                "this machine (delete the engine cache entry)."
            )
        self._runtime_cache_path = runtime_cache
        self._runtime_cache = None
        self._context = self._create_context()
        if self._context is None:
            raise BackendError(f"{label} could not create an execution context for the engine")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        modes = {n: self._engine.get_tensor_mode(n) for n in names}
        self.input_names = tuple(n for n in names if modes[n] == trt.TensorIOMode.INPUT)
        engine_outputs = [n for n in names if modes[n] == trt.TensorIOMode.OUTPUT]
        ordered = [n for n in output_names if n in engine_outputs]
        self.output_names = tuple(ordered + [n for n in engine_outputs if n not in ordered])
        self._dtypes = {n: self._numpy_dtype(n) for n in names}
        self._buffers = {n: _HostDeviceBuffer(cudart) for n in names}

    def _create_context(self) -> Any:
        """An execution context; TensorRT-RTX also gets a JIT runtime cache loaded from disk."""
        create_config = getattr(self._engine, "create_runtime_config", None)
        if self._runtime_cache_path is None or create_config is None:
            return self._engine.create_execution_context()
        runtime_config = create_config()
        cache = runtime_config.create_runtime_cache()
        if self._runtime_cache_path.is_file():
            # False (kept empty) when the cache is from another GPU, driver or version
            cache.deserialize(self._runtime_cache_path.read_bytes())
        runtime_config.set_runtime_cache(cache)
        self._runtime_cache = cache
        return self._engine.create_execution_context(runtime_config)

    def _numpy_dtype(self, name: str) -> np.dtype:
        trt_type = self._engine.get_tensor_dtype(name)
        try:
            return np.dtype(self._trt.nptype(trt_type))
        except TypeError:
            raise BackendError(
                f"{self._label}: engine tensor {name!r} has type {trt_type}, which numpy cannot hold; "
                "keep model inputs and exposed outputs float32, float16 or int8"
            ) from None

    def _set_input(self, name: str, array: np.ndarray) -> None:
        cudart = self._cudart
        want = self._dtypes[name]
        if array.dtype != want:
            raise InputMismatchError(
                f"input {name!r} is {array.dtype} but the engine expects {want}; convert the data"
            )
        array = np.ascontiguousarray(array)
        engine_shape = tuple(self._engine.get_tensor_shape(name))
        if any(d < 0 for d in engine_shape):
            if not self._context.set_input_shape(name, tuple(array.shape)):
                lo, _opt, hi = (tuple(s) for s in self._engine.get_tensor_profile_shape(name, 0))
                raise InputMismatchError(
                    f"input {name!r} has shape {array.shape}, outside the engine's optimisation "
                    f"profile {lo}..{hi}; rebuild with profiles_from={{{name!r}: {array.shape}}}"
                )
        elif tuple(array.shape) != engine_shape:
            raise InputMismatchError(f"input {name!r} has shape {array.shape}; the engine expects {engine_shape}")
        buf = self._buffers[name]
        buf.ensure(array.nbytes)
        buf.host[: array.nbytes] = array.reshape(-1).view(np.uint8)
        _cuda_call(cudart, cudart.cudaMemcpyAsync(
            buf.device, buf.host_ptr, array.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream,
        ), "cudaMemcpyAsync(host->device)")
        self._context.set_tensor_address(name, buf.device)

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        cudart = self._cudart
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise InputMismatchError(
                f"feeds do not match the engine's inputs {list(self.input_names)}: "
                f"missing {missing}, unknown {extra}"
            )
        wanted = list(outputs) if outputs is not None else list(self.output_names)
        unknown = [n for n in wanted if n not in self.output_names]
        if unknown:
            raise BackendError(
                f"{self._label}: the engine does not output {unknown}; it outputs {list(self.output_names)}. "
                "Pass them as outputs= when building."
            )
        for name in self.input_names:
            self._set_input(name, np.asarray(feeds[name]))
        shapes: dict[str, tuple[int, ...]] = {}
        for name in self.output_names:  # every output needs an address, even unrequested ones
            shape = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(
                    f"{self._label}: output {name!r} has a data-dependent shape {shape}; quantlab's "
                    "runner does not support those (use the ONNX Runtime backend)"
                )
            shapes[name] = shape
            buf = self._buffers[name]
            buf.ensure(int(np.prod(shape, dtype=np.int64)) * self._dtypes[name].itemsize)
            self._context.set_tensor_address(name, buf.device)
        if not self._context.execute_async_v3(int(self._stream)):
            raise BackendError(f"{self._label}: execute_async_v3 failed")
        for name in wanted:
            nbytes = int(np.prod(shapes[name], dtype=np.int64)) * self._dtypes[name].itemsize
            buf = self._buffers[name]
            _cuda_call(cudart, cudart.cudaMemcpyAsync(
                buf.host_ptr, buf.device, nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream,
            ), "cudaMemcpyAsync(device->host)")
        _cuda_call(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        result = {}
        for name in wanted:
            nbytes = int(np.prod(shapes[name], dtype=np.int64)) * self._dtypes[name].itemsize
            # copy: the pinned buffer is reused by the next run
            result[name] = self._buffers[name].host[:nbytes].view(self._dtypes[name]).reshape(shapes[name]).copy()
        return result

    def close(self) -> None:
        """Save the JIT runtime cache (TensorRT-RTX), free buffers, destroy the stream."""
        if getattr(self, "_runtime_cache", None) is not None and self._runtime_cache_path is not None:
            blob = self._runtime_cache.serialize()
            if blob is not None:
                write_bytes(self._runtime_cache_path, bytes(blob))
            self._runtime_cache = None
        for buf in getattr(self, "_buffers", {}).values():
            buf.free()
        if getattr(self, "_stream", None) is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._context = None
        self._engine = None

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass

