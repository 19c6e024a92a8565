"""Whether the FP32 reference gives the same outputs twice: a model that draws random numbers does not.

VITS draws its latent noise inside the graph (``RandomNormalLike``, unless exported with ``noise_scale = 0``):
each run of a session gives another waveform. ONNX Runtime starts every session's generator alike, so whether a
candidate draws the reference's numbers depends on what each session ran before: the figures may measure that
noise beside quantization's, or hide it (a deployment draws its own). When the graph holds a random op
(:data:`quantlab.graph.topology.RANDOM_OPS`, bodies too), the first batch runs twice on the reference and the
outputs are set side by side::

    batch ─► reference ─► outputs a ┐
    batch ─► reference ─► outputs b ┴─► equal?  else WARNING: SQNR of b against a, per output

A draw that reaches no output (or is scaled to nothing) gives no warning; a ``seed`` attribute does not make one
(ONNX Runtime's generator goes on from run to run).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..backends import Backend
from ..data import Batch
from ..graph import LoadedModel
from ..graph.topology import RANDOM_OPS, all_nodes
from ..metrics import sqnr_db

__all__ = ["random_nodes", "reference_noise_note"]


def random_nodes(model: LoadedModel) -> list[str]:
    """``op 'name'`` of every node that draws random numbers, bodies included."""
    return [f"{n.op_type} {n.name or n.output[0]!r}" for n in all_nodes(model.proto.graph) if n.op_type in RANDOM_OPS]


def reference_noise_note(reference: LoadedModel, backend: Backend, batch: Batch, outputs: Sequence[str]) -> str | None:
    """A WARNING when ``reference`` holds a random op and two runs of ``batch`` give other ``outputs``; else None."""
    drawn = random_nodes(reference)
    if not drawn or not outputs:
        return None
    runner = backend.build(reference.proto)
    try:
        first = runner.run(batch.feeds, list(outputs))
        second = runner.run(batch.feeds, list(outputs))
    finally:
        runner.close()
    differ = {}
    for o in outputs:
        a, b = np.asarray(first[o]), np.asarray(second[o])
        if a.shape != b.shape:
            differ[o] = f"shape {list(a.shape)}, then {list(b.shape)}"
        elif not np.array_equal(a, b, equal_nan=True):
            differ[o] = (f"SQNR {sqnr_db(a.astype(np.float64), b.astype(np.float64)):.1f} dB against itself"
                         if np.issubdtype(a.dtype, np.floating) else "other values")
    if not differ:
        return None
    ops = ", ".join(drawn[:3]) + (f" and {len(drawn) - 3} more" if len(drawn) > 3 else "")
    runs = "; ".join(f"{o!r}: {what}" for o, what in list(differ.items())[:4])
    return (f"WARNING the FP32 reference is not deterministic: it draws random numbers ({ops}), and two runs of the "
            f"first batch in one session differ ({runs}). A session's draws depend on what it ran before (new "
            "sessions start alike, so a candidate may draw the reference's numbers or others), and a deployment "
            "draws its own: these figures may hold that noise beside quantization's, or hide it. Export the model "
            "with its noise off (VITS: noise_scale = 0 and noise_scale_duration = 0; a seed attribute does not help), "
            "or judge it by a task metric (--metric)")
