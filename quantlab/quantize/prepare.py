"""The float rewrites that come before calibration: equalization, then SmoothQuant (:func:`prepare_model`).

Both change which ranges the tensors have, so the order of a run is fixed::

    FP32 model --equalize_model--> --apply_smoothquant--> prepared FP32 model (same outputs, new hash)
                                                              |
                         calibrate the prepared model ---> table (model_sha256 = the prepared hash)
                                                              |
    write_model(FP32 model, plan, table, WriteOptions(equalization=..., smoothquant=...))
        prepares again (deterministic), checks the table is the prepared model's, writes it

The written model's provenance keeps the original model's hash as its source and records each
rewrite with the hash of the model it produced. Plans name the original model's fusion groups;
the groups a rewrite adds (the Min of a split Clip, the Mul of SmoothQuant) take the precision
of the group feeding them, float32 when that one is INT8 (the INT8 group's output is float).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..data import DataSet
from ..errors import CalibrationError, QuantlabError
from ..graph import LoadedModel
from ..plan import ResolvedPlan, fusion_groups
from ..precision import FP32, INT8, GroupPrecision
from ..table import CalibrationTable, check_table_fits
from .equalization import Equalization, EqualizedModel, equalize_model
from .options import WriteOptions
from .smoothquant import SmoothQuant, apply_smoothquant, measure_smoothquant

__all__ = ["PreparedModel", "prepare_model", "prepare_rewrites", "prepared_plan", "check_prepared_table",
           "mark_table"]


@dataclass(frozen=True)
class PreparedModel:
    """The model to calibrate and write, and the rewrites that made it (None: not asked)."""

    model: LoadedModel
    source_sha256: str
    equalized: EqualizedModel | None
    smoothquant: dict[str, Any] | None
    equalization: Equalization | None = None
    smooth: SmoothQuant | None = None

    def write_options(self, **kwargs: Any) -> WriteOptions:
        """WriteOptions that redo these rewrites (``kwargs``: the other options)."""
        return WriteOptions(equalization=self.equalization, smoothquant=self.smooth, **kwargs)

    @property
    def changed(self) -> bool:
        return self.model.sha256 != self.source_sha256

    def record(self) -> dict[str, Any] | None:
        """What provenance, tables and reports say (None when no rewrite was asked)."""
        if self.equalized is None and self.smoothquant is None:
            return None
        return {"equalization": self.equalized.record() if self.equalized is not None else None,
                "smoothquant": self.smoothquant, "prepared_sha256": self.model.sha256,
                "source_sha256": self.source_sha256}


def prepare_model(model: LoadedModel, options: WriteOptions) -> PreparedModel:
    """``model`` with the options' equalization and SmoothQuant applied, in that order (module docstring)."""
    equalized = None
    current = model
    if options.equalization is not None:
        equalized = equalize_model(model, options.equalization)
        current = equalized.model
    smooth = None
    if options.smoothquant is not None:
        current = apply_smoothquant(current, options.smoothquant)
        smooth = {**options.smoothquant.describe(), "smoothed_sha256": current.sha256}
    return PreparedModel(current, model.sha256, equalized, smooth, options.equalization, options.smoothquant)


def prepare_rewrites(model: LoadedModel, dataset: DataSet | None, *, equalize: bool = False,
                     smoothquant_alpha: float | None = None, batch_size: int = 8) -> PreparedModel:
    """Equalize (data-free), then measure SmoothQuant's scales on ``dataset`` and apply them: the model to calibrate.

    What ``quantlab calibrate --equalize --smoothquant ALPHA`` does before its statistics pass.
    """
    equalization = Equalization() if equalize else None
    if smoothquant_alpha is None:
        return prepare_model(model, WriteOptions(equalization=equalization))
    if dataset is None:
        raise QuantlabError("SmoothQuant measures per-channel activation maxima: it needs the calibration set "
                            "(--calib), not merged statistics")
    equalized = prepare_model(model, WriteOptions(equalization=equalization))
    smooth = measure_smoothquant(equalized.model, dataset, smoothquant_alpha, batch_size=batch_size)
    return prepare_model(model, WriteOptions(equalization=equalization, smoothquant=smooth))


def mark_table(table: CalibrationTable, prepared: PreparedModel) -> CalibrationTable:
    """``table`` with the rewrites it was calibrated after in its settings (``settings["prepared"]``)."""
    record = prepared.record()
    if record is None:
        return table
    return dataclasses.replace(table, settings={**table.settings, "prepared": record})


def prepared_plan(plan: ResolvedPlan, prepared: PreparedModel) -> ResolvedPlan:
    """``plan`` (made for the original model) carried over to the prepared model's fusion groups."""
    if not prepared.changed:
        return plan
    groups = fusion_groups(prepared.model.proto)
    by_node = {n: g.name for g in plan.groups for n in g.nodes}
    producer = {o: n.name for n in prepared.model.proto.graph.node for o in n.output}
    precision = {}
    for g in groups:
        if g.name in plan.precision:
            precision[g.name] = plan.precision[g.name]
            continue
        feeding = [by_node.get(producer.get(t, ""), "") for t in g.input_tensors]
        known = [plan.precision[f] for f in feeding if f in plan.precision]
        precision[g.name] = FP32 if not known or known[0] == INT8 else known[0]
    reasons = {**plan.reasons, **{g.name: "prepared (added by a rewrite)" for g in groups if g.name not in plan.precision}}
    return ResolvedPlan(groups=tuple(groups), precision=GroupPrecision(precision), reasons=reasons,
                        default=plan.default, fallback=plan.fallback)


def check_prepared_table(table: CalibrationTable, model: LoadedModel, prepared: PreparedModel) -> None:
    """CalibrationError unless ``table`` was calibrated on the prepared model, saying which flag is missing."""
    if not table.model_sha256 or table.model_sha256 == prepared.model.sha256:
        check_table_fits(table, prepared.model)
        return
    recorded = (table.settings or {}).get("prepared")
    if table.model_sha256 == model.sha256 and prepared.changed:
        raise CalibrationError(
            f"the calibration table ({table.method}) was made for {model.label} as it is, but the write options "
            "rewrite it first (equalization / SmoothQuant), which changes its ranges: calibrate the rewritten model "
            "(quantlab calibrate ... --equalize / --smoothquant ALPHA, the same flags as here) and use that table")
    if recorded:
        raise CalibrationError(
            f"the calibration table ({table.method}) was made for {model.label} rewritten with {_flags(recorded)}, "
            f"but this model is written {'with other rewrites' if prepared.changed else 'without them'}: "
            "give the same --equalize / --smoothquant as at calibration")
    if prepared.changed:
        raise CalibrationError(
            f"the calibration table ({table.method}) was made for the model with sha256 {table.model_sha256[:12]}..., "
            f"not for {model.label} rewritten with these write options (sha256 {prepared.model.sha256[:12]}...): "
            "calibrate the model with the same --equalize / --smoothquant settings and use that table")
    check_table_fits(table, prepared.model)


def _flags(recorded: Any) -> str:
    parts = []
    if isinstance(recorded, dict):
        if recorded.get("equalization"):
            parts.append(f"--equalize (clip {recorded['equalization'].get('clip')})")
        if recorded.get("smoothquant"):
            parts.append(f"--smoothquant (alpha {recorded['smoothquant'].get('alpha')})")
    return " and ".join(parts) or "rewrites"
