"""Binning the chunks that hold values to leave out (non-finite, or ``|x| >= huge``), and the per-value path.

:func:`_chunk_usable` keeps the clean chunks' speed on attention scores masked at float32.min or -inf:
the integer-key scan with the left-out values masked by selects, then one branch per value while
binning (masked positions come in runs). :func:`_chunk_slow` decides value by value (float64 arrays).
"""

from __future__ import annotations

import numpy as np

from .core import (
    _ABS,
    _F32_INF_BITS,
    _F32_NORMAL_MIN,
    _F32_POW2_MAX,
    _I32,
    _TINY_UPPER,
    _extremes,
    _grow,
    _order_key,
    compiled,
)


@compiled(nogil=True)
def _chunk_slow(flat, counts, even, odd, upper, huge):  # pragma: no cover - compiled
    """Per-value path for a chunk with non-finite or huge values: (min, max, nonfinite, huge, new upper)."""
    mn = np.inf
    mx = -np.inf
    nonfinite = 0
    n_huge = 0
    for i in range(flat.size):
        x = flat[i]
        ax = abs(x)
        if ax < huge:
            if x < mn:
                mn = x
            if x > mx:
                mx = x
        elif ax != ax or ax == np.inf:
            nonfinite += 1
        else:
            n_huge += 1
    if mn <= mx:
        upper = _grow(counts, even, odd, upper, max(abs(mn), abs(mx)))
        if upper >= _TINY_UPPER or upper == 0.0:
            scale = counts.size / upper if upper > 0.0 else 0.0
            for i in range(flat.size):
                ax = abs(flat[i])
                if ax < huge:
                    counts[np.uint32(ax * scale)] += 1
        else:  # float64 denormals: counts.size / upper would overflow to inf (and 0 * inf is NaN)
            for i in range(flat.size):
                ax = abs(flat[i])
                if ax < huge:
                    counts[np.uint32(ax / upper * counts.size)] += 1
    return mn, mx, nonfinite, n_huge, upper


@compiled(nogil=True, boundscheck=False)
def _scan_usable(bits, limit):  # pragma: no cover - compiled
    """(min key, max key, usable, non-finite) of a chunk holding values to leave out (see :func:`_scan_bits`).

    Only the usable values (magnitude bits below ``limit``: finite and ``|x| < huge``) reach the
    keys, through selects, so the loop stays vectorised (in int32 lanes, as :func:`_scan_bits`). No usable
    value: the keys stay at their starting points (check ``usable``).
    """
    kmin = _I32(0x7FFFFFFF)
    kmax = _I32(-0x80000000)
    usable = _I32(0)
    nonfinite = _I32(0)
    for i in range(bits.size):
        b = bits[i]
        mag = _I32(b & _I32(_ABS))
        ok = mag < limit
        key = _order_key(b)
        kmin = _I32(min(kmin, key if ok else _I32(0x7FFFFFFF)))
        kmax = _I32(max(kmax, key if ok else _I32(-0x80000000)))
        usable = _I32(usable + _I32(ok))
        nonfinite = _I32(nonfinite + _I32(mag >= _I32(_F32_INF_BITS)))
    return kmin, kmax, usable, nonfinite


@compiled(nogil=True, boundscheck=False)
def _bin_usable(flat, bits, even, odd, scale, limit):  # pragma: no cover - compiled
    """:func:`_bin_all` over the usable values only (magnitude bits below ``limit``).

    The branch is cheap where it matters: masked positions (attention masks at float32.min,
    -inf padding) come in runs, which the branch predictor follows.
    """
    pairs = flat.size // 2 * 2
    for i in range(0, pairs, 2):
        if bits[i] & np.int32(_ABS) < limit:
            even[np.uint32(abs(flat[i]) * scale)] += 1
        if bits[i + 1] & np.int32(_ABS) < limit:
            odd[np.uint32(abs(flat[i + 1]) * scale)] += 1
    for i in range(pairs, flat.size):
        if bits[i] & np.int32(_ABS) < limit:
            even[np.uint32(abs(flat[i]) * scale)] += 1


@compiled(nogil=True)
def _bin_usable_chunk(chunk, bits, even, odd, upper, limit):  # pragma: no cover - compiled
    """:func:`_bin_usable` with the scale ``bins / upper``, in float32 when that is exact (as :func:`_bin_chunk`)."""
    if upper == 0.0:
        _bin_usable(chunk, bits, even, odd, np.float32(0.0), limit)
        return
    scale = even.size / upper
    if _F32_NORMAL_MIN <= scale <= _F32_POW2_MAX:
        _bin_usable(chunk, bits, even, odd, np.float32(scale), limit)
    else:
        _bin_usable(chunk, bits, even, odd, scale, limit)


@compiled(nogil=True)
def _chunk_usable(chunk, bits, counts, even, odd, into, upper, limit, z, negz, scratch):  # pragma: no cover - compiled
    """A float32 chunk holding values to leave out (non-finite or huge): (min, max, non-finite, huge, new upper).

    The same results as :func:`_chunk_slow` (min/max of the usable values, a zero min or max the
    first zero in data order, counts of what is left out), at about half its cost: an integer-key
    scan like the clean chunks' and the two partial tables. ``even``/``odd``: the partial tables, merged
    with ``counts`` when the range grows; ``into``: 0 to bin into them, 1 straight into ``counts`` (a
    small array: the tables are empty). ``z``/``negz``: the chunk's exact zeros and -0.0 (from
    :func:`_scan_bits`; a left-out value is never zero).
    """
    kmin, kmax, usable, nonfinite = _scan_usable(bits, limit)
    if usable == 0:
        return np.inf, -np.inf, nonfinite, chunk.size - nonfinite, upper
    cmn, cmx = _extremes(kmin, kmax, z, negz, bits, scratch)
    upper = _grow(counts, even, odd, upper, max(abs(cmn), abs(cmx)))
    if into:
        _bin_usable_chunk(chunk, bits, counts, counts, upper, limit)
    else:
        _bin_usable_chunk(chunk, bits, even, odd, upper, limit)
    return cmn, cmx, nonfinite, chunk.size - usable - nonfinite, upper
