"""Does a data set fit a model's inputs? Checked before any work starts, with advice for where the data comes from.

    names ──> dtypes ──> per-sample shapes (symbolic dims resolved, the same symbol equal everywhere)
          ──> fixed model batch vs the batch size ──> one batch fits in free memory

The advice names the fix for the input's origin (``input_origin`` of the data
set): the image pipeline (``image``), a ``hook``, ``npy``/``npz`` files (batched
or not), Hugging Face columns (``hf_disk``) or in-memory arrays (``memory``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..environment import available_memory_bytes, format_bytes, shape_bytes
from ..errors import DataError, InputMismatchError
from ..graph import LoadedModel, TensorSpec
from ..graph.samples import batch_named, sample_mixing_nodes
from ..shapes import fixed_batch_size
from .batches import batch_fits, format_shape
from .manifest import DataSetManifest

__all__ = ["PILLOW_MAX_PIXELS", "check_inputs", "coupled_batch_note", "dataset_label", "fixed_batch",
           "samples_coupled"]


def _data_specs(dataset: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    """dtype name and per-sample shape of each input the data gives, loading at most one sample."""
    if hasattr(dataset, "input_specs"):
        return {n: (s.dtype, tuple(s.shape or ())) for n, s in dataset.input_specs().items()}
    if hasattr(dataset, "sample"):
        feeds = dataset.sample(0).feeds
        return {n: (np.asarray(a).dtype.name, tuple(np.shape(a))) for n, a in feeds.items()}
    arrays = getattr(dataset, "arrays", None)
    if isinstance(arrays, Mapping):
        return {n: (np.asarray(a).dtype.name, tuple(np.shape(a))[1:]) for n, a in arrays.items()}
    first = next(iter(dataset.batches(1)), None)
    if first is None:
        raise DataError("the data set is empty; give it at least one sample")
    feeds = getattr(first, "feeds", first)
    return {n: (np.asarray(a).dtype.name, tuple(np.shape(a))[1:]) for n, a in feeds.items()}


def dataset_label(dataset: Any) -> str:
    manifest = getattr(dataset, "manifest", None)
    if isinstance(manifest, DataSetManifest):
        return f"data set {manifest.path}"
    return f"data set {getattr(dataset, 'name', type(dataset).__name__)!r}"


PILLOW_MAX_PIXELS = 89_478_485
"""Pillow's default decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``): a crop larger than this is no advice."""


def _origin(dataset: Any, name: str) -> tuple[str, bool]:
    """Where an input's samples come from, for advice that fits: (origin, batched files).

    origin: ``image`` (the built-in image pipeline), ``hook`` (a [preprocess]
    hook), ``npy``/``npz``/``hf_disk`` (arrays from files) or ``memory``.
    """
    how = getattr(dataset, "input_origin", None)
    return how(name) if callable(how) else ("memory", False)


def _image_hint(expected: Sequence[Any], got: Sequence[int], layout: str) -> str:
    fixed = [d for d in expected if isinstance(d, int)]
    if len(fixed) == 3 and sorted(fixed) == sorted(got):
        return f"The layout differs: set [preprocess] layout = \"{'NHWC' if got[0] in (1, 3) else 'NCHW'}\""
    c_axis, h_axis, w_axis = (0, 1, 2) if layout == "NCHW" else (2, 0, 1)
    channels = expected[c_axis]
    if isinstance(channels, int) and channels != got[c_axis]:
        if channels in (1, 3):
            order = '"L" (one channel)' if channels == 1 else '"RGB" (or "BGR")'
            return f"Set [preprocess] channel_order = {order}"
        return (f"The model wants {channels} channels and the image pipeline makes 1 or 3; use a [preprocess] hook "
                "that returns the model's per-sample shape")
    h, w = expected[h_axis], expected[w_axis]
    if isinstance(h, int) and isinstance(w, int) and 0 < h * w <= PILLOW_MAX_PIXELS:
        return f"Set [preprocess] center_crop = [{h}, {w}] (and resize >= {max(h, w)})"
    return (f"No image pipeline makes {format_shape(expected)} (more pixels than Pillow decodes); check the model's "
            "input shape")


