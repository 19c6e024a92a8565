"""Package namespaces that import their submodules on first use (PEP 562).

The ``quantlab`` command reads option defaults from light modules (``compare.options``,
``search.options``, ...) at start-up; importing those runs their package's
``__init__``, which must therefore not import the heavy submodules (ONNX Runtime,
pandas, numba, onnx). A package lists its public names and the submodule each lives
in; the first access imports that submodule.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose public ``exports`` map a name to its submodule."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace = importlib.import_module(package).__dict__
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(importlib.import_module(package).__dict__) | set(exports))

    return __getattr__, __dir__
