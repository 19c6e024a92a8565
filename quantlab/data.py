"""Calibration and validation data sets, described by small TOML manifests.

A manifest (``calib_sets/NAME.toml``, format in ``calib_sets/README.md``) names
where samples come from and how they become model input feeds::

    [[source]] files ──list──> items (file, row, view) ──seed──> order ──count──> samples
                                  │
    sample(i): decode ──> augment (images) ──> preprocess ──> [inputs] mapping ──> feeds
    batches(n): sample(i) ... sample(i+n-1) stacked on axis 0, loaded lazily

Nothing is loaded until a sample is asked for, so a data set of any size
streams in bounded memory. Same manifest + seed give the same samples in the
same order, bit for bit. Images are decoded with Pillow; ``.npy``/``.npz`` with
``allow_pickle=False``; Hugging Face ``datasets`` only from local folders.

:class:`DataFingerprint` reduces the batches a run actually consumed to a
:class:`DataSummary` (count, content hash, per-input value ranges, duplicates,
per-sample hashes for calibration/validation overlap checks), refusing NaN/Inf
samples by name. :func:`check_inputs` compares a data set with a model's inputs
before any work starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import importlib.metadata
import importlib.util
import math
import re
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .arrayfiles import load_npy, load_npz, npy_header, npz_members
from .environment import available_memory_bytes, format_bytes, shape_bytes, unreadable
from .errors import DataError, InputMismatchError, ManifestError
from .fingerprint import ArrayHasher, sha256_bytes
from .graph import LoadedModel, TensorSpec

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "ROLES",
    "SOURCE_KINDS",
    "ArrayDataSet",
    "AugmentSpec",
    "Batch",
    "DataFingerprint",
    "DataSet",
    "DataSetManifest",
    "DataSummary",
    "InputStats",
    "LabelSpec",
    "ManifestDataSet",
    "PreprocessSpec",
    "Sample",
    "SourceSpec",
    "check_inputs",
    "from_arrays",
    "load_dataset",
    "load_manifest",
    "open_dataset",
    "overlap",
    "preprocess_image",
    "random_resized_crop_box",
    "summarize",
]

ROLES = ("calibration", "validation")
SOURCE_KINDS = ("images", "npy", "npz", "hf_disk", "hf_imagefolder")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
"""Files an ``images`` source picks up when it gives neither ``files`` nor ``pattern`` (case-insensitive)."""
LAYOUTS = ("NCHW", "NHWC")
CHANNEL_ORDERS = ("RGB", "BGR", "L")
DTYPES = ("float32", "float16", "float64", "uint8", "int8", "int32", "int64")
LABEL_DTYPES = ("int64", "float32", "str")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box")

# ─────────────────────────────── manifest schema ───────────────────────────────


@dataclass(frozen=True)
class _Key:
    """One manifest key: what it must hold, said for a human, and an example to copy."""

    expect: str
    check: Callable[[Any], bool]
    example: str


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _one_of(options: Sequence[str]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and v in options


def _int_or_pair(v: Any) -> bool:
    if _is_int(v):
        return v >= 1
    return isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= 1 for x in v)


def _num_or_list(v: Any) -> bool:
    if _is_num(v):
        return True
    return isinstance(v, list) and len(v) in (1, 3) and all(_is_num(x) for x in v)


def _str_list(v: Any, *, allow_str: bool = False) -> bool:
    if allow_str and isinstance(v, str):
        return bool(v)
    return isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) and x for x in v)


def _dtype_value(v: Any) -> bool:
    if isinstance(v, str):
        return v in DTYPES
    return isinstance(v, dict) and len(v) > 0 and all(isinstance(x, str) and x in DTYPES for x in v.values())


_TOP_KEYS: dict[str, _Key] = {
    "name": _Key("a string", _is_str, 'name = "my_calib"'),
    "description": _Key("a string", _is_str, 'description = "what this set is"'),
    "role": _Key(f"one of {', '.join(map(repr, ROLES))}", _one_of(ROLES), 'role = "calibration"'),
    "count": _Key("an integer >= 1", lambda v: _is_int(v) and v >= 1, "count = 128"),
    "seed": _Key("an integer >= 0", lambda v: _is_int(v) and v >= 0, "seed = 0"),
    "shuffle": _Key("true or false", lambda v: isinstance(v, bool), "shuffle = true"),
    "source": _Key("a [source] table or [[source]] tables", lambda v: isinstance(v, (dict, list)),
                   '[[source]]\nkind = "images"\npath = "photos"'),
    "inputs": _Key("a table of input name = source field", lambda v: isinstance(v, dict),
                   '[inputs]\ninput = "image"'),
    "preprocess": _Key("a table", lambda v: isinstance(v, dict), "[preprocess]\nresize = 256"),
    "augment": _Key("a table", lambda v: isinstance(v, dict), "[augment]\nviews = 8"),
    "labels": _Key("a table", lambda v: isinstance(v, dict), '[labels]\nregex = "_(\\\\d+)\\\\.jpg$"'),
}

_SOURCE_KEYS: dict[str, _Key] = {
    "kind": _Key(f"one of {', '.join(map(repr, SOURCE_KINDS))}", _one_of(SOURCE_KINDS), 'kind = "images"'),
    "path": _Key("a path string (relative to the manifest, or inside `package`)", _is_str, 'path = "photos"'),
    "package": _Key("an installed top-level package name", lambda v: _is_str(v) and bool(v), 'package = "skimage"'),
    "files": _Key("a non-empty list of file names", _str_list, 'files = ["a.jpg", "b.png"]'),
    "pattern": _Key("a glob pattern or a list of them", lambda v: _str_list(v, allow_str=True),
                    'pattern = "*.jpg"'),
    "batched": _Key("true or false", lambda v: isinstance(v, bool), "batched = true"),
    "split": _Key("a split name", lambda v: _is_str(v) and bool(v), 'split = "train"'),
    "cache_dir": _Key("a folder path string", lambda v: _is_str(v) and bool(v), 'cache_dir = ".hf_cache"'),
    "optional": _Key("true or false", lambda v: isinstance(v, bool), "optional = true"),
}

_PREPROCESS_KEYS: dict[str, _Key] = {
    "resize": _Key("an integer (shorter side, pixels) or [height, width]", _int_or_pair, "resize = 256"),
    "center_crop": _Key("an integer or [height, width]", _int_or_pair, "center_crop = 224"),
    "mean": _Key("a number or a list of 1 or 3 numbers (0..255 pixel units)", _num_or_list,
                 "mean = [127.0, 127.0, 127.0]"),
    "std": _Key("a non-zero number or a list of 1 or 3 of them (0..255 pixel units)",
                lambda v: _num_or_list(v) and all(x != 0 for x in (v if isinstance(v, list) else [v])),
                "std = [128.0, 128.0, 128.0]"),
    "layout": _Key(f"one of {', '.join(map(repr, LAYOUTS))}", _one_of(LAYOUTS), 'layout = "NCHW"'),
    "dtype": _Key(f"one of {', '.join(map(repr, DTYPES))}, or a table input = dtype", _dtype_value,
                  'dtype = "float32"'),
    "channel_order": _Key(f"one of {', '.join(map(repr, CHANNEL_ORDERS))}", _one_of(CHANNEL_ORDERS),
                          'channel_order = "RGB"'),
    "interpolation": _Key(f"one of {', '.join(map(repr, INTERPOLATIONS))}", _one_of(INTERPOLATIONS),
                          'interpolation = "bilinear"'),
    "hook": _Key('"module:function"', lambda v: _is_str(v) and re.fullmatch(r"[\w.]+:\w+", v) is not None,
                 'hook = "my_preprocessing:prepare"'),
}

_AUGMENT_KEYS: dict[str, _Key] = {
    "views": _Key("an integer >= 1", lambda v: _is_int(v) and v >= 1, "views = 8"),
    "min_scale": _Key("a number in (0, 1]", lambda v: _is_num(v) and 0 < v <= 1, "min_scale = 0.35"),
    "max_scale": _Key("a number in (0, 1]", lambda v: _is_num(v) and 0 < v <= 1, "max_scale = 1.0"),
    "ratio": _Key("[low, high] aspect ratios, 0 < low <= high",
                  lambda v: isinstance(v, list) and len(v) == 2 and all(_is_num(x) and x > 0 for x in v)
                  and v[0] <= v[1], "ratio = [0.75, 1.3333]"),
    "hflip": _Key("a probability in [0, 1]", lambda v: _is_num(v) and 0 <= v <= 1, "hflip = 0.5"),
    "include_original": _Key("true or false", lambda v: isinstance(v, bool), "include_original = true"),
}

_LABEL_KEYS: dict[str, _Key] = {
    "regex": _Key("a regular expression with one group (or a group named 'label')", _is_str,
                  "regex = '_(\\d+)\\.jpg$'"),
    "column": _Key("a source field / column name", lambda v: _is_str(v) and bool(v), 'column = "label"'),
    "dtype": _Key(f"one of {', '.join(map(repr, LABEL_DTYPES))}", _one_of(LABEL_DTYPES), 'dtype = "int64"'),
}

_IMAGE_PREPROCESS_KEYS = ("resize", "center_crop", "mean", "std", "layout", "channel_order", "interpolation", "hook")


class _Where:
    """Turns (section, index, key) into 'file: line N: [section] key' for error messages.

    ``tomllib`` keeps no line numbers, so the raw text is scanned for the key
    under its table header; when it cannot be found the line is left out.
    """

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?\s*(#.*)?$")

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def line(self, section: str, index: int | None, key: str | None) -> int | None:
        current, counts, header_line = "", {}, None
        target_header: int | None = None
        key_re = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=") if key else None
        for no, raw in enumerate(self.lines, start=1):
            m = self._HEADER.match(raw)
            if m:
                name = m.group(2).strip().strip("\"'")
                counts[name] = counts.get(name, -1) + 1
                current, header_line = name, no
                if name == section and (index is None or counts[name] == index):
                    target_header = no
                continue
            in_target = current == section and (section == "" or header_line == target_header)
            if in_target and key_re is not None and key_re.match(raw):
                return no
        return target_header if section else None

    def at(self, section: str, index: int | None = None, key: str | None = None) -> str:
        line = self.line(section, index, key)
        where = f"{self.path}"
        if line is not None:
            where += f": line {line}"
        table = ""
        if section:
            table = f"[[{section}]] #{index + 1}" if index is not None else f"[{section}]"
        if key and table:
            return f"{where}: {table} key {key!r}"
        if key:
            return f"{where}: key {key!r}"
        return f"{where}: {table}" if table else where


def _check_table(table: Mapping[str, Any], schema: Mapping[str, _Key], where: _Where, section: str,
                 index: int | None = None) -> None:
    """Refuse unknown keys and values of the wrong type, naming the key and its line."""
    for key, value in table.items():
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ManifestError(
                f"{where.at(section, index, key)}: unknown key.{hint} Known keys here: "
                f"{', '.join(sorted(schema))}. Remove or rename it (see calib_sets/README.md)."
            )
        spec = schema[key]
        if not spec.check(value):
            raise ManifestError(
                f"{where.at(section, index, key)}: must be {spec.expect}, got {_show(value)}. "
                f"Write it like: {spec.example}"
            )


def _show(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind.get(type(value), type(value).__name__)} {text}"


# ─────────────────────────────── manifest model ───────────────────────────────


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
class PreprocessSpec:
    """How an image becomes an array (see :func:`preprocess_image`), and dtype casts for array fields.

    ``resize``: shorter side in pixels (int) or exact (height, width).
    ``center_crop``: (height, width). ``mean``/``std``: per output channel, in
    0..255 pixel units, listed in ``channel_order``. ``dtype``: one dtype for
    every input, or per input name.
    """

    resize: int | tuple[int, int] | None = None
    center_crop: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    dtype: str | tuple[tuple[str, str], ...] | None = None
    channel_order: str = "RGB"
    interpolation: str = "bilinear"
    hook: str | None = None

    @property
    def channels(self) -> int:
        return 1 if self.channel_order == "L" else 3

    def dtype_for(self, input_name: str | None) -> str | None:
        """The dtype an input is cast to (None: keep the source's dtype; images default to float32)."""
        if isinstance(self.dtype, tuple):
            return dict(self.dtype).get(input_name or "")
        return self.dtype


@dataclass(frozen=True)
class AugmentSpec:
    """Extra views of each image: random resized crop (torchvision's algorithm) + horizontal flip.

    ``views`` counts every sample made from one image, the unaugmented one
    included when ``include_original``. Crops draw a fraction of the image area
    in [min_scale, max_scale] and an aspect ratio log-uniform in ``ratio``; the
    crop then goes through the normal preprocessing (resize, center crop).
    Randomness comes from (seed, sample key, view), so a view does not change
    when other files are added.
    """

    views: int = 1
    min_scale: float = 0.35
    max_scale: float = 1.0
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    include_original: bool = True


@dataclass(frozen=True)
class LabelSpec:
    """Where a sample's label comes from: a regex on the file's relative path, or a field/column."""

    regex: str | None = None
    column: str | None = None
    dtype: str = "int64"


@dataclass(frozen=True)
class DataSetManifest:
    """A parsed, checked manifest. ``raw`` is the TOML as parsed, for the run record."""

    path: Path
    sha256: str
    raw: dict[str, Any] = field(repr=False, compare=False, hash=False)
    name: str
    role: str
    count: int | None
    seed: int
    shuffle: bool
    sources: tuple[SourceSpec, ...]
    skipped_sources: tuple[str, ...]
    inputs: tuple[tuple[str, str], ...] | None
    preprocess: PreprocessSpec
    augment: AugmentSpec | None
    labels: LabelSpec | None

    @property
    def folder(self) -> Path:
        return self.path.parent


def _read_toml(path: Path) -> tuple[dict[str, Any], str, str]:
    try:
        if not path.exists():
            raise ManifestError(f"{path}: no such manifest file. Give the path of a data-set TOML "
                                "(e.g. calib_sets/demo_calib.toml).")
        if path.is_dir():
            raise ManifestError(f"{path}: is a folder; give the path of a data-set TOML file.")
        data = path.read_bytes()
    except PermissionError as exc:
        raise unreadable(exc, "manifest", path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text; a manifest is a TOML file.") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path}: not valid TOML: {exc}. Fix the syntax at that line.") from None
    return raw, text, sha256_bytes(data)


def load_manifest(path: str | Path) -> DataSetManifest:
    """Parse and check a data-set manifest; every path it names must exist.

    Raises ManifestError naming the file, the line and key at fault and what
    to write instead: unknown keys, wrong types, missing files or folders,
    packages that are not installed, hooks that cannot be imported.
    """
    path = Path(path)
    raw, text, digest = _read_toml(path)
    try:
        return _manifest_from(path, raw, text, digest)
    except PermissionError as exc:
        raise unreadable(exc, f"a path manifest {path} names", path) from None


def _manifest_from(path: Path, raw: dict[str, Any], text: str, digest: str) -> DataSetManifest:
    where = _Where(path, text)
    _check_table(raw, _TOP_KEYS, where, "")
    if "source" not in raw:
        raise ManifestError(f"{where.at('')}: no [[source]] table; say where the samples come from, e.g.\n"
                            + _TOP_KEYS["source"].example)
    source_tables = raw["source"] if isinstance(raw["source"], list) else [raw["source"]]
    if not source_tables:
        raise ManifestError(f"{where.at('')}: 'source' is an empty list; add a [[source]] table.")
    sources: list[SourceSpec] = []
    skipped: list[str] = []
    for i, table in enumerate(source_tables):
        index = i if isinstance(raw["source"], list) else None
        if not isinstance(table, dict):
            raise ManifestError(f"{where.at('source', index)}: each source must be a table, got {_show(table)}.")
        spec = _parse_source(table, where, index, path.parent)
        if spec is None:
            skipped.append(str(table.get("package", table.get("path"))))
        else:
            sources.append(spec)
    if not sources:
        raise DataError(f"{path}: every source is optional and none is installed ({', '.join(skipped)}); "
                        "the data set would be empty. Install one of them or add a source.")
    inputs = _parse_inputs(raw.get("inputs"), where)
    preprocess = _parse_preprocess(raw.get("preprocess", {}), where, path.parent, sources)
    augment = _parse_augment(raw.get("augment"), where, sources)
    labels = _parse_labels(raw.get("labels"), where, sources)
    return DataSetManifest(
        path=path,
        sha256=digest,
        raw=raw,
        name=raw.get("name", path.stem),
        role=raw.get("role", "calibration"),
        count=raw.get("count"),
        seed=raw.get("seed", 0),
        shuffle=raw.get("shuffle", True),
        sources=tuple(sources),
        skipped_sources=tuple(skipped),
        inputs=inputs,
        preprocess=preprocess,
        augment=augment,
        labels=labels,
    )


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


def _parse_source(table: dict[str, Any], where: _Where, index: int | None, folder: Path) -> SourceSpec | None:
    _check_table(table, _SOURCE_KEYS, where, "source", index)
    if "kind" not in table:
        raise ManifestError(f"{where.at('source', index)}: missing key 'kind'; one of "
                            f"{', '.join(SOURCE_KINDS)}, e.g. kind = \"images\".")
    kind = table["kind"]
    at = lambda key: where.at("source", index, key)
    allowed = {
        "images": {"kind", "path", "package", "files", "pattern", "optional"},
        "npy": {"kind", "path", "package", "files", "pattern", "batched", "optional"},
        "npz": {"kind", "path", "package", "files", "pattern", "batched", "optional"},
        "hf_disk": {"kind", "path", "split", "optional"},
        "hf_imagefolder": {"kind", "path", "split", "cache_dir", "optional"},
    }[kind]
    for key in table:
        if key not in allowed:
            raise ManifestError(f"{at(key)}: does not apply to kind = {kind!r} (it takes "
                                f"{', '.join(sorted(allowed))}). Remove it.")
    if "files" in table and "pattern" in table:
        raise ManifestError(f"{at('pattern')}: give either 'files' or 'pattern', not both.")
    rel = table.get("path")
    package = table.get("package")
    version = None
    if package is not None:
        found = _package_folder(package, at("package"))
        if found is None:
            if table.get("optional", False):
                return None
            raise ManifestError(f"{at('package')}: package {package!r} is not installed. Install it "
                                "(see calib_sets/README.md), or mark the source optional = true.")
        base, version = found
        root = (base / rel) if rel else base
        label = f"{package}:{rel}" if rel else package
    else:
        if rel is None:
            raise ManifestError(f"{where.at('source', index)}: missing key 'path' (relative to the manifest "
                                f"folder {folder}), e.g. path = \"photos\".")
        root = folder / rel
        label = rel
    root = root.resolve()
    if not root.exists():
        if table.get("optional", False):
            return None
        rel_note = (f" inside package {package!r}" if package
                    else f" (relative to the manifest folder {folder.resolve()})")
        raise ManifestError(f"{at('path')}: {root} does not exist{rel_note}. Fix the path.")
    needs_dir = kind in ("images", "hf_disk", "hf_imagefolder") or "files" in table or "pattern" in table
    if needs_dir and not root.is_dir():
        raise ManifestError(f"{at('path')}: {root} is a file; a {kind} source needs a folder here.")
    if kind in ("npy", "npz") and root.is_file() and root.suffix != f".{kind}":
        raise ManifestError(f"{at('path')}: {root} is not a .{kind} file. Fix the path or the kind.")
    files = tuple(table["files"]) if "files" in table else None
    if files is not None:
        for name in files:
            target = (root / name).resolve()
            if root not in target.parents:
                raise ManifestError(f"{at('files')}: {name!r} leaves the source folder {root}; "
                                    "list files inside it.")
            if not target.is_file():
                raise ManifestError(f"{at('files')}: {name!r} does not exist in {root}. Fix the name "
                                    "or remove it from the list.")
    patterns = table.get("pattern", ())
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    cache_dir = (folder / table["cache_dir"]).resolve() if "cache_dir" in table else None
    return SourceSpec(kind=kind, root=root, label=label, files=files, patterns=patterns,
                      batched=table.get("batched", False), split=table.get("split"), cache_dir=cache_dir,
                      package=package, package_version=version)


def _parse_inputs(table: dict[str, Any] | None, where: _Where) -> tuple[tuple[str, str], ...] | None:
    if table is None:
        return None
    if not table:
        raise ManifestError(f"{where.at('inputs')}: empty; map each model input to a source field, "
                            'e.g. input = "image", or remove [inputs] to use the field names as input names.')
    for name, fieldname in table.items():
        if not isinstance(fieldname, str) or not fieldname:
            raise ManifestError(f"{where.at('inputs', None, name)}: must be the name of a source field "
                                f'(a string), got {_show(fieldname)}. E.g. {name} = "image"')
    return tuple(table.items())


def _parse_preprocess(table: dict[str, Any], where: _Where, folder: Path,
                      sources: Sequence[SourceSpec]) -> PreprocessSpec:
    _check_table(table, _PREPROCESS_KEYS, where, "preprocess")
    image_keys = [k for k in table if k in _IMAGE_PREPROCESS_KEYS]
    if image_keys and all(s.kind in ("npy", "npz") for s in sources):
        raise ManifestError(f"{where.at('preprocess', None, image_keys[0])}: applies to images, and every "
                            "source holds arrays (npy/npz). Remove it; only 'dtype' applies to arrays.")
    if "hook" in table:
        clash = [k for k in table if k in _IMAGE_PREPROCESS_KEYS and k != "hook"]
        if clash:
            raise ManifestError(f"{where.at('preprocess', None, clash[0])}: the hook replaces the built-in image "
                                f"pipeline; remove {', '.join(clash)} (or the hook).")
        _resolve_hook(table["hook"], folder, where.at("preprocess", None, "hook"))
    channel_order = table.get("channel_order", "RGB")
    channels = 1 if channel_order == "L" else 3
    stats: dict[str, tuple[float, ...]] = {}
    for key, default in (("mean", 0.0), ("std", 1.0)):
        value = table.get(key, default)
        values = tuple(float(x) for x in (value if isinstance(value, list) else [value]))
        if len(values) not in (1, channels):
            raise ManifestError(f"{where.at('preprocess', None, key)}: has {len(values)} values but "
                                f"channel_order = {channel_order!r} gives {channels} channel(s); give 1 or "
                                f"{channels} values.")
        stats[key] = values
    resize = table.get("resize")
    crop = table.get("center_crop")
    dtype = table.get("dtype")
    return PreprocessSpec(
        resize=tuple(resize) if isinstance(resize, list) else resize,
        center_crop=(tuple(crop) if isinstance(crop, list) else (crop, crop)) if crop is not None else None,
        mean=stats["mean"],
        std=stats["std"],
        layout=table.get("layout", "NCHW"),
        dtype=tuple(sorted(dtype.items())) if isinstance(dtype, dict) else dtype,
        channel_order=channel_order,
        interpolation=table.get("interpolation", "bilinear"),
        hook=table.get("hook"),
    )


def _parse_augment(table: dict[str, Any] | None, where: _Where, sources: Sequence[SourceSpec]) -> AugmentSpec | None:
    if table is None:
        return None
    _check_table(table, _AUGMENT_KEYS, where, "augment")
    if all(s.kind in ("npy", "npz") for s in sources):
        raise ManifestError(f"{where.at('augment')}: augmentation applies to images, and every source holds "
                            "arrays (npy/npz). Remove [augment].")
    spec = AugmentSpec(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in table.items()})
    if spec.min_scale > spec.max_scale:
        raise ManifestError(f"{where.at('augment', None, 'min_scale')}: {spec.min_scale} is above max_scale "
                            f"{spec.max_scale}; make min_scale <= max_scale.")
    return spec


