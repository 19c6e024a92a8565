"""Outputs a user reads as choices, not as numbers, and how often a candidate makes the reference's choice.

**Scores per position.** An OCR recogniser's CTC scores ``[T, N, C]``, a token classifier's tags or a
language model's logits ``[N, T, C]``: what a user reads off them is the best class at each position (the
decoded text, the tags, the next token), which cosine and SQNR over the whole tensor do not show. For such outputs the end-to-end table
adds (in %):

    token_agreement      positions whose best class is the reference's, per sample, then the mean over
                         samples (bootstrap interval over samples)
    sequence_agreement   samples whose every position agrees (exact binomial interval): under greedy CTC
                         decoding such a sample reads the same text, whatever the others read

A segmentation map ``[N, C, H, W]`` is read the same way, its pixels the positions (the best class at each pixel:
``token_agreement`` is then pixel agreement, and ``miou`` the mean over classes of their maps' overlap:
:func:`segmentation_maps`), when its scores reach the output through an upsampling or a softmax (DeepLab's head;
not an image a super-resolution model's last conv returns).

Which outputs (:func:`position_scorers`): float, rank 3, samples not on the last axis, a fixed class count > 1
on the last axis (or rank 4 as above), and class scores (:func:`score_outputs`, which also decides the ``[N, C]`` classifiers of
:mod:`.labels`): computed by a linear layer (MatMul, Gemm, Conv, Einsum) through only biases, scales,
(log-)softmax, a ReLU and pooling, and layout ops; or, whatever computes them, normalised over the classes by a
(log-)softmax that writes the output (a decoding loop's logits buffer, softmaxed after the loop: SLANet's)::

    MatMul ─► Add(bias) ─► LogSoftmax ─► Transpose ─► output [T, N, C]     scores: yes
    Loop(body: MatMul ─► Softmax ─► scan output) ─► Transpose ─► output [N, T, C]  scores: yes (a decoder's steps)
    Loop(... MatMul ─► Scatter into a buffer) ─► Softmax(axis=-1) ─► output [N, T, C]   scores: yes
    ... ─► LayerNormalization ─► output [N, T, 768]                        hidden states: no

With ``CompareOptions.ctc_blank`` (``compare --ctc-blank K``) the ``[N, T, C]`` scores are CTC scores and are also read
as text (:mod:`quantlab.metrics.text`: greedy decoding, runs merged, blanks dropped)::

    text_agreement       samples whose text is the reference's (exact binomial interval): what an OCR user reads
    cer                  character error rate of the candidate's text against the reference's, %, mean over samples

Padded positions (an ``attention_mask`` input's zeros) do not count: :mod:`.padding`. Where the data decides the
length (a decoding loop that stops at its end token), a batch whose lengths differ from the reference's counts as
no sample agreeing, as for integer outputs below.

**Integer and boolean outputs** (:func:`exact_outputs`): class ids from an ArgMax, TopK indices, tokens a
decoding loop emits, masks. Class 7 is not "close" to class 8, so their cosine, SQNR and rel_l2 are left out
(NaN) and they add (in %):

    element_match        elements equal to the reference's, per sample, then the mean over samples
    exact_match          samples whose whole output equals the reference's (exact binomial interval)

Both kinds give, per sample, the % of parts that agree and whether all do (:func:`part_agreement`).
Outputs a Sigmoid writes are read as the masks their probabilities mark, compared as boolean outputs are
(:mod:`.probabilities`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from ..errors import CompareError
from ..graph import LoadedModel
from ..graph.topology import initializer_map, producer_map
from ..metrics import counted_elements

__all__ = ["CHOICE_COLUMNS", "best_positions", "ctc_outputs", "decided_positions",
           "exact_outputs", "part_agreement", "position_scorers", "class_map_hints", "score_outputs", "segmentation_maps", "state_outputs"]

CHOICE_COLUMNS: Mapping[str, tuple[str, str, str]] = {
    "positions": ("token_agreement", "sequence_agreement", "sequence_agree"),
    "values": ("element_match", "exact_match", "exact_agree"),
    "decisions": ("element_match", "exact_match", "exact_agree"),  # the masks probabilities mark (.probabilities)
}
"""Kind of output -> its columns: per-part % and whole-sample % (end-to-end and per-sample tables), and the
per-sample table's bool."""

