"""Compiled kernels behind quantlab.histogram: bin |x| of a batch into fine bins over ``[0, R)``, R a power of two.

:func:`update_counts` adds one flat array to a histogram's counts (in place)
and returns its min/max/count/zero/non-finite/huge tallies and the new ``R``.
float32 arrays, the common case, go through chunks of :data:`CHUNK` values
that stay in the L1/L2 cache, two loops per chunk::

    chunk ──> scan (integer ops on the float bits, SIMD: ~0.25 ns/value)
                 min/max as order-preserving integer keys, exact zeros, -0.0, non-finite or huge values
          ──> grow R first if the chunk's |x| reaches it (adjacent bin pairs merge)
          ──> bin  (one scattered increment per value, no branch; float32 product, two int32 tables)

A chunk holding a non-finite or huge value (attention scores with padded keys
at float32.min or -inf) takes :func:`_chunk_usable`: the scan again with the
left-out values masked by selects, then the binning with one branch per value
(the masked positions come in runs the predictor follows): 1.2-1.4 ns a value on
such scores, where the per-value path took 2.3. float64 arrays take the
per-value kernels (:func:`_chunk_slow`) for the whole array. Every path gives the same counts and the same min/max as binning value
by value in data order (a value lands in ``floor(|x| * bins / R_final)``
whichever ``R`` it met first: see quantlab.histogram), including which zero,
+0.0 or -0.0, is the min when the min is zero (the first one in data order).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

__all__ = ["CHUNK", "compiled", "power_of_two_above", "merge_pairs", "huge_bits", "partial_tables", "update_counts",
           "warm_up"]

CHUNK = 1 << 14
"""Values per chunk of the float32 kernel: 64 KiB, read once from memory, then again from the cache."""

_ABS = 0x7FFFFFFF
_NEG_ZERO = -0x80000000
_F32_NORMAL_MIN = 2.0**-126
_F32_POW2_MAX = 2.0**127
_F32_INF_BITS = 0x7F800000
_FLUSH = 1 << 30
"""Values binned into the int32 partial tables before they are added to the int64 counts (no overflow)."""


def compiled(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``numba.njit(cache=True, **options)``, or without the cache when no folder for it is writable.

    numba keeps compiled code next to the module (``__pycache__``), else in
    ``$NUMBA_CACHE_DIR`` or the user's cache folder; when none is writable
    (read-only install and home) ``cache=True`` fails at decoration, so the
    kernels are then compiled once per process instead (a few seconds).
    """

    def decorate(function: Callable[..., Any]) -> Any:
        try:
            return numba.njit(cache=True, **options)(function)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(**options)(function)

    return decorate


def power_of_two_above(value: float) -> float:
    """The smallest power of two strictly greater than ``value`` (> 0)."""
    _, exponent = math.frexp(value)  # value = m * 2**e, 0.5 <= m < 1  =>  value < 2**e
    return math.ldexp(1.0, exponent)


def merge_pairs(counts: np.ndarray, doublings: int) -> np.ndarray:
    """Counts over ``[0, R * 2**doublings)``: each doubling merges adjacent pairs into the lower half (a copy)."""
    out = np.array(counts, dtype=np.int64)
    _merge_in_place(out, doublings)
    return out


def huge_bits(huge: float) -> int:
    """The int32 bit pattern ``h`` with ``(bits & 0x7fffffff) >= h`` iff a float32 is non-finite or ``|x| >= huge``."""
    with np.errstate(over="ignore"):
        f = np.float32(huge)  # inf above float32's range: then only non-finite values reach the limit
    if float(f) < huge:
        f = np.nextafter(f, np.float32(np.inf))
    return min(int(np.array(f, dtype=np.float32).view(np.int32)), 0x7F800000)


@compiled(nogil=True)
def _merge_in_place(counts, doublings):  # pragma: no cover - compiled
    if counts.size < 2:
        return
    half = counts.size // 2
    steps = min(doublings, int(math.log2(counts.size)))  # after log2(bins) doublings all counts are in bin 0
    for _ in range(steps):
        for k in range(half):
            counts[k] = counts[2 * k] + counts[2 * k + 1]  # reads 2k, 2k+1 >= k: never an already merged bin
        counts[half:] = 0


@compiled(nogil=True)
def _grow(counts, even, odd, upper, absmax):  # pragma: no cover - compiled
    """The range after seeing ``absmax``: ``upper`` if it covers it, else the power of two above.

    Adjacent bin pairs merge in ``counts`` and in the call's two partial tables ``even``/``odd``.
    """
    if absmax == 0.0 or absmax < upper:
        return upper
    _, exponent = math.frexp(absmax)  # absmax < 2**exponent
    new = math.ldexp(1.0, exponent)
    if upper > 0.0:
        _, old_exponent = math.frexp(upper)  # upper = 0.5 * 2**old_exponent
        _merge_in_place(counts, exponent - old_exponent + 1)
        _merge_in_place(even, exponent - old_exponent + 1)
        _merge_in_place(odd, exponent - old_exponent + 1)
    return new


