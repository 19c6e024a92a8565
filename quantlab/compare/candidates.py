"""Candidates: what compare() takes (:data:`Candidate`) and :func:`load_candidate` (one from disk).

A ``quantlab build --out`` folder reads back as the :class:`WrittenModel` it was::

    build/int8/
      model.onnx         the written model              -> WrittenModel.proto
      provenance.json    node/tensor maps, build meta   -> .provenance, .options (meta["options"])
      plan.json          the effective plan             -> .plan (resolved on the reference)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

from ..errors import CompareError, QuantlabError
from ..fingerprint import sha256_bytes, source_hash
from ..graph import LoadedModel, load_model
from ..graph.halves import computes_in_float16 as _computes_in_float16
from ..graph.halves import holds_float16
from ..graph.topology import all_nodes, holds_qdq, nested_graphs
from ..precision import FP16
from ..plan import ResolvedPlan, fusion_groups, load_plan, resolve_plan
from ..quantize import WriteOptions, WrittenModel, load_provenance

__all__ = ["REFERENCE_KEY", "Candidate", "check_candidates", "computes_in_float16", "float16_on_ort_warnings",
           "holds_float16", "load_candidate", "simulates_tensorrt"]

Candidate = WrittenModel | LoadedModel

REFERENCE_KEY = "\0reference"
"""The FP32 reference's key beside the candidates' names in one mapping (never a candidate's name)."""


def check_candidates(candidates: Mapping[str, Any]) -> None:
    """A CompareError naming the first candidate that is neither a WrittenModel nor a LoadedModel (a bare
    ModelProto had failed deep inside with "AttributeError: proto")."""
    for name, c in candidates.items():
        if not isinstance(c, (WrittenModel, LoadedModel)):
            raise CompareError(f"candidate {name!r} is a {type(c).__name__}; pass a LoadedModel "
                               "(quantlab.load_model(path), quantlab.graph.model_from_proto(proto)) or a WrittenModel "
                               "(quantlab.write_model, quantlab.compare.load_candidate(build folder))")


def computes_in_float16(candidate: Candidate) -> bool:
    """Whether ``candidate`` computes in float16 natively: a written model with FP16 groups not written for
    FP16 simulation, or any other model in which an op other than a Cast reads float16 values.

    ONNX Runtime's CPU provider runs most float16 ops in float32 (it inserts casts, then removes cast
    pairs), so such a model's activations are not rounded there: its figures do not measure FP16 accuracy.
    """
    if isinstance(candidate, WrittenModel):
        return not candidate.options.fp16_simulation and bool(candidate.plan.groups_at(FP16))
    return _computes_in_float16(candidate.proto)


def float16_on_ort_warnings(candidates: Mapping[str, Candidate]) -> list[str]:
    """What ONNX Runtime's figures of float16 candidates measure (its CPU provider computes most of them in
    float32)."""
    return [f"candidate {name!r} computes in float16, which ONNX Runtime's CPU provider runs mostly in float32 "
            "(activations not rounded, where float16 would round them): its figures do not measure FP16 "
            "accuracy (usually better, sometimes worse); build it with `quantlab build --fp16-simulation` to "
            "measure float16 rounding on ONNX Runtime"
            for name, c in candidates.items() if computes_in_float16(c)]


def simulates_tensorrt(candidates: Iterable[Candidate]) -> bool:
    """Whether every candidate holding Q/DQ (at least one) was written for TensorRT (by its provenance, or for a bare
    model by its Q/DQ, :func:`_in_tensorrt_form`): on ONNX Runtime they are then
    run with Q/DQ as written (``qdq_fusion=False``), the ONNX semantics TensorRT computes. ORT's fused integer
    kernels round differently and differ between CPUs (VNNI or not); they made a tf2onnx-style Lite0 read 4
    points of agreement lower than the same maths in NCHW, and a report's INT8 rows disagree with its search,
    which measures as written."""
    written = [c for c in candidates if holds_qdq(c.proto)]
    return bool(written) and all(c.options.target == "tensorrt" if isinstance(c, WrittenModel)
                                 else _in_tensorrt_form(c.proto) for c in written)


def _in_tensorrt_form(proto: onnx.ModelProto) -> bool:
    """A bare model's Q/DQ in the form TensorRT parses: every QuantizeLinear with an int8 zero point of 0 (no
    uint8 activations) and no DequantizeLinear of an int32 tensor (no int32 bias), inside bodies too."""
    inits = {i.name: i for g in nested_graphs(proto.graph) for i in g.initializer}
    for node in all_nodes(proto.graph):
        if node.op_type == "QuantizeLinear":
            zero = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if zero is None or zero.data_type != onnx.TensorProto.INT8 or numpy_helper.to_array(zero).any():
                return False
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in inits \
                and inits[node.input[0]].data_type == onnx.TensorProto.INT32:
            return False
    return True


def load_candidate(path: str | Path, reference: LoadedModel) -> Candidate:
    """A candidate from disk: a ``quantlab build`` folder (model.onnx + provenance.json) or an .onnx file.

    A folder (or its ``model.onnx``) becomes a :class:`WrittenModel` whose
    provenance enables per-layer comparison; any other .onnx file is a plain
    :class:`LoadedModel` (end to end only). Refuses a model.onnx that no
    longer matches its provenance (edited after the build), and a folder whose
    plan.json or recorded write options cannot be read (the error names the file).
    A folder without plan.json gets the provenance's group precisions.
    """
    p = Path(path)
    folder: Path | None = None
    if p.is_dir():
        folder = p
        if not (p / "model.onnx").is_file():
            raise CompareError(f"{p}: a candidate folder must hold model.onnx (as `quantlab build --out` writes)")
    elif p.name == "model.onnx" and (p.parent / "provenance.json").is_file():
        folder = p.parent
    if folder is None:
        if not p.is_file():
            raise CompareError(f"{p}: no such file or folder; give a `quantlab build` output folder or an .onnx file")
        return load_model(p)
    model_path = folder / "model.onnx"
    loaded = load_model(model_path)
    prov_path = folder / "provenance.json"
    if not prov_path.is_file():
        return loaded
    provenance = load_provenance(prov_path)
    meta = provenance.meta
    written_sha = meta.get("written_sha256")
    if written_sha and sha256_bytes(model_path.read_bytes()) != written_sha:
        raise CompareError(f"{model_path}: does not match {prov_path} (sha256 differs from the build's "
                           f"{str(written_sha)[:12]}): the model was changed after `quantlab build`. Rebuild it, "
                           "or pass the .onnx from another folder to compare it end to end only.")
    options = _write_options(meta.get("options", {}), prov_path)
    plan_path = folder / "plan.json"
    if plan_path.is_file():
        plan = _resolved_plan(plan_path, reference, str(meta.get("versions", {}).get("quantlab-source", "")),
                              str(meta.get("source_sha256", "")))
    else:  # a folder without plan.json: the precisions the provenance records, on the reference's groups
        plan = ResolvedPlan(groups=tuple(fusion_groups(reference.proto)), precision=dict(provenance.group_precision))
    return WrittenModel(proto=loaded.proto, provenance=provenance, plan=plan, options=options,
                        table_method=meta.get("table_method"), source_sha256=str(meta.get("source_sha256", "")))


_NOT_READ_BACK = ("quantize_outputs", "int32_bias", "bias_correction", "equalization", "smoothquant")


def _write_options(recorded: Any, prov_path: Path) -> WriteOptions:
    """The build's write options back from ``meta.options`` of its provenance.

    ``quantize_outputs`` / ``int32_bias`` are not read back (None: follow the target), so a build
    that overrode the target's choice reads back with the target's; ``activation_dtype`` and
    ``weight_qmax`` are derived, not options; ``bias_correction`` / ``equalization`` /
    ``smoothquant`` are records of what was measured and applied (in the provenance), not settings
    to apply again.
    """
    if not isinstance(recorded, Mapping):
        raise CompareError(f"{prov_path}: meta.options is a {type(recorded).__name__}, not a table of write "
                           "options; rebuild the candidate with `quantlab build`.")
    fields = {f.name for f in dataclasses.fields(WriteOptions)}
    try:
        return WriteOptions(**{k: (tuple(v) if k == "fp32_ops" else v) for k, v in recorded.items()
                               if k in fields and k not in _NOT_READ_BACK})
    except (QuantlabError, TypeError) as exc:
        raise CompareError(f"{prov_path}: the recorded write options (meta.options) are not valid: {exc}; "
                           "rebuild the candidate with `quantlab build`.") from None


def _resolved_plan(plan_path: Path, reference: LoadedModel, built_by: str = "", built_from: str = "") -> ResolvedPlan:
    """The build's effective plan on the reference's groups; a plan naming other nodes means another model
    (``built_from``: the sha256 of the model the build read, when recorded), or another quantlab (``built_by``:
    the build's quantlab-source), whose loading named or grouped the nodes otherwise."""
    plan = load_plan(plan_path)  # its errors name the file
    try:
        return resolve_plan(plan, reference.proto)
    except QuantlabError as exc:
        current = source_hash()
        if built_from and built_from != reference.sha256:
            why = (f"the candidate was built from another model (sha256 {built_from[:12]}, the reference's is "
                   f"{reference.sha256[:12]}; or with other --bind values): compare it with the FP32 model it was "
                   "built from")
        elif built_by and built_by != current:
            why = (f"the candidate was built by another quantlab (source {built_by}, this one is {current}), which "
                   "may name and group the model's nodes otherwise: rebuild it with this quantlab (quantlab build), "
                   "or compare the .onnx alone for end-to-end figures")
        else:
            why = ("the candidate was probably built from another model (compare it with the FP32 model it was "
                   "built from)")
        raise CompareError(f"{plan_path}: does not fit the reference {reference.label}; {why}. {exc}") from None
