"""The ``quantlab`` command: the only place that prints and exits.

Each sub-command lives in its own module here with ``HELP`` (its one-line
summary), ``register(subparsers) -> None`` (adds its arguments) and
``run(args) -> int`` (does the work, returns the exit code).

Imports are lazy here, on purpose (the one justified exception to "imports at
the top of the module"): ``quantlab --help``, ``quantlab CMD --help`` and
argument errors must answer in half a second, and onnx, onnxruntime, numpy,
pandas, numba and matplotlib take seconds to import. So the sub-command modules
import only the standard library at module level; ``register`` builds the
argparse parser (only the selected command's, see :func:`main`), and ``run``
imports the library. :func:`main` installs the SIGINT/SIGTERM handlers before
anything heavy is imported, so an interruption at any point is one line and
exit 130/143, never a traceback.

Every failure becomes one line ``quantlab CMD: error: ...`` on stderr and an
:class:`ExitCode` (see :mod:`quantlab.cli.exits` and README "Exit codes").
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .exits import (
    EXIT_CODES_HELP,
    ExitCode,
    failure,
    hold_signals,
    install_signal_handlers,
    restore_signal_handlers,
    set_activity,
)

__all__ = ["main", "COMMANDS", "ExitCode", "EXIT_CODES_HELP", "positive_int", "non_negative_int", "path_arg",
           "text_arg", "add_command", "prepare_output"]

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
"""Sub-command modules, in help order."""

class QuantlabParser(argparse.ArgumentParser):
    """argparse with a one-line error (``quantlab CMD: error: ...``) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.BAD_INPUT, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def confidence_level(text: str) -> float:
    """argparse type: a confidence level strictly between 0 and 1 (e.g. 0.95)."""
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), e.g. 0.95; got {value}")
    return value


