"""Building an engine: ONNX -> strongly typed network -> serialized engine (no GPU needed).

    ONNX --OnnxParser--> network (STRONGLY_TYPED: the Q/DQ nodes and casts decide every type)
           | mark_outputs: intermediate tensors asked for become engine outputs
           | profiles:     (min, opt, max) per dynamic input, from the data's shapes
           | config:       workspace limit, optimisation profile, timing cache (TensorRT only)
           v
    builder.build_serialized_network --> engine bytes (+ the settings that went into the cache key)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from ...atomic import write_bytes
from ...errors import BackendError, BackendUnavailableError, InputMismatchError
from ...graph import serialize
from ...shapes import BATCH_AXIS, ShapeRange, check_range_fits, range_from_shapes
from .diagnostics import build_error_hint, is_profile_error, parse_error, parser_issues
from .monitor import make_monitor

DEFAULT_WORKSPACE_BYTES = 1 << 30
"""Builder workspace pool limit (bytes): 1 GiB, TensorRT's usual default order of magnitude."""

DEFAULT_DYNAMIC_DIM = (1, 1, 32)
"""(min, opt, max) for a dynamic dimension neither the data nor ``--shapes`` fixes: a guess.

A build that fails with such a guess says which input and axis got it and what to
write (``--shapes``), since e.g. a width of 1 can make a reshape impossible."""

Profile = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def onnx_input_name(network_name: str, output_names: Collection[str]) -> str:
    """The ONNX name of a network (or engine) input. TensorRT's parser renames a graph input that is also a graph
    output (an input passed through) to ``"__" + name`` and gives the output the name: profiles, feeds and
    records use the ONNX name."""
    if network_name.startswith("__") and network_name[2:] in output_names:
        return network_name[2:]
    return network_name


def profile_shapes(name: str, network_shape: Sequence[int], data_shape: Sequence[int] | None) -> Profile:
    """(min, opt, max) shapes for one input with dynamic dims (-1), from one data shape.

    A dynamic dim the data fixes to ``d`` gets ``(d, d, d)``, except the batch axis
    (axis 0), which gets ``(1, d, d)``: a last partial batch still runs. A dynamic dim
    without data gets :data:`DEFAULT_DYNAMIC_DIM`.
    """
    net = [int(d) for d in network_shape]
    if data_shape is not None:
        data = tuple(int(d) for d in data_shape)
        check_range_fits(ShapeRange(name, data, data, data), net)
        return range_from_shapes(name, net, {data: 1}, BATCH_AXIS).as_tuple()
    lo, opt, hi = DEFAULT_DYNAMIC_DIM
    return (tuple(lo if n < 0 else n for n in net), tuple(opt if n < 0 else n for n in net),
            tuple(hi if n < 0 else n for n in net))


def _input_indices(network: Any) -> dict[str, int]:
    """ONNX input name (:func:`onnx_input_name`) -> index of the network input."""
    outputs = {network.get_output(i).name for i in range(network.num_outputs)}
    return {onnx_input_name(network.get_input(i).name, outputs): i for i in range(network.num_inputs)}


def input_symbols(model: onnx.ModelProto) -> dict[str, tuple[str | None, ...]]:
    """Input name -> its dims' symbols (``dim_param``; None for a size or an unnamed dim), initializers aside."""
    inits = {i.name for i in model.graph.initializer}
    return {inp.name: tuple(d.dim_param or None for d in inp.type.tensor_type.shape.dim)
            for inp in model.graph.input if inp.name not in inits}


def _symbol_ranges(shapes: Mapping[str, ShapeRange], symbols: Mapping[str, Sequence[str | None]]
                   ) -> dict[str, tuple[int, int, int, str]]:
    """Symbol -> (min, opt, max, the input that gave it first) over the ``shapes`` given; InputMismatchError naming
    the inputs when two give one symbol other optimum sizes (TensorRT: "Profile kOPT values are not
    self-consistent. Dimensions with name batch must be equal", which read as the graph's fault). Other minima or
    maxima it builds with (ranges from data: a state's batch axis seen from 2 beside an input's from 1)."""
    out: dict[str, tuple[int, int, int, str]] = {}
    for name, r in shapes.items():
        for axis, sym in enumerate(symbols.get(name, ())):
            if sym is None or axis >= len(r.min):
                continue
            mine = (r.min[axis], r.opt[axis], r.max[axis])
            if sym in out and out[sym][1] != mine[1]:
                other = out[sym]
                raise InputMismatchError(
                    f"the shape ranges give dimension {sym!r} two optimum sizes: {other[3]!r} has {other[:3]} "
                    f"(min, opt, max), {name!r} axis {axis} has {mine}; one dimension of the model takes one: give "
                    "both the same OPT there (--shapes)")
            out.setdefault(sym, (*mine, name))
    return out