_LINEAR = frozenset({"MatMul", "Gemm", "Conv", "Einsum", "FusedMatMul", "FusedGemm", "FusedConv"})
"""Ops that compute class scores from features (ORT's fused forms too: an ORT-optimized graph)."""
_ON_THE_WAY = frozenset({"Softmax", "LogSoftmax", "Relu", "Transpose", "Reshape", "Flatten", "Identity",
                         "Cast", "Squeeze", "Unsqueeze", "Dropout", "GlobalAveragePool", "AveragePool",
                         "ReduceMean", "Resize", "Upsample"})
"""Ops between the linear layer and the output that keep each class's score apart and in order (their data input
is the first): a softmax, a ReLU, the global pool of a 1x1-conv head (SqueezeNet), a segmentation head's
upsampling, layout ops. Not a Sigmoid:
its outputs are independent probabilities (multi-label tags, basic-pitch's 88 piano keys per frame), where the
best one is no decision (FP16 "changed" 63 of 64 samples whose thresholded notes agreed 99.3 %)."""
_WITH_A_CONSTANT = frozenset({"Add", "Sub", "Mul", "Div"})
"""... and a bias, a logit scale or a temperature: one operand a constant or a graph input."""
_MAX_HOPS = 16


def score_outputs(model: LoadedModel) -> set[str]:
    """The float outputs computed by a linear layer through only :data:`_ON_THE_WAY` ops and constant
    biases/scales: class scores. Not hidden states (a LayerNorm's, a pooler's Tanh), embeddings divided by their
    norm, or a TopK's sorted scores."""
    producers = producer_map(model.proto)
    constants = set(initializer_map(model.proto)) | {
        o for n in model.proto.graph.node if n.op_type == "Constant" for o in n.output}
    return {spec.name for spec in model.outputs if spec.is_float and (
        _from_linear_layer(spec.name, producers, constants) or _softmax_over_classes(spec.name, spec.shape, producers))}


def _softmax_over_classes(output: str, shape: tuple | None, producers: Mapping[str, onnx.NodeProto]) -> bool:
    """Whether a Softmax/LogSoftmax writes ``output`` (through Identity/Cast) over its class axis: the last of an
    ``[C]``, ``[N, C]`` or ``[N, T, C]`` output, axis 1 of an ``[N, C, H, W]`` map. Loaded models are opset >= 13,
    where the softmax normalises that one axis."""
    if not shape:
        return False
    node = producers.get(output)
    while node is not None and node.op_type in ("Identity", "Cast"):
        node = producers.get(node.input[0])
    if node is None or node.op_type not in ("Softmax", "LogSoftmax"):
        return False
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    return axis % len(shape) == (1 if len(shape) == 4 else len(shape) - 1)


def position_scorers(model: LoadedModel, sample_axes: Mapping[str, int],
                     class_maps: Sequence[str] = ()) -> dict[str, int]:
    """Output -> class count, for the outputs that score classes at every position (see the module docstring):
    ``[N, T, C]`` scores, and ``[N, C, H, W]`` segmentation maps (:func:`_segmentation_map`, or named in
    ``class_maps``: CompareError for one that is no such output)."""
    scored = score_outputs(model)
    out: dict[str, int] = {}
    for spec in model.outputs:
        shape = spec.shape
        if spec.name in class_maps:
            out[spec.name] = _named_class_map(model, spec.name, shape, sample_axes.get(spec.name, 0))
            continue
        if shape is None or spec.name not in scored:
            continue
        if len(shape) == 3 and sample_axes.get(spec.name, 0) != 2:
            classes = shape[2]
        elif len(shape) == 4 and sample_axes.get(spec.name, 0) == 0 and _segmentation_map(model, spec.name, shape):
            classes = shape[1]
        else:
            continue
        if isinstance(classes, int) and classes > 1:
            out[spec.name] = classes
    missing = sorted(set(class_maps) - set(model.output_names))
    if missing:
        raise CompareError(f"class map {missing[0]!r} is not an output of {model.label} (its outputs: "
                           f"{', '.join(map(repr, model.output_names))}); name an [N, C, H, W] output")
    return out


