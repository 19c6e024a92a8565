"""Which axis of a tensor holds the samples of a batch.

Inputs say it themselves (``batch_axes``: a recurrent ``state [2, N, 128]`` on axis 1, a
scalar on none; axis 0 otherwise). For any other tensor it is the first axis whose
symbolic dim (``"N"``) is the batch dim of an input on that input's sample axis, as
shape inference propagated it; a tensor with no such symbol is assumed to have its
samples on axis 0; :func:`samples_on_axis0` checks the size against the batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

import onnx

from ..shapes import fixed_batch_size
from .load import LoadedModel, tensor_specs
from .topology import CONTROL_FLOW_OPS, SHAPE_ONLY_OPS, subgraph_reads, topological_nodes, upstream

__all__ = ["batch_named", "batch_named_outputs", "batch_symbols", "carries_samples", "data_sized", "sample_mixing_nodes",
           "samples_on_axis0", "tensor_sample_axes"]


def batch_named(dim: Any) -> bool:
    """Whether a symbolic dim's name says it counts samples (an exporter's dynamic_axes names: batch, batch_size,
    nbatch, bs). Not ``N`` or ``B``: a point cloud's ``[1, 3, N]`` counts points there."""
    return isinstance(dim, str) and ("batch" in dim.lower() or dim.lower() == "bs")


def batch_symbols(model: LoadedModel, batch_axes: Mapping[str, int | None]) -> set[str]:
    """The symbolic dims naming the batch: each input's dim on its sample axis, where it is a symbol."""
    symbols: set[str] = set()
    for spec in model.inputs:
        axis = batch_axes.get(spec.name, 0)
        if axis is not None and spec.shape is not None and axis < len(spec.shape) and isinstance(spec.shape[axis], str):
            symbols.add(str(spec.shape[axis]))
    return symbols


def tensor_sample_axes(model: LoadedModel, batch_axes: Mapping[str, int | None],
                       names: Iterable[str], carry: Mapping[str, str] | None = None) -> dict[str, int]:
    """Tensor name -> the axis its samples are on (0 unless a batch symbol says otherwise).

    ``carry`` (output -> input, a sequence data set's ``[sequence] carry``): an output fed back as an
    input next step holds its samples where that input does, whatever shape inference named its dims
    (torch's LSTM exports leave ``stateN`` as ``['', '', '']``)."""
    symbols = batch_symbols(model, batch_axes)
    fixed = None if symbols else _fixed_batch(model, batch_axes)
    specs = tensor_specs(model.proto)
    inputs = set(model.input_names)
    carry = carry or {}
    out: dict[str, int] = {}
    for name in names:
        axis = batch_axes.get(name, 0) if name in inputs else None
        if axis is None and name in carry:
            axis = batch_axes.get(carry[name], 0)
        if axis is None:  # an activation, or an input without a sample axis: what shape inference says
            spec = specs.get(name)
            shape = tuple(spec.shape or ()) if spec else ()
            found = [k for k, d in enumerate(shape) if isinstance(d, str) and d in symbols]
            if not found and fixed is not None and shape and shape[0] != fixed:
                # a fixed-batch CTC export's scores [T, 1, C]: the batch is the one dim of the inputs' size
                found = [k for k, d in enumerate(shape) if d == fixed][:2]
                found = found if len(found) == 1 else []
            axis = found[0] if found else 0
        out[name] = axis
    return out


_ALONG_ONE_AXIS = frozenset({"Softmax", "LogSoftmax", "Hardmax", "ArgMax", "ArgMin", "TopK", "CumSum"})
"""Ops that combine the values along one axis (``axis``; CumSum's is an input)."""

_RECURRENT = frozenset({"LSTM", "GRU", "RNN"})
"""Ops that carry a state along the sequence axis of their input (0, or 1 with ``layout = 1``): a batch on that axis
(Silero VAD v6's ``input [seq_len, 576]`` is the LSTM's time axis) is one stream, not independent samples."""