def _filled(name: str, net: Sequence[int], syms: Sequence[str | None],
            known: Mapping[str, tuple[int, int, int, str]]) -> ShapeRange | None:
    """A range for an input ``--shapes`` leaves out whose every dynamic axis names a symbol another input's range
    gives (a GRU's ``h0 [2, batch, 48]`` beside ``feats``): None when an axis has none."""
    lo, opt, hi = [], [], []
    for axis, n in enumerate(net):
        if int(n) >= 0:
            lo.append(int(n)), opt.append(int(n)), hi.append(int(n))
            continue
        sym = syms[axis] if axis < len(syms) else None
        if sym not in known:
            return None
        a, b, c, _ = known[sym]
        lo.append(a), opt.append(b), hi.append(c)
    return ShapeRange(name, tuple(lo), tuple(opt), tuple(hi))


def resolve_profiles(
    inputs: Mapping[str, Sequence[int]],
    profiles_from: Mapping[str, Sequence[int]] | None,
    shapes: Mapping[str, ShapeRange] | None,
    symbols: Mapping[str, Sequence[str | None]] | None = None,
) -> tuple[dict[str, Profile], dict[str, list[int]]]:
    """(profile per dynamic input, the axes per input that got :data:`DEFAULT_DYNAMIC_DIM`).

    ``shapes`` (``--shapes`` or ranges derived from the data) win over ``profiles_from``
    (one data shape per input); an input named in neither gets the default guess, or, with ``symbols``
    (:func:`input_symbols`), the ranges ``shapes`` gives its dims' symbols elsewhere. Two optimum sizes for one
    symbol are refused.
    """
    if shapes and symbols:
        known = _symbol_ranges(shapes, symbols)
        extra = {name: r for name, net in inputs.items() if name not in shapes and not (profiles_from or {}).get(name)
                 and (r := _filled(name, net, symbols.get(name, ()), known)) is not None}
        shapes = {**shapes, **extra}
    given = {**dict(profiles_from or {}), **dict(shapes or {})}
    unknown = sorted(set(given) - set(inputs))
    if unknown:
        raise InputMismatchError(
            f"shapes are given for {', '.join(map(repr, unknown))}, which are not inputs of the "
            f"model; its inputs are {', '.join(map(repr, inputs))}"
        )
    profiles: dict[str, Profile] = {}
    guessed: dict[str, list[int]] = {}
    for name, net in inputs.items():
        explicit = (shapes or {}).get(name)
        if explicit is not None:
            check_range_fits(explicit, net)
        if not any(int(d) < 0 for d in net):
            continue
        if explicit is not None:
            profiles[name] = explicit.as_tuple()
            continue
        data = (profiles_from or {}).get(name)
        profiles[name] = profile_shapes(name, net, data)
        if data is None:
            guessed[name] = [axis for axis, d in enumerate(net) if int(d) < 0]
    return profiles, guessed


def guessed_profiles_hint(profiles: Mapping[str, Profile], guessed: Mapping[str, Sequence[int]]) -> str:
    """What to write when a build with guessed dims fails: the inputs, the axes, a ``--shapes`` to edit."""
    if not guessed:
        return ""
    which = "; ".join(f"input {name!r} axis {', '.join(map(str, axes))}" for name, axes in guessed.items())
    example = " ".join(_shape_template(name, profiles[name], guessed[name]) for name in guessed)
    return (f"\n  {GUESSED_PHRASE} {which}: they got the guess (min, opt, max) = {DEFAULT_DYNAMIC_DIM}, "
            f"which the model does not accept. Give the real range: --shapes {example}, each MIN/OPT/MAX the "
            "smallest, typical and largest size your data has there; or build with a table calibrated on data "
            "(--table: profiles then follow the sample shapes it records).")


GUESSED_PHRASE = "No data or --shapes fixed"
"""How :func:`guessed_profiles_hint` begins: a failed build whose message holds it ran on guessed profiles."""


