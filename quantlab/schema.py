"""One small checker for the TOML files a user edits: data-set manifests, experiment files, plans.

A schema is a mapping from key to :class:`Key`: what the value must hold, said
for a human, a predicate, and a line to copy. :func:`check_table` refuses
unknown keys (suggesting the closest known one) and values of the wrong type;
:class:`Where` turns (table, index, key) into ``file: line N: [table] key 'k'``
for the message, because ``tomllib`` keeps no positions.

Only the standard library is imported: the CLI reads schemas at start-up.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import QuantlabError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "read_toml_text",
    "parse_toml",
    "Key",
    "Where",
    "check_table",
    "show",
    "is_int",
    "is_num",
    "is_str",
    "non_empty_str",
    "one_of",
    "str_list",
]


@dataclass(frozen=True)
class Key:
    """One allowed key: what it must hold (for a human), the check, and an example to copy."""

    expect: str
    check: Callable[[Any], bool]
    example: str


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    """A finite int or float (TOML's ``inf``/``nan`` are refused; booleans are not numbers)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_probability(v: Any) -> bool:
    """A number strictly between 0 and 1 (a decision threshold)."""
    return is_num(v) and 0.0 < v < 1.0


def is_str(v: Any) -> bool:
    return isinstance(v, str)


def non_empty_str(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def one_of(options: Sequence[str]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and v in options


def str_list(v: Any, *, allow_str: bool = False) -> bool:
    """A non-empty list of non-empty strings (or, with ``allow_str``, one non-empty string)."""
    if allow_str and isinstance(v, str):
        return bool(v)
    return isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) and x for x in v)


def show(value: Any) -> str:
    """A value as an error message names it: its TOML kind and a short repr."""
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind.get(type(value), type(value).__name__)} {text}"


class Where:
    """Turns (table, index, key) into ``file: line N: [table] key 'k'`` for error messages.

    The raw text is scanned for the key under its ``[table]`` / ``[[table]]``
    header (the index-th one for arrays of tables), then for a dotted key
    (``table.key = ...``) or an inline table (``table = { key = ... }``) at the
    top level. When the line cannot be found it is left out.
    """

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?\s*(#.*)?$")

    def __init__(self, path: str | Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def line(self, section: str, index: int | None = None, key: str | None = None) -> int | None:
        found = self._under_header(section, index, key)
        if found is None and section and key and index is None:
            found = self._top_level(section, key)
        return found

    def _under_header(self, section: str, index: int | None, key: str | None) -> int | None:
        current, counts, header_line = "", {}, None
        target_header: int | None = None
        key_re = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=") if key else None
        for no, raw in enumerate(self.lines, start=1):
            m = self._HEADER.match(raw)
            if m:
                name = ".".join(p.strip().strip("\"'") for p in m.group(2).split("."))
                counts[name] = counts.get(name, -1) + 1
                current, header_line = name, no
                if name == section and (index is None or counts[name] == index):
                    target_header = no
                continue
            in_target = current == section and (section == "" or header_line == target_header)
            if in_target and key_re is not None and key_re.match(raw):
                return no
        return target_header if section else None

    def _top_level(self, section: str, key: str) -> int | None:
        """``section.key = ...`` or ``section = { ..., key = ... }`` before the first table header."""
        dotted = re.compile(rf"^\s*{re.escape(section)}\s*\.\s*{re.escape(key)}\s*=")
        inline = re.compile(rf"^\s*{re.escape(section)}\s*=\s*\{{.*\b{re.escape(key)}\s*=")
        for no, raw in enumerate(self.lines, start=1):
            if self._HEADER.match(raw):
                return None
            if dotted.match(raw) or inline.match(raw):
                return no
        return None

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


def check_table(table: Mapping[str, Any], schema: Mapping[str, Key], where: Where, section: str,
                index: int | None = None, *, error: type[QuantlabError], guide: str) -> None:
    """Refuse unknown keys and values of the wrong type, naming the file, line, table and key.

    ``guide`` names the document that lists the keys (e.g. ``calib_sets/README.md``).
    """
    for key, value in table.items():
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise error(
                f"{where.at(section, index, key)}: unknown key.{hint} Known keys here: "
                f"{', '.join(sorted(schema))}. Remove or rename it (see {guide})."
            )
        spec = schema[key]
        if not spec.check(value):
            raise error(f"{where.at(section, index, key)}: must be {spec.expect}, got {show(value)}. "
                        f"Write it like: {spec.example}")


def read_toml_text(path: str | Path, *, kind: str, example: str, error: type[QuantlabError]) -> str:
    """The text of the TOML file ``path`` (an experiment file, a sweep file...), or ``error`` naming it.

    ``kind`` names the file for the message (``"experiment file"``), ``example`` is a path to suggest.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {kind}. Give the path of a TOML file such as {example}.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not a UTF-8 text file ({exc}); a {kind} is TOML.") from None


def parse_toml(text: str, label: str, *, error: type[QuantlabError]) -> tuple[dict[str, Any], Where]:
    """``text`` parsed as TOML and a :class:`Where` for its messages, or ``error`` naming ``label`` and the line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{label}: not valid TOML: {exc}") from None
    return data, Where(label, text)
