"""Building an engine: ONNX -> strongly typed network -> serialized engine (no GPU needed).

    ONNX --OnnxParser--> network (STRONGLY_TYPED: the Q/DQ nodes and casts decide every type)
           | mark_outputs: intermediate tensors asked for become engine outputs
           | profiles:     (min, opt, max) per dynamic input, from the data's shapes
           | config:       workspace limit, optimisation profile, timing cache (TensorRT only)
           v
    builder.build_serialized_network --> engine bytes (+ the settings that went into the cache key)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from ...atomic import write_bytes
from ...errors import BackendError, BackendUnavailableError, InputMismatchError
from ...graph import serialize
from .diagnostics import parse_error, parser_issues

DEFAULT_WORKSPACE_BYTES = 1 << 30
"""Builder workspace pool limit (bytes): 1 GiB, TensorRT's usual default order of magnitude."""

DEFAULT_DYNAMIC_DIM = (1, 1, 32)
"""(min, opt, max) for a dynamic dimension the data does not fix: batch 1 latency, up to 32."""


def profile_shapes(
    name: str, network_shape: Sequence[int], data_shape: Sequence[int] | None
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes for one input with dynamic dims (-1).

    A dynamic dim the data fixes to ``d`` gets ``(1, d, d)``: the data's own
    shape is the one to optimise for, smaller (e.g. a last partial batch) still
    runs. A dynamic dim without data gets :data:`DEFAULT_DYNAMIC_DIM`.
    """
    net = [int(d) for d in network_shape]
    if data_shape is not None:
        data = [int(d) for d in data_shape]
        if len(data) != len(net):
            raise InputMismatchError(
                f"input {name!r}: the data has rank {len(data)} (shape {tuple(data)}) but the "
                f"model expects rank {len(net)} (shape {tuple(net)}, -1 = dynamic)"
            )
        for axis, (n, d) in enumerate(zip(net, data, strict=True)):
            if n >= 0 and n != d:
                raise InputMismatchError(
                    f"input {name!r}: the data has {d} at axis {axis} but the model fixes it to {n}"
                )
    lo, opt, hi = [], [], []
    for axis, n in enumerate(net):
        if n >= 0:
            lo.append(n), opt.append(n), hi.append(n)
        elif data_shape is not None:
            d = int(data_shape[axis])
            lo.append(1), opt.append(d), hi.append(d)
        else:
            lo.append(DEFAULT_DYNAMIC_DIM[0]), opt.append(DEFAULT_DYNAMIC_DIM[1]), hi.append(DEFAULT_DYNAMIC_DIM[2])
    return tuple(lo), tuple(opt), tuple(hi)


class EngineBuilder:
    """Parses and builds for one flavor with fixed settings; owns the TensorRT logger's messages.

    ``timing_cache`` is a file the TensorRT builder loads and updates (TensorRT-RTX ignores
    timing caches since 1.2, so it is neither read nor written there).
    """

    def __init__(self, trt: ModuleType, *, flavor: str, library: str, workspace_bytes: int,
                 timing_cache: Path | None, logger: Any) -> None:
        self._trt = trt
        self.flavor = flavor
        self.library = library
        self.workspace_bytes = workspace_bytes
        self.timing_cache = timing_cache
        self._logger = logger

    @property
    def version(self) -> str:
        return str(getattr(self._trt, "__version__", "unknown"))

    @property
    def is_rtx(self) -> bool:
        return self.flavor == "tensorrt-rtx"

    def network_flags(self) -> int:
        flag = getattr(self._trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if flag is None:
            raise BackendUnavailableError(
                f"{self.library} {self.version} has no strongly typed networks; quantlab needs "
                "TensorRT >= 10 (explicit Q/DQ precision). Upgrade: pip install -U 'quantlab[tensorrt]'"
            )
        return 1 << int(flag)

    def settings(self, outputs: Sequence[str], profiles: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "flavor": self.flavor,
            "outputs": list(outputs),
            "profiles": {k: [list(s) for s in v] for k, v in sorted(profiles.items())},
            "workspace_bytes": self.workspace_bytes,
            "strongly_typed": True,
        }

    def parse(self, model: onnx.ModelProto, label: str) -> tuple[Any, Any, Any]:
        trt = self._trt
        self._logger.clear()
        builder = trt.Builder(self._logger)
        network = builder.create_network(self.network_flags())
        parser = trt.OnnxParser(network, self._logger)
        ok = parser.parse(serialize(model))
        issues = parser_issues(parser)
        if not ok or issues:
            raise parse_error(self.library, self.version, label, issues)
        return builder, network, parser

    def mark_outputs(self, network: Any, names: Sequence[str], label: str) -> None:
        """Expose intermediate tensors: mark them as network outputs (types stay as the graph says)."""
        if not names:
            return
        existing = {network.get_output(i).name for i in range(network.num_outputs)}
        tensors: dict[str, Any] = {}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            for j in range(layer.num_outputs):
                t = layer.get_output(j)
                tensors.setdefault(t.name, t)
        for name in names:
            if name in existing:
                continue
            if name not in tensors:
                raise BackendError(
                    f"{label}: tensor {name!r} does not exist in the {self.library} network "
                    "(it is not an activation of the ONNX graph, or the parser folded it into a "
                    "constant); ask for an activation produced by a node."
                )
            network.mark_output(tensors[name])
            existing.add(name)

    def profiles(
        self, network: Any, profiles_from: Mapping[str, Sequence[int]] | None
    ) -> dict[str, tuple[tuple[int, ...], ...]]:
        shapes = dict(profiles_from or {})
        inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
        unknown = sorted(set(shapes) - set(inputs))
        if unknown:
            raise InputMismatchError(
                f"profiles_from names {', '.join(map(repr, unknown))}, which are not inputs of the "
                f"model; its inputs are {', '.join(map(repr, inputs))}"
            )
        return {name: profile_shapes(name, shape, shapes.get(name))
                for name, shape in inputs.items() if any(d < 0 for d in shape)}

    def config(self, builder: Any, profiles: Mapping[str, tuple[tuple[int, ...], ...]]) -> tuple[Any, Any]:
        trt = self._trt
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        if profiles:
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in profiles.items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)
        timing = None
        if self.timing_cache is not None and not self.is_rtx:
            blob = self.timing_cache.read_bytes() if self.timing_cache.is_file() else b""
            timing = config.create_timing_cache(blob)
            # ignore_mismatch=False: a cache from another GPU or version is refused, not misused.
            if not config.set_timing_cache(timing, ignore_mismatch=False):
                timing = config.create_timing_cache(b"")
                config.set_timing_cache(timing, ignore_mismatch=False)
        return config, timing

    def save_timing_cache(self, config: Any) -> None:
        if self.timing_cache is None or self.is_rtx:
            return
        cache = config.get_timing_cache()
        if cache is not None:
            write_bytes(self.timing_cache, bytes(cache.serialize()))

    def build(
        self,
        model: onnx.ModelProto,
        *,
        profiles_from: Mapping[str, Sequence[int]] | None,
        outputs: Sequence[str] | None,
        label: str,
    ) -> tuple[bytes, dict[str, Any]]:
        builder, network, _parser = self.parse(model, label)  # parser must outlive the build
        self.mark_outputs(network, list(outputs or []), label)
        profiles = self.profiles(network, profiles_from)
        config, _timing = self.config(builder, profiles)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            errors = "\n  ".join(self._logger.errors()) or "(no error was logged)"
            raise BackendError(
                f"{self.library} {self.version} failed to build an engine for {label}:\n  {errors}"
            )
        self.save_timing_cache(config)
        return bytes(serialized), self.settings(list(outputs or []), profiles)


    def settings_for(
        self, model: onnx.ModelProto, outputs: Sequence[str], profiles_from: Mapping[str, Sequence[int]] | None
    ) -> dict[str, Any]:
        """Build settings computed from the ONNX inputs alone (no parse), for the cache key."""
        inits = {i.name for i in model.graph.initializer}
        profiles = {}
        for inp in model.graph.input:
            if inp.name in inits:
                continue
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim]
            if any(d < 0 for d in dims):
                profiles[inp.name] = profile_shapes(inp.name, dims, (profiles_from or {}).get(inp.name))
        return self.settings(list(outputs), profiles)
