"""Whether a candidate computes, in a plain session, what the comparison measured with its tensors exposed.

The per-layer figures expose intermediate tensors as outputs, and ONNX Runtime does not fuse a Q/DQ pattern whose
inner tensor is an output. An ORT-form candidate then runs other kernels in the comparison than where it is
deployed: HF EfficientNet's pooler, fused to QLinearAveragePool, returned the zero point (all-zero logits) in a
plain session while the comparison measured 29 dB and `quantlab run` said PASS. The first batch runs once more on
each ORT-form candidate, plain, and its per-sample cosine is set beside what the comparison measured::

    batch ─► candidate (plain session) ─► outputs ─► cosine vs reference, per sample
    per_sample.cosine (the comparison's, tensors exposed)   plain worse by 0.005 and by 1.5x the
                                                            deficit (1 - cosine) -> WARNING
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import pandas as pd

from ..backends import Backend
from ..data import Batch
from ..errors import CompareError
from .sample_axes import samples_first

__all__ = ["COSINE_GAP", "DEFICIT_RATIO", "deployed_notes", "exposure_notes"]

COSINE_GAP = 0.005
"""Largest difference of the mean per-sample cosine, plain session vs exposed tensors, taken for kernel rounding
(fused and unfused INT8 kernels requantize differently: ~1e-4)."""


DEFICIT_RATIO = 1.5
"""... and the plain session's cosine deficit must exceed the measured one by this factor: at an INT8 cosine of 0.97
(a depth model's) fused and unfused kernels differ by more than 0.005 in rounding alone. A plain session closer to
the reference than measured is no warning (DPT's: 0.980 plain, 0.973 exposed)."""


def deployed_notes(reference: onnx.ModelProto, protos: Mapping[str, onnx.ModelProto], reference_backend: Backend,
                   backend_of: Callable[[str], Backend], batch: Batch, outputs: Sequence[str],
                   sample_axes: Mapping[str, int], per_sample: pd.DataFrame | None) -> list[str]:
    """:func:`exposure_notes` of the candidates ``protos`` on ``batch``, the FP32 ``reference`` run on
    ``reference_backend`` for it."""
    if not protos or not outputs or per_sample is None or per_sample.empty:  # every output sized by the data: none
        return []
    runner = reference_backend.build(reference)
    try:
        ref = runner.run(batch.feeds, list(outputs))
    finally:
        runner.close()
    return exposure_notes(list(protos), protos, backend_of, ref, batch, outputs, sample_axes, per_sample)


def exposure_notes(names: Sequence[str], protos: Mapping[str, onnx.ModelProto], backend_of: Callable[[str], Backend],
                   reference: Mapping[str, np.ndarray], batch: Batch, outputs: Sequence[str],
                   sample_axes: Mapping[str, int], per_sample: pd.DataFrame | None) -> list[str]:
    """A WARNING per candidate of ``names`` whose plain-session outputs on ``batch`` are further from ``reference``
    (the FP32 outputs on that batch) than the comparison measured (``per_sample``'s cosine of those samples)."""
    if per_sample is None or per_sample.empty or "cosine" not in per_sample.columns:
        return []
    notes = []
    for name in names:
        runner = backend_of(name).build(protos[name])
        try:
            got = runner.run(batch.feeds, list(outputs))
        finally:
            runner.close()
        for output in outputs:
            rows = per_sample[(per_sample["candidate"] == name) & (per_sample["output"] == output)
                              & per_sample["sample"].isin(batch.indices)]
            if rows.empty or rows["cosine"].isna().all():
                continue
            try:
                plain = _cosines(samples_first(reference[output], sample_axes.get(output, 0), len(batch), output),
                                 samples_first(got[output], sample_axes.get(output, 0), len(batch), output))
            except CompareError:  # samples not told apart in this output: the comparison said so already
                continue
            measured = float(rows["cosine"].mean())
            if plain is not None and measured - plain > COSINE_GAP and 1 - plain > DEFICIT_RATIO * (1 - measured):
                notes.append(
                    f"WARNING candidate {name!r}: in a plain ONNX Runtime session its output {output!r} has cosine "
                    f"{plain:.4f} on the first batch, where the comparison measured {measured:.4f} with its tensors "
                    "exposed for the per-layer figures (an exposed tensor stops ONNX Runtime fusing the Q/DQ around "
                    "it): the deployed model computes otherwise. Its end-to-end figures as deployed: compare "
                    "--no-per-layer (or per_layer=False); a fused kernel may be broken for a layer: look for it in "
                    "the per-layer table or pin it")
    return notes


def _cosines(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """The mean over samples of the cosine between the flattened float outputs; None for other outputs."""
    ref, cand = np.asarray(reference), np.asarray(candidate)
    if ref.dtype.kind != "f" or cand.dtype.kind != "f" or ref.shape != cand.shape or not len(ref):
        return None
    values = []
    for r, c in zip(ref.reshape(len(ref), -1).astype(np.float64), cand.reshape(len(cand), -1).astype(np.float64),
                    strict=True):
        finite = np.isfinite(r) & np.isfinite(c)
        r, c = r[finite], c[finite]
        norms = float(np.linalg.norm(r) * np.linalg.norm(c))
        values.append(1.0 if norms == 0 and not np.any(r - c) else float(r @ c) / norms if norms else 0.0)
    return float(np.mean(values))
