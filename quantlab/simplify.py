"""Graph clean-up for exported models: constant folding, Pad fused into Conv, batch reshape to Flatten.

Exporters (TorchScript's above all) compute shapes and paddings at run time
from constants; folding them turns EfficientNet-Lite0's 456-node export into a
94-node graph whose convolutions carry their own pads, which is what Q/DQ
placement and TensorRT's fusions expect.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph.topology import RANDOM_OPS, drop_unread_initializers, kept_names

__all__ = [
    "fold_constant_subgraphs",
    "fuse_pad_into_conv",
    "reshape_batch_flatten_to_flatten",
    "simplify_exported_graph",
    "single_node_model",
]


def simplify_exported_graph(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold, fuse SAME-padding Pads into Convs, turn the batch reshape into Flatten, drop dead nodes."""
    out = fold_constant_subgraphs(proto)
    out = fuse_pad_into_conv(out)
    out = reshape_batch_flatten_to_flatten(out)
    out = _remove_dead_nodes(out)
    del out.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(out, strict_mode=True)


_NEVER_FOLD = {"Shape", "Size", *RANDOM_OPS}


def fold_constant_subgraphs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Evaluate every node whose inputs are all constants and store its outputs as initializers.

    The TorchScript export computes each SAME padding at run time from constants::

        Constant ─► ConstantOfShape ─► Concat ─► Reshape ─► Slice ─► Transpose ─► Reshape ─► Cast ─┐
                                                                                 x ─► Pad ◄───────┘ ─► Conv

    becomes ``x ─► Pad(pads=<initializer>) ─► Conv``. Nodes are evaluated one at a
    time with ONNX's reference evaluator (no onnxruntime here: this module sits
    below the backends). Shape-dependent and random nodes are never folded.
    """
    from onnx.reference import ReferenceEvaluator

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    constants: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    graph_inputs = {i.name for i in g.input} - set(constants)
    kept: list[onnx.NodeProto] = []
    for node in g.node:
        if node.op_type == "Constant":
            single = ReferenceEvaluator(single_node_model(node, {}, out))
            constants[node.output[0]] = np.asarray(single.run(None, {})[0])
            continue
        ins = [i for i in node.input if i]
        foldable = (
            node.op_type not in _NEVER_FOLD
            and node.domain in ("", "ai.onnx")
            and all(i in constants and i not in graph_inputs for i in ins)
        )
        if not foldable:
            kept.append(node)
            continue
        feeds = {i: constants[i] for i in ins}
        values = ReferenceEvaluator(single_node_model(node, feeds, out)).run(None, feeds)
        for name, value in zip(node.output, values):
            if name:
                constants[name] = np.asarray(value)
    used = {i for n in kept for i in n.input} | {o.name for o in g.output}
    del g.node[:]
    g.node.extend(kept)
    existing = {i.name for i in g.initializer}
    for name, value in constants.items():
        if name in used and name not in existing:
            g.initializer.append(numpy_helper.from_array(value, name))
    return out


def single_node_model(node: onnx.NodeProto, feeds: dict[str, np.ndarray], parent: onnx.ModelProto) -> onnx.ModelProto:
    """A model running ``node`` alone on ``feeds`` (for ONNX's reference evaluator), with ``parent``'s opsets."""
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for n, v in feeds.items()]
    outputs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
    graph = helper.make_graph([node], "fold", inputs, outputs)
    return helper.make_model(graph, opset_imports=list(parent.opset_import), ir_version=parent.ir_version)


def fuse_pad_into_conv(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Move a constant zero Pad on the spatial dims into the Conv that reads it::

        x ─► Pad(pads=[0,0,t,l, 0,0,b,r], value 0) ─► Conv(pads=[p0,p1,p2,p3])
        x ─► Conv(pads=[p0+t, p1+l, p2+b, p3+r])

    Only when the Pad output has that Conv as its sole reader, the pads are
    constant (an initializer or a Constant node) and non-negative, the batch and
    channel dims are not padded, the mode is ``constant`` with value 0 and the Conv
    uses explicit pads (``auto_pad`` NOTSET). Anything else is left as it is. tf2onnx
    writes SAME padding this way: left alone, the Pad becomes a float layer between
    the Conv and its input's Q/DQ.
    """
    if not any(n.op_type == "Pad" for n in proto.graph.node):
        return proto  # nothing to do: no copy of a large model's weights
    from .folding import ConstantFolder, drop_dead_producers  # here: quantlab.folding imports this module

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    folder = ConstantFolder(g, out)  # pads computed from constants (the legacy exporter's F.pad chain) fold too
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    kept = kept_names(g)  # graph outputs and what subgraphs read stay
    removed: set[int] = set()
    for idx, pad in enumerate(g.node):
        if pad.op_type != "Pad":
            continue
        consumers = readers.get(pad.output[0], [])
        if len(consumers) != 1 or consumers[0].op_type != "Conv" or pad.output[0] in kept:
            continue
        conv = consumers[0]
        spatial = _constant_spatial_pads(pad, folder.value)
        if spatial is None or conv.input[0] != pad.output[0]:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        if auto_pad not in (b"NOTSET", "NOTSET"):
            continue
        rank = len(spatial) // 2
        conv_pads = list(attrs.get("pads", [0] * (2 * rank)))
        merged = [int(a) + int(b) for a, b in zip(conv_pads, spatial)]
        for a in list(conv.attribute):
            if a.name == "pads":
                conv.attribute.remove(a)
        conv.attribute.append(helper.make_attribute("pads", merged))
        conv.input[0] = pad.input[0]
        removed.add(idx)
    if not removed:
        return out
    sources = [t for i in removed for t in proto.graph.node[i].input[1:]]  # the Pads' pads and value
    nodes = [n for i, n in enumerate(g.node) if i not in removed]
    del g.node[:]
    g.node.extend(nodes)
    drop_dead_producers(g, sources)  # the constant chains that computed them
    drop_unread_initializers(g, readers)
    return out


def _constant_spatial_pads(pad: onnx.NodeProto, value: Callable[[str], np.ndarray | None]) -> list[int] | None:
    """The Conv-style spatial pads ``[begins..., ends...]`` of a foldable Pad, else None. ``value``: a tensor's
    constant value (None when the data decides it)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in pad.attribute}
    if attrs.get("mode", b"constant") not in (b"constant", "constant"):
        return None
    pads_value = value(pad.input[1]) if len(pad.input) >= 2 and pad.input[1] else None
    if pads_value is None or pads_value.dtype.kind not in "iu":
        return None
    if len(pad.input) >= 3 and pad.input[2]:
        fill = value(pad.input[2])
        if fill is None or np.any(fill != 0):
            return None
    if len(pad.input) >= 4 and pad.input[3]:
        return None  # explicit axes: keep it simple, leave as is
    pads = pads_value.astype(np.int64).reshape(-1).tolist()
    rank = len(pads) // 2
    if rank < 3 or any(p < 0 for p in pads):
        return None
    begins, ends = pads[:rank], pads[rank:]
    if begins[0] or begins[1] or ends[0] or ends[1]:
        return None
    return begins[2:] + ends[2:]


def reshape_batch_flatten_to_flatten(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Replace ``x.view(x.size(0), -1)`` with Flatten(axis=1)::

        input ─► Shape ─► Gather(0) ─► Unsqueeze ─► Concat(·, [-1]) ─┐
                                                 t ─► Reshape ◄───────┘
        t ─► Flatten(axis=1)

    Valid only when ``t``'s first dim is the same (inferred) dim as the one
    read by Shape/Gather: then both give ``[batch, prod(rest)]``.
    """
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    dims = _first_dims(inferred)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for node in g.node:
        if node.op_type != "Reshape":
            continue
        source = _batch_dim_source(node.input[1], producer, inits)
        if source is None:
            continue
        d_src, d_data = dims.get(source), dims.get(node.input[0])
        if d_src is None or d_src != d_data:
            continue
        node.op_type = "Flatten"
        del node.input[1:]
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("axis", 1))
    return out


