"""Backends: ONNX Runtime (default), TensorRT, TensorRT-RTX behind one interface."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import BackendUnavailableError
from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .base import Backend

__getattr__, __dir__ = lazy_exports(__name__, {"Backend": "base", "BackendInfo": "base", "Runner": "base"})

__all__ = ["Backend", "BackendInfo", "Runner", "get_backend", "is_onnxruntime", "BACKEND_NAMES"]

BACKEND_NAMES = ("ort", "tensorrt", "tensorrt-rtx")
_ORT_NAMES = ("ort", "onnxruntime")


def is_onnxruntime(name: str) -> bool:
    """Whether backend ``name`` is ONNX Runtime's CPU provider (``ort``, or its long name)."""
    return name in _ORT_NAMES


def get_backend(name: str = "ort", **options: Any) -> Backend:
    """The backend called ``name`` ('ort', 'tensorrt' or 'tensorrt-rtx')."""
    if is_onnxruntime(name):
        from .ort import OrtBackend

        return OrtBackend(**options)
    if name in ("tensorrt", "tensorrt-rtx"):
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(flavor=name, **options)
    raise BackendUnavailableError(
        f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}"
    )
