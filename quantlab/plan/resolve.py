"""A plan applied to one model: every fusion group's precision, and what decided it.

:func:`resolve_plan` checks the plan against the model: a name that does not
exist is an error that suggests close matches, and int8 asked explicitly
(``node``/``op_type`` rule, ``op_defaults``, ``overrides``) for a group that
cannot be quantized is an error naming the node and op; int8 that comes from
``default``, a regex or first/last silently becomes ``fallback`` on such groups.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import onnx
import pandas as pd

from ..errors import PlanError
from ..graph.topology import CONTROL_FLOW_OPS
from ..precision import DEFAULT_FALLBACK, DEFAULT_PRECISION, INT8, GroupPrecision, Precision, check_precision
from .groups import FusionGroup, fusion_groups
from .rules import PrecisionPlan, Rule

__all__ = ["ResolvedPlan", "resolve_plan"]


_FALLBACK_REASON = "fallback ("
"""How the reason of a group that was asked INT8 and has no INT8 form starts (``ResolvedPlan.reasons``)."""


@dataclass(frozen=True)
class ResolvedPlan:
    """A plan applied to one model: the precision of every fusion group, and why.

    ``precision`` maps each group name to int8/fp16/fp32 (a
    :class:`quantlab.precision.GroupPrecision`, the same form as
    ``Provenance.group_precision``); ``reasons`` to what decided it
    (``default``, ``op_defaults[Conv]``, ``rules[2] regex=...``,
    ``overrides``, ``pin``, ``fallback``).
    """

    groups: tuple[FusionGroup, ...]
    precision: GroupPrecision
    reasons: Mapping[str, str] = field(default_factory=dict)
    default: Precision = DEFAULT_PRECISION
    fallback: Precision = DEFAULT_FALLBACK

    def __post_init__(self) -> None:
        if not isinstance(self.precision, GroupPrecision):  # a plain mapping is checked and converted
            object.__setattr__(self, "precision", GroupPrecision(self.precision, where="resolved plan precision"))
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
        changes: dict[str, Precision] = {}
        reasons = dict(self.reasons)
        for name, p in pins.items():
            check_precision(p, f"pin {name!r}")
            group = groups.get(name) or by_node[name]
            if p == INT8 and not group.quantizable:
                raise PlanError(_not_quantizable(group, f"pin {name!r}"))
            changes[group.name] = p
            reasons[group.name] = "pin"
        return dataclasses.replace(self, precision=self.precision.replace(changes), reasons=reasons)

    def int8_asked(self, group: str) -> bool:
        """True when the plan put ``group`` in INT8, or asked INT8 of it and fell back because the group has no INT8
        form (a Loop under an int8 default); False when an override, pin or rule chose its float precision."""
        return self.precision[group] == INT8 or self.reasons.get(group, "").startswith(_FALLBACK_REASON)

    def int8_fraction(self) -> float:
        """Share of quantizable groups that run in INT8 (0.0 when none is quantizable)."""
        q = [g for g in self.groups if g.quantizable]
        return sum(self.precision[g.name] == INT8 for g in q) / len(q) if q else 0.0

    def counts(self) -> dict[str, int]:
        return self.precision.counts()

    def plan_hash(self) -> str:
        """sha256 of the assignment (group -> precision), independent of how it was written. A Loop/Scan/If group
        asked INT8 (its bodies INT8 under ``int8_bodies``) counts apart from one pinned to the precision it fell
        back to (float bodies): both hold that precision, and the same hash had named two models."""
        asked = self._bodies_asked_int8()
        if not asked:
            return self.precision.digest()
        return hashlib.sha256(f"{self.precision.digest()}\nint8 asked of {','.join(asked)}".encode()).hexdigest()

    def _bodies_asked_int8(self) -> list[str]:
        """The control-flow groups asked INT8 that fell back (:meth:`int8_asked`, not INT8 themselves)."""
        return [g.name for g in self.groups if g.anchor_op in CONTROL_FLOW_OPS and self.precision[g.name] != INT8
                and self.int8_asked(g.name)]

    def to_plan(self, description: str = "") -> PrecisionPlan:
        """The effective plan: an override for every group, so it reproduces this assignment exactly; a Loop/Scan/If
        group asked INT8 by an int8 default gets none, so the default asks it again (an override of its fallback
        precision would write its bodies float under ``int8_bodies``)."""
        asked = set(self._bodies_asked_int8()) if self.default == INT8 else set()
        return PrecisionPlan(
            default=self.default,
            overrides={g.name: self.precision[g.name] for g in self.groups if g.name not in asked},
            fallback=self.fallback,
            description=description or f"effective plan {self.plan_hash()[:12]}",
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per group: order, name, anchor op, nodes, quantizable, precision, reason, tensors."""
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