def _first_dims(proto: onnx.ModelProto) -> dict[str, str | int]:
    dims: dict[str, str | int] = {}
    for vi in list(proto.graph.input) + list(proto.graph.value_info) + list(proto.graph.output):
        shape = vi.type.tensor_type.shape
        if len(shape.dim):
            d = shape.dim[0]
            if d.HasField("dim_param"):
                dims[vi.name] = d.dim_param
            elif d.HasField("dim_value"):
                dims[vi.name] = int(d.dim_value)
    return dims


def _batch_dim_source(shape_name: str, producer: dict[str, onnx.NodeProto], inits: dict[str, np.ndarray]) -> str | None:
    """If ``shape_name`` is Concat(Unsqueeze(Gather(Shape(X), 0)), [-1]), return X."""
    concat = producer.get(shape_name)
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
        return None
    tail = inits.get(concat.input[1])
    if tail is None or tail.tolist() != [-1]:
        return None
    unsq = producer.get(concat.input[0])
    if unsq is None or unsq.op_type != "Unsqueeze":
        return None
    gather = producer.get(unsq.input[0])
    if gather is None or gather.op_type != "Gather" or gather.input[1] not in inits:
        return None
    if int(np.asarray(inits[gather.input[1]]).reshape(-1)[0]) != 0:
        return None
    shape = producer.get(gather.input[0])
    if shape is None or shape.op_type != "Shape" or any(a.name in ("start", "end") for a in shape.attribute):
        return None
    return shape.input[0]


def _remove_dead_nodes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes and initializers that no graph output depends on."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    needed = {o.name for o in g.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    del g.node[:]
    g.node.extend(kept)
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    return out
