"""The TensorRT / TensorRT-RTX :class:`~quantlab.backends.base.Backend`: identity, engines, runners.

    TensorRTBackend --describe--> BackendInfo (library, version, parser, GPU or "parse/build only")
                    --build_engine--> EngineBuilder.build            (no GPU needed)
                    --engine_for--> EngineCache hit, else EngineBuilder.build + store
                    --build--> engine_for + TensorRTRunner           (needs a CUDA GPU)
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from ...errors import BackendError, BackendUnavailableError
from ...fingerprint import sha256_bytes
from ...graph import serialize
from ...shapes import ShapeRange
from ..base import Backend, BackendInfo
from .builder import DEFAULT_WORKSPACE_BYTES, EngineBuilder
from .cache import EngineBuild, EngineCache, EngineCacheKey, EngineCacheWarning
from .device import CudaDevice, cuda_device, import_cudart
from .diagnostics import make_logger
from .flavors import Flavor, import_flavor
from .runner import TensorRTRunner


class TensorRTBackend(Backend):
    """TensorRT or TensorRT-RTX: ONNX -> strongly typed network -> engine -> runner.

    ``cache_dir`` enables the engine cache (and, for TensorRT-RTX, its JIT
    runtime cache); ``timing_cache`` is a file the TensorRT builder loads and
    updates (TensorRT-RTX ignores timing caches since 1.2). ``shapes`` are
    default (min, opt, max) ranges by input name for builds given none of their
    own (``get_backend("tensorrt-rtx", shapes=...)``: how compare and search pass
    ``--shapes``); a model without an input of that name ignores it (sub-models).
    """

    def __init__(
        self,
        flavor: Flavor = "tensorrt",
        *,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
        cache_dir: Path | None = None,
        timing_cache: Path | None = None,
        shapes: Mapping[str, ShapeRange] | None = None,
    ) -> None:
        self.flavor = flavor
        self.shapes = dict(shapes or {})
        self.name = flavor
        self._spec, self._trt = import_flavor(flavor)
        if workspace_bytes <= 0:
            raise BackendError(f"workspace_bytes must be positive, got {workspace_bytes}")
        self.workspace_bytes = int(workspace_bytes)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.timing_cache = Path(timing_cache) if timing_cache is not None else None
        self._logger = make_logger(self._trt)
        self._builder = EngineBuilder(self._trt, flavor=flavor, library=self._spec.library,
                                      workspace_bytes=self.workspace_bytes, timing_cache=self.timing_cache,
                                      logger=self._logger)

    # -- identity ---------------------------------------------------------------

    @property
    def library(self) -> str:
        return self._spec.library

    @property
    def version(self) -> str:
        return self._builder.version

    @property
    def is_rtx(self) -> bool:
        return self._builder.is_rtx

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

    # -- engines ----------------------------------------------------------------

    def build_engine(
        self,
        model: onnx.ModelProto,
        *,
        profiles_from: Mapping[str, tuple[int, ...]] | None = None,
        outputs: Sequence[str] | None = None,
        label: str = "the model",
        shapes: Mapping[str, ShapeRange] | None = None,
        progress: bool = False,
    ) -> bytes:
        """Parse ``model`` and build a serialized engine (no GPU needed for TensorRT-RTX); ``progress`` shows a bar
        per builder phase, and an interrupt (Ctrl-C, SIGTERM) cancels the build either way.

        ``shapes`` gives (min, opt, max) per input (``--shapes``, or
        :func:`quantlab.shapes.profiles_from_data`); ``profiles_from`` maps other
        inputs to one data shape each (batch axis (1, d, d), other dynamic axes
        (d, d, d)). ``outputs`` are intermediate tensors to expose as extra
        engine outputs. :meth:`profiles_for` says which profiles the engine gets.
        """
        return self._builder.build(model, profiles_from=profiles_from, outputs=outputs, label=label,
                                   shapes=self._shapes_for(model, shapes), progress=progress)[0]

    def _shapes_for(self, model: onnx.ModelProto, shapes: Mapping[str, ShapeRange] | None
                    ) -> Mapping[str, ShapeRange] | None:
        """``shapes`` if given, else the backend's default ranges for the inputs ``model`` has."""
        if shapes is not None or not self.shapes:
            return shapes
        names = {i.name for i in model.graph.input}
        return {k: v for k, v in self.shapes.items() if k in names}

    def profiles_for(
        self,
        model: onnx.ModelProto,
        *,
        profiles_from: Mapping[str, tuple[int, ...]] | None = None,
        shapes: Mapping[str, ShapeRange] | None = None,
    ) -> dict[str, list[list[int]]]:
        """The optimisation profiles an engine of ``model`` is built with: input -> [min, opt, max].

        The form ``engine.json`` records under ``profiles`` (the Triton export reads it).
        """
        return dict(self._builder.settings_for(model, [], profiles_from, self._shapes_for(model, shapes))["profiles"])

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
        self, model: onnx.ModelProto, outputs: Sequence[str], profiles_from: Mapping[str, Sequence[int]] | None,
        shapes: Mapping[str, ShapeRange] | None = None,
    ) -> dict[str, Any]:
        """Build settings computed from the ONNX inputs alone (no parse), for the cache key."""
        return self._builder.settings_for(model, outputs, profiles_from, shapes)

    def engine_for(
        self,
        model: onnx.ModelProto,
        *,
        outputs: Sequence[str] | None = None,
        profiles_from: Mapping[str, tuple[int, ...]] | None = None,
        plan_sha256: str | None = None,
        cache_dir: Path | None = None,
        label: str = "the model",
        shapes: Mapping[str, ShapeRange] | None = None,
    ) -> EngineBuild:
        """An engine for ``model``: from the engine cache when it fits, else built (and cached).

        A cached engine from another TensorRT version or GPU is never used: the
        returned ``message`` (also issued as an :class:`EngineCacheWarning`) says
        so and a new one is built.
        """
        folder = Path(cache_dir) if cache_dir is not None else self.cache_dir
        outputs = list(outputs or [])
        shapes = self._shapes_for(model, shapes)
        settings = self._settings_for(model, outputs, profiles_from, shapes)
        key = self.cache_key(model, plan_sha256=plan_sha256, settings=settings)
        if folder is None:
            t0 = time.perf_counter()
            engine, _ = self._builder.build(model, profiles_from=profiles_from, outputs=outputs, label=label,
                                            shapes=shapes)
            return EngineBuild(engine, key, "uncached", "engine cache disabled (no cache_dir)", None,
                               time.perf_counter() - t0)
        cache = EngineCache(folder)
        cached, stale, message = cache.lookup(key)
        if cached is not None:
            return EngineBuild(cached, key, "cached", message, cache.engine_path(key), 0.0)
        if stale:
            warnings.warn(message, EngineCacheWarning, stacklevel=2)
        t0 = time.perf_counter()
        engine, _ = self._builder.build(model, profiles_from=profiles_from, outputs=outputs, label=label,
                                            shapes=shapes)
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
        shapes: Mapping[str, ShapeRange] | None = None,
    ) -> TensorRTRunner:
        """A runner executing ``model`` on GPU 0 (needs a CUDA GPU and cuda-python)."""
        self.require_gpu()
        cudart = import_cudart()
        assert cudart is not None  # require_gpu succeeded, so cuda-python imported
        build = self.engine_for(model, outputs=outputs, profiles_from=profiles_from,
                                plan_sha256=plan_sha256, cache_dir=cache_dir, shapes=shapes)
        graph_outputs = [o.name for o in model.graph.output]
        exposed = graph_outputs + [n for n in (outputs or []) if n not in graph_outputs]
        runtime_cache = None
        if self.is_rtx and build.path is not None:
            runtime_cache = build.path.with_suffix(".runtime-cache")
        return TensorRTRunner(self._trt, cudart, build.engine, self._logger, exposed,
                              label=f"{self.library} {self.version}", runtime_cache=runtime_cache)
