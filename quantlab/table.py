"""Calibration tables: per-tensor INT8 ranges, with everything that produced them.

The JSON file is what ``quantlab calibrate`` writes and ``quantlab build``
reads. Activations are symmetric per-tensor INT8: ``scale = amax / 127``.
``min``/``max`` are kept too, so a writer targeting ONNX Runtime's uint8 form
can derive an asymmetric range clipped to ``[-amax, amax]``.

TensorRT's calibration-cache text format is :mod:`quantlab.trt_cache`.

Every table made or read is checked (:func:`check_range`). ``amax == 0`` (an
all-zero tensor) is legal: any positive scale holds zero exactly, and its Q/DQ
scale is 1.0 (as ONNX Runtime's quantizer and pytorch-quantization use), not a
tiny one, because TensorRT needs a positive scale that survives float16 and the
products of scales in its fused kernels; a cache stores it as ``0`` (TensorRT's
own encoding); reading such a table warns (:class:`ZeroRangeWarning`) naming
the tensors. An amax whose float32 scale underflows (``0 < amax < 127 * 1.18e-38``)
or is not finite is a CalibrationError naming the tensor.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import write_json
from .environment import unreadable
from .errors import CalibrationError

if TYPE_CHECKING:  # graph is a lower layer; imported only for the annotation
    from .graph import LoadedModel

__all__ = [
    "SMALLEST_AMAX", "ZERO_RANGE_SCALE", "ZeroRangeWarning", "check_range", "TensorRange",
    "CalibrationTable", "TABLE_FORMAT", "table_to_dict", "table_from_dict",
    "write_table", "read_table", "check_table_fits", "warn_zero_ranges", "bodies_frame",
]

TABLE_FORMAT = "quantlab.calibration/1"

ZERO_RANGE_SCALE = 1.0
"""The Q/DQ scale of an all-zero tensor (amax 0): positive, and exact in float16 (see the module docstring)."""

_TINY32 = float(np.finfo(np.float32).tiny)
_MAX32 = float(np.finfo(np.float32).max)

SMALLEST_AMAX = 127.0 * _TINY32
"""The smallest non-zero amax INT8 can use (1.49e-36): its scale amax / 127 is float32's smallest normal, 2**-126
(TensorRT flushes a denormal scale to 0). Calibration raises a smaller amax to it, with a note: a tensor whose
values are all that small (MobileViT's attention scores, 1e-45, from queries and keys of 1e-23) reads as 0 in
INT8, as it does in float16."""


class ZeroRangeWarning(UserWarning):
    """A table holds tensors with amax 0 (all zero in calibration): legal, but worth a look."""


@dataclass(frozen=True)
class TensorRange:
    """The calibrated range of one activation tensor.

    ``amax`` is the symmetric clipping threshold (|x| above it saturates);
    ``min``/``max`` are the observed extremes of the finite, non-huge values;
    ``clipped_fraction`` is the share of observed values that saturate: |x| > amax by more than half a step;
    ``zeroed_fraction`` the share of non-zero observed values that round to 0: |x| under half a step;
    ``predicted_sqnr_db`` the SQNR (dB) symmetric INT8 at ``amax`` gives the observed values, rounding and
    saturation together (quantlab.noise; nan when not known: an older table, a TensorRT cache, no non-zero value).
    ``excluded`` counts values left out of the statistics (``nonfinite``,
    ``huge``: e.g. attention masks at float32.min).
    """

    amax: float
    min: float
    max: float
    clipped_fraction: float = 0.0
    zeroed_fraction: float = 0.0
    predicted_sqnr_db: float = math.nan
    excluded: Mapping[str, int] = field(default_factory=dict)
    histogram: Mapping[str, Any] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """INT8 symmetric scale (amax / 127); an all-zero tensor (amax 0) gets :data:`ZERO_RANGE_SCALE`."""
        return self.amax / 127.0 if self.amax > 0 else ZERO_RANGE_SCALE


def check_range(name: str, r: TensorRange, where: str = "calibration table") -> None:
    """CalibrationError naming ``name`` when INT8 cannot represent its range (amax 0 is fine).

    Refused: an amax that is negative, not finite, or whose float32 scale
    ``amax / 127`` overflows or underflows float32's smallest normal (TensorRT
    flushes denormals: it would read the scale as 0); min above max. (min/max
    are +inf/-inf for a tensor with no usable value: only their order is checked.)
    """
    at = f"{where}: tensor {name!r}"
    if isinstance(r.amax, bool) or not isinstance(r.amax, (int, float)) or not math.isfinite(r.amax):
        raise CalibrationError(f"{at}: amax must be a finite number, got {r.amax!r}")
    if r.amax < 0:
        raise CalibrationError(f"{at}: amax must be >= 0, got {r.amax}")
    if math.isfinite(r.min) and math.isfinite(r.max) and r.min > r.max:
        raise CalibrationError(f"{at}: min {r.min} is above max {r.max}; fix or recalibrate the table")
    if r.amax > 0 and not _TINY32 <= r.amax / 127.0 <= _MAX32:
        raise CalibrationError(
            f"{at}: amax {r.amax:g} does not fit INT8: its scale amax / 127 = {r.amax / 127.0:.3g} is outside "
            f"float32's normal range [{_TINY32:.3g}, {_MAX32:.3g}], so TensorRT would read it as 0 or inf. An "
            "all-zero tensor has amax 0 (scale 1.0): set amax to 0, or keep this tensor's layers in fp16/fp32 "
            "with a precision plan."
        )


def warn_zero_ranges(ranges: Mapping[str, TensorRange], where: str, cache: bool = False) -> None:
    """Warns of amax 0, not for masks (other values huge: the notes name them, the writer refuses them)."""
    zero = [name for name, r in ranges.items() if r.amax == 0 and not (r.excluded or {}).get("huge")]
    shown = ", ".join(repr(n) for n in zero[:5]) + (f" and {len(zero) - 5} more" if len(zero) > 5 else "")
    why = ("TensorRT writes 0 for tensors it did not calibrate; quantlab for tensors that were all zero"
           if cache else "every calibration value was zero, or excluded")
    if zero:
        warnings.warn(f"{where}: {len(zero)} tensor(s) have amax 0 ({why}): {shown}. Their Q/DQ scale is "
                      f"{ZERO_RANGE_SCALE}: zeros stay exact, any other value there rounds to whole numbers. Check "
                      "the data, or keep their layers out of INT8 if they are not always zero.",
                      ZeroRangeWarning, stacklevel=3)


@dataclass(frozen=True)
class CalibrationTable:
    """Ranges for one method, plus the provenance every output records.

    ``model_sha256`` ties the table to the model it was calibrated on;
    ``calib_set`` holds the manifest, the content hash of the samples used and
    their count; ``settings`` the method's parameters; ``versions`` the tools.
    """

    method: str
    ranges: Mapping[str, TensorRange]
    model_sha256: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    calib_set: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    bodies: Mapping[str, Mapping[str, TensorRange]] = field(default_factory=dict)
    """Ranges inside Loop/Scan bodies and If branches: node name (the writer's, :func:`quantlab.plan.groups.node_names`) -> body
    tensor -> range (quantlab.stats.bodies); the JSON has them under ``bodies`` only when there are some."""

    def __post_init__(self) -> None:
        for name, r in self.ranges.items():
            check_range(name, r, f"calibration table ({self.method})")
        for node, ranges in self.bodies.items():
            for name, r in ranges.items():
                check_range(name, r, f"calibration table ({self.method}), body of {node!r}")

    def amax(self, tensor: str) -> float:
        return self.ranges[tensor].amax


# --------------------------------------------------------------------------- JSON


def _range_to_dict(r: TensorRange) -> dict[str, Any]:
    return {
        "amax": float(r.amax),
        "scale": float(np.float32(r.scale)),
        "min": float(r.min),
        "max": float(r.max),
        "clipped_fraction": float(r.clipped_fraction),
        "zeroed_fraction": float(r.zeroed_fraction),
        "predicted_sqnr_db": _finite_or_none(r.predicted_sqnr_db),
        "excluded": {k: int(v) for k, v in r.excluded.items()},
        "histogram": dict(r.histogram),
    }


def _finite_or_none(value: float) -> float | None:
    """JSON has no nan or inf: an unknown (or noiseless) prediction is written as null."""
    return float(value) if math.isfinite(value) else None


def table_to_dict(table: CalibrationTable) -> dict[str, Any]:
    """The JSON document of ``table`` (``scale`` is float32(amax / 127), informative on read)."""
    return {
        "format": TABLE_FORMAT,
        "method": table.method,
        "model_sha256": table.model_sha256,
        "settings": dict(table.settings),
        "calib_set": dict(table.calib_set),
        "versions": dict(table.versions),
        "notes": list(table.notes),
        "tensors": {name: _range_to_dict(r) for name, r in table.ranges.items()},
        **({"bodies": {node: {name: _range_to_dict(r) for name, r in ranges.items()}
                       for node, ranges in table.bodies.items()}} if table.bodies else {}),
    }


def _number(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CalibrationError(f"{where}: {what} must be a finite number, got {value!r}")
    return float(value)


def _optional_number(value: Any, what: str, where: str) -> float:
    """A finite number, or nan for null or missing (tables written before the field)."""
    return math.nan if value is None else _number(value, what, where)


def table_from_dict(doc: Any, where: str = "calibration table") -> CalibrationTable:
    """Rebuild a table from :func:`table_to_dict` output; CalibrationError naming the bad field."""
    if not isinstance(doc, dict):
        raise CalibrationError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    if doc.get("format") != TABLE_FORMAT:
        raise CalibrationError(
            f"{where}: not a quantlab calibration table (format {doc.get('format')!r}, expected "
            f"{TABLE_FORMAT!r}). A TensorRT calibration cache is read with read_trt_cache / --trt-cache."
        )
    for key, kind in (("method", str), ("model_sha256", str), ("tensors", dict)):
        if not isinstance(doc.get(key), kind):
            raise CalibrationError(f"{where}: field {key!r} is missing or not a {kind.__name__}")
    ranges = _ranges_from(doc["tensors"], where)
    bodies = doc.get("bodies", {})  # older tables: none
    if not isinstance(bodies, dict) or not all(isinstance(v, dict) for v in bodies.values()):
        raise CalibrationError(f"{where}: 'bodies' must map a Loop/Scan/If node to its bodies' tensors")
    # an all-zero tensor quantlab calibrated (its histogram summary: absmax 0) is in the table's notes when a Q/DQ
    # reads it; the warning is for zero ranges set by hand or by another tool (it named a BERT's zero-filled
    # mask tensors, which no Q/DQ reads, three times a run)
    warn_zero_ranges({n: r for n, r in ranges.items() if r.histogram.get("absmax") != 0.0}, where)
    notes = doc.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise CalibrationError(f"{where}: 'notes' must be a list of strings")
    return CalibrationTable(
        method=doc["method"],
        ranges=ranges,
        model_sha256=doc["model_sha256"],
        settings=dict(doc.get("settings") or {}),
        calib_set=dict(doc.get("calib_set") or {}),
        versions=dict(doc.get("versions") or {}),
        notes=tuple(notes),
        bodies={node: _ranges_from(entries, f"{where}: body of {node!r}") for node, entries in bodies.items()},
    )


def _ranges_from(entries: Mapping[str, Any], where: str) -> dict[str, TensorRange]:
    """The :class:`TensorRange` of every ``tensor -> entry`` of a table document; CalibrationError naming a bad one."""
    ranges: dict[str, TensorRange] = {}
    for name, entry in entries.items():
        at = f"{where}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CalibrationError(f"{at}: expected an object with amax/min/max")
        amax = _number(entry.get("amax"), "amax", at)
        excluded = entry.get("excluded", {})
        if not isinstance(excluded, dict) or not all(isinstance(v, int) for v in excluded.values()):
            raise CalibrationError(f"{at}: 'excluded' must map a reason to a count")
        ranges[name] = TensorRange(
            amax=amax,
            min=_number(entry.get("min", -amax), "min", at),
            max=_number(entry.get("max", amax), "max", at),
            clipped_fraction=_number(entry.get("clipped_fraction", 0.0), "clipped_fraction", at),
            zeroed_fraction=_number(entry.get("zeroed_fraction", 0.0), "zeroed_fraction", at),  # older tables: 0
            predicted_sqnr_db=_optional_number(entry.get("predicted_sqnr_db"), "predicted_sqnr_db", at),
            excluded=dict(excluded),
            histogram=dict(entry.get("histogram", {})) if isinstance(entry.get("histogram", {}), dict) else {},
        )
        check_range(name, ranges[name], where)
    return ranges


def write_table(table: CalibrationTable, path: str | os.PathLike[str]) -> Path:
    """Write ``table`` as deterministic JSON (same table, same bytes), atomically."""
    return write_json(path, table_to_dict(table))


def read_table(path: str | os.PathLike[str]) -> CalibrationTable:
    """Read a table written by :func:`write_table`; CalibrationError naming the file otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CalibrationError(f"{path}: no such calibration table; run quantlab calibrate first") from None
    except PermissionError as exc:
        raise unreadable(exc, "calibration table", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{path}: cannot read the calibration table ({exc})") from None
    if text.startswith("TRT-"):
        raise CalibrationError(
            f"{path}: is a TensorRT calibration cache, not a quantlab JSON table; import it with quantlab.trt_cache.read_trt_cache"
        )
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{path}: not valid JSON ({exc}); the table is truncated or not a table") from None
    return table_from_dict(doc, str(path))


# --------------------------------------------------------------------------- fit check


def _bind_hint(table: CalibrationTable, model: LoadedModel) -> str:
    """Bound values are part of a model's hash: when the table or the model had some, say which."""
    from .controlflow import deciding_inputs

    bound = table.calib_set.get("bind") or {}
    if bound and dict(model.bindings) != dict(bound):
        binds = " ".join(f"--bind {k}={v!r}" for k, v in bound.items())
        return (f" The table was calibrated on it with {binds} ({'none' if not model.bindings else 'other values'} "
                "here): bound values are part of the model's hash, so give the same.")
    if model.bound:
        return (f" It was loaded with {', '.join(model.bound)} bound: the values bound are part of its hash, so "
                "load it with the --bind the table was calibrated with.")
    decided = sorted(deciding_inputs(model.proto, by_value=True))
    if decided:
        return (f" If the table was calibrated with --bind (e.g. --bind {decided[0]}=...), give the same --bind here: "
                "bound values are part of the model's hash.")
    return ""


def check_table_fits(table: CalibrationTable, model: LoadedModel) -> None:
    """CalibrationError unless ``table`` was made for ``model``.

    With a model hash (tables quantlab writes) the hashes must match. An
    imported cache has none: then at least one of its tensor names must be a
    tensor of the model (TensorRT caches also name TensorRT-internal tensors,
    which are ignored).
    """
    if table.model_sha256:
        if table.model_sha256 != model.sha256:
            raise CalibrationError(
                f"the calibration table ({table.method}) was made for the model with sha256 "
                f"{table.model_sha256[:12]}..., but {model.label} has sha256 {model.sha256[:12]}...; "
                f"calibrate this model (quantlab calibrate {model.label} ...) and use that table."
                f"{_bind_hint(table, model)}"
            )
        return
    from .graph import tensor_specs

    known = set(tensor_specs(model.proto))
    if table.ranges and not any(name in known for name in table.ranges):
        shown = ", ".join(repr(n) for n in list(table.ranges)[:3])
        raise CalibrationError(
            f"none of the {len(table.ranges)} tensors of the calibration table ({shown}, ...) is a tensor "
            f"of {model.label}; the cache was made for another model or another export of it."
        )


def bodies_frame(tables: Mapping[str, CalibrationTable]) -> Any:
    """Per method and Loop/Scan/If node the table calibrated (``CalibrationTable.bodies``): its tensors, the widest
    range and the lowest predicted INT8 SQNR, each with its tensor. A pandas DataFrame (empty: no body)."""
    import pandas as pd

    rows = []
    for method, table in tables.items():
        for node, ranges in table.bodies.items():
            widest = max(ranges, key=lambda t: ranges[t].amax)
            known = {t: r.predicted_sqnr_db for t, r in ranges.items() if math.isfinite(r.predicted_sqnr_db)}
            noisiest = min(known, key=known.__getitem__) if known else ""
            rows.append({"method": method, "body of": node, "tensors": len(ranges), "widest": widest,
                         "amax": ranges[widest].amax, "lowest SQNR dB": known.get(noisiest, math.nan),
                         "at": noisiest})
    return pd.DataFrame(rows)
