"""The data sets: :class:`ManifestDataSet` (a manifest's samples) and :class:`ArrayDataSet` (in-memory arrays).

    ManifestDataSet ─┬─ SourceReader  lists items per source, reads one item's raw fields  (.reader)
                     ├─ Labeler       label from the file name or a field                  (.labels)
                     ├─ FeedMaker     field -> input array: augment, image pipeline/hook   (.preprocess)
                     └─ here          seed order + count, [inputs] mapping, the run record

:func:`open_dataset` is the front door: a manifest path, a parsed manifest or
a data set (returned as is), optionally cut to its first ``count`` samples.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..environment import unreadable
from ..errors import DataError, ManifestError
from .batches import SAME_SHAPE_ADVICE, Batch, DataSet, Sample, take_samples
from .labels import Labeler
from .manifest import ROLES, DataSetManifest, load_manifest
from .padding import PadSpec, with_mask
from .preprocess import FeedMaker, resolve_hook
from .reader import SourceReader
from .sources import Item

__all__ = ["ArrayDataSet", "ManifestDataSet", "from_arrays", "load_dataset", "open_dataset"]


def _input_mapping(manifest: DataSetManifest, fields: list[set[str]]) -> dict[str, str]:
    """Model input name -> source field: ``[inputs]``, or every field all sources share (the label aside)."""
    label_column = manifest.labels.column if manifest.labels else None
    common = set.intersection(*fields)
    if manifest.inputs is None:
        names = sorted(common - {label_column})
        if not names:
            raise ManifestError(f"{manifest.path}: the sources share no field to use as an input "
                                f"(fields: {[sorted(f) for f in fields]}); add [inputs].")
        mapping = {n: n for n in names}
    else:
        for name, fieldname in manifest.inputs:
            if fieldname not in common:
                missing = [s.label for s, f in zip(manifest.sources, fields) if fieldname not in f]
                raise ManifestError(
                    f"{manifest.path}: [inputs] {name} = {fieldname!r}: source(s) {missing} have no field "
                    f"{fieldname!r} (they have {sorted(common) or [sorted(f) for f in fields]}). Images give "
                    "'image', npy files give 'array', npz files their array names, Hugging Face sets their columns."
                )
        mapping = dict(manifest.inputs)
    dtype = manifest.preprocess.dtype
    unknown = [k for k, _ in dtype if k not in mapping] if isinstance(dtype, tuple) else []
    if unknown:
        raise ManifestError(f"{manifest.path}: [preprocess] dtype names input {unknown[0]!r}, which "
                            f"the data set does not have (inputs: {list(mapping)}); fix the name.")
    return mapping


def _checked_padding(manifest: DataSetManifest, mapping: dict[str, str]) -> PadSpec | None:
    """``[pad]`` when its inputs are inputs of the set and its mask is not (ManifestError naming the file)."""
    spec = manifest.padding
    if spec is None:
        return None
    unknown = [n for n in spec.inputs if n not in mapping]
    if unknown:
        raise ManifestError(f"{manifest.path}: [pad] key 'inputs' names {unknown}, which the data set does not "
                            f"feed (its inputs: {list(mapping)}); list inputs it feeds, e.g. inputs = "
                            f"{json.dumps(list(mapping)[:1])}")
    if spec.mask in mapping:
        raise ManifestError(f"{manifest.path}: [pad] key 'mask' is {spec.mask!r}, which the data already feeds; "
                            "the mask is made by quantlab from the padding. Drop 'mask' (and pad the data's own "
                            f"mask by listing it in 'inputs'), or remove {spec.mask!r} from the data's inputs.")
    return spec


class ManifestDataSet(DataSet):
    """The samples a :class:`DataSetManifest` describes, in seed order, loaded one at a time."""

    def __init__(self, manifest: DataSetManifest) -> None:
        self.manifest = manifest
        self.role = manifest.role
        self.name = manifest.name
        hook = (resolve_hook(manifest.preprocess.hook, manifest.folder, f"{manifest.path}: [preprocess] hook")
                if manifest.preprocess.hook else None)
        self._has_hook = hook is not None
        labeler = Labeler(manifest.labels, manifest.path)
        self.label_dtype = labeler.dtype
        self._labeler = labeler
        views: list[int | None] = [None] if manifest.augment is None else list(range(manifest.augment.views))
        self._reader = SourceReader(manifest.path, manifest.sources, labeler, views)
        self._feeds = FeedMaker(manifest.preprocess, manifest.augment, manifest.seed, hook)
        items, fields = self._list_sources()
        self._items = self._in_seed_order(items)
        self._mapping = _input_mapping(manifest, fields)
        self.padding = _checked_padding(manifest, self._mapping)
        mask = (self.padding.mask,) if self.padding is not None and self.padding.mask else ()
        self.input_names = (*self._mapping, *mask)
        self.batch_axes = dict(manifest.batch_axes)
        self.sequence_carry = dict(manifest.sequence_carry)  # quantlab.sequence.SequenceData runs the carry
        self.sequence_streams = manifest.sequence_streams  # ... at this batch size, when given
        self.group_by_shape = manifest.group_by_shape

    # --- listing -------------------------------------------------------------------------

    def _list_sources(self) -> tuple[list[Item], list[set[str]]]:
        items: list[Item] = []
        fields: list[set[str]] = []
        self._per_source: list[int] = []
        for s_index, source in enumerate(self.manifest.sources):
            try:
                src_items, src_fields = self._reader.list_source(s_index)
            except PermissionError as exc:
                raise unreadable(exc, f"a data file of {self.manifest.path}", source.root) from None
            self._per_source.append(len(src_items))
            items.extend(src_items)
            fields.append(src_fields)
        return items, fields

    def _in_seed_order(self, items: list[Item]) -> list[Item]:
        """The items shuffled by the manifest's seed (unless shuffle = false), the first ``count`` kept."""
        manifest, available = self.manifest, len(items)
        if available == 0:
            raise DataError(f"{manifest.path}: the data set is empty: no source yielded a sample "
                            f"({self._source_summary()}). Check path, files and pattern.")
        order = list(range(available))
        if manifest.shuffle:
            order = np.random.default_rng(manifest.seed).permutation(available).tolist()
        if manifest.count is not None:
            if manifest.count > available:
                raise ManifestError(
                    f"{manifest.path}: count = {manifest.count} but the sources yield only {available} samples "
                    f"({self._source_summary()}). Lower count"
                    + (", or raise [augment] views." if self._has_images() else ".")
                )
            order = order[: manifest.count]
        return [items[i] for i in order]

    def _has_images(self) -> bool:
        """Whether some source yields images ([augment] applies to them only)."""
        return any(self._reader.yields_images(i) for i in range(len(self.manifest.sources)))

    def _source_summary(self) -> str:
        parts = []
        for source, n in zip(self.manifest.sources, self._per_source):
            what = f"files {list(source.files)}" if source.files else (
                f"pattern {list(source.patterns)}" if source.patterns else "default pattern")
            parts.append(f"{source.kind} {source.root} [{what}]: {n}")
        return "; ".join(parts)

    def input_origin(self, name: str) -> tuple[str, bool]:
        """(origin, batched) of an input's samples: ``image``, ``hook``, ``npy``, ``npz`` or ``hf_disk``."""
        fieldname = self._mapping.get(name, name)
        if any(self._reader.is_image_field(i, fieldname) for i in range(len(self.manifest.sources))):
            return ("hook" if self._has_hook else "image"), False
        kinds = [s for s in self.manifest.sources if s.kind in ("npy", "npz", "hf_disk", "hf_imagefolder")]
        kind = kinds[0].kind if kinds else "memory"
        return ("hf_disk" if kind == "hf_imagefolder" else kind), any(s.batched for s in kinds)

    def _stack_advice(self, name: str) -> str:
        origin = self.input_origin(name)[0]
        if origin == "image":
            return "set [preprocess] resize and center_crop so that every image gets one size"
        if origin == "hook":
            return "make the [preprocess] hook return one shape for every image"
        return (SAME_SHAPE_ADVICE + ', or set batching = "by_shape" in the manifest to batch equal shapes together'
                ", or pad them to one length with [pad] (see calib_sets/README.md)")


    # --- loading -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[str]:
        return [it.key for it in self._items]

    def _load(self, i: int) -> Sample:
        item = self._items[i]
        try:
            fields = self._reader.fields(item)
        except PermissionError as exc:
            raise unreadable(exc, f"the data of sample {item.key!r}", self.manifest.sources[item.source].root) from None
        label = self._labeler.from_fields(fields, item.key, item.label)
        feeds: dict[str, np.ndarray] = {}
        for name in self._mapping:
            fieldname = self._mapping[name]
            if fieldname not in fields:
                raise DataError(f"sample {item.key!r}: has no field {fieldname!r} for input {name!r} "
                                f"(it has {sorted(fields)}); fix [inputs] in {self.manifest.path}.")
            feeds[name] = self._feeds.array(fields[fieldname], item.key, item.view, name)
            if self.manifest.complete_feeds:
                feeds[name] = self._without_batch_axis(feeds[name], name, item.key)
        return Sample(index=i, key=item.key, feeds=with_mask(feeds, self.padding, item.key), label=label)

    def _without_batch_axis(self, array: np.ndarray, name: str, key: str) -> np.ndarray:
        """A complete feed's array (batch 1 on the input's batch axis) as one sample (``feeds = "complete"``)."""
        axis = self.batch_axis(name)
        if axis is None:
            return array
        if array.ndim <= axis or array.shape[axis] != 1:
            raise DataError(f"sample {key!r}: input {name!r} is {list(array.shape)}, but feeds = \"complete\" in "
                            f"{self.manifest.path} says each file is one whole feed with batch 1 on axis {axis}. "
                            "Give files of batch 1, or set the input's batch_axis in [inputs].")
        return np.squeeze(array, axis=axis)

    def _first(self, n: int) -> ManifestDataSet:
        """The same set with ``count = n``: the first n samples in seed order, sources not listed again."""
        out = copy.copy(self)
        out.manifest = dataclasses.replace(self.manifest, count=n)
        out._items = self._items[:n]
        return out

    def manifest_record(self) -> dict[str, Any]:
        """What a run records about its data: manifest path and hash, parsed settings, sources used."""
        m = self.manifest
        return {
            "path": str(m.path),
            "sha256": m.sha256,
            "name": m.name,
            "role": m.role,
            "count": len(self),
            "settings": m.raw,
            "sources": [dict(s.record(), available=n) for s, n in zip(m.sources, self._per_source)],
            "skipped_sources": list(m.skipped_sources),
            **({"padding": self.padding.record()} if self.padding is not None else {}),
        }

    def describe_source(self) -> str:
        return str(self.manifest.path)

    def __repr__(self) -> str:
        return f"ManifestDataSet({self.manifest.path}, role={self.role!r}, samples={len(self)})"


