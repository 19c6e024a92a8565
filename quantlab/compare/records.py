"""The record of a comparison beside its tables (``compare.json``): data, models, environment,
and the warnings about the data itself (overlap with calibration, role, duplicates)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..backends import Backend
from ..data import DataSet, DataSummary, beyond_calibration, overlap
from ..fingerprint import tool_versions
from ..graph import LoadedModel
from ..quantize import WrittenModel
from ..sequence import TEACHER_FORCING_NOTE, SequenceData
from .candidates import Candidate

__all__ = ["data_record", "data_warnings", "models_record", "environment_record"]


def data_warnings(summary: DataSummary, calibration: DataSummary | None, dataset: DataSet) -> list[str]:
    """Warnings that the validation data overlaps calibration, goes beyond its sizes or values, is a calibration
    set, or repeats samples; in sequence mode, that the figures are one step's (teacher forcing)."""
    warnings: list[str] = []
    if calibration is not None:
        shared = overlap(summary, calibration)
        if shared:
            warnings.append(f"the validation set shares {shared} sample(s) (same content hash) with the "
                            "calibration set: accuracy on those is optimistic; use disjoint sets")
        warnings.extend(beyond_calibration(summary, calibration))
    if getattr(dataset, "role", "validation") == "calibration":
        warnings.append(f"data set {getattr(dataset, 'name', '')!r} is a calibration set (role = \"calibration\", "
                        "the default when its manifest gives no role); compare on a validation set (role = "
                        "\"validation\" in its manifest), disjoint from calibration")
    if summary.duplicates:
        warnings.append(f"{len(summary.duplicates)} validation sample(s) repeat an earlier one (e.g. "
                        f"{summary.duplicates[0][0]!r} = {summary.duplicates[0][1]!r}); they count twice")
    if isinstance(dataset, SequenceData):
        warnings.append(TEACHER_FORCING_NOTE)
    return warnings


def data_record(dataset: DataSet, summary: DataSummary, max_samples: int | None, use_labels: bool) -> dict[str, Any]:
    try:
        manifest = dataset.manifest_record()
    except (NotImplementedError, AttributeError):
        manifest = {"name": getattr(dataset, "name", None)}
    doc = summary.as_dict()
    doc.pop("sample_hashes", None)
    doc["duplicates"] = len(summary.duplicates)
    return {
        "manifest": manifest, "name": getattr(dataset, "name", None),
        "role": getattr(dataset, "role", None), "count": summary.count, "sha256": summary.sha256,
        "available": len(dataset), "max_samples": max_samples,
        "labels": bool(use_labels), "summary": doc,
    }


def models_record(reference: LoadedModel, candidates: Mapping[str, Candidate]) -> dict[str, Any]:
    out: dict[str, Any] = {"reference": {"sha256": reference.sha256,
                                         "path": str(reference.path) if reference.path else None,
                                         "opset": reference.opset}}
    cands: dict[str, Any] = {}
    for name, cand in candidates.items():
        if isinstance(cand, WrittenModel):
            meta = dict(cand.provenance.meta)
            cands[name] = {
                "kind": "written", "sha256": cand.sha256, "source_sha256": cand.source_sha256,
                "plan_hash": cand.plan.plan_hash(), "int8_fraction": cand.plan.int8_fraction(),
                "group_counts": cand.plan.counts(), "table_method": cand.table_method,
                "options": cand.options.as_dict(), "source": meta.get("source"),
                "table_model_sha256": meta.get("table_model_sha256"),
            }
        else:
            cands[name] = {"kind": "onnx", "sha256": cand.sha256, "path": str(cand.path) if cand.path else None}
    out["candidates"] = cands
    return out


def environment_record(backend: Backend, own: Mapping[str, Backend] | None = None) -> dict[str, Any]:
    """Versions and the backend; ``candidate_backends``: the candidates run on another one (its description)."""
    record = {"versions": tool_versions(), "backend": backend.describe().as_dict()}
    if own:
        record["candidate_backends"] = {name: b.describe().as_dict() for name, b in own.items()}
    return record
