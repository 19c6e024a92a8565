"""The per-layer table (columns in :mod:`.result`) from the merged sums, and where NaN/inf first appear."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import pandas as pd

from ..metrics import ErrorAccumulator
from .alignment import CandidatePlan
from .layers import Layer
from .result import LIVE_MODES, PER_LAYER_COLUMNS

__all__ = ["per_layer_frame", "nan_warnings"]


def per_layer_frame(plans: Mapping[str, CandidatePlan], layers: Sequence[Layer],
                    acc: Mapping[tuple[str, str, str], ErrorAccumulator]) -> pd.DataFrame:
    """One row per candidate x mode x layer with sums; a group fed only graph inputs takes its local
    figures from the accumulated ones (``CandidatePlan.mirrored``). A Loop/Scan/If's ``precision`` is its bodies'
    when they were written INT8 or FP16 (``CandidatePlan.bodies``): the node itself is only a fallback's."""
    rows = []
    for name, p in plans.items():
        for mode in LIVE_MODES:
            for x in layers:
                a = acc.get((name, mode, x.tensor))
                if a is None and mode == "local" and x.group in p.mirrored:
                    a = acc.get((name, "accumulated", x.tensor))
                if a is None:
                    continue
                rows.append({
                    "candidate": name, "mode": mode, "order": x.order, "layer": x.layer, "group": x.group,
                    "op_type": x.op_type, "tensor": x.tensor,
                    "precision": p.bodies.get(x.group) or p.precision.get(x.group, "fp32"),
                    **a.result(), "node": x.node,
                })
    frame = pd.DataFrame(rows, columns=list(PER_LAYER_COLUMNS))
    frame["order"] = frame["order"].astype("int64")
    frame["nan_count"] = frame["nan_count"].astype("int64")
    for c in ("cosine", "sqnr_db", "max_abs", "mean_abs", "rel_l2"):
        frame[c] = frame[c].astype("float64")
    return frame


def _nan_advice(group: str, precision: str) -> str:
    if precision == "fp16":
        return (f"float16 holds |x| <= 65504: keep group {group!r} in fp32 (a plan pin), or keep those values in "
                "float16's range (an additive mask of -1e4 rather than -1e9).")
    return f"Check group {group!r}'s calibration range, or pin it to fp16/fp32."


def nan_warnings(candidates: Sequence[str], per_layer: pd.DataFrame, end_to_end: pd.DataFrame) -> list[str]:
    """Per candidate with NaN/inf: the first layer (topological order) where they appear, or the count."""
    warnings: list[str] = []
    for name in candidates:
        rows = end_to_end[end_to_end["candidate"] == name]
        total = int(rows["nan_count"].sum())
        layered = per_layer[(per_layer["candidate"] == name) & (per_layer["nan_count"] > 0)]
        first = None
        for mode in LIVE_MODES:
            sub = layered[layered["mode"] == mode].sort_values("order", kind="stable")
            if not sub.empty:
                first = (mode, sub.iloc[0])
                break
        if first is not None:
            mode, r = first
            warnings.append(
                f"candidate {name!r}: NaN/inf first appears ({mode} mode, topological order) at layer "
                f"{r['layer']!r} (tensor {r['tensor']!r}, group {r['group']!r}, {r['op_type']}, "
                f"{r['precision']}, {int(r['nan_count'])} value(s))"
                + (f"; its outputs hold {total} NaN/inf value(s)" if total else
                   "; its outputs stay finite (harmless only where the inf is meant: a -inf attention mask that "
                   "Softmax turns into 0)")
                + ". " + _nan_advice(str(r["group"]), str(r["precision"])))
        elif total:
            warnings.append(f"candidate {name!r}: its outputs hold {total} NaN/inf value(s); run the "
                            "per-layer comparison (with provenance) to find the first layer where they appear")
    return warnings


def data_sized_layers_note(layers: Sequence[str], data_sized: Collection[str]) -> str | None:
    """What the per-layer table says of layer tensors whose size the data decides (after NonZero, TopK or NMS: a
    MoE's expert inputs): a batch where the candidate's size differs is left out of their figures, and where it is
    the same, the rows may still be other tokens (another expert chosen), compared element by element all the same
    (a Mixtral's expert MatMuls read -0.4 dB accumulated, 33 dB local)."""
    sized = [t for t in layers if t in data_sized]
    if not sized:
        return None
    shown = ", ".join(map(repr, sized[:3])) + (f" and {len(sized) - 3} more" if len(sized) > 3 else "")
    return (f"{len(sized)} layer tensor(s) are sized by the data (after NonZero, TopK, NMS or a loop the data "
            f"stops: {shown}): their per-layer figures leave out the batches where a candidate's size differs, and "
            "compare row by row where it does not, though the rows may be other tokens (another expert or box "
            "chosen); read them with care (their local figures, fed the reference's choice, are sound) and judge "
            "such a model end to end")
