"""Running an engine: cuda-python device buffers, pinned host staging, one stream.

    feeds --pinned host--H2D--> device buffers --execute_async_v3--> D2H --> outputs
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ...atomic import write_bytes
from ...errors import BackendError, InputMismatchError
from ..base import Runner, check_feed_names
from .builder import onnx_input_name
from .device import cuda_call
from .flavors import NOT_PORTABLE


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
        self.host_ptr = int(cuda_call(self._cudart, self._cudart.cudaMallocHost(size), "cudaMallocHost"))
        self.device = int(cuda_call(self._cudart, self._cudart.cudaMalloc(size), "cudaMalloc"))
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
        self._stream = cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._runtime = trt.Runtime(logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self._engine is None:
            errors = "; ".join(logger.errors()) or "no detail logged"
            raise BackendError(
                f"{label} could not load the engine ({errors}). {NOT_PORTABLE}: rebuild it on "
                "this machine (delete the engine cache entry)."
            )
        self._runtime_cache_path = runtime_cache
        self._runtime_cache = None
        self._context = self._create_context()
        if self._context is None:
            raise BackendError(f"{label} could not create an execution context for the engine")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        modes = {n: self._engine.get_tensor_mode(n) for n in names}
        engine_outputs = [n for n in names if modes[n] == trt.TensorIOMode.OUTPUT]
        self._engine_inputs = {onnx_input_name(n, engine_outputs): n for n in names
                               if modes[n] == trt.TensorIOMode.INPUT}  # ONNX name -> the engine's
        self.input_names = tuple(self._engine_inputs)
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
                    f"profile {lo}..{hi}; rebuild with a range that holds it (--shapes {name}:MIN,OPT,MAX, "
                    "or shapes= / profiles_from= in Python)"
                )
        elif tuple(array.shape) != engine_shape:
            raise InputMismatchError(f"input {name!r} has shape {array.shape}; the engine expects {engine_shape}")
        buf = self._buffers[name]
        buf.ensure(array.nbytes)
        buf.host[: array.nbytes] = array.reshape(-1).view(np.uint8)
        cuda_call(cudart, cudart.cudaMemcpyAsync(
            buf.device, buf.host_ptr, array.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream,
        ), "cudaMemcpyAsync(host->device)")
        self._context.set_tensor_address(name, buf.device)

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        cudart = self._cudart
        check_feed_names(feeds, self.input_names, "engine")
        wanted = list(outputs) if outputs is not None else list(self.output_names)
        unknown = [n for n in wanted if n not in self.output_names]
        if unknown:
            raise BackendError(
                f"{self._label}: the engine does not output {unknown}; it outputs {list(self.output_names)}. "
                "Pass them as outputs= when building."
            )
        for name, engine_name in self._engine_inputs.items():
            self._set_input(engine_name, np.asarray(feeds[name]))
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
            cuda_call(cudart, cudart.cudaMemcpyAsync(
                buf.host_ptr, buf.device, nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream,
            ), "cudaMemcpyAsync(device->host)")
        cuda_call(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
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
