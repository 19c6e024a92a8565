"""Which TensorRT: the two flavors, their Python modules and pip extras, imported only when asked for."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

from ...errors import BackendUnavailableError

Flavor = Literal["tensorrt", "tensorrt-rtx"]

NOT_PORTABLE = (
    "TensorRT engines are not portable across GPUs (compute capability) or TensorRT versions"
)


@dataclass(frozen=True)
class FlavorSpec:
    """A flavor's Python module, its library name, the quantlab extra and the distribution that ship it."""

    module: str
    library: str
    extra: str
    distribution: str


FLAVORS: dict[str, FlavorSpec] = {
    "tensorrt": FlavorSpec("tensorrt", "tensorrt", "tensorrt", "tensorrt"),
    "tensorrt-rtx": FlavorSpec(
        "tensorrt_rtx_bindings", "tensorrt_rtx", "tensorrt-rtx", "tensorrt-rtx-cu13-bindings"
    ),
}


def import_flavor(flavor: str) -> tuple[FlavorSpec, ModuleType]:
    """The flavor's spec and its module; BackendUnavailableError naming the extra to install."""
    if flavor not in FLAVORS:
        raise BackendUnavailableError(
            f"unknown TensorRT flavor {flavor!r}; choose one of {', '.join(FLAVORS)}"
        )
    spec = FLAVORS[flavor]
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the {flavor} backend needs the Python module {spec.module!r}, which is not "
            f"installed ({exc}). Install it with: pip install 'quantlab[{spec.extra}]'"
        ) from None
    return spec, module
