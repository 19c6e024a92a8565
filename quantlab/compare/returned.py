"""Outputs read by the shape the model returns where its declaration has another rank.

What an output holds (scores per position, a class map, a classifier's scores) is read from its shape. An exporter
may declare a shape the graph does not compute: ddddocr's recogniser declares ``387: [1, seqlen]`` and returns
``[T, 1, 8210]`` CTC scores, so token agreement, CTC text and ``--ctc-blank`` were out of reach and the error said
"no output holds class scores per position". Where shape inference cannot confirm a declared rank, the first batch
runs once on the reference; an output returned with another rank is declared again from what came back (the batch
axis as the inputs name it, its last axis fixed, the others dynamic) and a note says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from ..backends import Backend
from ..graph import LoadedModel
from ..graph.light import light_copy
from ..graph.samples import batch_symbols
from ..graph.specs import TensorSpec, tensor_specs

__all__ = ["as_returned", "redeclared"]


def as_returned(reference: LoadedModel, dataset: Any, backend: Backend, batch_size: int
                ) -> tuple[dict[str, tuple[int | str, ...]], list[str]]:
    """Output -> the declaration of what ``reference`` returns, for the outputs it returns at another rank than it
    declares (apply with :func:`redeclared`), and a note for each; {} when every declared rank is confirmed by
    shape inference or by the first batch."""
    unconfirmed = _unconfirmed_outputs(reference)
    if not unconfirmed:
        return {}, []
    batch = next(iter(dataset.batches(batch_size)), None)
    if batch is None:
        return {}, []
    runner = backend.build(reference.proto)
    try:
        got = runner.run(batch.feeds, unconfirmed)
    finally:
        runner.close()
    declared = {spec.name: spec for spec in reference.outputs}
    symbols = sorted(batch_symbols(reference, getattr(dataset, "batch_axes", {})))
    fixed: dict[str, tuple[int | str, ...]] = {}
    for name in unconfirmed:
        shape, spec = np.shape(got[name]), declared[name]
        if spec.shape is not None and len(shape) != len(spec.shape):
            fixed[name] = _as_declared(name, shape, len(batch), symbols[0] if symbols else None)
    if not fixed:
        return {}, []
    notes = [f"output {name!r} is declared {_shown(declared[name].shape)} but the model returns shape "
             f"{list(np.shape(got[name]))}: read as returned ({_shown(shape)}); correct its declaration in the model "
             "(its output type, or re-export) so that other tools read it too" for name, shape in fixed.items()]
    return fixed, notes


def _unconfirmed_outputs(model: LoadedModel) -> list[str]:
    """Float outputs whose declared rank shape inference does not derive from the graph once the declaration is
    cleared (it derives none, or another)."""
    floats = [spec for spec in model.outputs if spec.is_float and spec.shape is not None]
    if not floats:
        return []
    cleared = light_copy(model.proto)  # the weights' data stays behind: a large model is not copied
    for out in cleared.graph.output:
        if out.name in {s.name for s in floats}:
            out.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(cleared, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference that fails confirms nothing
        return [s.name for s in floats]
    ranks = {o.name: len(o.type.tensor_type.shape.dim) for o in inferred.graph.output
             if o.type.tensor_type.HasField("shape")}
    return [s.name for s in floats if ranks.get(s.name) != len(s.shape or ())]


def _as_declared(name: str, shape: tuple[int, ...], batch: int, symbol: str | None) -> tuple[int | str, ...]:
    """A declaration for an output returned as ``shape`` for a batch of ``batch``: the last axis (classes) fixed,
    the batch axis (the first of that size, when the inputs name a batch symbol) that symbol, the rest dynamic."""
    dims: list[int | str] = [f"{name}_dim{k}" for k in range(len(shape))]
    if shape:
        dims[-1] = int(shape[-1])
    batch_axis = next((k for k, d in enumerate(shape[:-1]) if d == batch), None)
    if batch_axis is not None:
        dims[batch_axis] = symbol if symbol is not None else int(batch)
    return tuple(dims)


def redeclared(model: Any, fixed: Mapping[str, tuple[int | str, ...]]) -> Any:
    """``model`` (a LoadedModel, or a candidate with a ``proto``) with the outputs of ``fixed`` declared so, where
    it declares them with another rank (a candidate written from the same export declares what it did)."""
    specs = tensor_specs(model.proto)
    change = {n: d for n, d in fixed.items()
              if n in specs and (specs[n].shape is None or len(specs[n].shape) != len(d))}
    if not change:
        return model
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    for out in proto.graph.output:
        if out.name in change:
            shape = out.type.tensor_type.shape
            shape.Clear()
            for d in change[out.name]:
                dim = shape.dim.add()
                if isinstance(d, int):
                    dim.dim_value = d
                else:
                    dim.dim_param = d
    if isinstance(model, LoadedModel):
        outputs = tuple(TensorSpec(s.name, s.dtype, change[s.name]) if s.name in change else s for s in model.outputs)
        return dataclasses.replace(model, proto=proto, outputs=outputs)
    return dataclasses.replace(model, proto=proto)


def _shown(shape: Any) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]" if shape is not None else "[?]"
