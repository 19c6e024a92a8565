"""``[[source]]``: the kinds of sources, their keys, and which files/rows/views they yield.

    [[source]] table ──parse_source──> SourceSpec (root folder/file, files or patterns, batched, ...)
    SourceSpec ──list_files──> relative file names ──rows_in (batched)──> Item(source, file, row, view, key)

A new source kind adds its name to :data:`SOURCE_KINDS`, its keys to
:data:`KIND_KEYS`, and its listing/reading to :mod:`.reader`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..arrayfiles import npy_header, npz_members
from ..errors import DataError, ManifestError
from ..schema import Key, Where, check_table, is_str, one_of, str_list

__all__ = ["IMAGE_SUFFIXES", "KIND_KEYS", "SOURCE_KEYS", "SOURCE_KINDS", "Item", "SourceSpec", "file_path",
           "list_files", "parse_source", "rows_in"]

SOURCE_KINDS = ("images", "npy", "npz", "hf_disk", "hf_imagefolder")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
"""Files an ``images`` source picks up when it gives neither ``files`` nor ``pattern`` (case-insensitive)."""

SOURCE_KEYS: dict[str, Key] = {
    "kind": Key(f"one of {', '.join(map(repr, SOURCE_KINDS))}", one_of(SOURCE_KINDS), 'kind = "images"'),
    "path": Key("a path string (relative to the manifest, or inside `package`)", is_str, 'path = "photos"'),
    "package": Key("an installed top-level package name", lambda v: is_str(v) and bool(v), 'package = "skimage"'),
    "files": Key("a non-empty list of file names", str_list, 'files = ["a.jpg", "b.png"]'),
    "pattern": Key("a glob pattern or a list of them", lambda v: str_list(v, allow_str=True),
                   'pattern = "*.jpg"'),
    "batched": Key("true or false", lambda v: isinstance(v, bool), "batched = true"),
    "split": Key("a split name", lambda v: is_str(v) and bool(v), 'split = "train"'),
    "cache_dir": Key("a folder path string", lambda v: is_str(v) and bool(v), 'cache_dir = ".hf_cache"'),
    "optional": Key("true or false", lambda v: isinstance(v, bool), "optional = true"),
}

KIND_KEYS: dict[str, frozenset[str]] = {
    "images": frozenset({"kind", "path", "package", "files", "pattern", "optional"}),
    "npy": frozenset({"kind", "path", "package", "files", "pattern", "batched", "optional"}),
    "npz": frozenset({"kind", "path", "package", "files", "pattern", "batched", "optional"}),
    "hf_disk": frozenset({"kind", "path", "split", "optional"}),
    "hf_imagefolder": frozenset({"kind", "path", "split", "cache_dir", "optional"}),
}
"""The keys each kind takes (a key of another kind is refused by name)."""


@dataclass(frozen=True)
class SourceSpec:
    """One resolved ``[[source]]``: what kind, where on disk, which files.

    ``root`` is an existing folder (or a single ``.npy``/``.npz`` file);
    ``label`` prefixes sample keys and is machine-independent (``skimage:data``
    or the path as written in the manifest).
    """

    kind: str
    root: Path
    label: str
    files: tuple[str, ...] | None = None
    patterns: tuple[str, ...] = ()
    batched: bool = False
    split: str | None = None
    cache_dir: Path | None = None
    package: str | None = None
    package_version: str | None = None

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "location": self.label}
        if self.package:
            out["package"] = self.package
            out["package_version"] = self.package_version
        return out


@dataclass(frozen=True)
class Item:
    """Where one sample comes from: source, file (or row), row in a batched file, augmented view."""

    source: int
    ref: str | int
    row: int | None
    view: int | None
    key: str
    label: Any = None


def _package_folder(package: str, where: str) -> tuple[Path, str | None] | None:
    """The folder of an installed package, found without importing it (None: not installed)."""
    if "." in package or not package.isidentifier():
        raise ManifestError(f"{where}: give the top-level package name (e.g. 'skimage') and put the "
                            f"sub-folder in 'path' (e.g. path = \"data\"), not {package!r}.")
    spec = importlib.util.find_spec(package)  # top-level: locates it, imports nothing
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder, _package_version(package)


def _package_version(package: str) -> str | None:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(package)
    for dist in importlib.metadata.packages_distributions().get(package, []):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return None


def _check_kind_keys(table: dict[str, Any], where: Where, index: int | None) -> str:
    """The source's kind, after refusing keys that kind does not take."""
    check_table(table, SOURCE_KEYS, where, "source", index, error=ManifestError, guide="calib_sets/README.md")
    if "kind" not in table:
        raise ManifestError(f"{where.at('source', index)}: missing key 'kind'; one of "
                            f"{', '.join(SOURCE_KINDS)}, e.g. kind = \"images\".")
    kind = table["kind"]
    allowed = KIND_KEYS[kind]
    for key in table:
        if key not in allowed:
            raise ManifestError(f"{where.at('source', index, key)}: does not apply to kind = {kind!r} (it takes "
                                f"{', '.join(sorted(allowed))}). Remove it.")
    if "files" in table and "pattern" in table:
        raise ManifestError(f"{where.at('source', index, 'pattern')}: give either 'files' or 'pattern', not both.")
    return kind