class ArrayDataSet(DataSet):
    """Samples from in-memory arrays batched on axis 0 (tests, notebooks, bench scripts).

    ``batch_axes`` names inputs batched on another axis (``{"state": 1}``) or on none
    (``{"sr": None}``: the array is every sample's value).
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], *, labels: Sequence[Any] | np.ndarray | None = None,
                 role: str = "calibration", name: str = "arrays",
                 batch_axes: Mapping[str, int | None] | None = None) -> None:
        if role not in ROLES:
            raise DataError(f"role must be one of {ROLES}, got {role!r}")
        if not arrays:
            raise DataError(f"{name}: no arrays given; a data set needs at least one input.")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.batch_axes = dict(batch_axes or {})
        unknown = sorted(set(self.batch_axes) - set(self.arrays))
        if unknown:
            raise DataError(f"{name}: batch_axes names {unknown}, which are not among the arrays {list(self.arrays)}.")
        self._n = self._sample_count(name)
        self.labels = None if labels is None else np.asarray(labels)
        if self.labels is not None and len(self.labels) != self._n:
            raise DataError(f"{name}: {len(self.labels)} labels for {self._n} samples.")
        self.label_dtype = None if self.labels is None else ("str" if self.labels.dtype.kind in "OUS"
                                                              else self.labels.dtype.name)
        self.role, self.name = role, name
        self.input_names = tuple(self.arrays)

    def _sample_count(self, name: str) -> int:
        sizes = {}
        for k, v in self.arrays.items():
            axis = self.batch_axis(k)
            if axis is not None:
                sizes[k] = v.shape[axis] if v.ndim > axis else None
        if not sizes or None in sizes.values() or len(set(sizes.values())) != 1:
            raise DataError(f"{name}: arrays must share a sample axis (axis 0, or the one batch_axes gives), got "
                            f"shapes { {k: v.shape for k, v in self.arrays.items()} } and batch axes "
                            f"{ {k: self.batch_axis(k) for k in self.arrays} }. Name inputs batched on another "
                            "axis, or on none, e.g. from_arrays(arrays, batch_axes={'state': 1, 'sr': None}).")
        n = int(next(iter(sizes.values())))
        if n == 0:
            raise DataError(f"{name}: the data set is empty (0 samples).")
        return n

    def __len__(self) -> int:
        return self._n

    def _take(self, name: str, index: int | slice) -> np.ndarray:
        return take_samples(self.arrays[name], self.batch_axis(name), index)

    def _load(self, i: int) -> Sample:
        label = None if self.labels is None else self.labels[i].item()
        return Sample(index=i, key=f"{self.name}[{i}]", feeds={k: self._take(k, i) for k in self.arrays}, label=label)

    def _iter_batches(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, self._n, batch_size):
            stop = min(start + batch_size, self._n)
            yield Batch(indices=tuple(range(start, stop)), keys=tuple(f"{self.name}[{i}]" for i in range(start, stop)),
                        feeds={k: self._take(k, slice(start, stop)) for k in self.arrays},
                        labels=None if self.labels is None else self.labels[start:stop], batch_axes=self.batch_axes)

    def _first(self, n: int) -> ArrayDataSet:
        return ArrayDataSet({k: self._take(k, slice(0, n)) for k in self.arrays},
                            labels=None if self.labels is None else self.labels[:n], role=self.role, name=self.name,
                            batch_axes=self.batch_axes)

    def manifest_record(self) -> dict[str, Any]:
        inputs = {k: [v.dtype.name, list(self._take(k, 0).shape)] for k, v in self.arrays.items()}
        settings: dict[str, Any] = {"source": "in-memory arrays", "inputs": inputs}
        if self.batch_axes:
            settings["batch_axes"] = {k: v for k, v in sorted(self.batch_axes.items())}
        return {"path": None, "sha256": None, "name": self.name, "role": self.role, "count": self._n,
                "settings": settings}


def from_arrays(arrays: Mapping[str, np.ndarray], *, labels: Sequence[Any] | np.ndarray | None = None,
                role: str = "calibration", name: str = "arrays",
                batch_axes: Mapping[str, int | None] | None = None) -> ArrayDataSet:
    """A data set over arrays batched on axis 0 (input name -> array), with optional labels.

    ``batch_axes``: inputs batched on another axis, or on none (``{"state": 1, "sr": None}``).
    """
    return ArrayDataSet(arrays, labels=labels, role=role, name=name, batch_axes=batch_axes)


def open_dataset(manifest_or_path: DataSetManifest | DataSet | str | Path, *, count: int | None = None) -> DataSet:
    """The data set a manifest (or its path) describes; a DataSet is returned as is.

    ``count``: keep only the first ``count`` samples (all when there are fewer),
    as :meth:`DataSet.head` does: the same samples, keys and order as the full set.
    """
    if isinstance(manifest_or_path, DataSet):
        dataset: DataSet = manifest_or_path
    else:
        manifest = (manifest_or_path if isinstance(manifest_or_path, DataSetManifest)
                    else load_manifest(manifest_or_path))
        dataset = ManifestDataSet(manifest)
    return dataset if count is None else dataset.head(count)


load_dataset = open_dataset
"""Alias of :func:`open_dataset`."""