def probability_arg(text: str) -> float:
    """argparse type: a probability strictly between 0 and 1 (a decision threshold, e.g. 0.3)."""
    from ..schema import is_probability  # here: this module imports only the standard library at load

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a probability in (0, 1), e.g. 0.5; got {text!r}") from None
    if not is_probability(value):
        raise argparse.ArgumentTypeError(f"must be a probability in (0, 1), e.g. 0.5; got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def text_arg(text: str) -> str:
    """argparse type: a non-blank string (an unset CI variable must not silently switch a gate off)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (an unset variable?); give a value or leave the flag out")
    return text


def bind_arg(text: str) -> tuple[str, Any]:
    """argparse type: ``NAME=VALUE``, VALUE a JSON number, boolean or list (``sr=16000``,
    ``use_cache_branch=true``): an input the data always feeds that value, bound before control flow is resolved
    (``quantlab.load_model(bind=...)``)."""
    import json

    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, e.g. sr=16000; got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: {value!r} is not a number, true/false or a JSON list, e.g. "
                                         "sr=16000") from None
    if not isinstance(parsed, (int, float, list)):  # bool is an int: true/false bind a boolean input
        raise argparse.ArgumentTypeError(f"{name}: {value!r} is not a number, true/false or a JSON list, e.g. "
                                         "sr=16000")
    return name.strip(), parsed


def add_bind_option(p: argparse.ArgumentParser) -> None:
    """``--bind NAME=VALUE`` (repeatable) on every command that loads the model."""
    p.add_argument("--bind", action="append", type=bind_arg, default=None, metavar="NAME=VALUE",
                   help="an input the data always feeds this value (a voice model's sr=16000): it becomes a "
                        "constant before control flow is resolved, so the If it decides is inlined and its "
                        "branch calibrated and written; give the same --bind to every command (repeatable)")


def add_progress_option(p: argparse.ArgumentParser, *aliases: str) -> None:
    """``--no-progress`` (and ``aliases``, e.g. ``--quiet``) on every command that shows a progress bar:
    ``args.no_progress``."""
    p.add_argument("--no-progress", *aliases, dest="no_progress", action="store_true",
                   help="no progress bars (for logs and CI)")


def resolve_batch_size(args: argparse.Namespace, model: Any, dataset: Any, default: int, command: str,
                       warn_coupled: bool = True) -> int:
    """``--batch-size`` when given; else 1 for a model that fixes its batch at 1 (said on stderr), else
    ``default``. Sets ``args.batch_size`` so every later use (and the run's record) sees the same value.
    ``warn_coupled=False``: a larger batch of a model that couples its samples is left to the command's own
    warnings (compare's result carries it: said twice, it was)."""
    from ..backends.coupling import BatchCoupling, batch_coupling
    from ..data import check_inputs, fixed_batch

    if dataset is not None:  # data that does not fit is the one thing to say (the notes below read it as it comes)
        check_inputs(dataset, model)
    streams = getattr(dataset, "sequence_streams", None)
    if args.batch_size is None and streams is not None:  # interleaved streams: one sample of each per batch
        args.batch_size = streams
        print(f"quantlab {command}: note: the data interleaves {streams} streams ([sequence] streams): batch size "
              f"{streams}", file=sys.stderr, flush=True)
    fixed_size = fixed_batch(model, dataset) if dataset is not None else None
    fixed = fixed_size == 1
    if args.batch_size is None and fixed_size and fixed_size > 1:  # a static export at batch B: B per run
        args.batch_size = fixed_size
        print(f"quantlab {command}: note: {model.label} fixes its batch at {fixed_size}: batch size {fixed_size}",
              file=sys.stderr, flush=True)
    size = 1 if fixed else int(args.batch_size or default)
    decide = dataset is not None and (args.batch_size is None or warn_coupled)
    coupled = batch_coupling(model, dataset, size) if decide else BatchCoupling()
    if args.batch_size is None:
        args.batch_size = default
        if fixed:
            args.batch_size = 1
            print(f"quantlab {command}: note: {model.label} takes one sample per run (its batch fixed at 1, or no "
                  "input with a sample axis): running one sample at a time",
                  file=sys.stderr, flush=True)
        elif coupled:
            args.batch_size = 1
            print(f"quantlab {command}: note: {coupled.note(model.label, 1)}", file=sys.stderr, flush=True)
    elif coupled and int(args.batch_size) > 1 and warn_coupled:
        print(f"quantlab {command}: {coupled.note(model.label, int(args.batch_size))}", file=sys.stderr, flush=True)
    return int(args.batch_size)


def bound_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--bind`` values as ``load_model(bind=...)`` takes them."""
    return dict(getattr(args, "bind", None) or [])


def path_arg(text: str) -> Path:
    """argparse type: a non-blank path ("" would mean the current folder)."""
    return Path(text_arg(text))


def add_command(subparsers: Any, name: str, doc: str, summary: str) -> argparse.ArgumentParser:
    """The sub-command's parser: description = first paragraph of ``doc``, epilog = the rest + exit codes."""
    head, _, rest = doc.strip().partition("\n\n")
    epilog = f"{rest.strip()}\n\n{EXIT_CODES_HELP}" if rest.strip() else EXIT_CODES_HELP
    return subparsers.add_parser(name, help=summary, description=head, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def prepare_output(path: Path, owned: Iterable[str], *, command: str, flag: str = "--out",
                   inputs: Iterable[Path] = (), marker: str | None = None) -> None:
    """Before the long work: refuse an output that holds an input or foreign files, or cannot be written.

    ``owned`` are the glob patterns (relative to ``path``) of the files the
    command writes there; anything else is the user's and is never deleted.
    """
    from ..atomic import check_replaceable, check_writable
    from ..errors import OutputError

    label = f"{flag} {path}"
    resolved = path.resolve()
    for p in inputs:
        rp = p.resolve()
        if resolved == rp or resolved in rp.parents:
            raise OutputError(f"{label} holds the input {p}; it would be replaced. Choose another folder.")
    check_replaceable(path, owned, label=label, writer=command, marker=marker)
    check_writable(path, label=label)


def _selected(argv: Sequence[str]) -> str | None:
    """The sub-command named on the command line (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _parser(selected: str | None) -> tuple[argparse.ArgumentParser, dict[str, Any], Any]:
    """The top-level parser; only the selected command gets its full arguments (and their imports)."""
    from ..version import __version__

    parser = QuantlabParser(
        prog="quantlab",
        description="INT8 quantization and accuracy validation for ONNX models bound for TensorRT.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"quantlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, Any] = {}
    for name in COMMANDS:
        module = importlib.import_module(f".{name}", __name__)
        if name == selected:
            module.register(sub)
        else:
            sub.add_parser(name, help=module.HELP)
        modules[name] = module
    return parser, modules, sub


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``quantlab ARGS``; returns the exit code (the console script passes it to ``sys.exit``)."""
    previous = install_signal_handlers()
    command = ""
    try:
        set_activity("starting")
        args_list = list(sys.argv[1:] if argv is None else argv)
        selected = _selected(args_list)
        command = selected if selected in COMMANDS else ""
        set_activity("reading the command line")
        parser, modules, sub = _parser(selected)
        try:
            args, extra = parser.parse_known_args(args_list)
            if extra:  # reported by the sub-command's parser, so the line names the command
                sub.choices.get(args.command, parser).error(f"unrecognized arguments: {' '.join(extra)}")
        except SystemExit as exc:  # --help, --version, or a usage error already printed
            return ExitCode.OK if exc.code is None else exc.code if isinstance(exc.code, int) else ExitCode.BAD_INPUT
        if not args.command:
            parser.print_help(sys.stderr)
            return ExitCode.BAD_INPUT
        set_activity(f"running {command}")
        with warnings.catch_warnings():  # the library's warnings as one line, like the errors (restored after)
            warnings.showwarning = _warning_line(command)
            return int(modules[command].run(args))
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        hold_signals()  # a signal now would turn this one line into a traceback
        code, message = failure(exc, command)
        _flush_quietly()
        print(message, file=sys.stderr, flush=True)
        return code
    finally:
        restore_signal_handlers(previous)


def _warning_line(command: str) -> Any:
    """A ``warnings.showwarning`` that prints ``quantlab CMD: warning: MESSAGE``, without the source line."""

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        print(f"quantlab {command}: warning: {message}", file=file if file is not None else sys.stderr, flush=True)

    return show


def _flush_quietly() -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