def batch_named_outputs(model: LoadedModel, batch_axes: Mapping[str, int | None]) -> list[str]:
    """The outputs whose shape names an input's batch symbol: each sample's part of them is known (NMS boxes
    ``[K, 3]`` of the whole batch, or a fixed-size export, name none)."""
    symbols = batch_symbols(model, batch_axes)
    specs = tensor_specs(model.proto)
    return [name for name in model.output_names
            if name in specs and any(isinstance(d, str) and d in symbols for d in specs[name].shape or ())]


def sample_mixing_nodes(model: LoadedModel, batch_axes: Mapping[str, int | None]) -> list[str]:
    """Names of the main-graph nodes that combine values across samples: a reduction over the sample axis
    (openwakeword's melspectrogram: ``ReduceMax`` without axes sets its -80 dB floor from the whole batch), or a
    softmax/arg-max/top-k/cumsum along it, or a product that pairs the samples (:func:`_pairs_samples`). Each
    sample's output then depends on the others in its batch: figures
    measured at batch 8 are not what the model gives one sample at a time. Only tensors whose sample axis shape
    inference names (the inputs' batch symbol) are judged."""
    symbols = batch_symbols(model, batch_axes)
    if not symbols:
        return []
    specs = tensor_specs(model.proto)
    consts = {i.name: i for i in model.proto.graph.initializer}
    out = []
    for node in model.proto.graph.node:
        if _pairs_samples(node, specs, symbols):
            out.append(node.name or node.output[0])
            continue
        data = node.input[0] if node.input else ""
        spec = specs.get(data)
        shape = tuple(spec.shape or ()) if spec else ()
        axis = next((k for k, d in enumerate(shape) if isinstance(d, str) and d in symbols), None)
        if axis is None:
            continue
        over = _combined_axes(node, len(shape), consts)
        if over is not None and axis in over:
            out.append(node.name or node.output[0])
    return out


def _pairs_samples(node: onnx.NodeProto, specs: Mapping[str, Any], symbols: set[str]) -> bool:
    """Whether ``node`` makes a tensor that holds every sample against every other out of two inputs that each
    hold samples: an output naming batch symbols on two axes (CLIP's ``logits_per_image [N, M]``, a Gram matrix
    ``[N, N]``) where no input does. Alone, a sample's row has one column. (A Conv whose declared output reads
    ``[batch, 21, batch, w]``, an exporter's slip, reads one input with samples: not judged.)"""
    def named(name: str) -> int:
        spec = specs.get(name) if name else None
        return 0 if spec is None else sum(isinstance(d, str) and d in symbols for d in spec.shape or ())

    ins = [named(i) for i in node.input]
    return any(named(o) >= 2 for o in node.output) and max(ins, default=0) < 2 and sum(n > 0 for n in ins) >= 2


