"""The manifest file: top-level keys, ``[inputs]``, and the frozen :class:`DataSetManifest` it parses into.

    NAME.toml ──read_toml──> raw table ──check_table(TOP_KEYS)──┬─ [[source]]  -> sources.parse_source
                                                               ├─ [inputs]    -> parse_inputs (here)
                                                               ├─ [pad]       -> padding.parse_pad
                                                               ├─ [preprocess]-> preprocess.parse_preprocess
                                                               ├─ [augment]   -> augment.parse_augment
                                                               └─ [labels]    -> labels.parse_labels
                                                                     ──> DataSetManifest (frozen)

Keys are checked by :func:`quantlab.schema.check_table`, so every message
names the file, the line and the key. How model inputs are fed (which field
feeds which input, on which batch axis; later: sequences) is parsed in
:func:`parse_inputs` / :func:`parse_batch_axes` and the ``[inputs]`` entry of TOP_KEYS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..environment import unreadable
from ..errors import DataError, ManifestError
from ..fingerprint import sha256_bytes
from ..schema import Key, Where, check_table, is_int, is_str, one_of, show
from .augment import AugmentSpec, parse_augment
from .labels import LabelSpec, parse_labels
from .padding import PadSpec, parse_pad
from .preprocess import PreprocessSpec, parse_preprocess
from .sources import SourceSpec, parse_source

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["ROLES", "TOP_KEYS", "DataSetManifest", "load_manifest", "parse_batch_axes", "parse_inputs",
           "parse_sequence", "parse_streams"]

ROLES = ("calibration", "validation")

TOP_KEYS: dict[str, Key] = {
    "name": Key("a string", is_str, 'name = "my_calib"'),
    "description": Key("a string", is_str, 'description = "what this set is"'),
    "role": Key(f"one of {', '.join(map(repr, ROLES))}", one_of(ROLES), 'role = "calibration"'),
    "count": Key("an integer >= 1", lambda v: is_int(v) and v >= 1, "count = 128"),
    "seed": Key("an integer >= 0", lambda v: is_int(v) and v >= 0, "seed = 0"),
    "shuffle": Key("true or false", lambda v: isinstance(v, bool), "shuffle = true"),
    "batching": Key('"in_order" or "by_shape"', one_of(("in_order", "by_shape")),
                    'batching = "by_shape"   # samples of several shapes: batch equal shapes together'),
    "feeds": Key('"complete" or "samples"', one_of(("complete", "samples")),
                 'feeds = "complete"   # each file is a whole model feed, batch 1 on each batch axis'),
    "source": Key("a [source] table or [[source]] tables", lambda v: isinstance(v, (dict, list)),
                  '[[source]]\nkind = "images"\npath = "photos"'),
    "inputs": Key("a table of input name = source field (or = { field = ..., batch_axis = ... })",
                  lambda v: isinstance(v, dict), '[inputs]\ninput = "image"\nstate = { field = "state", batch_axis = 1 }'),
    "preprocess": Key("a table", lambda v: isinstance(v, dict), "[preprocess]\nresize = 256"),
    "augment": Key("a table", lambda v: isinstance(v, dict), "[augment]\nviews = 8"),
    "labels": Key("a table", lambda v: isinstance(v, dict), '[labels]\nregex = "_(\\\\d+)\\\\.jpg$"'),
    "sequence": Key("a table", lambda v: isinstance(v, dict), '[sequence]\ncarry = { stateN = "state" }'),
    "pad": Key("a table", lambda v: isinstance(v, dict),
               '[pad]\ninputs = ["input_ids"]\nvalue = 0\nmask = "attention_mask"   # pad samples to one length'),
}
"""The top-level keys of a manifest (its tables are checked by the module that owns them)."""


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
    batch_axes: tuple[tuple[str, int | None], ...] = ()
    complete_feeds: bool = False
    sequence_carry: tuple[tuple[str, str], ...] = ()
    sequence_streams: int | None = None
    group_by_shape: bool = False
    padding: PadSpec | None = None

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


def _parse_sources(raw: dict[str, Any], where: Where, path: Path) -> tuple[list[SourceSpec], list[str]]:
    """The sources found on disk, and the optional ones skipped (DataError when none is left)."""
    if "source" not in raw:
        raise ManifestError(f"{where.at('')}: no [[source]] table; say where the samples come from, e.g.\n"
                            + TOP_KEYS["source"].example)
    source_tables = raw["source"] if isinstance(raw["source"], list) else [raw["source"]]
    if not source_tables:
        raise ManifestError(f"{where.at('')}: 'source' is an empty list; add a [[source]] table.")
    sources: list[SourceSpec] = []
    skipped: list[str] = []
    for i, table in enumerate(source_tables):
        index = i if isinstance(raw["source"], list) else None
        if not isinstance(table, dict):
            raise ManifestError(f"{where.at('source', index)}: each source must be a table, got {show(table)}.")
        spec = parse_source(table, where, index, path.parent)
        if spec is None:
            skipped.append(str(table.get("package", table.get("path"))))
        else:
            sources.append(spec)
    if not sources:
        raise DataError(f"{path}: every source is optional and none is installed ({', '.join(skipped)}); "
                        "the data set would be empty. Install one of them or add a source.")
    return sources, skipped


def _manifest_from(path: Path, raw: dict[str, Any], text: str, digest: str) -> DataSetManifest:
    where = Where(path, text)
    check_table(raw, TOP_KEYS, where, "", error=ManifestError, guide="calib_sets/README.md")
    sources, skipped = _parse_sources(raw, where, path)
    kinds = frozenset(s.kind for s in sources)
    return DataSetManifest(
        path=path,
        sha256=digest,
        raw=raw,
        name=raw.get("name", path.stem),
        role=raw.get("role", "calibration"),
        count=raw.get("count"),
        seed=raw.get("seed", 0),
        shuffle=_shuffle(raw, where),
        sources=tuple(sources),
        skipped_sources=tuple(skipped),
        inputs=parse_inputs(raw.get("inputs"), where),
        batch_axes=parse_batch_axes(raw.get("inputs"), where),
        complete_feeds=raw.get("feeds", "samples") == "complete",
        sequence_carry=parse_sequence(raw.get("sequence"), where),
        sequence_streams=parse_streams(raw.get("sequence")),
        group_by_shape=raw.get("batching", "in_order") == "by_shape",
        padding=parse_pad(raw.get("pad"), where),
        preprocess=parse_preprocess(raw.get("preprocess", {}), where, path.parent, kinds),
        augment=parse_augment(raw.get("augment"), where, kinds),
        labels=parse_labels(raw.get("labels"), where, kinds),
    )


def parse_inputs(table: dict[str, Any] | None, where: Where) -> tuple[tuple[str, str], ...] | None:
    """``[inputs]``: model input name -> source field (None: every shared field feeds the input it names).

    An entry is a field name, or a table ``{ field = "state", batch_axis = 1 }`` (see :func:`parse_batch_axes`).
    """
    if table is None:
        return None
    if not table:
        raise ManifestError(f"{where.at('inputs')}: empty; map each model input to a source field, "
                            'e.g. input = "image", or remove [inputs] to use the field names as input names.')
    out = []
    for name, entry in table.items():
        fieldname = entry.get("field") if isinstance(entry, dict) else entry
        if isinstance(entry, dict):
            check_table(entry, INPUT_KEYS, where, f"inputs.{name}", error=ManifestError, guide="calib_sets/README.md")
        if not isinstance(fieldname, str) or not fieldname:
            raise ManifestError(f"{where.at('inputs', None, name)}: must be the name of a source field "
                                f'(a string), got {show(entry)}. E.g. {name} = "image", or with its batch axis '
                                f'{name} = {{ field = "{name}", batch_axis = 1 }}')
        out.append((name, fieldname))
    return tuple(out)


INPUT_KEYS: dict[str, Key] = {
    "field": Key("a source field name", is_str, 'field = "state"'),
    "batch_axis": Key('an integer >= 0, or "none"', lambda v: (is_int(v) and v >= 0) or v == "none",
                      'batch_axis = 1   # or "none" for an input every sample shares (a scalar sample rate)'),
}
"""Keys of an ``[inputs]`` entry given as a table."""


def parse_batch_axes(table: dict[str, Any] | None, where: Where) -> tuple[tuple[str, int | None], ...]:
    """The inputs ``[inputs]`` batches on an axis other than 0: ``batch_axis = 1``, or ``"none"`` (not batched:
    every sample of a batch must hold the same value, fed once)."""
    out = []
    for name, entry in (table or {}).items():
        if isinstance(entry, dict) and "batch_axis" in entry:
            axis = entry["batch_axis"]
            out.append((name, None if axis == "none" else int(axis)))
    return tuple(out)


SEQUENCE_KEYS: dict[str, Key] = {
    "carry": Key("a table of model output = model input", lambda v: isinstance(v, dict) and bool(v)
                 and all(isinstance(x, str) and x for x in v.values()), 'carry = { stateN = "state" }'),
    "streams": Key("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                   "streams = 4"),
}
"""Keys of ``[sequence]``: which outputs feed which inputs on the next batch (quantlab.sequence.SequenceData), and
how many streams the samples interleave (the batch size every command then runs at)."""


def _shuffle(raw: dict[str, Any], where: Where) -> bool:
    """``shuffle``: true by default, false with a ``[sequence] carry``, whose samples are a stream's chunks in order
    (shuffled, each chunk got the state an unrelated chunk left: Silero VAD's cell state ranged -9.7..24.5 instead
    of -5.9..24.2, without a word)."""
    if raw.get("sequence") is None:
        return bool(raw.get("shuffle", True))
    if raw.get("shuffle") is True:
        raise ManifestError(f"{where.at('', None, 'shuffle')}: [sequence] carry feeds each sample the state the one before it "
                            "left, so the samples must stay in stream order; remove shuffle = true (without it, "
                            "a set with a carry is not shuffled)")
    return False


def parse_streams(table: dict[str, Any] | None) -> int | None:
    """``[sequence] streams``: how many streams the samples interleave (sample ``j`` of every ``streams`` continues
    the one ``streams`` before it); None when not given (checked by :func:`parse_sequence`)."""
    return None if table is None else table.get("streams")


def parse_sequence(table: dict[str, Any] | None, where: Where) -> tuple[tuple[str, str], ...]:
    """``[sequence] carry``: (output, input) pairs; empty without ``[sequence]``."""
    if table is None:
        return ()
    check_table(table, SEQUENCE_KEYS, where, "sequence", error=ManifestError, guide="calib_sets/README.md")
    if "carry" not in table:
        raise ManifestError(f"{where.at('sequence')}: no 'carry'; say which output feeds which input, e.g. "
                            + SEQUENCE_KEYS["carry"].example)
    return tuple(table["carry"].items())