def _shape_hint(origin: str, expected: Sequence[Any], got: Sequence[int], layout: str, dtype: str) -> str:
    """How to make samples of shape ``got`` into ``expected`` (no batch axis), for where they come from."""
    want = format_shape(expected)
    one = shape_bytes([d for d in expected if isinstance(d, int) and d > 0], np.dtype(dtype).itemsize)
    available = available_memory_bytes()
    if available is not None and one > available:
        return (f"One sample of {want} would be {format_bytes(one)} ({one} bytes), more than the "
                f"{format_bytes(available)} this machine has available: check the model's input shape (re-export "
                "it with the size it is really used at)")
    if origin == "image":
        return _image_hint(expected, got, layout)
    if origin == "hook":
        return f"Make the [preprocess] hook return arrays of shape {want} (one sample, no batch axis)"
    fixed = [d for d in expected if isinstance(d, int)]
    transpose = (" (the same sizes in another order: transpose them, e.g. numpy.transpose)"
                 if len(fixed) == len(got) and sorted(fixed) == sorted(got) else "")
    if origin == "memory":
        return f"Give arrays of shape [N, {want[1:]}, the first axis counting samples{transpose}"
    return f"Re-save the arrays with per-sample shape {want}{transpose}"


def _rank_hint(origin: str, batched: bool, want: str, got: Sequence[int], model_shape: Sequence[Any],
               name: str) -> str:
    model_rank = len(model_shape)
    if origin == "image":
        return ("An image becomes a rank-3 sample ([C, H, W] or [H, W, C]) and this input is not an image batch: map "
                f"another field in [inputs], or use a [preprocess] hook that returns shape {want}")
    if origin == "hook":
        return f"Make the [preprocess] hook return arrays of shape {want} (one sample, no batch axis)"
    if origin == "memory":
        return f"Give arrays of shape [N, {want[1:]}, the first axis counting samples"
    if origin in ("npy", "npz") and not batched and tuple(got) == tuple(model_shape):
        return (f"Each sample has the input's whole shape {format_shape(model_shape)}: if the model takes one "
                "sample per run with no batch axis (an image as [3, H, W]), or every sample of a batch holds the same "
                f"value (a table, a weight), write [inputs] {name} = {{ field = \"...\", batch_axis = \"none\" }} "
                f"(a model with no input batched runs one sample at a time); if each file holds {got[0]} samples, set "
                "batched = true in its [[source]]")
    if origin in ("npy", "npz") and not batched and len(got) == model_rank:
        return (f"Each file holds a leading axis of {got[0]}, like a batch: set batched = true in its [[source]] to "
                "take one sample per row")
    if origin in ("npy", "npz") and batched and len(got) == model_rank - 2:
        return ("batched = true takes one sample per row of a file, and these rows lack an axis: if each file is one "
                "sample, set batched = false")
    return f"Re-save the arrays with per-sample shape {want}"


def fixed_batch(model: LoadedModel, dataset: Any) -> int | None:
    """The batch the batched inputs of ``model`` fix (a static export's ``[1, 3, 640, 640]``, or a recurrent
    state ``[layers, 1, H]`` beside a dynamic input: :func:`quantlab.shapes.fixed_batch_size`), None when they
    leave it dynamic or disagree; ``dataset`` says which axis holds each input's samples. 1 too when no input has a
    sample axis (``batch_axis = "none"`` for all: an image model exported as ``[3, 64, 64]`` takes one per run)."""
    axes = {spec.name: dataset.batch_axis(spec.name) if hasattr(dataset, "batch_axis") else 0
            for spec in model.inputs}
    if axes and all(a is None for a in axes.values()):
        return 1
    return fixed_batch_size({spec.name: spec.shape for spec in model.inputs}, axes)


def samples_coupled(model: LoadedModel, dataset: Any) -> list[str]:
    """The nodes of ``model`` that combine values across the samples of a batch
    (:func:`quantlab.graph.samples.sample_mixing_nodes`); ``dataset`` says which axis holds each input's samples."""
    axes = {spec.name: dataset.batch_axis(spec.name) if hasattr(dataset, "batch_axis") else 0
            for spec in model.inputs}
    return sample_mixing_nodes(model, axes)