def _named_class_map(model: LoadedModel, name: str, shape: tuple | None, sample_axis: int) -> int:
    """The class count of an output the user names a class map; CompareError unless it is ``[N, C, H, W]`` float
    scores with a fixed C > 1 and its samples on axis 0."""
    spec = next(s for s in model.outputs if s.name == name)
    classes = shape[1] if shape is not None and len(shape) == 4 else None
    if not spec.is_float or sample_axis != 0 or not isinstance(classes, int) or classes < 2:
        raise CompareError(f"class map {name!r} of {model.label} is {spec.dtype} "
                           f"{'[?]' if shape is None else list(shape)}: a class map is float scores [N, C, H, W] "
                           "with a fixed class count C > 1 on axis 1; drop it from the class maps")
    return classes


def _one_by_one_conv(node: onnx.NodeProto, weights: Mapping[str, onnx.TensorProto]) -> bool:
    if node.op_type != "Conv":
        return False
    kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), None)
    if kernel is None and len(node.input) > 1 and node.input[1] in weights:
        kernel = list(weights[node.input[1]].dims[2:])
    return kernel == [1, 1]


def class_map_hints(model: LoadedModel, positions: Mapping[str, int]) -> list[str]:
    """Notes on ``[N, C, H, W]`` float outputs a 1x1 Conv writes that are not read as class maps: a segmentation head at reduced resolution (SegFormer's logits at 1/4 size)
    looks like that, and so does a keypoint heatmap, so it is left to the user to say."""
    producers, weights = producer_map(model.proto), initializer_map(model.proto)
    out = []
    for spec in model.outputs:
        shape = spec.shape
        if spec.name in positions or not spec.is_float or shape is None or len(shape) != 4:
            continue
        conv = producers.get(spec.name)
        if not isinstance(shape[1], int) or shape[1] < 2 or conv is None or not _one_by_one_conv(conv, weights):
            continue
        out.append(f"output {spec.name!r} {list(shape)} comes straight from a 1x1 Conv: if it holds class scores "
                   "per pixel (a segmentation head at reduced resolution, as SegFormer's), give --class-map "
                   f"{spec.name} (class_maps = [\"{spec.name}\"] in an experiment file) for pixel agreement and "
                   "miou; a keypoint heatmap or an image is compared as values, as now")
    return out


def state_outputs(model: LoadedModel, carry: Mapping[str, str]) -> frozenset[str]:
    """Outputs that are a recurrent state: fed back by the data set's ``carry``, or of the very shape of an input
    (Silero VAD v6's ``hn``/``cn [1, 1, 128]`` beside its ``h``/``c``)."""
    shapes = [spec.shape for spec in model.inputs if spec.shape]
    return frozenset(set(carry) | {spec.name for spec in model.outputs if spec.shape and spec.shape in shapes})


def segmentation_maps(model: LoadedModel, positions: Mapping[str, int]) -> list[str]:
    """The outputs of ``positions`` that are maps ``[N, C, H, W]`` (a class per pixel): they also get ``miou``, the
    mean over classes of the candidate's class map's overlap with the reference's
    (:func:`quantlab.metrics.mean_class_iou`)."""
    return [spec.name for spec in model.outputs if spec.name in positions and spec.shape is not None
            and len(spec.shape) == 4]


def ctc_outputs(model: LoadedModel, positions: Mapping[str, int], blank: int) -> list[str]:
    """The outputs of ``positions`` (:func:`position_scorers`) read as CTC scores under class ``blank``: those of
    rank 3 (``[N, T, C]`` or ``[T, N, C]``; not segmentation maps). An error when there is none, or when the
    blank is not one of an output's classes."""
    ranked = {spec.name: spec.shape for spec in model.outputs}
    found = [o for o in positions if ranked.get(o) is not None and len(ranked[o]) == 3]
    if not found:
        raise CompareError(f"--ctc-blank {blank}: no output of {model.label} holds class scores per position "
                           "([N, T, C] or [T, N, C], computed by a linear layer through a (log-)softmax), so none "
                           "reads as CTC text; drop --ctc-blank")
    narrow = [o for o in found if blank >= positions[o]]
    if narrow:
        raise CompareError(f"--ctc-blank {blank}: output {narrow[0]!r} scores {positions[narrow[0]]} classes "
                           f"(0-{positions[narrow[0]] - 1}); give the index of its blank class (often 0, or the last)")
    return found