@compiled(nogil=True, boundscheck=False)
def _scan_bits(bits, limit):  # pragma: no cover - compiled
    """(min key, max key, zeros, -0.0 count, bad count) of ``bits`` (an int32 view of float32 values).

    A key ``b ^ ((b >> 31) & 0x7fffffff)`` orders like the float (-0.0 just below +0.0);
    ``bad`` counts values whose magnitude bits reach ``limit`` (non-finite or huge).
    A loop over ``range(bits.size)`` of a slice vectorises; ``range(start, stop)``
    did not (1.4 instead of 0.28 ns per value).
    """
    kmin = np.int32(0x7FFFFFFF)
    kmax = np.int32(-0x80000000)
    zeros = 0
    negz = 0
    bad = 0
    for i in range(bits.size):
        b = bits[i]
        key = b ^ ((b >> np.int32(31)) & np.int32(_ABS))
        kmin = min(kmin, key)
        kmax = max(kmax, key)
        mag = b & np.int32(_ABS)
        zeros += mag == 0
        negz += b == np.int32(_NEG_ZERO)
        bad += mag >= limit
    return kmin, kmax, zeros, negz, bad


@compiled(nogil=True)
def _key_float(key, scratch):  # pragma: no cover - compiled
    """The float32 a scan key stands for (the key transform is its own inverse)."""
    scratch[0] = key ^ ((key >> np.int32(31)) & np.int32(_ABS))
    return scratch.view(np.float32)[0]


@compiled(nogil=True)
def _key_value(key, bits, scratch):  # pragma: no cover - compiled
    """Like :func:`_key_float`, but a zero key stands for the first zero in ``bits`` (either sign)."""
    if key == -1 or key == 0:
        for i in range(bits.size):
            if bits[i] & _ABS == 0:
                scratch[0] = bits[i]
                return scratch.view(np.float32)[0]
    return _key_float(key, scratch)


@compiled(nogil=True, boundscheck=False)
def _bin_all(flat, even, odd, scale):  # pragma: no cover - compiled
    """Bin every value (all have |x| < R, so every index is < bins), even ones into ``even``, odd into ``odd``.

    Two tables break the chain of increments to one bin (a run of exact zeros after a
    ReLU): 0.7 instead of 2.7 ns per value on such tensors. Unsigned indices: no wrap-around code.
    ``scale`` is float32 when the power of two ``bins / R`` is a normal float32: ``|x| * scale``
    is then exact in float32 as in float64 (or below 1 either way), and the float32 product
    and int32 tables (half the cache) take 0.74 instead of 0.89 ns per value.
    """
    pairs = flat.size // 2 * 2
    for i in range(0, pairs, 2):
        even[np.uint32(abs(flat[i]) * scale)] += 1
        odd[np.uint32(abs(flat[i + 1]) * scale)] += 1
    for i in range(pairs, flat.size):
        even[np.uint32(abs(flat[i]) * scale)] += 1


_TINY_UPPER = 2.0 ** -900
"""Below this range (float64 data only: float32's smallest denormal is 2**-149) the bin of a value is
``|x| / upper * bins``: ``bins / upper`` would overflow."""


@compiled(nogil=True)
def _bin_chunk(chunk, even, odd, upper):  # pragma: no cover - compiled
    """:func:`_bin_all` with the scale ``bins / upper``, in float32 when that is exact (see there)."""
    if upper == 0.0:
        _bin_all(chunk, even, odd, np.float32(0.0))
        return
    scale = even.size / upper
    if _F32_NORMAL_MIN <= scale <= _F32_POW2_MAX:
        _bin_all(chunk, even, odd, np.float32(scale))
    else:
        _bin_all(chunk, even, odd, scale)


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
    keys, through selects, so the loop stays vectorised. No usable value: the keys stay at their
    starting points (check ``usable``).
    """
    kmin = np.int32(0x7FFFFFFF)
    kmax = np.int32(-0x80000000)
    usable = 0
    nonfinite = 0
    for i in range(bits.size):
        b = bits[i]
        mag = b & np.int32(_ABS)
        ok = mag < limit
        key = b ^ ((b >> np.int32(31)) & np.int32(_ABS))
        kmin = min(kmin, key if ok else np.int32(0x7FFFFFFF))
        kmax = max(kmax, key if ok else np.int32(-0x80000000))
        usable += ok
        nonfinite += mag >= np.int32(_F32_INF_BITS)
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
    if negz > 0 and z > negz:
        cmn = _key_value(kmin, bits, scratch)
        cmx = _key_value(kmax, bits, scratch)
    else:
        cmn = _key_float(kmin, scratch)
        cmx = _key_float(kmax, scratch)
    upper = _grow(counts, even, odd, upper, max(abs(cmn), abs(cmx)))
    if into:
        _bin_usable_chunk(chunk, bits, counts, counts, upper, limit)
    else:
        _bin_usable_chunk(chunk, bits, even, odd, upper, limit)
    return cmn, cmx, nonfinite, chunk.size - usable - nonfinite, upper


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
            if size:
                pending += chunk.size
                if pending >= _FLUSH:
                    _flush(counts, even, odd)
                    pending = 0
            nonfinite += nf
            n_huge += nh
        else:
            if negz > 0 and z > negz:  # both signed zeros: a zero min/max is the first zero, as value by value
                cmn = _key_value(kmin, chunk_bits, scratch)
                cmx = _key_value(kmax, chunk_bits, scratch)
            else:
                cmn = _key_float(kmin, scratch)
                cmx = _key_float(kmax, scratch)
            upper = _grow(counts, even, odd, upper, max(abs(cmn), abs(cmx)))
            if size:
                _bin_chunk(chunk, even, odd, upper)
                pending += chunk.size
                if pending >= _FLUSH:
                    _flush(counts, even, odd)
                    pending = 0
            else:
                _bin_chunk(chunk, counts, counts, upper)
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
