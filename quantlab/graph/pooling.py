"""A ReduceMean over every spatial axis is a GlobalAveragePool: one form for what the two torch exporters write.

``adaptive_avg_pool2d(x, 1)`` (or ``x.mean((2, 3), keepdim=True)``) comes out of the legacy exporter as
GlobalAveragePool and out of the dynamo exporter as ReduceMean. GlobalAveragePool is an INT8 layer for both
targets (TensorRT, ORT's QLinearGlobalAveragePool); the ReduceMean was not, so the same network had 28
quantizable groups from one exporter and 24 from the other, and the search pinned different plans::

    x[N, C, H, W] ─► ReduceMean(axes = [2, 3] or [-2, -1], keepdims = 1) ─► y[N, C, 1, 1]
    ==>  x ─► GlobalAveragePool ─► y

Only when the input's rank is known (3 or more), keepdims is 1 and the axes, constant, are exactly 2..rank-1.

An AveragePool whose window covers the whole map is one too (HF EfficientNet's pooler: kernel 640x640,
``ceil_mode`` on a 4x4 map). ONNX Runtime's fused QLinearAveragePool returned the zero point for it, so the ORT-form
INT8 model gave all-zero logits once deployed, and TensorRT-RTX refused the FP32 graph (window volume beyond its
limit)::

    x[N, C, 4, 4] ─► AveragePool(kernel >= [4, 4], no pads, output [N, C, 1, 1]) ─► y  ==>  x ─► GlobalAveragePool ─► y

Only without pads and dilations, when the window is the map, or covers it with ``ceil_mode`` (the overhang is no
padding: ONNX Runtime and torch divide by the values inside, ``count_include_pad`` or not); for a map of unknown
size, a window of :data:`GLOBAL_WINDOW` or more with strides as large.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from .topology import drop_unread_initializers, kept_names

__all__ = ["GLOBAL_WINDOW", "reduce_mean_to_global_pool", "whole_window_pool_to_global"]


def reduce_mean_to_global_pool(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` (shape-inferred: ranks come from its value_info) with each spatial ReduceMean made a
    GlobalAveragePool; ``proto`` itself when there is none."""
    g = proto.graph
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in [*g.input, *g.value_info, *g.output]
             if vi.type.tensor_type.HasField("shape")}
    floats = {vi.name for vi in [*g.input, *g.value_info, *g.output]
              if vi.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                   onnx.TensorProto.DOUBLE)}
    constants = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(a.t) for n in g.node if n.op_type == "Constant"
                      for a in n.attribute if a.name == "value"})
    chosen = [k for k, n in enumerate(g.node) if _spatial_mean(n, ranks, floats, constants)]
    if not chosen:
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    axes_inputs = set()
    for k in chosen:
        old = out.graph.node[k]
        axes_inputs.update(old.input[1:])
        pool = helper.make_node("GlobalAveragePool", [old.input[0]], [old.output[0]], name=old.name)
        out.graph.node[k].CopyFrom(pool)
    read = {t for n in out.graph.node for t in n.input} | kept_names(out.graph)
    unread = {t for t in axes_inputs if t and t not in read}
    nodes = [n for n in out.graph.node if not (n.op_type == "Constant" and n.output[0] in unread)]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    drop_unread_initializers(out.graph, axes_inputs)
    return out


def _spatial_mean(node: onnx.NodeProto, ranks: dict[str, int], floats: set[str], constants: dict) -> bool:
    if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx") or not node.input:
        return False
    rank = ranks.get(node.input[0])
    if rank is None or rank < 3 or node.input[0] not in floats:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if int(attrs.get("keepdims", 1)) != 1:
        return False
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = constants.get(node.input[1])
        axes = None if value is None else [int(a) for a in value.reshape(-1)]
    if not axes:
        return False  # no axes: every axis (or none, with noop_with_empty_axes) is reduced, not the spatial ones
    return sorted(a % rank for a in axes) == list(range(2, rank))


def whole_window_pool_to_global(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` (shape-inferred) with each AveragePool whose window covers its whole input made a GlobalAveragePool
    (module docstring); ``proto`` itself when there is none."""
    g = proto.graph
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
              for vi in [*g.input, *g.value_info, *g.output] if vi.type.tensor_type.HasField("shape")}
    chosen = [k for k, n in enumerate(g.node) if _whole_window(n, shapes)]
    if not chosen:
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for k in chosen:
        old = out.graph.node[k]
        out.graph.node[k].CopyFrom(helper.make_node("GlobalAveragePool", [old.input[0]], [old.output[0]],
                                                    name=old.name))
    return out


GLOBAL_WINDOW = 64
"""An AveragePool over a map of unknown size counts as global when its window (``ceil_mode``, strides as large,
no pads) is at least this on every axis: torch's ``AvgPool2d(1280, ceil_mode=True)`` after a CNN of stride 32
covers its map for any input under 2048 px."""


def _whole_window(node: onnx.NodeProto, shapes: dict[str, list[int | None]]) -> bool:
    if node.op_type != "AveragePool" or node.domain not in ("", "ai.onnx") or not node.input:
        return False
    given = shapes.get(node.input[0])
    if given is None or len(given) < 3:
        return False
    spatial = given[2:]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    kernel = [int(k) for k in attrs.get("kernel_shape", [])]
    strides = [int(k) for k in attrs.get("strides", [1] * len(kernel))]
    if len(kernel) != len(spatial) or any(int(p) for p in attrs.get("pads", [])):
        return False
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        return False
    if any(int(d) != 1 for d in attrs.get("dilations", [])):
        return False
    ceil = bool(attrs.get("ceil_mode", 0))
    if all(d is not None for d in spatial):  # known sizes: the window is the map, or covers it under ceil_mode
        return kernel == spatial or (ceil and all(k >= d for k, d in zip(kernel, spatial, strict=True)))
    return ceil and strides == kernel and all(k >= GLOBAL_WINDOW for k in kernel)
