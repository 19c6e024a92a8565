"""Outputs read as choices (quantlab.compare.choices): which outputs score classes at every position or hold
integers, the numeric kernels alone, and the end-to-end columns against ONNX Runtime run directly on the same
samples."""

from __future__ import annotations

import models
from reference_text import ctc_text, levenshtein
import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantlab.calibrate import calibrate
from quantlab.compare import CompareOptions, compare
from quantlab.compare.choices import best_positions, exact_outputs, part_agreement, position_scorers
from quantlab.data import from_arrays
from quantlab.errors import ThresholdError
from quantlab.graph import model_from_proto
from quantlab.metrics import binomial_ci
from quantlab.plan import uniform_plan
from quantlab.quantize import WriteOptions, write_model
from quantlab.threshold import parse_threshold


def _time_major(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``text_recognizer`` with a CTC head as CRNN exports write it: LogSoftmax, then [T, N, C] (samples on axis 1)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    g.node.extend([helper.make_node("LogSoftmax", ["logits"], ["log_probs"], name="ctc_log_softmax", axis=-1),
                   helper.make_node("Transpose", ["log_probs"], ["ctc"], name="time_first", perm=[1, 0, 2])])
    classes = g.output[0].type.tensor_type.shape.dim[2].dim_value
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("ctc", TensorProto.FLOAT, ["T", "N", classes]))
    return out


def test_scores_per_position_are_told_from_hidden_states():
    assert position_scorers(model_from_proto(models.text_recognizer(classes=12)), {}) == {"logits": 12}
    crnn = model_from_proto(_time_major(models.text_recognizer(classes=7)))
    assert position_scorers(crnn, {"ctc": 1}) == {"ctc": 7}
    # a LayerNorm's output is hidden states, a classifier [N, C] is not per position
    ln = models.layernorm_decomposed_net()
    ln.graph.output[0].name = "ln"
    del ln.graph.node[-1]
    assert position_scorers(model_from_proto(ln), {}) == {}
    assert position_scorers(model_from_proto(models.any_size_classifier()), {}) == {}


def test_best_positions_and_agreement_by_hand():
    ref = np.array([[[0.1, 0.9, 0.0], [0.5, 0.2, 0.5], [np.nan, 0.0, 1.0]],
                    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]], np.float32)
    best = best_positions(ref)
    assert best.tolist() == [[1, 0, 2], [0, 1, 2]]  # a tie takes the lower class, NaN ranks last
    cand = best.copy()
    cand[0, 1] = 2
    token, sequence = part_agreement(best, cand)
    np.testing.assert_allclose(token, [200.0 / 3.0, 100.0])
    assert sequence.tolist() == [False, True]
    with pytest.raises(ValueError, match=r"\[N, T, C\]"):
        best_positions(ref[0])


def _runs(proto: onnx.ModelProto, feeds: np.ndarray, output: str) -> np.ndarray:
    """The model's output over ``feeds`` in batches of 4 as the comparison below runs it (time-major ``ctc``: the
    batches concatenated on axis 1)."""
    if output != "ctc":
        return models.run_exact(proto, "image", output, feeds, 4)
    steps = [models.run_exact(proto, "image", output, feeds[i:i + 4], 4) for i in range(0, len(feeds), 4)]
    return np.concatenate(steps, axis=1)


def _recognizer_int8(layout: str) -> tuple:
    """(model, its INT8 TensorRT-form write, 10 validation images, the scores output) of ``text_recognizer`` in
    ``layout`` ("batch_major" [N, T, C] or "time_major" [T, N, C]), calibrated on narrow data: it saturates, so its
    choices differ from the reference's on some samples."""
    proto = models.text_recognizer(classes=12)
    output = "logits"
    if layout == "time_major":
        proto, output = _time_major(proto), "ctc"
    model = model_from_proto(proto, label="recognizer")
    rng = np.random.default_rng(0)
    calib = from_arrays({"image": rng.uniform(-0.3, 0.3, (8, 3, 48, 64)).astype(np.float32)})
    images = rng.uniform(-1, 1, (10, 3, 48, 64)).astype(np.float32)
    table = calibrate(model, calib, "minmax", batch_size=4).tables["minmax"]
    return model, write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt")), images, output


@pytest.mark.parametrize("layout", ["batch_major", "time_major"])
def test_end_to_end_agreement_matches_onnxruntime_run_directly(layout):
    model, written, images, output = _recognizer_int8(layout)
    valid = from_arrays({"image": images}, role="validation")
    options = CompareOptions(batch_size=4, local=False, bootstrap=200, workers=1,
                             backend_options={"threads": 1, "qdq_fusion": False})
    result = compare(model, {"int8": written}, valid, options)
    row = result.end_to_end.set_index(["candidate", "output"]).loc[("int8", output)]

    ref = _runs(model.proto, images, output)
    cand = _runs(written.proto, images, output)
    if layout == "time_major":
        ref, cand = ref.transpose(1, 0, 2), cand.transpose(1, 0, 2)
    same = ref.argmax(axis=2) == cand.argmax(axis=2)
    assert 0 < same.mean() < 1, "the check needs a candidate that disagrees somewhere"
    assert row["classes"] == 12
    assert row["token_agreement"] == pytest.approx(same.mean(axis=1).mean() * 100.0)
    agree = int(same.all(axis=1).sum())
    assert row["sequence_agreement"] == pytest.approx(agree * 10.0)
    lo, hi = binomial_ci(agree, 10, 0.95)
    assert (row["sequence_agreement_ci_low"], row["sequence_agreement_ci_high"]) == pytest.approx((100 * lo, 100 * hi))
    assert row["token_agreement_ci_low"] <= row["token_agreement"] <= row["token_agreement_ci_high"]
    per_sample = result.per_sample[result.per_sample["output"] == output]
    np.testing.assert_allclose(per_sample["token_agreement"], same.mean(axis=1) * 100.0)
    assert per_sample["sequence_agree"].tolist() == same.all(axis=1).tolist()
    assert "top1_agreement" not in row  # not a classifier [N, C]
    from quantlab.report.samples import changed_samples

    changed = changed_samples(result.per_sample, shown=100)
    assert len(changed) == 10 - agree
    for _, r in changed.iterrows():  # "97.5 % of positions agree", the fewest first
        assert r["change"] == f"{same[r['sample']].mean() * 100.0:.1f} % of positions agree"
    assert list(changed["change"].str.split(" ").str[0].astype(float)) == sorted(
        changed["change"].str.split(" ").str[0].astype(float))


