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
at float32.min or -inf) takes the masked kernels: the scan again with the
left-out values masked by selects, then the binning with one branch per value
(the masked positions come in runs the predictor follows): 1.2-1.4 ns a value on
such scores, where the per-value path took 2.3. float64 arrays take the
per-value kernel for the whole array. Every path gives the same counts and the
same min/max as binning value by value in data order (a value lands in
``floor(|x| * bins / R_final)`` whichever ``R`` it met first: see
quantlab.histogram), including which zero, +0.0 or -0.0, is the min when the
min is zero (the first one in data order).

    binning/
      core.py    the compile decorator, ranges and merges, the clean-chunk scan and binning, float keys
      masked.py  chunks with values to leave out (non-finite, huge); the per-value path
      update.py  update_counts: chunk by chunk, the int32 partial tables and their flush
"""

from __future__ import annotations

from .core import CHUNK, compiled, huge_bits, merge_pairs, power_of_two_above
from .update import partial_tables, update_counts, warm_up

__all__ = ["CHUNK", "compiled", "huge_bits", "merge_pairs", "partial_tables", "power_of_two_above", "update_counts",
           "warm_up"]
