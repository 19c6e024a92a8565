"""The threshold language shared by ``compare --fail-if``, ``search --threshold`` and experiments.

A threshold is one or more conditions joined by ``and`` (or ``,``)::

    top1_drop<=0.5
    cosine>=0.999 and sqnr_db>=30
    top1_drop_ci_high<=1.0          # the pessimistic end of its 95 % interval
    my_metric>0.9                   # a user metric from --metric module:function

Each metric names a column of the comparator's end-to-end table (one row per
candidate and model output). A condition holds for a candidate when it holds
on every output row that reports the metric (NaN: not applicable to that
output); a metric no row reports is an error that lists the metrics that
exist, never a silent pass, and a metric that is NaN on every row fails.

``compare --fail-if EXPR`` fails when EXPR holds; ``search --threshold EXPR``
looks for a plan where EXPR holds. Same parser, same columns.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ThresholdError

__all__ = ["Condition", "Threshold", "ThresholdCheck", "parse_threshold"]

_OPS = ("<=", ">=", "<", ">")
_CONDITION = re.compile(
    r"\s*(?P<metric>[A-Za-z_][A-Za-z0-9_.\-]*)\s*(?P<op><=|>=|<|>)\s*"
    r"(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*%?\s*"
)
_SPLIT = re.compile(r"\s+and\s+|\s*,\s*|\s*&&\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Condition:
    """``metric op value``; ``higher_is_better`` follows from the operator."""

    metric: str
    op: str
    value: float

    @property
    def higher_is_better(self) -> bool:
        return self.op in (">=", ">")

    def holds(self, x: float) -> bool:
        if x is None or math.isnan(x):
            return False
        return {"<=": x <= self.value, ">=": x >= self.value, "<": x < self.value, ">": x > self.value}[self.op]

    def margin(self, x: float) -> float:
        """How far ``x`` is on the good side of the target (negative: missed by that much)."""
        if x is None or math.isnan(x):
            return -math.inf
        return x - self.value if self.higher_is_better else self.value - x

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


@dataclass(frozen=True)
class ThresholdCheck:
    """The outcome of a threshold on one candidate: per condition the worst value over outputs."""

    threshold: str
    passed: bool
    values: Mapping[str, float]
    margins: Mapping[str, float]

    @property
    def margin(self) -> float:
        """The smallest margin over conditions (negative when the threshold is missed)."""
        return min(self.margins.values()) if self.margins else math.inf

    def as_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "passed": self.passed, "values": dict(self.values),
                "margins": dict(self.margins)}


@dataclass(frozen=True)
class Threshold:
    text: str
    conditions: tuple[Condition, ...]

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.metric for c in self.conditions))

    def check(self, rows: Sequence[Mapping[str, Any]] | Any) -> ThresholdCheck:
        """Evaluate on one candidate's end-to-end rows (dicts or a DataFrame, one row per output)."""
        records = _records(rows)
        values: dict[str, float] = {}
        margins: dict[str, float] = {}
        passed = True
        for cond in self.conditions:
            present = [_number(r[cond.metric]) for r in records if cond.metric in r and _number(r[cond.metric]) is not None]
            # an output where the metric does not apply (top1 of a regression head) reports NaN: skip it,
            # unless no output has a number, then NaN stays and the condition fails
            finite = [x for x in present if not math.isnan(x)]
            present = finite or present
            if not present:
                available = sorted({k for r in records for k, v in r.items() if _number(v) is not None})
                raise ThresholdError(
                    f"threshold {self.text!r} names metric {cond.metric!r}, which the comparison did not "
                    f"report{_hint(cond.metric)}; metrics available: {', '.join(available) or 'none'}"
                )
            worst = min(present, key=cond.margin)
            values[str(cond)] = worst
            margins[str(cond)] = cond.margin(worst)
            passed = passed and cond.holds(worst)
        return ThresholdCheck(self.text, passed, values, margins)

    def unjudged_note(self, rows: Sequence[Mapping[str, Any]] | Any) -> str | None:
        """A note naming the outputs of the end-to-end ``rows`` on which no condition reads a number, so the
        threshold holds whatever they hold (an integer output has no cosine: EnCodec's codes, 0 % exact, passed
        ``cosine>=0.99`` on its audio), with the figures they do report; None when every output is judged."""
        records = _records(rows)
        unjudged: dict[str, Mapping[str, Any]] = {}
        for r in records:
            if "output" in r and not any(_finite(r.get(c.metric)) for c in self.conditions):
                unjudged.setdefault(str(r["output"]), r)
        if not unjudged or len(unjudged) == len({str(r.get("output")) for r in records}):
            return None  # no output is judged: check() fails or raises on its own
        shown = []
        for name, r in unjudged.items():
            figures = [f"{m} {float(r[m]):.4g}" for m in _OUTPUT_FIGURES if _finite(r.get(m))][:2]
            whose = f"{r['candidate']}: " if "candidate" in r else ""
            shown.append(f"{name!r}" + (f" ({whose}{', '.join(figures)})" if figures else ""))
        metrics = " or ".join(self.metrics)
        example = next((m for m in _OUTPUT_FIGURES if any(_finite(r.get(m)) for r in unjudged.values())), None)
        return (f"threshold {self.text!r} does not judge output(s) {', '.join(shown)}: they report no {metrics}"
                + (f"; add a condition on what they report, e.g. '{example}>=...'" if example else ""))

    def nan_reasons(self, rows: Sequence[Mapping[str, Any]] | Any) -> list[str]:
        """Why each condition that reads NaN on every output of the end-to-end ``rows`` does: the candidate's
        outputs hold NaN/inf (``nan_count``), no sample's output had the reference's shape (``shape_mismatch``),
        or no output reports the metric (an integer output has no cosine). [] when every condition reads a
        number."""
        records = _records(rows)
        out = []
        for cond in self.conditions:
            if any(_finite(r.get(cond.metric)) for r in records):
                continue
            nonfinite = sum(int(_number(r.get("nan_count")) or 0) for r in records)
            whole = [str(r.get("output")) for r in records
                     if 0 < (_number(r.get("samples")) or 0) <= (_number(r.get("shape_mismatch")) or 0)]
            if nonfinite:
                why = f"the candidate's outputs hold {nonfinite} NaN/inf value(s) (nan_count)"
            elif whole:
                why = (f"no sample's {', '.join(map(repr, whole[:3]))} had the reference's shape (shape_mismatch), "
                       "so no sample has figures")
            else:
                reported = [m for m in _OUTPUT_FIGURES if any(_finite(r.get(m)) for r in records)]
                why = (f"no output reports {cond.metric}" + (f" (they report {', '.join(reported[:3])})"
                                                             if reported else ""))
            out.append(f"{cond} is NaN: {why}")
        return out

    def __str__(self) -> str:
        return self.text


