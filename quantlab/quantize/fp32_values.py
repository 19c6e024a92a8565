"""The FP32 values of chosen tensors over a data set, batch by batch: one ONNX Runtime pass with them exposed.

What bias correction (input means) and SmoothQuant (channel maxima) measure from::

    batches ──► FP32 model (the tensors as extra outputs) ──► {tensor: its rows of this batch} ──► caller's reduction
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from ..backends import get_backend
from ..data import DataSet
from ..errors import QuantlabError
from ..graph import LoadedModel, with_outputs

__all__ = ["fp32_values"]


def fp32_values(model: LoadedModel, tensors: Iterable[str], dataset: DataSet, batch_size: int,
                max_samples: int | None, *, purpose: str) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Per batch: (its samples, tensor -> its value, cut to those samples on axis 0), at most ``max_samples``
    in all. A data set that yields no sample is a QuantlabError naming ``purpose`` ("bias correction")."""
    names = list(dict.fromkeys(tensors))
    inputs = set(model.input_names)
    exposed = sorted(set(names) - inputs)
    runner = get_backend("ort").build(with_outputs(model.proto, exposed), outputs=exposed)
    seen = 0
    try:
        for batch in dataset.batches(batch_size):
            take = len(batch) if max_samples is None else min(len(batch), max_samples - seen)
            if take <= 0:
                break
            feeds = dict(batch.feeds)
            got = runner.run(feeds, exposed) if exposed else {}
            yield take, {t: _first_samples(np.asarray(feeds[t] if t in inputs else got[t]), len(batch), take)
                         for t in names}
            seen += take
    finally:
        runner.close()
    if seen == 0:
        raise QuantlabError(f"{purpose} needs calibration samples; the data set is empty")


def _first_samples(value: np.ndarray, samples: int, take: int) -> np.ndarray:
    """``value``'s rows of the first ``take`` of ``samples`` samples: all of it when all are taken (a flattened
    ``[N*S, H]`` before a MatMul was cut to its first N rows: tf2onnx BERTs' bias corrections measured a few
    tokens); the first ``take * S`` rows of a flattened one otherwise."""
    if take >= samples or value.ndim == 0:
        return value
    rows = value.shape[0]
    if rows == samples:
        return value[:take]
    return value[: take * (rows // samples)] if rows % samples == 0 else value

