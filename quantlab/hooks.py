"""User hooks given as ``module:function`` (preprocessing in manifests, ``compare --metric``).

A hook is code the user wrote on purpose: it is imported, never ``eval``-ed,
and only from where the user pointed (a ``.py`` path, a ``module.py`` in the
folder the spec is relative to, or an importable module).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .environment import unreadable
from .errors import QuantlabError

__all__ = ["load_hook"]


def _import_file(path: Path, prefix: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"{prefix}_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_hook(spec: str, base: Path, error: type[QuantlabError], where: str, hint: str) -> Callable[..., Any]:
    """The function ``spec`` names: ``path/to/file.py:function``, ``module:function`` with ``module.py``
    in ``base``, or an importable ``module:function``. Every failure raises ``error`` starting with ``where``;
    ``hint`` says how to make the module importable."""
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name:
        raise error(f"{where}: {spec!r} is not 'module:function' or 'file.py:function'")
    try:
        if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
            path = Path(module_name) if Path(module_name).is_absolute() else base / module_name
            if not path.is_file():
                raise error(f"{where}: no such file {path}")
            module = _import_file(path, "quantlab_hook")
        elif (base / (module_name.replace(".", "/") + ".py")).is_file():
            module = _import_file(base / (module_name.replace(".", "/") + ".py"), "quantlab_hook")
        else:
            module = importlib.import_module(module_name)
    except QuantlabError:
        raise
    except PermissionError as exc:  # the module, or a file it reads on import: the environment's problem
        raise unreadable(exc, f"{where}: hook {spec!r} needs", base / module_name) from None
    except ImportError as exc:
        raise error(f"{where}: cannot import module {module_name!r} ({exc}). {hint}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise error(f"{where}: importing {module_name!r} raised {type(exc).__name__}: {exc}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise error(f"{where}: module {module_name!r} has no function {func_name!r}.")
    return func
