"""ONNX Runtime backend: the default, the FP32 reference, and INT8 Q/DQ on the CPU.

Uses the CUDA / TensorRT execution providers when the installed onnxruntime
has them (TensorRT EP options from the ORT docs: fp16 / int8 enable and an
engine cache), else the CPU provider.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import BackendError, UnsupportedOpError
from ..graph import serialize, with_outputs
from .base import Backend, BackendInfo, Runner

__all__ = ["OrtBackend", "OrtRunner"]


class OrtRunner(Runner):
    def __init__(self, session: Any, output_names: Sequence[str]) -> None:
        self._session = session
        self.input_names = tuple(i.name for i in session.get_inputs())
        self.output_names = tuple(output_names)
        self.providers = tuple(session.get_providers())

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs is not None else list(self.output_names)
        try:
            values = self._session.run(names, dict(feeds))
        except Exception as exc:
            raise BackendError(f"ONNX Runtime failed to run the model: {exc}") from None
        return dict(zip(names, values))


class OrtBackend(Backend):
    """ONNX Runtime. ``providers`` defaults to what is available, CPU last."""

    name = "ort"

    def __init__(
        self,
        *,
        providers: Sequence[str] | None = None,
        threads: int = 0,
        optimization: str = "all",
        trt_fp16: bool = False,
        trt_int8: bool = False,
    ) -> None:
        import onnxruntime as ort

        self._ort = ort
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        missing = [p for p in providers if p not in available]
        if missing:
            raise BackendError(
                f"ONNX Runtime {ort.__version__} has no {', '.join(missing)}; available: "
                f"{', '.join(available)}. Install onnxruntime-gpu for CUDA/TensorRT providers."
            )
        self.providers = list(providers)
        self.threads = threads
        self.optimization = optimization
        self.trt_fp16 = trt_fp16
        self.trt_int8 = trt_int8

    def _session_options(self) -> Any:
        so = self._ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.log_severity_level = 3
        levels = {
            "none": self._ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": self._ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": self._ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        so.graph_optimization_level = levels[self.optimization]
        return so

    def _provider_list(self, cache_dir: Path | None) -> list[Any]:
        out: list[Any] = []
        for p in self.providers:
            if p == "TensorrtExecutionProvider":
                opts: dict[str, Any] = {"trt_fp16_enable": self.trt_fp16, "trt_int8_enable": self.trt_int8}
                if cache_dir is not None:
                    opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir),
                                trt_timing_cache_enable=True)
                out.append((p, opts))
            else:
                out.append(p)
        return out

    def build(
        self,
        model: onnx.ModelProto,
        *,
        outputs: Sequence[str] | None = None,
        cache_dir: Path | None = None,
    ) -> OrtRunner:
        graph_outputs = [o.name for o in model.graph.output]
        extra = [n for n in (outputs or []) if n not in graph_outputs]
        proto = with_outputs(model, extra) if extra else model
        try:
            session = self._ort.InferenceSession(
                serialize(proto), sess_options=self._session_options(),
                providers=self._provider_list(cache_dir),
            )
        except Exception as exc:
            msg = str(exc)
            if "NOT_IMPLEMENTED" in msg or "Could not find an implementation" in msg:
                raise UnsupportedOpError(f"ONNX Runtime cannot run this model: {msg}") from None
            raise BackendError(f"ONNX Runtime could not load the model: {msg}") from None
        return OrtRunner(session, graph_outputs + extra)

    def describe(self) -> BackendInfo:
        import os

        return BackendInfo(
            name=self.name,
            library="onnxruntime",
            version=self._ort.__version__,
            device=self._ort.get_device(),
            details={"providers": list(self.providers), "threads": self.threads or os.cpu_count(),
                     "optimization": self.optimization},
        )