def _parse_labels(table: dict[str, Any] | None, where: _Where, sources: Sequence[SourceSpec]) -> LabelSpec | None:
    if table is None:
        return None
    _check_table(table, _LABEL_KEYS, where, "labels")
    if ("regex" in table) == ("column" in table):
        raise ManifestError(f"{where.at('labels')}: give exactly one of 'regex' (on the file name) or "
                            "'column' (a source field), e.g. regex = '_(\\d+)\\.jpg$'.")
    if "regex" in table:
        try:
            compiled = re.compile(table["regex"])
        except re.error as exc:
            raise ManifestError(f"{where.at('labels', None, 'regex')}: not a valid regular expression "
                                f"({exc}).") from None
        if compiled.groups == 0:
            raise ManifestError(f"{where.at('labels', None, 'regex')}: has no group; put the label in "
                                "parentheses, e.g. '_(\\d+)\\.jpg$'.")
        if any(s.kind in ("hf_disk", "hf_imagefolder") for s in sources):
            raise ManifestError(f"{where.at('labels', None, 'regex')}: Hugging Face sources have no file "
                                "names to match; use column = \"label\".")
    if "column" in table and any(s.kind in ("images", "npy") for s in sources):
        raise ManifestError(f"{where.at('labels', None, 'column')}: images/npy sources have no columns; "
                            "use regex = '...' on the file name.")
    return LabelSpec(regex=table.get("regex"), column=table.get("column"), dtype=table.get("dtype", "int64"))


