"""Atomic writes: a reader (or a crash) never sees a half-written output.

Every file quantlab writes goes to a temporary file in the destination folder
and is renamed over the target once complete; a whole output folder is built
in a temporary sibling folder and renamed into place.

Temporary names say whose they are: ``.NAME.<pid>.<token>.tmp`` (and
``.NAME.<pid>.<token>.old`` for a folder being replaced), where ``pid`` is the
writing process. An exception (including the ``KeyboardInterrupt`` the
command line raises on SIGINT/SIGTERM) removes them on the way out; a process
killed outright cannot, so every later write into the same folder sweeps the
temporary entries whose process is gone (:func:`sweep_stale`). Only names of
exactly that form are touched.

Replacing a folder deletes what was in it, so commands say which files they
own (glob patterns relative to the folder) and :func:`check_replaceable`
refuses a folder holding anything else: quantlab never deletes what it did not
write.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import OutputError, ResourceError

__all__ = [
    "write_bytes",
    "write_text",
    "write_json",
    "atomic_path",
    "atomic_dir",
    "json_dumps",
    "json_default",
    "TEMP_NAME",
    "sweep_stale",
    "writes_in_progress",
    "foreign_files",
    "check_replaceable",
    "check_writable",
    "remove_empty_folders",
]

TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)\.(?P<token>[a-z0-9_]{8})\.(?:tmp|old)$")
"""A quantlab temporary entry: ``.NAME.<pid>.<8-char token>.tmp`` or ``.old``."""

_TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"

_active: list[Path] = []
"""Targets being written right now (innermost last), for the interruption message."""


def writes_in_progress() -> tuple[Path, ...]:
    """The targets of the atomic writes currently open in this process, outermost first."""
    return tuple(_active)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: Path, *, folder: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700; give outputs the mode a plain open()/mkdir() would."""
    with contextlib.suppress(OSError):
        os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _prefix(name: str) -> str:
    return f".{name}.{os.getpid()}."


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's) or unknowable: leave it alone
    return True


def sweep_stale(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove quantlab temporary entries in ``folder`` whose writing process no longer runs.

    Only names matching :data:`TEMP_NAME` are considered; entries of running
    processes (this one included) are kept. Failures are ignored: a sweep is
    housekeeping and must never fail the write that triggered it.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = TEMP_NAME.match(entry.name)
        if match is None or _process_alive(int(match["pid"])):
            continue
        path = Path(entry.path)
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def json_dumps(obj: Any) -> str:
    """Deterministic JSON (sorted keys, fixed indent) so equal inputs give equal bytes."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=True, default=json_default) + "\n"


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars/arrays, paths, sets and pandas' missing values."""
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if type(obj).__name__ in ("NAType", "NaTType"):  # pandas.NA / pandas.NaT, without importing pandas
        return None
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    On an exception the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    created = _missing_parents(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(target.name), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    _active.append(target)
    try:
        yield tmp_path
        if tmp_path.exists():
            _usual_mode(tmp_path, folder=False)
        os.replace(tmp_path, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        for folder in created:  # innermost first: only the folders this write made, and only if empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        _name_the_target(exc, target, tmp_path)
        raise
    finally:
        _active.remove(target)


def _missing_parents(target: Path) -> list[Path]:
    """The parent folders of ``target`` that do not exist yet, innermost first."""
    missing = []
    for parent in target.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def _name_the_target(exc: BaseException, target: Path, tmp: Path) -> None:
    """Make an OSError name the output the user asked for, not quantlab's temporary path.

    No file name (zipfile, pandas, pyarrow writers): the target being written.
    A path inside the temporary file or folder: the same path inside the target.
    """
    if not isinstance(exc, OSError):
        return
    name = exc.filename
    if name is None:
        exc.filename = str(target)
        return
    with contextlib.suppress(TypeError, ValueError):
        rel = Path(os.fsdecode(name)).relative_to(tmp)
        exc.filename = str(target if rel == Path(".") else target / rel)


def write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike[str], text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike[str], obj: Any) -> Path:
    return write_text(target, json_dumps(obj))


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], *, owned: Iterable[str] | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; on success it replaces ``target``.

    An existing ``target`` is removed only after the new folder is complete, so a
    failed run leaves the previous result (or nothing) in place, never a mix.
    With ``owned`` (glob patterns of the files the writer owns, relative to
    ``target``), a ``target`` holding anything else is refused before it is touched.
    """
    target = Path(target)
    patterns = None if owned is None else tuple(owned)
    if patterns is not None:
        check_replaceable(target, patterns)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(target.name), suffix=".tmp", dir=target.parent))
    _active.append(target)
    try:
        yield tmp
        _usual_mode(tmp, folder=True)
        if patterns is not None:
            check_replaceable(target, patterns)
        _replace_dir(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _name_the_target(exc, target, tmp)
        raise
    finally:
        _active.remove(target)


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` onto ``target``; an existing ``target`` goes aside as ``.NAME.<pid>.<token>.old`` first."""
    if not target.exists():
        os.replace(new, target)
        return
    token = "".join(secrets.choice(_TOKEN_CHARS) for _ in range(8))
    old = target.with_name(f"{_prefix(target.name)}{token}.old")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_empty_folders(root: str | os.PathLike[str]) -> None:
    """Remove ``root`` and the folders below it that hold no file (after a failed run created them).

    Never removes a file; a folder holding one (at any depth) stays, with its parents.
    """
    for dirpath, _dirnames, _filenames in os.walk(root, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)  # fails (and is skipped) unless empty


def foreign_files(folder: str | os.PathLike[str], owned: Iterable[str]) -> list[str]:
    """Files (and symlinks) under ``folder`` matching none of the ``owned`` glob patterns.

    Paths are relative with '/' separators; in a pattern ``*`` also matches '/',
    so ``"stages/*"`` owns everything below ``stages``. quantlab's own temporary
    entries (:data:`TEMP_NAME`) are never foreign. Empty folders are not listed.
    """
    root = Path(folder)
    patterns = tuple(owned)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not TEMP_NAME.match(d)]
        links = [d for d in dirnames if (here / d).is_symlink()]
        dirnames[:] = [d for d in dirnames if d not in links]
        for name in [*filenames, *links]:
            if TEMP_NAME.match(name):
                continue
            rel = (here / name).relative_to(root).as_posix()
            if not any(fnmatch.fnmatchcase(rel, p) for p in patterns):
                found.append(rel)
    return sorted(found)