def _root_and_label(table: dict[str, Any], where: Where, index: int | None,
                    folder: Path) -> tuple[Path, str, str | None] | None:
    """(root, key label, package version) of a source; None when an optional package is missing."""
    rel = table.get("path")
    package = table.get("package")
    if package is None:
        if rel is None:
            raise ManifestError(f"{where.at('source', index)}: missing key 'path' (relative to the manifest "
                                f"folder {folder}), e.g. path = \"photos\".")
        return folder / rel, rel, None
    found = _package_folder(package, where.at("source", index, "package"))
    if found is None:
        if table.get("optional", False):
            return None
        raise ManifestError(f"{where.at('source', index, 'package')}: package {package!r} is not installed. "
                            "Install it (see calib_sets/README.md), or mark the source optional = true.")
    base, version = found
    return ((base / rel) if rel else base), (f"{package}:{rel}" if rel else package), version


def _check_root(root: Path, table: dict[str, Any], kind: str, at: str, folder: Path) -> None:
    """An existing root that suits the kind (a folder for images/HF/file lists, a .npy/.npz file otherwise)."""
    if not root.exists():
        package = table.get("package")
        rel_note = (f" inside package {package!r}" if package
                    else f" (relative to the manifest folder {folder.resolve()})")
        raise ManifestError(f"{at}: {root} does not exist{rel_note}. Fix the path.")
    needs_dir = kind in ("images", "hf_disk", "hf_imagefolder") or "files" in table or "pattern" in table
    if needs_dir and not root.is_dir():
        raise ManifestError(f"{at}: {root} is a file; a {kind} source needs a folder here.")
    if kind in ("npy", "npz") and root.is_file() and root.suffix != f".{kind}":
        raise ManifestError(f"{at}: {root} is not a .{kind} file. Fix the path or the kind.")


def _checked_files(table: dict[str, Any], root: Path, at: str) -> tuple[str, ...] | None:
    if "files" not in table:
        return None
    files = tuple(table["files"])
    for name in files:
        target = (root / name).resolve()
        if root not in target.parents:
            raise ManifestError(f"{at}: {name!r} leaves the source folder {root}; list files inside it.")
        if not target.is_file():
            raise ManifestError(f"{at}: {name!r} does not exist in {root}. Fix the name or remove it from the list.")
    return files


def parse_source(table: dict[str, Any], where: Where, index: int | None, folder: Path) -> SourceSpec | None:
    """One ``[[source]]`` checked against the disk; None when it is optional and absent."""
    kind = _check_kind_keys(table, where, index)
    found = _root_and_label(table, where, index, folder)
    if found is None:
        return None
    root, label, version = found
    root = root.resolve()
    if not root.exists() and table.get("optional", False):
        return None
    _check_root(root, table, kind, where.at("source", index, "path"), folder)
    files = _checked_files(table, root, where.at("source", index, "files"))
    patterns = table.get("pattern", ())
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    cache_dir = (folder / table["cache_dir"]).resolve() if "cache_dir" in table else None
    return SourceSpec(kind=kind, root=root, label=label, files=files, patterns=patterns,
                      batched=table.get("batched", False), split=table.get("split"), cache_dir=cache_dir,
                      package=table.get("package"), package_version=version)


def list_files(source: SourceSpec) -> list[str]:
    """The source's files, relative to its root, sorted (its own name when the root is one file)."""
    if source.root.is_file():
        return [source.root.name]
    if source.files is not None:
        return list(source.files)
    found: set[Path] = set()
    if source.patterns:
        for pattern in source.patterns:
            found.update(p for p in source.root.glob(pattern) if p.is_file())
    else:
        suffixes = IMAGE_SUFFIXES if source.kind == "images" else (f".{source.kind}",)
        found.update(p for p in source.root.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    return sorted(p.relative_to(source.root).as_posix() for p in found)


def file_path(source: SourceSpec, ref: str) -> Path:
    return source.root if source.root.is_file() else source.root / ref


def rows_in(source: SourceSpec, path: Path) -> int:
    """Samples in a batched file: the shared leading dimension of its arrays."""
    if source.kind == "npy":
        shapes = {"array": npy_header(path)[0]}
    else:
        shapes = {k: v[0] for k, v in npz_members(path).items()}
    leading = {k: (s[0] if s else None) for k, s in shapes.items()}
    if not leading or any(v is None for v in leading.values()) or len(set(leading.values())) != 1:
        raise DataError(f"{path}: batched = true but its arrays do not share a leading sample axis "
                        f"({ {k: list(s) for k, s in shapes.items()} }). Fix the file or set batched = false "
                        "(one sample per file).")
    return int(next(iter(leading.values())))
