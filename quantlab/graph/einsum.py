"""An Einsum that is a matrix product, written as MatMul: the form both targets quantize (at load).

TensorFlow's ``EinsumDense`` (every projection of a TF BERT or ViT through tf2onnx) and hand-written attention
(``torch.einsum("bqhd,bkhd->bhqk", q, k)``) export as Einsum. Neither target has an INT8 Einsum: TensorRT's
Einsum layer computes in float, ONNX Runtime has no QLinear form, so every such layer stayed float and the model
ran mostly in FP32 whatever the plan said. One contracted index, one free index on one side, the rest batch or
free indices of the other side, is a MatMul between transposes::

    x[b, s, c] ─► Einsum("bsc,cd->bsd") ◄─ W[c, d]      ==>  x ─► MatMul ◄─ W            (no transpose)
    q[b, q, h, d] ─► Einsum("bqhd,bkhd->bhqk") ◄─ k     ==>  q ─► Transpose(0,2,1,3) ─► MatMul ◄─ Transpose(0,2,3,1) ◄─ k
    p[b, h, q, k] ─► Einsum("bhqk,bkhd->bqhd") ◄─ v     ==>  p ─► MatMul ◄─ Transpose(0,2,1,3) ◄─ v ─► Transpose(0,2,1,3)

A weight operand is transposed once, as a new initializer, so the MatMul reads a plain ``[K, N]`` weight and gets
per-channel scales. The MatMul keeps the Einsum's name and output. Left as they are: Einsums inside If/Loop/Scan
bodies, more than two operands,
an index repeated in one operand (a diagonal), an index summed inside one operand, several contracted indices,
and batch indices beside several free indices on the side that is not the weight's (they would need a Reshape).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .topology import drop_unread_initializers

__all__ = ["einsum_as_matmul"]

_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


@dataclass(frozen=True)
class _Product:
    """How to compute an Einsum as ``MatMul(Transpose(left, left_perm), Transpose(right, right_perm))`` followed by
    ``Transpose(out_perm)``; ``swapped``: the Einsum's second operand is the MatMul's left."""

    left_perm: tuple[int, ...]
    right_perm: tuple[int, ...]
    out_perm: tuple[int, ...]
    swapped: bool


def einsum_as_matmul(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` (shape-inferred: ranks come from its value_info) with each main-graph Einsum that is a matrix
    product written as Transpose/MatMul; ``proto`` itself when there is none. Its new tensors lack value_info:
    the caller infers shapes again."""
    g = proto.graph
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in [*g.input, *g.value_info, *g.output]
             if vi.type.tensor_type.HasField("shape")}
    floats = {vi.name for vi in [*g.input, *g.value_info, *g.output] if vi.type.tensor_type.elem_type in _FLOATS}
    weights = {i.name: i for i in g.initializer}
    ranks.update({name: len(t.dims) for name, t in weights.items()})
    floats.update(name for name, t in weights.items() if t.data_type in _FLOATS)
    plans = {k: p for k, n in enumerate(g.node) if (p := _plan(n, ranks, floats)) is not None}
    if not plans:
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    taken = {t for n in out.graph.node for t in [*n.input, *n.output]} | set(weights) | {n.name for n in g.node}
    nodes: list[onnx.NodeProto] = []
    replaced: set[str] = set()
    for k, node in enumerate(out.graph.node):
        if k not in plans:
            nodes.append(node)
            continue
        nodes.extend(_rewritten(node, plans[k], weights, out.graph, taken, replaced))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    drop_unread_initializers(out.graph, replaced)
    return out


def _plan(node: onnx.NodeProto, ranks: Mapping[str, int], floats: set[str]) -> _Product | None:
    if node.op_type != "Einsum" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    if not all(t in floats and t in ranks for t in node.input):
        return None
    equation = next((a.s.decode() for a in node.attribute if a.name == "equation"), "")
    terms = _terms(equation.replace(" ", ""), ranks[node.input[0]], ranks[node.input[1]])
    if terms is None:
        return None
    a, b, o = terms
    return _product(a, b, o, swapped=False) or _product(b, a, o, swapped=True)


