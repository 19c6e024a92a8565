"""Hugging Face ``datasets`` sources, from local folders only: ``hf_disk`` and ``hf_imagefolder``.

    folder ──load_from_disk / load_dataset("imagefolder")──> Dataset ──split──> image columns | array columns

``datasets`` takes seconds to import, so it is imported inside :func:`hf_quiet`,
only when a manifest has a Hugging Face source.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError, ManifestError
from .sources import Item, SourceSpec

__all__ = ["HfColumns", "hf_items", "hf_quiet", "open_hf"]


@contextlib.contextmanager
def hf_quiet() -> Iterator[Any]:
    """Import ``datasets`` with its progress bars off (only the CLI shows progress), restoring them after."""
    import datasets  # slow to import (seconds): only when a manifest has a Hugging Face source

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _load(datasets: Any, source: SourceSpec, where: str) -> Any:
    try:
        if source.kind == "hf_disk":
            return datasets.load_from_disk(str(source.root))
        kwargs = {"cache_dir": str(source.cache_dir)} if source.cache_dir else {}
        return datasets.load_dataset("imagefolder", data_dir=str(source.root), split=source.split or "train",
                                     **kwargs)
    except PermissionError:
        raise
    except Exception as exc:  # noqa: BLE001
        what = ("a folder written by Dataset.save_to_disk" if source.kind == "hf_disk"
                else "an image folder (class sub-folders or metadata.csv)")
        raise DataError(f"{where}: cannot load {source.root} as {what} ({type(exc).__name__}: {exc}).") from None


def open_hf(source: SourceSpec, manifest: Path) -> Any:
    """The ``datasets.Dataset`` of a source, its split chosen (ManifestError when the split is ambiguous)."""
    where = f"{manifest}: source {source.label!r}"
    with hf_quiet() as datasets:
        ds = _load(datasets, source, where)
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if source.split is None and len(splits) == 1:
            ds = ds[splits[0]]
        elif source.split in ds:
            ds = ds[source.split]
        else:
            raise ManifestError(f"{where}: holds splits {splits}; choose one with split = \"{splits[0]}\".")
    elif source.split is not None and source.kind == "hf_disk":
        raise ManifestError(f"{where}: is a single Dataset, not a DatasetDict; remove split = "
                            f"{source.split!r}.")
    return ds


@dataclass(frozen=True)
class HfColumns:
    """A Hugging Face set split into image columns (decoded by Pillow) and array columns (as numpy)."""

    images: Any
    arrays: Any
    image_cols: list[str]
    array_cols: list[str]

    @classmethod
    def of(cls, ds: Any) -> HfColumns:
        image_cols = [c for c, f in ds.features.items() if type(f).__name__ == "Image"]
        array_cols = [c for c in ds.features if c not in image_cols]
        return cls(ds.select_columns(image_cols) if image_cols else None,
                   ds.select_columns(array_cols).with_format("numpy") if array_cols else None,
                   image_cols, array_cols)

    def row(self, row: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.images is not None:
            out.update(self.images[row])
        if self.arrays is not None:
            out.update(self.arrays[row])
        return out


def hf_items(s_index: int, source: SourceSpec, manifest: Path, label_column: str | None,
             views: list[int | None]) -> tuple[HfColumns, list[Item], set[str]]:
    """A Hugging Face source's columns, its items (one per row and view) and its fields (column names)."""
    ds = open_hf(source, manifest)
    features = ds.features
    columns = HfColumns.of(ds)
    if label_column and label_column not in features:
        raise ManifestError(f"{manifest}: [labels] column {label_column!r} is not a column of "
                            f"{source.root} (columns: {list(features)}); fix the column name.")
    items = [Item(s_index, row, None, view, f"{source.label}[{row}]" + ("" if view is None else f"#view{view}"))
             for row in range(len(ds)) for view in views]
    return columns, items, set(features)
