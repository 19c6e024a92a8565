"""Exit codes, the one-line error messages, and SIGINT/SIGTERM handling of the ``quantlab`` command.

Every failure ends as one line ``quantlab CMD: error: ...`` on stderr and one of
the :class:`ExitCode` values, so CI can tell a verdict (1) from a bad input (2)
from a machine problem (3) from an interruption (130/143).

Signals: :func:`install_signal_handlers` makes SIGINT and SIGTERM raise
:class:`Interrupted` in the main thread. It is a ``KeyboardInterrupt``, so it
unwinds through ``with atomic_path/atomic_dir`` blocks (their temporary files
are removed) and through ``except Exception`` clauses untouched. Further
signals are ignored while the first one unwinds, so the clean-up is not cut
short. Standard library only: this runs before any heavy import.

Two places must not see the exception, so the signal waits there (SIGALRM
delivers it again every 2 ms until the main thread is elsewhere):

- importlib's own frames. A signal during start-up imports may land in the
  weakref callback of a module lock, between taking the global import lock
  and the ``try`` that releases it: raised there, the lock stays held and the
  next import waits forever (seen in the SIGTERM-during-imports test).
- finalizers and weakref callbacks in general: Python prints "Exception
  ignored" and drops the exception, and the signals are held by then, so the
  run would go on. ``sys.unraisablehook`` catches the dropped
  :class:`Interrupted` and delivers it again.
"""

from __future__ import annotations

import enum
import errno
import signal
import sys
import threading
import traceback
from types import FrameType
from typing import Any

__all__ = ["ExitCode", "EXIT_CODES_HELP", "Interrupted", "install_signal_handlers", "restore_signal_handlers",
           "hold_signals", "set_activity", "failure"]


class ExitCode(enum.IntEnum):
    """What a ``quantlab`` exit status means (documented in README "Exit codes" and every --help)."""

    OK = 0
    VERDICT = 1        # the gate / threshold is not met: the run worked, the answer is "no"
    BAD_INPUT = 2      # bad input or usage (and bugs: see README); fix the command or its files
    ENVIRONMENT = 3    # disk full, permission, read-only, out of memory, missing backend, other OS errors
    SIGINT = 130       # interrupted by SIGINT (Ctrl-C); 128 + 2
    SIGTERM = 143      # interrupted by SIGTERM; 128 + 15


EXIT_CODES_HELP = """exit codes:
  0    done (and the gate / threshold, if any, is met)
  1    verdict: the gate or threshold is not met (compare --fail-if, search --threshold,
       run --fail-on-verdict)
  2    bad input or usage: a file, flag or value to fix (also a failed sweep cell, and an
       internal error, with a traceback)
  3    environment: disk full, permission denied, read-only folder, out of memory, missing
       backend or another operating-system error
  130  interrupted by SIGINT (Ctrl-C); 143 interrupted by SIGTERM. Nothing half-written is left."""

ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOMEM,
                                errno.EIO, errno.EMFILE, errno.ENFILE})
"""OS errors that say the machine (not the input) is at fault, also when a library error wraps them."""

_activity = ["starting"]


def set_activity(text: str) -> None:
    """What the command is doing, for the interruption message ("while <text>")."""
    _activity[0] = text


class Interrupted(KeyboardInterrupt):
    """Raised by the SIGINT/SIGTERM handler; carries the signal and what was being written."""

    def __init__(self, signum: int, writing: tuple[Any, ...] = ()) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.writing = writing


def hold_signals() -> None:
    """Ignore SIGINT/SIGTERM from now on (main thread only): the run is ending, let it end cleanly."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


_RETRY_SECONDS = 0.002
"""How soon a signal that landed where it must not raise is delivered again (see the module docstring)."""

_pending: list[int] = []
"""The signal waiting for the main thread to leave importlib's frames (at most one)."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _in_import_machinery(frame):
        _deliver_later(signum)
        return
    _interrupt(signum)


def _interrupt(signum: int) -> None:
    hold_signals()  # one interruption: let the clean-up finish
    _pending.clear()
    atomic = sys.modules.get("quantlab.atomic")
    writing = atomic.writes_in_progress() if atomic is not None else ()
    raise Interrupted(signum, writing)


def _in_import_machinery(frame: FrameType | None) -> bool:
    """True in importlib's frozen bootstrap code (module locks, finders, loaders), not in a module's own body."""
    return frame is not None and frame.f_code.co_filename.startswith("<frozen importlib")


def _deliver_later(signum: int) -> None:
    if not _pending:
        _pending.append(signum)
    signal.signal(signal.SIGALRM, _on_retry)
    signal.setitimer(signal.ITIMER_REAL, _RETRY_SECONDS)


