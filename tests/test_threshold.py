from __future__ import annotations

import math

import pandas as pd
import pytest

from quantlab.errors import ThresholdError
from quantlab.threshold import Condition, Threshold, parse_threshold


@pytest.mark.parametrize("text,conditions", [
    ("top1_drop<=0.5", [("top1_drop", "<=", 0.5)]),
    ("  cosine >= 0.999  ", [("cosine", ">=", 0.999)]),
    ("cosine>=0.999 and sqnr_db>=30", [("cosine", ">=", 0.999), ("sqnr_db", ">=", 30.0)]),
    ("cosine>=0.999, sqnr_db>30", [("cosine", ">=", 0.999), ("sqnr_db", ">", 30.0)]),
    ("a<1 && b>-2e-3", [("a", "<", 1.0), ("b", ">", -0.002)]),
    ("top1_drop < 0.5%", [("top1_drop", "<", 0.5)]),
    ("x>=.5 AND y<=+3", [("x", ">=", 0.5), ("y", "<=", 3.0)]),
    ("my.metric-v2>1", [("my.metric-v2", ">", 1.0)]),
])
def test_parse_valid(text, conditions):
    t = parse_threshold(text)
    assert [(c.metric, c.op, c.value) for c in t.conditions] == conditions
    assert t.text == text.strip() and str(t) == text.strip()
    assert parse_threshold(t) is t


@pytest.mark.parametrize("text", ["", "   ", "cosine", "cosine = 0.9", "cosine>=high", ">=0.9",
                                  "cosine=>0.9", "1x>=2"])
def test_parse_invalid_names_the_part(text):
    with pytest.raises(ThresholdError) as err:
        parse_threshold(text)
    assert "top1_drop<=0.5" in str(err.value) or "empty" in str(err.value)


@pytest.mark.parametrize("text", ["cosine>=0.9 or x<1", "cosine<0.999 OR det_f1<0.9", "a>1 || b>2"])
def test_or_says_how_to_gate_on_any_one_condition(text):
    with pytest.raises(ThresholdError, match="join with 'and' only.*give each its own --fail-if"):
        parse_threshold(text)


def test_known_metrics_accept_interval_suffixes_and_refuse_unknown():
    known = {"cosine", "cosine_ci_low", "cosine_ci_high", "top1_drop", "top1_drop_ci_low", "top1_drop_ci_high",
             "sqnr_db"}
    assert parse_threshold("top1_drop_ci_high<=1", known_metrics=known).metrics == ("top1_drop_ci_high",)
    with pytest.raises(ThresholdError, match="unknown metric 'cosin'"):
        parse_threshold("cosin>=0.9", known_metrics=known)
    # SQNR gets no interval: accepted when parsed, it used to fail after the whole run ("did not report")
    with pytest.raises(ThresholdError, match=r"'sqnr_db' gets no confidence interval.*cosine, top1_drop"):
        parse_threshold("sqnr_db_ci_low>=30", known_metrics=known)


def test_condition_semantics():
    c = Condition("cosine", ">=", 0.99)
    assert c.higher_is_better and c.holds(0.99) and not c.holds(0.98)
    assert c.margin(0.995) == pytest.approx(0.005) and c.margin(0.98) == pytest.approx(-0.01)
    d = Condition("top1_drop", "<", 0.5)
    assert not d.higher_is_better and d.holds(0.4) and not d.holds(0.5)
    assert d.margin(0.2) == pytest.approx(0.3)
    assert not c.holds(math.nan) and c.margin(math.nan) == -math.inf
    assert str(d) == "top1_drop<0.5"


def _rows():
    return pd.DataFrame([
        {"candidate": "a", "output": "logits", "cosine": 0.999, "sqnr_db": 31.0, "top1_drop": 0.2},
        {"candidate": "a", "output": "aux", "cosine": 0.990, "sqnr_db": 35.0, "top1_drop": 0.4},
    ])


def test_check_takes_the_worst_output_per_condition():
    t = parse_threshold("cosine>=0.995 and sqnr_db>=30")
    check = t.check(_rows())
    assert not check.passed
    assert check.values == {"cosine>=0.995": 0.990, "sqnr_db>=30": 31.0}
    assert check.margins["cosine>=0.995"] == pytest.approx(-0.005)
    assert check.margin == pytest.approx(-0.005)
    ok = parse_threshold("top1_drop<=0.5").check(_rows())
    assert ok.passed and ok.values == {"top1_drop<=0.5": 0.4}
    assert ok.as_dict()["passed"] is True
    # records (dicts) and a single mapping work like a DataFrame
    assert parse_threshold("top1_drop<=0.5").check(_rows().to_dict("records")).passed
    assert parse_threshold("cosine>=0.995").check({"cosine": 0.999}).passed


def test_check_refuses_a_metric_no_row_reports_and_lists_what_exists():
    with pytest.raises(ThresholdError) as err:
        parse_threshold("top1_accuracy>=70").check(_rows())
    msg = str(err.value)
    assert "top1_accuracy" in msg and "cosine" in msg and "sqnr_db" in msg and "labels" in msg
    with pytest.raises(ThresholdError, match="did not report"):
        parse_threshold("iou>0.5").check(_rows())


def test_nan_values_fail_the_condition():
    rows = pd.DataFrame([{"cosine": math.nan}])
    check = parse_threshold("cosine>=0.9").check(rows)
    assert not check.passed and math.isnan(check.values["cosine>=0.9"])
    assert check.margin == -math.inf