def check_replaceable(folder: str | os.PathLike[str], owned: Iterable[str], *, label: str | None = None,
                      writer: str = "quantlab", marker: str | None = None) -> None:
    """Raise :class:`OutputError` unless ``folder`` is absent, or a folder holding only ``owned`` files.

    ``label`` names the folder in the message (e.g. ``"--out runs/calib"``), ``writer`` what owns it
    (e.g. ``"calibrate"``). With ``marker`` (a file the writer always writes first, e.g. a run's
    manifest.json), a non-empty folder without it is someone else's even when its file names match
    (a website's index.html is not a report's).
    """
    path = Path(folder)
    name = label or str(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise OutputError(f"{name} is a file, not a folder; give a new folder (or the folder of an earlier run)")
    try:
        foreign = foreign_files(path, owned)
    except OSError as exc:
        raise ResourceError(f"{name}: cannot list the folder ({exc.strerror}); check its permissions") from exc
    if marker is not None and not foreign and not (path / marker).exists() and any(path.iterdir()):
        foreign = sorted(p.name for p in path.iterdir())
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(
            f"{name} holds files that are not a previous {writer} output ({shown}); quantlab did not write them "
            "and replacing the folder would delete them. Give a new or empty folder, or move those files out."
        )


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(target: str | os.PathLike[str], *, label: str | None = None) -> None:
    """Raise unless quantlab can create its temporary files for ``target`` (before any long work).

    Probes, by creating and removing a temporary file, the folder that will
    receive ``target``'s temporary sibling (the nearest existing ancestor when
    it does not exist yet) and ``target`` itself when it is an existing folder.
    Also sweeps stale temporary entries there. :class:`ResourceError` (exit 3)
    when the file system refuses; :class:`OutputError` when a path component is a file.
    """
    path = Path(target)
    name = label or str(path)
    places = [_nearest_existing(path.parent)]
    if path.is_dir():
        places.append(path)
    for place in places:
        if not place.is_dir():
            raise OutputError(f"{name}: {place} is a file, not a folder; choose an output path under a folder")
        sweep_stale(place)
        try:
            fd, probe = tempfile.mkstemp(prefix=_prefix("quantlab-probe"), suffix=".tmp", dir=place)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ResourceError(f"{name}: cannot write into {place} ({os.strerror(exc.errno or errno.EIO)}); "
                                f"{_advice(exc)}") from exc


def _advice(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space on that disk or choose a folder on another one"
    if exc.errno == errno.EROFS:
        return "the file system is read-only: choose a folder on a writable disk"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "choose a folder you may write to, or fix its owner/permissions"
    return "choose another folder"
