"""What the machine lets a run do: how much memory it may still take, and which files it may read.

Both are facts about the environment, not about the input, so they are checked
up front with the numbers a user needs to act on:

* :func:`available_memory_bytes` is what a new allocation can get now: the
  kernel's ``MemAvailable`` (or free pages), capped by the cgroup limit a
  container runs under. Code that allocates arrays from shapes a model or a
  file *declares* (perf's random feeds, a batch, an ``.npz`` member) compares
  the bytes needed with it first and refuses, naming the tensor, shape and
  bytes, instead of asking numpy for 175 TiB.
* :func:`unreadable` turns a ``PermissionError`` into one that says which file
  could not be read and how to fix its permissions. It stays an ``OSError``
  (with ``filename`` set), because a permission problem is the environment's,
  not bad input: the CLI reports it as such, without a traceback.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["available_memory_bytes", "format_bytes", "shape_bytes", "unreadable"]

_CGROUP_V2 = Path("/sys/fs/cgroup")


def _meminfo_available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _sysconf_available() -> int | None:
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES")
        if pages <= 0:
            pages = os.sysconf("SC_PHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return int(pages) * int(size) if pages > 0 and size > 0 else None


def _cgroup_room(root: Path) -> int | None:
    """Bytes the cgroup (v2) still allows: memory.max - memory.current, or None without a limit."""
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        current = int((root / "memory.current").read_text().strip())
        return max(int(limit) - current, 0)
    except (OSError, ValueError):
        return None


def available_memory_bytes(*, meminfo: Path = Path("/proc/meminfo"), cgroup: Path = _CGROUP_V2) -> int | None:
    """Bytes a new allocation can get now (None when the platform does not say).

    ``MemAvailable`` counts page cache the kernel can drop, which ``free``
    pages alone do not; a container's cgroup limit can be lower than both.
    """
    found = [v for v in (_meminfo_available(meminfo) or _sysconf_available(), _cgroup_room(cgroup)) if v is not None]
    return min(found) if found else None


def format_bytes(n: float) -> str:
    """``175.9 TiB``, ``512 B``: binary units, as numpy's allocation errors print them."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        n /= 1024.0
        if n < 1024 or unit == "EiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def shape_bytes(shape: Iterable[int], itemsize: int) -> int:
    """Exact bytes of an array of ``shape`` (Python integers: no overflow for absurd dims)."""
    return math.prod(int(d) for d in shape) * int(itemsize)


def unreadable(exc: OSError, what: str, path: str | os.PathLike[str] | None = None) -> PermissionError:
    """A PermissionError naming ``what`` (e.g. "model", "manifest", "data file") and how to make it readable.

    The path in ``exc.filename`` wins over ``path``: it can be a parent folder
    that cannot be entered rather than the file itself.
    """
    target = str(exc.filename if exc.filename else path)
    fix = f"chmod a+rx {target}" if os.path.isdir(target) else f"chmod a+r {target}"
    message = (f"cannot read {what} {target}: permission denied. Make it readable by this user "
               f"(e.g. `{fix}`, or ask its owner), then run again")
    return PermissionError(errno.EACCES, message, target)