def test_thresholds_may_name_choice_agreement():
    from quantlab.cli.compare import known_metrics

    known = known_metrics(model_from_proto(models.text_recognizer()), use_labels=False)
    assert parse_threshold("token_agreement_ci_low>=99", known_metrics=known).metrics == ("token_agreement_ci_low",)
    plain = known_metrics(model_from_proto(models.conv_net()), use_labels=False)
    with pytest.raises(ThresholdError):
        parse_threshold("sequence_agreement>=90", known_metrics=plain)
    with pytest.raises(ThresholdError):
        parse_threshold("exact_match>=90", known_metrics=plain)
    decider = known_metrics(model_from_proto(_with_decisions(models.any_size_classifier())), use_labels=False)
    assert parse_threshold("exact_match_ci_low>=90", known_metrics=decider).metrics == ("exact_match_ci_low",)


def _with_decisions(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A classifier that also returns its decision as a deployed model does: ArgMax ids and TopK(3)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    logits = g.output[0].name
    g.node.extend([helper.make_node("ArgMax", [logits], ["label"], name="argmax", axis=1, keepdims=0),
                   helper.make_node("TopK", [logits, "k"], ["top_scores", "top_ids"], name="topk", axis=1)])
    g.initializer.append(onnx.numpy_helper.from_array(np.array([3], np.int64), "k"))
    g.output.extend([helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
                     helper.make_tensor_value_info("top_scores", TensorProto.FLOAT, ["N", 3]),
                     helper.make_tensor_value_info("top_ids", TensorProto.INT64, ["N", 3])])
    return out


def test_integer_outputs_are_compared_as_choices():
    from quantlab.compare.labels import classifier_outputs

    model = model_from_proto(_with_decisions(models.any_size_classifier(classes=64)), label="decider")
    assert exact_outputs(model) == ["label", "top_ids"]
    assert classifier_outputs(model) == {"logits": 64}  # TopK's sorted scores are not 3 classes
    rng = np.random.default_rng(1)
    # per-image channel offsets: pooled features that differ from image to image, so some top-1s flip
    images = (rng.normal(0, 1, (40, 3, 12, 12)) + rng.normal(0, 1.5, (40, 3, 1, 1))).astype(np.float32)
    valid = from_arrays({"image": images}, role="validation")
    narrow = from_arrays({"image": images[:16] * 0.3})  # ranges too narrow for the validation set: it saturates
    table = calibrate(model, narrow, "minmax", batch_size=8).tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    options = CompareOptions(batch_size=8, local=False, bootstrap=200, workers=1,
                             backend_options={"threads": 1, "qdq_fusion": False})
    result = compare(model, {"int8": written}, valid, options)
    e2e = result.end_to_end.set_index("output")
    # class ids have no cosine: a threshold on it reads the float outputs only
    assert np.isnan(e2e.loc["label", "cosine"]) and np.isnan(e2e.loc["top_ids", "sqnr_db"])
    check = parse_threshold("cosine>=0.5").check(result.end_to_end)
    assert check.values["cosine>=0.5"] == pytest.approx(min(e2e.loc["logits", "cosine"], e2e.loc["top_scores", "cosine"]))
    # ... and says so, with what the unjudged outputs report
    note = parse_threshold("cosine>=0.5").unjudged_note(result.end_to_end)
    assert note.startswith("threshold 'cosine>=0.5' does not judge output(s) 'label' (int8: exact_match ")
    assert f"exact_match {e2e.loc['top_ids', 'exact_match']:.4g}" in note and "e.g. 'exact_match>=...'" in note
    assert parse_threshold("cosine>=0.5 and exact_match>=0").unjudged_note(result.end_to_end) is None
    # the ArgMax output's exact match is the logits' top-1 agreement, computed apart
    assert e2e.loc["label", "exact_match"] == pytest.approx(e2e.loc["logits", "top1_agreement"])
    assert e2e.loc["label", "exact_match"] == pytest.approx(e2e.loc["label", "element_match"])
    per_sample = result.per_sample.set_index(["output", "sample"])
    assert (per_sample.loc["label", "exact_agree"].to_numpy() == per_sample.loc["logits", "top1_agree"].to_numpy()).all()
    lo, hi = binomial_ci(int(per_sample.loc["label", "exact_agree"].sum()), 40, 0.95)
    assert (e2e.loc["label", "exact_match_ci_low"], e2e.loc["label", "exact_match_ci_high"]) == pytest.approx(
        (100 * lo, 100 * hi))
    ref = _run_ids(model.proto, images)
    cand = _run_ids(written.proto, images)
    same = ref == cand
    assert 5 <= (~same.all(axis=1)).sum() < 40, "the check needs a candidate that disagrees on some samples"
    assert e2e.loc["top_ids", "element_match"] == pytest.approx(same.mean(axis=1).mean() * 100.0)
    assert e2e.loc["top_ids", "exact_match"] == pytest.approx(same.all(axis=1).mean() * 100.0)


def _run_ids(proto: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    return models.run_exact(proto, "image", "top_ids", images, 8)


def test_classifiers_are_told_from_poolers_and_embeddings():
    """[N, C] outputs are class scores only when a linear layer computes them (then softmax, bias, a temperature
    input, a SqueezeNet head's ReLU and pool): a BERT pooler (Tanh) and a normalised embedding are not, and the
    labels go to the logits, not to the output with the most "classes" (the pooler's 16, before)."""
    from quantlab.compare.labels import classifier_outputs

    rng = np.random.default_rng(0)

    def init(name, shape):
        return onnx.numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["image", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wp"], ["p"], name="pool_dense"),
        helper.make_node("Tanh", ["p"], ["pooler"], name="pooler"),
        helper.make_node("Gemm", ["pooler", "wl"], ["z"], name="classifier"),
        helper.make_node("Div", ["z", "temperature"], ["logits"], name="temper"),
        helper.make_node("ReduceL2", ["p"], ["norm"], name="norm", axes=[1], keepdims=1),
        helper.make_node("Div", ["p", "norm"], ["embedding"], name="normalise"),
        helper.make_node("Conv", ["r", "w1"], ["cls_map"], name="head_conv"),
        helper.make_node("Relu", ["cls_map"], ["cls_relu"], name="head_relu"),
        helper.make_node("GlobalAveragePool", ["cls_relu"], ["cls_pool"], name="head_pool"),
        helper.make_node("Flatten", ["cls_pool"], ["squeezenet"], name="head_flatten"),
    ]
    graph = helper.make_graph(
        nodes, "heads",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8]),
         helper.make_tensor_value_info("temperature", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("pooler", TensorProto.FLOAT, ["N", 16]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 16]),
         helper.make_tensor_value_info("squeezenet", TensorProto.FLOAT, ["N", 5])],
        [init("w", (4, 3, 3, 3)), init("wp", (4, 16)), init("wl", (16, 3)), init("w1", (5, 4, 1, 1))])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert classifier_outputs(model) == {"logits": 3, "squeezenet": 5}