def _resolve_hook(spec: str, folder: Path, where: str) -> Callable[[Any], Any]:
    """Import ``module:function``: ``module.py`` beside the manifest, or an importable module."""
    from .hooks import load_hook

    module_name = spec.rpartition(":")[0]
    return load_hook(spec, folder, ManifestError, where,
                     f"Put {module_name}.py next to the manifest or make it importable.")


# ─────────────────────────────── samples and batches ───────────────────────────────


@dataclass(frozen=True)
class Sample:
    """One sample: feeds by input name (no batch axis) and its label (None without [labels])."""

    index: int
    key: str
    feeds: dict[str, np.ndarray]
    label: object | None = None


@dataclass(frozen=True)
class Batch:
    """Consecutive samples stacked on axis 0; ``labels`` is None when the set has no labels."""

    indices: tuple[int, ...]
    keys: tuple[str, ...]
    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.indices)


def _stack_samples(samples: Sequence[Sample], names: Sequence[str], label_dtype: str | None,
                   advice: Callable[[str], str]) -> Batch:
    first = samples[0]
    feeds: dict[str, np.ndarray] = {}
    for name in names:
        ref = first.feeds[name]
        for s in samples[1:]:
            arr = s.feeds[name]
            if arr.shape != ref.shape or arr.dtype != ref.dtype:
                raise DataError(
                    f"input {name!r}: sample {s.key!r} is {arr.dtype} {arr.shape} but sample {first.key!r} is "
                    f"{ref.dtype} {ref.shape}; samples of a batch must match: {advice(name)}."
                )
        feeds[name] = np.stack([s.feeds[name] for s in samples])
    labels = None
    if label_dtype is not None:
        values = [s.label for s in samples]
        labels = np.array(values, dtype=object if label_dtype == "str" else label_dtype)
        if label_dtype == "str":
            labels = labels.astype(str)
    return Batch(indices=tuple(s.index for s in samples), keys=tuple(s.key for s in samples), feeds=feeds,
                 labels=labels)


