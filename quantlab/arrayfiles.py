"""Reading ``.npy`` / ``.npz`` files as untrusted data: checked before numpy allocates anything.

    file ──magic bytes──> header (shape, dtype) ──checks──> np.load (allow_pickle=False)
                                                  │
                   object dtype (a pickle)  ──────┤ refused: data is never unpickled
                   header bigger than the data ───┤ truncated or forged: refused
                   bigger than free memory ───────┘ refused, naming bytes and the fix

numpy's own reader trusts the header: an ``.npz`` member that declares a shape
of 10^12 values makes it allocate the whole array before reading a byte. Every
message names the file (and array) and says what is wrong with *that* kind of
file: a text file given as ``.npy`` is "not an .npy file", not "re-save it";
a file this user may not read is a PermissionError with the chmod fix
(:func:`quantlab.environment.unreadable`).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import IO

import numpy as np

from .environment import available_memory_bytes, format_bytes, shape_bytes, unreadable
from .errors import DataError

__all__ = ["npy_header", "npz_members", "load_npy", "load_npz"]

Header = tuple[tuple[int, ...], np.dtype]

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_ASK_MEMORY_FROM = 1 << 26
"""Arrays below 64 MiB are loaded without asking the kernel for free memory (one read of /proc per sample)."""


def _looks_like(head: bytes) -> str:
    """What the first bytes of a file say it is, for 'not an .npy file' messages."""
    if not head:
        return "it is empty"
    if head.startswith(_NPY_MAGIC):
        return "it is an .npy array: use kind = \"npy\""
    if head.startswith(_ZIP_MAGICS):
        return "it is a zip archive (an .npz?): use kind = \"npz\""
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "it holds binary data of another format"
    return "it holds text"


def _header_and_order(fp: IO[bytes]) -> tuple[Header, bool]:
    """((shape, dtype), fortran_order) from an .npy header at ``fp`` (ValueError when it is not one)."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return (tuple(int(d) for d in shape), np.dtype(dtype)), bool(fortran)


def _check_declared(where: str, header: Header, data_bytes: int, *, loads_whole: bool) -> None:
    """Refuse pickled arrays, headers that promise more data than the file holds, and arrays that cannot fit."""
    shape, dtype = header
    if dtype.hasobject:
        raise DataError(f"{where}: holds Python objects ({dtype}), which are stored as a pickle; quantlab never "
                        "unpickles data. Save numeric arrays instead (numpy.save / numpy.savez of a numeric dtype).")
    need = shape_bytes(shape, dtype.itemsize)
    if need > data_bytes:
        raise DataError(f"{where}: its header declares {dtype} {list(shape)} ({need} bytes) but only {data_bytes} "
                        "bytes of data follow: the file is truncated or corrupt. Re-save it (numpy.save / "
                        "numpy.savez) or remove it from the source.")
    available = available_memory_bytes() if loads_whole and need >= _ASK_MEMORY_FROM else None
    if available is not None and need > available:
        raise DataError(f"{where}: {dtype} {list(shape)} is {format_bytes(need)} ({need} bytes), more than the "
                        f"{format_bytes(available)} this machine has available. Refusing before loading it: split it "
                        "into smaller files, or save it as one .npy with batched = true (memory-mapped, read a row "
                        "at a time).")


def _checked_npy_header(path: Path, fp: IO[bytes]) -> tuple[Header, bool]:
    head = fp.read(len(_NPY_MAGIC))
    if head != _NPY_MAGIC:
        raise DataError(f"{path}: not an .npy file (no NumPy magic bytes at its start; {_looks_like(head)}). "
                        "Fix the source's path, pattern or kind, or convert the data with numpy.save.")
    fp.seek(0)
    try:
        header, fortran = _header_and_order(fp)
    except ValueError as exc:
        raise DataError(f"{path}: the .npy header is corrupt ({exc}). Re-save it with numpy.save.") from None
    _check_declared(str(path), header, os.fstat(fp.fileno()).st_size - fp.tell(), loads_whole=False)
    return header, fortran


def npy_header(path: Path) -> Header:
    """(shape, dtype) of an .npy file, read from its header; DataError when it is not a sound .npy file."""
    try:
        with open(path, "rb") as fp:
            return _checked_npy_header(path, fp)[0]
    except PermissionError as exc:
        raise unreadable(exc, "data file", path) from None


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except PermissionError as exc:
        raise unreadable(exc, "data file", path) from None
    except zipfile.BadZipFile:
        raise DataError(f"{path}: not an .npz file (not a zip archive; {_looks_like(_head(path))}). Fix the source's "
                        "path, pattern or kind, or write the data with numpy.savez.") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot open the .npz file ({exc.strerror or exc}).") from None


def _walk_npz(path: Path, *, read: bool) -> dict[str, Header | np.ndarray]:
    """Every .npy member's header (or, with ``read``, its array), each checked before its data is read."""
    out: dict[str, Header | np.ndarray] = {}
    with _open_zip(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[:-4]
            try:
                with zf.open(info) as fp:
                    header, fortran = _header_and_order(fp)
                    _check_declared(f"{path}: array {name!r}", header, info.file_size - fp.tell(), loads_whole=True)
                    out[name] = _read_data(fp, header, fortran) if read else header
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
                raise DataError(f"{path}: member {info.filename!r} is not a readable .npy array ({type(exc).__name__}: "
                                f"{exc}); the file is corrupt. Re-save it with numpy.savez.") from None
    return out


def _read_data(fp: IO[bytes], header: Header, fortran: bool) -> np.ndarray:
    """The array whose header was just read from ``fp`` (a writable array, exactly the declared bytes)."""
    shape, dtype = header
    buffer = bytearray(shape_bytes(shape, dtype.itemsize))
    if fp.readinto(buffer) != len(buffer):  # type: ignore[attr-defined]
        raise EOFError("the member ends before its declared data")
    flat = np.frombuffer(buffer, dtype=dtype)
    return flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)


def npz_members(path: Path) -> dict[str, Header]:
    """Shape and dtype of every array in an .npz, from the member headers (nothing decompressed in bulk)."""
    return _walk_npz(path, read=False)  # type: ignore[return-value]


def _head(path: Path) -> bytes:
    with open(path, "rb") as fp:
        return fp.read(16)


def load_npy(path: Path, *, mmap: bool) -> np.ndarray:
    """The array of an .npy file (memory-mapped when ``mmap``), its header checked first."""
    try:
        if mmap:
            npy_header(path)
            return np.load(path, mmap_mode="r", allow_pickle=False)
        with open(path, "rb") as fp:
            header, fortran = _checked_npy_header(path, fp)
            _check_declared(str(path), header, shape_bytes(header[0], header[1].itemsize), loads_whole=True)
            return _read_data(fp, header, fortran)
    except PermissionError as exc:
        raise unreadable(exc, "data file", path) from None
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: corrupt .npy file ({type(exc).__name__}: {exc}). Re-save it with numpy.save.") from None


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz, by name, each header checked before its data is read (one pass over the zip)."""
    return _walk_npz(path, read=True)  # type: ignore[return-value]
