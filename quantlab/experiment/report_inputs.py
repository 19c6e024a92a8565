"""From results already on disk to :class:`quantlab.report.ReportInputs` (nothing is re-run)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..compare.mask_examples import MaskExample, load_mask_examples
from ..errors import ExperimentError
from ..graph import LoadedModel
from ..plan import FusionGroup
from ..precision import INT8
from ..quantize import WrittenModel
from ..report import WORST_LAYERS_SHOWN, HistogramView, ReportInputs, Verdict, worst_layers
from ..report.samples import changed_samples
from ..search import impact_notes
from ..stats import load_statistics
from ..table import CalibrationTable, bodies_frame
from .spec import ExperimentConfig
from .stages import (SEARCH_CANDIDATE, experiment_candidates, int8_bodies, load_frames, load_written, read_json,
                     search_end_to_end)
from .store import StageRecord, package_versions

__all__ = ["HISTOGRAM_BINS_SHOWN", "histogram_view", "disagreeing_tensors", "per_layer_for_report",
           "assemble_report_inputs", "with_input_sqnr"]

HISTOGRAM_BINS_SHOWN = 120


def histogram_view(name: str, state: Any, tables: Mapping[str, CalibrationTable]) -> HistogramView:
    """A :class:`quantlab.report.HistogramView` of one tensor's |x| histogram and each table's amax.

    The statistics hold 16k fine bins over ``[0, R)``; the view re-bins them to
    :data:`HISTOGRAM_BINS_SHOWN` bins over ``[0, 1.05 * max(absmax, every amax)]``.
    """
    amaxes = {m: float(t.ranges[name].amax) for m, t in tables.items() if name in t.ranges}
    top = max([state.absmax, *amaxes.values()]) * 1.05 or 1.0
    counts = state.rebin_to(HISTOGRAM_BINS_SHOWN, top)
    edges = [top * i / HISTOGRAM_BINS_SHOWN for i in range(HISTOGRAM_BINS_SHOWN + 1)]
    note_parts = []
    excluded = sum(state.excluded.values())
    if excluded:
        note_parts.append(f"{excluded} non-finite or huge values left out of the statistics")
    return HistogramView(
        tensor=name, edges=tuple(edges), counts=tuple(float(c) for c in counts),
        ranges={m: (-a, a) for m, a in amaxes.items()},
        clipped={m: float(tables[m].ranges[name].clipped_fraction) for m in amaxes},
        zeroed={m: float(tables[m].ranges[name].zeroed_fraction) for m in amaxes},
        sqnr_db={m: float(tables[m].ranges[name].predicted_sqnr_db) for m in amaxes},
        abs_values=True, note="; ".join(note_parts),
    )


def disagreeing_tensors(tables: Mapping[str, CalibrationTable], n: int) -> list[str]:
    """Tensors whose calibrators disagree most (largest max/min amax ratio): where the choice matters."""
    names = set.intersection(*(set(t.ranges) for t in tables.values())) if tables else set()
    scored = []
    for name in names:
        amaxes = [t.ranges[name].amax for t in tables.values()]
        lo, hi = min(amaxes), max(amaxes)
        if lo > 0:
            scored.append((math.log(hi / lo), name))
    scored.sort(key=lambda x: (-x[0], x[1]))
    return [name for _, name in scored[:n]]


def per_layer_for_report(per_layer: pd.DataFrame, metric: str = "sqnr_db") -> pd.DataFrame:
    """The comparator's per-layer table in the report's shape (:data:`quantlab.report.PER_LAYER_COLUMNS`).

    Accepts a long table (a ``mode`` column with ``accumulated`` / ``local``
    rows) or a wide one (``<metric>_accumulated`` and ``<metric>_local``
    columns); the layer is the node (or tensor) name, the order the
    topological index.
    """
    df = per_layer.copy()
    layer_col = next((c for c in ("layer", "node", "group", "tensor") if c in df.columns), None)
    order_col = next((c for c in ("order", "topo_index", "index", "position") if c in df.columns), None)
    if layer_col is None or "candidate" not in df.columns:
        raise ExperimentError("the per-layer results have no layer/node and candidate columns")
    out = (_from_long(df, metric, layer_col, order_col) if "mode" in df.columns
           else _from_wide(df, metric, layer_col, order_col))
    if order_col and order_col in out.columns and order_col != "order":
        out = out.rename(columns={order_col: "order"})
    if "order" not in out.columns:
        out["order"] = out.groupby("candidate").cumcount()
    if "op_type" not in out.columns:
        out["op_type"] = ""
    for c in ("accumulated", "local"):
        if c not in out.columns:
            out[c] = float("nan")
    cols = ["candidate", "order", "layer", "op_type", "accumulated", "local"]
    rest = [c for c in out.columns if c not in cols]
    return out[cols + rest].sort_values(["candidate", "order"], kind="stable").reset_index(drop=True)


def _from_long(df: pd.DataFrame, metric: str, layer_col: str, order_col: str | None) -> pd.DataFrame:
    keys = ["candidate", layer_col]
    wide = df.pivot_table(index=keys, columns="mode", values=metric, aggfunc="first").reset_index()
    firsts = df.drop_duplicates(keys).set_index(keys)
    out = wide.rename(columns={layer_col: "layer"})
    extra = firsts[[c for c in (order_col, "op_type", "tensor") if c and c in firsts.columns and c != layer_col]]
    return out.merge(extra.reset_index().rename(columns={layer_col: "layer"}), on=["candidate", "layer"],
                     how="left")


def _from_wide(df: pd.DataFrame, metric: str, layer_col: str, order_col: str | None) -> pd.DataFrame:
    acc = f"{metric}_accumulated" if f"{metric}_accumulated" in df.columns else metric
    loc = f"{metric}_local"
    out = pd.DataFrame({
        "candidate": df["candidate"], "layer": df[layer_col],
        "accumulated": df[acc] if acc in df.columns else float("nan"),
        "local": df[loc] if loc in df.columns else float("nan"),
    })
    for c in (order_col, "op_type", "tensor"):
        if c and c in df.columns and c != layer_col:
            out[c] = df[c].to_numpy()
    return out


def _with_int8_bodies(plan: pd.DataFrame, bodies: set[str]) -> pd.DataFrame:
    """The plan table with the groups whose Loop/Scan/If body the INT8 candidates compute in INT8 saying so in their
    reason (their own precision is the fallback's: the Loop node has no INT8 form)."""
    marked = plan.copy()
    column = marked["nodes"] if "nodes" in marked.columns else marked["group"]
    holds = [bool(bodies & {n.strip() for n in str(nodes).split(",")}) for nodes in column]
    marked.loc[holds, "reason"] = marked.loc[holds, "reason"].astype(str) + "; its body INT8 ([candidates] int8_bodies)"
    return marked


def _groups_of_layers(written: Mapping[str, WrittenModel]) -> Callable[[str], FusionGroup | None]:
    """``layer -> its fusion group`` (a layer is a node name, or a group's output tensor), from any written model
    (they share the groups)."""
    by_node: dict[str, Any] = {}
    by_output: dict[str, Any] = {}
    for w in written.values():
        for g in w.plan.groups:
            for n in g.nodes:
                by_node.setdefault(n, g)
            for t in (g.output_tensor, *g.output_tensors):
                by_output.setdefault(t, g)
        break
    return lambda layer: by_node.get(layer) or by_output.get(layer)


def _tensors_for_layers(layers: Sequence[str], written: Mapping[str, WrittenModel], known: set[str]) -> list[str]:
    """The activation tensors whose ranges feed ``layers`` (a layer's group inputs), in order, unique."""
    group_of = _groups_of_layers(written)
    out: list[str] = []
    for layer in layers:
        group = group_of(layer)
        names = list(group.input_tensors) if group is not None else [layer]
        for t in names:
            if t in known and t not in out:
                out.append(t)
    return out


def with_input_sqnr(per_layer: pd.DataFrame, written: Mapping[str, WrittenModel],
                    tables: Mapping[str, CalibrationTable]) -> pd.DataFrame:
    """``per_layer`` (the report's shape) with ``input_sqnr_pred``: the lowest SQNR (dB) that the layer's
    quantized inputs are predicted to keep with its candidate's table (``TensorRange.predicted_sqnr_db``).

    Against the layer's measured ``local`` figure it says why a culprit is one: an input range that keeps little
    (low here too), or its weights and output (high here, low local). nan where the candidate quantizes none of the
    layer's inputs or has no table (fp16, a loaded plan)."""
    group_of = _groups_of_layers(written)
    quantized = {c: set(w.provenance.quantized_activations()) for c, w in written.items()}
    values = []
    for cand, layer in zip(per_layer["candidate"], per_layer["layer"], strict=True):
        w = written.get(str(cand))
        table = tables.get(w.table_method) if w is not None and w.table_method else None
        group = group_of(str(layer))
        predicted = [table.ranges[t].predicted_sqnr_db for t in (group.input_tensors if group is not None else ())
                     if table is not None and t in quantized[str(cand)] and t in table.ranges]
        known = [v for v in predicted if math.isfinite(v)]
        values.append(min(known) if known else math.nan)
    return per_layer.assign(input_sqnr_pred=values)


def _search_results(search_dir: Path | None, model: LoadedModel, e2e: pd.DataFrame,
                    candidates: dict[str, str]) -> tuple[pd.DataFrame, Any, Any, pd.DataFrame | None]:
    """End-to-end rows with the search's final plan added, its trajectory, sensitivity and plan table."""
    if search_dir is None:
        return e2e, None, None, None
    extra = load_frames(search_dir, ["trajectory", "sensitivity"])
    final = search_end_to_end(search_dir)
    if final is not None:
        e2e = pd.concat([e2e, final], ignore_index=True)
        candidates[SEARCH_CANDIDATE] = "the sensitivity search's final mixed-precision plan"
    plan = None
    if (search_dir / "final" / "plan.json").is_file():
        plan = _explained(load_written(search_dir / "final", model).plan.to_frame(), "INT8 (kept by the search)",
                          lambda precision: f"pinned to {precision} by the search")
        notes = impact_notes(extra.get("sensitivity"))
        plan["measured_impact"] = [notes.get(g, "") if p != INT8 else "" for g, p in
                                   zip(plan["group"], plan["precision"], strict=True)]
    return e2e, extra.get("trajectory"), extra.get("sensitivity"), plan


def _per_sample(frames: Mapping[str, pd.DataFrame], search_dir: Path | None) -> pd.DataFrame | None:
    """The candidates' per-sample rows, the search's final plan's after them."""
    final = search_end_to_end(search_dir, "per_sample") if search_dir is not None else None
    parts = [f for f in (frames.get("per_sample"), final) if f is not None and not f.empty]
    return pd.concat(parts, ignore_index=True) if parts else None


def _mask_examples(cmp_dir: Path | None, search_dir: Path | None) -> tuple[MaskExample, ...]:
    """The comparison's mask examples, the search's final plan's after them (renamed as its end-to-end rows)."""
    found = load_mask_examples(cmp_dir) if cmp_dir is not None else ()
    if search_dir is not None and (search_dir / "final_compare").is_dir():
        found += tuple(replace(e, candidate=SEARCH_CANDIDATE) for e in load_mask_examples(search_dir / "final_compare"))
    return found


def _explained(plan: pd.DataFrame, kept: str, chosen: Callable[[str], str]) -> pd.DataFrame:
    """A written plan's table with why each group has its precision: ``kept`` for an INT8 group, ``chosen(its
    precision)`` for a quantizable one left out of INT8. Those come first, what a reviewer checks, then the
    INT8 ones, then the groups without an INT8 kernel. A written plan is an effective one (an override per group),
    so its own reasons say only "overrides"."""
    plan = plan.copy()
    quantizable = plan["quantizable"].astype(bool)
    int8 = plan["precision"] == INT8
    plan["reason"] = [f"not quantizable: no INT8 kernel ({p})" if not q else kept if p == INT8 else
                      chosen(p) for q, p in zip(quantizable, plan["precision"], strict=True)]
    order = np.where(~quantizable, 2, np.where(int8, 1, 0))
    return plan.assign(_order=order).sort_values("_order", kind="stable").drop(columns="_order")


def _histograms(config: ExperimentConfig, frames: Mapping[str, pd.DataFrame], written: Mapping[str, WrittenModel],
                tables: Mapping[str, CalibrationTable], cal_dir: Path,
                ) -> tuple[pd.DataFrame | None, tuple[HistogramView, ...]]:
    """The report's per-layer table and the histograms of the worst layers' inputs and most disputed tensors."""
    per_layer = None
    if frames.get("per_layer") is not None and not frames["per_layer"].empty:
        per_layer = with_input_sqnr(per_layer_for_report(frames["per_layer"]), written, tables)
    stats = load_statistics(cal_dir / "statistics.npz")
    wanted: list[str] = []
    if per_layer is not None:
        int8 = per_layer[per_layer["candidate"].astype(str).str.startswith(INT8)]
        worst = worst_layers(int8 if not int8.empty else per_layer, True, WORST_LAYERS_SHOWN)
        wanted = _tensors_for_layers(list(worst["layer"]), written, set(stats.tensors))
    for t in disagreeing_tensors(tables, config.worst_tensors):
        if t not in wanted:
            wanted.append(t)
    return per_layer, tuple(histogram_view(t, stats[t], tables) for t in wanted[: config.worst_tensors])


def _model_info(model: LoadedModel) -> dict[str, Any]:
    return {"name": Path(str(model.path)).name if model.path else model.label, "path": str(model.path),
            "sha256": model.sha256,
            "opset": (model.opset if model.upgraded_from_opset is None
                      else f"{model.upgraded_from_opset} (read as {model.opset}: upgraded at load)"),
            "inputs": [f"{s.name}: {s.dtype}{list(s.shape or ())}" for s in model.inputs],
            "outputs": [f"{s.name}: {s.dtype}{list(s.shape or ())}" for s in model.outputs]}


def _reproducibility(config: ExperimentConfig, cal_dir: Path, stages: Sequence[StageRecord],
                     command: str) -> dict[str, Any]:
    cal_summary = read_json(cal_dir / "data_summary.json")
    return {
        "command": command, "experiment file": str(config.source) if config.source else None,
        "seed": config.seed, "settings": config.settings(),
        "calibration set": {"manifest": str(config.calibration), "samples": cal_summary.get("count"),
                            "content sha256": cal_summary.get("sha256")},
        "validation set": {"manifest": str(config.validation)},
        "stage keys": {s.name: s.key_sha256[:16] for s in stages if s.key_sha256},
    }


def assemble_report_inputs(config: ExperimentConfig, model: LoadedModel, tables: Mapping[str, CalibrationTable],
                           cal_dir: Path, frames: Mapping[str, pd.DataFrame], written: Mapping[str, WrittenModel],
                           verdict: Verdict | None, search_dir: Path | None, stages: Sequence[StageRecord],
                           messages: Sequence[str], command: str,
                           reference: LoadedModel | None = None, cmp_dir: Path | None = None,
                           unjudged: str = "") -> ReportInputs:
    """Everything the report shows, from results already on disk (nothing is re-run).

    ``reference``: the model the comparator and the search ran on when it is not ``model``
    (float rewrites: ``[calibrate] equalize`` / ``smoothquant``); ``cmp_dir``: the comparison's folder (its mask
    examples); ``unjudged``: why the threshold got no verdict."""
    candidates = {c.name: c.description for c in experiment_candidates(config)}
    e2e, trajectory, sensitivity, plan = _search_results(search_dir, reference or model, frames["end_to_end"].copy(),
                                                         candidates)
    if plan is None and verdict is not None and verdict.candidate in written:
        chooser = f"candidate {verdict.candidate!r}"
        plan = _explained(written[verdict.candidate].plan.to_frame(), f"INT8 in {chooser}",
                          lambda precision: f"{precision} in {chooser}'s plan")
    if plan is not None:
        plan = plan[[c for c in ("group", "anchor_op", "nodes", "precision", "reason", "measured_impact")
                     if c in plan.columns]]
        if config.int8_bodies and "reason" in plan.columns:
            plan = _with_int8_bodies(plan, int8_bodies(written))
    per_layer, histograms = _histograms(config, frames, written, tables, cal_dir)
    notes = sorted({n for t in tables.values() for n in t.notes}) + list(messages)
    return ReportInputs(
        title=config.name, model=_model_info(model), end_to_end=e2e, per_layer=per_layer, verdict=verdict,
        unjudged=unjudged,
        candidates=candidates, layer_metric="sqnr_db", layer_metric_higher_is_better=True,
        histograms=histograms, sensitivity=sensitivity, trajectory=trajectory,
        trajectory_metric=verdict.metric if verdict is not None else "", plan=plan,
        environment=package_versions(), reproducibility=_reproducibility(config, cal_dir, stages, command),
        notes=tuple(notes), changed_samples=changed_samples(_per_sample(frames, search_dir)),
        bodies=bodies if not (bodies := bodies_frame(tables)).empty else None,
        mask_examples=_mask_examples(cmp_dir, search_dir),
    )