_OUTPUT_FIGURES = ("exact_match", "element_match", "mask_iou", "token_agreement", "sqnr_db", "cosine")
"""What an output the threshold does not judge is shown by (and a condition suggested on), the first reported."""


def _finite(v: Any) -> bool:
    x = _number(v)
    return x is not None and not math.isnan(x)


_LABEL_METRIC = re.compile(r"(ref_)?top[15](_drop|_accuracy)?(_ci_low|_ci_high)?|mcnemar_p|(ref|cand)_only_correct")
"""Columns the comparator reports only with labels (quantlab.compare.LABEL_COLUMNS)."""


def _hint(metric: str) -> str:
    """Why a metric may be missing, when the reason is known: label metrics need a labelled set, free-running
    figures a sequence set, the CTC text's figures (quantlab.compare's CTC_COLUMNS) the blank class, mask_iou an
    output a Sigmoid writes, the per-position figures an output read as class maps."""
    if metric.removesuffix("_ci_low").removesuffix("_ci_high") in ("text_agreement", "cer"):
        return (f" ({metric} reads CTC scores as text: give the blank class of the model's [N, T, C] output, "
                "--ctc-blank K, or ctc_blank = K in an experiment or sweep file)")
    if metric.removesuffix("_ci_low").removesuffix("_ci_high") == "mask_iou":
        return (f" ({metric} is reported for outputs a Sigmoid writes (a text detector's map, tags, voice "
                "activity), read as masks; this model has none)")
    if metric.removesuffix("_ci_low").removesuffix("_ci_high") in ("miou", "token_agreement", "sequence_agreement"):
        return (f" ({metric} is reported for outputs read as a class per position (text, tokens, pixels): an output "
                "[N, C, H, W] or [N, T, C] straight from a 1x1 conv or MatMul is read as values unless named: "
                "--class-map OUTPUT, or class_maps = [\"OUTPUT\"] in an experiment file)")
    if metric.startswith("free_"):
        return (f" ({metric} is a free-running figure: compare reports them in sequence mode only, when the "
                "validation set's manifest has a [sequence] table naming the state its model carries)")
    if _LABEL_METRIC.fullmatch(metric):
        return (f" ({metric} compares predictions with labels: the validation set needs a [labels] table in its "
                "manifest, e.g. [labels] regex = '_(\\d+)\\.jpg$' or column = \"label\" (see "
                "calib_sets/README.md), and the model a classifier output [N, classes])")
    return ""


