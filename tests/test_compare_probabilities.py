"""Outputs a Sigmoid writes, read as the masks their probabilities mark (quantlab.compare.probabilities): which
outputs, and the end-to-end figures against ONNX Runtime run directly on the same samples."""

from __future__ import annotations

import math

import models
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from quantlab.calibrate import calibrate
from quantlab.compare import CompareOptions, compare
from quantlab.compare.probabilities import probability_outputs
from quantlab.data import from_arrays
from quantlab.errors import CompareError, SearchError, ThresholdError
from quantlab.graph import model_from_proto
from quantlab.metrics import binomial_ci
from quantlab.plan import uniform_plan
from quantlab.quantize import WriteOptions, write_model
from quantlab.report.samples import changed_samples
from quantlab.search import SearchOptions
from quantlab.threshold import parse_threshold


def _heads() -> onnx.ModelProto:
    """x[N, 8] -> MatMul -> z[N, 6], read five ways: Sigmoid -> Reshape (tags), Concat of two Sigmoids, a
    Sigmoid scaled (a YOLO box: numbers), a Softmax (class scores), and a Greater (a bool mask)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["z"], name="dense"),
        helper.make_node("Sigmoid", ["z"], ["p"], name="sigmoid"),
        helper.make_node("Reshape", ["p", "shape"], ["tags"], name="tags"),
        helper.make_node("HardSigmoid", ["z"], ["hp"], name="hard_sigmoid"),
        helper.make_node("Concat", ["p", "hp"], ["both"], name="both", axis=1),
        helper.make_node("Mul", ["p", "anchor"], ["boxes"], name="boxes"),
        helper.make_node("Softmax", ["z"], ["classes"], name="classes", axis=-1),
        helper.make_node("Greater", ["p", "half"], ["mask"], name="mask"),
    ]
    outputs = [helper.make_tensor_value_info("tags", TensorProto.FLOAT, ["N", 2, 3]),
               helper.make_tensor_value_info("both", TensorProto.FLOAT, ["N", 12]),
               helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", 6]),
               helper.make_tensor_value_info("classes", TensorProto.FLOAT, ["N", 6]),
               helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", 6])]
    inits = [onnx.numpy_helper.from_array(rng.normal(0, 1, (8, 6)).astype(np.float32), "w"),
             onnx.numpy_helper.from_array(np.array([-1, 2, 3], np.int64), "shape"),
             onnx.numpy_helper.from_array(np.float32(16.0), "anchor"),
             onnx.numpy_helper.from_array(np.float32(0.5), "half")]
    graph = helper.make_graph(nodes, "heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _vad_head(else_op: str) -> onnx.ModelProto:
    """x[N, 4] -> Sigmoid -> If(its batch is 1: Squeeze(axis 1) | else_op) -> ReduceMean -> output [N]: the tail
    of Silero VAD's export (the else branch Identity), or one whose else branch scales the probabilities. Read,
    not run."""
    inits = [onnx.numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("zero", 0), ("one", 1))]
    sq = helper.make_graph([helper.make_node("Squeeze", ["p", "axes"], ["sq"])], "then", [],
                           [helper.make_tensor_value_info("sq", TensorProto.FLOAT, ["N"])],
                           [onnx.numpy_helper.from_array(np.array([1], np.int64), "axes")])
    other = helper.make_graph(
        [helper.make_node("Identity", ["p"], ["el"]) if else_op == "Identity"
         else helper.make_node("Mul", ["p", "two"], ["el"])], "else", [],
        [helper.make_tensor_value_info("el", TensorProto.FLOAT, ["N", 4])],
        [onnx.numpy_helper.from_array(np.float32(2.0), "two")])
    nodes = [helper.make_node("Sigmoid", ["x"], ["p"]),
             helper.make_node("Shape", ["p"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
             helper.make_node("Equal", ["batch", "one"], ["single"]),
             helper.make_node("If", ["single"], ["picked"], then_branch=sq, else_branch=other),
             helper.make_node("ReduceMean", ["picked"], ["speech"], axes=[-1], keepdims=0)]
    graph = helper.make_graph(nodes, "vad_head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("speech", TensorProto.FLOAT, ["N"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_probability_outputs_are_what_a_sigmoid_writes():
    model = model_from_proto(_heads())
    assert probability_outputs(model) == ["tags", "both"]  # not boxes (scaled), classes (softmax), mask (bool)
    assert probability_outputs(model, taken={"tags"}) == ["both"]
    assert probability_outputs(model_from_proto(models.text_detector())) == ["maps"]  # through the Resize
    assert probability_outputs(model_from_proto(models.voice_activity())) == ["prob"]
    assert probability_outputs(model_from_proto(models.text_recognizer())) == []
    assert probability_outputs(model_from_proto(models.conv_net())) == []
    assert probability_outputs(model_from_proto(_vad_head("Identity"))) == ["speech"]  # both branches: p
    assert probability_outputs(model_from_proto(_vad_head("Mul"))) == []  # one branch scales them
    detr = helper.make_graph(  # queries [N, Q, 8] -> MatMul -> Sigmoid -> boxes [N, Q, 4], as DETR writes them
        [helper.make_node("MatMul", ["queries", "w"], ["z"]), helper.make_node("Sigmoid", ["z"], ["boxes"])], "detr",
        [helper.make_tensor_value_info("queries", TensorProto.FLOAT, ["N", 10, 8])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", 10, 4])],
        [onnx.numpy_helper.from_array(np.ones((8, 4), np.float32), "w")])
    detr_model = model_from_proto(helper.make_model(detr, opset_imports=[helper.make_opsetid("", 17)]))
    assert probability_outputs(detr_model) == []  # normalised cx, cy, w, h: no mask


def _runs(proto: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    """The map over ``images`` in batches of 4, as the comparisons below run it."""
    return models.run_exact(proto, "image", "maps", images, 4)


@pytest.fixture(scope="module")
def detector_int8():
    """(model, its INT8 TensorRT-form write, 12 validation images): calibrated on narrow data, so it saturates and
    its masks differ from the reference's."""
    model = model_from_proto(models.text_detector(), label="detector")
    rng = np.random.default_rng(0)
    calib = from_arrays({"image": rng.uniform(-0.8, 0.8, (8, 3, 32, 48)).astype(np.float32)})
    images = rng.uniform(-1, 1, (12, 3, 32, 48)).astype(np.float32)
    images[-1] *= 0.01  # a page without text: nothing above the threshold in the reference
    table = calibrate(model, calib, "minmax", batch_size=4).tables["minmax"]
    return model, write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt")), images


