"""Per-layer precision plans: which fusion group runs in int8, fp16 or fp32.

A plan is a small JSON or TOML file a user keeps next to the model and edits
by hand. It says what precision each *fusion group* gets: TensorRT fuses a
convolution with its bias, batch norm, residual add and activation into one
kernel, so a pin on one of those nodes is a pin on the whole kernel.

    {                                         # plan.json
      "format": "quantlab.plan/1",
      "default": "int8",                      # every group, unless ...
      "fallback": "fp32",                     # ... it cannot be int8: then this
      "op_defaults": {"Softmax": "fp32"},     # by the group's anchor op type
      "rules": [                              # in order, later rules win
        {"first": 1, "precision": "fp16"},    # first N compute groups (Conv/Gemm/MatMul...)
        {"last": 1, "precision": "fp16"},
        {"regex": "^encoder\\\\.", "precision": "fp16"},   # any node name in the group
        {"op_type": "MatMul", "precision": "int8"},
        {"node": "block_conv2", "precision": "fp32"}    # the group holding this node
      ],
      "overrides": {"fc": "fp32"}             # group (or node) name -> precision; wins
    }

Precedence, lowest first: ``default`` < ``op_defaults`` < ``rules`` (in order)
< ``overrides``. :func:`resolve_plan` checks the plan against the model: a
name that does not exist is an error that suggests close matches, and int8
asked explicitly (``node``/``op_type`` rule, ``op_defaults``, ``overrides``) for
a group that cannot be quantized is an error naming the node and op; int8 that
comes from ``default``, a regex or first/last silently becomes ``fallback``
on such groups.

Fusion groups (:func:`fusion_groups`), in topological order::

    x ─► Conv ─► [Add bias] ─► [BatchNorm] ─► [Add ◄─ skip] ─► [Relu|Clip|Sigmoid|x*sigmoid(x)|...] ─►
         └──────────────────────── one group, named after the Conv ───────────────────────┘

The anchor is Conv, ConvTranspose, Gemm or MatMul; a residual Add joins only
Conv/ConvTranspose groups (TensorRT's conv+add epilogue; an attention-mask
Add after a MatMul must not be quantized). When both inputs of the Add come
from convs (a ResNet downsample block), the first conv in topological order
takes it and the other conv's output is the skip input. Every other node is a group of its
own: pooling, Concat and Resize are quantizable (TensorRT runs them on INT8
inputs), data movement, normalisation, Softmax and stand-alone elementwise ops
are not.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import onnx

from .atomic import write_json, write_text
from .errors import PlanError
from .graph import tensor_specs

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "Precision",
    "PRECISIONS",
    "PLAN_FORMAT",
    "COMPUTE_OPS",
    "QUANTIZABLE_STANDALONE_OPS",
    "FusionGroup",
    "Rule",
    "PrecisionPlan",
    "ResolvedPlan",
    "fusion_groups",
    "node_names",
    "constant_names",
    "topological_order",
    "uniform_plan",
    "load_plan",
    "save_plan",
    "plan_from_dict",
    "plan_to_dict",
    "resolve_plan",
]

Precision = Literal["int8", "fp16", "fp32"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
PLAN_FORMAT = "quantlab.plan/1"

COMPUTE_OPS: frozenset[str] = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
"""Anchors of fusion groups: the ops whose weights and inputs INT8 accelerates."""

RESIDUAL_ANCHORS: frozenset[str] = frozenset({"Conv", "ConvTranspose"})
"""Anchors a residual Add fuses into (TensorRT's conv + eltwise epilogue)."""

ACTIVATION_OPS: frozenset[str] = frozenset({
    "Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSwish", "HardSigmoid", "Elu", "Selu",
    "Softplus", "Gelu", "PRelu", "ThresholdedRelu", "Mish", "Celu",
})
"""Pointwise activations TensorRT fuses into the epilogue of the preceding kernel."""

QUANTIZABLE_STANDALONE_OPS: frozenset[str] = frozenset({
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Concat", "Resize",
})
"""Non-compute ops that TensorRT runs on INT8 inputs (DQ -> op -> Q fuses).

Stand-alone Add/Mul are deliberately not here: in transformers they carry
attention masks at float32.min, which INT8 would clip away.
"""

_SWISH_GATES = frozenset({"Sigmoid", "HardSigmoid"})
_RULE_MATCHERS = ("node", "regex", "op_type", "first", "last")


# --------------------------------------------------------------------------- fusion groups


@dataclass(frozen=True)
class FusionGroup:
    """Nodes TensorRT runs as one kernel, and the tensors at its edges.

    ``name`` is the anchor node's name (the first node for non-compute groups);
    ``input_tensors`` are the activation inputs (not initializers/constants)
    read from outside the group, in node order; ``output_tensor`` is the
    tensor the group hands on (the last node's first output) and
    ``output_tensors`` every output read outside the group or by the graph.
    ``residual_input`` is the skip tensor of a fused residual Add.
    """

    name: str
    nodes: tuple[str, ...]
    anchor_op: str
    quantizable: bool
    input_tensors: tuple[str, ...]
    output_tensor: str
    topo_index: int
    kind: str = "other"
    residual_input: str | None = None
    output_tensors: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ()

    @property
    def is_compute(self) -> bool:
        return self.anchor_op in COMPUTE_OPS


def node_names(proto: onnx.ModelProto) -> list[str]:
    """A unique name for every node, in graph order.

    The node's own name when it has one and it is unique; otherwise
    ``<op_type>_<index>`` (index in ``graph.node``), made unique. The writer
    gives nodes these names, so plans and provenance can always refer to them.
    """
    raw = [n.name for n in proto.graph.node]
    counts: dict[str, int] = {}
    for name in raw:
        if name:
            counts[name] = counts.get(name, 0) + 1
    taken = {name for name, c in counts.items() if c == 1}
    out: list[str] = []
    for i, (node, name) in enumerate(zip(proto.graph.node, raw)):
        if name and counts[name] == 1:
            out.append(name)
            continue
        base = f"{name}#{i}" if name else f"{node.op_type}_{i}"
        candidate, k = base, 1
        while candidate in taken:
            candidate, k = f"{base}_{k}", k + 1
        taken.add(candidate)
        out.append(candidate)
    return out


def constant_names(proto: onnx.ModelProto) -> set[str]:
    """Initializers and outputs of Constant nodes: values fixed at export time."""
    names = {i.name for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            names.update(o for o in node.output if o)
    return names


def _is_float(specs: Mapping[str, Any], tensor: str) -> bool:
    spec = specs.get(tensor)
    return spec is None or spec.dtype in ("float32", "float16", "undefined")


def fusion_groups(proto: onnx.ModelProto) -> list[FusionGroup]:
    """The model's nodes grouped as TensorRT fuses them, in topological order.

    See the module docstring for the grouping. Absorbing a node into a group
    needs the group's current output to have that node as its only reader and
    not to be a graph output, so only the last node's output leaves a group.
    """
    names = node_names(proto)
    nodes = list(proto.graph.node)
    order = topological_order(proto)
    position = {idx: i for i, idx in enumerate(order)}
    consumers = _consumer_indices(proto)
    constants = constant_names(proto)
    graph_outputs = {o.name for o in proto.graph.output}
    specs = tensor_specs(proto)

    def sole_consumer(tensor: str) -> int | None:
        readers = consumers.get(tensor, [])
        if tensor in graph_outputs or len(readers) != 1:
            return None
        return readers[0]

    assigned: set[int] = set()
    chains: list[list[int]] = []
    residual: dict[int, str] = {}

    for idx in order:
        node = nodes[idx]
        if idx in assigned or node.op_type not in COMPUTE_OPS:
            continue
        chain = [idx]
        current = node.output[0]
        stage = 0  # 0 after anchor, 1 after bias, 2 after BN, 3 after residual add, 4 done
        while stage < 4:
            nxt_idx = sole_consumer(current)
            if nxt_idx is None or nxt_idx in assigned:
                swish = _swish_tail(current, nodes, consumers, graph_outputs, assigned)
                if swish:
                    chain.extend(swish)
                    current = nodes[swish[-1]].output[0]
                break
            nxt = nodes[nxt_idx]
            op = nxt.op_type
            others = [i for i in nxt.input if i and i != current]
            if op == "Add" and stage < 1 and len(others) == 1 and others[0] in constants:
                stage = 1
            elif op == "BatchNormalization" and stage < 2 and nxt.input[0] == current:
                stage = 2
            elif (op == "Add" and stage < 3 and node.op_type in RESIDUAL_ANCHORS and len(others) == 1
                  and others[0] not in constants and len(nxt.input) == 2):
                stage = 3
                residual[idx] = others[0]
            elif op in ACTIVATION_OPS and nxt.input[0] == current:
                stage = 4
            else:
                break
            chain.append(nxt_idx)
            current = nxt.output[0]
        assigned.update(chain)
        chains.append(chain)

    for idx in order:
        if idx not in assigned:
            assigned.add(idx)
            chains.append([idx])

    # a valid topological order of groups: by the position of each group's last node
    chains.sort(key=lambda c: max(position[i] for i in c))
    groups: list[FusionGroup] = []
    for index, chain in enumerate(chains):
        members = set(chain)
        anchor = nodes[chain[0]]
        produced = {o for i in chain for o in nodes[i].output if o}
        inputs: list[str] = []
        for i in chain:
            for t in nodes[i].input:
                if t and t not in produced and t not in constants and t not in inputs:
                    inputs.append(t)
        outs: list[str] = []
        for i in chain:
            for t in nodes[i].output:
                if t and (t in graph_outputs or any(r not in members for r in consumers.get(t, []))):
                    outs.append(t)
        last = nodes[chain[-1]]
        kind, quantizable = _classify(anchor, specs, constants)
        groups.append(FusionGroup(
            name=names[chain[0]],
            nodes=tuple(names[i] for i in chain),
            anchor_op=anchor.op_type,
            quantizable=quantizable,
            input_tensors=tuple(inputs),
            output_tensor=last.output[0] if last.output else "",
            topo_index=index,
            kind=kind,
            residual_input=residual.get(chain[0]),
            output_tensors=tuple(outs),
            op_types=tuple(nodes[i].op_type for i in chain),
        ))
    return groups


def topological_order(proto: onnx.ModelProto) -> list[int]:
    """Indices into ``graph.node`` in a topological order (graph order when already sorted)."""
    nodes = list(proto.graph.node)
    known = {i.name for i in proto.graph.input} | {i.name for i in proto.graph.initializer}
    pending = list(range(len(nodes)))
    order: list[int] = []
    while pending:
        rest = []
        for idx in pending:
            if all((not t) or t in known for t in nodes[idx].input):
                order.append(idx)
                known.update(o for o in nodes[idx].output if o)
            else:
                rest.append(idx)
        if len(rest) == len(pending):
            bad = ", ".join(repr(nodes[i].name or nodes[i].op_type) for i in rest[:5])
            raise PlanError(f"the graph has a cycle or reads undefined tensors at nodes {bad}")
        pending = rest
    return order


def _consumer_indices(proto: onnx.ModelProto) -> dict[str, list[int]]:
    consumers: dict[str, list[int]] = {}
    for idx, node in enumerate(proto.graph.node):
        for t in node.input:
            if t and idx not in consumers.get(t, []):
                consumers.setdefault(t, []).append(idx)
    return consumers


def _swish_tail(
    current: str,
    nodes: Sequence[onnx.NodeProto],
    consumers: Mapping[str, list[int]],
    graph_outputs: set[str],
    assigned: set[int],
) -> list[int]:
    """``x * sigmoid(x)`` (SiLU / swish) or ``x * hardsigmoid(x)`` after ``current``, else []."""
    readers = consumers.get(current, [])
    if current in graph_outputs or len(readers) != 2 or any(r in assigned for r in readers):
        return []
    gates = [r for r in readers if nodes[r].op_type in _SWISH_GATES]
    muls = [r for r in readers if nodes[r].op_type == "Mul"]
    if len(gates) != 1 or len(muls) != 1:
        return []
    gate, mul = nodes[gates[0]], nodes[muls[0]]
    gate_out = gate.output[0]
    if sorted(mul.input) != sorted([current, gate_out]):
        return []
    if gate_out in graph_outputs or len(consumers.get(gate_out, [])) != 1:
        return []
    return [gates[0], muls[0]]


def _classify(
    anchor: onnx.NodeProto,
    specs: Mapping[str, Any],
    constants: set[str],
) -> tuple[str, bool]:
    """(kind, quantizable) of a group: float compute ops and INT8-capable data ops only."""
    op = anchor.op_type
    float_out = all(_is_float(specs, o) for o in anchor.output if o)
    if op in COMPUTE_OPS:
        data_inputs = [t for t in anchor.input[:2] if t]
        ok = float_out and all(_is_float(specs, t) for t in data_inputs)
        ok = ok and not all(t in constants for t in data_inputs)
        return "compute", ok
    if op in QUANTIZABLE_STANDALONE_OPS:
        data = [t for t in (anchor.input if op == "Concat" else anchor.input[:1]) if t]
        ok = float_out and any(t not in constants for t in data)
        ok = ok and all(_is_float(specs, t) for t in data if t not in constants)
        return ("concat" if op == "Concat" else "pool" if "Pool" in op else "resize"), ok
    return "other", False


# --------------------------------------------------------------------------- plans


def _check_precision(value: Any, where: str) -> Precision:
    if value not in PRECISIONS:
        raise PlanError(f"{where}: precision {value!r} is not one of {', '.join(PRECISIONS)}")
    return value  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Rule:
    """One plan rule: exactly one matcher (``node``, ``regex``, ``op_type``, ``first``, ``last``)."""

    precision: Precision
    node: str | None = None
    regex: str | None = None
    op_type: str | None = None
    first: int | None = None
    last: int | None = None

    def __post_init__(self) -> None:
        _check_precision(self.precision, f"rule {self.describe()}")
        set_ = [m for m in _RULE_MATCHERS if getattr(self, m) is not None]
        if len(set_) != 1:
            raise PlanError(
                f"a plan rule needs exactly one of {', '.join(_RULE_MATCHERS)}; got "
                f"{', '.join(set_) or 'none'} in {self.as_dict()}"
            )
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise PlanError(f"rule regex {self.regex!r} is not a valid regular expression: {exc}") from None
        for key in ("first", "last"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise PlanError(f"rule {key}={value!r}: give a whole number of compute groups >= 1")

    @property
    def matcher(self) -> str:
        return next(m for m in _RULE_MATCHERS if getattr(self, m) is not None)

    def describe(self) -> str:
        m = next((m for m in _RULE_MATCHERS if getattr(self, m, None) is not None), None)
        return f"{m}={getattr(self, m)!r}" if m else "<no matcher>"

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {m: getattr(self, m) for m in _RULE_MATCHERS if getattr(self, m) is not None}
        d["precision"] = self.precision
        return d


@dataclass(frozen=True)
class PrecisionPlan:
    """What the user asked for; see the module docstring for the file format and precedence.

    ``fallback`` is what a group that cannot be INT8 gets when int8 reaches it
    through ``default``, a regex or first/last (fp32, or fp16 for speed).
    """

    default: Precision = "int8"
    op_defaults: Mapping[str, Precision] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    overrides: Mapping[str, Precision] = field(default_factory=dict)
    fallback: Precision = "fp32"
    description: str = ""

    def __post_init__(self) -> None:
        _check_precision(self.default, "plan default")
        _check_precision(self.fallback, "plan fallback")
        if self.fallback == "int8":
            raise PlanError("plan fallback must be fp16 or fp32: it is used where int8 is impossible")
        object.__setattr__(self, "op_defaults", dict(self.op_defaults))
        object.__setattr__(self, "overrides", dict(self.overrides))
        rules = []
        for i, rule in enumerate(self.rules):
            if isinstance(rule, Mapping):
                rule = plan_from_dict({"rules": [rule]}, f"rules[{i}]").rules[0]
            if not isinstance(rule, Rule):
                raise PlanError(f"rules[{i}] is a {type(rule).__name__}, not a Rule or a table like "
                                "{'first': 1, 'precision': 'fp16'}")
            rules.append(rule)
        object.__setattr__(self, "rules", tuple(rules))
        for op, p in self.op_defaults.items():
            _check_precision(p, f"op_defaults[{op!r}]")
        for name, p in self.overrides.items():
            _check_precision(p, f"overrides[{name!r}]")


def uniform_plan(precision: Precision) -> PrecisionPlan:
    """Every group at ``precision`` (non-quantizable groups fall back to fp32 under int8)."""
    _check_precision(precision, "uniform plan")
    return PrecisionPlan(default=precision)


_PLAN_KEYS = {"format", "default", "op_defaults", "rules", "overrides", "fallback", "description", "groups"}


def plan_to_dict(plan: PrecisionPlan, groups: Sequence[FusionGroup] | None = None) -> dict[str, Any]:
    """The file form. ``groups`` adds an informational listing (ignored when read back)."""
    d: dict[str, Any] = {
        "format": PLAN_FORMAT,
        "description": plan.description,
        "default": plan.default,
        "fallback": plan.fallback,
        "op_defaults": dict(sorted(plan.op_defaults.items())),
        "rules": [r.as_dict() for r in plan.rules],
        "overrides": dict(plan.overrides),
    }
    if groups is not None:
        d["groups"] = {
            g.name: {"nodes": list(g.nodes), "op": g.anchor_op, "quantizable": g.quantizable}
            for g in groups
        }
    return d


def plan_from_dict(data: Mapping[str, Any], source: str = "plan") -> PrecisionPlan:
    """Validate the file form (unknown keys, types, precisions) into a :class:`PrecisionPlan`."""
    if not isinstance(data, Mapping):
        raise PlanError(f"{source}: a plan is a JSON/TOML table, got {type(data).__name__}")
    unknown = sorted(set(data) - _PLAN_KEYS)
    if unknown:
        raise PlanError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; "
                        f"a plan has {', '.join(sorted(_PLAN_KEYS - {'groups'}))}")
    fmt = data.get("format", PLAN_FORMAT)
    if fmt != PLAN_FORMAT:
        raise PlanError(f"{source}: format {fmt!r} is not {PLAN_FORMAT!r}")

    def table(key: str) -> dict[str, Precision]:
        value = data.get(key, {})
        if not isinstance(value, Mapping):
            raise PlanError(f"{source}: {key!r} must be a table of name -> precision")
        return {str(k): _check_precision(v, f"{source}: {key}[{k!r}]") for k, v in value.items()}

    rules_raw = data.get("rules", [])
    if not isinstance(rules_raw, (list, tuple)):
        raise PlanError(f"{source}: 'rules' must be a list of tables")
    rules = []
    for i, r in enumerate(rules_raw):
        if not isinstance(r, Mapping):
            raise PlanError(f"{source}: rules[{i}] must be a table, got {r!r}")
        extra = sorted(set(r) - set(_RULE_MATCHERS) - {"precision"})
        if extra:
            raise PlanError(f"{source}: rules[{i}] has unknown key(s) {', '.join(map(repr, extra))}; "
                            f"use one of {', '.join(_RULE_MATCHERS)} and 'precision'")
        if "precision" not in r:
            raise PlanError(f"{source}: rules[{i}] has no 'precision'")
        try:
            rules.append(Rule(**{k: r[k] for k in r}))
        except PlanError as exc:
            raise PlanError(f"{source}: rules[{i}]: {exc}") from None
    description = data.get("description", "")
    if not isinstance(description, str):
        raise PlanError(f"{source}: 'description' must be a string")
    return PrecisionPlan(
        default=_check_precision(data.get("default", "int8"), f"{source}: default"),
        op_defaults=table("op_defaults"),
        rules=tuple(rules),
        overrides=table("overrides"),
        fallback=_check_precision(data.get("fallback", "fp32"), f"{source}: fallback"),
        description=description,
    )


def load_plan(path: str | os.PathLike[str]) -> PrecisionPlan:
    """Read a plan from ``.json`` or ``.toml``."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: no such plan file. Write one with `quantlab build ... --out DIR` "
                        "(DIR/plan.json) or by hand (see quantlab.plan).")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise PlanError(f"{path}: a plan file ends in .json or .toml")
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise PlanError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
    return plan_from_dict(data, str(path))


def save_plan(
    plan: PrecisionPlan, path: str | os.PathLike[str], groups: Sequence[FusionGroup] | None = None
) -> Path:
    """Write ``plan`` atomically as JSON or TOML (by suffix); ``groups`` lists the groups for the reader."""
    path = Path(path)
    data = plan_to_dict(plan, groups)
    if path.suffix.lower() == ".toml":
        return write_text(path, _to_toml(data))
    if path.suffix.lower() == ".json":
        return write_json(path, data)
    raise PlanError(f"{path}: a plan file ends in .json or .toml")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _to_toml(data: Mapping[str, Any]) -> str:
    lines = [f"{k} = {_toml_value(data[k])}" for k in ("format", "description", "default", "fallback")]
    lines += ["", "[op_defaults]"] + [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in data["op_defaults"].items()]
    lines += ["", "[overrides]"] + [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in data["overrides"].items()]
    for rule in data["rules"]:
        lines += ["", "[[rules]]"] + [f"{k} = {_toml_value(v)}" for k, v in rule.items()]
    for name, info in data.get("groups", {}).items():
        lines += ["", f"[groups.{json.dumps(name)}]"] + [f"{k} = {_toml_value(v)}" for k, v in info.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class ResolvedPlan:
    """A plan applied to one model: the precision of every fusion group, and why.

    ``precision`` maps each group name to int8/fp16/fp32; ``reasons`` to what
    decided it (``default``, ``op_defaults[Conv]``, ``rules[2] regex=...``,
    ``overrides``, ``pin``, ``fallback``).
    """

    groups: tuple[FusionGroup, ...]
    precision: Mapping[str, Precision]
    reasons: Mapping[str, str] = field(default_factory=dict)
    default: Precision = "int8"
    fallback: Precision = "fp32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", dict(self.precision))
        object.__setattr__(self, "reasons", dict(self.reasons))
        object.__setattr__(self, "groups", tuple(self.groups))

    @property
    def group_map(self) -> dict[str, FusionGroup]:
        return {g.name: g for g in self.groups}

    def groups_at(self, precision: Precision) -> list[FusionGroup]:
        return [g for g in self.groups if self.precision[g.name] == precision]

    def with_pins(self, pins: Mapping[str, Precision]) -> ResolvedPlan:
        """A copy with ``pins`` (group or node name -> precision) applied on top."""
        groups = self.group_map
        by_node = {n: g for g in self.groups for n in g.nodes}
        _raise_unknown([n for n in pins if n not in groups and n not in by_node],
                       list(groups) + list(by_node), "pins")
        precision = dict(self.precision)
        reasons = dict(self.reasons)
        for name, p in pins.items():
            _check_precision(p, f"pin {name!r}")
            group = groups.get(name) or by_node[name]
            if p == "int8" and not group.quantizable:
                raise PlanError(_not_quantizable(group, f"pin {name!r}"))
            precision[group.name] = p
            reasons[group.name] = "pin"
        return dataclasses.replace(self, precision=precision, reasons=reasons)

    def int8_fraction(self) -> float:
        """Share of quantizable groups that run in INT8 (0.0 when none is quantizable)."""
        q = [g for g in self.groups if g.quantizable]
        return sum(self.precision[g.name] == "int8" for g in q) / len(q) if q else 0.0

    def counts(self) -> dict[str, int]:
        return {p: sum(v == p for v in self.precision.values()) for p in PRECISIONS}

    def plan_hash(self) -> str:
        """sha256 of the assignment (group -> precision), independent of how it was written."""
        payload = json.dumps(sorted(self.precision.items()), separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()

    def to_plan(self, description: str = "") -> PrecisionPlan:
        """The effective plan: an override for every group, so it reproduces this assignment exactly."""
        return PrecisionPlan(
            default=self.default,
            overrides={g.name: self.precision[g.name] for g in self.groups},
            fallback=self.fallback,
            description=description or f"effective plan {self.plan_hash()[:12]}",
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per group: order, name, anchor op, nodes, quantizable, precision, reason, tensors."""
        import pandas as pd

        return pd.DataFrame([
            {
                "topo_index": g.topo_index,
                "group": g.name,
                "anchor_op": g.anchor_op,
                "nodes": ", ".join(g.nodes),
                "quantizable": g.quantizable,
                "precision": self.precision[g.name],
                "reason": self.reasons.get(g.name, ""),
                "inputs": ", ".join(g.input_tensors),
                "output": g.output_tensor,
            }
            for g in self.groups
        ])


def _not_quantizable(group: FusionGroup, where: str) -> str:
    why = ("its inputs are not float or are all constants" if group.is_compute
           else f"TensorRT has no INT8 {group.anchor_op} for it to use")
    return (f"{where} asks int8 for node {group.name!r} (op {group.anchor_op}), which cannot be "
            f"quantized: {why}. Use fp16 or fp32 for it.")


def _raise_unknown(unknown: Sequence[str], known: Iterable[str], where: str) -> None:
    if not unknown:
        return
    known = sorted(set(known))
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        parts.append(f"{name!r}{hint}")
    raise PlanError(
        f"{where}: no node called {', '.join(parts)} in the model. Node names are listed in the "
        "'groups' section of a saved effective plan (quantlab build --out DIR writes DIR/plan.json)."
    )


def resolve_plan(plan: PrecisionPlan, proto: onnx.ModelProto) -> ResolvedPlan:
    """Apply ``plan`` to the model's fusion groups, checking every name and int8 request."""
    groups = fusion_groups(proto)
    by_name = {g.name: g for g in groups}
    by_node = {n: g for g in groups for n in g.nodes}
    compute = [g for g in groups if g.is_compute]
    ops_in_model = {op for g in groups for op in g.op_types}

    precision: dict[str, Precision] = {}
    reasons: dict[str, str] = {}

    def assign(group: FusionGroup, p: Precision, reason: str, is_explicit: bool) -> None:
        if p == "int8" and not group.quantizable:
            if is_explicit:
                raise PlanError(_not_quantizable(group, reason))
            precision[group.name], reasons[group.name] = plan.fallback, f"fallback ({reason} asked int8)"
            return
        precision[group.name], reasons[group.name] = p, reason

    for g in groups:
        assign(g, plan.default, "default", False)

    unknown_ops = sorted(op for op in plan.op_defaults if op not in ops_in_model)
    if unknown_ops:
        raise PlanError(f"op_defaults names op type(s) {', '.join(map(repr, unknown_ops))} that no node "
                        f"of the model has; the model's ops are {', '.join(sorted(ops_in_model))}")
    for g in groups:
        if g.anchor_op in plan.op_defaults:
            assign(g, plan.op_defaults[g.anchor_op], f"op_defaults[{g.anchor_op}]", True)

    unknown_nodes = [r.node for r in plan.rules if r.node is not None and r.node not in by_node]
    _raise_unknown([n for n in unknown_nodes if n], by_node, "plan rules")
    for i, rule in enumerate(plan.rules):
        where = f"rules[{i}] {rule.describe()}"
        matched = _rule_groups(rule, groups, compute, by_node)
        if not matched:
            if rule.op_type is not None:
                raise PlanError(f"{where}: no group is anchored by op {rule.op_type!r}; the anchors in "
                                f"this model are {', '.join(sorted({g.anchor_op for g in groups}))}")
            if rule.regex is not None:
                raise PlanError(f"{where}: the regex matches no node name; check it against the "
                                "names in the saved effective plan")
            raise PlanError(f"{where}: matches no group (the model has {len(compute)} compute groups)")
        is_explicit = rule.node is not None or rule.op_type is not None
        for g in matched:
            assign(g, rule.precision, where, is_explicit)

    _raise_unknown([n for n in plan.overrides if n not in by_name and n not in by_node],
                   list(by_name) + list(by_node), "plan overrides")
    seen: dict[str, tuple[str, Precision]] = {}
    for name, p in plan.overrides.items():
        g = by_name.get(name) or by_node[name]
        if g.name in seen and seen[g.name][1] != p:
            raise PlanError(f"plan overrides: {seen[g.name][0]!r} and {name!r} are in the same fusion "
                            f"group {g.name!r} but ask {seen[g.name][1]} and {p}; a group has one precision")
        seen[g.name] = (name, p)
        assign(g, p, "overrides", True)
    return ResolvedPlan(groups=tuple(groups), precision=precision, reasons=reasons,
                        default=plan.default, fallback=plan.fallback)


def _rule_groups(
    rule: Rule,
    groups: Sequence[FusionGroup],
    compute: Sequence[FusionGroup],
    by_node: Mapping[str, FusionGroup],
) -> list[FusionGroup]:
    if rule.node is not None:
        return [by_node[rule.node]]
    if rule.regex is not None:
        pattern = re.compile(rule.regex)
        return [g for g in groups if any(pattern.search(n) for n in g.nodes)]
    if rule.op_type is not None:
        return [g for g in groups if g.anchor_op == rule.op_type]
    if rule.first is not None:
        return list(compute[: rule.first])
    assert rule.last is not None
    return list(compute[-rule.last:])
