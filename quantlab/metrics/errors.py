"""Error metrics of the comparator: pure numpy functions and small streaming accumulators.

Everything here works on plain arrays and is testable alone; :mod:`quantlab.compare` only
feeds it batches. Conventions (``r`` the FP32 reference, ``c`` the candidate, ``d = c - r``,
sums over every element seen, in float64)::

    cosine  = Σ r·c / sqrt(Σ r² · Σ c²)          1 for two all-zero tensors, 0 when only one is
    sqnr_db = 10 · log10(Σ r² / Σ d²)             = 20 · log10(‖r‖ / ‖r − c‖), as ONNX Runtime's
                                                  qdq_loss_debug; +inf when d == 0 everywhere
    rel_l2  = sqrt(Σ d² / Σ r²)                   ‖r − c‖ / ‖r‖
    max_abs = max |d|,  mean_abs = Σ |d| / n

A tensor's statistics are accumulated batch by batch (:class:`ErrorAccumulator`): six
running sums and a max, never the activations. The kernel is one numba pass over float32
data with float64 accumulators (products of two float32 are exact in float64), plus a
second pass for the max. Non-finite values are counted only when a sum comes out
non-finite, so clean tensors pay nothing for the check. Elements where the reference is
not finite or huge (``|x| >= 1e30``, quantlab.methods.DEFAULT_HUGE_THRESHOLD: an attention
mask's -inf or ``finfo(float32).min``, which the candidate may hold as -inf too, or as
float16's -65504) are left out of every figure and counted in ``ref_nonfinite``: one
-inf would make every sum inf, one -3.4e38 every cosine 1 and SQNR 0 dB, as calibration
leaves them out of the ranges. ``nonfinite`` counts the candidate's NaN/inf where the
reference is finite: what the candidate broke.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from ..methods import DEFAULT_HUGE_THRESHOLD

__all__ = [
    "ErrorAccumulator",
    "ErrorSums",
    "error_sums",
    "errors_from_sums",
    "per_sample_sums",
    "per_sample_errors",
    "cosine",
    "sqnr_db",
    "rel_l2",
    "as_float32",
]

_FM = {"reassoc", "contract"}
"""Reassociation lets LLVM vectorise the float64 sums; no 'nnan'/'ninf': NaN must propagate."""


@numba.njit(cache=True, nogil=True, fastmath=_FM)
def _sums_kernel(r: np.ndarray, c: np.ndarray) -> tuple[float, float, float, float, float]:
    srr = 0.0
    scc = 0.0
    src = 0.0
    sdd = 0.0
    sad = 0.0
    for i in range(r.size):
        a = np.float64(r[i])
        b = np.float64(c[i])
        d = b - a
        srr += a * a
        scc += b * b
        src += a * b
        sdd += d * d
        sad += abs(d)
    return srr, scc, src, sdd, sad


@numba.njit(cache=True, nogil=True)
def _max_abs_kernel(r: np.ndarray, c: np.ndarray) -> float:
    # eight independent maxima: the loop-carried dependency of one running max is the bottleneck
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = np.float32(0.0)
    n8 = r.size - r.size % 8
    for i in range(0, n8, 8):
        m0 = max(m0, abs(c[i] - r[i]))
        m1 = max(m1, abs(c[i + 1] - r[i + 1]))
        m2 = max(m2, abs(c[i + 2] - r[i + 2]))
        m3 = max(m3, abs(c[i + 3] - r[i + 3]))
        m4 = max(m4, abs(c[i + 4] - r[i + 4]))
        m5 = max(m5, abs(c[i + 5] - r[i + 5]))
        m6 = max(m6, abs(c[i + 6] - r[i + 6]))
        m7 = max(m7, abs(c[i + 7] - r[i + 7]))
    m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for i in range(n8, r.size):
        m = max(m, abs(c[i] - r[i]))
    return float(m)


@numba.njit(cache=True, nogil=True)
def _row_sums_kernel(r: np.ndarray, c: np.ndarray, out: np.ndarray) -> None:
    """Per row of [N, M] float32 arrays: srr, scc, src, sdd, sad into out[N, :5] (:func:`_sums_kernel` a row)."""
    for k in range(r.shape[0]):
        out[k, 0], out[k, 1], out[k, 2], out[k, 3], out[k, 4] = _sums_kernel(r[k], c[k])


def as_float32(a: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 view or copy of ``a`` (float16/float64/integers are converted)."""
    a = np.asarray(a)
    if a.dtype != np.float32:
        a = a.astype(np.float32)
    return np.ascontiguousarray(a)


