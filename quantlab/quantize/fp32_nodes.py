"""Which nodes of an FP16 group still compute in float32: per-sample statistics, squares for a variance, nodes
whose activations went beyond float16's range in calibration (above 65504, or all below its smallest value),
nodes reading a guard constant float16 reads as 0, and the argument of a Sin/Cos beyond a few radians.

The writer asks :meth:`Fp32Nodes.statistic` of every node in topological order (a statistic is known from its
inputs, which were asked about first), then :meth:`Fp32Nodes.keeps_fp32` of an FP16 group's other nodes::

    x ─► ReduceMean ─► m ─► Sub/Mul ─► ... ─► Expand ─► back to full size (fp16)
          └──────── float32: one value per sample or row ────────┘

    power ─► MatMul(mel) ─► Clip(min=1e-10) ─► Log ─► dB      the guard 1e-10 is 0 in float16: the Clip keeps
                              float32                           float32, or silence's log(0) is -inf

    t (0..999) ─► Unsqueeze ─► Mul(freqs) ─► Sin/Cos ─► Linear      a phase of 999 rad is rounded to 0.5 rad in
    └──────── float32: |x| beyond PHASE_LIMIT ───────┘              float16: a diffusion UNet's timestep embedding
                                                                    (28 dB), rotary position embeddings
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import onnx

from ..graph.topology import CONTROL_FLOW_OPS
from ..precision import FP16_TINY
from ..table import CalibrationTable
from .options import WriteOptions
from .tensors import F16, F32, TensorBook

__all__ = ["Fp32Nodes", "beyond_fp16", "below_fp16", "phase_nodes"]

PHASE_OPS = frozenset({"Sin", "Cos"})
PHASE_LIMIT = 2.0
"""Beyond this |x| (radians), rounding a Sin/Cos argument to float16 (half a step: |x| * 2**-11) costs more than
rounding its result: the argument, and what computes it at such magnitudes, stays float32."""

GUARD_SIZE = 64
"""A float constant of at most this many values, all of whose non-zero values float16 reads as 0, is a guard
(``Clip(x, 1e-10)`` before a Log, ``x + 1e-12`` under a division)."""


def _zero_in_fp16(magnitude: float) -> bool:
    """Whether float16 rounds this non-negative magnitude to 0 (at most half its smallest value)."""
    return magnitude <= FP16_TINY and float(np.float16(magnitude)) == 0.0


def beyond_fp16(table: CalibrationTable | None, limit: float) -> dict[str, float]:
    """Tensor -> largest |x| calibration saw, for the activations beyond ``limit`` (finite values only: huge
    sentinels such as masks at float32.min are left out of the observed min/max; float16 clips them on
    purpose)."""
    if table is None:
        return {}
    seen = {t: max(abs(r.min), abs(r.max)) for t, r in table.ranges.items()}
    return {t: v for t, v in seen.items() if v > limit}


def below_fp16(table: CalibrationTable | None) -> dict[str, float]:
    """Tensor -> largest |x| calibration saw, for the non-zero activations float16 reads as 0 in full (every value
    at most half of :data:`FP16_TINY`: an untrained network's vanishing activations, a spectrum of silence)."""
    if table is None:
        return {}
    seen = {t: max(abs(r.min), abs(r.max)) for t, r in table.ranges.items()
            if np.isfinite(r.min) and np.isfinite(r.max)}
    return {t: v for t, v in seen.items() if v > 0.0 and _zero_in_fp16(v)}


def phase_nodes(nodes: Sequence[onnx.NodeProto], names: Sequence[str], table: CalibrationTable | None,
                constants: Collection[str]) -> dict[str, tuple[str, float]]:
    """Node name -> (tensor, its largest |x|) for each Sin/Cos whose argument went beyond :data:`PHASE_LIMIT` in
    calibration, and each node computing that argument back through tensors beyond it (a Mul by frequencies, an
    Unsqueeze of the timesteps); a graph input, a constant or a small value ends the walk. Empty without a table."""
    if table is None:
        return {}
    magnitude = {t: max(abs(r.min), abs(r.max)) for t, r in table.ranges.items()
                 if np.isfinite(r.min) and np.isfinite(r.max)}
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    out: dict[str, tuple[str, float]] = {}
    pending = []
    for i, node in enumerate(nodes):
        if node.op_type in PHASE_OPS and node.input and magnitude.get(node.input[0], 0.0) > PHASE_LIMIT:
            out[names[i]] = (node.input[0], magnitude[node.input[0]])
            pending.append(node.input[0])
    seen: set[str] = set()
    while pending:
        t = pending.pop()
        i = producer.get(t)
        if t in seen or i is None or nodes[i].op_type in CONTROL_FLOW_OPS:
            continue
        seen.add(t)
        out.setdefault(names[i], (t, magnitude[t]))
        pending += [u for u in nodes[i].input if u and u not in constants and magnitude.get(u, 0.0) > PHASE_LIMIT]
    return out


class Fp32Nodes:
    """The float32 exceptions inside FP16 groups, and why each was made: ``kept`` (values beyond
    ``fp16_data_max``), ``kept_small`` (values float16 reads as 0), ``guards`` (a guard constant float16 reads as
    0) and ``phases`` (a Sin/Cos argument beyond :data:`PHASE_LIMIT`, :func:`phase_nodes`), each node -> (tensor,
    its largest |x|)."""

    def __init__(self, book: TensorBook, options: WriteOptions, constants: Collection[str],
                 beyond: Mapping[str, float], below: Mapping[str, float] | None = None,
                 phase: Mapping[str, tuple[str, float]] | None = None) -> None:
        self.book = book
        self.options = options
        self.constants = constants
        self.beyond = beyond  # tensor -> |x| beyond options.fp16_data_max (beyond_fp16)
        self.below = below or {}  # tensor -> its largest |x|, all below FP16_TINY (below_fp16)
        self.kept: dict[str, tuple[str, float]] = {}  # fp16-group node kept float32 -> (tensor, its |x|)
        self.kept_small: dict[str, tuple[str, float]] = {}  # node kept float32 -> (a tensor float16 reads as 0, |x|)
        self.guards: dict[str, tuple[str, float]] = {}  # node kept float32 -> (guard constant, its largest |x|)
        self.phase = dict(phase or {})  # node name -> (a Sin/Cos argument beyond PHASE_LIMIT, its |x|): phase_nodes
        self.phases: dict[str, tuple[str, float]] = {}  # the FP16-group nodes of those kept float32
        self.statistics: set[str] = set()  # reductions' outputs and what only they compute (see statistic)

    def keeps_fp32(self, node: onnx.NodeProto, name: str) -> bool:
        """Whether ``node`` (written as ``name``) of an FP16 group, not a :meth:`statistic`, computes in float32:
        an ``fp32_ops`` op, a square of fp32_ops' Pow, a node reading or writing values beyond float16's range in
        calibration (or all of whose values float16 reads as 0), or one reading a guard constant float16 reads
        as 0."""
        return (node.op_type in self.options.fp32_ops or self.square(node) or self.reads_beyond_fp16(node, name)
                or self.reads_below_fp16(node, name) or self.reads_guard(node, name) or self.computes_phase(name))

    def computes_phase(self, name: str) -> bool:
        """Whether the node is a Sin/Cos of a large argument or computes one (:func:`phase_nodes`; :attr:`phases`
        records it)."""
        if name in self.phase:
            self.phases[name] = self.phase[name]
        return name in self.phase

    def statistic(self, node: onnx.NodeProto) -> bool:
        """Whether the node computes a per-sample statistic: a float32 reduction (``fp32_ops``), or a node whose
        float inputs are all statistics or constants (then it stays float32, and its outputs are statistics).

        A normalisation written out op by op (tf2onnx, jax2tf, older torch exports) computes its variance as
        ``E[x^2] - E[x]^2`` and adds an epsilon of 1e-12: in float16 the difference cancels to nothing and the
        epsilon to 0, so ``1 / sqrt(var + eps)`` is off by orders of magnitude (Magika's LayerNorm: 5 dB). These
        tensors hold one value per sample (or row), so float32 costs nothing. ``Expand`` ends the chain: it
        broadcasts a statistic back to the full size. tf2onnx writes a LayerNorm's means as a GlobalAveragePool
        over ``[N, S, H]`` transposed to ``[N, H, S]``-like 3-D tensors: a mean like ReduceMean's, so it counts
        where ReduceMean is kept float32 (a CNN's 4-D global pool does not).
        """
        spec = self.book.specs.get(node.input[0]) if node.input else None
        mean_3d = (node.op_type == "GlobalAveragePool" and "ReduceMean" in self.options.fp32_ops
                   and spec is not None and spec.shape is not None and len(spec.shape) == 3)
        if (node.op_type in self.options.fp32_ops and node.op_type.startswith("Reduce")) or mean_3d:
            self.statistics.update(node.output)
            return True
        if node.op_type == "Expand" or node.op_type in CONTROL_FLOW_OPS:
            return False
        data = [t for t in node.input if t and t not in self.constants and self.book.orig_dtype(t) in (F32, F16)]
        if data and all(t in self.statistics for t in data):
            self.statistics.update(node.output)
            return True
        return False

    def square(self, node: onnx.NodeProto) -> bool:
        """``Mul(x, x)`` is ``Pow(x, 2)`` as tf2onnx writes it: float32 where ``fp32_ops`` keeps Pow (a variance's
        squares must match the float32 mean it is taken against, or ``E[x^2] - E[x]^2`` goes negative)."""
        return (node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]
                and "Pow" in self.options.fp32_ops)

    def reads_beyond_fp16(self, node: onnx.NodeProto, name: str) -> bool:
        """Whether an activation the node reads or writes went beyond ``fp16_data_max`` in calibration (then
        the node computes in float32, and :attr:`kept` records why)."""
        seen = [(t, self.beyond[t]) for t in (*node.input, *node.output)
                if t in self.beyond and t not in self.constants]
        if seen:
            self.kept[name] = max(seen, key=lambda tv: tv[1])
        return bool(seen)

    def reads_below_fp16(self, node: onnx.NodeProto, name: str) -> bool:
        """Whether float16 reads an activation the node reads or writes as 0 in full, by calibration
        (:attr:`kept_small` records it)."""
        seen = [(t, self.below[t]) for t in (*node.input, *node.output) if t in self.below and t not in self.constants]
        if seen:
            self.kept_small[name] = max(seen, key=lambda tv: tv[1])
        return bool(seen)

    def reads_guard(self, node: onnx.NodeProto, name: str) -> bool:
        """Whether the node reads a guard constant (:data:`GUARD_SIZE`) that float16 reads as 0 (:attr:`guards`
        records it)."""
        for t in node.input:
            if t in self.book.inits:
                if not 0 < int(np.prod(self.book.inits[t].dims)) <= GUARD_SIZE:
                    continue  # a weight: not read into an array for this
            elif t not in self.book.const_nodes:
                continue
            value = self.book.constant_array(t)
            if value.dtype.kind != "f" or not 0 < value.size <= GUARD_SIZE:
                continue
            nonzero = np.abs(value[value != 0].astype(np.float64))
            if nonzero.size and _zero_in_fp16(float(nonzero.max())):
                self.guards[name] = (t, float(nonzero.max()))
                return True
        return False
