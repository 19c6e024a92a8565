"""Statistics runs that keep ONNX Runtime's blocked NCHWc layout: exposing a tensor costs a copy, not a reorder.

On x86 CPUs ORT runs convolutions, pooling and the activations fused into
them in a blocked layout, NCHWc: ``[N, C/B, H, W, B]`` with ``B`` channels
(8 with AVX2, 16 with AVX-512) in each block, the last block padded. Making an
activation a graph output forces ORT to convert it back (ReorderOutput), to
run the elementwise op that follows in NCHW and to convert its result again
(ReorderInput): on EfficientNet-Lite0 that doubled the cost of a run (5.4 to
10.8 ms per sample). Histograms, min/max and zero counts do not care where a
value sits, so a statistics run exposes the blocked tensors themselves and
runs the elementwise ops on them::

    ORT's graph with x and y exposed                  the statistics graph
    Conv[nchwc] ─> xb ─> ReorderOutput ─> x (out)      Conv[nchwc] ─> xb (out: x's values)
                    x ─> Clip ─> y (out)                   xb ─> Clip ─> yb (out: y's values)
                          y ─> ReorderInput ─> yb ─> Conv[nchwc]      yb ─> Conv[nchwc]

An op runs on blocked tensors only when that is elementwise: one input, or
inputs of the same shape (all blocked) and scalar constants, and it maps 0
to a finite value (the padding lanes feed the next convolution through zero
weights: a NaN there would spread). A pooling op on a blocked tensor runs in
its NCHWc form where ORT's own NchwcTransformer would have put it (one output,
rank 4, the channels a multiple of the block): exposing its input made ORT run
it in NCHW, whose sums round otherwise (a GlobalAveragePool 1 ulp off, so a
table of every tensor and one of the quantized ones differed on an AVX2 CPU).
A blocked array as ORT returns it has shape ``[N, C_padded, H, W]``;
:func:`values_of` drops the padding lanes.
Everything else (graph outputs of the model, ops that need NCHW) is left as ORT
planned it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import onnx
from onnx import helper

from .base import Runner, TensorValues

__all__ = ["NCHWC_DOMAIN", "Blocked", "BlockedRunner", "block_size", "blocked_graph", "probe_model", "values_of", "in_layout"]

NCHWC_DOMAIN = "com.microsoft.nchwc"

_ZERO_SAFE = frozenset({
    "Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus",
    "Abs", "Neg", "Identity", "Erf", "Add", "Sub", "Mul", "Max", "Min", "Sum", "PRelu",
})
"""Elementwise ops with a finite value at 0 (the padding lanes) that may run on blocked tensors."""

_POOLS = frozenset({"MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool"})
"""Ops ORT's NchwcTransformer runs in NCHWc (``TransformPool``) when their channels fill whole blocks."""

_BLOCKED_SUFFIX = "::nchwc"


@dataclass(frozen=True)
class Blocked:
    """Where the statistics graph holds an exposed tensor's values: ``name``, blocked, ``channels`` real ones."""

    name: str
    channels: int


def probe_model() -> onnx.ModelProto:
    """One ReorderInput of four channels: its output's channel count is the CPU's block size."""
    node = helper.make_node("ReorderInput", ["x"], ["y"], domain=NCHWC_DOMAIN)
    graph = helper.make_graph([node], "nchwc_block", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                      [1, 4, 1, 1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(NCHWC_DOMAIN, 1)])


_BLOCK_SIZES: dict[str, int | None] = {}


def block_size(ort: Any) -> int | None:
    """Channels per NCHWc block on this CPU (8 with AVX2, 16 with AVX-512); None where ORT has no NCHWc.

    ``ort`` is the onnxruntime module; the answer is probed once per process.
    """
    if ort.__version__ not in _BLOCK_SIZES:
        so = ort.SessionOptions()
        so.log_severity_level = 4
        try:
            session = ort.InferenceSession(probe_model().SerializeToString(), sess_options=so,
                                           providers=["CPUExecutionProvider"])
            channels = int(session.run(None, {"x": np.zeros((1, 4, 1, 1), np.float32)})[0].shape[1])
            _BLOCK_SIZES[ort.__version__] = channels if channels > 4 else None
        except Exception:  # no NCHWc kernels in this build or on this CPU
            _BLOCK_SIZES[ort.__version__] = None
    return _BLOCK_SIZES[ort.__version__]


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _scalar_constants(graph: onnx.GraphProto) -> set[str]:
    return {i.name for i in graph.initializer if int(np.prod(i.dims, dtype=np.int64)) == 1}


def _shape(specs: Mapping[str, Any], name: str) -> tuple[Any, ...] | None:
    spec = specs.get(name)
    shape = getattr(spec, "shape", None)
    if shape is None or any(d is None for d in shape):
        return None
    return tuple(shape)