def test_threshold_is_a_plain_value():
    t = parse_threshold("a<1, b>2")
    assert isinstance(t, Threshold) and t.metrics == ("a", "b")
    assert parse_threshold("a<1, b>2") == t


def test_nan_on_an_output_where_the_metric_does_not_apply_is_skipped_but_all_nan_fails():
    from quantlab.threshold import parse_threshold

    t = parse_threshold("top1_drop<=0.5")
    rows = [{"output": "logits", "top1_drop": 0.2}, {"output": "boxes", "top1_drop": float("nan")}]
    assert t.check(rows).passed
    rows_bad = [{"output": "logits", "top1_drop": 0.9}, {"output": "boxes", "top1_drop": float("nan")}]
    assert not t.check(rows_bad).passed
    assert not t.check([{"output": "boxes", "top1_drop": float("nan")}]).passed


@pytest.mark.parametrize("metric", ["top1_drop", "top5_drop_ci_high", "ref_top1", "top1", "mcnemar_p"])
def test_a_label_metric_on_an_unlabelled_comparison_says_to_add_labels(metric):
    """Both ways a threshold learns a metric is missing: up front (known metrics) and on the result rows."""
    with pytest.raises(ThresholdError) as err:
        parse_threshold(f"{metric}<=0.5", known_metrics={"cosine", "sqnr_db", "top1_agreement"})
    assert "[labels]" in str(err.value) and "calib_sets/README.md" in str(err.value)
    with pytest.raises(ThresholdError) as err:
        parse_threshold(f"{metric}<=0.5").check([{"cosine": 0.99, "sqnr_db": 30.0}])
    assert "[labels]" in str(err.value) and "cosine" in str(err.value)


def test_other_unknown_metrics_get_no_label_advice_but_a_close_match():
    with pytest.raises(ThresholdError) as err:
        parse_threshold("cosin>=0.9", known_metrics={"cosine", "sqnr_db"})
    assert "did you mean 'cosine'" in str(err.value) and "[labels]" not in str(err.value)
    with pytest.raises(ThresholdError) as err:
        parse_threshold("iou>0.5").check([{"cosine": 0.99}])
    assert "[labels]" not in str(err.value)


def test_outputs_no_condition_reads_are_named():
    """An integer output has no cosine: ``cosine>=0.99`` passed EnCodec with its codes 0 % exact. The note names
    such outputs with the figures they report; none when every output is judged, or when none is (check fails)."""
    t = parse_threshold("cosine>=0.99")
    rows = [{"candidate": "int8", "output": "audio", "cosine": 0.9999, "exact_match": math.nan},
            {"candidate": "int8", "output": "codes", "cosine": math.nan, "exact_match": 0.0, "element_match": 72.5}]
    assert t.check(rows).passed
    assert t.unjudged_note(rows) == ("threshold 'cosine>=0.99' does not judge output(s) 'codes' (int8: exact_match "
                                     "0, element_match 72.5): they report no cosine; add a condition on what they "
                                     "report, e.g. 'exact_match>=...'")
    assert parse_threshold("cosine>=0.99, exact_match>=50").unjudged_note(rows) is None
    assert t.unjudged_note(rows[:1]) is None
    assert t.unjudged_note(rows[1:]) is None  # nothing judged: check() itself fails
    assert not t.check(rows[1:]).passed


def test_a_condition_that_reads_nan_says_why():
    """`--fail-if` on a NaN figure said only "cosine<0.9 is NaN": the candidate's NaN outputs, a data-sized output
    no sample of which kept the reference's shape, and an output that does not report the metric read alike."""
    t = parse_threshold("cosine>=0.9")
    nan = math.nan
    assert t.nan_reasons([{"output": "y", "samples": 4, "cosine": nan, "nan_count": 12, "shape_mismatch": 0}]) == [
        "cosine>=0.9 is NaN: the candidate's outputs hold 12 NaN/inf value(s) (nan_count)"]
    (why,) = t.nan_reasons([{"output": "boxes", "samples": 4, "cosine": nan, "nan_count": 0, "shape_mismatch": 4}])
    assert why == ("cosine>=0.9 is NaN: no sample's 'boxes' had the reference's shape (shape_mismatch), so no "
                   "sample has figures")
    assert t.nan_reasons([{"output": "ids", "samples": 4, "cosine": nan, "exact_match": 75.0, "nan_count": 0,
                           "shape_mismatch": 0}]) == [
        "cosine>=0.9 is NaN: no output reports cosine (they report exact_match)"]
    assert t.nan_reasons([{"output": "y", "samples": 4, "cosine": 0.5, "shape_mismatch": 1}]) == []


@pytest.mark.parametrize("metric", ["miou", "token_agreement_ci_low", "sequence_agreement"])
def test_a_class_map_metric_of_a_model_whose_maps_read_as_values_names_class_map(metric):
    """SegFormer's 1/4-resolution logits straight from a 1x1 conv are compared as values unless named: a search on
    miou>=97 was refused as "unknown metric 'miou'" with nothing said of --class-map."""
    with pytest.raises(ThresholdError, match=r"--class-map OUTPUT, or class_maps"):
        parse_threshold(f"{metric}>=97", known_metrics={"cosine", "sqnr_db"})
