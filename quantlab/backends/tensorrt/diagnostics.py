"""What TensorRT said: a logger that keeps errors for messages, and the ONNX parser's errors as
:class:`ParserIssue` turned into errors that name the node and what to do."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ...errors import BackendError, UnsupportedOpError


def make_logger(trt: ModuleType) -> Any:
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


SEQUENCE_OPS = frozenset({"SequenceEmpty", "SequenceConstruct", "SequenceInsert", "SequenceAt", "SequenceErase",
                          "SequenceLength", "ConcatFromSequence", "SplitToSequence", "SequenceMap"})
"""ONNX's sequence ops, which no TensorRT parser takes (a torch.jit.script list)."""


def parser_issues(parser: Any) -> list[ParserIssue]:
    issues = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        code = str(err.code()).rsplit(".", 1)[-1]
        issues.append(ParserIssue(
            code=code, node_index=int(err.node()), node_name=str(err.node_name() or ""),
            op_type=str(err.node_operator() or ""), message=_strip_no_gpu_noise(str(err.desc())),
        ))
    return issues


_UINT8_REFUSED = "has type UInt8 but must have type"
"""What TensorRT's layers say of a uint8 input (a Transpose or Resize on an image before its Cast to float)."""


def parse_error(library: str, version: str, label: str, issues: list[ParserIssue],
                node_domains: Mapping[str, str] | None = None) -> BackendError:
    """The parser's failure as an error that says what to do; ``node_domains`` (node name -> op domain) tells
    ONNX Runtime's own ops (``com.microsoft``: what its transformer optimizer fuses a BERT into) apart."""
    unsupported = [i for i in issues if i.is_unsupported_op]
    listing = "\n  ".join(i.describe() for i in issues) or "(the parser gave no detail)"
    if unsupported:
        ops = ", ".join(sorted({f"{i.node_name or '#' + str(i.node_index)} ({i.op_type})" for i in unsupported}))
        contrib = sorted({i.op_type for i in unsupported if (node_domains or {}).get(i.node_name) == "com.microsoft"})
        advice = ("If the FP32 model parses, pin these nodes to FP32 (a plan's fp32 list, or `quantlab build "
                  "--keep-fp32 OP`); if it does not either (an op this TensorRT has no layer or plugin for, such as "
                  "NonZero in TensorRT-RTX), no precision helps: export the model without the op, or use the ONNX "
                  "Runtime backend (--backend ort).")
        sequences = sorted({i.op_type for i in unsupported if i.op_type in SEQUENCE_OPS})
        if sequences:  # no precision makes them parse: the list has to go
            advice = (f"TensorRT has no sequence ops ({', '.join(sequences)}): quantlab turns a scripted loop's list "
                      "into a Concat (an unrolled loop) or a scan output (a loop that stays) where every item has "
                      "one shape and its rank is known; this list is not such a one. Export the model with the items "
                      "stacked into a tensor inside the loop (or the loop unrolled, e.g. --bind its trip count), or "
                      "use the ONNX Runtime backend (--backend ort).")
        if contrib:
            advice = (f"{', '.join(contrib)} {'is an op' if len(contrib) == 1 else 'are ops'} of ONNX Runtime's own "
                      "domain (com.microsoft), which TensorRT does not know: the model went through ONNX Runtime's "
                      "transformer optimizer (onnxruntime.transformers.optimizer, or an optimum export with "
                      "optimization). Give quantlab the model as exported, before that optimizer, for TensorRT; "
                      "this one runs on the ONNX Runtime backend (--backend ort) only.")
        return UnsupportedOpError(
            f"{library} {version} cannot parse {label}: unsupported op at node(s) {ops}.\n  {listing}\n{advice}",
            foreign_ops=tuple(contrib),
        )
    hint = ""
    if any(i.op_type in ("QuantizeLinear", "DequantizeLinear") for i in issues):
        hint = ("\nTensorRT wants int8 symmetric Q/DQ (zero point 0) and float biases: write the "
                "model with target 'tensorrt' (the 'ort' form is for ONNX Runtime only).")
    elif any(_UINT8_REFUSED in i.message for i in issues):
        hint = ("\nTensorRT computes no layer on uint8 but a Cast: a uint8 input (an image) must be cast to float "
                "before any other op reads it. Export it so, e.g. `img.float().permute(0, 3, 1, 2)` rather than "
                "`img.permute(0, 3, 1, 2).float()`.")
    return BackendError(f"{library} {version} failed to parse {label}:\n  {listing}{hint}")


_AXISLESS = "without an axes input"


def build_error_hint(errors: list[str]) -> str:
    """Advice for build errors whose cause the model's export holds, not quantlab's settings."""
    text = " ".join(errors)
    if _AXISLESS in text:
        named = re.search(r"(\S+): I\w+Layer without an axes input", text)
        node = repr(named.group(1)) if named else "a Squeeze"
        return (f"\n  {node} squeezes without axes (an export at opset < 13 squeezing every dim of size 1): with a "
                "dynamic dim in its input, TensorRT cannot fix its output rank at build time. Re-export with explicit "
                "axes (torch: x.squeeze(dim)), or with the batch fixed if the model only runs at one batch size.")
    if _GROWING_CARRY in text:  # a greedy decoder's ids, one column longer each step
        return ("\n  A Loop carries a value whose shape changes from step to step (a decoder's token ids, one longer "
                "each step): TensorRT's loops keep a carried value's shape. Unroll the loop by fixing its trip count "
                "(--bind NAME=N for the input that sets it, or export it as a constant), or carry a preallocated "
                "tensor written at the step's index.")
    return ""


_GROWING_CARRY = "IRecurrenceLayer must have inputs with same shape"


def is_profile_error(errors: list[str]) -> bool:
    """Whether the build errors are about shapes the profiles allow (the guessed-dims hint then applies; a Loop
    TensorRT cannot take got it too, blaming the batch profile)."""
    text = " ".join(errors).lower()
    return _GROWING_CARRY.lower() not in text and any(w in text for w in ("profile", "shape", "dimension", "kmin",
                                                                          "kopt", "kmax"))
