"""``[labels]``: where a sample's label comes from (a regex on the file name, or a field) and its dtype.

    file name ──regex group──┐
                             ├──> convert to int64 / float32 / str ──> Sample.label
    source field (column) ───┘
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, ManifestError
from ..schema import Key, Where, check_table, is_str, one_of

__all__ = ["LABEL_DTYPES", "LABEL_KEYS", "LabelSpec", "Labeler", "parse_labels"]

LABEL_DTYPES = ("int64", "float32", "str")

LABEL_KEYS: dict[str, Key] = {
    "regex": Key("a regular expression with one group (or a group named 'label')", is_str,
                 "regex = '_(\\d+)\\.jpg$'"),
    "column": Key("a source field / column name", lambda v: is_str(v) and bool(v), 'column = "label"'),
    "dtype": Key(f"one of {', '.join(map(repr, LABEL_DTYPES))}", one_of(LABEL_DTYPES), 'dtype = "int64"'),
}


@dataclass(frozen=True)
class LabelSpec:
    """Where a sample's label comes from: a regex on the file's relative path, or a field/column."""

    regex: str | None = None
    column: str | None = None
    dtype: str = "int64"


def _check_regex(pattern: str, where: Where, kinds: AbstractSet[str]) -> None:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ManifestError(f"{where.at('labels', None, 'regex')}: not a valid regular expression "
                            f"({exc}).") from None
    if compiled.groups == 0:
        raise ManifestError(f"{where.at('labels', None, 'regex')}: has no group; put the label in "
                            "parentheses, e.g. '_(\\d+)\\.jpg$'.")
    if kinds & {"hf_disk", "hf_imagefolder"}:
        raise ManifestError(f"{where.at('labels', None, 'regex')}: Hugging Face sources have no file "
                            "names to match; use column = \"label\".")


def parse_labels(table: dict[str, Any] | None, where: Where, kinds: AbstractSet[str]) -> LabelSpec | None:
    """The manifest's ``[labels]`` (None without one); ``kinds``: the source kinds in use."""
    if table is None:
        return None
    check_table(table, LABEL_KEYS, where, "labels", error=ManifestError, guide="calib_sets/README.md")
    if ("regex" in table) == ("column" in table):
        raise ManifestError(f"{where.at('labels')}: give exactly one of 'regex' (on the file name) or "
                            "'column' (a source field), e.g. regex = '_(\\d+)\\.jpg$'.")
    if "regex" in table:
        _check_regex(table["regex"], where, kinds)
    if "column" in table and kinds & {"images", "npy"}:
        raise ManifestError(f"{where.at('labels', None, 'column')}: images/npy sources have no columns; "
                            "use regex = '...' on the file name.")
    return LabelSpec(regex=table.get("regex"), column=table.get("column"), dtype=table.get("dtype", "int64"))


class Labeler:
    """Reads labels the way a manifest's [labels] says (``spec`` None: no labels); ``manifest`` names the file."""

    def __init__(self, spec: LabelSpec | None, manifest: Path) -> None:
        self.spec, self.manifest = spec, manifest
        self.regex = re.compile(spec.regex) if spec and spec.regex else None
        self.column = spec.column if spec else None
        self.dtype = spec.dtype if spec else None

    def from_name(self, ref: str, where: str) -> Any:
        """The label in a file's relative path (None without a regex)."""
        if self.regex is None:
            return None
        m = self.regex.search(ref)
        if m is None:
            raise DataError(f"{where}: file {ref!r} does not match [labels] regex {self.regex.pattern!r} "
                            f"in {self.manifest}; fix the regex or the file name.")
        text = m.group("label") if "label" in self.regex.groupindex else m.group(1)
        return self.convert(text, where)

    def from_fields(self, fields: Mapping[str, Any], key: str, listed: Any) -> Any:
        """The label of a loaded sample: its column's value, else the label found when listing (``listed``)."""
        if self.column is None:
            return listed
        if self.column not in fields:
            raise DataError(f"sample {key!r}: has no label field {self.column!r}.")
        return self.convert(fields[self.column], f"sample {key!r}")

    def convert(self, value: Any, where: str) -> Any:
        dtype = self.dtype
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
                            f"{self.manifest}.") from None
