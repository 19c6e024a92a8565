"""The entry point: :func:`write_model` checks its inputs, places the Q/DQ, writes, and checks the result."""

from __future__ import annotations

import dataclasses

from collections.abc import Mapping

import onnx
from onnx import helper

from ..errors import ModelError, PlanError
from ..fingerprint import sha256_bytes, tool_versions
from ..graph import LoadedModel, check_float32, check_not_quantized, serialize, tensor_specs
from ..graph.light import check_light, infer_light
from ..plan import PrecisionPlan, ResolvedPlan, fusion_groups, resolve_plan
from ..table import CalibrationTable
from .bias_correction import apply_bias_correction, bias_correction_record
from .options import WriteOptions
from .placement import Placement
from .prepare import PreparedModel, check_prepared_table, prepare_model, prepared_plan
from .tensors import ONNX_DTYPE
from .writer import Writer
from .written import WrittenModel

__all__ = ["write_model"]


def _same_groups(plan: ResolvedPlan, model: LoadedModel) -> None:
    groups = fusion_groups(model.proto)
    mine = [(g.name, g.nodes) for g in groups]
    theirs = [(g.name, g.nodes) for g in plan.groups]
    if mine != theirs:
        missing = sorted({g for g, _ in theirs} - {g for g, _ in mine})
        raise PlanError(
            f"the resolved plan was made for another model: its fusion groups differ from "
            f"{model.label}'s" + (f" (groups not in this model: {', '.join(missing[:5])})" if missing else "")
            + ". Resolve the plan against this model (quantlab.plan.resolve_plan)."
        )


def _original_plan(plan: PrecisionPlan, model: LoadedModel, prepared: PreparedModel) -> PrecisionPlan:
    """``plan`` without the overrides that name nodes only a float rewrite added (a plan saved by a search of
    the rewritten model: ``relu6/equalized_max``); the rewrite's nodes then follow the group feeding them
    (:func:`prepared_plan`). Names in neither model stay, for resolve_plan's error."""
    if not prepared.changed:
        return plan
    original = {n.name for n in model.proto.graph.node}
    added = {n.name for n in prepared.model.proto.graph.node} - original
    dropped = [k for k in plan.overrides if k in added]
    if not dropped:
        return plan
    return dataclasses.replace(plan, overrides={k: v for k, v in plan.overrides.items() if k not in dropped})


def write_model(
    model: LoadedModel,
    plan: PrecisionPlan | ResolvedPlan,
    table: CalibrationTable | None,
    options: WriteOptions = WriteOptions(),
) -> WrittenModel:
    """Write the INT8 / FP16 / FP32 / mixed model ``plan`` asks for (see the module docstring).

    Raises PlanError for a plan that does not fit the model, CalibrationError
    for a table of another model, a missing range, or a range holding huge
    sentinels, ModelError for a model that already holds Q/DQ nodes.

    With ``options.equalization`` / ``options.smoothquant`` the model is rewritten first
    (:func:`quantlab.quantize.prepare_model`): ``table`` must be the rewritten model's, the
    plan names the original model's groups, and the provenance records both hashes.
    """
    check_not_quantized(model)
    check_float32(model)
    source = model
    prepared = prepare_model(model, options)
    resolved = plan if isinstance(plan, ResolvedPlan) else resolve_plan(_original_plan(plan, model, prepared),
                                                                         model.proto)
    if isinstance(plan, ResolvedPlan):
        _same_groups(resolved, model)
    if table is not None:
        check_prepared_table(table, source, prepared)
    model, work_plan = prepared.model, prepared_plan(resolved, prepared)
    applied: list[str] = []
    if options.bias_correction is not None:
        model, applied = apply_bias_correction(model, work_plan, options.bias_correction, options)
    placement = Placement(model, work_plan, table, options)
    placement.run()
    writer = Writer(model, work_plan, placement, options)
    try:
        out = _finish(writer.run(), writer.book.written_dtype, model.label, options.check)
    except ModelError as exc:  # a body written in float16 or INT8 that does not fit its graph: write it as it was
        if not writer.fp16_bodies and not writer.int8_bodies:
            raise
        writer = Writer(model, work_plan, placement, options, rewrite_bodies=False)
        out = _finish(writer.run(), writer.book.written_dtype, model.label, options.check)
        writer.notes.append(f"control-flow bodies stay float32: the model with float16 or INT8 bodies failed its "
                            f"check ({exc}); please report it")
    meta = {
        "source_sha256": source.sha256,
        "source": str(model.path) if model.path else None,
        "written_sha256": sha256_bytes(serialize(out)),
        "plan_hash": resolved.plan_hash(),
        "int8_fraction": resolved.int8_fraction(),
        "group_counts": resolved.counts(),
        "options": options.as_dict(),
        "table_method": table.method if table is not None else None,
        "table_model_sha256": table.model_sha256 if table is not None else None,
        "table_settings": dict(table.settings) if table is not None else None,
        "versions": tool_versions(),
        "bias_correction": bias_correction_record(options.bias_correction, applied),
        "prepared": prepared.record(),
    }
    return WrittenModel(
        proto=out,
        provenance=writer.provenance(meta),
        plan=resolved,
        options=options,
        table_method=table.method if table is not None else None,
        source_sha256=source.sha256,
    )


def _finish(proto: onnx.ModelProto, written_dtype: Mapping[str, str], label: str, check: bool) -> onnx.ModelProto:
    """Checker, then shape inference (both on the weightless copy, quantlab.graph.light); its dtypes must agree
    with the ones the writer tracked.

    The result carries ``value_info`` for every tensor (inferred shapes, the
    written dtypes), so exposing an intermediate tensor as an output (for
    statistics or per-layer comparison) gets the right type.
    """
    if check:
        try:
            check_light(proto)
        except Exception as exc:  # noqa: BLE001 - the checker raises several types
            raise ModelError(f"internal error: the model written from {label} fails the ONNX checker: {exc}") from None
    try:
        inferred = infer_light(proto, strict_mode=False)
    except Exception as exc:  # noqa: BLE001 - inference raises several types
        if check:
            raise ModelError(f"internal error: shape inference fails on the model written from {label}: {exc}") from None
        inferred = proto
    specs = tensor_specs(inferred)
    for tensor, spec in specs.items():
        want = written_dtype.get(tensor)
        if want in ONNX_DTYPE and spec.dtype in ONNX_DTYPE and spec.dtype != want:
            raise ModelError(f"internal error: written tensor {tensor!r} is {spec.dtype}, expected {want}")
    io = {i.name for i in inferred.graph.input} | {o.name for o in inferred.graph.output}
    for tensor, dtype in written_dtype.items():
        if dtype in ONNX_DTYPE and tensor not in io and (tensor not in specs or specs[tensor].dtype == "undefined"):
            inferred.graph.value_info.append(helper.make_tensor_value_info(tensor, ONNX_DTYPE[dtype], None))
    return inferred
