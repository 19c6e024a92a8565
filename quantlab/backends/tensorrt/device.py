"""GPU 0 through cuda-python: whether there is one (:func:`cuda_device`) and checked runtime calls.

cuda-python is imported on first use (``cuda.bindings.runtime``, or ``cuda.cudart`` in
older releases), so quantlab works without it; without a GPU engines still build.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ...errors import BackendError

CPU_BUILD = "cpu-build"
"""Compute capability recorded for an engine built without a GPU."""


def import_cudart() -> ModuleType | None:
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
    cudart = import_cudart()
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


def cuda_call(cudart: ModuleType, result: Any, what: str) -> Any:
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
