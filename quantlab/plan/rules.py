"""What the user asks for: a :class:`PrecisionPlan` of a default, op defaults, rules and overrides.

Precedence, lowest first: ``default`` < ``op_defaults`` < ``rules`` (in order)
< ``overrides``. A :class:`Rule` has exactly one matcher: ``node`` (the group
holding that node), ``regex`` (any node name in the group), ``op_type`` (the
group's anchor op), ``first`` / ``last`` (the first / last N compute groups).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import PlanError
from ..precision import DEFAULT_FALLBACK, DEFAULT_PRECISION, INT8, Precision, check_precision

__all__ = ["RULE_MATCHERS", "Rule", "PrecisionPlan", "uniform_plan", "rule_from_dict"]

RULE_MATCHERS: tuple[str, ...] = ("node", "regex", "op_type", "first", "last")


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
        check_precision(self.precision, f"rule {self.describe()}")
        set_ = [m for m in RULE_MATCHERS if getattr(self, m) is not None]
        if len(set_) != 1:
            raise PlanError(
                f"a plan rule needs exactly one of {', '.join(RULE_MATCHERS)}; got "
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
        return next(m for m in RULE_MATCHERS if getattr(self, m) is not None)

    def describe(self) -> str:
        m = next((m for m in RULE_MATCHERS if getattr(self, m, None) is not None), None)
        return f"{m}={getattr(self, m)!r}" if m else "<no matcher>"

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {m: getattr(self, m) for m in RULE_MATCHERS if getattr(self, m) is not None}
        d["precision"] = self.precision
        return d


def rule_from_dict(r: Any, where: str) -> Rule:
    """A :class:`Rule` from its file form (a table of one matcher and ``precision``), checked."""
    if not isinstance(r, Mapping):
        raise PlanError(f"{where} must be a table, got {r!r}")
    extra = sorted(set(r) - set(RULE_MATCHERS) - {"precision"})
    if extra:
        raise PlanError(f"{where} has unknown key(s) {', '.join(map(repr, extra))}; "
                        f"use one of {', '.join(RULE_MATCHERS)} and 'precision'")
    if "precision" not in r:
        raise PlanError(f"{where} has no 'precision'")
    try:
        return Rule(**{k: r[k] for k in r})
    except PlanError as exc:
        raise PlanError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class PrecisionPlan:
    """What the user asked for; see :mod:`quantlab.plan.files` for the file format.

    ``fallback`` is what a group that cannot be INT8 gets when int8 reaches it
    through ``default``, a regex or first/last (fp32, or fp16 for speed).
    """

    default: Precision = DEFAULT_PRECISION
    op_defaults: Mapping[str, Precision] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    overrides: Mapping[str, Precision] = field(default_factory=dict)
    fallback: Precision = DEFAULT_FALLBACK
    description: str = ""

    def __post_init__(self) -> None:
        check_precision(self.default, "plan default")
        check_precision(self.fallback, "plan fallback")
        if self.fallback == INT8:
            raise PlanError("plan fallback must be fp16 or fp32: it is used where int8 is impossible")
        object.__setattr__(self, "op_defaults", dict(self.op_defaults))
        object.__setattr__(self, "overrides", dict(self.overrides))
        rules = []
        for i, rule in enumerate(self.rules):
            if isinstance(rule, Mapping):
                rule = rule_from_dict(rule, f"rules[{i}]: rules[0]")
            if not isinstance(rule, Rule):
                raise PlanError(f"rules[{i}] is a {type(rule).__name__}, not a Rule or a table like "
                                "{'first': 1, 'precision': 'fp16'}")
            rules.append(rule)
        object.__setattr__(self, "rules", tuple(rules))
        for op, p in self.op_defaults.items():
            check_precision(p, f"op_defaults[{op!r}]")
        for name, p in self.overrides.items():
            check_precision(p, f"overrides[{name!r}]")


def uniform_plan(precision: Precision) -> PrecisionPlan:
    """Every group at ``precision`` (non-quantizable groups fall back to fp32 under int8)."""
    check_precision(precision, "uniform plan")
    return PrecisionPlan(default=precision)