@pytest.mark.parametrize("axis, classifier", [(1, True), (-1, False)], ids=["query-axis", "class-axis"])
def test_one_query_gathered_out_of_a_decoders_scores_is_a_classifier(axis, classifier):
    """Perceiver's classifier decodes [N, 1, C] and returns ``x[:, 0]``, a Gather on axis 1: it had no top-1
    agreement. A Gather on the last axis picks classes instead: not class scores."""
    from quantlab.compare.labels import classifier_outputs

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["latents", "w"], ["z"], name="final_layer"),
         helper.make_node("Gather", ["z", "zero"], ["logits"], name="first_query", axis=axis)], "perceiver_head",
        [helper.make_tensor_value_info("latents", TensorProto.FLOAT, ["N", 1, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5] if axis == 1 else ["N", 1])],
        [onnx.numpy_helper.from_array(rng.normal(0, 0.3, (8, 5)).astype(np.float32), "w"),
         onnx.numpy_helper.from_array(np.array(0, np.int64), "zero")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert classifier_outputs(model) == ({"logits": 5} if classifier else {})


def test_a_1x1_conv_head_is_a_classifier_for_compare_and_the_search():
    """SqueezeNet/DenseNet exports end in [N, C, 1, 1] scores: they get top-1 agreement, and the search's flip
    margins read them (before: no classifier, so a top1_agreement threshold was refused)."""
    from quantlab.compare.labels import classifier_outputs
    from quantlab.plan import resolve_plan
    from quantlab.search import SearchOptions
    from quantlab.search.evaluator import CompareEvaluator, logit_margins

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w1"], ["cls_map"], name="head_conv"),
             helper.make_node("Relu", ["cls_map"], ["cls_relu"], name="head_relu"),
             helper.make_node("GlobalAveragePool", ["cls_relu"], ["scores"], name="head_pool")]
    graph = helper.make_graph(
        nodes, "squeezenet_head", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 6, 1, 1])],
        [onnx.numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "w"),
         onnx.numpy_helper.from_array(rng.normal(0, 0.5, (6, 8, 1, 1)).astype(np.float32), "w1")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert classifier_outputs(model) == {"scores": 6}
    images = (rng.normal(0, 1, (16, 3, 8, 8)) + rng.normal(0, 1, (16, 3, 1, 1))).astype(np.float32)
    data = from_arrays({"image": images}, role="validation")
    table = calibrate(model, data, "minmax", batch_size=4).tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    options = CompareOptions(batch_size=4, local=False, bootstrap=0, workers=1,
                             backend_options={"threads": 1, "qdq_fusion": False})
    row = compare(model, {"int8": written}, data, options).end_to_end.iloc[0]
    session = ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert row["classes"] == 6 and 0 <= row["top1_agreement"] <= 100
    evaluator = CompareEvaluator(model, table, data, SearchOptions(threshold="top1_agreement>=99", batch_size=4))
    plan = resolve_plan(uniform_plan("fp32"), model.proto)
    got = evaluator.margins([plan], [3, 0, 9])[0]
    fp32 = session.run(["scores"], {"image": images})[0].reshape(16, 6).astype(np.float64)
    ref = evaluator._reference()
    assert list(ref.top1) == list(fp32.argmax(axis=1))
    np.testing.assert_allclose(got, logit_margins(fp32[[3, 0, 9]], ref.top1[[3, 0, 9]]) / ref.scale[[3, 0, 9]],
                               rtol=1e-4, atol=1e-6)


