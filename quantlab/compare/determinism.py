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

from collections.abc import Mapping, Sequence

import numpy as np

from ..backends import Backend
from ..data import Batch
from ..graph import LoadedModel
from ..graph.topology import random_nodes
from ..metrics import sqnr_db

__all__ = ["NOISE_OFF", "differing_outputs", "drawn_ops", "reference_noise", "reference_noise_note",
           "unjudged_reason"]


def reference_noise(reference: LoadedModel, backend: Backend, batch: Batch,
                    outputs: Sequence[str]) -> dict[str, str]:
    """How each of ``outputs`` differs between two runs of ``batch`` on ``reference`` (``{output: 'SQNR 17.2 dB
    against itself'}``); empty when ``reference`` draws no random numbers or both runs agree."""
    if not random_nodes(reference.proto) or not outputs:
        return {}
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
    return differ


def reference_noise_note(reference: LoadedModel, differ: Mapping[str, str]) -> str | None:
    """The WARNING for what :func:`reference_noise` found (None when it found nothing)."""
    if not differ:
        return None
    return (f"WARNING the FP32 reference is not deterministic: it draws random numbers ({drawn_ops(reference)}), "
            f"and two runs of the first batch in one session differ ({differing_outputs(differ)}). A session's draws "
            "depend on what it ran before (new sessions start alike, so a candidate may draw the reference's numbers "
            "or others), and a deployment draws its own: these figures may hold that noise beside quantization's, or "
            f"hide it, and no threshold on them is judged. {NOISE_OFF}")


def drawn_ops(reference: LoadedModel, shown: int = 3) -> str:
    """The first ``shown`` of :func:`quantlab.graph.topology.random_nodes`, for a message."""
    drawn = random_nodes(reference.proto)
    return ", ".join(drawn[:shown]) + (f" and {len(drawn) - shown} more" if len(drawn) > shown else "")


def differing_outputs(differ: Mapping[str, str], shown: int = 4) -> str:
    """The first ``shown`` outputs of what :func:`reference_noise` found, for a message."""
    return "; ".join(f"{o!r}: {what}" for o, what in list(differ.items())[:shown])


def unjudged_reason(noise: Mapping[str, str]) -> str:
    """Why no threshold is judged on figures whose reference gave ``noise`` (:func:`reference_noise`); ""
    when it gave none."""
    if not noise:
        return ""
    return f"the FP32 reference is not deterministic (two runs of one batch differ: {differing_outputs(noise, 2)})"


NOISE_OFF = ("Feed zero noise scales where the model takes them as inputs (Piper's VITS: scales = [0, length, 0]), "
             "or export it with its noise off (transformers' VITS: noise_scale = 0 and noise_scale_duration = 0; a "
             "seed attribute does not help)")
"""What to do about a reference that draws random numbers: one home for the compare warning and the refusals."""
