"""What ONNX Runtime's load errors mean: a missing kernel or op named by node and op, with what to change.

ONNX Runtime says "Could not find an implementation for Conv(11) node with name 'x'" or "... is not a
registered function/op"; :func:`load_error` turns that into an :class:`~quantlab.errors.UnsupportedOpError`
naming the node, its input types and the fix, and anything else into a :class:`~quantlab.errors.BackendError`.
"""

from __future__ import annotations

import re

import onnx

from ..errors import BackendError, UnsupportedOpError
from ..graph import tensor_specs

__all__ = ["load_error"]


_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'")
_NO_OP = re.compile(r"([\w.]*):(\w+)\((-?\d+)\) is not a registered function/op")
_NO_SCHEMA = re.compile(r"No Op registered for (\w+) with domain_version of (\d+)")


def load_error(version: str, model: onnx.ModelProto, msg: str) -> Exception:
    """UnsupportedOpError naming node + op when ORT lacks a kernel/op, else BackendError."""
    specs = tensor_specs(model)

    def input_types(node: onnx.NodeProto) -> str:
        return ", ".join(f"{i}: {specs[i].dtype}" if i in specs else i for i in node.input if i)

    def nodes_of(op: str) -> list[onnx.NodeProto]:
        return [n for n in model.graph.node if n.op_type == op]

    hit = _NO_KERNEL.search(msg)
    if hit:
        op, opset, node_name = hit.groups()
        matches = [n for n in nodes_of(op) if n.name == node_name] or nodes_of(op)
        types = f" with inputs ({input_types(matches[0])})" if matches else ""
        shown = node_name or (matches[0].name if matches else "") or "<unnamed>"
        return UnsupportedOpError(
            f"ONNX Runtime {version} has no kernel for node {shown!r} (op {op}, opset {opset}){types}. "
            "Change the node's input types (e.g. keep it float32 in the precision plan) or replace the op."
        )
    for pattern in (_NO_OP, _NO_SCHEMA):
        hit = pattern.search(msg)
        if hit:
            op = hit.group(2) if pattern is _NO_OP else hit.group(1)
            names = ", ".join(repr(n.name or "<unnamed>") for n in nodes_of(op)) or "?"
            return UnsupportedOpError(
                f"ONNX Runtime {version} does not know op {op!r} (node(s) {names}): {msg}. "
                "Custom-domain ops need their library registered; otherwise replace the op."
            )
    return BackendError(f"ONNX Runtime {version} could not load the model: {msg}")