def test_cli_compare_prints_the_samples_that_changed(tmp_path, capsys):
    from quantlab.cli import main
    from quantlab.quantize import save_written

    model = model_from_proto(models.text_recognizer(classes=12), label="recognizer")
    rng = np.random.default_rng(0)
    calib = from_arrays({"image": rng.uniform(-0.3, 0.3, (8, 3, 48, 64)).astype(np.float32)})  # narrow: saturates
    images = rng.uniform(-1, 1, (10, 3, 48, 64)).astype(np.float32)
    table = calibrate(model, calib, "minmax", batch_size=4).tables["minmax"]
    save_written(write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt")), tmp_path / "int8")
    onnx.save(model.proto, tmp_path / "ref.onnx")
    (tmp_path / "lines").mkdir()
    for i, x in enumerate(images):
        np.save(tmp_path / "lines" / f"l{i}.npy", x)
    (tmp_path / "val.toml").write_text('role = "validation"\nshuffle = false\n[source]\nkind = "npy"\npath = "lines"\n'
                                       '[inputs]\nimage = "array"\n')
    code = main(["compare", str(tmp_path / "ref.onnx"), str(tmp_path / "int8"), "--data", str(tmp_path / "val.toml"),
                 "--out", str(tmp_path / "out"), "--no-progress", "--bootstrap", "0"])
    out = capsys.readouterr().out
    assert code == 0
    per_sample = pd.read_parquet(tmp_path / "out" / "per_sample.parquet")
    changed = int((~per_sample["sequence_agree"].astype(bool)).sum())
    assert changed > 0, "the check needs a sample whose text changed"
    listed = out.split("samples whose decision changed", 1)[1]
    assert listed.count("% of positions agree") == min(changed, 5)


def test_an_ort_optimized_head_is_still_a_classifier(tmp_path):
    """ONNX Runtime's optimizer fuses Gemm+Relu into com.microsoft FusedGemm (and Conv+Relu into FusedConv): the
    head of an ORT-optimized export is still class scores."""
    from quantlab.compare.labels import classifier_outputs

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["g"], name="fc", transB=1),
             helper.make_node("Relu", ["g"], ["scores"], name="fc_relu")]
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 5])],
        [onnx.numpy_helper.from_array(rng.normal(0, 1, shape).astype(np.float32), name)
         for name, shape in (("w", (4, 3, 4, 4)), ("fw", (5, 4)), ("fb", (5,)))])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                         options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx")
    assert [n.op_type for n in optimized.graph.node][-1] == "FusedGemm"
    assert classifier_outputs(model_from_proto(optimized)) == {"scores": 5}


def _spelled_out_softmax_heads() -> onnx.ModelProto:
    """A jax2tf/tf2onnx head: ``exp(z - max z) / sum(exp(..))`` with Reshape/Expand broadcasts (Magika's), a
    log-softmax ``z - log(sum(exp z))``, and two look-alikes that are not scores: an embedding over its own
    sum of squares, and ``exp(z)`` over another tensor's sum."""
    rng = np.random.default_rng(0)
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 1])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["z"], name="dense"),
        helper.make_node("ReduceMax", ["z"], ["zmax"], name="max", axes=[1], keepdims=0),
        helper.make_node("Max", ["floor", "zmax"], ["zmax_f"], name="maximum"),
        helper.make_node("Reshape", ["zmax_f", "shape"], ["zmax_r"], name="max_reshape"),
        helper.make_node("Shape", ["z"], ["zshape"], name="zshape"),
        helper.make_node("Expand", ["zmax_r", "zshape"], ["zmax_b"], name="max_broadcast"),
        helper.make_node("Sub", ["z", "zmax_b"], ["shifted"], name="shift"),
        helper.make_node("Exp", ["shifted"], ["e"], name="exp"),
        helper.make_node("ReduceSum", ["e", "axes"], ["esum"], name="sum", keepdims=0),
        helper.make_node("Reshape", ["esum", "shape"], ["esum_r"], name="sum_reshape"),
        helper.make_node("Expand", ["esum_r", "zshape"], ["esum_b"], name="sum_broadcast"),
        helper.make_node("Div", ["e", "esum_b"], ["probs"], name="normalise"),
        helper.make_node("Exp", ["z"], ["ez"], name="exp_z"),
        helper.make_node("ReduceSum", ["ez", "axes"], ["ezsum"], name="sum_z", keepdims=1),
        helper.make_node("Log", ["ezsum"], ["lse"], name="log"),
        helper.make_node("Sub", ["z", "lse"], ["log_probs"], name="log_softmax"),
        helper.make_node("Mul", ["z", "z"], ["sq"], name="square"),
        helper.make_node("ReduceSum", ["sq", "axes"], ["sqsum"], name="sum_sq", keepdims=1),
        helper.make_node("Sqrt", ["sqsum"], ["norm"], name="norm"),
        helper.make_node("Div", ["z", "norm"], ["embedding"], name="unit"),
        helper.make_node("Exp", ["z"], ["ez2"], name="exp_other"),
        helper.make_node("ReduceSum", ["x", "axes"], ["xsum"], name="sum_x", keepdims=1),
        helper.make_node("Div", ["ez2", "xsum"], ["not_softmax"], name="over_other"),
    ]
    graph = helper.make_graph(
        nodes, "spelled_out",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 5])
         for n in ("probs", "log_probs", "embedding", "not_softmax")],
        [onnx.numpy_helper.from_array(rng.normal(0, 1, (8, 5)).astype(np.float32), "w"),
         onnx.numpy_helper.from_array(np.array(-1e30, np.float32), "floor"),
         onnx.numpy_helper.from_array(np.array([1], np.int64), "axes"), shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_softmax_spelled_out_op_by_op_is_a_classifier():
    """Magika (jax2tf -> tf2onnx) ends in exp(z - max z) / sum(exp): it was "classifier outputs: none", so
    top1_agreement thresholds were refused and its labels ignored. A norm over a sum of squares and an exp
    over another tensor's sum stay not-scores."""
    from quantlab.compare.labels import classifier_outputs

    proto = _spelled_out_softmax_heads()
    assert classifier_outputs(model_from_proto(proto)) == {"probs": 5, "log_probs": 5}
    x = np.random.default_rng(1).normal(0, 1, (4, 8)).astype(np.float32)
    probs, log_probs = ort.InferenceSession(proto.SerializeToString()).run(["probs", "log_probs"], {"x": x})
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)  # the graph is the softmax it claims to be
    np.testing.assert_allclose(np.exp(log_probs), probs, rtol=1e-5)


