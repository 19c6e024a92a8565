"""The coarse |x| bins coverage counts per sample, fixed from the calibration statistics before the pass.

Per tensor, the edges are the calibration set's deciles of non-zero |x|, the
table's ``amax`` and the calibration absmax; exact zeros get their own bin
(after ReLU they are most of the values, and a change in sparsity is a shift)::

    bin 0      1          2     ...      k              k+1 ...       m+1
      [0]  (0, q10]  (q10, q20] ...  (.., amax]  (amax, ..] ...  (calib absmax, inf)
      zero          within the calibrated range  │  saturated     │ never seen in calibration

So one small integer row per sample and tensor answers "how many values
saturate" (bins after ``amax``), "how many lie beyond anything calibration
saw" (the last bin) and "how did the distribution move" (population stability
index over all bins, against the calibration proportions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from ..histogram import HistogramState

__all__ = ["QUANTILES", "TensorBins", "tensor_bins", "bin_per_sample"]

QUANTILES = tuple(q / 10 for q in range(1, 10))
"""Deciles of the calibration set's non-zero |x|: edges of the distribution bins."""


@dataclass(frozen=True, eq=False)
class TensorBins:
    """Edges (float64, ascending, first 0.0) and what the calibration set put in each bin.

    Bin 0 is ``|x| == 0``; bin ``j >= 1`` is ``edges[j-1] < |x| <= edges[j]``;
    the last bin is ``|x| > edges[-1]`` (the calibration absmax).
    """

    edges: np.ndarray
    amax: float
    calib_absmax: float
    reference: np.ndarray
    """Share of the calibration set's values in each bin (sums to 1; zeros when it had no values)."""
    from_edge: np.ndarray | None = None
    """Per edge, whether a value equal to it counts above it (the decile edges, on fine histogram edges, as the
    histogram counts): bins ``[e_{j-1}, e_j)`` there, ``(e_{j-1}, e_j]`` at ``amax`` and the absmax."""

    @property
    def n_bins(self) -> int:
        return int(self.edges.size) + 1

    @property
    def first_saturated(self) -> int:
        """Index of the first bin above ``amax``."""
        return int(np.searchsorted(self.edges, self.amax, side="right"))

    @property
    def calib_saturated(self) -> float:
        """Share of the calibration set's values above ``amax`` (as binned here)."""
        return float(self.reference[self.first_saturated:].sum())

    @property
    def first_outside(self) -> int:
        """Index of the bin above the calibration absmax (the last one)."""
        return int(self.edges.size)


def tensor_bins(state: HistogramState, amax: float) -> TensorBins:
    """The bins of one tensor from its calibration histogram and the table's ``amax``."""
    absmax = state.absmax
    nonzero = state.without_zeros()
    qs = [_fine_edge_above(state, nonzero.quantile(q)) for q in QUANTILES] if nonzero.count else []
    deciles = {q for q in qs if 0.0 < q < absmax and q != float(amax)}
    edges = np.unique(np.array([0.0, *deciles, float(amax), absmax], dtype=np.float64))
    edges = edges[edges >= 0.0]
    from_edge = np.array([e in deciles for e in edges.tolist()])
    reference = np.zeros(edges.size + 1, dtype=np.float64)
    if state.count:
        cdf = state.cdf_at(edges[1:]) if edges.size > 1 else np.zeros(0)
        inner = np.diff(np.concatenate([[float(state.zeros)], cdf]))
        reference[0] = state.zeros
        reference[1:edges.size] = np.maximum(inner, 0.0)
        reference[-1] = max(state.count - (float(cdf[-1]) if cdf.size else float(state.zeros)), 0.0)
        reference /= reference.sum() or 1.0
    edges.setflags(write=False)
    reference.setflags(write=False)
    from_edge.setflags(write=False)
    return TensorBins(edges=edges, amax=float(amax), calib_absmax=absmax, reference=reference, from_edge=from_edge)


def _fine_edge_above(state: HistogramState, value: float) -> float:
    """The calibration histogram's first fine-bin edge at or above ``value``.

    A quantile inside a fine bin is interpolated, and so is the calibration share below it; values that sit
    on a few exact points (a YOLO's strides 8/16/32) then had their mass split between edges 8.0005, 8.001,
    ... while every sample's 8.0 fell in one bin: PSI 6.3 for the calibration set against itself. On a fine
    edge the share below is exact (``cdf_at``), and the bins count from the edge up as the histogram does.
    """
    if state.upper <= 0.0 or value <= 0.0:
        return value
    width = state.upper / state.bins
    return min(math.ceil(value / width) * width, state.upper)


@numba.njit(cache=True, nogil=True)
def _greater_counts(rows, edges, huge, out):  # pragma: no cover - compiled
    """out[i, 0] = usable values of row i; out[i, 1 + j] = usable values with |x| > edges[j].

    One pass per edge of compare-and-add (vectorised, no branches: ~0.3 ns per
    value and edge); a binary search per value mispredicts its branches and is
    ten times slower. Values at or above ``huge`` (and inf) are above every edge
    and are subtracted; NaN compares false everywhere.
    """
    for i in range(rows.shape[0]):
        row = rows[i]
        usable = 0
        over = 0
        for v in range(row.size):
            a = abs(row[v])
            usable += a < huge
            over += a >= huge
        out[i, 0] = usable
        for j in range(edges.size):
            e = edges[j]
            c = 0
            for v in range(row.size):
                c += abs(row[v]) > e
            out[i, j + 1] = c - over


def _edges_as(edges: np.ndarray, dtype: np.dtype, from_edge: np.ndarray | None = None) -> np.ndarray:
    """Edges in the data's dtype, rounded down: for float32 ``x``, ``x > e`` iff ``x > float32_below(e)``;
    where ``from_edge``, the float just below the edge (``x > below(e)`` iff ``x >= e``)."""
    low = edges.astype(dtype)
    above = low.astype(np.float64) > edges
    low[above] = np.nextafter(low[above], dtype.type(-np.inf))
    if from_edge is not None and from_edge.any():
        exact = from_edge & ~above & (low.astype(np.float64) == edges)
        low[exact] = np.nextafter(low[exact], dtype.type(-np.inf))
    return low


def bin_per_sample(batch: np.ndarray, bins: TensorBins, huge: float) -> np.ndarray:
    """``[samples, n_bins]`` int64 counts of one batch of a tensor (axis 0 = samples); excluded values dropped."""
    arr = np.asarray(batch)
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float32)
    n = int(arr.shape[0]) if arr.ndim else 1
    rows = np.ascontiguousarray(arr.reshape(n, -1))
    greater = np.zeros((n, bins.edges.size + 1), dtype=np.int64)
    _greater_counts(rows, _edges_as(bins.edges, rows.dtype, bins.from_edge),
                    rows.dtype.type(min(huge, np.finfo(rows.dtype).max)),
                    greater)
    out = np.empty((n, bins.n_bins), dtype=np.int64)
    out[:, :-1] = greater[:, :-1] - greater[:, 1:]  # bin j: above edge j-1 (or usable, j=0), not above edge j
    out[:, -1] = greater[:, -1]
    return out