def coupled_batch_note(label: str, nodes: Sequence[str], batch_size: int, measured: Sequence[str] = ()) -> str:
    """What to say of a model whose samples a batch couples, run at ``batch_size``: ``nodes`` that the graph shows
    combining samples, or (``measured``, nodes empty) the outputs that changed when samples ran alone
    (:func:`quantlab.backends.coupling.measured_coupling`, described)."""
    if nodes:
        shown = ", ".join(map(repr, nodes[:3])) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
        why = (f"{label} combines values across the samples of a batch ({shown}: a reduction, softmax or top-k "
               "over the sample axis, or a product that pairs the samples, as CLIP's logits_per_image [N, M]), so "
               "each sample's outputs depend on the others in its batch")
    else:
        why = (f"{label} gives a sample other outputs in a batch than alone: run alone, the first samples of the "
               f"first batch changed {', '.join(measured)}; a reduction over the batch inside a Loop or If body, "
               "one the graph hides from shape inference, or an output that pairs the samples couples them")
    if batch_size == 1:
        return f"{why}: running one sample at a time, as the model runs on one input"
    return (f"WARNING {why}: at batch size {batch_size} the tables and figures are not what one sample at a time "
            "gives; use --batch-size 1 (or [data] batch_size = 1) unless the model is deployed at that batch")


def _check_batch(spec: TensorSpec, dataset: Any, model: LoadedModel, batch_size: int | None,
                 specs: Mapping[str, tuple[str, tuple[int, ...]]], where: str, batch_axis: int | None = 0) -> None:
    """A fixed model batch must be the batch the data arrives in (the last, shorter one aside)."""
    if batch_axis is None:
        return
    batch_dim = spec.shape[batch_axis] if spec.shape and batch_axis < len(spec.shape) else None
    n = len(dataset) if hasattr(dataset, "__len__") else None
    fixed = isinstance(batch_dim, int) and batch_dim > 0
    if fixed:
        batch_fits(specs, int(batch_dim), where,  # type: ignore[arg-type]
                    f"model {model.label} fixes its batch at {batch_dim}; re-export it with a dynamic batch axis")
    if fixed and n:
        _check_whole_batches(n, int(batch_dim), spec, model, where)  # type: ignore[arg-type]
    if batch_size is None:
        return
    effective = min(batch_size, n) if n else batch_size
    if fixed and effective != batch_dim:
        symbolic = [a for a, d in enumerate(spec.shape) if isinstance(d, str) and a != batch_axis]
        other = (f" If its batch is on axis {symbolic[0]} ({spec.shape[symbolic[0]]!r}), say so: [inputs] "
                 f"{spec.name} = {{ field = ..., batch_axis = {symbolic[0]} }} in a manifest, or "
                 f"from_arrays(..., batch_axes={{{spec.name!r}: {symbolic[0]}}})." if symbolic else "")
        raise InputMismatchError(
            f"input {spec.name!r}: model {model.label} has a fixed batch of {batch_dim} "
            f"({format_shape(spec.shape)}, batch on axis {batch_axis}); run with batch size {batch_dim}, not "
            f"{effective}, or re-export the model with a dynamic batch axis.{other}"
        )
    batch_fits(specs, effective, where, "lower the batch size (--batch-size / batch_size=)")


def _check_whole_batches(n: int, batch: int, spec: TensorSpec, model: LoadedModel, where: str) -> None:
    """A model that fixes its batch above 1 refuses a last, shorter batch: ``n`` samples must fill whole batches
    (Swin exported at batch 2 failed on the 11th of 11 samples, after the other batches had run)."""
    if batch <= 1 or n % batch == 0:
        return
    keep = n - n % batch
    fix = (f"use {keep} samples (count = {keep} in the manifest)" if keep else f"give at least {batch} samples")
    raise InputMismatchError(
        f"{where} holds {n} samples, not a multiple of the batch {batch} model {model.label} fixes (input "
        f"{spec.name!r} {format_shape(spec.shape)}): its last batch would hold {n % batch}, which the model "
        f"refuses; {fix}, or re-export the model with a dynamic batch axis.")