def _by_hand(ref: np.ndarray, cand: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: % of pixels on the same side of ``threshold``, and IoU % of the masks (NaN where both empty)."""
    r, c = (ref > threshold).reshape(len(ref), -1), (cand > threshold).reshape(len(cand), -1)
    agree = (r == c).mean(axis=1) * 100.0
    iou = np.array([(a & b).sum() / (a | b).sum() * 100.0 if (a | b).any() else math.nan for a, b in zip(r, c)])
    return agree, iou


@pytest.mark.parametrize("threshold", [0.3, 0.5])
def test_mask_figures_match_onnxruntime_run_directly(detector_int8, threshold):
    model, written, images = detector_int8
    ref, cand = _runs(model.proto, images), _runs(written.proto, images)
    agree, iou = _by_hand(ref, cand, threshold)
    exact = agree == 100.0
    assert 0 < exact.sum() < 11 and np.nanmin(iou) < 95, "the check needs masks that differ and masks that agree"
    assert math.isnan(iou[-1])  # the page without text: no foreground in either mask

    options = CompareOptions(batch_size=4, local=False, bootstrap=200, workers=1, decision_threshold=threshold,
                             backend_options={"threads": 1, "qdq_fusion": False})
    result = compare(model, {"int8": written}, from_arrays({"image": images}, role="validation"), options)
    row = result.end_to_end.set_index(["candidate", "output"]).loc[("int8", "maps")]
    assert row["element_match"] == pytest.approx(agree.mean())
    assert row["exact_match"] == pytest.approx(exact.mean() * 100.0)
    lo, hi = binomial_ci(int(exact.sum()), 12, 0.95)
    assert (row["exact_match_ci_low"], row["exact_match_ci_high"]) == pytest.approx((100 * lo, 100 * hi))
    assert row["mask_iou"] == pytest.approx(np.nanmean(iou))
    assert row["mask_iou_ci_low"] <= row["mask_iou"] <= row["mask_iou_ci_high"]
    assert 0 < row["cosine"] < 1  # still numbers: cosine and SQNR stay
    per_sample = result.per_sample[result.per_sample["output"] == "maps"]
    np.testing.assert_allclose(per_sample["element_match"], agree)
    np.testing.assert_allclose(per_sample["mask_iou"], iou)
    assert per_sample["exact_agree"].tolist() == exact.tolist()
    assert result.settings["decision_threshold"] == threshold
    assert result.check(f"mask_iou>={np.nanmean(iou) + 0.5}")["int8"].passed is False
    assert result.check(f"mask_iou>={np.nanmean(iou) - 0.5}")["int8"].passed is True

    (example,) = result.mask_examples  # the sample of lowest IoU, its two masks as planes
    worst = int(np.nanargmin(iou))
    assert (example.candidate, example.output, example.sample) == ("int8", "maps", worst)
    assert example.iou == pytest.approx(iou[worst])
    np.testing.assert_array_equal(example.reference, ref[worst, 0] > threshold)
    np.testing.assert_array_equal(example.changed, cand[worst, 0] > threshold)

    changed = changed_samples(result.per_sample, shown=100)
    assert sorted(changed["sample"]) == [i for i in range(12) if not exact[i]]
    shown = changed["change"].str.extract(r"^mask: IoU ([0-9.]+) %, ([0-9.]+) % of elements agree$").astype(float)
    assert not shown.isna().any().any()
    assert list(shown[0]) == sorted(shown[0])  # the least overlap first
    np.testing.assert_allclose(shown[0], np.round(iou[changed["sample"]], 1))


def test_the_threshold_decides_the_masks(detector_int8):
    model, written, images = detector_int8
    ref, cand = _runs(model.proto, images), _runs(written.proto, images)
    figures, warned = {}, {}
    for threshold in (0.3, 0.5, 0.999):
        options = CompareOptions(batch_size=4, per_layer=False, bootstrap=0, workers=1, decision_threshold=threshold,
                                 backend_options={"threads": 1, "qdq_fusion": False})
        result = compare(model, {"int8": written}, from_arrays({"image": images}, role="validation"), options)
        figures[threshold] = result.end_to_end.iloc[0]["mask_iou"]
        warned[threshold] = [w for w in result.warnings if "--decision-threshold" in w]
        if threshold < 0.9:
            assert figures[threshold] == pytest.approx(np.nanmean(_by_hand(ref, cand, threshold)[1]))
    assert figures[0.3] != figures[0.5]
    assert (ref <= 0.999).all() and math.isnan(figures[0.999])  # nothing marked: no overlap to measure ...
    assert warned[0.3] == warned[0.5] == [] and len(warned[0.999]) == 1  # ... and the comparison says why
    assert "at decision threshold 0.999 the reference marks none of the elements of every sample" in warned[0.999][0]


def test_mask_iou_by_hand():
    from quantlab.metrics import decision_mask, marked_share, mask_iou

    p = np.array([[0.1, 0.6, 0.7, np.nan], [0.2, 0.1, 0.0, 0.3]], np.float32)
    assert decision_mask(p, 0.5).tolist() == [[False, True, True, False], [False, False, False, False]]
    ref = np.array([[0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]], bool)
    cand = np.array([[0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0]], bool)
    np.testing.assert_allclose(mask_iou(ref, cand), [200 / 3, np.nan, 0.0])
    valid = np.array([[True] * 3 + [False] * 4, [True] * 7, [False] + [True] * 6])  # padding masks positions
    np.testing.assert_allclose(mask_iou(ref, cand, valid), [100.0, np.nan, 0.0])
    with pytest.raises(ValueError, match="do not pair up"):
        mask_iou(ref, cand[:, :3])
    np.testing.assert_allclose(marked_share(ref), [300 / 7, 0.0, 100 / 7])
    np.testing.assert_allclose(marked_share(ref, valid), [100 / 3, 0.0, 0.0])


def test_decision_threshold_must_be_a_probability(detector_int8, tmp_path, capsys):
    for bad in (0.0, 1.0, 1.5, math.nan, True):
        with pytest.raises(CompareError, match="decision_threshold must be a probability"):
            CompareOptions(decision_threshold=bad)
    with pytest.raises(SearchError, match="decision_threshold"):
        SearchOptions(threshold="cosine>=0.99", decision_threshold=2.0).check()
    from quantlab.cli import main

    model, _, images = detector_int8
    path = tmp_path / "detector.onnx"
    onnx.save(model.proto, path)
    np.savez(tmp_path / "val.npz", image=images)
    code = main(["compare", str(path), str(path), "--data", str(tmp_path / "val.npz"), "--out", str(tmp_path / "o"),
                 "--decision-threshold", "1.5"])
    assert code == 2 and "--decision-threshold: must be a probability in (0, 1)" in capsys.readouterr().err
    code = main(["compare", str(path), str(path), "--data", str(tmp_path / "val.npz"), "--out", str(tmp_path / "o"),
                 "--decision-threshold", "half"])
    assert code == 2 and "must be a probability in (0, 1), e.g. 0.5; got 'half'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_thresholds_may_name_mask_iou_where_a_model_has_probabilities():
    from quantlab.cli.compare import known_metrics

    known = known_metrics(model_from_proto(models.text_detector()), use_labels=False)
    assert parse_threshold("mask_iou_ci_low>=95", known_metrics=known).metrics == ("mask_iou_ci_low",)
    assert parse_threshold("element_match>=99", known_metrics=known).metrics == ("element_match",)
    with pytest.raises(ThresholdError, match="reported for outputs a Sigmoid writes.*this model has none"):
        parse_threshold("mask_iou>=95", known_metrics=known_metrics(model_from_proto(models.conv_net()), False))


def test_mask_examples_survive_the_folder_and_merge_to_the_worst(detector_int8, tmp_path):
    from dataclasses import replace

    from quantlab.compare import load_comparison
    from quantlab.compare.mask_examples import MASK_EXAMPLES_FILE, load_mask_examples, mask_plane, worst_of

    model, written, images = detector_int8
    result = compare(model, {"int8": written}, from_arrays({"image": images}, role="validation"),
                     CompareOptions(batch_size=4, per_layer=False, bootstrap=0, workers=1))
    result.save(tmp_path / "cmp")
    (back,) = load_comparison(tmp_path / "cmp").mask_examples
    (kept,) = result.mask_examples
    assert (back.candidate, back.output, back.sample, back.key, back.iou) == (
        kept.candidate, kept.output, kept.sample, kept.key, kept.iou)
    assert np.array_equal(back.reference, kept.reference) and np.array_equal(back.changed, kept.changed)
    # a shard's worse sample replaces the kept one; a tie keeps the earlier
    assert worst_of(kept, replace(kept, sample=99, iou=kept.iou - 1)).sample == 99
    assert worst_of(kept, replace(kept, sample=99)).sample == kept.sample
    assert worst_of(None, kept) is kept and worst_of(kept, None) is kept
    # planes only: a probability per sample or tags are no picture
    assert mask_plane(np.ones((1, 4, 5), bool)).shape == (4, 5)
    assert mask_plane(np.ones((1,), bool)) is None and mask_plane(np.ones((3, 4, 5), bool)) is None
    assert mask_plane(np.ones((40,), bool)) is None
    (tmp_path / "cmp" / MASK_EXAMPLES_FILE).write_bytes(b"not a zip")
    with pytest.raises(CompareError, match=f"{MASK_EXAMPLES_FILE}: unreadable mask examples"):
        load_mask_examples(tmp_path / "cmp")


def test_mean_class_iou_by_hand():
    from quantlab.metrics import mean_class_iou

    ref = np.array([[0, 0, 0, 0, 1, 1, 2, 2], [3, 3, 3, 3, 3, 3, 3, 3]])
    cand = np.array([[0, 0, 0, 1, 1, 1, 2, 0], [3, 3, 3, 3, 3, 3, 3, 3]])
    # sample 0: class 0 {0,1,2,3} vs {0,1,2,7}: 3/5; class 1 {4,5} vs {3,4,5}: 2/3; class 2 {6,7} vs {6}: 1/2
    np.testing.assert_allclose(mean_class_iou(ref, cand, 4), [(3 / 5 + 2 / 3 + 1 / 2) / 3 * 100, 100.0])
    with pytest.raises(ValueError, match="do not pair up"):
        mean_class_iou(ref, cand[:, :4], 4)