class DataSet:
    """Ordered samples that load lazily; subclasses implement ``_load(i)``.

    ``batches(n)`` returns a fresh iterator each call, in the same order every
    time, holding at most one batch in memory.
    """

    role: str = "calibration"
    name: str = "data"
    input_names: tuple[str, ...] = ()
    label_dtype: str | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def count(self) -> int:
        return len(self)

    @property
    def has_labels(self) -> bool:
        return self.label_dtype is not None

    def _load(self, i: int) -> Sample:
        raise NotImplementedError

    def sample(self, i: int) -> Sample:
        n = len(self)
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"sample index must be an int, got {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range: {self.name} holds {n} samples")
        return self._load(int(i) % n)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        if not _is_int(batch_size) or batch_size < 1:
            raise DataError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        return self._iter_batches(batch_size)

    def _stack_advice(self, name: str) -> str:
        return "make every sample the same shape (or use batch size 1)"

    def _iter_batches(self, batch_size: int) -> Iterator[Batch]:
        n = len(self)
        if n:
            specs = {k: (v.dtype, tuple(int(d) for d in v.shape or ())) for k, v in self.input_specs().items()}
            _batch_fits(specs, min(batch_size, n), f"data set {self.describe_source()}",
                        "lower the batch size (--batch-size / batch_size=)")
        for start in range(0, n, batch_size):
            samples = [self._load(i) for i in range(start, min(start + batch_size, n))]
            yield _stack_samples(samples, self.input_names, self.label_dtype, self._stack_advice)

    def input_specs(self) -> dict[str, TensorSpec]:
        """dtype and per-sample shape (no batch axis) of each input, from the first sample."""
        cached = getattr(self, "_specs", None)
        if cached is None:
            first = self.sample(0)
            cached = {n: TensorSpec(n, first.feeds[n].dtype.name, tuple(first.feeds[n].shape))
                      for n in self.input_names}
            self._specs = cached
        return dict(cached)

    def manifest_record(self) -> dict[str, Any]:
        raise NotImplementedError

    def describe_source(self) -> str:
        return self.name


# ─────────────────────────────── images ───────────────────────────────


def _pil() -> Any:
    from PIL import Image

    return Image


def _decode_image(path: Path) -> Any:
    """Open and fully decode an image with Pillow (DataError naming the file when it cannot)."""
    Image = _pil()
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy() if im.mode != "P" else im.convert("RGBA")
    except PermissionError:
        raise
    except Exception as exc:  # noqa: BLE001 - UnidentifiedImageError, truncated data, decompression bombs...
        raise DataError(f"{path}: unreadable image ({type(exc).__name__}: {exc}). Replace or remove the file "
                        "(or narrow the source's pattern).") from None


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float],
                            ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop: torchvision's RandomResizedCrop.get_params.

    Area fraction uniform in ``scale``, aspect ratio (w/h) log-uniform in
    ``ratio``; 10 tries, then a center crop at the clamped ratio.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def _view_rng(seed: int, key: str, view: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(key.encode("utf-8")), view]))


def _augment_image(image: Any, spec: AugmentSpec, rng: np.random.Generator) -> Any:
    box = random_resized_crop_box(image.width, image.height, rng, (spec.min_scale, spec.max_scale), spec.ratio)
    out = image.crop(box)
    if rng.uniform() < spec.hflip:
        out = out.transpose(_pil().Transpose.FLIP_LEFT_RIGHT)
    return out


