"""The ``quantlab`` command: the only place that prints and exits.

Each sub-command lives in its own module here with two functions:
``register(subparsers) -> None`` adds its arguments and ``run(args) -> int``
does the work and returns the exit code. Library errors (``QuantlabError``)
become one message on stderr and exit code 2; a failed threshold gate is 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ..errors import QuantlabError

__all__ = ["main", "COMMANDS", "positive_int", "non_negative_int"]

COMMANDS: tuple[str, ...] = (
    "calibrate",
    "build",
    "perf",
    "compare",
    "search",
    "coverage",
    "run",
    "sweep",
    "report",
    "export",
    "demo",
)
"""Sub-command modules, in help order; a module that does not exist yet is skipped."""

EXIT_ERROR = 2
EXIT_GATE_FAILED = 1


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    from ..version import __version__

    parser = argparse.ArgumentParser(
        prog="quantlab",
        description="INT8 quantization and accuracy validation for ONNX models bound for TensorRT.",
    )
    parser.add_argument("--version", action="version", version=f"quantlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, object] = {}
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue
            raise
        module.register(sub)  # type: ignore[attr-defined]
        modules[name] = module
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    parser, modules = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_ERROR
    try:
        return int(modules[args.command].run(args))  # type: ignore[attr-defined]
    except QuantlabError as exc:
        print(f"quantlab {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"quantlab {args.command}: interrupted; nothing half-written was left behind.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
