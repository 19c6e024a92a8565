"""update_counts: an array's values into a histogram's counts, chunk by chunk (see quantlab.binning)."""

from __future__ import annotations

import math

import numpy as np

from .core import (
    CHUNK,
    _bin_chunk,
    _extremes,
    _grow,
    _scan_bits,
    compiled,
    huge_bits,
)
from .masked import _chunk_slow, _chunk_usable

__all__ = ["partial_tables", "update_counts", "warm_up"]

_FLUSH = 1 << 30
"""Values binned into the int32 partial tables before they are added to the int64 counts (no overflow)."""


@compiled(nogil=True)
def _update_f32(flat, counts, upper, huge, limit, tables):  # pragma: no cover - compiled
    """:func:`update_counts` for float32, chunk by chunk (see the module docstring).

    Arrays of at least ``bins`` values are binned into the two int32 partial tables
    ``tables[0]``, ``tables[1]`` (all zero; zero again on return), added to ``counts``
    at the end (and every :data:`_FLUSH` values); smaller ones straight into ``counts``.
    """
    bits = flat.view(np.int32)
    scratch = np.empty(1, np.int32)
    size = counts.size if flat.size >= counts.size else 0
    even = tables[0, :size]
    odd = tables[1, :size]
    mn = np.inf
    mx = -np.inf
    nonfinite = 0
    n_huge = 0
    zeros = 0
    negzeros = 0
    pending = 0
    for start in range(0, flat.size, CHUNK):
        chunk = flat[start:start + CHUNK]
        chunk_bits = bits[start:start + CHUNK]
        kmin, kmax, z, negz, bad = _scan_bits(chunk_bits, limit)
        zeros += z
        negzeros += negz
        if bad:
            cmn, cmx, nf, nh, upper = _chunk_usable(chunk, chunk_bits, counts, even, odd, 0 if size else 1, upper,
                                                    limit, z, negz, scratch)
            nonfinite += nf
            n_huge += nh
        else:
            cmn, cmx = _extremes(kmin, kmax, z, negz, chunk_bits, scratch)
            upper = _grow(counts, even, odd, upper, max(abs(cmn), abs(cmx)))
            if size:
                _bin_chunk(chunk, even, odd, upper)
            else:
                _bin_chunk(chunk, counts, counts, upper)
        if size:
            pending += chunk.size
            if pending >= _FLUSH:
                _flush(counts, even, odd)
                pending = 0
        if cmn < mn:
            mn = cmn
        if cmx > mx:
            mx = cmx
    if size:
        _flush(counts, even, odd)
    return mn, mx, flat.size - nonfinite - n_huge, nonfinite, n_huge, zeros, negzeros, upper


@compiled(nogil=True)
def _flush(counts, even, odd):  # pragma: no cover - compiled
    """Add the int32 partial tables to the int64 counts and clear them."""
    for k in range(counts.size):
        counts[k] += even[k] + np.int64(odd[k])
        even[k] = 0
        odd[k] = 0


@compiled(nogil=True)
def _update_any(flat, counts, upper, huge):  # pragma: no cover - compiled
    """:func:`update_counts` for other float types: the per-value path over the whole array."""
    zeros = 0
    negzeros = 0
    for i in range(flat.size):
        if flat[i] == 0.0:
            zeros += 1
            negzeros += math.copysign(1.0, flat[i]) < 0.0
    mn, mx, nonfinite, n_huge, upper = _chunk_slow(flat, counts, counts[:0], counts[:0], upper, huge)
    return mn, mx, flat.size - nonfinite - n_huge, nonfinite, n_huge, zeros, negzeros, upper


def partial_tables(bins: int) -> np.ndarray:
    """The zeroed int32 scratch ``[2, bins]`` of :func:`update_counts`: a histogram keeps one and passes it each
    time (allocating 2 x 64 KiB per call cost a fresh, zeroed page every 4 KiB: 1,200 page faults a sample)."""
    return np.zeros((2, bins), np.int32)


def update_counts(flat: np.ndarray, counts: np.ndarray, upper: float, huge: float,
                  tables: np.ndarray | None = None) -> tuple[float, float, int, int, int, int, int, float]:
    """Bin the usable values of 1-D ``flat`` into ``counts`` over ``[0, upper)``, growing the range as needed.

    Returns ``(min, max, usable, nonfinite, huge, zeros, negative zeros, upper)``:
    min/max of the usable values (inf/-inf when none), their count, the non-finite
    and huge (``|x| >= huge``) values left out, the exact zeros (-0.0 among them), and the new
    range. ``counts`` (int64) is updated in place, its pairs merged when the
    range grows. ``tables``: a :func:`partial_tables` scratch of ``counts.size``
    bins to reuse (zero before and after; made here when None). Releases the GIL.
    """
    if flat.dtype == np.float32:
        if tables is None or tables.shape != (2, counts.size):
            tables = partial_tables(counts.size if flat.size >= counts.size else 0)
        out = _update_f32(flat, counts, float(upper), float(huge), np.int32(huge_bits(huge)), tables)
    else:
        out = _update_any(flat, counts, float(upper), float(huge))
    mn, mx, usable, nonfinite, n_huge, zeros, negzeros, new_upper = out
    return (float(mn), float(mx), int(usable), int(nonfinite), int(n_huge), int(zeros), int(negzeros),
            float(new_upper))


def warm_up() -> None:
    """Compile the float32 kernels, or load them from numba's cache (0.5-1 s on first use in a process).

    Run in a thread while the model session is being built, so the first
    batch does not wait for it.
    """
    update_counts(np.array([0.0, -0.0, 1.0, -2.0], dtype=np.float32), np.zeros(4, np.int64), 0.0, 1e30)
