"""Triton's ``config.pbtxt`` for a quantlab model: I/O, batching, instances, TensorRT settings, warm-up.

Field names and values follow Triton's ``ModelConfig`` message
(``model_config.proto``) and the ONNX Runtime backend's TensorRT
accelerator parameters (``precision_mode``, ``max_workspace_size_bytes``,
``trt_engine_cache_enable``/``_path``, ``trt_timing_cache_enable``/``_path``,
``trt_profile_{min,opt,max}_shapes``); the tests parse every written config
into ``tritonclient``'s ``ModelConfig`` with protobuf's text parser.

Precision for the ONNX Runtime TensorRT execution provider: ``INT8`` when the
plan has INT8 groups (explicit Q/DQ: TensorRT takes scales from the graph, no
calibration table), else ``FP16`` when it has FP16 groups, else ``FP32``. The
flag *allows* a precision: with ``FP16`` TensorRT may also run layers the plan
kept in FP32 in FP16. A plan that pins layers to FP32 for accuracy is exact
only with ``--platform tensorrt`` (a strongly typed engine built by quantlab). With ``INT8`` alone a plan's FP16
groups cannot run in FP16 (:func:`precision_note`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import ModelError
from ..graph import TensorSpec
from .pbtxt import Enum, Message

__all__ = ["TritonOptions", "ModelIO", "PLATFORMS", "triton_dtype", "precision_mode", "precision_note",
           "model_config"]

PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
DEFAULT_FILENAMES = {"onnxruntime": "model.onnx", "tensorrt": "model.plan"}

_DTYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "bfloat16": "TYPE_BF16",
    "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
    "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64",
    "bool": "TYPE_BOOL", "object": "TYPE_STRING", "str": "TYPE_STRING",
}


@dataclass(frozen=True)
class TritonOptions:
    """How the model is served. ``max_batch_size`` None: 8 for a model with a dynamic batch axis, else 0."""

    name: str
    platform: str = "onnxruntime"
    max_batch_size: int | None = None
    dynamic_batching: bool = False
    max_queue_delay_us: int = 100
    instances: int = 1
    version: int | None = None
    workspace_bytes: int = 1 << 30
    default_max_batch_size: int = 8


@dataclass(frozen=True)
class ModelIO:
    """The model's inputs and outputs, and whether axis 0 of every one is a dynamic batch."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def batch_is_dynamic(self) -> bool:
        specs = self.inputs + self.outputs
        return bool(specs) and all(s.shape is not None and len(s.shape) >= 1 and not isinstance(s.shape[0], int)
                                   for s in specs)

    def fixed_batch_tensor(self) -> str | None:
        """The first tensor whose axis 0 is fixed (or absent): it rules out Triton's batching."""
        for s in self.inputs + self.outputs:
            if s.shape is None or not s.shape or isinstance(s.shape[0], int):
                return s.name
        return None


def triton_dtype(spec: TensorSpec) -> str:
    """Triton's ``TYPE_*`` name for a tensor's numpy dtype name."""
    try:
        return _DTYPES[spec.dtype]
    except KeyError:
        what = ("is a sequence or map, not a tensor (SequenceConstruct, ZipMap)" if spec.dtype == "undefined"
                else f"has dtype {spec.dtype}")
        raise ModelError(f"model input/output {spec.name!r} {what}, which Triton has no type for: export a model "
                         "whose graph outputs are the tensors it holds (or cast it to a type Triton serves)") from None


def config_dims(spec: TensorSpec, batched: bool) -> list[int]:
    """Triton dims: without the batch axis when Triton batches; every dynamic dim is -1."""
    shape = list(spec.shape or ())
    if batched:
        shape = shape[1:]
    return [d if isinstance(d, int) else -1 for d in shape]


def precision_mode(group_counts: Mapping[str, int]) -> str:
    if group_counts.get("int8", 0):
        return "INT8"
    if group_counts.get("fp16", 0):
        return "FP16"
    return "FP32"