def _bind_fix(spec: Any, model: LoadedModel) -> str:
    """For a missing scalar or an input whose value decides an If / Loop (a sample rate): the --bind that
    supplies it once, for every sample."""
    from ..controlflow import deciding_inputs

    if spec.shape != () and spec.name not in deciding_inputs(model.proto, by_value=True):
        return ""
    return (f" If every sample has the same {spec.name!r} (a sample rate, a mode), bind it instead: --bind "
            f"{spec.name}=VALUE (an experiment's [model] bind = {{ {spec.name} = VALUE }}).")


def _check_names(specs: Mapping[str, Any], model: LoadedModel, where: str, manifest: bool) -> None:
    model_inputs = {s.name: s for s in model.inputs}
    for spec in model.inputs:
        if spec.name not in specs:
            given = ", ".join(map(repr, specs)) or "none"
            fix = (f"Map it in the manifest's [inputs], e.g. {spec.name} = \"<source field>\"." if manifest else
                   f"Name the array after the model's input: {{{spec.name!r}: array}}.") + _bind_fix(spec, model)
            raise InputMismatchError(
                f"model {model.label} expects input {spec.name!r} ({spec.dtype} {format_shape(spec.shape)}); "
                f"{where} gives inputs {given}. {fix}"
            )
    for name in specs:
        if name in getattr(model, "bound", ()):
            raise InputMismatchError(
                f"{where} gives input {name!r}, which is bound (--bind, or [model] bind in an experiment): the "
                f"bound value replaces it in {model.label}. Leave it out of the data set's [inputs] (one data set "
                "per bound value, e.g. per branch of an If it decides), or run without binding it."
            )
        if name not in model_inputs:
            fix = "Rename or remove it in the manifest's [inputs]." if manifest else "Rename or drop that array."
            raise InputMismatchError(
                f"{where} gives input {name!r}, which model {model.label} does not have (its inputs: "
                f"{', '.join(map(repr, model_inputs))}). {fix}"
            )


def _axis_words(axis: int | None) -> str:
    return "no batch axis" if axis is None else "first dim = batch" if axis == 0 else f"batch on axis {axis}"


def _check_batch_name(spec: TensorSpec, model: LoadedModel, where: str, origin: str) -> None:
    """Refuse stacking samples on axis 0 (the default) of an input whose only batch-named axis is another one.

    A sequence-first export (``[time, batch, 40]``: torch's ``batch_first=False``) otherwise passes every shape
    check, its batch symbol taking the sample's time steps, and fails deep inside ONNX Runtime with a Reshape
    error that names neither the input nor the fix.
    """
    assert spec.shape is not None
    named = [a for a, d in enumerate(spec.shape) if batch_named(d)]
    if len(named) != 1 or named[0] == 0:
        return
    axis = named[0]
    fix = (f"batch_axes={{{spec.name!r}: {axis}}} (from_arrays)" if origin == "memory" else
           f"[inputs] {spec.name} = {{ field = \"...\", batch_axis = {axis} }} in the manifest")
    raise InputMismatchError(
        f"input {spec.name!r}: model {model.label} declares {format_shape(spec.shape)}, its batch on axis {axis} "
        f"({spec.shape[axis]!r}), but {where} stacks samples on axis 0 ({spec.shape[0]!r} in the model), the "
        f"default. If axis {axis} counts the samples, set {fix}; if axis 0 does, re-export the model with another name "
        f"for axis {axis}.")


