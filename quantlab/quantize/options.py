"""How to write a model: :class:`WriteOptions` (Q/DQ form for TensorRT or ONNX Runtime, fp16 handling)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..errors import QuantlabError
from ..precision import FP16_MAX

if TYPE_CHECKING:
    from .bias_correction import BiasCorrection
    from .equalization import Equalization
    from .smoothquant import SmoothQuant

__all__ = ["Target", "DEFAULT_FP32_OPS", "WriteOptions"]

Target = Literal["tensorrt", "ort"]

DEFAULT_FP32_OPS: tuple[str, ...] = (
    "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceProd", "Exp", "Log", "Pow", "Sqrt", "Reciprocal",
)
"""Ops kept in float32 inside fp16 regions: their range or accumulation overflows float16.
LayerNormalization is not here by default (TensorRT runs it in fp16 with fp32
accumulation); add it with ``WriteOptions(fp32_ops=DEFAULT_FP32_OPS + ("LayerNormalization",))``."""


@dataclass(frozen=True)
class WriteOptions:
    """How to write the model.

    ``target``: ``tensorrt`` (int8 symmetric activations, zero point 0, float
    bias: what TensorRT parsers accept) or ``ort`` (uint8 activations, int32
    bias, Q/DQ on int8 groups' outputs: what ORT fuses into QLinear kernels).
    ``per_channel_weights``: symmetric int8 per output channel (absmax of
    each channel / 127), else per tensor. ``fp32_ops``: op types kept float32
    inside fp16 regions. ``quantize_outputs`` / ``int32_bias``: None follows
    the target. ``check``: run the ONNX checker and a dtype self-check.

    ``reduce_range``: 7-bit weights (symmetric int8 in [-64, 64], ``scale =
    absmax / 64``), as ONNX Runtime's ``quantize_static(reduce_range=True)``.
    For ``target="ort"`` on x86 CPUs without VNNI: there ORT's uint8 x int8
    kernels (VPMADDUBSW) add pairs of products in saturating int16, so
    full-range weights (2 * 255 * 127 > 32767) give wrong results, while
    2 * 255 * 64 = 32640 always fits. Costs one bit of weight precision;
    TensorRT accumulates in int32 and never needs it.

    ``fp16_simulation``: for measuring FP16 accuracy on ONNX Runtime's CPU
    provider only. It has no float16 kernels for most ops: it inserts casts,
    computes in float32 and then removes cast pairs, so a native fp16 model
    there rounds only its weights, not its activations. This mode keeps every
    node float32 and rounds each tensor that would be float16 (weights too)
    through ``Cast(fp16) -> Cast(fp32)``, which ORT keeps. Never for TensorRT.

    ``fp16_data_max``: a node of an FP16 group computes in float32 when the calibration table
    (if one is given) saw one of its activation inputs or outputs beyond this |x| (the observed
    extremes, not amax): float16 tops out at 65504, so a LayerNorm's sum of squares at 6e5 becomes
    inf in float16 and the normalised output 0. 8192 leaves 8x headroom over calibration (ModelOpt's
    AutoCast, ``data_max``, keeps 512).

    ``bias_correction``: per-channel output mean shifts measured on calibration data
    (:func:`quantlab.quantize.measure_bias_correction`, with these same options),
    subtracted from the bias of the plan's INT8 Conv/Gemm layers; None: no correction.

    ``equalization`` (:class:`quantlab.quantize.Equalization`): cross-layer equalization of
    consecutive convs; ``smoothquant`` (:class:`quantlab.quantize.SmoothQuant`, measured by
    :func:`quantlab.quantize.measure_smoothquant`): outlier activation ranges moved into
    MatMul/Gemm weights. Both rewrite the float model before it is written, so the table must be
    calibrated on the rewritten model (:func:`quantlab.quantize.prepare_model`); None: not done.

    ``int8_bodies``: where the plan asks INT8 of a Loop/Scan/If's group (an int8 default or rule; not a group
    pinned or overridden to fp16/fp32), write the bodies of Loop/Scan nodes (the branches of If nodes) the table
    calibrated (``CalibrationTable.bodies``, quantlab.stats.bodies) in INT8 too, with the Loop group's precision for
    what has no INT8 form inside. Off by default: the search pins fusion groups, and a Loop's body is not one it can pin, so
    an INT8 body it cannot revert is the user's choice (``quantlab build --int8-bodies``, ``[candidates]
    int8_bodies = true``).
    """

    target: Target = "tensorrt"
    per_channel_weights: bool = True
    fp32_ops: tuple[str, ...] = DEFAULT_FP32_OPS
    quantize_outputs: bool | None = None
    int32_bias: bool | None = None
    fp16_simulation: bool = False
    fp16_data_max: float = 8192.0
    check: bool = True
    reduce_range: bool = False
    bias_correction: BiasCorrection | None = None
    equalization: Equalization | None = None
    smoothquant: SmoothQuant | None = None
    int8_bodies: bool = False

    def __post_init__(self) -> None:
        if self.target not in ("tensorrt", "ort"):
            raise QuantlabError(f"write target must be 'tensorrt' or 'ort', got {self.target!r}")
        object.__setattr__(self, "fp32_ops", tuple(self.fp32_ops))
        if not 0 < self.fp16_data_max <= FP16_MAX:
            raise QuantlabError(f"fp16_data_max must be in (0, {FP16_MAX:g}] (float16's largest value), got "
                                f"{self.fp16_data_max!r}")
        if self.target == "tensorrt" and self.int32_bias:
            raise QuantlabError("target 'tensorrt' cannot use int32 bias: TensorRT parsers reject "
                                "an int32 DequantizeLinear; use target 'ort' or int32_bias=False")

    @property
    def output_qdq(self) -> bool:
        return self.target == "ort" if self.quantize_outputs is None else self.quantize_outputs

    @property
    def bias_int32(self) -> bool:
        return self.target == "ort" if self.int32_bias is None else self.int32_bias

    @property
    def activation_dtype(self) -> str:
        return "int8" if self.target == "tensorrt" else "uint8"

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "per_channel_weights": self.per_channel_weights,
            "fp32_ops": list(self.fp32_ops),
            "quantize_outputs": self.output_qdq,
            "int32_bias": self.bias_int32,
            "activation_dtype": self.activation_dtype,
            "fp16_simulation": self.fp16_simulation,
            "fp16_data_max": self.fp16_data_max,
            "reduce_range": self.reduce_range,
            "weight_qmax": self.weight_qmax,
            "bias_correction": _described(self.bias_correction),
            "equalization": _described(self.equalization),
            "smoothquant": _described(self.smoothquant),
            "int8_bodies": self.int8_bodies,
        }

    @property
    def weight_qmax(self) -> int:
        """Largest int8 weight magnitude: 127, or 64 with ``reduce_range``."""
        return 64 if self.reduce_range else 127



def _described(value: Any) -> Any:
    """A measured/settings record as plain data; one read back from a provenance file is plain data already
    (``quantlab.compare`` rebuilds WriteOptions from ``meta.options`` to describe a saved build)."""
    if value is None or isinstance(value, Mapping):
        return None if value is None else dict(value)
    return value.describe()
