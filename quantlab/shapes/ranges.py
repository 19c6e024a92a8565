"""ShapeRange and the ``--shapes`` text: what the user gives, parsed and checked against the model's inputs.

trtexec takes a profile as three flags (``--minShapes/--optShapes/--maxShapes``); quantlab takes
it as one, ``--shapes NAME:MIN,OPT,MAX`` (:data:`SHAPES_GRAMMAR`), and :func:`format_shapes`
writes the same text back, so a range derived from data can be shown, recorded and given
again. Every message names the grammar: a wrong ``--shapes`` is a typo to fix, not a bug.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InputMismatchError

__all__ = [
    "SHAPES_GRAMMAR",
    "Shape",
    "ShapeRange",
    "check_range_fits",
    "check_ranges",
    "format_shapes",
    "network_shapes",
    "parse_shapes",
]

Shape = tuple[int, ...]

SHAPES_GRAMMAR = (
    "NAME:MIN,OPT,MAX (or NAME:SHAPE for one fixed shape), each shape as dims joined by 'x' "
    "(e.g. image:1x3x48x64,8x3x48x320,32x3x48x1600); several inputs separated by spaces or commas"
)
"""One line for error messages and ``--help``: what to write after ``--shapes``."""

_DIMS = re.compile(r"^[0-9]+(x[0-9]+)*$")


@dataclass(frozen=True)
class ShapeRange:
    """(min, opt, max) shapes of one input: TensorRT's optimisation profile for it.

    Checked on creation: same rank, dims >= 0 (TensorRT builds empty tensors: an optimum decoder's first step
    has a past of length 0), ``min <= opt <= max`` per axis.
    """

    name: str
    min: Shape
    opt: Shape
    max: Shape

    def __post_init__(self) -> None:
        ranks = {len(self.min), len(self.opt), len(self.max)}
        if len(ranks) != 1:
            raise InputMismatchError(
                f"shapes of input {self.name!r}: MIN, OPT and MAX have ranks {len(self.min)}, "
                f"{len(self.opt)} and {len(self.max)}; give three shapes of the same rank ({SHAPES_GRAMMAR})")
        for axis, (lo, opt, hi) in enumerate(zip(self.min, self.opt, self.max)):
            if lo < 0 or not lo <= opt <= hi:  # 0: an empty tensor, a decoder's first step (past length 0)
                raise InputMismatchError(
                    f"shapes of input {self.name!r}, axis {axis}: MIN {lo}, OPT {opt}, MAX {hi} must satisfy "
                    f"0 <= MIN <= OPT <= MAX ({SHAPES_GRAMMAR})")

    def as_tuple(self) -> tuple[Shape, Shape, Shape]:
        return self.min, self.opt, self.max

    def as_lists(self) -> list[list[int]]:
        """``[min, opt, max]`` as JSON lists: the form engine.json and the cache sidecar record."""
        return [list(self.min), list(self.opt), list(self.max)]

    def __str__(self) -> str:
        return f"{self.name}:{_text(self.min)},{_text(self.opt)},{_text(self.max)}"


def _text(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def _dims(token: str, name: str, which: str) -> Shape:
    if not _DIMS.match(token):
        raise InputMismatchError(
            f"--shapes: {which} shape {token!r} of input {name!r} is not dims joined by 'x'; write {SHAPES_GRAMMAR}")
    return tuple(int(d) for d in token.split("x"))


_DIMS_TOKEN = re.compile(r"\d+(?:x\d+)*")


def _specs(text: str) -> list[tuple[str, list[str]]]:
    """``text`` split into (name, [shape tokens]): a token holding ':' starts a new input. Words before it that are
    no shape belong to its name when an input follows (``my image:1x16,4x16,8x16``: names with spaces or commas,
    as :func:`format_shapes` writes them)."""
    parts = re.split(r"([\s,]+)", text.strip())  # words at even indices, the separators between them at odd ones
    words = [(parts[i], parts[i + 1] if i + 1 < len(parts) else "") for i in range(0, len(parts), 2) if parts[i]]
    specs: list[tuple[str, list[str]]] = []
    pending = ""  # words of a name that goes on in a later word holding ':'
    for k, (word, after) in enumerate(words):
        if ":" in word:
            name, first = word.rsplit(":", 1)  # names such as 'input:0' keep their own colons
            name = pending + name
            pending = ""
            if not name:
                raise InputMismatchError(f"--shapes: {word!r} has no input name before ':'; write {SHAPES_GRAMMAR}")
            specs.append((name, [first]))
        elif pending or not _DIMS_TOKEN.fullmatch(word) and any(":" in w for w, _ in words[k + 1:]):
            pending += word + after
        elif not specs:
            raise InputMismatchError(
                f"--shapes: {word!r} comes before any input name; write {SHAPES_GRAMMAR}")
        else:
            specs[-1][1].append(word)
    if pending:
        raise InputMismatchError(f"--shapes: {pending.strip()!r} names no input (no ':' after it); write "
                                 f"{SHAPES_GRAMMAR}")
    return specs


def parse_shapes(text: str | Iterable[str]) -> dict[str, ShapeRange]:
    """``--shapes`` text (one string, or several: the flag may repeat) -> ranges by input name.

    Grammar (trtexec's ``--minShapes/--optShapes/--maxShapes`` in one flag)::

        SHAPES := SPEC ((',' | ' ') SPEC)*
        SPEC   := NAME ':' DIMS ',' DIMS ',' DIMS      min, opt, max
                | NAME ':' DIMS                        one fixed shape (min = opt = max)
        DIMS   := INT ('x' INT)*

    NAME is everything before the token's last ':', so ``input:0:1x3,...`` names ``input:0``.
    """
    texts = [text] if isinstance(text, str) else list(text)
    out: dict[str, ShapeRange] = {}
    for name, tokens in (spec for t in texts for spec in _specs(t)):
        if name in out:
            raise InputMismatchError(f"--shapes: input {name!r} is given twice; give each input once ({SHAPES_GRAMMAR})")
        if len(tokens) not in (1, 3):
            raise InputMismatchError(
                f"--shapes: input {name!r} has {len(tokens)} shapes ({','.join(tokens)}); give 3 "
                f"(MIN,OPT,MAX) or 1 (fixed): {SHAPES_GRAMMAR}")
        shapes = [_dims(t, name, which) for t, which in zip(tokens, ("MIN", "OPT", "MAX") if len(tokens) == 3
                                                               else ("the",))]
        lo, opt, hi = shapes if len(shapes) == 3 else shapes * 3
        out[name] = ShapeRange(name, lo, opt, hi)
    if not out:
        raise InputMismatchError(f"--shapes is empty; write {SHAPES_GRAMMAR}")
    return out


def format_shapes(ranges: Mapping[str, ShapeRange]) -> str:
    """The ``--shapes`` text that parses back to ``ranges`` (for messages and reports)."""
    return " ".join(str(r) for r in ranges.values())


def check_range_fits(shape_range: ShapeRange, network_shape: Sequence[int]) -> None:
    """InputMismatchError unless ``shape_range`` has the input's rank and keeps its fixed dims."""
    net = [int(d) for d in network_shape]
    name = shape_range.name
    if len(shape_range.min) != len(net):
        raise InputMismatchError(
            f"input {name!r}: the shapes given have rank {len(shape_range.min)} ({_text(shape_range.min)}) but "
            f"the model expects rank {len(net)} ({'x'.join(str(d) if d >= 0 else '?' for d in net)}, ? = dynamic)")
    for axis, n in enumerate(net):
        if n >= 0 and {shape_range.min[axis], shape_range.opt[axis], shape_range.max[axis]} != {n}:
            raise InputMismatchError(
                f"input {name!r}: the shapes given have axis {axis} in {shape_range.min[axis]}.."
                f"{shape_range.max[axis]} but the model fixes it to {n}; write {n} there")


def network_shapes(specs: Iterable[Any]) -> dict[str, list[int]]:
    """Input name -> shape with -1 for every dynamic dim, from :class:`quantlab.graph.TensorSpec`-like specs
    (``.name``, ``.shape`` of ints, dim names and None; an unknown rank gives no dims)."""
    return {str(s.name): [d if isinstance(d, int) and d >= 0 else -1 for d in (s.shape or ())] for s in specs}


def check_ranges(ranges: Mapping[str, ShapeRange], network_inputs: Mapping[str, Sequence[int]],
                 where: str = "--shapes") -> dict[str, ShapeRange]:
    """``ranges`` when every one names an input of the model and fits it (InputMismatchError naming ``where``)."""
    unknown = sorted(set(ranges) - set(network_inputs))
    if unknown:
        raise InputMismatchError(f"{where} names {', '.join(map(repr, unknown))}, which are not inputs of the "
                                 f"model; its inputs are {', '.join(map(repr, network_inputs))}")
    for name, shape_range in ranges.items():
        try:
            check_range_fits(shape_range, network_inputs[name])
        except InputMismatchError as exc:
            raise InputMismatchError(f"{where}: {exc}") from None
    return dict(ranges)