_SHOWN = 8
"""Unknown names an error lists (a plan for another model names hundreds)."""


def _raise_unknown(unknown: Sequence[str], known: Iterable[str], where: str) -> None:
    if not unknown:
        return
    known = sorted(set(known))
    parts = []
    for name in unknown[:_SHOWN]:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        parts.append(f"{name!r}{hint}")
    more = f" and {len(unknown) - _SHOWN} more ({len(unknown)} in all)" if len(unknown) > _SHOWN else ""
    raise PlanError(
        f"{where}: no node called {', '.join(parts)}{more} in the model. Node names are listed in the "
        "'groups' section of a saved effective plan (quantlab build --out DIR writes DIR/plan.json)."
    )


class _Assignment:
    """The precision and reason of each group while a plan is applied, layer by layer of precedence."""

    def __init__(self, plan: PrecisionPlan, groups: Sequence[FusionGroup]) -> None:
        self.plan = plan
        self.groups = groups
        self.by_name = {g.name: g for g in groups}
        self.by_node = {n: g for g in groups for n in g.nodes}
        self.compute = [g for g in groups if g.is_compute]
        self.precision: dict[str, Precision] = {}
        self.reasons: dict[str, str] = {}

    def assign(self, group: FusionGroup, p: Precision, reason: str, is_explicit: bool) -> None:
        if p == INT8 and not group.quantizable:
            if is_explicit:
                raise PlanError(_not_quantizable(group, reason))
            self.precision[group.name] = self.plan.fallback
            self.reasons[group.name] = f"{_FALLBACK_REASON}{reason} asked int8)"
            return
        self.precision[group.name], self.reasons[group.name] = p, reason

    def op_defaults(self) -> None:
        ops_in_model = {op for g in self.groups for op in g.op_types}
        unknown_ops = sorted(op for op in self.plan.op_defaults if op not in ops_in_model)
        if unknown_ops:
            raise PlanError(f"op_defaults names op type(s) {', '.join(map(repr, unknown_ops))} that no node "
                            f"of the model has; the model's ops are {', '.join(sorted(ops_in_model))}")
        for g in self.groups:
            if g.anchor_op in self.plan.op_defaults:
                self.assign(g, self.plan.op_defaults[g.anchor_op], f"op_defaults[{g.anchor_op}]", True)

    def rules(self) -> None:
        unknown_nodes = [r.node for r in self.plan.rules if r.node is not None and r.node not in self.by_node]
        _raise_unknown([n for n in unknown_nodes if n], self.by_node, "plan rules")
        for i, rule in enumerate(self.plan.rules):
            where = f"rules[{i}] {rule.describe()}"
            matched = _rule_groups(rule, self.groups, self.compute, self.by_node)
            if not matched:
                if rule.op_type is not None:
                    raise PlanError(f"{where}: no group is anchored by op {rule.op_type!r}; the anchors in "
                                    f"this model are {', '.join(sorted({g.anchor_op for g in self.groups}))}")
                if rule.regex is not None:
                    raise PlanError(f"{where}: the regex matches no node name; check it against the "
                                    "names in the saved effective plan")
                raise PlanError(f"{where}: matches no group (the model has {len(self.compute)} compute groups)")
            is_explicit = rule.node is not None or rule.op_type is not None
            for g in matched:
                self.assign(g, rule.precision, where, is_explicit)

    def overrides(self) -> None:
        by_name, by_node = self.by_name, self.by_node
        _raise_unknown([n for n in self.plan.overrides if n not in by_name and n not in by_node],
                       list(by_name) + list(by_node), "plan overrides")
        seen: dict[str, tuple[str, Precision]] = {}
        for name, p in self.plan.overrides.items():
            g = by_name.get(name) or by_node[name]
            if g.name in seen and seen[g.name][1] != p:
                raise PlanError(f"plan overrides: {seen[g.name][0]!r} and {name!r} are in the same fusion "
                                f"group {g.name!r} but ask {seen[g.name][1]} and {p}; a group has one precision")
            seen[g.name] = (name, p)
            self.assign(g, p, "overrides", True)


def resolve_plan(plan: PrecisionPlan, proto: onnx.ModelProto) -> ResolvedPlan:
    """Apply ``plan`` to the model's fusion groups, checking every name and int8 request."""
    groups = fusion_groups(proto)
    state = _Assignment(plan, groups)
    for g in groups:
        state.assign(g, plan.default, "default", False)
    state.op_defaults()
    state.rules()
    state.overrides()
    return ResolvedPlan(groups=tuple(groups), precision=GroupPrecision(state.precision), reasons=state.reasons,
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
