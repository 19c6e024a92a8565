"""Candidates: what compare() takes (:data:`Candidate`) and :func:`load_candidate` (one from disk).

A ``quantlab build --out`` folder reads back as the :class:`WrittenModel` it was::

    build/int8/
      model.onnx         the written model              -> WrittenModel.proto
      provenance.json    node/tensor maps, build meta   -> .provenance, .options (meta["options"])
      plan.json          the effective plan             -> .plan (resolved on the reference)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import CompareError, QuantlabError
from ..fingerprint import sha256_bytes
from ..graph import LoadedModel, load_model
from ..plan import ResolvedPlan, fusion_groups, load_plan, resolve_plan
from ..quantize import WriteOptions, WrittenModel, load_provenance

__all__ = ["Candidate", "load_candidate"]

Candidate = WrittenModel | LoadedModel


def load_candidate(path: str | Path, reference: LoadedModel) -> Candidate:
    """A candidate from disk: a ``quantlab build`` folder (model.onnx + provenance.json) or an .onnx file.

    A folder (or its ``model.onnx``) becomes a :class:`WrittenModel` whose
    provenance enables per-layer comparison; any other .onnx file is a plain
    :class:`LoadedModel` (end to end only). Refuses a model.onnx that no
    longer matches its provenance (edited after the build).
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
    opts = dict(meta.get("options", {}))
    fields = {f.name for f in dataclasses.fields(WriteOptions)}
    try:
        options = WriteOptions(**{k: (tuple(v) if k == "fp32_ops" else v) for k, v in opts.items()
                                  if k in fields and k not in ("quantize_outputs", "int32_bias")})
    except QuantlabError:
        options = WriteOptions()
    plan_path = folder / "plan.json"
    try:
        plan = resolve_plan(load_plan(plan_path), reference.proto) if plan_path.is_file() else None
    except QuantlabError:
        plan = None
    if plan is None:
        plan = ResolvedPlan(groups=tuple(fusion_groups(reference.proto)), precision=dict(provenance.group_precision))
    return WrittenModel(proto=loaded.proto, provenance=provenance, plan=plan, options=options,
                        table_method=meta.get("table_method"), source_sha256=str(meta.get("source_sha256", "")))