def _combined_axes(node: onnx.NodeProto, rank: int, consts: Mapping[str, onnx.TensorProto]) -> set[int] | None:
    """The axes ``node`` combines values along (normalised), None when it combines none or they are unknown."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type.startswith("Reduce"):
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            given = consts.get(node.input[1])
            if given is None:
                return None  # computed axes: unknown
            axes = onnx.numpy_helper.to_array(given).reshape(-1).tolist()
        if not axes:
            return None if attrs.get("noop_with_empty_axes", 0) else set(range(rank))
        return {int(a) % rank for a in axes}
    if node.op_type in _RECURRENT:  # runs along its sequence axis: samples there are time steps of one stream
        layout = int(attrs.get("layout", 0))
        return {layout} if rank == 3 else None
    if node.op_type in _ALONG_ONE_AXIS:
        if node.op_type == "CumSum":
            given = consts.get(node.input[1]) if len(node.input) > 1 else None
            if given is None:
                return None
            axis = int(onnx.numpy_helper.to_array(given).reshape(-1)[0])
        else:
            axis = int(attrs.get("axis", -1 if node.op_type in ("Softmax", "LogSoftmax", "Hardmax") else 0))
        return {axis % rank} if rank else None
    return None


def _fixed_batch(model: LoadedModel, batch_axes: Mapping[str, int | None]) -> int | None:
    """The batch size every input fixes on its sample axis (a static export's 1), else None."""
    return fixed_batch_size({spec.name: spec.shape for spec in model.inputs}, batch_axes, all_inputs=True)


_DATA_SIZED_OPS = frozenset({"NonMaxSuppression", "NonZero", "Unique", "Compress"})
"""Ops whose output size the input values decide (the boxes NMS keeps, the indices NonZero finds)."""


def data_sized(model: LoadedModel) -> set[str]:
    """The tensors whose size the data decides: the outputs of :data:`_DATA_SIZED_OPS`, of a node whose size an
    input computed from float activations decides (:func:`_sized_by_values`: a Loop that stops when its state
    converges or a decoder emits its end token, a Reshape/Range/TopK fed such a value) and everything computed
    from them (``Gather(boxes, NMS indices) -> [K, 4]``). Two correct models may disagree on their shapes (FP32
    keeps 5 boxes, INT8 4; FP32 converges in 11 steps, INT8 in 13); on any other tensor a different shape is a
    bug."""
    out: set[str] = set()
    differ = _may_differ(model)
    for node in topological_nodes(model.proto):
        if node.op_type in _DATA_SIZED_OPS or any(t in out for t in node.input if t):
            out.update(o for o in node.output if o)
        elif _sized_by_values(node, differ):
            out.update(_resized_outputs(node))
    return out


def _resized_outputs(node: onnx.NodeProto) -> list[str]:
    """The outputs of a node whose size values decide that may change size: an If's outputs but those both
    branches declare with one shape (a streaming step's ``if first chunk: h = init(x) else: h = cell(x, state)``,
    ``[N, 16]`` either way); a Loop's scan outputs and the carried values its body declares with another shape out
    than in (a decoder's tokens so far), not a state of one shape (its final hidden state); every output of any
    other node."""
    if node.op_type == "Loop":
        body = next(a.g for a in node.attribute if a.name == "body")
        carried = len(body.input) - 2
        return [o for k, o in enumerate(node.output) if o and not (
            k < carried and _declared_shape(body.input[2 + k]) is not None
            and _declared_shape(body.input[2 + k]) == _declared_shape(body.output[1 + k]))]
    if node.op_type != "If":
        return [o for o in node.output if o]
    then, other = (next(a.g for a in node.attribute if a.name == b) for b in ("then_branch", "else_branch"))
    return [o for o, a, b in zip(node.output, then.output, other.output, strict=False)
            if o and not (_declared_shape(a) is not None and _declared_shape(a) == _declared_shape(b))]


def _declared_shape(info: onnx.ValueInfoProto) -> tuple[int | str, ...] | None:
    """The declared shape, each dim a size or a symbol; None when a dim (or the shape) is not declared."""
    tensor = info.type.tensor_type
    if not info.type.HasField("tensor_type") or not tensor.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else None
            for d in tensor.shape.dim]
    return None if None in dims or "" in dims else tuple(dims)


_SIZE_INPUTS = {"Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
                "Slice": (1, 2, 3, 4), "TopK": (1,), "Pad": (1,), "Resize": (2, 3), "OneHot": (1,),
                "Loop": (0, 1), "If": (0,)}
"""Op -> the inputs that decide its output's size (a Loop's trip count and start condition, an If's branch)."""


