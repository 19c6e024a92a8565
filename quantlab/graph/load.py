"""Loading ONNX models safely: parse, check, shape-infer, upgrade the opset, refuse escaping external data.

A model is data, never code: it is parsed with protobuf, checked with the ONNX
checker, shape-inferred, and its external-data paths are refused when they
leave the model's folder. Opsets below 13 are upgraded, because per-channel
QuantizeLinear/DequantizeLinear needs opset 13.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..environment import unreadable
from ..errors import ModelError
from ..fingerprint import sha256_bytes, sha256_file
from .batchnorm import fold_batchnorm_into_conv
from .constants import constants_to_initializers
from .dims import symbolic_negative_dims
from .domains import typed_custom_outputs
from .identities import fold_initializer_identities, fold_initializer_views
from .light import inferred_model
from .conv_bias import fold_bias_add_into_conv
from .einsum import einsum_as_matmul
from .pooling import reduce_mean_to_global_pool, whole_window_pool_to_global
from .specs import TensorSpec, activation_names, tensor_specs
from .upgrade import upgraded
from .weights import fold_computed_weights

__all__ = [
    "MIN_OPSET",
    "LoadedModel",
    "TensorSpec",
    "activation_names",
    "default_opset",
    "load_model",
    "model_from_proto",
    "serialize",
    "tensor_specs",
]

MIN_OPSET = 13
"""Per-channel Q/DQ (``axis`` on QuantizeLinear/DequantizeLinear) needs opset 13."""

@dataclass(frozen=True)
class LoadedModel:
    """A checked, shape-inferred model and where it came from.

    ``sha256`` is the hash of the file as given (plus its external-data files),
    or of the serialized proto for a model built in memory.
    """

    proto: onnx.ModelProto = field(repr=False)
    sha256: str
    path: Path | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int
    upgraded_from_opset: int | None = None
    bindings: tuple[tuple[str, Any], ...] = ()  # inputs made constants at load (``bind``), values JSON-able

    @property
    def bound(self) -> tuple[str, ...]:
        """The inputs made constants at load (``bind``): data must not give them."""
        return tuple(name for name, _ in self.bindings)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def label(self) -> str:
        return str(self.path) if self.path else f"<in-memory model {self.sha256[:12]}>"


def serialize(proto: onnx.ModelProto) -> bytes:
    """Deterministic bytes of a model (same proto, same bytes)."""
    return proto.SerializeToString(deterministic=True)


def default_opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ModelError("the model imports no default ('ai.onnx') opset; it is not a usable ONNX graph")



def _min_ir_version(proto: onnx.ModelProto) -> int:
    """The IR version the model's opsets need; contrib domains (com.microsoft, ...) and versions onnx does not
    know count as none (``find_min_ir_version_for`` raised "Unsupported opset-version" on an ORT-quantized
    model's ``ai.onnx.training``)."""
    try:
        return helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    except ValueError:
        standard = [o for o in proto.opset_import if o.domain in ("", "ai.onnx")]
        return helper.find_min_ir_version_for(standard, ignore_unknown=True)

_PROTOBUF_LIMIT = 2**31 - 1
"""Bytes of the largest protobuf message: quantlab holds a model, its weights inside, as one ModelProto and hands
ORT its serialised bytes, so a model whose weights and graph exceed this cannot be handled (not yet)."""


def _check_external_paths(proto: onnx.ModelProto, folder: Path, label: str) -> tuple[list[Path], int]:
    """Refuse external-data locations that escape ``folder``; return the files used and the bytes the tensors
    read from them (``length``, else the rest of the file after ``offset``)."""
    folder = folder.resolve()
    used: set[Path] = set()
    loaded = 0
    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                tensors.append(attr.t)
    for t in tensors:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        if not location or os.path.isabs(location) or location.startswith(("/", "\\")):
            raise ModelError(
                f"{label}: initializer {t.name!r} stores its data at {location!r}, an absolute or "
                "empty path; external data must sit inside the model's folder. Re-save the model "
                "with onnx.save(..., save_as_external_data=True, location='<file name>')."
            )
        resolved = (folder / location).resolve()
        if resolved != folder and folder not in resolved.parents:
            raise ModelError(
                f"{label}: initializer {t.name!r} points its external data at {location!r}, which "
                f"leaves the model's folder {folder}; refusing to read it. Move the data file next "
                "to the model and re-save it with a plain file name as location."
            )
        if not resolved.is_file():
            raise ModelError(
                f"{label}: initializer {t.name!r} needs external data file {location!r}, which "
                f"does not exist in {folder}. Copy it next to the model."
            )
        used.add(resolved)
        length, offset = info.get("length", ""), info.get("offset", "")
        loaded += int(length) if length.isdigit() else max(
            0, resolved.stat().st_size - (int(offset) if offset.isdigit() else 0))
    return sorted(used), loaded


def _parse(data: bytes, label: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning subclasses
        raise ModelError(
            f"{label}: not an ONNX model, or the file is truncated ({exc}). "
            "Check the path, or re-export the model."
        ) from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelError(
            f"{label}: parsed as protobuf but holds no ONNX graph (no nodes, no outputs); "
            "it is not an ONNX model or it is truncated."
        )
    return proto


def _check_unique_node_names(graph: onnx.GraphProto, label: str, scope: str = "the graph") -> None:
    """Refuse two nodes of one graph (or subgraph) sharing a name: ORT refuses them, plans name layers by node name."""
    seen: dict[str, list[tuple[int, str]]] = {}
    for index, node in enumerate(graph.node):
        if node.name:
            seen.setdefault(node.name, []).append((index, node.op_type))
        for attr in node.attribute:
            for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                _check_unique_node_names(body, label, f"the subgraph {attr.name!r} of node {node.name or node.op_type!r}")
    dupes = {name: where for name, where in seen.items() if len(where) > 1}
    for name, where in list(dupes.items())[:1]:
        others = f" (and {len(dupes) - 1} other repeated name(s))" if len(dupes) > 1 else ""
        raise ModelError(
            f"{label}: node name {name!r} is used by {len(where)} nodes of {scope}: "
            f"{', '.join(f'#{i} ({op})' for i, op in where[:5])}{others}. ONNX Runtime refuses such models and "
            "quantlab names layers by node name; give every node a unique name (re-export, or in Python: for i, n in "
            "enumerate(model.graph.node): n.name = f\"{n.name}_{i}\" for the repeated ones, then onnx.save)."
        )


def _prepare(proto: onnx.ModelProto, label: str, path: Path | None) -> tuple[onnx.ModelProto, int, int | None]:
    opset = default_opset(proto)
    _check_unique_node_names(proto.graph, label)
    upgraded_from: int | None = None
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelError(
            f"{label}: fails the ONNX checker: {exc}. The file may be truncated or corrupt; "
            "re-export it."
        ) from None
    if opset < MIN_OPSET:
        proto = upgraded(proto, opset, MIN_OPSET, label)
        upgraded_from, opset = opset, MIN_OPSET
        # IR < 4 wants every initializer listed as a graph input: a written model's Q/DQ scales are not
        proto.ir_version = max(proto.ir_version, _min_ir_version(proto))
    # imported here, not at the top: controlflow's rewrites use graph.topology, and a module-level import
    # would make `import quantlab.controlflow` (or folding, loops) fail on the partially initialised cycle
    from ..controlflow import resolve_static_control_flow
    from ..simplify import fuse_pad_into_conv

    proto = _with_functions_inlined(proto, label)  # a module exported as a function: its convs quantizable
    proto = symbolic_negative_dims(proto)  # -1/0 as dynamic dims (paddle2onnx): they broke cut sub-models
    proto, _ = resolve_static_control_flow(proto)  # constant Ifs inlined, static Loops unrolled: recorded
    proto = constants_to_initializers(proto)  # paddle2onnx's parameters in Constant nodes: the folds read initializers
    proto = fuse_pad_into_conv(proto)  # tf2onnx's SAME padding: a zero Pad before a Conv goes into its pads
    proto = fold_initializer_identities(proto)  # first: an Identity over a weight is rewired, not copied
    proto = fold_computed_weights(proto)  # weights computed from constants at every run (weight_norm): weights again
    proto = fold_initializer_views(proto)  # weights cast up or transposed at every run: weights again
    proto = fold_initializer_identities(proto)  # torch's Identity over shared/equal weights: weights again
    proto = fold_batchnorm_into_conv(proto)  # dynamo exports (optimize=False) keep BatchNorms: folded as TensorRT does
    proto = fold_bias_add_into_conv(proto)  # paddle2onnx's Conv + Add(bias): one Conv, one Q/DQ in the ORT form
    try:
        proto = inferred_model(proto, strict_mode=False, data_prop=True)  # on the weightless copy: the same result
    except Exception as exc:
        raise ModelError(f"{label}: ONNX shape inference failed: {exc}") from None
    proto = reduce_mean_to_global_pool(proto)  # the dynamo exporter's adaptive_avg_pool2d(x, 1): as legacy writes it
    proto = whole_window_pool_to_global(proto)  # an AveragePool over the whole map (HF EfficientNet's pooler)
    lowered = einsum_as_matmul(proto)  # EinsumDense, einsum attention: MatMuls both targets quantize
    if lowered is not proto:
        try:
            proto = inferred_model(lowered, strict_mode=False, data_prop=True)
        except Exception as exc:
            raise ModelError(f"{label}: ONNX shape inference failed after writing Einsums as MatMul: {exc}") from None
    return typed_custom_outputs(proto), opset, upgraded_from


def _with_functions_inlined(proto: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """``proto`` with its model-local functions inlined (torch's ``export_modules_as_functions``, onnxscript).

    A call of a local function is one opaque node to everything that follows: its convs and matmuls had no INT8
    form (81 % of a small net's weights fell back to FP32) and its activations no ranges. Inlined, the graph
    computes the same; the inlined nodes get unique names (``Conv_0__1``: node 0 of the function, call 1). When
    the inliner cannot take a function, the model keeps its calls.
    """
    if not proto.functions:
        return proto
    from onnx import inliner

    try:
        inlined = inliner.inline_local_functions(proto)
        onnx.checker.check_model(inlined)
        _check_unique_node_names(inlined.graph, label)
    except Exception:  # the calls stay opaque (FP32 layers, as before): the model still runs, builds and compares
        return proto
    return inlined


def load_model(path: str | os.PathLike[str], *, bind: Mapping[str, Any] | None = None) -> LoadedModel:
    """Load, check and shape-infer an ONNX file (external data only from its own folder).

    ``bind``: inputs the data always feeds one value (a voice model's sample rate ``sr``), made
    initializers before control flow is resolved, so the ``If`` they decide is inlined and its branch
    calibrated and written (``quantlab.controlflow.bind_inputs``; recorded in provenance). Values
    take the input's dtype. The model's hash then covers the bound values: a table of the bound
    model does not pass for the file's.

    A file this user may not read is a PermissionError naming it and the fix (the environment's problem).
    """
    path = Path(path)
    try:
        return _load_file(path, dict(bind or {}))
    except PermissionError as exc:
        raise unreadable(exc, "model", path) from None


def _bound(proto: onnx.ModelProto, bind: Mapping[str, Any], label: str) -> onnx.ModelProto:
    """``proto`` with the ``bind`` inputs made initializers of their input's dtype."""
    from ..controlflow import bind_inputs  # not at the top: see _prepare

    dtypes = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    values = {}
    for name, value in bind.items():
        if name not in dtypes:
            raise ModelError(f"{label}: cannot bind {name!r}: not an input of the model (its inputs are "
                             f"{', '.join(sorted(dtypes))})")
        try:
            values[name] = np.asarray(value, dtype=helper.tensor_dtype_to_np_dtype(dtypes[name]))
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{label}: cannot bind {name!r} to {value!r}: {exc}") from None
    return bind_inputs(proto, values)


def _load_file(path: Path, bind: Mapping[str, Any] | None = None) -> LoadedModel:
    label = str(path)
    if not path.exists():
        raise ModelError(f"{label}: no such file. Give the path of an .onnx model.")
    if path.is_dir():
        raise ModelError(f"{label}: is a folder; give the path of an .onnx file inside it.")
    if not path.is_file():  # a FIFO, socket or device: reading it could block forever or never end
        raise ModelError(f"{label}: is not a regular file (a pipe or device?); give the path of an .onnx file.")
    data = path.read_bytes()
    if not data:
        raise ModelError(f"{label}: the file is empty; it is not an ONNX model.")
    proto = _parse(data, label)
    external, external_bytes = _check_external_paths(proto, path.parent, label)
    if len(data) + external_bytes > _PROTOBUF_LIMIT:
        raise ModelError(
            f"{label}: with its external data the model holds {(len(data) + external_bytes) / 2**30:.2f} GiB, over "
            f"protobuf's 2 GiB limit for one message; quantlab keeps a model and its weights in one message and "
            "cannot calibrate or write models this large yet. Quantize a smaller variant, or split the model.")
    digest = sha256_bytes(data)
    if external:
        from onnx.external_data_helper import load_external_data_for_model

        # hashed first: a file this user may not read fails here with its name (onnx's loader hides it)
        parts = [digest] + [f"{p.name}:{sha256_file(p)}" for p in external]
        digest = sha256_bytes("|".join(parts).encode())
        try:
            load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:
            raise ModelError(f"{label}: cannot read its external data: {exc}") from None
    if bind:
        proto = _bound(proto, bind, label)
        digest = sha256_bytes((digest + "|bind:" + ",".join(
            f"{k}={np.asarray(v).tolist()!r}" for k, v in sorted(bind.items()))).encode())
    proto, opset, upgraded = _prepare(proto, label, path)
    return replace(_loaded(proto, digest, path, opset, upgraded),
                   bindings=tuple((k, np.asarray(v).tolist()) for k, v in sorted((bind or {}).items())))


def model_from_proto(proto: onnx.ModelProto, *, label: str = "in-memory model") -> LoadedModel:
    """Check and shape-infer a model built in memory (e.g. by a writer or a test)."""
    proto_copy = onnx.ModelProto()
    proto_copy.CopyFrom(proto)
    digest = sha256_bytes(serialize(proto_copy))
    proto_copy, opset, upgraded = _prepare(proto_copy, label, None)
    return _loaded(proto_copy, digest, None, opset, upgraded)


def _loaded(proto: onnx.ModelProto, digest: str, path: Path | None, opset: int, upgraded: int | None) -> LoadedModel:
    specs = tensor_specs(proto)
    inits = {i.name for i in proto.graph.initializer}
    inputs = tuple(specs[i.name] for i in proto.graph.input if i.name not in inits)
    outputs = tuple(specs[o.name] for o in proto.graph.output)
    return LoadedModel(proto=proto, sha256=digest, path=path, inputs=inputs, outputs=outputs,
                       opset=opset, upgraded_from_opset=upgraded)