def _resized_size(width: int, height: int, resize: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) after resizing: the shorter side to ``resize`` (torchvision's rule), or exact (h, w)."""
    if isinstance(resize, tuple):
        return resize[1], resize[0]
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def preprocess_image(image: Any, spec: PreprocessSpec, *, name: str = "image", dtype: str | None = None) -> np.ndarray:
    """A Pillow image -> one sample array, the classic ImageNet way.

    1. convert to RGB (or L for ``channel_order = "L"``; alpha is dropped),
    2. resize: shorter side to ``resize`` keeping the aspect ratio, the longer
       side ``int(resize * long / short)`` as torchvision does (or exactly
       (h, w)), with Pillow's ``interpolation`` (antialiased when shrinking),
    3. center crop (h, w): top = round((H - h) / 2), left = round((W - w) / 2),
    4. float32 pixels 0..255, channels reversed for BGR,
    5. (x - mean) / std per channel (mean/std in pixel units, in output channel order),
    6. HWC -> CHW for NCHW, then cast to ``dtype`` (integer dtypes: rounded, clipped).
    """
    Image = _pil()
    mode = "L" if spec.channel_order == "L" else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    if spec.resize is not None:
        size = _resized_size(image.width, image.height, spec.resize)
        if size != image.size:
            resample = getattr(Image.Resampling, spec.interpolation.upper())
            image = image.resize(size, resample)
    if spec.center_crop is not None:
        ch, cw = spec.center_crop
        if ch > image.height or cw > image.width:
            raise DataError(f"{name}: is {image.height}x{image.width} (h x w) after resize, smaller than "
                            f"center_crop {ch}x{cw}; raise [preprocess] resize to at least {max(ch, cw)}.")
        top = round((image.height - ch) / 2.0)
        left = round((image.width - cw) / 2.0)
        image = image.crop((left, top, left + cw, top + ch))
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if spec.channel_order == "BGR":
        arr = arr[:, :, ::-1]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    if not (np.all(mean == 0) and np.all(std == 1)):
        arr = (arr - mean) / std
    if spec.layout == "NCHW":
        arr = arr.transpose(2, 0, 1)
    return _cast(np.ascontiguousarray(arr), dtype or spec.dtype_for(None) or "float32")


def _cast(arr: np.ndarray, dtype: str | None) -> np.ndarray:
    if dtype is None or arr.dtype == np.dtype(dtype):
        return arr
    target = np.dtype(dtype)
    if np.issubdtype(target, np.integer) and not np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(target)
        arr = np.clip(np.rint(arr), info.min, info.max)
    return arr.astype(target)


# ─────────────────────────────── manifest data set ───────────────────────────────


@dataclass(frozen=True)
class _Item:
    """Where one sample comes from: source, file (or row), row in a batched file, augmented view."""

    source: int
    ref: str | int
    row: int | None
    view: int | None
    key: str
    label: Any = None


@contextlib.contextmanager
def _hf_quiet() -> Iterator[Any]:
    """Import ``datasets`` with its progress bars off (only the CLI shows progress), restoring them after."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


class ManifestDataSet(DataSet):
    """The samples a :class:`DataSetManifest` describes, in seed order, loaded one at a time."""

    def __init__(self, manifest: DataSetManifest) -> None:
        self.manifest = manifest
        self.role = manifest.role
        self.name = manifest.name
        self._hook = (_resolve_hook(manifest.preprocess.hook, manifest.folder, f"{manifest.path}: [preprocess] hook")
                      if manifest.preprocess.hook else None)
        self._hf: dict[int, tuple[Any, Any, list[str], list[str]]] = {}
        self._npz_cache: tuple[Path, dict[str, np.ndarray]] | None = None
        self._npy_cache: tuple[Path, np.ndarray] | None = None
        self._regex = re.compile(manifest.labels.regex) if manifest.labels and manifest.labels.regex else None
        self.label_dtype = manifest.labels.dtype if manifest.labels else None
        fields: list[set[str]] = []
        items: list[_Item] = []
        per_source: list[int] = []
        for s_index, source in enumerate(manifest.sources):
            try:
                src_items, src_fields = self._list_source(s_index, source)
            except PermissionError as exc:
                raise unreadable(exc, f"a data file of {manifest.path}", source.root) from None
            per_source.append(len(src_items))
            items.extend(src_items)
            fields.append(src_fields)
        self._per_source = per_source
        available = len(items)
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
        self._items = [items[i] for i in order]
        self._fields = set.intersection(*fields) if fields else set()
        self.input_names = self._resolve_inputs(fields)

    # --- listing -------------------------------------------------------------------------

    def _has_images(self) -> bool:
        """Whether some source yields images ([augment] applies to them only)."""
        return any(s.kind in ("images", "hf_imagefolder") or (s.kind == "hf_disk" and self._hf[i][2])
                   for i, s in enumerate(self.manifest.sources))

    def input_origin(self, name: str) -> tuple[str, bool]:
        """(origin, batched) of an input's samples: ``image``, ``hook``, ``npy``, ``npz`` or ``hf_disk``."""
        fieldname = self._mapping.get(name, name)
        for i, source in enumerate(self.manifest.sources):
            is_image = ((source.kind == "images" and fieldname == "image") or
                        (source.kind in ("hf_disk", "hf_imagefolder") and fieldname in self._hf[i][2]))
            if is_image:
                return ("hook" if self._hook is not None else "image"), False
        kinds = [s for s in self.manifest.sources if s.kind in ("npy", "npz", "hf_disk", "hf_imagefolder")]
        kind = kinds[0].kind if kinds else "memory"
        return ("hf_disk" if kind == "hf_imagefolder" else kind), any(s.batched for s in kinds)

    def _stack_advice(self, name: str) -> str:
        origin = self.input_origin(name)[0]
        if origin == "image":
            return "set [preprocess] resize and center_crop so that every image gets one size"
        if origin == "hook":
            return "make the [preprocess] hook return one shape for every image"
        return "make every sample the same shape (or use batch size 1)"

    def _source_summary(self) -> str:
        parts = []
        for source, n in zip(self.manifest.sources, getattr(self, "_per_source", [0] * len(self.manifest.sources))):
            what = f"files {list(source.files)}" if source.files else (
                f"pattern {list(source.patterns)}" if source.patterns else "default pattern")
            parts.append(f"{source.kind} {source.root} [{what}]: {n}")
        return "; ".join(parts)

    def _list_files(self, source: SourceSpec) -> list[str]:
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

    def _file_path(self, source: SourceSpec, ref: str) -> Path:
        return source.root if source.root.is_file() else source.root / ref

    def _views(self) -> list[int | None]:
        aug = self.manifest.augment
        return [None] if aug is None else list(range(aug.views))

    def _label_from_name(self, ref: str, where: str) -> Any:
        if self._regex is None:
            return None
        m = self._regex.search(ref)
        if m is None:
            raise DataError(f"{where}: file {ref!r} does not match [labels] regex {self._regex.pattern!r} "
                            f"in {self.manifest.path}; fix the regex or the file name.")
        text = m.group("label") if "label" in self._regex.groupindex else m.group(1)
        return self._convert_label(text, where)

    def _convert_label(self, value: Any, where: str) -> Any:
        dtype = self.label_dtype
        try:
            if isinstance(value, np.ndarray):
                value = value.item() if value.size == 1 else value
            if dtype == "int64":
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(f"{value} is not an integer")
                return int(value)
            if dtype == "float32":
                return float(value)
            return str(value)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: label {value!r} is not a {dtype} ({exc}); set [labels] dtype in "
                            f"{self.manifest.path}.") from None

    def _list_source(self, s_index: int, source: SourceSpec) -> tuple[list[_Item], set[str]]:
        if source.kind in ("hf_disk", "hf_imagefolder"):
            return self._list_hf(s_index, source)
        files = self._list_files(source)
        items: list[_Item] = []
        fields: set[str] = {"image"} if source.kind == "images" else {"array"} if source.kind == "npy" else set()
        label_column = self.manifest.labels.column if self.manifest.labels else None
        for ref in files:
            path = self._file_path(source, ref)
            base_key = f"{source.label}/{ref}" if not source.root.is_file() else source.label
            label = self._label_from_name(ref, base_key)
            rows: list[int | None] = [None]
            if source.kind == "npz" and not fields:
                fields = set(npz_members(path))
                if label_column and label_column not in fields:
                    raise ManifestError(f"{self.manifest.path}: [labels] column {label_column!r} is not an array "
                                        f"in {path} (it holds {sorted(fields)}); fix the column name.")
            if source.batched:
                rows = list(range(self._rows_in(source, path)))
            for row in rows:
                key = base_key if row is None else f"{base_key}[{row}]"
                for view in self._views():
                    vkey = key if view is None else f"{key}#view{view}"
                    items.append(_Item(s_index, ref, row, view, vkey, label))
        return items, fields

    def _rows_in(self, source: SourceSpec, path: Path) -> int:
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

    def _list_hf(self, s_index: int, source: SourceSpec) -> tuple[list[_Item], set[str]]:
        ds = self._open_hf(source)
        features = ds.features
        image_cols = [c for c, f in features.items() if type(f).__name__ == "Image"]
        array_cols = [c for c in features if c not in image_cols]
        self._hf[s_index] = (ds.select_columns(image_cols) if image_cols else None,
                             ds.select_columns(array_cols).with_format("numpy") if array_cols else None,
                             image_cols, array_cols)
        label_column = self.manifest.labels.column if self.manifest.labels else None
        if label_column and label_column not in features:
            raise ManifestError(f"{self.manifest.path}: [labels] column {label_column!r} is not a column of "
                                f"{source.root} (columns: {list(features)}); fix the column name.")
        items = [_Item(s_index, row, None, view, f"{source.label}[{row}]" + ("" if view is None else f"#view{view}"))
                 for row in range(len(ds)) for view in self._views()]
        return items, set(features)

    def _open_hf(self, source: SourceSpec) -> Any:
        where = f"{self.manifest.path}: source {source.label!r}"
        with _hf_quiet() as datasets:
            try:
                if source.kind == "hf_disk":
                    ds = datasets.load_from_disk(str(source.root))
                else:
                    kwargs = {"cache_dir": str(source.cache_dir)} if source.cache_dir else {}
                    ds = datasets.load_dataset("imagefolder", data_dir=str(source.root),
                                               split=source.split or "train", **kwargs)
            except PermissionError:
                raise
            except Exception as exc:  # noqa: BLE001
                what = ("a folder written by Dataset.save_to_disk" if source.kind == "hf_disk"
                        else "an image folder (class sub-folders or metadata.csv)")
                raise DataError(f"{where}: cannot load {source.root} as {what} "
                                f"({type(exc).__name__}: {exc}).") from None
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

    def _resolve_inputs(self, fields: list[set[str]]) -> tuple[str, ...]:
        names = self._input_names(fields)
        dtype = self.manifest.preprocess.dtype
        if isinstance(dtype, tuple):
            unknown = [k for k, _ in dtype if k not in names]
            if unknown:
                raise ManifestError(f"{self.manifest.path}: [preprocess] dtype names input {unknown[0]!r}, which "
                                    f"the data set does not have (inputs: {list(names)}); fix the name.")
        return names

    def _input_names(self, fields: list[set[str]]) -> tuple[str, ...]:
        label_column = self.manifest.labels.column if self.manifest.labels else None
        common = set.intersection(*fields)
        if self.manifest.inputs is None:
            names = sorted(common - {label_column})
            if not names:
                raise ManifestError(f"{self.manifest.path}: the sources share no field to use as an input "
                                    f"(fields: {[sorted(f) for f in fields]}); add [inputs].")
            self._mapping = {n: n for n in names}
            return tuple(names)
        for name, fieldname in self.manifest.inputs:
            if fieldname not in common:
                missing = [s.label for s, f in zip(self.manifest.sources, fields) if fieldname not in f]
                raise ManifestError(
                    f"{self.manifest.path}: [inputs] {name} = {fieldname!r}: source(s) {missing} have no field "
                    f"{fieldname!r} (they have {sorted(common) or [sorted(f) for f in fields]}). Images give "
                    "'image', npy files give 'array', npz files their array names, Hugging Face sets their columns."
                )
        self._mapping = dict(self.manifest.inputs)
        return tuple(n for n, _ in self.manifest.inputs)

    # --- loading -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[str]:
        return [it.key for it in self._items]

    def _fields_of(self, item: _Item) -> dict[str, Any]:
        source = self.manifest.sources[item.source]
        if source.kind == "images":
            return {"image": _decode_image(self._file_path(source, str(item.ref)))}
        if source.kind == "npy":
            path = self._file_path(source, str(item.ref))
            if item.row is None:
                return {"array": load_npy(path, mmap=False)}
            if self._npy_cache is None or self._npy_cache[0] != path:
                self._npy_cache = (path, load_npy(path, mmap=True))  # a memmap: rows are read when used
            return {"array": np.array(self._npy_cache[1][item.row])}
        if source.kind == "npz":
            path = self._file_path(source, str(item.ref))
            if item.row is None:
                return load_npz(path)
            if self._npz_cache is None or self._npz_cache[0] != path:
                self._npz_cache = (path, load_npz(path))
            return {k: v[item.row] for k, v in self._npz_cache[1].items()}
        images, arrays, _, _ = self._hf[item.source]
        out: dict[str, Any] = {}
        row = int(item.ref)
        if images is not None:
            out.update(images[row])
        if arrays is not None:
            out.update(arrays[row])
        return out

    def _load(self, i: int) -> Sample:
        item = self._items[i]
        try:
            fields = self._fields_of(item)
        except PermissionError as exc:
            raise unreadable(exc, f"the data of sample {item.key!r}", self.manifest.sources[item.source].root) from None
        label = item.label
        spec = self.manifest.labels
        if spec is not None and spec.column is not None:
            if spec.column not in fields:
                raise DataError(f"sample {item.key!r}: has no label field {spec.column!r}.")
            label = self._convert_label(fields[spec.column], f"sample {item.key!r}")
        feeds: dict[str, np.ndarray] = {}
        for name in self.input_names:
            fieldname = self._mapping[name]
            if fieldname not in fields:
                raise DataError(f"sample {item.key!r}: has no field {fieldname!r} for input {name!r} "
                                f"(it has {sorted(fields)}); fix [inputs] in {self.manifest.path}.")
            feeds[name] = self._to_array(fields[fieldname], item, name)
        return Sample(index=i, key=item.key, feeds=feeds, label=label)

    def _to_array(self, value: Any, item: _Item, input_name: str) -> np.ndarray:
        dtype = self.manifest.preprocess.dtype_for(input_name)
        if hasattr(value, "getbands"):  # a Pillow image (images source, or an HF Image column)
            image = value
            aug = self.manifest.augment
            if aug is not None and item.view is not None and not (aug.include_original and item.view == 0):
                image = _augment_image(image, aug, _view_rng(self.manifest.seed, item.key, item.view))
            if self._hook is not None:
                return self._apply_hook(image, item, input_name, dtype)
            return preprocess_image(image, self.manifest.preprocess, name=f"sample {item.key!r}", dtype=dtype)
        try:
            arr = np.asarray(value)
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"sample {item.key!r}: input {input_name!r} is not an array ({exc}).") from None
        if arr.dtype.kind not in "biuf":
            raise DataError(f"sample {item.key!r}: input {input_name!r} holds {arr.dtype} values, not numbers; "
                            "map a numeric field in [inputs].")
        return np.ascontiguousarray(_cast(arr, dtype))

    def _apply_hook(self, image: Any, item: _Item, input_name: str, dtype: str | None) -> np.ndarray:
        hook = self.manifest.preprocess.hook
        try:
            out = self._hook(image)  # type: ignore[misc]
        except Exception as exc:
            raise DataError(f"sample {item.key!r}: [preprocess] hook {hook} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(out, np.ndarray) or out.dtype.kind not in "biuf":
            raise DataError(f"sample {item.key!r}: [preprocess] hook {hook} returned {type(out).__name__}"
                            f"{'' if not isinstance(out, np.ndarray) else ' of ' + str(out.dtype)}; it must "
                            "return a numeric numpy array (one sample, no batch axis).")
        return np.ascontiguousarray(_cast(out, dtype))

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
        }

    def describe_source(self) -> str:
        return str(self.manifest.path)

    def __repr__(self) -> str:
        return f"ManifestDataSet({self.manifest.path}, role={self.role!r}, samples={len(self)})"