def _check_shape(spec: TensorSpec, dtype: str, sample_shape: tuple[int, ...], model: LoadedModel, where: str,
                 origin: tuple[str, bool], layout: str, symbols: dict[str, tuple[int, str]],
                 batch_axis: int | None = 0) -> None:
    """Rank and per-axis sizes of one input's samples against the model (symbols must agree across inputs)."""
    assert spec.shape is not None
    axes = [a for a in range(len(spec.shape)) if a != batch_axis]
    per_sample = [spec.shape[a] for a in axes]
    want = format_shape(per_sample)
    words = _axis_words(batch_axis)
    if batch_axis is not None and batch_axis >= len(spec.shape):
        raise InputMismatchError(
            f"input {spec.name!r}: model {model.label} expects rank {len(spec.shape)} {format_shape(spec.shape)}, "
            f"which has no axis {batch_axis} to stack samples on ({words}); {where} gives samples of shape "
            f"{format_shape(sample_shape)}. If every sample holds the same value (a step count, a sample rate), "
            f"write [inputs] {spec.name} = {{ field = \"...\", batch_axis = \"none\" }} in the manifest (or give "
            f"--bind {spec.name}=VALUE to every command: it becomes a constant of the model); else re-export the "
            "model with a batch axis on this input."
        )
    if len(per_sample) != len(sample_shape):
        raise InputMismatchError(
            f"input {spec.name!r}: model {model.label} expects rank {len(spec.shape)} "
            f"{format_shape(spec.shape)} ({words}), i.e. samples of shape {want}; {where} gives samples "
            f"of shape {format_shape(sample_shape)}. "
            f"{_rank_hint(origin[0], origin[1], want, sample_shape, spec.shape, spec.name)}."
        )
    for axis, dim, actual in zip(axes, per_sample, sample_shape):
        if isinstance(dim, int) and dim > 0 and dim != actual:
            raise InputMismatchError(
                f"input {spec.name!r}: model {model.label} expects shape {format_shape(spec.shape)} ({words}); "
                f"{where} gives samples {format_shape(sample_shape)}: axis {axis} is {actual}, the "
                f"model wants {dim}. {_shape_hint(origin[0], per_sample, sample_shape, layout, dtype)}."
            )
        if isinstance(dim, str):
            seen = symbols.setdefault(dim, (actual, spec.name))
            if seen[0] != actual:
                raise InputMismatchError(
                    f"input {spec.name!r}: dimension {dim!r} (axis {axis}) is {actual} in the data but "
                    f"{seen[0]} in input {seen[1]!r}; the model needs them equal. Fix the data."
                )


def check_inputs(dataset: Any, model: LoadedModel, *, batch_size: int | None = None) -> None:
    """Refuse data that does not fit ``model``'s inputs, before any work starts.

    Compares input names, dtypes and shapes: the model's first dimension is
    the batch axis (or the one the data set's ``batch_axes`` names; none for an
    input without one); its other dimensions must equal the data's per-sample
    shape, except symbolic ones, which are resolved from the data (the same
    symbol must get the same value everywhere). A fixed model batch size is
    checked against ``batch_size`` (or the whole set, when it is smaller), and
    a batch that cannot fit in free memory is refused. Raises
    InputMismatchError naming the input, what the model expects, what the data
    gives and what to change, for the kind of source the input comes from
    (images, a hook, npy/npz files, Hugging Face columns, in-memory arrays).
    """
    specs = _data_specs(dataset)
    where = dataset_label(dataset)
    manifest = getattr(dataset, "manifest", None)
    in_manifest = isinstance(manifest, DataSetManifest)
    layout = manifest.preprocess.layout if in_manifest else "NCHW"
    _check_names(specs, model, where, in_manifest)
    symbols: dict[str, tuple[int, str]] = {}
    for spec in model.inputs:
        dtype, sample_shape = specs[spec.name]
        if spec.dtype == "bfloat16":
            raise InputMismatchError(
                f"input {spec.name!r}: model {model.label} expects bfloat16, which numpy (and so quantlab's data) "
                f"has no type for; {where} gives {dtype}. Export the model with float32 inputs (a Cast to bfloat16 "
                "inside it, if it needs one).")
        if spec.dtype != "undefined" and dtype != spec.dtype:
            fix = (f"Set [preprocess] dtype = \"{spec.dtype}\" in the manifest (or dtype = {{ {spec.name} = "
                   f"\"{spec.dtype}\" }})." if in_manifest else f"Cast the array: array.astype(numpy.{spec.dtype}).")
            raise InputMismatchError(
                f"input {spec.name!r}: model {model.label} expects {spec.dtype}, {where} gives {dtype}. {fix}"
            )
        if spec.shape is None:
            continue
        axis = dataset.batch_axis(spec.name) if hasattr(dataset, "batch_axis") else 0
        if spec.name not in (getattr(dataset, "batch_axes", None) or {}):
            _check_batch_name(spec, model, where, _origin(dataset, spec.name)[0])
        _check_shape(spec, dtype, sample_shape, model, where, _origin(dataset, spec.name), layout, symbols, axis)
        _check_batch(spec, dataset, model, batch_size, specs, where, axis)
