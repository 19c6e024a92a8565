"""An Einsum that is a matrix product, written as MatMul: the form both targets quantize (at load).

TensorFlow's ``EinsumDense`` (every projection of a TF BERT or ViT through tf2onnx) and hand-written attention
(``torch.einsum("bqhd,bkhd->bhqk", q, k)``) export as Einsum. Neither target has an INT8 Einsum: TensorRT's
Einsum layer computes in float, ONNX Runtime has no QLinear form, so every such layer stayed float and the model
ran mostly in FP32 whatever the plan said. Two kinds are a MatMul between transposes and reshapes::

    activation x weight, any contracted / free weight indices (the weight made [K, N] once, an initializer):
    x[a, b, c] ─► Einsum("abc,cd->abd") ◄─ W[c, d]           ==>  x ─► MatMul ◄─ W
    x[a, b, c] ─► Einsum("abc,cde->abde") ◄─ W[c, h, d]      ==>  x ─► MatMul ◄─ W[c, h*d] ─► Reshape[0, 0, h, d]
    x[a, b, h, d] ─► Einsum("abcd,cde->abe") ◄─ W[h, d, e]   ==>  x ─► Reshape[0, 0, -1] ─► MatMul ◄─ W[h*d, e]

    two activations, one contracted index, one free index on one side, shared indices as batch:
    q[b, q, h, d] ─► Einsum("bqhd,bkhd->bhqk") ◄─ k     ==>  q ─► Transpose(0,2,1,3) ─► MatMul ◄─ Transpose(0,2,3,1) ◄─ k
    p[b, h, q, k] ─► Einsum("bhqk,bkhd->bqhd") ◄─ v     ==>  p ─► MatMul ◄─ Transpose(0,2,1,3) ◄─ v ─► Transpose(0,2,1,3)

The MatMul keeps the Einsum's name and output, and its weight gets per-channel scales. Left as they are: Einsums
inside If/Loop/Scan bodies, more than two operands, an index repeated in one operand (a diagonal), an index summed
inside one operand, a weight sharing an index with the output, two activations contracting several indices, and
batch indices beside several free indices of the left activation (they would need a Reshape of unknown sizes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .topology import drop_unread_initializers

__all__ = ["einsum_as_matmul"]

_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


@dataclass(frozen=True)
class _Product:
    """How to compute an Einsum as ``MatMul(left', right')`` followed by ``Transpose(out_perm)``.

    ``left'`` is ``Transpose(left, left_perm)``, its trailing contracted axes merged into one (``merge``: Reshape
    to ``[0, .., 0, -1]``); ``right'`` is ``Transpose(right, right_perm)``, or, for a weight, that transposed
    weight reshaped to ``[K, N]`` (``weight``); ``split``: the sizes the product's last axis is reshaped into
    (a weight's several free axes; () for none). ``swapped``: the Einsum's second operand is the MatMul's left."""

    left_perm: tuple[int, ...]
    right_perm: tuple[int, ...]
    out_perm: tuple[int, ...]
    swapped: bool
    merge: int = 0
    weight: np.ndarray | None = None
    split: tuple[int, ...] | None = None


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
    plans = {k: p for k, n in enumerate(g.node) if (p := _plan(n, ranks, floats, weights)) is not None}
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


def _plan(node: onnx.NodeProto, ranks: Mapping[str, int], floats: set[str],
          weights: Mapping[str, onnx.TensorProto]) -> _Product | None:
    if node.op_type != "Einsum" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    if not all(t in floats and t in ranks for t in node.input):
        return None
    equation = next((a.s.decode() for a in node.attribute if a.name == "equation"), "")
    terms = _terms(equation.replace(" ", ""), ranks[node.input[0]], ranks[node.input[1]])
    if terms is None:
        return None
    a, b, o = terms
    for swapped, (x, w, name) in enumerate([(a, b, node.input[1]), (b, a, node.input[0])]):
        if name in weights and (plan := _weight_product(x, w, o, weights[name], bool(swapped))) is not None:
            return plan
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


def _weight_product(x: str, w: str, o: str, weight: onnx.TensorProto, swapped: bool) -> _Product | None:
    """The plan for activation ``x`` times weight ``w`` -> ``o`` with any number of contracted and free weight
    indices (TF's ``EinsumDense``: ``"abc,cde->abde"`` into heads, ``"abcd,cde->abe"`` out of them), the weight
    made ``[K, N]`` once; None when the weight shares an index with the output (a batch of weights)."""
    if len(set(x)) != len(x) or len(set(w)) != len(w) or len(set(o)) != len(o) or not set(o) <= set(x) | set(w):
        return None
    contract = [c for c in x if c in w and c not in o]
    free_x = [c for c in x if c not in w]
    free_w = [c for c in w if c not in x]
    if not contract or not free_x or any(c in w and c in x for c in o) or not set(free_x + free_w) <= set(o):
        return None
    order = [w.index(c) for c in contract + free_w]
    product = free_x + free_w
    plan = _Product(tuple(x.index(c) for c in free_x + contract), (0, 1), tuple(product.index(c) for c in o), swapped,
                    merge=len(free_x) if len(contract) > 1 else 0)
    if order == [0, 1]:
        return plan  # already the [K, N] weight a MatMul reads
    array = numpy_helper.to_array(weight)
    sizes = tuple(int(array.shape[w.index(c)]) for c in free_w)
    moved = np.transpose(array, order)
    matrix = moved.reshape(int(np.prod(moved.shape[:len(contract)])), int(np.prod(sizes)))
    return replace(plan, weight=np.ascontiguousarray(matrix), split=sizes if len(free_w) != 1 else None)


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

    def reshaped(tensor: str, shape: list[int], role: str, out: str | None = None) -> str:
        target = _fresh(f"{name}/{role}_shape", taken)
        graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), target))
        new = out or _fresh(f"{name}/{role}_output", taken)
        nodes.append(helper.make_node("Reshape", [tensor, target], [new], name=_fresh(f"{name}/{role}", taken)))
        return new

    a = arranged(left, plan.left_perm, "transpose_a")
    if plan.merge:
        a = reshaped(a, [0] * plan.merge + [-1], "merge")
    if plan.weight is not None:
        b = _fresh(f"{right}_matrix", taken)
        graph.initializer.append(numpy_helper.from_array(plan.weight, b))
        replaced.add(right)
    else:
        b = arranged(right, plan.right_perm, "transpose_b")
    steps: list[tuple[str, list[int]]] = []
    if plan.split is not None:
        steps.append(("split", [0] * (len(plan.out_perm) - len(plan.split)) + list(plan.split)))
    if plan.out_perm != tuple(range(len(plan.out_perm))):
        steps.append(("transpose_out", list(plan.out_perm)))
    product = node.output[0] if not steps else _fresh(f"{name}/matmul_output", taken)
    nodes.append(helper.make_node("MatMul", [a, b], [product], name=name))
    for k, (role, values) in enumerate(steps):
        out = node.output[0] if k == len(steps) - 1 else None
        if role == "split":
            product = reshaped(product, values, role, out)
            continue
        moved = out or _fresh(f"{name}/{role}_output", taken)
        nodes.append(helper.make_node("Transpose", [product], [moved], name=_fresh(f"{name}/{role}", taken),
                                      perm=values))
        product = moved
    return nodes