# ─────────────────────────────── in-memory arrays ───────────────────────────────


class ArrayDataSet(DataSet):
    """Samples from in-memory arrays batched on axis 0 (tests, notebooks, bench scripts)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], *, labels: Sequence[Any] | np.ndarray | None = None,
                 role: str = "calibration", name: str = "arrays") -> None:
        if role not in ROLES:
            raise DataError(f"role must be one of {ROLES}, got {role!r}")
        if not arrays:
            raise DataError(f"{name}: no arrays given; a data set needs at least one input.")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        sizes = {k: (v.shape[0] if v.ndim else None) for k, v in self.arrays.items()}
        if None in sizes.values() or len(set(sizes.values())) != 1:
            raise DataError(f"{name}: arrays must share a leading sample axis, got shapes "
                            f"{ {k: v.shape for k, v in self.arrays.items()} }.")
        self._n = int(next(iter(sizes.values())))
        if self._n == 0:
            raise DataError(f"{name}: the data set is empty (0 samples).")
        self.labels = None if labels is None else np.asarray(labels)
        if self.labels is not None and len(self.labels) != self._n:
            raise DataError(f"{name}: {len(self.labels)} labels for {self._n} samples.")
        self.label_dtype = None if self.labels is None else ("str" if self.labels.dtype.kind in "OUS"
                                                              else self.labels.dtype.name)
        self.role, self.name = role, name
        self.input_names = tuple(self.arrays)

    def __len__(self) -> int:
        return self._n

    def _load(self, i: int) -> Sample:
        label = None if self.labels is None else self.labels[i].item()
        return Sample(index=i, key=f"{self.name}[{i}]", feeds={k: v[i] for k, v in self.arrays.items()}, label=label)

    def _iter_batches(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, self._n, batch_size):
            stop = min(start + batch_size, self._n)
            yield Batch(indices=tuple(range(start, stop)), keys=tuple(f"{self.name}[{i}]" for i in range(start, stop)),
                        feeds={k: np.ascontiguousarray(v[start:stop]) for k, v in self.arrays.items()},
                        labels=None if self.labels is None else self.labels[start:stop])

    def manifest_record(self) -> dict[str, Any]:
        return {"path": None, "sha256": None, "name": self.name, "role": self.role, "count": self._n,
                "settings": {"source": "in-memory arrays",
                             "inputs": {k: [v.dtype.name, list(v.shape[1:])] for k, v in self.arrays.items()}}}


def from_arrays(arrays: Mapping[str, np.ndarray], *, labels: Sequence[Any] | np.ndarray | None = None,
                role: str = "calibration", name: str = "arrays") -> ArrayDataSet:
    """A data set over arrays batched on axis 0 (input name -> array), with optional labels."""
    return ArrayDataSet(arrays, labels=labels, role=role, name=name)


def open_dataset(manifest_or_path: DataSetManifest | DataSet | str | Path) -> DataSet:
    """The data set a manifest (or its path) describes; a DataSet is returned as is."""
    if isinstance(manifest_or_path, DataSet):
        return manifest_or_path
    manifest = (manifest_or_path if isinstance(manifest_or_path, DataSetManifest)
                else load_manifest(manifest_or_path))
    return ManifestDataSet(manifest)


load_dataset = open_dataset
"""Alias of :func:`open_dataset`."""


# ─────────────────────────────── checks against a model ───────────────────────────────


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


def _dataset_label(dataset: Any) -> str:
    manifest = getattr(dataset, "manifest", None)
    if isinstance(manifest, DataSetManifest):
        return f"data set {manifest.path}"
    return f"data set {getattr(dataset, 'name', type(dataset).__name__)!r}"


def _fmt_shape(shape: Sequence[Any] | None) -> str:
    if shape is None:
        return "[?]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


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
    return (f"No image pipeline makes {_fmt_shape(expected)} (more pixels than Pillow decodes); check the model's "
            "input shape")


def _shape_hint(origin: str, expected: Sequence[Any], got: Sequence[int], layout: str, dtype: str) -> str:
    """How to make samples of shape ``got`` into ``expected`` (no batch axis), for where they come from."""
    want = _fmt_shape(expected)
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


def _rank_hint(origin: str, batched: bool, want: str, got: Sequence[int], model_rank: int) -> str:
    if origin == "image":
        return ("An image becomes a rank-3 sample ([C, H, W] or [H, W, C]) and this input is not an image batch: map "
                f"another field in [inputs], or use a [preprocess] hook that returns shape {want}")
    if origin == "hook":
        return f"Make the [preprocess] hook return arrays of shape {want} (one sample, no batch axis)"
    if origin == "memory":
        return f"Give arrays of shape [N, {want[1:]}, the first axis counting samples"
    if origin in ("npy", "npz") and not batched and len(got) == model_rank:
        return (f"Each file holds a leading axis of {got[0]}, like a batch: set batched = true in its [[source]] to "
                "take one sample per row")
    if origin in ("npy", "npz") and batched and len(got) == model_rank - 2:
        return ("batched = true takes one sample per row of a file, and these rows lack an axis: if each file is one "
                "sample, set batched = false")
    return f"Re-save the arrays with per-sample shape {want}"


def _batch_fits(specs: Mapping[str, tuple[str, tuple[int, ...]]], batch: int, where: str, advice: str) -> None:
    """InputMismatchError when one batch (held twice while stacked) cannot fit in free memory."""
    available = available_memory_bytes()
    if available is None:
        return
    sizes = {n: shape_bytes((batch, *shape), np.dtype(dtype).itemsize) for n, (dtype, shape) in specs.items()
             if dtype not in ("undefined", "bfloat16")}
    if 2 * sum(sizes.values()) > available:
        name = max(sizes, key=lambda n: sizes[n])
        dtype, shape = specs[name]
        raise InputMismatchError(
            f"{where}: input {name!r}: a batch of {batch} samples of {dtype} {_fmt_shape(shape)} is "
            f"{format_bytes(sizes[name])} ({sizes[name]} bytes), and a batch is held twice while it is stacked; this "
            f"machine has {format_bytes(available)} available. Refusing before loading it: {advice}."
        )


def _check_batch(spec: TensorSpec, dataset: Any, model: LoadedModel, batch_size: int | None,
                 specs: Mapping[str, tuple[str, tuple[int, ...]]], where: str) -> None:
    """A fixed model batch must be the batch the data arrives in (the last, shorter one aside)."""
    batch_dim = spec.shape[0] if spec.shape else None
    n = len(dataset) if hasattr(dataset, "__len__") else None
    fixed = isinstance(batch_dim, int) and batch_dim > 0
    if fixed:
        _batch_fits(specs, int(batch_dim), where,  # type: ignore[arg-type]
                    f"model {model.label} fixes its batch at {batch_dim}; re-export it with a dynamic batch axis")
    if batch_size is None:
        return
    effective = min(batch_size, n) if n else batch_size
    if fixed and effective != batch_dim:
        raise InputMismatchError(
            f"input {spec.name!r}: model {model.label} has a fixed batch of {batch_dim} "
            f"({_fmt_shape(spec.shape)}); run with batch size {batch_dim}, not {effective}, or re-export "
            "the model with a dynamic batch axis."
        )
    _batch_fits(specs, effective, where, "lower the batch size (--batch-size / batch_size=)")


def _check_names(specs: Mapping[str, Any], model: LoadedModel, where: str, manifest: bool) -> None:
    model_inputs = {s.name: s for s in model.inputs}
    for spec in model.inputs:
        if spec.name not in specs:
            given = ", ".join(map(repr, specs)) or "none"
            fix = (f"Map it in the manifest's [inputs], e.g. {spec.name} = \"<source field>\"." if manifest else
                   f"Name the array after the model's input: {{{spec.name!r}: array}}.")
            raise InputMismatchError(
                f"model {model.label} expects input {spec.name!r} ({spec.dtype} {_fmt_shape(spec.shape)}); "
                f"{where} gives inputs {given}. {fix}"
            )
    for name in specs:
        if name not in model_inputs:
            fix = "Rename or remove it in the manifest's [inputs]." if manifest else "Rename or drop that array."
            raise InputMismatchError(
                f"{where} gives input {name!r}, which model {model.label} does not have (its inputs: "
                f"{', '.join(map(repr, model_inputs))}). {fix}"
            )


def _check_shape(spec: TensorSpec, dtype: str, sample_shape: tuple[int, ...], model: LoadedModel, where: str,
                 origin: tuple[str, bool], layout: str, symbols: dict[str, tuple[int, str]]) -> None:
    """Rank and per-axis sizes of one input's samples against the model (symbols must agree across inputs)."""
    assert spec.shape is not None
    want = _fmt_shape(spec.shape[1:])
    if len(spec.shape) != len(sample_shape) + 1:
        raise InputMismatchError(
            f"input {spec.name!r}: model {model.label} expects rank {len(spec.shape)} "
            f"{_fmt_shape(spec.shape)} (first dim = batch), i.e. samples of shape {want}; {where} gives samples "
            f"of shape {_fmt_shape(sample_shape)}. "
            f"{_rank_hint(origin[0], origin[1], want, sample_shape, len(spec.shape))}."
        )
    for axis, (dim, actual) in enumerate(zip(spec.shape[1:], sample_shape), start=1):
        if isinstance(dim, int) and dim > 0 and dim != actual:
            raise InputMismatchError(
                f"input {spec.name!r}: model {model.label} expects shape {_fmt_shape(spec.shape)} (first dim "
                f"= batch); {where} gives samples {_fmt_shape(sample_shape)}: axis {axis} is {actual}, the "
                f"model wants {dim}. {_shape_hint(origin[0], spec.shape[1:], sample_shape, layout, dtype)}."
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
    the batch axis; its other dimensions must equal the data's per-sample
    shape, except symbolic ones, which are resolved from the data (the same
    symbol must get the same value everywhere). A fixed model batch size is
    checked against ``batch_size`` (or the whole set, when it is smaller), and
    a batch that cannot fit in free memory is refused. Raises
    InputMismatchError naming the input, what the model expects, what the data
    gives and what to change, for the kind of source the input comes from
    (images, a hook, npy/npz files, Hugging Face columns, in-memory arrays).
    """
    specs = _data_specs(dataset)
    where = _dataset_label(dataset)
    manifest = getattr(dataset, "manifest", None)
    in_manifest = isinstance(manifest, DataSetManifest)
    layout = manifest.preprocess.layout if in_manifest else "NCHW"
    _check_names(specs, model, where, in_manifest)
    symbols: dict[str, tuple[int, str]] = {}
    for spec in model.inputs:
        dtype, sample_shape = specs[spec.name]
        if spec.dtype != "undefined" and dtype != spec.dtype:
            fix = (f"Set [preprocess] dtype = \"{spec.dtype}\" in the manifest (or dtype = {{ {spec.name} = "
                   f"\"{spec.dtype}\" }})." if in_manifest else f"Cast the array: array.astype(numpy.{spec.dtype}).")
            raise InputMismatchError(
                f"input {spec.name!r}: model {model.label} expects {spec.dtype}, {where} gives {dtype}. {fix}"
            )
        if spec.shape is None:
            continue
        _check_shape(spec, dtype, sample_shape, model, where, _origin(dataset, spec.name), layout, symbols)
        _check_batch(spec, dataset, model, batch_size, specs, where)


# ─────────────────────────────── fingerprint and summary ───────────────────────────────


@dataclass(frozen=True)
class InputStats:
    """Value range of one input over every sample seen (float64 statistics)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    """Per-sample shape; None where it varied between samples."""
    min: float
    max: float
    mean: float
    std: float
    values: int
    """Number of scalar values the statistics cover."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"shape": list(self.shape)}


@dataclass(frozen=True)
class DataSummary:
    """What went in: sample count, content hash (in order), per-input ranges, duplicates, per-sample hashes.

    ``duplicates`` pairs each repeated sample's key with the key of its first
    occurrence. ``sample_hashes`` (content only, no keys) let :func:`overlap`
    count samples shared by two sets.
    """

    count: int
    sha256: str
    inputs: tuple[InputStats, ...]
    duplicates: tuple[tuple[str, str], ...]
    sample_hashes: frozenset[str] = field(repr=False)

    @property
    def unique(self) -> int:
        return len(self.sample_hashes)

    def input(self, name: str) -> InputStats:
        for s in self.inputs:
            if s.name == name:
                return s
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "sha256": self.sha256,
            "unique": self.unique,
            "inputs": {s.name: s.as_dict() for s in self.inputs},
            "duplicates": [list(d) for d in self.duplicates],
            "sample_hashes": sorted(self.sample_hashes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataSummary:
        try:
            inputs = tuple(
                InputStats(**{**v, "shape": tuple(v["shape"])}) for v in data["inputs"].values()
            )
            return cls(count=int(data["count"]), sha256=str(data["sha256"]), inputs=inputs,
                       duplicates=tuple((str(a), str(b)) for a, b in data["duplicates"]),
                       sample_hashes=frozenset(data.get("sample_hashes", ())))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"not a quantlab data summary ({type(exc).__name__}: {exc})") from None

    def to_frame(self) -> Any:
        """One row per input: dtype, per-sample shape, min, max, mean, std (``attrs``: count, sha256)."""
        import pandas as pd

        frame = pd.DataFrame([{
            "input": s.name, "dtype": s.dtype, "shape": _fmt_shape(s.shape),
            "min": s.min, "max": s.max, "mean": s.mean, "std": s.std,
        } for s in self.inputs], columns=["input", "dtype", "shape", "min", "max", "mean", "std"])
        frame.attrs.update(count=self.count, sha256=self.sha256, duplicates=len(self.duplicates))
        return frame

    def describe(self, max_duplicates: int = 5) -> str:
        """A short human summary: count, per-input value ranges, duplicates found."""
        lines = [f"{self.count} samples ({self.unique} unique), content sha256 {self.sha256[:12]}"]
        for s in self.inputs:
            lines.append(f"  {s.name}: {s.dtype} {_fmt_shape(s.shape)}  range [{s.min:.4g}, {s.max:.4g}]  "
                         f"mean {s.mean:.4g}  std {s.std:.4g}")
        if not self.duplicates:
            lines.append("  duplicates: none")
        else:
            shown = ", ".join(f"{a} = {b}" for a, b in self.duplicates[:max_duplicates])
            more = len(self.duplicates) - max_duplicates
            lines.append(f"  duplicates: {len(self.duplicates)} sample(s) repeat an earlier one: {shown}"
                         + (f" (and {more} more)" if more > 0 else ""))
        return "\n".join(lines)


class _RunningStats:
    """min/max/mean/M2 merged one sample at a time (Chan et al.), so results do not depend on batch size."""

    def __init__(self, dtype: str, shape: tuple[int, ...]) -> None:
        self.dtype = dtype
        self.shape: tuple[int | None, ...] = shape
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, sample: np.ndarray) -> None:
        if sample.shape != self.shape:
            self.shape = tuple(None if len(self.shape) != sample.ndim or a != b else a
                               for a, b in zip(self.shape, sample.shape))
        if sample.size == 0:
            return
        x = sample.astype(np.float64, copy=False)
        n_b = x.size
        mean_b = float(x.mean())
        m2_b = float(np.square(x - mean_b).sum())
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))

    def result(self, name: str) -> InputStats:
        std = math.sqrt(self.m2 / self.n) if self.n else math.nan
        return InputStats(name=name, dtype=self.dtype, shape=self.shape,
                          min=self.min if self.n else math.nan, max=self.max if self.n else math.nan,
                          mean=self.mean if self.n else math.nan, std=std, values=self.n)


class DataFingerprint:
    """Reduces the batches a run consumes to a :class:`DataSummary`, without keeping samples.

    ``update(batch)`` refuses NaN/Inf (DataError naming the sample key and
    input), hashes every sample in order (inputs sorted by name, through
    :class:`quantlab.fingerprint.ArrayHasher`, so the hash does not depend on
    the batch size), and tracks per-input statistics and repeated samples.
    """

    def __init__(self) -> None:
        self._hasher = ArrayHasher()
        self._count = 0
        self._stats: dict[str, _RunningStats] = {}
        self._first_key: dict[str, str] = {}
        self._duplicates: list[tuple[str, str]] = []

    def update(self, batch: Any) -> None:
        feeds: Mapping[str, Any] = getattr(batch, "feeds", batch)
        arrays = {name: np.asarray(feeds[name]) for name in sorted(feeds)}
        if not arrays:
            raise DataError("a batch holds no inputs")
        n = next(iter(arrays.values())).shape[0]
        given = None if isinstance(batch, Mapping) else getattr(batch, "keys", None)
        keys = list(given) if given is not None else [f"sample {self._count + i}" for i in range(n)]
        if len(keys) != n or any(a.shape[:1] != (n,) for a in arrays.values()):
            raise DataError(f"a batch must hold {len(keys)} samples on axis 0 of every input; got shapes "
                            f"{ {k: a.shape for k, a in arrays.items()} }")
        for name, arr in arrays.items():
            if arr.dtype.kind not in "biuf":
                raise DataError(f"input {name!r}: holds {arr.dtype} values (sample {keys[0]!r}); inputs must be "
                                "numeric arrays.")
            if arr.dtype.kind == "f":
                finite = np.isfinite(arr.reshape(n, -1)).all(axis=1)
                if not finite.all():
                    i = int(np.argmin(finite))
                    bad = int(np.size(arr[i]) - np.count_nonzero(np.isfinite(arr[i])))
                    kinds = "NaN" if np.isnan(arr[i]).any() else "Inf"
                    if np.isnan(arr[i]).any() and np.isinf(arr[i]).any():
                        kinds = "NaN and Inf"
                    raise DataError(f"sample {keys[i]!r}: input {name!r} holds {bad} {kinds} value(s). Fix or "
                                    "remove that sample (or its preprocessing); quantlab does not calibrate or "
                                    "compare on non-finite inputs.")
        for i in range(n):
            sample_hash = ArrayHasher()
            for name, arr in arrays.items():
                a = arr[i]
                self._hasher.update(name, a)
                sample_hash.update(name, a)
                stats = self._stats.get(name)
                if stats is None:
                    stats = self._stats[name] = _RunningStats(arr.dtype.name, tuple(a.shape))
                stats.add(a)
            digest = sample_hash.hexdigest()
            first = self._first_key.setdefault(digest, keys[i])
            if first != keys[i]:
                self._duplicates.append((keys[i], first))
            self._count += 1

    def summary(self) -> DataSummary:
        return DataSummary(
            count=self._count,
            sha256=self._hasher.hexdigest(),
            inputs=tuple(s.result(name) for name, s in self._stats.items()),
            duplicates=tuple(self._duplicates),
            sample_hashes=frozenset(self._first_key),
        )


def summarize(dataset: DataSet, batch_size: int = 16, *, progress: bool = False) -> DataSummary:
    """One pass over ``dataset``: its :class:`DataSummary` (DataError on NaN/Inf or an empty set)."""
    fingerprint = DataFingerprint()
    batches: Any = dataset.batches(batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=math.ceil(len(dataset) / batch_size), unit="batch",
                       desc=f"summarize {getattr(dataset, 'name', 'data')}")
    for batch in batches:
        fingerprint.update(batch)
    summary = fingerprint.summary()
    if summary.count == 0:
        raise DataError(f"{_dataset_label(dataset)} is empty; give it at least one sample.")
    return summary


def overlap(a: DataSummary, b: DataSummary) -> int:
    """How many distinct samples (by content) appear in both summaries."""
    return len(a.sample_hashes & b.sample_hashes)
