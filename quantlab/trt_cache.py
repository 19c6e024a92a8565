"""TensorRT's calibration-cache text format (TensorRT 10, ``IInt8EntropyCalibrator2.writeCalibrationCache``;
Polygraphy saves the same bytes), read and written from :class:`~quantlab.table.CalibrationTable`::

    TRT-<version>-EntropyCalibration2
    <tensor name>: <big-endian hex of the float32 scale>

``<version>`` is TensorRT's version number (``NV_TENSORRT_VERSION``: 101300 for
10.13.0, 8601 for 8.6.1); TensorRT ignores a cache whose version differs from
its own. The scale is ``amax / 127`` as float32, e.g. ``3c010a14``; TensorRT
writes unused tensors as ``0`` (leading zeros dropped), which is accepted on import.
"""

from __future__ import annotations

import math
import os
import re
import struct
from pathlib import Path

from .atomic import write_text
from .environment import unreadable
from .errors import CalibrationError
from .table import CalibrationTable, TensorRange, check_range, warn_zero_ranges

__all__ = ["TRT_CACHE_VERSION", "trt_cache_text", "parse_trt_cache", "write_trt_cache", "read_trt_cache",
           "trt_version_number"]

TRT_CACHE_VERSION = "101300"
"""Header version written by default (TensorRT 10.13.0); pass the target's own version."""


_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")
_HEX = re.compile(r"^[0-9a-fA-F]{1,8}$")


def trt_version_number(version: str | int) -> str:
    """``"10.13.0"`` -> ``"101300"``, ``"8.6.1"`` -> ``"8601"`` (NV_TENSORRT_VERSION); digits pass through."""
    text = str(version).strip()
    if text.isdigit():
        return text
    parts = text.split(".")
    if not 2 <= len(parts) <= 4 or not all(p.isdigit() for p in parts):
        raise CalibrationError(f"TensorRT version {version!r} is neither like '10.13.0' nor like '101300'")
    major, minor = int(parts[0]), int(parts[1])
    patch = int(parts[2]) if len(parts) > 2 else 0
    return str(major * (10000 if major >= 10 else 1000) + minor * 100 + patch)


def _scale_hex(r: TensorRange) -> str:
    """The float32 scale as big-endian hex; an all-zero tensor as ``0``, as TensorRT writes it."""
    return "0" if r.amax == 0 else struct.pack(">f", float(r.scale)).hex()


def trt_cache_text(table: CalibrationTable, version: str | int = TRT_CACHE_VERSION) -> str:
    """The cache file's text: header, then ``name: %08x`` of the float32 scale per tensor."""
    lines = [f"TRT-{trt_version_number(version)}-EntropyCalibration2"]
    for name, r in table.ranges.items():
        if "\n" in name or "\r" in name:
            raise CalibrationError(f"tensor name {name!r} holds a line break; it cannot go in a TensorRT cache")
        lines.append(f"{name}: {_scale_hex(r)}")
    return "\n".join(lines) + "\n"


def write_trt_cache(
    table: CalibrationTable, path: str | os.PathLike[str], version: str | int = TRT_CACHE_VERSION
) -> Path:
    """Write ``table`` as a TensorRT calibration cache (``version`` like '10.13.0' or '101300'), atomically."""
    return write_text(path, trt_cache_text(table, version))


def parse_trt_cache(text: str, *, where: str = "calibration cache", model_sha256: str = "") -> CalibrationTable:
    """A table from TensorRT cache text (any ``TRT-<n>-<Calibrator>`` header; CRLF and short hex accepted).

    A line is split at its last ``:`` so names holding colons survive. ``min``/``max``
    are unknown in a cache and set to ``-amax``/``amax``.
    """
    lines = [ln.strip() for ln in text.replace("\r\n", "\n").split("\n")]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise CalibrationError(f"{where}: empty file; not a TensorRT calibration cache")
    header = _HEADER.match(lines[0])
    if header is None:
        raise CalibrationError(
            f"{where}: first line {lines[0][:60]!r} is not a TensorRT cache header like "
            "'TRT-101300-EntropyCalibration2'"
        )
    ranges: dict[str, TensorRange] = {}
    for number, line in enumerate(lines[1:], start=2):
        name, sep, value = line.rpartition(":")
        name, value = name.strip(), value.strip()
        if not sep or not name or not _HEX.match(value):
            raise CalibrationError(f"{where}: line {number} {line[:80]!r} is not '<tensor>: <hex float32 scale>'")
        scale = struct.unpack(">f", int(value, 16).to_bytes(4, "big"))[0]
        if not math.isfinite(scale) or scale < 0:
            raise CalibrationError(f"{where}: line {number}: tensor {name!r} has scale {scale}; expected >= 0")
        if name in ranges:
            raise CalibrationError(f"{where}: line {number}: tensor {name!r} appears twice")
        amax = scale * 127.0
        ranges[name] = TensorRange(amax=amax, min=-amax, max=amax)
        check_range(name, ranges[name], f"{where}: line {number}")
    warn_zero_ranges(ranges, where, cache=True)
    return CalibrationTable(
        method="imported",
        ranges=ranges,
        model_sha256=model_sha256,
        settings={"source": "tensorrt-calibration-cache", "trt_version": header.group(1),
                  "calibrator": header.group(2)},
        notes=((f"imported from a TensorRT calibration cache ({header.group(2)}, TensorRT {header.group(1)}); "
                "min/max are not stored in caches, so the ranges are symmetric"),),
    )


def read_trt_cache(path: str | os.PathLike[str], *, model_sha256: str = "") -> CalibrationTable:
    """Import a TensorRT / Polygraphy calibration cache file; ``model_sha256`` ties it to a model."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CalibrationError(f"{path}: no such calibration cache") from None
    except PermissionError as exc:
        raise unreadable(exc, "calibration cache", path) from None
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read the calibration cache ({exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CalibrationError(f"{path}: binary data, not a TensorRT calibration cache (text)") from None
    table = parse_trt_cache(text, where=str(path), model_sha256=model_sha256)
    settings = dict(table.settings, file=path.name)
    return CalibrationTable(method=table.method, ranges=table.ranges, model_sha256=table.model_sha256,
                            settings=settings, calib_set=table.calib_set, versions=table.versions,
                            notes=table.notes)
