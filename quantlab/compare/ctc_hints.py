"""Hints that an output is read better another way: per-position scores that look like CTC's (one class, the
blank, best at most positions) while ``--ctc-blank`` is not given.

DETR-style detectors are not hinted: their "no object" class is best at most queries, as a blank is at most
frames, but a box per query beside the scores (``[N, Q, 4]``) says what they are.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..graph import LoadedModel

__all__ = ["CTC_BLANK_SHARE", "ctc_hints"]

CTC_BLANK_SHARE = 0.5
"""A class that is the reference's best at this share of an output's positions or more reads like a CTC blank."""


def ctc_hints(model: LoadedModel, best_counts: Mapping[str, np.ndarray], blank: int | None) -> list[str]:
    """Notes on the ``[N, T, C]`` outputs that look like CTC scores while ``blank`` is None: one class best at
    :data:`CTC_BLANK_SHARE` of the positions or more (``best_counts``: output -> the reference's best classes
    counted), in a model whose inputs are all float (an image, audio; a token classifier, whose "O" tag is as
    common, reads token ids), and without a box per position (:func:`_has_boxes`)."""
    if blank is not None or not all(spec.is_float for spec in model.inputs):
        return []
    out = []
    for o, counts in best_counts.items():
        if _has_boxes(model, o):  # DETR/YOLOS: "no object" is best at most queries, as a blank is at most frames
            continue
        total = int(counts.sum())
        if total and counts.max() >= CTC_BLANK_SHARE * total:
            k = int(counts.argmax())
            out.append(f"output {o!r}: class {k} is the reference's best class at {counts[k] / total:.0%} of the "
                       f"positions, as a CTC blank is; if these are CTC scores (OCR, speech), --ctc-blank {k} "
                       "(ctc_blank in an experiment) also compares the text they read: text_agreement and cer "
                       "(token agreement counts the blanks, sequence agreement the positions)")
    return out


def _has_boxes(model: LoadedModel, output: str) -> bool:
    """Whether another output holds a box ``[N, Q, 4]`` per position of ``output`` ``[N, Q, C]`` (the same Q,
    a symbol or a size): a DETR-style detector's class scores per query, not a sequence."""
    shapes = {spec.name: tuple(spec.shape or ()) for spec in model.outputs}
    mine = shapes.get(output, ())
    if len(mine) != 3 or mine[1] in (None, -1):
        return False
    return any(name != output and len(shape) == 3 and shape[2] == 4 and shape[1] == mine[1]
               for name, shape in shapes.items())