def precision_note(group_counts: Mapping[str, int], platform: str) -> str | None:
    """What the ONNX Runtime backend's one ``precision_mode`` does to a plan mixing INT8 and FP16 groups: ``INT8``
    sets ``trt_int8_enable`` alone (the backend maps each mode to one TensorRT flag and refuses the ``trt_*16_enable``
    keys), so TensorRT gets no FP16 flag for the plan's float16 layers (unverified here: no GPU)."""
    fp16 = group_counts.get("fp16", 0)
    if platform != "onnxruntime" or not group_counts.get("int8", 0) or not fp16:
        return None
    return (f"precision_mode INT8 gives TensorRT no FP16 flag (Triton's ONNX Runtime backend sets one precision flag "
            f"and refuses trt_fp16_enable), so the plan's {fp16} FP16 group(s) cannot run in FP16 on its TensorRT "
            "accelerator: TensorRT runs them in FP32 (slower) or refuses float16 layers without the flag (TensorRT "
            "8.6: 'fp16 precision has been set for a layer or layer output, but fp16 is not configured in the "
            "builder'). Export with --platform tensorrt (a strongly typed engine from `quantlab build --backend "
            "tensorrt`) to run them in FP16, or build the plan with fallback fp32 for this platform")


def _io(specs: Sequence[TensorSpec], batched: bool) -> list[Message]:
    return [(("name", s.name), ("data_type", Enum(triton_dtype(s))), ("dims", config_dims(s, batched)))
            for s in specs]


def _tensorrt_accelerator(options: TritonOptions, precision: str,
                          profiles: Mapping[str, tuple[str, str, str]]) -> Message:
    def param(key: str, value: str) -> Message:
        return (("key", key), ("value", value))

    params = [param("precision_mode", precision), param("max_workspace_size_bytes", str(options.workspace_bytes)),
              param("trt_engine_cache_enable", "1"), param("trt_engine_cache_path", f"/tmp/quantlab-trt/{options.name}"),
              param("trt_timing_cache_enable", "1"),
              param("trt_timing_cache_path", f"/tmp/quantlab-trt/{options.name}")]
    for i, which in enumerate(("min", "opt", "max")):
        if profiles:
            params.append(param(f"trt_profile_{which}_shapes",
                                ",".join(f"{name}:{shapes[i]}" for name, shapes in profiles.items())))
    accelerator: Message = (("name", "tensorrt"), ("parameters", params))
    return (("execution_accelerators", (("gpu_execution_accelerator", [accelerator]),)),)


def _warmup(samples: Mapping[str, tuple[TensorSpec, list[int], str]], batched: bool) -> Message:
    inputs = []
    for name, (spec, dims, filename) in samples.items():
        inputs.append((("key", name), ("value", (("data_type", Enum(triton_dtype(spec))), ("dims", dims),
                                                 ("input_data_file", filename)))))
    return (("name", "validation_sample"), ("batch_size", 1 if batched else 0), ("inputs", inputs))


def model_config(options: TritonOptions, io: ModelIO, *, max_batch_size: int, precision: str,
                 preferred_batch_sizes: Sequence[int], profiles: Mapping[str, tuple[str, str, str]],
                 warmup: Mapping[str, tuple[TensorSpec, list[int], str]] | None,
                 parameters: Mapping[str, str]) -> Message:
    """The whole ``ModelConfig`` as a text-format message (see :func:`quantlab.export.pbtxt.render`)."""
    batched = max_batch_size > 0
    fields: list[tuple[str, object]] = [
        ("name", options.name), ("platform", PLATFORMS[options.platform]),
        ("default_model_filename", DEFAULT_FILENAMES[options.platform]),
        ("max_batch_size", max_batch_size),
        ("input", _io(io.inputs, batched)), ("output", _io(io.outputs, batched)),
        ("instance_group", [(("count", options.instances), ("kind", Enum("KIND_GPU")))]),
    ]
    if options.dynamic_batching and batched:
        fields.append(("dynamic_batching", (("preferred_batch_size", list(preferred_batch_sizes)),
                                            ("max_queue_delay_microseconds", options.max_queue_delay_us))))
    if options.platform == "onnxruntime":
        fields.append(("optimization", _tensorrt_accelerator(options, precision, profiles)))
    if warmup:
        fields.append(("model_warmup", [_warmup(warmup, batched)]))
    fields.append(("parameters", [(("key", k), ("value", (("string_value", v),))) for k, v in parameters.items()]))
    return tuple(fields)  # type: ignore[return-value]
