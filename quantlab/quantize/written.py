"""A written model and its files: :class:`WrittenModel`, :func:`save_written`.

    out_dir/
      model.onnx        the written model
      provenance.json   original -> written names, Q/DQ parameters, group precisions, hashes
      plan.json         the effective plan: an override per group, reproduces the assignment
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..atomic import write_bytes, write_json
from ..fingerprint import sha256_bytes
from ..graph import serialize
from ..plan import ResolvedPlan, save_plan
from .options import WriteOptions
from .provenance import Provenance

__all__ = ["WrittenModel", "save_written"]


@dataclass(frozen=True)
class WrittenModel:
    """A written model with everything needed to reproduce and align it."""

    proto: onnx.ModelProto = field(repr=False)
    provenance: Provenance = field(repr=False)
    plan: ResolvedPlan = field(repr=False)
    options: WriteOptions
    table_method: str | None
    source_sha256: str

    @property
    def sha256(self) -> str:
        """The written model's hash: the one :func:`write_model` recorded (serializing a large model again costs
        a tenth of a second), else computed."""
        recorded = self.provenance.meta.get("written_sha256")
        return str(recorded) if recorded else sha256_bytes(serialize(self.proto))


def save_written(written: WrittenModel, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``model.onnx``, ``provenance.json`` and ``plan.json`` (the effective plan), each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "model": write_bytes(out / "model.onnx", serialize(written.proto)),
        "provenance": write_json(out / "provenance.json", written.provenance.to_dict()),
    }
    paths["plan"] = save_plan(written.plan.to_plan(), out / "plan.json", groups=written.plan.groups)
    return paths
