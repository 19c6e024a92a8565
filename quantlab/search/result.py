"""The outcome of :func:`quantlab.search.search` (:class:`SearchResult`) and how it is saved."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..atomic import atomic_path, write_json
from ..compare import CompareResult
from ..graph.topology import CONTROL_FLOW_OPS
from ..plan import ResolvedPlan, save_plan
from ..quantize import BIAS_CORRECTION_FILE, BiasCorrection, WrittenModel, save_bias_correction, save_written
from .evaluation import plain_value

RESULT_FORMAT = "quantlab.search/1"


@dataclass(frozen=True)
class SearchResult:
    """What :func:`quantlab.search.search` found: the plan, its final model and comparison, how it got there."""

    met: bool
    plan: ResolvedPlan
    final: WrittenModel
    comparison: CompareResult
    trajectory: pd.DataFrame
    sensitivity: pd.DataFrame
    evaluations: int                          # full validations used
    bound: int                                # ceil(log2 G) + 5
    message: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    budget: int = 0
    executed: int = 0                         # evaluations run by this call (the rest came from the log)
    seconds: float = 0.0
    correction: BiasCorrection | None = None  # the bias correction every INT8 layer of ``final`` got

    def to_dict(self) -> dict[str, Any]:
        counts = self.plan.counts()
        pins = {g.name: self.plan.precision[g.name] for g in self.plan.groups
                if (g.quantizable and self.plan.precision[g.name] != "int8")
                or (g.anchor_op in CONTROL_FLOW_OPS and self.plan.reasons.get(g.name) == "pin")}  # an INT8 body pinned
        final_row = self.trajectory.iloc[-1].to_dict() if len(self.trajectory) else {}
        check = None
        try:
            checks = self.comparison.check(str(self.settings.get("threshold", "")))
            check = next(iter(checks.values())).as_dict() if checks else None
        except Exception:  # noqa: BLE001 - the record must be writable even when the check is not
            check = None
        return {
            "format": RESULT_FORMAT,
            "met": self.met,
            "message": self.message,
            "notes": list(self.notes),
            "threshold": self.settings.get("threshold"),
            "plan_hash": self.plan.plan_hash(),
            "int8_fraction": self.plan.int8_fraction(),
            "group_counts": counts,
            "quantizable_groups": sum(g.quantizable for g in self.plan.groups),
            "pinned": pins,
            "final": {k: plain_value(final_row.get(k)) for k in ("metric", "value", "ci_low", "ci_high",
                                                                  "margin", "latency_ms", "samples")},
            "check": check,
            "evaluations": self.evaluations,
            "bound": self.bound,
            "budget": self.budget,
            "executed": self.executed,
            "seconds": round(self.seconds, 3),
            "model_sha256": self.final.source_sha256,
            "final_model_sha256": self.final.sha256,
            "settings": dict(self.settings),
            "trajectory": [{k: plain_value(v) for k, v in r.items()} for r in self.trajectory.to_dict("records")],
            "sensitivity": [{k: plain_value(v) for k, v in r.items()} for r in self.sensitivity.to_dict("records")],
        }

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """plan.json / plan.toml, final/ (model, provenance, plan), trajectory and sensitivity
        (.csv, .parquet), final_compare/ (the comparator's result) and search.json."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        description = f"quantlab search for {self.settings.get('threshold', '')!r}: {self.message}"
        if self.correction is not None:  # the plan alone does not rebuild final/: say what else it needs
            description += (f"; its INT8 layers carry bias correction: build with --bias-correction "
                            f"{BIAS_CORRECTION_FILE}")
        plan = self.plan.to_plan(description)
        paths = {
            "plan": save_plan(plan, out / "plan.json", groups=self.plan.groups),
            "plan_toml": save_plan(plan, out / "plan.toml", groups=self.plan.groups),
        }
        if self.correction is not None:
            paths["bias_correction"] = save_bias_correction(self.correction, out / BIAS_CORRECTION_FILE)
        paths.update({f"final_{k}": v for k, v in save_written(self.final, out / "final").items()})
        for name, frame in (("trajectory", self.trajectory), ("sensitivity", self.sensitivity)):
            with atomic_path(out / f"{name}.csv") as tmp:
                frame.to_csv(tmp, index=False)
            paths[name] = out / f"{name}.csv"
            with atomic_path(out / f"{name}.parquet") as tmp:
                frame.to_parquet(tmp, index=False)
            paths[f"{name}_parquet"] = out / f"{name}.parquet"
        if self.comparison is not None:
            self.comparison.save(out / "final_compare")
            paths["final_compare"] = out / "final_compare"
        paths["search"] = write_json(out / "search.json", self.to_dict())
        return paths

