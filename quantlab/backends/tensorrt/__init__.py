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

Layout (arrows: imports; nothing here imports tensorrt or cuda-python at module level)::

    backend.py      TensorRTBackend: describe, build_engine, engine_for (cache), build (runner)
      +-> builder.py      EngineBuilder: parse, mark outputs, profiles, config, timing cache;
      |                   profile_shapes, DEFAULT_WORKSPACE_BYTES, DEFAULT_DYNAMIC_DIM
      |     +-> diagnostics.py  the capturing ILogger, ParserIssue, parser errors -> quantlab errors
      |     +-> monitor.py      the IProgressMonitor: a bar per builder phase, Ctrl-C/SIGTERM cancel the build
      +-> cache.py        EngineCacheKey, EngineCache (engine + JSON sidecar), EngineBuild
      +-> runner.py       TensorRTRunner: cuda-python buffers, pinned host staging, one stream
      +-> device.py       CudaDevice, cuda_device(), CPU_BUILD, checked cuda-python calls
      +-> flavors.py      Flavor, FLAVORS (module, library, pip extra): imports the flavor lazily
"""

from __future__ import annotations

from .backend import TensorRTBackend
from .builder import DEFAULT_DYNAMIC_DIM, DEFAULT_WORKSPACE_BYTES, profile_shapes
from .cache import EngineBuild, EngineCache, EngineCacheKey, EngineCacheWarning
from .device import CPU_BUILD, CudaDevice, cuda_device
from .diagnostics import ParserIssue
from .flavors import FLAVORS, Flavor
from .runner import TensorRTRunner

__all__ = [
    "CPU_BUILD",
    "DEFAULT_DYNAMIC_DIM",
    "DEFAULT_WORKSPACE_BYTES",
    "FLAVORS",
    "CudaDevice",
    "EngineBuild",
    "EngineCache",
    "EngineCacheKey",
    "EngineCacheWarning",
    "Flavor",
    "ParserIssue",
    "TensorRTBackend",
    "TensorRTRunner",
    "cuda_device",
    "profile_shapes",
]
