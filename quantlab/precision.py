"""The precision of a fusion group: its type, its names, its defaults, and the per-group assignment.

Standard library only (and :mod:`quantlab.errors`, itself standard library
only), so the command line can offer the choices without loading ONNX.

    Precision           "int8" | "fp16" | "fp32"   (plain strings: files and tables hold them as is)
    INT8, FP16, FP32    the three names; code compares with these, never with string literals
    DEFAULT_PRECISION   a plan's default (int8)
    DEFAULT_FALLBACK    what a group that cannot be int8 gets (fp32)
    UNPLANNED           what a group a record does not name ran at: as in the FP32 model (fp32)
    GroupPrecision      group name -> Precision; the one per-group form, used by
                        ResolvedPlan.precision, Provenance.group_precision and
                        (as a plain JSON object) provenance.json
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final, Literal, get_args

from .errors import PlanError

__all__ = [
    "Precision",
    "PRECISIONS",
    "INT8",
    "FP16",
    "FP16_MAX",
    "FP16_TINY",
    "FP32",
    "DEFAULT_PRECISION",
    "DEFAULT_FALLBACK",
    "UNPLANNED",
    "check_precision",
    "GroupPrecision",
]

Precision = Literal["int8", "fp16", "fp32"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
INT8: Final = "int8"
FP16: Final = "fp16"
FP16_MAX: Final = 65504.0
"""float16's largest finite value."""
FP16_TINY: Final = 2.0**-24
"""float16's smallest (subnormal) value, 6e-8; a |x| of at most half of it is 0 in float16."""
FP32: Final = "fp32"
DEFAULT_PRECISION: Final[Precision] = INT8
"""A plan's ``default``: every group int8 unless the plan says otherwise."""
DEFAULT_FALLBACK: Final[Precision] = FP32
"""A plan's ``fallback``: what a group that cannot be int8 gets when int8 reaches it implicitly."""
UNPLANNED: Final[Precision] = FP32
"""The precision of a group an assignment does not name: it was written as in the FP32 model."""


def check_precision(value: Any, where: str) -> Precision:
    """``value`` if it is a precision, else a PlanError naming ``where`` and the choices."""
    if value not in PRECISIONS:
        raise PlanError(f"{where}: precision {value!r} is not one of {', '.join(PRECISIONS)}")
    return value  # type: ignore[no-any-return]


class GroupPrecision(Mapping[str, Precision]):
    """Fusion group name -> precision, read-only, in group order; every value checked.

    Compares equal to a plain ``dict`` with the same items; files hold it as a
    JSON object (:meth:`to_dict`).
    """

    def __init__(self, assignment: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), *,
                 where: str = "group precision") -> None:
        items = assignment.items() if isinstance(assignment, Mapping) else assignment
        self._data: dict[str, Precision] = {
            str(k): check_precision(v, f"{where}[{k!r}]") for k, v in items
        }

    def __getitem__(self, group: str) -> Precision:
        return self._data[group]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"GroupPrecision({self._data!r})"

    def of(self, group: str) -> Precision:
        """The precision ``group`` ran at; :data:`UNPLANNED` (fp32) for a group not named here."""
        return self._data.get(group, UNPLANNED)

    def groups_at(self, precision: Precision) -> list[str]:
        """Names of the groups at ``precision``, in order."""
        return [g for g, p in self._data.items() if p == precision]

    def counts(self) -> dict[str, int]:
        """Groups per precision, every precision listed (int8, fp16, fp32)."""
        return {p: sum(v == p for v in self._data.values()) for p in PRECISIONS}

    def digest(self) -> str:
        """sha256 of the assignment (sorted ``[group, precision]`` pairs as compact JSON)."""
        payload = json.dumps(sorted(self._data.items()), separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()

    def replace(self, changes: Mapping[str, Precision], *, where: str = "group precision") -> GroupPrecision:
        """A copy with ``changes`` (group -> precision) applied."""
        return GroupPrecision({**self._data, **changes}, where=where)

    def to_dict(self) -> dict[str, Precision]:
        return dict(self._data)