def _segmentation_map(model: LoadedModel, output: str, shape: tuple) -> bool:
    """Whether ``[N, C, H, W]`` class scores reach the output through an upsampling or a softmax: a segmentation
    head (DeepLab's 1x1 conv, then Resize to the input's size). A conv's output as such is not taken: an image a
    super-resolution or denoising model returns is one too."""
    producers = producer_map(model.proto)
    constants = set(initializer_map(model.proto)) | {
        o for n in model.proto.graph.node if n.op_type == "Constant" for o in n.output}
    ops = _ops_from_linear_layer(output, producers, constants) or []
    return bool({"Resize", "Upsample", "Softmax", "LogSoftmax"} & set(ops)) or _softmax_over_classes(
        output, shape, producers)


def _from_linear_layer(tensor: str, producers: Mapping[str, onnx.NodeProto], constants: set[str]) -> bool:
    return _ops_from_linear_layer(tensor, producers, constants) is not None


def _ops_from_linear_layer(tensor: str, producers: Mapping[str, onnx.NodeProto],
                           constants: set[str]) -> list[str] | None:
    """The op types between the linear layer that computes ``tensor`` and it (output side first; ``Softmax`` for
    one written out), or None when ``tensor`` is not class scores."""
    ops: list[str] = []
    for _ in range(_MAX_HOPS):
        node = producers.get(tensor)
        if node is None:
            return None
        if node.op_type in _LINEAR:
            return ops
        if node.op_type in ("Loop", "Scan"):  # what the body emits each step (a decoder's scores), else None
            body = next(a.g for a in node.attribute if a.name == "body")
            index = list(node.output).index(tensor) + (node.op_type == "Loop")  # a Loop's body first emits its cond
            if index >= len(body.output):
                return None
            producers = {**producers, **{o: n for n in body.node for o in n.output if o}}
            constants = constants | {i.name for i in body.initializer} | {
                o for n in body.node if n.op_type == "Constant" for o in n.output}
            tensor = body.output[index].name
            continue
        normalised = _normalised_input(node, producers, constants)
        if normalised is not None:
            tensor = normalised
            ops.append("Softmax")
        elif node.op_type in _WITH_A_CONSTANT:  # the other operand: a constant or a graph input (a temperature)
            data = [t for t in node.input if t not in constants and t in producers]
            if len(data) != 1:
                return None
            tensor = data[0]
        elif node.op_type in _ON_THE_WAY:
            tensor = node.input[0]
            ops.append(node.op_type)
        elif node.op_type == "Gather" and node.input[1] in constants and _gather_axis(node) >= 1:
            tensor = node.input[0]  # Perceiver's x[:, 0]: one query's scores out of [N, queries, C]
            ops.append(node.op_type)
        else:
            return None
    return None


def _gather_axis(node: onnx.NodeProto) -> int:
    """A Gather's axis attribute (0 by default; negative ones, which may be the class axis, as given)."""
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


