"""Streaming histogram of |x| per tensor: bounded memory, exact merges, order-independent.

Each tensor gets a fixed number of fine bins (default 2**14) over ``[0, R)``
where ``R`` is always a power of two: the smallest one strictly greater than
the largest |x| seen so far. When a batch holds a larger value, ``R`` doubles
(adjacent bin pairs merge) until it covers it::

    R = 4   |0|1|2|3|4|5|6|7|        8 fine bins of width R/8
    R = 8   | 0+1 | 2+3 | 4+5 | 6+7 | 0 0 0 0 |    pairs merge, upper half empties

A value x always lands in bin ``floor(|x| * bins / R_final)``: binning
against an earlier, smaller ``R`` then merging pairs gives the same bin
(``floor(floor(y) / 2) == floor(y / 2)``), and ``|x| * bins / R`` is exact
in floating point because it is a multiplication by a power of two. So the
final histogram is bit-identical whatever the batch size, split or order.

Exact zeros are binned (bin 0) and also counted on their own (``zeros``):
after ReLU/ReLU6 they are often half or more of a tensor, and symmetric INT8
represents 0 exactly, so a method may want to leave them out (the entropy
method does, see quantlab.calibrators.amax_entropy). They are counted in the
same compiled call, in the vectorised scan that precedes binning.

Values that cannot be binned are counted, not binned: non-finite values
(NaN, +-inf) and "huge" finite values with ``|x| >= huge_threshold`` (default
1e30: additive attention masks at float32.min). They are also left out of
min/max, so one mask does not stretch a range over 38 decades (ONNX Runtime's
histogram calibrators crash on them with "Too many bins for data range").

The kernels (quantlab.binning, compiled with numba) scan a cache-sized chunk
for min/max/zeros/non-finite values, grow ``R`` first if the chunk needs it,
then bin the chunk without a branch. ``np.histogram`` is ~10x slower for this.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .binning import merge_pairs, partial_tables, power_of_two_above, update_counts
from .calibrators import percentile_of_cumulative
from .methods import DEFAULT_BINS, DEFAULT_HUGE_THRESHOLD
from .noise import Signal, signal_of, sqnr_db_of

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_HUGE_THRESHOLD",
    "MAX_BINS",
    "AbsHistogram",
    "HistogramState",
    "checked_bins",
    "power_of_two_above",
]

MAX_BINS = 2**30
"""Bin indices are computed as uint32 in the compiled kernels (8 GiB of counts: never near it)."""


@dataclass(frozen=True, eq=False)
class HistogramState:
    """An immutable snapshot of one tensor's statistics.

    ``counts[k]`` counts usable values with ``k*w <= |x| < (k+1)*w``, where
    ``w = upper / bins``. ``upper`` is 0.0 while every usable value was zero
    (they are all in bin 0). ``min``/``max``/``count`` cover usable values only;
    ``nonfinite`` and ``huge`` count the values left out. ``zeros`` counts the
    usable values that are exactly 0.0 (-0.0 included): they are part of
    ``counts[0]`` and of ``count``, and are a point mass at 0 for
    :meth:`cdf_at` (not spread over bin 0).
    """

    counts: np.ndarray = field(repr=False)
    upper: float
    min: float
    max: float
    count: int
    nonfinite: int = 0
    huge: int = 0
    huge_threshold: float = DEFAULT_HUGE_THRESHOLD
    zeros: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.zeros <= self.count or (self.zeros and self.zeros > int(self.counts[0])):
            raise ValueError(f"zeros ({self.zeros}) must be within 0..min(count, counts[0]) "
                             f"(count {self.count}, counts[0] {int(self.counts[0]) if self.counts.size else 0})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HistogramState):
            return NotImplemented
        return (
            (self.upper, self.min, self.max, self.count, self.nonfinite, self.huge, self.huge_threshold, self.zeros)
            == (other.upper, other.min, other.max, other.count, other.nonfinite, other.huge, other.huge_threshold,
                other.zeros)
            and np.array_equal(self.counts, other.counts)
        )

    __hash__ = None  # type: ignore[assignment]  # holds an array

    @property
    def bins(self) -> int:
        return int(self.counts.size)

    @property
    def absmax(self) -> float:
        """Largest |x| among usable values (0.0 when there are none)."""
        if self.count == 0:
            return 0.0
        return float(max(abs(self.min), abs(self.max)))

    @property
    def excluded(self) -> dict[str, int]:
        return {"nonfinite": int(self.nonfinite), "huge": int(self.huge)}

    @property
    def zero_fraction(self) -> float:
        """Share of usable values that are exactly zero (0.0 when there are none)."""
        return self.zeros / self.count if self.count else 0.0

    def without_zeros(self) -> HistogramState:
        """The same statistics with the exact zeros taken out of ``counts[0]`` and ``count``.

        ``min``/``max`` are kept (they set the range, and a zero never widens
        it). For methods that should not weigh values INT8 represents exactly.
        """
        if self.zeros == 0:
            return self
        counts = self.counts.copy()
        counts[0] -= self.zeros
        counts.setflags(write=False)
        return HistogramState(counts=counts, upper=self.upper, min=self.min, max=self.max,
                              count=self.count - self.zeros, nonfinite=self.nonfinite, huge=self.huge,
                              huge_threshold=self.huge_threshold, zeros=0)

    def bin_edges(self) -> np.ndarray:
        """``bins + 1`` edges over ``[0, upper]`` (float64)."""
        return self._edges.copy()

    @cached_property
    def _edges(self) -> np.ndarray:
        return np.linspace(0.0, self.upper, self.bins + 1)

    def cdf_at(self, x: float | np.ndarray) -> np.ndarray:
        """Count of usable values with |x| below ``x``: linear within a fine bin, all of it at ``absmax``.

        The fine bin holding ``absmax`` is taken to end at ``absmax`` (no value
        lies above it), so ``cdf_at(absmax) == count``. Exact zeros are a point
        mass at 0: counted for every ``x > 0``, not spread over bin 0.
        """
        xs = np.asarray(x, dtype=np.float64)
        total = float(self.cumulative_counts[-1])
        if self.upper == 0.0 or total == 0.0:
            return np.where(xs > 0, total, 0.0)
        xp, fp = self._cdf_points
        return np.interp(xs, xp, fp) + np.where(xs > 0, float(self.zeros), 0.0)

    @cached_property
    def _cdf_points(self) -> tuple[np.ndarray, np.ndarray]:
        """The points :meth:`cdf_at` interpolates between (of a state with a range and values)."""
        zeros = float(self.zeros)
        cum = self.cumulative_counts.copy()
        cum[1:] -= zeros
        total = float(self.cumulative_counts[-1]) - zeros
        edges = self._edges
        absmax = self.absmax
        k = min(int(absmax * self.bins / self.upper), self.bins - 1)  # fine bin holding absmax
        if absmax > edges[k]:
            return np.concatenate([edges[: k + 1], [absmax]]), np.concatenate([cum[: k + 1], [total]])
        return edges[: k + 1], np.concatenate([cum[:k], [total]])  # absmax on an edge: its mass joins the bin below

    def rebin_to(self, n_bins: int, upper: float) -> np.ndarray:
        """Counts (float64) of ``n_bins`` equal bins over ``[0, upper]``.

        Mass inside a fine bin is taken as uniform (linear interpolation of the
        CDF between fine edges). Values above ``upper`` are not counted. Used to
        build the 2048-bin histogram over ``[0, absmax]`` the entropy method needs.
        """
        if upper <= 0.0:
            out = np.zeros(n_bins, dtype=np.float64)
            out[0] = float(self.counts[0]) if self.upper == 0.0 else float(self.cdf_at(0.0))
            return out
        cdf = self.cdf_at(np.linspace(0.0, upper, n_bins + 1))
        return np.diff(cdf)

    def coarsen(self, n_bins: int) -> tuple[np.ndarray, float]:
        """``(counts, upper)``: ``n_bins`` integer bins over ``[0, upper]`` covering ``absmax`` exactly.

        Each coarse bin is ``g`` whole fine bins, ``g`` the smallest integer with
        ``n_bins * g`` fine bins reaching past ``absmax``; so
        ``absmax <= upper < 1.25 * absmax + one coarse bin`` and no count is split
        or interpolated (the entropy method is sensitive to how sparse tail bins
        are cut, so its histogram must be exact). Histograms with fewer than
        ``2 * n_bins`` fine bins fall back to :meth:`rebin_to` over ``[0, absmax]``.
        """
        absmax = self.absmax
        if self.count == 0 or absmax == 0.0:
            return np.zeros(n_bins, dtype=np.float64), 0.0
        if self.bins < 2 * n_bins:
            return self.rebin_to(n_bins, absmax), absmax
        needed = int(absmax * self.bins / self.upper) + 1  # fine bins up to and including absmax's
        group = -(-needed // n_bins)
        counts = self.counts[: n_bins * group].reshape(n_bins, group).sum(axis=1).astype(np.float64)
        return counts, n_bins * group * (self.upper / self.bins)

    def fraction_above(self, threshold: float) -> float:
        """Share of usable values with |x| > ``threshold`` (interpolated within a fine bin)."""
        if self.count == 0 or threshold >= self.absmax:
            return 0.0
        return float(max(0.0, (self.count - float(self.cdf_at(threshold))) / self.count))

    def zeroed_fraction(self, amax: float, levels: int = 127) -> float:
        """Share of the non-zero usable values symmetric INT8 with this ``amax`` rounds to 0: |x| under half a step
        (``amax / levels / 2``), interpolated within a fine bin; 0.0 for amax 0 or no non-zero value."""
        nonzero = self.count - self.zeros
        if amax <= 0.0 or nonzero <= 0:
            return 0.0
        below = float(self.cdf_at(0.5 * amax / levels)) - self.zeros
        return min(1.0, max(0.0, below / nonzero))

    def predicted_sqnr_db(self, amax: float, levels: int = 127) -> float:
        """SQNR in dB symmetric INT8 with this ``amax`` would give these values (rounding and saturation, at the
        fine bins' resolution: :func:`quantlab.noise.predicted_sqnr_db`); nan when no value is non-zero."""
        return sqnr_db_of(self._signal, amax, levels)

    @cached_property
    def _signal(self) -> Signal | None:
        return signal_of(self.counts, self.upper, self.zeros)

    def quantile(self, q: float) -> float:
        """|x| below which a share ``q`` (0..1] of usable values lie, interpolated in the fine bins."""
        return self.percentile(100.0 * q)

    def percentile(self, percentile: float) -> float:
        """|x| below which ``percentile`` % of usable values lie (at most ``absmax``; 0.0 when there are none)."""
        if self.count == 0 or self.upper == 0.0:
            return 0.0
        cum = self.cumulative_counts
        return min(percentile_of_cumulative(cum, float(cum[-1]), self.upper, percentile), self.absmax)

    @cached_property
    def cumulative_counts(self) -> np.ndarray:
        """``[0, c0, c0 + c1, ...]`` as float64 (exact: counts stay far below 2**53); computed once per snapshot."""
        cum = np.concatenate([[0.0], np.cumsum(self.counts, dtype=np.float64)])
        cum.setflags(write=False)
        return cum


def _flat_float(array: np.ndarray) -> np.ndarray:
    """``array`` flat, float32 or float64 (other floats become float32)."""
    flat = np.asarray(array)
    if flat.dtype not in (np.float32, np.float64):
        flat = flat.astype(np.float32)
    return np.ravel(flat)


def checked_bins(bins: int) -> int:
    """``bins`` as an int, or ValueError unless it is a power of two in ``[2, MAX_BINS]``."""
    if bins < 2 or bins & (bins - 1) or bins > MAX_BINS:
        raise ValueError(f"bins must be a power of two in [2, {MAX_BINS}], got {bins}")
    return int(bins)


class AbsHistogram:
    """Mutable accumulator behind :class:`HistogramState`; feed it batches with :meth:`update`."""

    def __init__(self, bins: int = DEFAULT_BINS, huge_threshold: float = DEFAULT_HUGE_THRESHOLD) -> None:
        self.bins = checked_bins(bins)
        if not huge_threshold > 0:
            raise ValueError(f"huge_threshold must be > 0, got {huge_threshold}")
        self.huge_threshold = float(huge_threshold)
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.upper = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.nonfinite = 0
        self.huge = 0
        self.zeros = 0
        self._tables: np.ndarray | None = None  # update_counts' scratch, made on the first large update

    def _scratch(self, size: int) -> np.ndarray | None:
        if size < self.bins:
            return None
        if self._tables is None:
            self._tables = partial_tables(self.bins)
        return self._tables

    def _grow_to(self, new_upper: float) -> None:
        if self.upper == 0.0:
            self.upper = new_upper  # everything binned so far is zero: stays in bin 0
            return
        doublings = round(math.log2(new_upper / self.upper))
        if doublings > 0:
            self.counts = merge_pairs(self.counts, doublings)
            self.upper = new_upper

    def update(self, array: np.ndarray, weight: int = 1) -> None:
        """Add every element of ``array`` (any shape; float16/32/64), ``weight`` times.

        ``weight`` > 1 is for a value that stands for several samples (a tensor
        with no sample axis, computed once per model run of ``weight``
        samples): the same statistics as adding it ``weight`` times, binned once.
        """
        flat = _flat_float(array)
        if not flat.size:
            return
        if weight == 1:
            self._add(*update_counts(flat, self.counts, self.upper, self.huge_threshold, self._scratch(flat.size)))
            return
        if weight < 1:
            raise ValueError(f"weight must be >= 1, got {weight}")
        counts = np.zeros(self.bins, np.int64)
        mn, mx, usable, nonfinite, n_huge, zeros, negzeros, upper = update_counts(
            flat, counts, self.upper, self.huge_threshold, self._scratch(flat.size))
        self._grow_to(upper)  # the range the counts were binned in (they started in this one)
        self.counts += counts * weight
        self._add(mn, mx, usable * weight, nonfinite * weight, n_huge * weight, zeros * weight, negzeros * weight,
                  upper)

    def update_values(self, pieces: Sequence[np.ndarray], in_layout: Callable[[], np.ndarray]) -> None:
        """:meth:`update` for a tensor given as ``pieces`` in another order than its layout (a backend's own).

        Only one result depends on the order: a zero min (or max) is the first
        zero in data order, +0.0 or -0.0. When both signs occur and the
        extreme is zero, ``in_layout()`` (the tensor in its layout) decides.
        """
        mn, mx = math.inf, -math.inf
        usable = nonfinite = n_huge = zeros = negzeros = 0
        for piece in pieces:
            flat = _flat_float(piece)
            if not flat.size:
                continue
            pmn, pmx, pu, pnf, ph, pz, pnz, self.upper = update_counts(
                flat, self.counts, self.upper, self.huge_threshold, self._scratch(flat.size))
            mn, mx = min(mn, pmn), max(mx, pmx)
            usable, nonfinite, n_huge, zeros, negzeros = (usable + pu, nonfinite + pnf, n_huge + ph, zeros + pz,
                                                          negzeros + pnz)
        if 0 < negzeros < zeros and (mn == 0.0 or mx == 0.0):
            ordered = _flat_float(in_layout())
            first = float(ordered[np.flatnonzero(ordered == 0.0)[0]])
            mn, mx = (first if mn == 0.0 else mn), (first if mx == 0.0 else mx)
        self._add(mn, mx, usable, nonfinite, n_huge, zeros, negzeros, self.upper)

    def _add(self, mn: float, mx: float, usable: int, nonfinite: int, n_huge: int, zeros: int, negzeros: int,
             upper: float) -> None:
        """Fold one :func:`update_counts` result (its counts already added) into the totals."""
        self.upper = upper
        self.count += usable
        self.zeros += zeros
        self.nonfinite += nonfinite
        self.huge += n_huge
        if usable:
            self.min = min(self.min, mn)
            self.max = max(self.max, mx)

    def merge(self, other: AbsHistogram | HistogramState) -> None:
        """Add another accumulator's (or snapshot's) counts: exact, same as feeding its values."""
        if other.counts.size != self.bins:
            raise ValueError(f"cannot merge a {other.counts.size}-bin histogram into a {self.bins}-bin one")
        counts = np.asarray(other.counts, dtype=np.int64)
        if other.upper > self.upper:
            self._grow_to(other.upper)
        elif other.upper < self.upper and other.upper > 0.0:
            counts = merge_pairs(counts, round(math.log2(self.upper / other.upper)))
        self.counts = self.counts + counts
        self.count += int(other.count)
        self.nonfinite += int(other.nonfinite)
        self.huge += int(other.huge)
        self.zeros += int(other.zeros)
        if other.count:
            self.min = min(self.min, float(other.min))
            self.max = max(self.max, float(other.max))

    def state(self) -> HistogramState:
        """An immutable snapshot (counts copied and made read-only)."""
        counts = self.counts.copy()
        counts.setflags(write=False)
        empty = self.count == 0
        return HistogramState(
            counts=counts,
            upper=float(self.upper),
            min=0.0 if empty else float(self.min),
            max=0.0 if empty else float(self.max),
            count=int(self.count),
            nonfinite=int(self.nonfinite),
            huge=int(self.huge),
            huge_threshold=self.huge_threshold,
            zeros=int(self.zeros),
        )

    @classmethod
    def from_state(cls, state: HistogramState) -> AbsHistogram:
        """An accumulator that continues from ``state``."""
        h = cls(state.bins, state.huge_threshold)
        h.merge(state)
        return h
