"""How a written graph relates to the original one: :class:`Provenance`, saved as ``provenance.json``.

Naming rule (what the comparator relies on): every tensor of the original
graph keeps its name in the written graph and carries that tensor's value
(float32, or float16 inside fp16 regions; a graph output computed in float16
is cast back under its own name). Inserted nodes and tensors get derived
names (``x/q``, ``x/dq``, ``w/int8``, ``x/to_fp16``...). :class:`Provenance`
records the maps explicitly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..precision import GroupPrecision

__all__ = ["PROVENANCE_FORMAT", "Provenance", "load_provenance"]

PROVENANCE_FORMAT = "quantlab.provenance/1"


@dataclass(frozen=True)
class Provenance:
    """How the written graph relates to the original one.

    ``tensor_map``: original tensor -> written tensor carrying its value
    (identity for every activation and graph I/O; a weight replaced by an
    INT8 initializer maps to its DequantizeLinear output, a weight used only
    in float16 to its float16 copy). ``tensor_dtype``: original tensor -> dtype
    of that written tensor. ``node_map``: original node -> written nodes (the
    node itself first, then the Q/DQ/Cast nodes feeding it or casting its
    output). ``quantized_inputs``: original tensor -> the Q/DQ inserted on it
    (``scale``, ``zero_point``, ``dtype``, ``axis``, ``kind``
    activation/weight/bias, ``output`` the DQ output, ``consumers``; a
    tensor quantized twice with different scales, e.g. a concat input, lists
    the others under ``variants``). ``group_precision``: group -> precision
    (a :class:`quantlab.precision.GroupPrecision`, as ``ResolvedPlan.precision``);
    ``node_group``: original node -> its group. ``inserted_nodes``: written
    node -> kind. ``meta``: hashes, options, table and tool versions.
    ``body_precision``: group of a Loop/Scan/If -> what its bodies were written
    to compute in (``int8`` / ``fp16``; absent: as the source model had them),
    which its ``group_precision`` (the node's own, a fallback) does not say.
    """

    tensor_map: Mapping[str, str]
    tensor_dtype: Mapping[str, str]
    node_map: Mapping[str, tuple[str, ...]]
    quantized_inputs: Mapping[str, Mapping[str, Any]]
    group_precision: GroupPrecision
    node_group: Mapping[str, str] = field(default_factory=dict)
    inserted_nodes: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)
    body_precision: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.group_precision, GroupPrecision):  # a plain mapping is checked and converted
            object.__setattr__(self, "group_precision",
                               GroupPrecision(self.group_precision, where="provenance group_precision"))

    def quantized_activations(self) -> tuple[str, ...]:
        """The original tensors that got an activation Q/DQ (not a weight's or a bias's), in written order."""
        return tuple(t for t, q in self.quantized_inputs.items() if q.get("kind") == "activation")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROVENANCE_FORMAT,
            "tensor_map": dict(self.tensor_map),
            "tensor_dtype": dict(self.tensor_dtype),
            "node_map": {k: list(v) for k, v in self.node_map.items()},
            "quantized_inputs": {k: dict(v) for k, v in self.quantized_inputs.items()},
            "group_precision": self.group_precision.to_dict(),
            "node_group": dict(self.node_group),
            "inserted_nodes": dict(self.inserted_nodes),
            "notes": list(self.notes),
            "meta": dict(self.meta),
            **({"body_precision": dict(self.body_precision)} if self.body_precision else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Provenance:
        if data.get("format") != PROVENANCE_FORMAT:
            raise ModelError(f"not a quantlab provenance record (format {data.get('format')!r}, "
                             f"expected {PROVENANCE_FORMAT!r})")
        return cls(
            tensor_map=dict(data["tensor_map"]),
            tensor_dtype=dict(data["tensor_dtype"]),
            node_map={k: tuple(v) for k, v in data["node_map"].items()},
            quantized_inputs={k: dict(v) for k, v in data["quantized_inputs"].items()},
            group_precision=GroupPrecision(data["group_precision"], where="provenance group_precision"),
            node_group=dict(data.get("node_group", {})),
            inserted_nodes=dict(data.get("inserted_nodes", {})),
            notes=tuple(data.get("notes", ())),
            meta=dict(data.get("meta", {})),
            body_precision=dict(data.get("body_precision", {})),
        )


def load_provenance(path: str | os.PathLike[str]) -> Provenance:
    """Read ``provenance.json`` (as :func:`quantlab.quantize.save_written` writes it)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read provenance: {exc}") from None
    return Provenance.from_dict(data)
