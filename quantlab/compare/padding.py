"""Padded positions: where a transformer's ``attention_mask`` is 0, its outputs are not read by anyone.

A batch of sentences padded to one length (``attention_mask = [1, 1, 1, 0, 0]``) makes the model compute outputs at
the padded positions too. Nothing reads them, and they are where FP32 and INT8 differ most (queries over masked
keys): counted, they pulled a masked-LM's token agreement and SQNR down by the share of padding in the set. For an
output whose second axis (samples first) is the mask's sequence axis, those positions are left out of every
end-to-end figure: their values are set to 0 in the reference and the candidate alike (no signal, no noise) and
token/element agreement counts the real positions only::

    attention_mask [N, S]   ──►  valid = mask != 0                      [N, S]
    output         [N, S, H]  ──►  where(valid[..., None], output, 0)   (cosine, SQNR, max_abs, per sample too)
    best classes   [N, S]     ──►  agreement over valid positions only

The mask input is found by name (``attention_mask``, as Hugging Face and tf2onnx exports call it), rank 2; an
output qualifies batch by batch, when its first two axes have the mask's shape. A user metric gets the outputs
as the model returned them; the per-layer figures count every position.

A decoder's mask is over the encoder's positions, not its own (cross-attention): a decoder step exported with
both lengths fixed at 16 had 43 % of its real output positions left out by the encoder's padding. A mask named
``encoder_...`` or read beside an input of a decoder (``decoder_input_ids``, ``encoder_hidden_states``) is not
used (:func:`cross_attention_mask`): every position counts, with a note.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..data import Batch
from ..graph import LoadedModel
from ..graph.samples import data_sized

__all__ = ["DECODER_MARKS", "MASK_NAME", "cross_attention_mask", "cross_attention_note", "mask_input", "padded_outputs",
           "padding_note", "valid_positions", "without_padding"]

MASK_NAME = "attention_mask"
"""The input whose zeros mark padding (a name ending in it: ``attention_mask``, ``input.attention_mask:0``)."""


DECODER_MARKS = ("decoder_", "encoder_")
"""Parts of input names (lower case) that mark a decoder, whose attention mask (when not itself named
``decoder_...``) is over its encoder's positions (:func:`cross_attention_mask`): ``decoder_input_ids``,
``encoder_hidden_states``, optimum's ``encoder_attention_mask``."""


def _named_mask(model: LoadedModel) -> str | None:
    for spec in model.inputs:
        name = spec.name.lower().removesuffix(":0")
        if name.endswith(MASK_NAME) and spec.shape is not None and len(spec.shape) == 2:
            return spec.name
    return None


def cross_attention_mask(model: LoadedModel) -> str | None:
    """The attention-mask input when it masks an encoder's positions for a decoder (named ``encoder_...``, or read
    beside an input named as a decoder's, :data:`DECODER_MARKS`); None otherwise."""
    mask = _named_mask(model)
    if mask is None or "decoder" in _leaf(mask):  # decoder_attention_mask: the decoder's own positions
        return None
    others = [_leaf(s.name) for s in model.inputs if s.name != mask]
    return mask if "encoder" in _leaf(mask) or any(m in n for n in others for m in DECODER_MARKS) else None


def _leaf(name: str) -> str:
    """An input's name without its scope (``model/decoder_input_ids:0`` -> ``decoder_input_ids``), lower case."""
    return name.lower().removesuffix(":0").rsplit("/", 1)[-1].rsplit(".", 1)[-1]


def mask_input(model: LoadedModel) -> str | None:
    """The model's attention-mask input: named :data:`MASK_NAME` (case and a ``:0`` suffix aside), rank 2, and not
    a decoder's mask over its encoder's positions (:func:`cross_attention_mask`)."""
    mask = _named_mask(model)
    return None if mask is None or cross_attention_mask(model) else mask


def padded_outputs(model: LoadedModel, sample_axes: Mapping[str, int]) -> list[str]:
    """Outputs that may hold a position axis the mask describes: rank >= 2, size not decided by the data, and
    (declared dims) a second axis that is not another symbol or size than the mask's sequence axis."""
    mask = mask_input(model)
    if mask is None:
        return []
    mask_spec = next(s for s in model.inputs if s.name == mask)
    seq = mask_spec.shape[1] if mask_spec.shape else None
    sized = data_sized(model)
    out = []
    for spec in model.outputs:
        shape = spec.shape
        if shape is None or len(shape) < 2 or spec.name in sized or not spec.is_float:
            continue
        rest = [d for i, d in enumerate(shape) if i != sample_axes.get(spec.name, 0)]
        if seq is not None and rest[0] is not None and rest[0] != seq:
            continue
        out.append(spec.name)
    return out


def valid_positions(batch: Batch, mask: str, array: np.ndarray) -> np.ndarray | None:
    """bool ``[n, S]``: the real positions of ``array`` (samples first) by ``batch``'s mask; None when its first
    two axes are not the mask's shape (then every position counts)."""
    m = np.asarray(batch.per_sample(mask))
    if array.ndim < 2 or m.ndim != 2 or tuple(array.shape[:2]) != tuple(m.shape) or bool(m.all()):
        return None
    return m != 0


def without_padding(array: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``array`` with its padded positions set to 0 (``valid``: bool ``[n, S]`` over its first two axes)."""
    where = valid.reshape(valid.shape + (1,) * (array.ndim - 2))
    return np.where(where, array, np.zeros((), dtype=array.dtype))


def cross_attention_note(model: LoadedModel) -> str | None:
    """What the comparison says when it does not use a decoder's mask (:func:`cross_attention_mask`)."""
    mask = cross_attention_mask(model)
    if mask is None:
        return None
    return (f"input {mask!r} reads as a decoder's mask over its encoder's positions (the model also reads "
            f"{', '.join(repr(s.name) for s in model.inputs if s.name != mask)}): padding is not left out of the "
            "figures, every output position counts")


def padding_note(mask: str | None, outputs: list[str], left_out: int) -> str | None:
    """What the comparison says when it left ``left_out`` padded positions out (none: nothing to say; a T5
    encoder's all-ones mask got the note all the same)."""
    if mask is None or not outputs or not left_out:
        return None
    shown = ", ".join(map(repr, outputs[:4])) + (f" and {len(outputs) - 4} more" if len(outputs) > 4 else "")
    return (f"{left_out} position(s) where input {mask!r} is 0 (padding) are left out of the end-to-end and "
            f"per-sample figures of {shown} (cosine, SQNR, max_abs, token agreement), where their second axis is "
            "the mask's; the per-layer figures and a --metric see every position")