@dataclass(frozen=True)
class ErrorSums:
    """Sufficient statistics of the error between two tensors (float64 sums over ``n`` elements).

    ``nonfinite`` counts the candidate's NaN/inf where the reference is finite; ``ref_nonfinite`` the
    reference's NaN/inf and huge values (masks), which ``n`` and the sums leave out (see the module docstring).
    """

    n: int = 0
    srr: float = 0.0
    scc: float = 0.0
    src: float = 0.0
    sdd: float = 0.0
    sad: float = 0.0
    max_abs: float = 0.0
    nonfinite: int = 0
    ref_nonfinite: int = 0

    def __add__(self, other: ErrorSums) -> ErrorSums:
        return ErrorSums(self.n + other.n, self.srr + other.srr, self.scc + other.scc, self.src + other.src,
                         self.sdd + other.sdd, self.sad + other.sad, _nanmax(self.max_abs, other.max_abs),
                         self.nonfinite + other.nonfinite, self.ref_nonfinite + other.ref_nonfinite)

    def as_row(self) -> tuple[float, ...]:
        """The nine fields as floats (a row of a float64 array; the counts stay exact below 2**53)."""
        return (float(self.n), self.srr, self.scc, self.src, self.sdd, self.sad, self.max_abs,
                float(self.nonfinite), float(self.ref_nonfinite))

    @classmethod
    def from_row(cls, row: np.ndarray) -> ErrorSums:
        """The inverse of :meth:`as_row`: the same sums, bit for bit."""
        v = [float(x) for x in row]
        return cls(int(v[0]), v[1], v[2], v[3], v[4], v[5], v[6], int(v[7]), int(v[8]))