def _shape_template(name: str, profile: Profile, axes: Sequence[int]) -> str:
    """``name:1x3xMINxMIN,8x3xOPTxOPT,...``: the profile with the guessed axes as placeholders to fill in (the
    guess itself, which just failed, is no example to copy)."""
    def one(shape: Sequence[int], word: str) -> str:
        return "x".join(word if k in axes and k != 0 else str(d) for k, d in enumerate(shape))

    return f"{name}:" + ",".join(one(shape, word) for shape, word in zip(profile, ("MIN", "OPT", "MAX"), strict=True))


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
            "attention_decomposable": True,
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
            raise parse_error(self.library, self.version, label, issues, {n.name: n.domain for n in model.graph.node})
        self.allow_decomposed_attention(network)
        return builder, network, parser

    def allow_decomposed_attention(self, network: Any) -> int:
        """Lets every attention (ONNX ``Attention``, opset 23: torch's dynamo export of
        scaled_dot_product_attention) fall back to several kernels where no fused one fits; returns how many.

        TensorRT marks them not decomposable, so an attention without a dedicated kernel fails the whole build
        ("Attention operation was not supported by a dedicated kernel"; TensorRT-RTX 1.7 refused every float32
        one). A fused kernel is still taken where one exists.
        """
        trt = self._trt
        kinds = {getattr(trt.LayerType, k) for k in ("ATTENTION_INPUT", "ATTENTION_OUTPUT") if hasattr(trt.LayerType, k)}
        boundary = getattr(trt, "IAttentionBoundaryLayer", None)
        if not kinds or boundary is None:
            return 0
        seen = 0
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in kinds:
                layer.__class__ = boundary  # the Python bindings hand out ILayer; Polygraphy casts the same way
                layer.attention.decomposable = True
                seen += 1
        return seen // 2  # an input and an output layer per attention

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
        self, network: Any, profiles_from: Mapping[str, Sequence[int]] | None,
        shapes: Mapping[str, ShapeRange] | None = None, symbols: Mapping[str, Sequence[str | None]] | None = None,
    ) -> tuple[dict[str, Profile], dict[str, list[int]]]:
        """(profile per dynamic input, guessed axes), keyed by the inputs' ONNX names (:func:`onnx_input_name`);
        ``symbols`` as :func:`resolve_profiles` takes them."""
        inputs = {name: tuple(network.get_input(i).shape) for name, i in _input_indices(network).items()}
        return resolve_profiles(inputs, profiles_from, shapes, symbols)

    def config(self, builder: Any, network: Any, profiles: Mapping[str, Profile]) -> tuple[Any, Any]:
        """The builder config; ``profiles`` keyed by ONNX input names, set on the network's own names."""
        trt = self._trt
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        if profiles:
            indices = _input_indices(network)
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in profiles.items():
                profile.set_shape(network.get_input(indices[name]).name, lo, opt, hi)
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
        shapes: Mapping[str, ShapeRange] | None = None,
        progress: bool = False,
    ) -> tuple[bytes, dict[str, Any]]:
        """(engine bytes, settings). ``progress``: a bar per builder phase; an interrupt cancels the build either
        way (:mod:`.monitor`)."""
        builder, network, _parser = self.parse(model, label)  # parser must outlive the build
        self.mark_outputs(network, list(outputs or []), label)
        profiles, guessed = self.profiles(network, profiles_from, shapes, input_symbols(model))
        config, _timing = self.config(builder, network, profiles)
        monitor = make_monitor(self._trt, progress)
        config.progress_monitor = monitor
        try:
            serialized = builder.build_serialized_network(network, config)
        finally:
            monitor.raise_if_interrupted()
        if serialized is None:
            logged = self._logger.errors()
            errors = "\n  ".join(logged) or "(no error was logged)"
            raise BackendError(
                f"{self.library} {self.version} failed to build an engine for {label}:\n  {errors}"
                + build_error_hint(logged) + (guessed_profiles_hint(profiles, guessed) if is_profile_error(logged)
                                               else "")
            )
        self.save_timing_cache(config)
        return bytes(serialized), self.settings(list(outputs or []), profiles)


    def settings_for(
        self, model: onnx.ModelProto, outputs: Sequence[str], profiles_from: Mapping[str, Sequence[int]] | None,
        shapes: Mapping[str, ShapeRange] | None = None,
    ) -> dict[str, Any]:
        """Build settings computed from the ONNX inputs alone (no parse), for the cache key."""
        inits = {i.name for i in model.graph.initializer}
        inputs = {inp.name: [d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim]
                  for inp in model.graph.input if inp.name not in inits}
        return self.settings(list(outputs), resolve_profiles(inputs, profiles_from, shapes, input_symbols(model))[0])
