"""Histograms of a tensor ``x`` and of ``y = Relu(x)`` or ``Clip(x, 0, h)`` from one pass over ``x``.

In a CNN about half of the activation values are the outputs of a Relu or a
ReLU6 whose input is also calibrated (EfficientNet-Lite0: 47 %). ``y`` holds no
information ``x`` does not, but its histogram cannot be read off ``x``'s:
``y``'s range (at most ``h``) is usually finer than ``x``'s. So each value of
``x`` is binned once, into one of two parts::

    x ──> P: 0 <= x < R_h  binned at P's own range (R_h: power of two above h; inf for Relu)
      └─> Q: all others     binned at x's range, |x|          + counts: x < 0, x >= R_h

    |x| histogram = P merged up to x's range (adjacent pairs) + Q
    |y| histogram = P, bins above h's bin moved into it, + (x >= R_h) at h's bin + (x < 0) at 0

Both are exactly what binning ``|x|`` and ``y`` value by value gives
(quantlab.histogram): P's range is the power of two above ``min(max x, h)``,
which is ``y``'s range, and merging pairs up to a larger range is exact.

``y`` is derived from the definition, not from what the backend computed: the
two agree except where ``max(x, 0)`` is implementation-defined, for NaN and
for -0.0 (``std::max`` keeps -0.0, SSE's ``maxps`` gives +0.0), and where ``x``
is non-finite or huge. :meth:`ClippedPair.update` raises :class:`NotDerivable`
on such data (and on ranges outside float32's normal scales); the pair's counts
are then unusable, and the statistics pass starts again with ``y`` computed by the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from .binning import CHUNK, compiled, huge_bits, merge_pairs, power_of_two_above
from .binning.core import _F32_NORMAL_MIN, _F32_POW2_MAX, _I32, _grow, _key_float, _scan_bits
from .histogram import HistogramState, checked_bins

__all__ = ["ClippedPair", "NotDerivable", "derivable_limit"]

_U32 = np.uint32
_MAX_VALUES = 1 << 30
"""Values per update binned in the int32 partial tables (no overflow); larger arrays are not derived."""


class NotDerivable(Exception):
    """This batch of ``x`` holds values for which ``y`` is not defined by ``x`` alone (see the module docstring)."""


def derivable_limit(h: float, huge_threshold: float) -> float | None:
    """``R_h``, the power of two above the Clip's max ``h`` (inf for none), or None when ``y`` cannot be
    derived: ``h`` not > 0, or a finite ``h`` that is not below ``huge_threshold`` (its ``y`` is left out)."""
    if math.isnan(h) or h <= 0.0:
        return None
    if math.isinf(h):
        return math.inf
    if h >= huge_threshold or h >= 2.0**127:
        return None
    return power_of_two_above(h)


@compiled(nogil=True, boundscheck=False)
def _pair_indices(flat, bits, out, p_limit, p_scale, q_scale, offset, cap):  # pragma: no cover - compiled
    """Bin index of each value: P's bins for ``0 <= x < R_h``, ``offset`` + Q's bins of |x| for the others;
    returns (negatives, x >= R_h). ``p_limit`` is the bit pattern of R_h (of +inf for Relu).

    Branch-free (a branch mispredicts on signed data: 6 instead of 1.2 ns a value); P's index of a Q value
    is computed from ``min(|x|, cap)`` so that it stays in range, then masked out. In 32-bit lanes (casts, as
    quantlab.binning's scan; a chunk's counts fit int32): 0.42 instead of 0.88 ns a value on an AVX2 CPU.
    """
    neg = _I32(0)
    big = _I32(0)
    for i in range(flat.size):
        b = bits[i]
        neg = _I32(neg + _I32(b < _I32(0)))
        big = _I32(big + _I32(b >= p_limit))
        in_p = _U32(_U32(0) - _U32(_I32(b >= _I32(0)) & _I32(b < p_limit)))
        a = abs(flat[i])
        p_index = _U32(_U32(min(a, cap) * p_scale) & in_p)
        out[i] = _U32(p_index | _U32(_U32(offset + _U32(a * q_scale)) & _U32(~in_p)))
    return neg, big


@compiled(nogil=True, boundscheck=False)
def _increment(indices, even, odd):  # pragma: no cover - compiled
    pairs = indices.size // 2 * 2
    for i in range(0, pairs, 2):
        even[indices[i]] += 1
        odd[indices[i + 1]] += 1
    for i in range(pairs, indices.size):
        even[indices[i]] += 1


@compiled(nogil=True)
def _scales(p_upper, q_upper, bins):  # pragma: no cover - compiled
    """(ok, P's scale, Q's scale): ``bins / upper`` (0 for an empty range), ok when both are exact in float32."""
    p_scale = bins / p_upper if p_upper > 0.0 else 0.0
    q_scale = bins / q_upper if q_upper > 0.0 else 0.0
    ok = True
    for s in (p_scale, q_scale):
        if s != 0.0 and not (_F32_NORMAL_MIN <= s <= _F32_POW2_MAX):
            ok = False
    return ok, np.float32(p_scale), np.float32(q_scale)


@compiled(nogil=True)
def _update_pair(flat, p_counts, q_counts, p_upper, q_upper, h, p_limit, limit, tables,
                 indices):  # pragma: no cover - compiled
    """Bin float32 ``flat`` into P and Q chunk by chunk (see the module docstring), or report it not derivable.

    Returns ``(ok, min, max, zeros, negatives, big, p_upper, q_upper)``. With ``ok`` False the counts
    are partly updated: the caller drops them (the pass starts again without deriving).
    ``tables``: ``[2, 2 * bins]`` int32 partial tables the counts are pending in (P's bins, then Q's);
    ``indices``: uint32 scratch of a chunk. Each chunk (in the cache) is scanned (quantlab.binning's scan:
    min/max, zeros, values that make it not derivable), the ranges grown, then its indices computed and counted.
    """
    bits = flat.view(np.int32)
    scratch = np.empty(1, np.int32)
    bins = p_counts.size
    p_even = tables[0, :bins]
    p_odd = tables[1, :bins]
    q_even = tables[0, bins:]
    q_odd = tables[1, bins:]
    mn = np.float32(np.inf)
    mx = np.float32(-np.inf)
    zeros = 0
    neg = 0
    big = 0
    ok = True
    for start in range(0, flat.size, CHUNK):
        chunk = flat[start:start + CHUNK]
        chunk_bits = bits[start:start + CHUNK]
        kmin, kmax, z, negz, bad = _scan_bits(chunk_bits, limit)
        if bad or negz:
            ok = False
            break
        cmn = _key_float(kmin, scratch)
        cmx = _key_float(kmax, scratch)
        mn = min(mn, cmn)
        mx = max(mx, cmx)
        zeros += z
        q_upper = _grow(q_counts, q_even, q_odd, q_upper, max(abs(np.float64(cmn)), abs(np.float64(cmx))))
        if cmx > 0.0:
            p_upper = _grow(p_counts, p_even, p_odd, p_upper, min(np.float64(cmx), h))
        ok, p_scale, q_scale = _scales(p_upper, q_upper, bins)
        if not ok:  # float32 products would not be exact (ranges near float32's ends)
            break
        out = indices[:chunk.size]
        cneg, cbig = _pair_indices(chunk, chunk_bits, out, p_limit, p_scale, q_scale, np.uint32(bins),
                                   np.float32(p_upper))
        neg += cneg
        big += cbig
        _increment(out, tables[0], tables[1])
    return ok, mn, mx, zeros, neg, big, p_upper, q_upper


@compiled(nogil=True)
def _settle(p_counts, q_counts, tables):  # pragma: no cover - compiled
    """Add the pending int32 partial tables to the counts and clear them."""
    bins = p_counts.size
    for k in range(bins):
        p_counts[k] += tables[0, k] + np.int64(tables[1, k])
        q_counts[k] += tables[0, bins + k] + np.int64(tables[1, bins + k])
    tables[:] = 0


class ClippedPair:
    """The reducer of a tensor ``x`` that also yields the statistics of ``Clip(x, 0, h)`` (``h`` inf: Relu).

    Fed like :class:`quantlab.histogram.AbsHistogram` (float32 only); :meth:`state` is ``x``'s
    statistics and :meth:`clipped_state` ``y``'s, both equal to what AbsHistogram gives for ``x`` and ``y``.
    """

    def __init__(self, h: float, bins: int, huge_threshold: float) -> None:
        self.h = float(np.float32(h)) if math.isfinite(h) else math.inf
        limit = derivable_limit(self.h, huge_threshold)
        if limit is None:
            raise ValueError(f"Clip(x, 0, {h}) cannot be derived (max not in (0, {huge_threshold}))")
        self.bins = checked_bins(bins)
        self.huge_threshold = float(huge_threshold)
        self._p_limit = np.int32(huge_bits(limit))  # x >= R_h as bits (+inf's for Relu: none)
        self._limit = np.int32(huge_bits(huge_threshold))
        self.p_counts = np.zeros(self.bins, np.int64)
        self.q_counts = np.zeros(self.bins, np.int64)
        self.p_upper = 0.0
        self.q_upper = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.count = self.zeros = self.negatives = self.big = 0
        self._tables = np.zeros((2, 2 * self.bins), np.int32)  # counts pending (int32: half the cache)
        self._pending = 0
        self._indices = np.empty(CHUNK, np.uint32)

    def update(self, array: np.ndarray, weight: int = 1) -> None:
        """Add every element of ``array``, ``weight`` times (see AbsHistogram.update); raises
        :class:`NotDerivable` (see the module docstring)."""
        if weight < 1:
            raise ValueError(f"weight must be >= 1, got {weight}")
        for _ in range(weight):
            self._update(array)

    def _update(self, array: np.ndarray) -> None:
        flat = np.ravel(np.asarray(array))
        if flat.dtype != np.float32 or flat.size >= _MAX_VALUES:
            raise NotDerivable(f"{flat.dtype} array of {flat.size} values")
        if not flat.size:
            return
        if self._pending + flat.size >= _MAX_VALUES:
            self._settle()
        self._pending += flat.size
        ok, mn, mx, zeros, neg, big, self.p_upper, self.q_upper = _update_pair(
            flat, self.p_counts, self.q_counts, self.p_upper, self.q_upper, self.h, self._p_limit, self._limit,
            self._tables, self._indices)
        if not ok:
            raise NotDerivable("NaN, inf, huge values, -0.0, or a range at float32's ends")
        self.count += flat.size
        self.zeros += int(zeros)
        self.negatives += int(neg)
        self.big += int(big)
        self.min = min(self.min, float(mn))
        self.max = max(self.max, float(mx))

    def update_values(self, pieces: Sequence[np.ndarray], in_layout: Callable[[], np.ndarray]) -> None:
        """:meth:`update` for a tensor in pieces, in another order: no result here depends on the order
        (there is no -0.0 whose position would decide a zero min's sign)."""
        for piece in pieces:
            self.update(piece)

    def _settle(self) -> None:
        _settle(self.p_counts, self.q_counts, self._tables)
        self._pending = 0

    def state(self) -> HistogramState:
        """``x``'s statistics: P merged up to x's range, plus Q."""
        self._settle()
        counts = self.p_counts.copy()
        if self.p_upper > 0.0 and self.q_upper > self.p_upper:
            counts = merge_pairs(counts, round(math.log2(self.q_upper / self.p_upper)))
        counts += self.q_counts
        return self._snapshot(counts, self.q_upper, self.min, self.max, self.zeros)

    def clipped_state(self) -> HistogramState:
        """``y = Clip(x, 0, h)``'s statistics: P with every value at or above ``h`` moved to ``h``'s bin."""
        self._settle()
        counts = self.p_counts.copy()
        if self.p_upper > 0.0 and self.h < self.p_upper:
            at_h = int(self.h * self.bins / self.p_upper)  # exact: bins / p_upper is a power of two
            counts[at_h] += counts[at_h + 1:].sum() + self.big
            counts[at_h + 1:] = 0
        counts[0] += self.negatives
        def clip(v: float) -> float:
            return 0.0 if v <= 0.0 else min(v, self.h)

        return self._snapshot(counts, self.p_upper, clip(self.min), clip(self.max), self.zeros + self.negatives)

    def _snapshot(self, counts: np.ndarray, upper: float, mn: float, mx: float, zeros: int) -> HistogramState:
        counts.setflags(write=False)
        empty = self.count == 0
        return HistogramState(counts=counts, upper=float(upper), min=0.0 if empty else float(mn),
                              max=0.0 if empty else float(mx), count=int(self.count), nonfinite=0, huge=0,
                              huge_threshold=self.huge_threshold, zeros=int(zeros))