def test_a_fixed_batch_ctc_export_scores_time_major_positions(tmp_path):
    """A CRNN exported with its batch fixed at 1 returns CTC scores [T, 1, C]: with no batch symbol the samples
    were taken to be on axis 0 and a sample axis was prepended, and compare stopped on an internal error
    ("per-position scores must be [N, T, C], got shape (1, 29, 1, 8210)"; ddddocr with its output declared)."""
    from quantlab.graph.samples import tensor_sample_axes

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["tx"], name="time_major", perm=[2, 0, 1]),
         helper.make_node("MatMul", ["tx", "w"], ["z"], name="classifier"),
         helper.make_node("LogSoftmax", ["z"], ["scores"], name="log_softmax", axis=2)], "ctc_fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, "T"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["T", 1, 6])],
        [onnx.numpy_helper.from_array(rng.normal(0, 1, (4, 6)).astype(np.float32), "w")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert tensor_sample_axes(model, {}, ["scores", "tx", "x"]) == {"scores": 1, "tx": 1, "x": 0}
    samples = {f"s{i}": rng.normal(0, 1, (1, 4, t)).astype(np.float32) for i, t in enumerate((5, 9, 5, 7))}
    (tmp_path / "lines").mkdir()
    for key, x in samples.items():
        np.save(tmp_path / "lines" / f"{key}.npy", x[0])
    from quantlab.data import open_dataset

    (tmp_path / "set.toml").write_text('batching = "by_shape"\nshuffle = false\nrole = "validation"\n[source]\n'
                                       'kind = "npy"\npath = "lines"\n[inputs]\nx = "array"\n')
    data = open_dataset(tmp_path / "set.toml")
    table = calibrate(model, data, "minmax", batch_size=1).tables["minmax"]
    int8 = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    res = compare(model, {"int8": int8}, data, CompareOptions(batch_size=1, bootstrap=0, per_layer=False))
    row = res.end_to_end.set_index("candidate").loc["int8"]
    assert row["samples"] == 4 and 0 <= row["token_agreement"] <= 100


def test_sigmoid_outputs_are_independent_probabilities_not_a_choice():
    """basic-pitch's [N, frames, 88] note probabilities (a Sigmoid per key) were read as classes per position:
    token agreement took an argmax over 88 independent keys, and FP16 "changed" 63 of 64 samples."""
    from quantlab.compare.labels import classifier_outputs

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["z"], name="dense"),
         helper.make_node("Sigmoid", ["z"], ["notes"], name="notes"),
         helper.make_node("Softmax", ["z"], ["classes"], name="classes", axis=-1)], "multi_label",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])],
        [helper.make_tensor_value_info("notes", TensorProto.FLOAT, ["N", 4, 6]),
         helper.make_tensor_value_info("classes", TensorProto.FLOAT, ["N", 4, 6])],
        [onnx.numpy_helper.from_array(rng.normal(0, 1, (8, 6)).astype(np.float32), "w")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert position_scorers(model, {}) == {"classes": 6}
    assert classifier_outputs(model) == {}  # rank 3: per position, not [N, C]


def _segmenter(resize: bool) -> onnx.ModelProto:
    """x[N, 3, 8, 8] -> Conv -> Relu -> 1x1 Conv (4 classes) [-> Resize x2]: DeepLab's head, or without the
    Resize the shape of a super-resolution model's last conv (an image, not class scores)."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["f"], name="features", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["f"], ["fr"], name="relu"),
             helper.make_node("Conv", ["fr", "w2", "b2"], ["logits" if not resize else "low"], name="classifier")]
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.4, (4, 8, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b2")]
    size = 8
    if resize:
        nodes.append(helper.make_node("Resize", ["low", "", "scales"], ["logits"], name="upsample", mode="linear"))
        inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
        size = 16
    graph = helper.make_graph(nodes, "segmenter", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4, size, size])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_segmentation_map_gets_pixel_agreement_and_an_image_does_not(tmp_path):
    """What a user reads off a segmentation model is the class of each pixel; cosine and SQNR over the score maps
    do not show it. A map upsampled to the image (DeepLab) gets token_agreement over its pixels, checked against
    the argmax of both models' outputs here; a conv's output image (super-resolution) gets none."""
    from quantlab.backends import get_backend
    from quantlab.cli.compare import known_metrics
    from quantlab.data import from_arrays
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, write_model
    from quantlab.compare.mask_examples import load_mask_examples, save_mask_examples
    from quantlab.report.plots import _CLASS_CHANGED, _class_overlay, mask_plot
    from quantlab.report.samples import changed_samples

    x = np.random.default_rng(0).normal(size=(6, 3, 8, 8)).astype(np.float32)
    for resize in (True, False):
        model = model_from_proto(_segmenter(resize), label="seg")
        table = calibrate(model, from_arrays({"x": x}), "minmax", batch_size=3).tables["minmax"]
        int8 = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
        result = compare(model, {"int8": int8}, from_arrays({"x": x}, role="validation"),
                         CompareOptions(batch_size=3, per_layer=False, bootstrap=0))
        row = result.end_to_end.iloc[0]
        if not resize:
            assert "token_agreement" not in result.end_to_end.columns or np.isnan(row["token_agreement"])
            continue
        ref = get_backend("ort").build(model.proto).run({"x": x})["logits"].argmax(1)
        cand = get_backend("ort").build(int8.proto).run({"x": x})["logits"].argmax(1)
        assert row["token_agreement"] == pytest.approx((ref == cand).reshape(6, -1).mean(1).mean() * 100)
        assert row["sequence_agreement"] == pytest.approx((ref == cand).reshape(6, -1).all(1).mean() * 100)
        # mIoU, the segmentation benchmark's figure with the reference as ground truth: each class a set of pixels
        miou = [np.mean([len(a & b) / len(a | b) * 100 for k in range(4)
                         if (a := set(np.flatnonzero(r == k))) | (b := set(np.flatnonzero(c == k)))])
                for r, c in zip(ref, cand)]
        assert 0 < min(miou) < 100, "the check needs maps that differ"
        np.testing.assert_allclose(result.per_sample["miou"], miou)
        assert row["miou"] == pytest.approx(np.mean(miou))
        assert row["miou_ci_low"] <= row["miou"] <= row["miou_ci_high"] or np.isnan(row["miou_ci_low"])
        changed = changed_samples(result.per_sample, shown=100)
        assert all(c.startswith("mIoU ") and c.endswith("% of pixels agree") for c in changed["change"])
        shown = changed["change"].str.split(" ").str[1].astype(float)
        assert list(shown) == sorted(shown)  # the lowest mIoU first
        known = known_metrics(model, use_labels=False)
        assert "miou_ci_low" in known and "miou" not in known_metrics(model_from_proto(models.text_recognizer()),
                                                                      use_labels=False)
        # the picture: the sample of lowest mIoU keeps both class maps, and survives the folder
        (example,) = result.mask_examples
        worst = int(np.argmin(miou))
        assert example.classes and example.sample == worst and example.iou == pytest.approx(miou[worst])
        np.testing.assert_array_equal(example.reference, ref[worst])
        np.testing.assert_array_equal(example.changed, cand[worst])
        save_mask_examples(result.mask_examples, tmp_path)
        (back,) = load_mask_examples(tmp_path)
        assert back.classes and back.iou == example.iou and back.reference.dtype == np.int32
        np.testing.assert_array_equal(back.changed, example.changed)
        overlay = _class_overlay(back)  # red exactly where the candidate picks another class
        red = np.all(overlay == _CLASS_CHANGED, axis=-1)
        np.testing.assert_array_equal(red, ref[worst] != cand[worst])
        assert mask_plot([back]).startswith(b"\x89PNG")


def test_a_softmax_after_a_decoding_loop_scores_positions():
    """SLANet's table decoder: a Loop fills a logits buffer [N, T, C] step by step (a MatMul inside its body), and a
    Softmax after the loop writes the output. No linear layer is in reach outside the loop, but the softmax over the
    classes says what the output is: it gets token agreement (it was read as numbers, with a warning about its
    rows' scales). A softmax over the positions is not scores per position."""
    rng = np.random.default_rng(0)
    step = helper.make_graph(
        [helper.make_node("MatMul", ["x_outer", "w"], ["logits_step"], name="head"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going")],
        "step",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("logits_step", TensorProto.FLOAT, ["N", 6])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["steps", "go"], ["buffer"], name="decode", body=step),
         helper.make_node("Transpose", ["buffer"], ["logits"], name="to_batch_major", perm=[1, 0, 2]),
         helper.make_node("Softmax", ["logits"], ["structure"], name="structure", axis=-1),
         helper.make_node("Softmax", ["logits"], ["over_steps"], name="over_steps", axis=1)],
        "decoder",
        [helper.make_tensor_value_info("x_outer", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("structure", TensorProto.FLOAT, ["N", 5, 6]),
         helper.make_tensor_value_info("over_steps", TensorProto.FLOAT, ["N", 5, 6])],
        [onnx.numpy_helper.from_array(rng.normal(0, 1, (8, 6)).astype(np.float32), "w"),
         onnx.numpy_helper.from_array(np.array(5, np.int64), "steps"),
         onnx.numpy_helper.from_array(np.array(True), "go")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert position_scorers(model, {}) == {"structure": 6}
    x = rng.normal(size=(4, 8)).astype(np.float32)
    result = compare(model, {"same": model}, from_arrays({"x_outer": x}, role="validation"),
                     CompareOptions(batch_size=2, per_layer=False, bootstrap=0))
    rows = result.end_to_end.set_index("output")
    assert rows.loc["structure", "token_agreement"] == 100.0
    assert np.isnan(rows.loc["over_steps"].get("token_agreement", np.nan))


def test_scores_of_a_loop_that_stops_on_its_state_are_compared_position_by_position():
    """A while loop (stops when its state says so: a decoder's end token) decides its scan outputs' length, so
    its scores are data-sized; they still get token agreement where the lengths agree (here: always)."""
    rng = np.random.default_rng(0)
    step = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["z"], name="head"),
         helper.make_node("Softmax", ["z"], ["probs_step"], name="probs", axis=-1),
         helper.make_node("ReduceMax", ["probs_step"], ["top"], name="top", keepdims=0),
         helper.make_node("Less", ["top", "never"], ["cond_out"], name="stop_when_unsure")],
        "step",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("probs_step", TensorProto.FLOAT, ["N", 6])])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x_outer"], ["features"], name="encoder"),
         helper.make_node("Loop", ["steps", "go"], ["buffer"], name="decode", body=step),
         helper.make_node("Transpose", ["buffer"], ["probs_nt"], name="to_batch_major", perm=[1, 0, 2]),
         helper.make_node("Identity", ["probs_nt"], ["probs"], name="out")],
        "decoder", [helper.make_tensor_value_info("x_outer", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", "T", 6])],
        [onnx.numpy_helper.from_array(rng.normal(0, 1, (8, 6)).astype(np.float32), "w"),
         onnx.numpy_helper.from_array(np.array(5, np.int64), "steps"),
         onnx.numpy_helper.from_array(np.array(True), "go"),
         onnx.numpy_helper.from_array(np.array(2.0, np.float32), "never")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    from quantlab.graph.samples import data_sized

    assert "probs" in data_sized(model)
    assert position_scorers(model, {}) == {"probs": 6}
    x = rng.normal(size=(4, 8)).astype(np.float32)
    shorter = onnx.ModelProto()
    shorter.CopyFrom(model.proto)
    next(t for t in shorter.graph.initializer if t.name == "steps").CopyFrom(
        onnx.numpy_helper.from_array(np.array(3, np.int64), "steps"))  # stops two steps early
    result = compare(model, {"same": model, "shorter": model_from_proto(shorter)},
                     from_arrays({"x_outer": x}, role="validation"),
                     CompareOptions(batch_size=2, per_layer=False, bootstrap=0))
    rows = result.end_to_end.set_index("candidate")
    assert rows.loc["same", "sequence_agreement"] == 100.0
    assert rows.loc["shorter", "sequence_agreement"] == 0.0  # another length: no sample reads the same


def test_rows_of_equal_scores_are_no_choice_unless_the_other_model_chooses():
    """A decoder's buffer after its end token holds rows of equal scores in both models: no position to agree on.
    Where one model still emits (it stopped later), the row counts, and disagrees."""
    from quantlab.compare.choices import decided_positions

    ref = np.zeros((2, 4, 3), np.float32)
    ref[:, :2] = [[0.1, 0.8, 0.1]]  # two tokens, then the end
    cand = ref.copy()
    cand[1, 2] = [0.1, 0.7, 0.2]  # sample 1 emits one token more (class 1; an all-equal row reads as class 0)
    counted = decided_positions(ref, cand)
    assert counted.tolist() == [[True, True, False, False], [True, True, True, False]]
    part, whole = part_agreement(best_positions(ref), best_positions(cand), counted)
    assert part.tolist() == [100.0, pytest.approx(200 / 3)] and whole.tolist() == [True, False]
    padding = np.array([[True, False, True, True], [True, True, True, True]])
    assert decided_positions(ref, cand, padding).tolist() == [[True, False, False, False], [True, True, True, False]]
    assert decided_positions(ref + np.arange(3), cand + np.arange(3), padding) is padding  # every row decides


@pytest.mark.parametrize("layout", ["batch_major", "time_major"])
def test_ctc_text_agreement_and_cer_match_a_decoding_by_hand(layout):
    """With ctc_blank the per-position scores are also read as greedy CTC text: samples whose text is the
    reference's (text_agreement, exact binomial interval) and the character error rate against it (cer), checked
    against ONNX Runtime's outputs decoded here; a sample whose positions differ but whose text is the same has not
    changed its decision."""
    model, written, images, output = _recognizer_int8(layout)
    ref = _runs(model.proto, images, output)
    cand = _runs(written.proto, images, output)
    if layout == "time_major":
        ref, cand = ref.transpose(1, 0, 2), cand.transpose(1, 0, 2)
    rb, cb = ref.argmax(axis=2), cand.argmax(axis=2)
    blank = int(np.bincount(rb.ravel()).argmax())  # the class a CTC head emits most: its blank
    texts = [(ctc_text(r, blank), ctc_text(c, blank)) for r, c in zip(rb, cb)]
    same = np.array([r == c for r, c in texts])
    cer = np.array([levenshtein(r, c) / max(len(r), 1) * 100.0 for r, c in texts])
    assert 0 < same.sum() < 10 and cer.max() > 0, "the check needs texts that differ and texts that agree"

    options = CompareOptions(batch_size=4, local=False, bootstrap=200, workers=1, ctc_blank=blank,
                             backend_options={"threads": 1, "qdq_fusion": False})
    result = compare(model, {"int8": written}, valid := from_arrays({"image": images}, role="validation"), options)
    row = result.end_to_end.set_index(["candidate", "output"]).loc[("int8", output)]
    assert row["text_agreement"] == pytest.approx(same.mean() * 100.0)
    lo, hi = binomial_ci(int(same.sum()), 10, 0.95)
    assert (row["text_agreement_ci_low"], row["text_agreement_ci_high"]) == pytest.approx((100 * lo, 100 * hi))
    assert row["cer"] == pytest.approx(cer.mean())
    assert row["cer_ci_low"] <= row["cer"] <= row["cer_ci_high"]
    per_sample = result.per_sample[result.per_sample["output"] == output]
    assert per_sample["text_agree"].tolist() == same.tolist()
    np.testing.assert_allclose(per_sample["cer"], cer)
    assert result.check("text_agreement>=100")["int8"].passed is False
    assert result.settings["ctc_blank"] == blank  # recorded with the figures it made
    from quantlab.report.samples import changed_samples

    changed = changed_samples(result.per_sample, shown=100)
    assert sorted(changed["sample"]) == [i for i in range(10) if not same[i]]  # the text decides, not positions
    assert all(c.startswith("text: CER ") for c in changed["change"])
    shown = changed["change"].str.split(" ").str[2].astype(float)  # "text: CER 12.5 %, ...": the worst first
    assert list(shown) == sorted(shown, reverse=True)
    without = compare(model, {"int8": written}, valid, CompareOptions(batch_size=4, local=False, bootstrap=0,
                                                                      workers=1, backend_options={"threads": 1}))
    assert "text_agreement" not in without.end_to_end.columns
    hint = [w for w in without.warnings if "--ctc-blank" in w]  # one class best at most positions: said
    assert len(hint) == 1 and f"class {blank} is the reference's best class" in hint[0]
    assert not any("--ctc-blank" in w for w in result.warnings)


def test_the_ctc_hint_is_for_float_inputs_and_a_dominant_class():
    from quantlab.compare.ctc_hints import ctc_hints

    recognizer = model_from_proto(models.text_recognizer(classes=4))
    tagger = model_from_proto(models.masked_token_tagger())  # token ids in: an "O" tag is as common as a blank
    assert not all(spec.is_float for spec in tagger.inputs)
    blank_heavy = {"logits": np.array([2, 7, 1, 0])}
    assert len(ctc_hints(recognizer, blank_heavy, None)) == 1 and "--ctc-blank 1" in ctc_hints(
        recognizer, blank_heavy, None)[0]
    assert ctc_hints(recognizer, blank_heavy, 1) == []  # asked already
    assert ctc_hints(tagger, blank_heavy, None) == []
    assert ctc_hints(recognizer, {"logits": np.array([3, 4, 2, 1])}, None) == []  # no class at half the positions
    # a DETR-style detector: a box per query beside the class scores, whose "no object" class is best at most
    # queries (YOLOS got the CTC hint; --ctc-blank would read its queries as text)
    detector = model_from_proto(models.detr_head())
    assert ctc_hints(detector, {"logits": np.array([1, 0, 0, 0, 0, 9])}, None) == []


def test_ctc_blank_must_name_a_class_of_a_per_position_output(tmp_path, capsys):
    from quantlab.cli import main
    from quantlab.cli.compare import known_metrics
    from quantlab.errors import CompareError

    model = model_from_proto(models.text_recognizer(classes=12), label="recognizer")
    valid = from_arrays({"image": np.zeros((2, 3, 48, 64), np.float32)}, role="validation")
    with pytest.raises(CompareError, match="'logits' scores 12 classes"):
        compare(model, {"same": model}, valid, CompareOptions(ctc_blank=12, per_layer=False))
    with pytest.raises(CompareError, match="candidate 'bare' is a ModelProto; pass a LoadedModel"):
        compare(model, {"bare": model.proto}, valid, CompareOptions(per_layer=False))
    classifier = model_from_proto(models.conv_net())
    images = from_arrays({"input": np.zeros((2, *[d.dim_value for d in models.conv_net().graph.input[0].type
                                                   .tensor_type.shape.dim][1:]), np.float32)}, role="validation")
    with pytest.raises(CompareError, match="no output of .* holds class scores per position"):
        compare(classifier, {"same": classifier}, images, CompareOptions(ctc_blank=0, per_layer=False))
    with pytest.raises(ThresholdError, match="reads CTC scores as text: give the blank class"):
        parse_threshold("cer<=1", known_metrics=known_metrics(model, use_labels=False))
    assert parse_threshold("cer<=1", known_metrics=known_metrics(model, False, None, 0)).metrics == ("cer",)
    onnx.save(model.proto, tmp_path / "ref.onnx")
    assert main(["compare", str(tmp_path / "ref.onnx"), str(tmp_path / "ref.onnx"), "--data", str(tmp_path / "x.toml"),
                 "--out", str(tmp_path / "out"), "--ctc-blank", "-1"]) == 2
    assert "--ctc-blank" in capsys.readouterr().err


def _quarter_size_head(seed: int = 0, classes: int = 5) -> onnx.ModelProto:
    """SegFormer's shape: image[N, 3, 16, 16] -> Conv(4x4, stride 4) -> Relu -> 1x1 Conv -> logits[N, C, 4, 4], no
    Resize or Softmax after it (a keypoint heatmap looks the same)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["f"], name="patch", kernel_shape=[4, 4], strides=[4, 4]),
             helper.make_node("Relu", ["f"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["logits"], name="classifier", kernel_shape=[1, 1])]
    graph = helper.make_graph(
        nodes, "quarter", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes, 4, 4])],
        [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 4, 4)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1"),
         numpy_helper.from_array(rng.normal(0, 0.5, (classes, 8, 1, 1)).astype(np.float32), "w2"),
         numpy_helper.from_array(rng.normal(0, 0.1, classes).astype(np.float32), "b2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_quarter_size_class_map_is_read_as_one_when_named_and_suggested_otherwise(tmp_path, capsys):
    """SegFormer's 1/4-size logits straight from a 1x1 conv got cosine and SQNR only, with no word; a note now names
    --class-map, and named (compare, search, experiment files) the output gets pixel agreement and miou. A name
    that is no [N, C, H, W] output is refused."""
    from quantlab.cli import main
    from quantlab.errors import CompareError

    model = model_from_proto(_quarter_size_head())
    x = np.random.default_rng(1).normal(0, 1, (6, 3, 16, 16)).astype(np.float32)
    data = from_arrays({"image": x}, role="validation")
    int8 = write_model(model, uniform_plan("int8"), calibrate(model, from_arrays({"image": x}), "minmax")
                       .tables["minmax"], WriteOptions(target="tensorrt"))
    plain = compare(model, {"int8": int8}, data, CompareOptions(batch_size=2, per_layer=False, bootstrap=0))
    assert "miou" not in plain.end_to_end.columns
    assert any("--class-map logits" in w for w in plain.warnings)
    named = compare(model, {"int8": int8}, data, CompareOptions(batch_size=2, per_layer=False, bootstrap=0,
                                                                class_maps=("logits",)))
    assert {"miou", "token_agreement"} <= set(named.end_to_end.columns)
    assert not any("--class-map" in w for w in named.warnings)
    with pytest.raises(CompareError, match="class map 'scores' is not an output"):
        compare(model, {"int8": int8}, data, CompareOptions(per_layer=False, class_maps=("scores",)))
    onnx.save(model.proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "val.npz", image=x)
    (tmp_path / "val.toml").write_text('role = "validation"\n[[source]]\nkind = "npz"\npath = "val.npz"\n'
                                       'batched = true\n')
    code = main(["compare", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--data", str(tmp_path / "val.toml"),
                 "--class-map", "logits", "--no-per-layer", "--no-progress", "--out", str(tmp_path / "cmp"),
                 "--fail-if", "miou<99"])
    assert code == 0 and "miou" in capsys.readouterr().out