_BROADCASTS = frozenset({"Expand", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Cast", "Flatten"})
"""Ops that carry a per-sample statistic back to the shape of the tensor it was reduced from."""
_STATISTICS = frozenset({"ReduceMax", "ReduceSum", "ReduceMean", "ReduceLogSumExp", "Log", "Exp", "Max", "Add"})
"""... and the reductions a softmax written out op by op is made of (Max/Add: with a constant floor or epsilon)."""


def _normalised_input(node: onnx.NodeProto, producers: Mapping[str, onnx.NodeProto],
                      constants: set[str]) -> str | None:
    """The scores a softmax written out op by op (jax2tf/tf2onnx, a hand-written torch softmax) normalises, else
    None::

        z ─► Sub(z, max(z)) ─► Exp ─► e ─► Div(e, sum(e)) ─► output        z: scores
        z ─► Sub(z, log(sum(exp(z)))) ─► output                             (log-softmax)

    A ``Sub``/``Div`` whose second operand is a statistic of its first (reduced over the classes, broadcast
    back) keeps each sample's classes in order; the ``Div`` also needs an ``Exp`` numerator, so an embedding
    divided by its own norm (a ``Sqrt`` of a sum of squares) is not read as scores.
    """
    if node.op_type not in ("Sub", "Div") or len(node.input) != 2:
        return None
    data, statistic = node.input
    if not _statistic_of(statistic, data, producers, constants):
        return None
    if node.op_type == "Sub":
        return data
    exp = producers.get(data)
    return exp.input[0] if exp is not None and exp.op_type == "Exp" else None


def _statistic_of(tensor: str, source: str, producers: Mapping[str, onnx.NodeProto], constants: set[str]) -> bool:
    """Whether ``tensor`` is a reduction of ``source`` alone, broadcast back (any other operand a constant or a
    shape)."""
    reduced = False
    for _ in range(_MAX_HOPS):
        node = producers.get(tensor)
        if node is None or node.op_type not in _BROADCASTS | _STATISTICS:
            return False
        data = [t for t in node.input[:1 if node.op_type in _BROADCASTS else None] if t and t not in constants]
        if len(data) != 1:
            return False
        reduced = reduced or node.op_type.startswith("Reduce")
        if data[0] == source:
            return reduced
        tensor = data[0]
    return False


def best_positions(scores: np.ndarray) -> np.ndarray:
    """int32: the best class at each position of ``[N, T, C]`` scores (``[N, T]``) or at each pixel of an
    ``[N, C, H, W]`` segmentation map (``[N, H, W]``); NaN ranks last, ties: lower index, as
    :func:`quantlab.metrics.topk`."""
    x = np.asarray(scores)
    if x.ndim not in (3, 4):
        raise ValueError(f"per-position scores must be [N, T, C] or [N, C, H, W], got shape {x.shape}")
    axis = 2 if x.ndim == 3 else 1
    if x.shape[axis] == 0:
        raise ValueError(f"per-position scores have no class axis to pick from (shape {x.shape})")
    nan = np.isnan(x)
    if nan.any():
        x = np.where(nan, -np.inf, x)
    return np.argmax(x, axis=axis).astype(np.int32)


def decided_positions(reference: np.ndarray, candidate: np.ndarray, valid: np.ndarray | None = None
                      ) -> np.ndarray | None:
    """bool ``[N, T]``: the positions of ``[N, T, C]`` scores that count (within ``valid``, the padding's), those
    where the reference or the candidate prefers a class; ``valid`` itself when every one does, or for other
    shapes. A row of equal scores is no choice: a decoding loop's buffer left at zeros after its end token (or a
    softmax of such zeros, all classes equal) would count as agreement wherever both models had stopped, and a
    long buffer's token agreement would read near 100 % whatever the tokens; where only one model still emits,
    the row counts. (SLANet writes class 0 with confidence 1 after its end token: decided rows, counted.)"""
    if reference.ndim != 3 or reference.shape != candidate.shape:
        return valid
    with np.errstate(invalid="ignore"):
        decided = (np.ptp(reference, axis=-1) > 0) | (np.ptp(candidate, axis=-1) > 0)
    if decided.all():
        return valid
    return decided if valid is None else decided & valid


def exact_outputs(model: LoadedModel) -> list[str]:
    """The integer and boolean outputs. Where the data decides their size (the tokens a decoder emits until its
    end token), a batch whose shapes differ counts as no sample matching."""
    return [spec.name for spec in model.outputs if spec.dtype == "bool" or spec.dtype.startswith(("int", "uint"))]


def part_agreement(reference: np.ndarray, candidate: np.ndarray,
                   valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per sample (axis 0) of two same-shape arrays: the % of elements that are equal (float64 [N], NaN for
    samples without elements) and whether all are (bool [N]). With ``valid`` (bool over the first two axes: the
    real positions, :mod:`.padding`), only the elements at valid positions count."""
    if reference.shape != candidate.shape:
        raise ValueError(f"outputs of shape {reference.shape} and {candidate.shape} do not pair up")
    n = reference.shape[0] if reference.ndim else 1
    same = (np.asarray(reference) == np.asarray(candidate)).reshape(n, -1)
    counted = counted_elements(np.shape(reference), valid)
    total = counted.sum(axis=1)
    agree = (same & counted).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        part = np.where(total > 0, agree / np.maximum(total, 1) * 100.0, np.nan)
    return part, agree == total