def _may_differ(model: LoadedModel) -> set[str]:
    """Main-graph tensors whose values a candidate may compute otherwise than the reference: float tensors
    computed from the inputs' values, and anything computed from those (an ArgMax's ids). Not what only
    shapes, constants or the inputs themselves decide (``Cast(Shape(x)) * 0.5``, a mask's ``ReduceSum``)."""
    specs = tensor_specs(model.proto)
    valued = set(model.input_names)
    differ: set[str] = set()
    for node in topological_nodes(model.proto):
        if node.op_type in SHAPE_ONLY_OPS:
            continue
        reads = [t for t in node.input if t] + sorted(subgraph_reads([node]))
        if not any(t in valued for t in reads):
            continue
        outputs = [o for o in node.output if o]
        valued.update(outputs)
        from_differing = any(t in differ for t in reads)
        differ.update(o for o in outputs if from_differing or (o in specs and specs[o].is_float))
    return differ


def _sized_by_values(node: onnx.NodeProto, differ: set[str]) -> bool:
    """Whether an input that decides ``node``'s output size may differ between candidate and reference, or a
    Loop's body decides when to stop from its state (a while loop: converged, end token)."""
    if any(k < len(node.input) and node.input[k] in differ for k in _SIZE_INPUTS.get(node.op_type, ())):
        return True
    if node.op_type != "Loop":
        return False
    body = next(a.g for a in node.attribute if a.name == "body")
    return _stops_on_state(body, differ)


def _stops_on_state(body: onnx.GraphProto, differ: set[str]) -> bool:
    """Whether the body's continue condition is computed from its carried state or an outer tensor that may
    differ (not the iteration count or constants: a for loop's ``Identity(cond_in)`` or ``i < M``)."""
    producers = {o: n for n in body.node for o in n.output if o}
    carried = {i.name for i in body.input[2:]}
    walked = upstream([body.output[0].name], producers, stop=lambda n: n.op_type in SHAPE_ONLY_OPS, bodies=True)
    return any(t in carried or t in differ for t in walked)




def carries_samples(model: LoadedModel, batch_axes: Mapping[str, int | None],
                    names: Iterable[str]) -> dict[str, bool]:
    """Tensor name -> may it hold a part per sample? False: one value for all the samples of a run.

    False needs both: its value does not depend on the values of an input with a
    sample axis, and shape inference gave it no batch symbol. So a slice of a
    position table (``Slice(table, 0, Shape(x)[1])``: only ``x``'s shape), a mask
    built from constants or a function of a scalar input without a sample axis (a
    sample rate) is False; ``ConstantOfShape(Shape(mask))`` (``[N, S]`` zeros)
    and whatever a Reshape makes of a batched tensor (``[N*S, H]``, a batch an
    exporter baked in) are True. Values are followed through the graph:
    Shape/Size/EyeLike outputs do not depend on values; an If/Loop/Scan output is
    assumed to (its branches may read any outer tensor). The caller checks the
    run's value too (:func:`quantlab.stats.sample_weights`: no axis of the run's size).
    """
    batched = {i for i in model.input_names if batch_axes.get(i, 0) is not None}
    for node in topological_nodes(model.proto):
        if node.op_type in SHAPE_ONLY_OPS:
            continue
        if node.op_type in CONTROL_FLOW_OPS or any(i in batched for i in node.input if i):
            batched.update(o for o in node.output if o)
    symbols = batch_symbols(model, batch_axes)
    specs = tensor_specs(model.proto)

    def has_batch_symbol(name: str) -> bool:
        spec = specs.get(name)
        return spec is not None and spec.shape is not None and any(d in symbols for d in spec.shape
                                                                    if isinstance(d, str))

    return {name: name in batched or has_batch_symbol(name) for name in names}


def samples_on_axis0(array: np.ndarray, axis: int, samples: int) -> np.ndarray | None:
    """``array`` with its ``samples`` on axis 0 (a view): moved from ``axis``, or one sample as a whole;
    None when no axis of that size is where the samples should be (the caller says what that means)."""
    array = np.asarray(array)
    if array.ndim > axis and array.shape[axis] == samples:
        return np.moveaxis(array, axis, 0) if axis else array
    return array[np.newaxis] if samples == 1 else None
