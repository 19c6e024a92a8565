"""FP16 regions: which dtype each input of a node arrives in, and the Casts and float16 copies that make it so.

FP16 group: its nodes compute in float16; Casts stand at region boundaries;
initializers and Constant nodes get float16 copies (clipped to ±65504); ops in
``WriteOptions.fp32_ops`` (Softmax, reductions, ...) stay float32 inside the
region, and so do (:class:`~quantlab.quantize.fp32_nodes.Fp32Nodes`) what only reductions
feed (a written-out LayerNorm's per-row statistics), ``Mul(x, x)`` where Pow is kept,
and, with a calibration table, every node reading or writing an activation seen
beyond ``WriteOptions.fp16_data_max``; graph inputs and outputs stay float32::

    x(f32) ──► Cast(f16) ──► Conv(f16) ──► Relu ──► y(f16) ──► Cast(f32) ──► fp32/int8 reader

``WriteOptions(fp16_simulation=True)`` (ONNX Runtime CPU accuracy runs only)
keeps float32 kernels and rounds every would-be-float16 tensor instead::

    x ──► Cast(f16) ──► Cast(f32) ──► Conv(w rounded) ──► y/fp32_exact ──► Cast(f16) ──► Cast(f32) ──► y

A node computes in float16 only when its schema lets float16 flow through
its output's type variable; otherwise it keeps the dtypes it had.
"""

from __future__ import annotations

from collections.abc import Set
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import ModelError
from ..methods import DEFAULT_HUGE_THRESHOLD
from .options import WriteOptions
from .tensors import F16, F32, FP16_MAX, ONNX_DTYPE, TensorBook

__all__ = ["Casts"]

_ACCEPT_ANY_INPUT = frozenset({"Shape", "Size", "Cast"})

_SAME_TYPE_IN_TENSORRT: dict[str, frozenset[int]] = {"GridSample": frozenset({1})}
"""Float inputs ONNX lets differ from the node's data type and TensorRT does not: a GridSample's grid (its T2) in
float32 beside a float16 input failed TensorRT's parser ("input and grid must be of same type"). In an FP16 node
they are cast to float16 too (a grid of constants alone stayed float32 until then)."""


