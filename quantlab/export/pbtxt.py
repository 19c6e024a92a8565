"""A small writer for protobuf text format, the language of Triton's ``config.pbtxt``.

A message is a tuple of ``(field, value)`` pairs in the order they are written;
a value is a scalar (``str``, ``int``, ``float``, ``bool``, or :class:`Enum`
for an enum constant written bare), a nested message (a tuple of pairs), or a
list of those for a repeated field (one line or block per item). Strings are escaped the way protobuf's
text parser reads them, so a model-supplied tensor name cannot break out of
its quotes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

__all__ = ["Enum", "Message", "render", "quote"]


@dataclass(frozen=True)
class Enum:
    """An enum constant (``TYPE_FP32``, ``KIND_GPU``): written without quotes."""

    name: str


Scalar = Union[str, int, float, bool, Enum]
Value = Union[Scalar, "Message", Sequence[Union[Scalar, "Message"]]]
Message = tuple[tuple[str, Value], ...]


def quote(text: str) -> str:
    """``text`` as a protobuf text-format string literal (C escapes; non-ASCII as UTF-8 octal bytes)."""
    out = []
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif 0x20 <= byte < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _scalar(value: Scalar) -> str:
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return quote(str(value))


def _is_message(value: object) -> bool:
    return isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in value)


def render(message: Message, indent: int = 0) -> str:
    """The text format of ``message``, one field per line, nested messages indented by two spaces."""
    pad = "  " * indent
    lines: list[str] = []
    for name, value in message:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if _is_message(item) and item:
                lines.append(f"{pad}{name} {{")
                lines.append(render(item, indent + 1).rstrip("\n"))  # type: ignore[arg-type]
                lines.append(f"{pad}}}")
            elif _is_message(item):
                lines.append(f"{pad}{name} {{ }}")
            else:
                lines.append(f"{pad}{name}: {_scalar(item)}")  # type: ignore[arg-type]
    return "\n".join(line for line in lines if line) + "\n"
