"""One measured plan (:class:`Evaluation`), its cache key, and what measures plans (:class:`Evaluator`)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from ..plan import ResolvedPlan


@dataclass(frozen=True)
class Evaluation:
    """One plan measured on the first ``samples`` samples of the validation set.

    ``rows``: the comparator's end-to-end rows (one per model output) as plain dicts, what
    the threshold is checked on. ``local``: group -> lowest local SQNR (dB) of its layers,
    only for the ranking evaluation. ``latency_ms``: mean latency of one batch (NaN when
    not measured). ``comparison``: the full CompareResult when in memory (not logged).
    ``indices`` / ``margins``: a margin measurement (:mod:`.margins`) on these validation
    samples, not the first ``samples``; ``flipped``: a full validation's samples whose top-1
    class differs from the FP32 model's (None: not a classifier, or not recorded).
    """

    plan_hash: str
    samples: int
    rows: tuple[Mapping[str, Any], ...]
    local: Mapping[str, float] | None = None
    latency_ms: float = math.nan
    seconds: float = 0.0
    comparison: Any = field(default=None, compare=False, repr=False)
    indices: tuple[int, ...] | None = None
    margins: tuple[float, ...] | None = None
    flipped: tuple[int, ...] | None = None

    @property
    def key(self) -> str:
        return evaluation_key(self.plan_hash, self.samples, self.indices)

    def to_record(self) -> dict[str, Any]:
        record = {"plan_hash": self.plan_hash, "samples": self.samples, "rows": [dict(r) for r in self.rows],
                  "local": None if self.local is None else dict(self.local), "latency_ms": self.latency_ms,
                  "seconds": self.seconds}
        for name in ("indices", "margins", "flipped"):
            if getattr(self, name) is not None:
                record[name] = list(getattr(self, name))
        return record

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Evaluation:
        local = data.get("local")
        return cls(plan_hash=str(data["plan_hash"]), samples=int(data["samples"]),
                   rows=tuple(dict(r) for r in data["rows"]),
                   local=None if local is None else {str(k): float(v) for k, v in local.items()},
                   latency_ms=float(data.get("latency_ms", math.nan)), seconds=float(data.get("seconds", 0.0)),
                   indices=_ints(data.get("indices")), flipped=_ints(data.get("flipped")),
                   margins=None if data.get("margins") is None else tuple(float(m) for m in data["margins"]))


def _ints(values: Sequence[Any] | None) -> tuple[int, ...] | None:
    return None if values is None else tuple(int(v) for v in values)


def evaluation_key(plan_hash: str, samples: int, indices: Sequence[int] | None = None) -> str:
    """The cache key of an evaluation: the plan and how many samples it saw (and which, for a
    margin measurement on chosen samples)."""
    if indices is None:
        return f"{plan_hash}@{samples}"
    digest = hashlib.sha256(",".join(str(int(i)) for i in indices).encode()).hexdigest()[:12]
    return f"{plan_hash}@{samples}:{digest}"


class Evaluator(Protocol):
    """What the search needs to measure a plan; :class:`CompareEvaluator` is the real one.

    ``size``: samples in the validation set (a full validation uses all of them).
    ``evaluate(plan, samples, local=...)``: the plan's end-to-end rows on the first
    ``samples`` samples; with ``local`` also each group's local SQNR.
    ``latency(plan)``: mean milliseconds of one batch of the plan's deployable model.
    """

    @property
    def size(self) -> int: ...

    def evaluate(self, plan: ResolvedPlan, samples: int, *, local: bool = False) -> Evaluation: ...

    def latency(self, plan: ResolvedPlan) -> float: ...


def plain_value(v: Any) -> Any:
    """A comparator table's cell as a plain JSON value (numpy scalars unwrapped, NA -> None)."""
    if isinstance(v, np.generic):
        return v.item()
    if v is pd.NA:
        return None
    return v

