"""The written graph's ledger: which name carries which tensor in which dtype, and the nodes made so far.

Every tensor of the original graph keeps its name and value in the written
graph; a tensor needed in another dtype or quantized gets a derived name
(``x/to_fp16``, ``x/dq``, ``w/int8``...) made unique by :meth:`TensorBook.fresh`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelError
from ..graph import TensorSpec
from ..precision import FP16_MAX

__all__ = ["F32", "F16", "ONNX_DTYPE", "FP16_MAX", "TensorBook"]

F32, F16 = "float32", "float16"
ONNX_DTYPE = {F32: TensorProto.FLOAT, F16: TensorProto.FLOAT16}


class TensorBook:
    """Written names and dtypes of every tensor, the inserted nodes and the initializers, in order."""

    def __init__(self, src: onnx.ModelProto, specs: Mapping[str, TensorSpec], names: Sequence[str]) -> None:
        self.src = src
        self.specs = specs
        self.inits = {i.name: i for i in src.graph.initializer}
        self.const_nodes = {o: n for n in src.graph.node if n.op_type == "Constant" for o in n.output}
        self.out_nodes: list[onnx.NodeProto] = []
        self.out_inits: list[onnx.TensorProto] = list(src.graph.initializer)
        self.taken: set[str] = set(specs) | set(names) | set(self.inits)
        for n in src.graph.node:
            self.taken.update(t for t in list(n.input) + list(n.output) if t)
        # tensor -> {dtype: written name}; the first entry is the original name itself
        self.versions: dict[str, dict[str, str]] = {}
        self.written_dtype: dict[str, str] = {}
        self.origin: dict[str, tuple[str, ...]] = {}  # written tensor -> inserted nodes that made it
        self.inserted: dict[str, str] = {}  # inserted node -> kind
        self.pending_casts: list[onnx.NodeProto] = []  # casts to add after the node being written
        for vi in src.graph.input:
            if vi.name not in self.inits:
                self.register(vi.name, vi.name, self.orig_dtype(vi.name))
        for name in self.inits:
            self.register(name, name, self.orig_dtype(name))

    def orig_dtype(self, tensor: str) -> str:
        spec = self.specs.get(tensor)
        return spec.dtype if spec is not None else "undefined"

    def register(self, tensor: str, written: str, dtype: str) -> None:
        """``written`` carries ``tensor``'s value in ``dtype``."""
        self.versions.setdefault(tensor, {})[dtype] = written
        self.written_dtype[written] = dtype

    def fresh(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``... : a name no tensor or node of either graph has."""
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name

    def add_node(self, node: onnx.NodeProto, kind: str) -> str:
        self.out_nodes.append(node)
        self.inserted[node.name] = kind
        return node.name

    def add_init(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        array = np.asarray(array)  # not ascontiguousarray: it turns a scalar scale into shape [1]
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        self.out_inits.append(numpy_helper.from_array(array, name))
        return name

    def flush_casts(self) -> None:
        for cast in self.pending_casts:
            self.add_node(cast, "cast")
        self.pending_casts = []

    def constant_array(self, tensor: str) -> np.ndarray:
        if tensor in self.inits:
            return numpy_helper.to_array(self.inits[tensor])
        node = self.const_nodes[tensor]
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
            if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
                return np.asarray(helper.get_attribute_value(a),
                                  dtype=np.float32 if "float" in a.name else np.int64)
        raise ModelError(f"Constant node {node.name!r} holds a value kind quantlab cannot read")
