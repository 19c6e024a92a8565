"""Lists the samples of a manifest's sources and reads one sample's raw fields (decoded, not preprocessed).

    SourceSpec ──list_source──> [Item ...], fields {"image"} | {"array"} | npz members | HF columns
    Item ──fields──> {"image": PIL image} | {"array": ndarray} | {member: ndarray} | {column: value}

Batched ``.npy`` files are read through a memmap and batched ``.npz`` files
are kept while consecutive rows come from them, so a sweep over a set reads
each file once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..arrayfiles import load_npy, load_npz, npz_members
from ..errors import ManifestError
from .huggingface import HfColumns, hf_items
from .labels import Labeler
from .preprocess import decode_image
from .sources import Item, SourceSpec, file_path, list_files, rows_in

__all__ = ["SourceReader"]


class SourceReader:
    """The samples of one manifest's sources: ``list_source`` once per source, then ``fields`` per sample."""

    def __init__(self, manifest: Path, sources: tuple[SourceSpec, ...], labeler: Labeler,
                 views: list[int | None]) -> None:
        self.manifest, self.sources, self.labeler, self.views = manifest, sources, labeler, views
        self.hf: dict[int, HfColumns] = {}
        self._npz_cache: tuple[Path, dict[str, np.ndarray]] | None = None
        self._npy_cache: tuple[Path, np.ndarray] | None = None

    def list_source(self, s_index: int) -> tuple[list[Item], set[str]]:
        """The items of source ``s_index`` in listing order, and the fields each of its samples holds."""
        source = self.sources[s_index]
        if source.kind in ("hf_disk", "hf_imagefolder"):
            self.hf[s_index], items, fields = hf_items(s_index, source, self.manifest, self.labeler.column,
                                                       self.views)
            return items, fields
        items: list[Item] = []
        fields: set[str] = {"image"} if source.kind == "images" else {"array"} if source.kind == "npy" else set()
        for ref in list_files(source):
            path = file_path(source, ref)
            base_key = f"{source.label}/{ref}" if not source.root.is_file() else source.label
            label = self.labeler.from_name(ref, base_key)
            if source.kind == "npz" and not fields:
                fields = self._npz_fields(path)
            rows: list[int | None] = list(range(rows_in(source, path))) if source.batched else [None]
            for row in rows:
                key = base_key if row is None else f"{base_key}[{row}]"
                for view in self.views:
                    vkey = key if view is None else f"{key}#view{view}"
                    items.append(Item(s_index, ref, row, view, vkey, label))
        return items, fields

    def _npz_fields(self, path: Path) -> set[str]:
        fields = set(npz_members(path))
        column = self.labeler.column
        if column and column not in fields:
            raise ManifestError(f"{self.manifest}: [labels] column {column!r} is not an array "
                                f"in {path} (it holds {sorted(fields)}); fix the column name.")
        return fields

    def is_image_field(self, s_index: int, fieldname: str) -> bool:
        """Whether ``fieldname`` of source ``s_index`` holds images (those go through the image pipeline)."""
        source = self.sources[s_index]
        if source.kind == "images":
            return fieldname == "image"
        return source.kind in ("hf_disk", "hf_imagefolder") and fieldname in self.hf[s_index].image_cols

    def yields_images(self, s_index: int) -> bool:
        source = self.sources[s_index]
        return source.kind in ("images", "hf_imagefolder") or (source.kind == "hf_disk"
                                                               and bool(self.hf[s_index].image_cols))

    def fields(self, item: Item) -> dict[str, Any]:
        """The raw fields of one sample: a decoded image, an array, an npz file's members or HF columns."""
        source = self.sources[item.source]
        if source.kind == "images":
            return {"image": decode_image(file_path(source, str(item.ref)))}
        if source.kind == "npy":
            path = file_path(source, str(item.ref))
            if item.row is None:
                return {"array": load_npy(path, mmap=False)}
            if self._npy_cache is None or self._npy_cache[0] != path:
                self._npy_cache = (path, load_npy(path, mmap=True))  # a memmap: rows are read when used
            return {"array": np.array(self._npy_cache[1][item.row])}
        if source.kind == "npz":
            path = file_path(source, str(item.ref))
            if item.row is None:
                return load_npz(path)
            if self._npz_cache is None or self._npz_cache[0] != path:
                self._npz_cache = (path, load_npz(path))
            return {k: v[item.row] for k, v in self._npz_cache[1].items()}
        return self.hf[item.source].row(int(item.ref))
