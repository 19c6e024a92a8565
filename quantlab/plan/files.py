"""Plan files: a small JSON or TOML file a user keeps next to the model and edits by hand.

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

A saved effective plan (:meth:`quantlab.plan.ResolvedPlan.to_plan`) also
lists the model's groups under ``groups``, for the reader; it is ignored when
read back.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import write_json, write_text
from ..errors import PlanError
from ..precision import DEFAULT_FALLBACK, DEFAULT_PRECISION, Precision, check_precision
from ..schema import Key, Where, check_table, is_str
from .groups import FusionGroup
from .rules import PrecisionPlan, rule_from_dict

__all__ = ["PLAN_FORMAT", "plan_to_dict", "plan_from_dict", "load_plan", "save_plan"]

PLAN_FORMAT = "quantlab.plan/1"

_TABLE = "a table of name = precision"
_PLAN_KEYS: dict[str, Key] = {  # precisions themselves are checked by check_precision (its message names them)
    "format": Key(f"{PLAN_FORMAT!r}", is_str, f'format = "{PLAN_FORMAT}"'),
    "default": Key("a precision name", is_str, 'default = "int8"'),
    "fallback": Key("a precision name", is_str, 'fallback = "fp32"'),
    "op_defaults": Key(_TABLE, lambda v: isinstance(v, Mapping), '[op_defaults]\nSoftmax = "fp32"'),
    "rules": Key("a list of tables", lambda v: isinstance(v, (list, tuple)), '[[rules]]\nfirst = 1\nprecision = "fp16"'),
    "overrides": Key(_TABLE, lambda v: isinstance(v, Mapping), '[overrides]\nfc = "fp32"'),
    "description": Key("a string", is_str, 'description = "why this plan"'),
    "groups": Key("a table (written for the reader, ignored)", lambda v: isinstance(v, Mapping), "[groups]"),
}


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


def plan_from_dict(data: Mapping[str, Any], source: str = "plan", text: str = "") -> PrecisionPlan:
    """Validate the file form (unknown keys, types, precisions) into a :class:`PrecisionPlan`.

    ``text`` (the file's TOML) lets messages name the line of a bad key.
    """
    if not isinstance(data, Mapping):
        raise PlanError(f"{source}: a plan is a JSON/TOML table, got {type(data).__name__}")
    check_table(data, _PLAN_KEYS, Where(source, text), "", error=PlanError, guide="quantlab/plan/files.py")
    fmt = data.get("format", PLAN_FORMAT)
    if fmt != PLAN_FORMAT:
        raise PlanError(f"{source}: format {fmt!r} is not {PLAN_FORMAT!r}")
    _check_listing(data.get("groups", {}), source)

    def table(key: str) -> dict[str, Precision]:
        return {str(k): check_precision(v, f"{source}: {key}[{k!r}]") for k, v in data.get(key, {}).items()}

    rules = tuple(rule_from_dict(r, f"{source}: rules[{i}]") for i, r in enumerate(data.get("rules", [])))
    return PrecisionPlan(
        default=check_precision(data.get("default", DEFAULT_PRECISION), f"{source}: default"),
        op_defaults=table("op_defaults"),
        rules=rules,
        overrides=table("overrides"),
        fallback=check_precision(data.get("fallback", DEFAULT_FALLBACK), f"{source}: fallback"),
        description=data.get("description", ""),
    )


_LISTING_KEYS = frozenset({"nodes", "op", "quantizable"})
"""What :func:`plan_to_dict` writes for each group under ``groups``."""


def _check_listing(groups: Mapping[str, Any], source: str) -> None:
    """Refuse an edit of the ``groups`` listing, which is read by no one: a precision written there (the
    natural place to look) would be silently ignored."""
    for name, info in groups.items():
        extra = sorted(set(info) - _LISTING_KEYS) if isinstance(info, Mapping) else ["(not a table)"]
        if extra:
            raise PlanError(
                f"{source}: groups[{name!r}] has {', '.join(map(repr, extra))}: the groups listing is written for the "
                "reader and ignored when the plan is read. Set a group's precision under overrides instead, e.g. "
                f"overrides = {{ {json.dumps(name)} = \"fp32\" }} (JSON: \"overrides\": {{{json.dumps(name)}: \"fp32\"}})."
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
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise PlanError(f"{path}: a plan file ends in .json or .toml")
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise PlanError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
    return plan_from_dict(data, str(path), text if suffix == ".toml" else "")


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