def _terms(equation: str, rank_a: int, rank_b: int) -> tuple[str, str, str] | None:
    """The equation's two operand terms and its output, an ellipsis spelt out as letters it does not use
    (aligned from the right, as broadcasting does); None for what this rewrite leaves alone."""
    lhs, arrow, rhs = equation.partition("->")
    operands = lhs.split(",")
    if len(operands) != 2:
        return None
    if not arrow:  # implicit output: the indices seen once, in alphabetical order
        letters = "".join(operands).replace(".", "")
        rhs = ("..." if "..." in lhs else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    spare = [c for c in "ZYXWVUTSRQPONMLKJIHGFEDCBAzyxwvutsrqponmlkjihgfedcba" if c not in equation]
    counts = [rank_a - len(operands[0].replace("...", "")), rank_b - len(operands[1].replace("...", ""))]
    widest = max((n for n, t in zip(counts, operands, strict=True) if "..." in t), default=0)
    if widest > len(spare) or any(n < 0 for n in counts):
        return None
    fill = "".join(spare[:widest])
    spelt = [t.replace("...", fill[widest - n:]) if "..." in t else t for t, n in zip(operands, counts, strict=True)]
    out = rhs.replace("...", fill)
    if any(len(t) != r for t, r in zip(spelt, (rank_a, rank_b), strict=True)) or "." in "".join([*spelt, out]):
        return None
    if not all(c.isalpha() for c in "".join([*spelt, out])):
        return None
    return spelt[0], spelt[1], out


def _product(a: str, b: str, o: str, swapped: bool) -> _Product | None:
    """The plan for ``a @ b`` -> ``o`` (``a`` the MatMul's left operand), None when it is no single MatMul."""
    if len(set(a)) != len(a) or len(set(b)) != len(b) or len(set(o)) != len(o) or not set(o) <= set(a) | set(b):
        return None
    contract = [c for c in a if c in b and c not in o]
    batch = [c for c in o if c in a and c in b]
    free_a = [c for c in a if c not in b]
    free_b = [c for c in b if c not in a]
    if len(contract) != 1 or len(free_b) != 1 or not free_a or not set(free_a + free_b) <= set(o):
        return None
    if batch and len(free_a) > 1:  # b would need ones between its batch and its matrix axes
        return None
    left = batch + free_a + contract
    right = batch + contract + free_b
    product = batch + free_a + free_b
    return _Product(tuple(a.index(c) for c in left), tuple(b.index(c) for c in right),
                    tuple(product.index(c) for c in o), swapped)


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def _rewritten(node: onnx.NodeProto, plan: _Product, weights: Mapping[str, onnx.TensorProto],
               graph: onnx.GraphProto, taken: set[str], replaced: set[str]) -> list[onnx.NodeProto]:
    """The nodes computing ``node``'s output as ``plan`` says (new initializers added to ``graph``)."""
    left, right = (node.input[1], node.input[0]) if plan.swapped else (node.input[0], node.input[1])
    name = node.name or node.output[0]
    nodes: list[onnx.NodeProto] = []

    def arranged(tensor: str, perm: tuple[int, ...], role: str) -> str:
        if perm == tuple(range(len(perm))):
            return tensor
        if tensor in weights:
            moved = np.ascontiguousarray(np.transpose(numpy_helper.to_array(weights[tensor]), perm))
            new = _fresh(f"{tensor}_{role}", taken)
            graph.initializer.append(numpy_helper.from_array(moved, new))
            replaced.add(tensor)
            return new
        new = _fresh(f"{name}/{role}_output", taken)
        nodes.append(helper.make_node("Transpose", [tensor], [new], name=_fresh(f"{name}/{role}", taken),
                                      perm=list(perm)))
        return new

    a = arranged(left, plan.left_perm, "transpose_a")
    b = arranged(right, plan.right_perm, "transpose_b")
    if plan.out_perm == tuple(range(len(plan.out_perm))):
        nodes.append(helper.make_node("MatMul", [a, b], [node.output[0]], name=name))
        return nodes
    product = _fresh(f"{name}/matmul_output", taken)
    nodes.append(helper.make_node("MatMul", [a, b], [product], name=name))
    nodes.append(helper.make_node("Transpose", [product], [node.output[0]], name=_fresh(f"{name}/transpose_out", taken),
                                  perm=list(plan.out_perm)))
    return nodes