class _Rewrite:
    """The state of one rewrite: which NCHW tensor has a blocked twin, and the nodes kept so far."""

    def __init__(self, graph: onnx.GraphProto, specs: Mapping[str, Any], block: int | None) -> None:
        self.graph = graph
        self.specs = specs
        self.block = block
        self.scalars = _scalar_constants(graph)
        self.blocked: dict[str, str] = {}  # NCHW name -> blocked twin
        self.channels: dict[str, int] = {}  # NCHW name -> real channels
        self.alias: dict[str, str] = {}  # a ReorderInput's output -> the blocked twin used instead
        self.nodes: list[onnx.NodeProto] = []

    def note_reorders(self) -> None:
        for node in self.graph.node:
            if node.domain != NCHWC_DOMAIN or _attribute(node, "channels_last", 0):
                continue
            if node.op_type == "ReorderOutput":
                self.blocked[node.output[0]] = node.input[0]
                self.channels[node.output[0]] = _attribute(node, "channels", 0)

    def twin_inputs(self, node: onnx.NodeProto) -> list[str] | None:
        """The node's inputs with NCHW tensors replaced by their blocked twins, or None if it cannot run blocked."""
        if node.domain not in ("", "ai.onnx") or node.op_type not in _ZERO_SAFE or len(node.output) != 1:
            return None
        tensors = [t for t in node.input if t and t not in self.scalars]
        if not tensors or any(t not in self.blocked for t in tensors):
            return None
        shapes = {_shape(self.specs, t) for t in tensors}
        channels = {self.channels[t] for t in tensors}
        if len(tensors) > 1 and (None in shapes or len(shapes) != 1 or len(channels) != 1):
            return None
        return [self.blocked.get(t, t) if t in tensors else t for t in node.input]

    def pool_input(self, node: onnx.NodeProto) -> list[str] | None:
        """A pool's input as its blocked twin where ORT would pool in NCHWc (module docstring), else None."""
        if (node.domain not in ("", "ai.onnx") or node.op_type not in _POOLS or len(node.output) != 1
                or not self.block or node.input[0] not in self.blocked):
            return None
        shape = _shape(self.specs, node.input[0])
        if shape is None or len(shape) != 4 or self.channels[node.input[0]] % self.block:
            return None
        return [self.blocked[node.input[0]]]

    def run_blocked(self, node: onnx.NodeProto, inputs: list[str], domain: str | None = None) -> None:
        out = node.output[0]
        twin = out + _BLOCKED_SUFFIX
        new = onnx.NodeProto()
        new.CopyFrom(node)
        if domain is not None:
            new.domain = domain
        del new.input[:]
        new.input.extend(inputs)
        new.output[0] = twin
        new.name = (node.name or out) + _BLOCKED_SUFFIX
        self.blocked[out] = twin
        first = next(t for t in node.input if t in self.channels)
        self.channels[out] = self.channels[first]
        self.nodes.append(new)

    def walk(self) -> None:
        for node in self.graph.node:
            node = self._aliased(node)
            if (node.domain == NCHWC_DOMAIN and node.op_type == "ReorderInput" and not _attribute(
                    node, "channels_last", 0) and node.input[0] in self.blocked):
                self.alias[node.output[0]] = self.blocked[node.input[0]]
                continue
            pooled = self.pool_input(node)
            inputs = self.twin_inputs(node)
            if pooled is not None:
                self.run_blocked(node, pooled, NCHWC_DOMAIN)
            elif inputs is None:
                self.nodes.append(node)
            else:
                self.run_blocked(node, inputs)

    def _aliased(self, node: onnx.NodeProto) -> onnx.NodeProto:
        if not any(t in self.alias for t in node.input):
            return node
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for k, t in enumerate(new.input):
            new.input[k] = self.alias.get(t, t)
        return new

    def reorder_back(self, needed: set[str]) -> None:
        """A ReorderOutput for every NCHW tensor still read whose producer now writes only its blocked twin,
        placed right after the twin's producer (the nodes stay in topological order)."""
        produced = {o for n in self.nodes for o in n.output}
        pending = {self.blocked[name]: helper.make_node("ReorderOutput", [self.blocked[name]], [name],
                                                        domain=NCHWC_DOMAIN, channels=self.channels[name],
                                                        channels_last=0, name=name + "::reorder")
                   for name in sorted(needed - produced) if name in self.blocked}
        nodes: list[onnx.NodeProto] = []
        for node in self.nodes:
            nodes.append(node)
            nodes.extend(pending.pop(o) for o in node.output if o in pending)
        self.nodes = nodes + list(pending.values())  # a twin no node writes: ORT rejects it, build() takes over


def _needed_nchw(nodes: Sequence[onnx.NodeProto], outputs: Sequence[str]) -> set[str]:
    return {t for n in nodes for t in n.input if t} | set(outputs)