def _on_retry(_alarm: int, frame: FrameType | None) -> None:
    if not _pending:
        return
    if _in_import_machinery(frame):
        signal.setitimer(signal.ITIMER_REAL, _RETRY_SECONDS)
        return
    _interrupt(_pending[0])


def _on_unraisable(unraisable: Any) -> None:
    """An :class:`Interrupted` dropped by a finalizer or weakref callback is delivered again; the rest as before."""
    if isinstance(unraisable.exc_value, Interrupted):
        _deliver_later(unraisable.exc_value.signum)
        return
    _unraisable_hooks[-1](unraisable)


_unraisable_hooks: list[Any] = [sys.unraisablehook]
"""The hook :func:`_on_unraisable` passes everything else to (the one it replaced)."""

Handlers = dict[int, Any]
_UNRAISABLE = -1
"""The key under which :data:`Handlers` keeps the replaced ``sys.unraisablehook``."""


def install_signal_handlers() -> Handlers:
    """Route SIGINT and SIGTERM to :class:`Interrupted`; returns the previous handlers (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: Handlers = {signal.SIGALRM: signal.getsignal(signal.SIGALRM)}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, _on_signal)
    previous[_UNRAISABLE] = sys.unraisablehook
    if sys.unraisablehook is not _on_unraisable:
        _unraisable_hooks[-1] = sys.unraisablehook
        sys.unraisablehook = _on_unraisable
    return previous


def restore_signal_handlers(previous: Handlers) -> None:
    """Put back what :func:`install_signal_handlers` replaced (for in-process callers such as tests)."""
    if _pending:  # a retry still armed: cancel it
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        _pending.clear()
    for sig, handler in previous.items():
        if sig == _UNRAISABLE:
            sys.unraisablehook = handler
        else:
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _os_error_text(exc: OSError) -> str:
    what = exc.strerror or str(exc)
    where = f"{exc.filename}: " if exc.filename else ""
    if exc.filename2:
        where = f"{exc.filename} -> {exc.filename2}: "
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = "the disk is full: free space on it, or write to a folder on another disk (--out)"
    elif exc.errno == errno.EROFS:
        todo = "the file system is read-only: write to a folder on a writable disk (--out)"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        todo = "permission denied: fix the owner/permissions of that path, or use a path you may read/write"
    elif exc.errno == errno.ENOENT:
        todo = "check that the path exists"
    else:
        todo = "check that path and the machine, then rerun"
    return f"{where}{what}; {todo}"


def _environment_cause(exc: BaseException) -> BaseException | None:
    """The OSError/MemoryError a library error was raised while handling, if it is the machine's fault."""
    seen = exc.__cause__ or exc.__context__
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:  # a chain may loop (`raise e from e`)
        visited.add(id(seen))
        if isinstance(seen, MemoryError) or (isinstance(seen, OSError) and seen.errno in ENVIRONMENT_ERRNOS):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def one_line(text: str) -> str:
    """``text`` on one line: messages quoting ONNX / ONNX Runtime / TOML examples may hold newlines."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def failure(exc: BaseException, command: str) -> tuple[ExitCode, str]:
    """The exit code and the one stderr line for ``exc`` ending ``quantlab command``.

    Unexpected exceptions (bugs) print their traceback first and exit 2.
    """
    code, message = _classify(exc, command)
    return code, one_line(message)


def _classify(exc: BaseException, command: str) -> tuple[ExitCode, str]:
    from ..errors import QuantlabError, ResourceError

    prefix = f"quantlab {command}" if command else "quantlab"
    if isinstance(exc, KeyboardInterrupt):
        signum = getattr(exc, "signum", signal.SIGINT)
        writing = getattr(exc, "writing", ())
        what = f"writing {writing[-1]}" if writing else _activity[0]
        code = ExitCode.SIGTERM if signum == signal.SIGTERM else ExitCode.SIGINT
        return code, (f"{prefix}: interrupted ({signal.Signals(signum).name}) while {what}; "
                      "nothing half-written was left")
    if isinstance(exc, QuantlabError):
        code = ExitCode.ENVIRONMENT if isinstance(exc, ResourceError) or _environment_cause(exc) else ExitCode.BAD_INPUT
        return code, f"{prefix}: error: {exc}"
    if isinstance(exc, MemoryError):
        detail = f" ({exc})" if str(exc) else ""
        return ExitCode.ENVIRONMENT, (f"{prefix}: error: out of memory while {_activity[0]}{detail}; use a smaller "
                                      "--batch-size or fewer samples, or a machine with more memory")
    if isinstance(exc, OSError):
        return ExitCode.ENVIRONMENT, f"{prefix}: error: {_os_error_text(exc)}"
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    return ExitCode.BAD_INPUT, (f"{prefix}: error: internal error ({type(exc).__name__}: {exc}); this is a bug in "
                                "quantlab (it may have been triggered by an unusual input): please report it with "
                                "the command line and the traceback above")