class Casts:
    """Gets a tensor in the dtype a reader needs: the original name, a Cast, or a float16 copy (each made once)."""

    def __init__(self, book: TensorBook, options: WriteOptions, opset: int, constants: Set[str]) -> None:
        self.book = book
        self.options = options
        self.opset = opset
        self.constants = constants
        self.rounded: dict[str, str] = {}  # fp16 simulation: tensor -> float32 name holding its fp16-rounded value
        self.fp16_clipped = 0  # initializer and Constant values clipped to +-65504 in float16 copies
        self.fp16_clipped_values: dict[str, float] = {}  # constant -> largest |x| clipped, sentinels (>= 1e30) apart

    def _clipped(self, tensor: str, array: np.ndarray) -> np.ndarray:
        """``array`` clipped to float16's range, counted; a parameter clipped (not a mask's -3.4e38 sentinel) is
        kept by name: its layer computes something else in FP16."""
        clipped = np.clip(array, -FP16_MAX, FP16_MAX)
        changed = clipped != array
        self.fp16_clipped += int(np.count_nonzero(changed))
        finite = np.abs(array[changed & np.isfinite(array)])
        real = finite[finite < DEFAULT_HUGE_THRESHOLD]
        if real.size:
            self.fp16_clipped_values[tensor] = max(self.fp16_clipped_values.get(tensor, 0.0), float(real.max()))
        return clipped

    def get(self, tensor: str, dtype: str) -> tuple[str, tuple[str, ...]]:
        """The written name of ``tensor`` carrying ``dtype`` (adding a Cast or fp16 copy once)."""
        have = self.book.versions.get(tensor, {})
        if dtype in have:
            name = have[dtype]
            return name, self.book.origin.get(name, ())
        if (tensor in self.book.inits or tensor in self.book.const_nodes) and dtype in ONNX_DTYPE:
            # a constant's copy is made here, clipped: a Cast at run time turns torch.finfo(float32).min into
            # -inf, and a mask (1 - m) * min then into 0 * -inf = NaN
            array = self.book.constant_array(tensor)
            if dtype == F16:
                converted = self._clipped(tensor, array.astype(np.float32)).astype(np.float16)
            else:
                converted = array.astype(np.float32)
            name = self.book.add_init(f"{tensor}/{'fp16' if dtype == F16 else 'fp32'}", converted)
            self.book.register(tensor, name, dtype)
            return name, ()
        if not have:
            raise ModelError(f"internal: tensor {tensor!r} is read before it is written")
        src_dtype, src = next(iter(have.items()))
        if src_dtype not in ONNX_DTYPE or dtype not in ONNX_DTYPE:
            raise ModelError(f"internal: cannot cast {tensor!r} from {src_dtype} to {dtype}")
        suffix = "fp16" if dtype == F16 else "fp32"
        out = self.book.fresh(f"{tensor}/to_{suffix}")
        node = helper.make_node("Cast", [src], [out], name=self.book.fresh(f"{tensor}/Cast_to_{suffix}"),
                                to=ONNX_DTYPE[dtype])
        self.book.add_node(node, "cast")
        self.book.register(tensor, out, dtype)
        self.book.origin[out] = self.book.origin.get(src, ()) + (node.name,)
        return out, self.book.origin[out]

    def get_rounded(self, tensor: str) -> tuple[str, tuple[str, ...]]:
        """fp16 simulation: ``tensor`` as float32 holding float16-rounded values (made once)."""
        if tensor in self.rounded:
            name = self.rounded[tensor]
            return name, self.book.origin.get(name, ())
        if tensor in self.book.inits or tensor in self.book.const_nodes:
            clipped = self._clipped(tensor, self.book.constant_array(tensor).astype(np.float32))
            name = self.book.add_init(f"{tensor}/fp16_rounded", clipped.astype(np.float16).astype(np.float32))
            self.book.written_dtype[name] = F32
            self.rounded[tensor] = name
            return name, ()
        src, chain = self.get(tensor, F32)
        name, casts = self.round_trip(src, tensor)
        self.rounded[tensor] = name
        self.book.origin[name] = chain + casts
        return name, self.book.origin[name]

    def round_trip(self, src: str, tensor: str, out: str | None = None) -> tuple[str, tuple[str, ...]]:
        """Cast(fp16) -> Cast(fp32) of ``src``; ``out`` names the result (default a derived name)."""
        half = self.book.fresh(f"{tensor}/fp16")
        out = out or self.book.fresh(f"{tensor}/fp16_rounded")
        down = helper.make_node("Cast", [src], [half], name=self.book.fresh(f"{tensor}/Cast_to_fp16"),
                                to=TensorProto.FLOAT16)
        up = helper.make_node("Cast", [half], [out], name=self.book.fresh(f"{tensor}/Cast_to_fp32"),
                              to=TensorProto.FLOAT)
        self.book.pending_casts.extend([down, up])
        self.book.written_dtype[half] = F16
        self.book.written_dtype[out] = F32
        return out, (down.name, up.name)

    def schema(self, node: onnx.NodeProto) -> Any | None:
        if node.domain not in ("", "ai.onnx"):
            return None
        try:
            return onnx.defs.get_schema(node.op_type, self.opset, node.domain)
        except Exception:  # noqa: BLE001 - unknown op: keep it as it is
            return None

    def input_wants(self, node: onnx.NodeProto, fp16: bool) -> tuple[list[str | None], bool]:
        """Dtype each input should arrive in (None: as it is) and whether the node computes in fp16."""
        wants: list[str | None] = []
        schema = self.schema(node) if fp16 else None
        has_subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        if schema is None or not schema.outputs or has_subgraph:
            fp16 = False
        allowed: dict[str, set[str]] = {}
        out_var = ""
        if fp16:
            allowed = {tc.type_param_str: set(tc.allowed_type_strs) for tc in schema.type_constraints}
            out_var = schema.outputs[0].type_str
            if "tensor(float16)" not in allowed.get(out_var, set()):
                fp16 = False
        tied_float = False
        for i, t in enumerate(node.input):
            orig = self.book.orig_dtype(t) if t else ""
            if not t or orig not in ONNX_DTYPE:
                wants.append(None)
                continue
            if node.op_type in _ACCEPT_ANY_INPUT and i == 0:
                wants.append(None)
                continue
            if fp16:
                formal = schema.inputs[min(i, len(schema.inputs) - 1)]
                var = formal.type_str
                if var == out_var and orig == F32:
                    wants.append(F16)
                    tied_float = True
                    continue
                if ((t in self.constants or i in _SAME_TYPE_IN_TENSORRT.get(node.op_type, ()))
                        and "tensor(float16)" in allowed.get(var, set()) and orig == F32):
                    wants.append(F16)
                    continue
            wants.append(orig)
        if fp16 and not tied_float:
            # nothing float flows through the node's data type: leave it as it was
            return self.input_wants(node, False)
        return wants, fp16

    def output_dtype(self, node: onnx.NodeProto, slot: int, fp16: bool) -> str:
        t = node.output[slot]
        orig = self.book.orig_dtype(t)
        if not fp16 or orig != F32:
            return orig
        schema = self.schema(node)
        formal = schema.outputs[min(slot, len(schema.outputs) - 1)]
        return F16 if formal.type_str == schema.outputs[0].type_str else orig