def _live(nodes: Sequence[onnx.NodeProto], outputs: Sequence[str]) -> list[onnx.NodeProto]:
    """The (topologically ordered) ``nodes`` that ``outputs`` depend on, in their order."""
    needed = set(outputs)
    kept: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(t for t in node.input if t)
    kept.reverse()
    return kept


def blocked_graph(optimized: onnx.ModelProto, exposed: Sequence[str], model_outputs: Sequence[str],
                  specs: Mapping[str, Any], block: int | None = None) -> tuple[onnx.ModelProto, dict[str, Blocked]]:
    """ORT's optimised graph rewritten to expose blocked tensors (see the module docstring).

    ``optimized`` is what ORT saved for the model with ``exposed`` as extra
    outputs; it is rewritten in place (its weights are not copied: 0.5 GB for
    VGG-19) and returned. ``model_outputs`` keep their NCHW form; ``specs``
    (from the original model's shape inference) tell which binary ops see
    inputs of one shape; ``block`` (:func:`block_size`) which pools run blocked.
    The graph's outputs are the model's, then one per exposed tensor; the dict
    names the exposed tensors now read in blocked form.
    """
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in optimized.graph.node
           for a in n.attribute):
        return optimized, {}  # control flow: outer-scope names in subgraphs; not worth the risk
    rewrite = _Rewrite(optimized.graph, specs, block)
    rewrite.note_reorders()
    rewrite.walk()
    blocked = {t: Blocked(rewrite.blocked[t], rewrite.channels[t]) for t in exposed
               if t in rewrite.blocked and t not in model_outputs and rewrite.channels.get(t, 0) > 0}
    outputs = list(model_outputs) + [blocked[t].name if t in blocked else t for t in exposed
                                     if t not in model_outputs]
    twins = {b.name for b in blocked.values()}
    rewrite.reorder_back(_needed_nchw(rewrite.nodes, [o for o in outputs if o not in twins]))
    nodes = [_copied(n) for n in _live(rewrite.nodes, outputs)]
    infos = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) if o not in model_outputs
             else _copied(_output_info(optimized.graph, o)) for o in outputs]
    graph = optimized.graph
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.extend(infos)
    del graph.value_info[:]  # ORT's shapes: a blocked twin has none, a rewritten NCHW name may be gone
    return optimized, blocked


def _copied(message: Any) -> Any:
    """A detached copy of a node or value info (safe to put back after its graph's list is cleared)."""
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def _output_info(graph: onnx.GraphProto, name: str) -> onnx.ValueInfoProto:
    for vi in graph.output:
        if vi.name == name:
            return vi
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)


def values_of(array: np.ndarray, channels: int, block: int) -> tuple[np.ndarray, ...]:
    """Every real value of a blocked array once, as views: the whole array when ``channels`` fills its
    blocks, else per sample its full blocks and the real lanes of its last block (strided).

    ``array`` is ``[N, C_padded, *spatial]`` as ORT returns it, stored as
    ``[N, C_padded / block, *spatial, block]``.
    """
    padded = int(array.shape[1])
    if channels == padded:
        return (array,)
    lanes = array.reshape(int(array.shape[0]), padded // block, -1, block)
    last = channels - (padded // block - 1) * block
    return tuple(piece for sample in lanes for piece in (sample[:-1], sample[-1, :, :last]) if piece.size)


def in_layout(array: np.ndarray, channels: int, block: int) -> np.ndarray:
    """The blocked array as an ordinary ``[N, channels, *spatial]`` array (a copy)."""
    n, padded = int(array.shape[0]), int(array.shape[1])
    spatial = tuple(int(d) for d in array.shape[2:])
    lanes = array.reshape(n, padded // block, -1, block)
    ordered = np.moveaxis(lanes, 3, 2).reshape((n, padded) + spatial)
    return np.ascontiguousarray(ordered[:, :channels])


class BlockedRunner(Runner):
    """Runs the statistics graph; a blocked tensor comes back as :class:`TensorValues`, the rest as arrays."""

    def __init__(self, runner: Runner, blocked: Mapping[str, Blocked], block: int,
                 output_names: Sequence[str]) -> None:
        """``output_names``: the model's outputs and the exposed tensors, by their ONNX names."""
        self._runner = runner
        self._blocked = dict(blocked)
        self.block = block
        self.layout = f"nchwc{block}"
        self.input_names = runner.input_names
        self.output_names = tuple(output_names)

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, Any]:
        names = list(outputs) if outputs is not None else list(self.output_names)
        inner = [self._blocked[t].name if t in self._blocked else t for t in names]
        got = self._runner.run(feeds, inner)
        out: dict[str, Any] = {}
        for name, key in zip(names, inner, strict=True):
            where = self._blocked.get(name)
            if where is None:
                out[name] = got[key]
            else:
                array = got[key]
                out[name] = TensorValues(values_of(array, where.channels, self.block),
                                         partial(in_layout, array, where.channels, self.block))
        return out

    def close(self) -> None:
        self._runner.close()