def _records(rows: Any) -> list[Mapping[str, Any]]:
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):
        return list(rows.to_dict("records"))
    if isinstance(rows, Mapping):
        return [rows]
    return list(rows)


def _number(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x


def parse_threshold(text: str | Threshold, *, known_metrics: Iterable[str] | None = None) -> Threshold:
    """Parse ``text``; with ``known_metrics`` also refuse a metric that will never be reported."""
    if isinstance(text, Threshold):
        return text
    if not isinstance(text, str) or not text.strip():
        raise ThresholdError("empty threshold; write e.g. 'top1_drop<=0.5' or 'cosine>=0.999'")
    conditions = []
    if re.search(r"\s(or|\|\|)\s", text, re.IGNORECASE):
        raise ThresholdError(f"threshold {text!r}: conditions join with 'and' only; for a gate that fails when any "
                             "one of several holds, give each its own --fail-if (compare takes it repeated)")
    for part in _SPLIT.split(text.strip()):
        m = _CONDITION.fullmatch(part)
        if not m:
            raise ThresholdError(
                f"cannot read {part!r} in threshold {text!r}: write metric, one of {' '.join(_OPS)}, and a "
                "number, e.g. 'top1_drop<=0.5' or 'cosine>=0.999 and sqnr_db>=30'"
            )
        conditions.append(Condition(m["metric"], m["op"], float(m["value"])))
    if known_metrics is not None:
        known = set(known_metrics)
        for c in conditions:
            base = c.metric.removesuffix("_ci_low").removesuffix("_ci_high")
            if c.metric not in known and base != c.metric and base in known:  # parsed, then failed after the run
                with_ci = sorted(k.removesuffix("_ci_low") for k in known if k.endswith("_ci_low"))
                raise ThresholdError(f"threshold {text!r} names {c.metric!r}, but {base!r} gets no confidence "
                                     f"interval; gate on {base!r} itself, or on one with an interval: "
                                     f"{', '.join(with_ci) or 'none here'}")
            if c.metric not in known:
                close = difflib.get_close_matches(c.metric, sorted(known), n=1)
                hint = _hint(c.metric) or (f" (did you mean {close[0]!r}?)" if close else "")
                raise ThresholdError(f"threshold {text!r} names unknown metric {c.metric!r}{hint}; known: "
                                     f"{', '.join(sorted(known))}")
    return Threshold(text.strip(), tuple(conditions))