def _nanmax(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return max(a, b)


_HUGE_SQUARED = DEFAULT_HUGE_THRESHOLD**2
"""Σ r² reaches this whenever one |r| is huge (and, rarely, when many values near it are: then none is left out)."""


def _where_reference_is_finite(r: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``r``, ``c`` (1-D) at the elements where ``r`` is finite and not huge, and how many were left out."""
    keep = np.abs(r) < DEFAULT_HUGE_THRESHOLD  # False for NaN and +-inf too
    left_out = int(r.size - np.count_nonzero(keep))
    return (r, c, 0) if left_out == 0 else (r[keep], c[keep], left_out)


def error_sums(reference: np.ndarray, candidate: np.ndarray) -> ErrorSums:
    """The :class:`ErrorSums` of two same-shape arrays (any float dtype; converted to float32)."""
    r = as_float32(reference).reshape(-1)
    c = as_float32(candidate).reshape(-1)
    if r.shape != c.shape:
        raise ValueError(f"shapes differ: reference {np.shape(reference)}, candidate {np.shape(candidate)}")
    if r.size == 0:
        return ErrorSums()
    srr, scc, src, sdd, sad = _sums_kernel(r, c)
    ref_bad = 0
    if not srr < _HUGE_SQUARED:  # the reference may hold NaN/inf or a huge mask: the figures cover the rest
        r, c, ref_bad = _where_reference_is_finite(r, c)
        srr, scc, src, sdd, sad = _sums_kernel(r, c) if r.size else (0.0, 0.0, 0.0, 0.0, 0.0)
    bad = 0
    if not (math.isfinite(scc) and math.isfinite(sdd)):
        bad = int(c.size - np.count_nonzero(np.isfinite(c)))
    max_abs = math.nan if bad else (_max_abs_kernel(r, c) if r.size else 0.0)
    return ErrorSums(int(r.size), srr, scc, src, sdd, sad, max_abs, bad, ref_bad)


def errors_from_sums(s: ErrorSums) -> dict[str, float]:
    """cosine, sqnr_db, max_abs, mean_abs, rel_l2 and nan_count from accumulated sums."""
    if s.n == 0:
        return {"cosine": math.nan, "sqnr_db": math.nan, "max_abs": math.nan, "mean_abs": math.nan,
                "rel_l2": math.nan, "nan_count": 0}
    return {
        "cosine": _cosine(s.srr, s.scc, s.src),
        "sqnr_db": _sqnr(s.srr, s.sdd),
        "max_abs": float(s.max_abs),
        "mean_abs": s.sad / s.n,
        "rel_l2": _rel_l2(s.srr, s.sdd),
        "nan_count": int(s.nonfinite),
    }


def _cosine(srr: float, scc: float, src: float) -> float:
    if not (math.isfinite(srr) and math.isfinite(scc) and math.isfinite(src)):
        return math.nan
    if srr == 0.0 and scc == 0.0:
        return 1.0
    if srr == 0.0 or scc == 0.0:
        return 0.0
    return max(-1.0, min(1.0, src / math.sqrt(srr * scc)))


def _sqnr(srr: float, sdd: float) -> float:
    if not (math.isfinite(srr) and math.isfinite(sdd)):
        return math.nan
    if sdd == 0.0:
        return math.inf
    if srr == 0.0:
        return -math.inf
    return 10.0 * math.log10(srr / sdd)


def _rel_l2(srr: float, sdd: float) -> float:
    if not (math.isfinite(srr) and math.isfinite(sdd)):
        return math.nan
    if srr == 0.0:
        return 0.0 if sdd == 0.0 else math.inf
    return math.sqrt(sdd / srr)


class ErrorAccumulator:
    """Running error statistics of one tensor over batches: O(1) memory whatever the sample count."""

    __slots__ = ("sums", "shape")

    def __init__(self) -> None:
        self.sums = ErrorSums()
        self.shape: tuple[int, ...] | None = None

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        """Add one batch (same shape in both; float16 candidates are widened to float32)."""
        if np.shape(reference) != np.shape(candidate):
            raise ValueError(f"shapes differ: reference {np.shape(reference)}, candidate {np.shape(candidate)}")
        self.shape = tuple(np.shape(reference))
        self.sums = self.sums + error_sums(reference, candidate)

    def add(self, sums: ErrorSums) -> None:
        """Add the sums of one batch computed elsewhere (e.g. on a worker thread), in batch order."""
        self.sums = self.sums + sums

    @property
    def elements(self) -> int:
        return self.sums.n

    def result(self) -> dict[str, float]:
        return errors_from_sums(self.sums)


def per_sample_sums(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """[N, 6] float64: per sample (axis 0) srr, scc, src, sdd, sad, max|d| (each sample flattened)."""
    r = as_float32(reference)
    c = as_float32(candidate)
    if r.shape != c.shape:
        raise ValueError(f"shapes differ: reference {r.shape}, candidate {c.shape}")
    n = r.shape[0] if r.ndim else 1
    r2 = r.reshape(n, -1)
    c2 = c.reshape(n, -1)
    out = np.zeros((n, 6), dtype=np.float64)
    if r2.shape[1]:
        _row_sums_kernel(r2, c2, out)
        with np.errstate(invalid="ignore"):
            out[:, 5] = np.abs(c2 - r2).max(axis=1)
        for k in np.flatnonzero(~(out[:, 0] < _HUGE_SQUARED)):  # rows whose reference may hold NaN/inf or a mask
            rk, ck, _ = _where_reference_is_finite(r2[k], c2[k])
            out[k] = 0.0
            if rk.size:
                out[k, :5] = _sums_kernel(rk, ck)
                with np.errstate(invalid="ignore"):
                    out[k, 5] = np.abs(ck - rk).max()
    return out


def per_sample_errors(sums: np.ndarray) -> dict[str, np.ndarray]:
    """cosine, sqnr_db, max_abs per sample from :func:`per_sample_sums` rows."""
    cos = np.array([_cosine(a, b, c) for a, b, c in sums[:, :3]], dtype=np.float64)
    sq = np.array([_sqnr(a, d) for a, d in sums[:, [0, 3]]], dtype=np.float64)
    return {"cosine": cos, "sqnr_db": sq, "max_abs": sums[:, 5].astype(np.float64)}


def cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened (float64)."""
    s = error_sums(reference, candidate)
    return _cosine(s.srr, s.scc, s.src)


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal to quantization noise ratio in dB: 20·log10(‖r‖ / ‖r − c‖)."""
    s = error_sums(reference, candidate)
    return _sqnr(s.srr, s.sdd)


def rel_l2(reference: np.ndarray, candidate: np.ndarray) -> float:
    """‖r − c‖ / ‖r‖."""
    s = error_sums(reference, candidate)
    return _rel_l2(s.srr, s.sdd)
