"""Hashes and versions that every output records, so a result can be reproduced."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
from pathlib import Path

import numpy as np

__all__ = ["sha256_file", "sha256_bytes", "ArrayHasher", "tool_versions", "short_hash"]

_TRACKED_PACKAGES = (
    "quantlab",
    "numpy",
    "onnx",
    "onnxruntime",
    "numba",
    "pandas",
    "tensorrt",
    "tensorrt-rtx-cu13-bindings",
)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def short_hash(hexdigest: str) -> str:
    return hexdigest[:12]


class ArrayHasher:
    """Incremental content hash of a sequence of named arrays (dtype, shape and bytes).

    Used to fingerprint the samples a run actually consumed, in order, without
    keeping them.
    """

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, name: str, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        self._h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        self._h.update(a.data if a.size else b"")  # the array's own buffer: the bytes of tobytes(), not a copy

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def tool_versions() -> dict[str, str]:
    """Versions of Python, the platform and every package that can change a result, and the hash of quantlab's
    own source (a checkout between releases keeps one version number: the hash tells its outputs apart, and
    ``quantlab run`` does not reuse a stage an edited quantlab made)."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in _TRACKED_PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    versions["quantlab-source"] = source_hash()
    return versions


@functools.cache
def source_hash() -> str:
    """sha256 (first 16 hex digits) of the package's ``.py`` files: their paths below the package and bytes."""
    h = hashlib.sha256()
    root = package_root()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def package_root() -> Path:
    return Path(__file__).resolve().parent
