"""Type and shape of the tensors a graph knows (its inputs, outputs, value infos and initializers), and which of
them are float activations."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .topology import kept_names, topological_nodes

__all__ = ["TensorSpec", "activation_names", "tensor_specs"]


@dataclass(frozen=True)
class TensorSpec:
    """Name, numpy dtype name and shape of a tensor; a dim is an int, a symbol or None."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...] | None

    @property
    def is_float(self) -> bool:
        return self.dtype in ("float32", "float16", "float64", "bfloat16")


def _spec_from_value_info(vi: onnx.ValueInfoProto) -> TensorSpec:
    tt = vi.type.tensor_type
    dtype = "undefined"
    if tt.elem_type:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
    shape: tuple[int | str | None, ...] | None = None
    if tt.HasField("shape"):
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        shape = tuple(dims)
    return TensorSpec(vi.name, dtype, shape)


def tensor_specs(proto: onnx.ModelProto) -> dict[str, TensorSpec]:
    """Type and shape of every named tensor the (shape-inferred) graph knows."""
    specs: dict[str, TensorSpec] = {}
    g = proto.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        specs[vi.name] = _spec_from_value_info(vi)
    for init in g.initializer:
        specs[init.name] = TensorSpec(
            init.name, np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).name, tuple(init.dims)
        )
    return specs


def activation_names(proto: onnx.ModelProto, *, include_inputs: bool = True) -> list[str]:
    """Float activation tensors in topological order: graph inputs and node outputs.

    Constants (outputs of Constant nodes, initializers) are not activations, nor are inputs nothing reads (an
    optimum decoder's ``past_key_values`` once its no-cache branch is bound: an "amax 0" warning per table).
    """
    specs = tensor_specs(proto)
    inits = {i.name for i in proto.graph.initializer}
    names: list[str] = []
    seen: set[str] = set()
    if include_inputs:
        read = {t for n in proto.graph.node for t in n.input} | kept_names(proto.graph)
        for i in proto.graph.input:
            if i.name not in inits and i.name in read and specs.get(i.name) and specs[i.name].is_float:
                names.append(i.name)
                seen.add(i.name)
    for node in topological_nodes(proto):
        if node.op_type == "Constant":
            continue
        for out in node.output:
            if out and out not in seen and out in specs and specs[out].is_float:
                names.append(out)
                seen.add(out)
    return names
