"""Post-training aids of the writer: bias correction, measured on real small models.

The shifts are checked twice: against a direct numpy computation (1x1 conv, Gemm), and
against what the written model really does in ONNX Runtime (the mean per-channel error of
the uncorrected model on the calibration set is the shift; after correction it is gone),
which also covers padded, grouped (depthwise) convolutions. Every corrected model must
still parse and build in TensorRT-RTX.
"""

from __future__ import annotations

import dataclasses

import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantlab.calibrate import calibrate
from quantlab.data import from_arrays
from quantlab.errors import QuantlabError
from quantlab.graph import model_from_proto, serialize
from quantlab.plan import uniform_plan
from quantlab.quantize import WriteOptions, measure_bias_correction, write_model
from quantlab.quantize.bias_correction import fake_quantize
from quantlab.quantize.qparams import activation_qparams, weight_qparams


def _model(nodes, x_shape, y_shape, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "ptq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def _conv1x1(rng):
    # per-channel weight magnitudes 100x apart: a per-tensor scale rounds the small ones coarsely
    w = rng.normal(0, 1, (3, 4, 1, 1)) * np.array([1.0, 0.01, 0.02, 0.5]).reshape(1, 4, 1, 1)
    b = rng.normal(0, 0.1, 3)
    return _model([helper.make_node("Conv", ["input", "w", "b"], ["y"], name="conv")],
                  ["N", 4, 6, 6], ["N", 3, 6, 6], {"w": w, "b": b}), w


def _depthwise(rng):
    w = rng.normal(0, 1, (6, 1, 3, 3)) * rng.uniform(0.01, 1.0, (6, 1, 1, 1))
    return _model([helper.make_node("Conv", ["input", "w"], ["y"], name="dw", group=6, pads=[1, 1, 1, 1],
                                    strides=[2, 2])],
                  ["N", 6, 7, 7], ["N", 6, 4, 4], {"w": w}), w


def _gemm(rng):
    w = rng.normal(0, 1, (5, 8)) * rng.uniform(0.005, 1.0, (1, 8))
    return _model([helper.make_node("Gemm", ["input", "w", "b"], ["y"], name="fc", transB=1)],
                  ["N", 8], ["N", 5], {"w": w, "b": rng.normal(0, 0.1, 5)}), w


def _setup(build, shape, seed=0, n=64):
    rng = np.random.default_rng(seed)
    proto, w = build(rng)
    model = model_from_proto(proto)
    x = (rng.normal(0.6, 1.0, (n, *shape)) ** 2).astype(np.float32)  # positive, skewed: a mean to shift
    cal = from_arrays({"input": x})
    table = calibrate(model, cal, "minmax").tables["minmax"]
    return model, w, x, cal, table


def _run(proto, x):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_quant_qdq", "1")  # Q/DQ as written, any CPU
    s = ort.InferenceSession(serialize(proto), so, providers=["CPUExecutionProvider"])
    return s.run(["y"], {"input": x})[0].astype(np.float64)


def _channel_mean(err):
    return err.swapaxes(0, 1).reshape(err.shape[1], -1).mean(axis=1)


@pytest.mark.parametrize("per_channel", [False, True])
def test_conv_shift_matches_numpy(per_channel):
    model, w, x, cal, table = _setup(_conv1x1, (4, 6, 6))
    opts = WriteOptions(target="tensorrt", per_channel_weights=per_channel)
    bc = measure_bias_correction(model, table, cal, opts)
    qp, q = weight_qparams(w.astype(np.float32), 0 if per_channel else None)
    wq = q.astype(np.float64) * qp.scale.astype(np.float64).reshape((-1, 1, 1, 1) if per_channel else ())
    xq = fake_quantize(x, activation_qparams(table.ranges["input"], "tensorrt")).astype(np.float64)
    want = (np.einsum("oi,nihw->nohw", wq[:, :, 0, 0], xq) - np.einsum("oi,nihw->nohw", w[:, :, 0, 0], x)).mean(
        axis=(0, 2, 3))
    got = bc.shift("conv")
    assert got is not None and np.abs(want).max() > 1e-4
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_gemm_shift_matches_numpy():
    model, w, x, cal, table = _setup(_gemm, (8,))
    bc = measure_bias_correction(model, table, cal, WriteOptions(per_channel_weights=False))
    qp, q = weight_qparams(w.astype(np.float32), None)
    wq = q.astype(np.float64) * float(qp.scale)
    xq = fake_quantize(x, activation_qparams(table.ranges["input"], "tensorrt")).astype(np.float64)
    want = (xq @ wq.T - x.astype(np.float64) @ w.T).mean(axis=0)
    np.testing.assert_allclose(bc.shift("fc"), want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("build,shape", [(_conv1x1, (4, 6, 6)), (_depthwise, (6, 7, 7)), (_gemm, (8,))])
@pytest.mark.parametrize("target", ["tensorrt", "ort"])
def test_corrected_model_has_no_mean_error_on_the_calibration_set(build, shape, target):
    """The shift is what the written model really does (ORT, exact Q/DQ), and correcting it removes it."""
    model, _, x, cal, table = _setup(build, shape)
    opts = WriteOptions(target=target, per_channel_weights=False)
    bc = measure_bias_correction(model, table, cal, opts)
    ref = _run(model.proto, x)
    plain = write_model(model, uniform_plan("int8"), table, opts)
    fixed = write_model(model, uniform_plan("int8"), table, dataclasses.replace(opts, bias_correction=bc))
    before = _channel_mean(_run(plain.proto, x) - ref)
    after = _channel_mean(_run(fixed.proto, x) - ref)
    name = model.proto.graph.node[0].name
    shift = bc.shift(name)
    scale = np.abs(ref).max()
    # the ORT form also quantizes its output (uint8): that rounding is not a mean shift of the layer
    out_step = 0.0 if target == "tensorrt" else scale / 255
    np.testing.assert_allclose(before, shift, atol=1e-5 * scale + out_step)
    assert np.abs(before).max() > 10 * (np.abs(after).max())
    # float32 rounding (TensorRT form), plus half an int32-bias step and the output's rounding (ORT form)
    assert np.abs(after).max() <= 1e-5 * scale + out_step
    assert fixed.provenance.meta["bias_correction"]["applied"] == [name]
    assert plain.provenance.meta["bias_correction"] is None
    if target == "ort" and build is not _depthwise:  # the corrected bias is written int32
        assert any(i.name.endswith("corrected_bias/int32") or "corrected_bias" in i.name and i.data_type == 6
                   for i in fixed.proto.graph.initializer)


def test_only_int8_groups_are_corrected_and_settings_must_match():
    model, _, _, cal, table = _setup(_conv1x1, (4, 6, 6))
    opts = WriteOptions(per_channel_weights=False)
    bc = measure_bias_correction(model, table, cal, opts)
    fp16 = write_model(model, uniform_plan("fp16"), table, dataclasses.replace(opts, bias_correction=bc))
    assert fp16.provenance.meta["bias_correction"]["applied"] == []
    assert not any("corrected_bias" in i.name for i in fp16.proto.graph.initializer)
    with pytest.raises(QuantlabError, match="per_channel_weights"):
        write_model(model, uniform_plan("int8"), table, WriteOptions(per_channel_weights=True, bias_correction=bc))
    # reproducible: same inputs, same shifts, byte for byte
    assert measure_bias_correction(model, table, cal, opts) == bc


def test_every_corrected_model_parses_and_builds_in_tensorrt_rtx(any_model):
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed: pip install 'quantlab[tensorrt-rtx]'")
    from quantlab.backends.tensorrt import TensorRTBackend

    name, proto = any_model
    model = model_from_proto(proto, label=name)
    cal = from_arrays(models.random_inputs(proto, 16, seed=1))
    table = calibrate(model, cal, "minmax").tables["minmax"]
    opts = WriteOptions(target="tensorrt", per_channel_weights=False)
    bc = measure_bias_correction(model, table, cal, opts)
    written = write_model(model, uniform_plan("int8"), table, dataclasses.replace(opts, bias_correction=bc))
    engine = TensorRTBackend("tensorrt-rtx").build_engine(written.proto, label=f"{name} (bias-corrected)")
    assert isinstance(engine, bytes) and len(engine) > 10_000


@pytest.mark.parametrize("group", [1, 2])
def test_conv_shift_of_samples_of_several_sizes_matches_numpy(tmp_path, group):
    """Images of two sizes have no one mean image: the shift comes from per-channel means, exact for a
    1x1 conv (the mean over every output position of every sample), grouped convs reading their own channels."""
    rng = np.random.default_rng(4)
    w = rng.normal(0, 1, (4, 4 // group, 1, 1)) * rng.uniform(0.01, 1.0, (4, 1, 1, 1))
    proto = _model([helper.make_node("Conv", ["input", "w"], ["y"], name="conv", group=group)],
                   ["N", 4, "H", "W"], ["N", 4, "H", "W"], {"w": w})
    model = model_from_proto(proto)
    images = [(rng.normal(0.6, 1.0, (4, s, s + 2)) ** 2).astype(np.float32) for s in (5, 8, 5, 8, 8)]
    cal = _set_by_shape(tmp_path, images)
    table = calibrate(model, cal, "minmax", batch_size=2).tables["minmax"]
    bc = measure_bias_correction(model, table, cal, WriteOptions(target="tensorrt", per_channel_weights=False),
                                 batch_size=2)
    qp, q = weight_qparams(w.astype(np.float32), None)
    wq = q.astype(np.float64) * float(qp.scale)
    x_qp = activation_qparams(table.ranges["input"], "tensorrt")
    diffs = []
    for x in images:
        xq = fake_quantize(x, x_qp).astype(np.float64)
        for g in range(group):
            o, i = slice(g * 4 // group, (g + 1) * 4 // group), slice(g * 4 // group, (g + 1) * 4 // group)
            d = np.einsum("oi,ihw->ohw", wq[o, :, 0, 0], xq[i]) - np.einsum("oi,ihw->ohw", w[o, :, 0, 0], x[i])
            diffs.append((o, d.reshape(d.shape[0], -1)))
    want = np.zeros(4)
    for g in range(group):
        rows = [d for o, d in diffs if o.start == g * 4 // group]
        want[g * 4 // group:(g + 1) * 4 // group] = np.concatenate(rows, axis=1).mean(axis=1)
    got = bc.shift("conv")
    assert got is not None and np.abs(want).max() > 1e-4
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def _linear_on_tokens(rng):
    """torch's Linear on a sequence: MatMul [N, S, 8] x [8, 5], then Add of the bias; a second MatMul without bias
    reads the same tokens (nothing to fold a shift into: left as it is)."""
    w = rng.normal(0, 1, (8, 5)) * rng.uniform(0.005, 1.0, (8, 1))
    v = rng.normal(0, 1, (8, 3))
    nodes = [helper.make_node("MatMul", ["input", "w"], ["xw"], name="fc/MatMul"),
             helper.make_node("Add", ["b", "xw"], ["y"], name="fc/Add"),
             helper.make_node("MatMul", ["input", "v"], ["z"], name="proj")]
    graph = helper.make_graph(nodes, "ptq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "S", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 5]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", "S", 3])],
                              [numpy_helper.from_array(a.astype(np.float32), k)
                               for k, a in {"w": w, "b": rng.normal(0, 0.1, 5), "v": v}.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto, w


@pytest.mark.parametrize("target", ["tensorrt", "ort"])
def test_matmul_with_a_bias_add_on_sentences_of_two_lengths_is_corrected(tmp_path, target):
    """The shift of a Linear on tokens is E[Q(x)] Wq - E[x] W over every token of every sentence (numpy here),
    it is what the written model does on average, and folding it into the Add's bias removes it."""
    rng = np.random.default_rng(5)
    proto, w = _linear_on_tokens(rng)
    model = model_from_proto(proto)
    sentences = [(rng.normal(0.6, 1.0, (s, 8)) ** 2).astype(np.float32) for s in (3, 7, 3, 7, 7, 3)]
    cal = _set_by_shape(tmp_path, sentences)
    table = calibrate(model, cal, "minmax", batch_size=2).tables["minmax"]
    opts = WriteOptions(target=target, per_channel_weights=False)
    bc = measure_bias_correction(model, table, cal, opts, batch_size=2)
    qp, q = weight_qparams(w.astype(np.float32), None)
    wq = q.astype(np.float64) * float(qp.scale)
    x_qp = activation_qparams(table.ranges["input"], target)
    tokens = np.concatenate(sentences).astype(np.float64)
    xq = np.concatenate([fake_quantize(s, x_qp) for s in sentences]).astype(np.float64)
    want = (xq @ wq - tokens @ w).mean(axis=0)
    assert np.abs(want).max() > 1e-3 and bc.shift("proj") is None
    np.testing.assert_allclose(bc.shift("fc/MatMul"), want, rtol=1e-4, atol=1e-6 * np.abs(want).max())

    def token_errors(written):
        errors = []
        for s in sentences:
            ref = _run_outputs(proto, s[None])
            got = _run_outputs(written.proto, s[None])
            errors.append((got["y"] - ref["y"])[0])
        return np.concatenate(errors).mean(axis=0)

    plain = write_model(model, uniform_plan("int8"), table, opts)
    fixed = write_model(model, uniform_plan("int8"), table, dataclasses.replace(opts, bias_correction=bc))
    assert fixed.provenance.meta["bias_correction"]["applied"] == ["fc/MatMul"]
    scale = max(np.abs(_run_outputs(proto, s[None])["y"]).max() for s in sentences)
    out_step = 0.0 if target == "tensorrt" else scale / 255  # the ORT form quantizes the output too
    before, after = token_errors(plain), token_errors(fixed)
    np.testing.assert_allclose(before, want, atol=1e-5 * scale + out_step)
    assert np.abs(after).max() < 0.2 * np.abs(before).max() and np.abs(after).max() <= 1e-5 * scale + out_step
    add = next(n for n in fixed.proto.graph.node if n.name == "fc/Add")
    assert any("fc/MatMul/corrected_bias" in t for t in add.input)
    assert "b" not in {i.name for i in fixed.proto.graph.initializer}  # the replaced bias is not carried along


def _run_outputs(proto, x):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    s = ort.InferenceSession(serialize(proto), so, providers=["CPUExecutionProvider"])
    return {o.name: r.astype(np.float64) for o, r in zip(s.get_outputs(), s.run(None, {"input": x}))}


def _set_by_shape(tmp_path, samples):
    """A calibration set of ``samples`` (arrays of several shapes, one .npy each) batched by shape."""
    from quantlab.data import open_dataset

    folder = tmp_path / "samples"
    folder.mkdir()
    for i, array in enumerate(samples):
        np.save(folder / f"s{i}.npy", array)
    (tmp_path / "set.toml").write_text('batching = "by_shape"\nshuffle = false\n[source]\nkind = "npy"\n'
                                       'path = "samples"\n[inputs]\ninput = "array"\n')
    return open_dataset(tmp_path / "set.toml")


def test_a_matmul_whose_bias_add_follows_a_reshape_is_corrected(tmp_path):
    """tf2onnx writes a BERT's Linear as MatMul on [N*S, H] -> Reshape [N, S, H'] -> Add(bias): bias correction
    found no layer to correct in it. A Reshape that keeps the outputs on the last axis only moves rows."""
    rng = np.random.default_rng(5)
    w = (rng.normal(0, 1, (8, 5)) * rng.uniform(0.005, 1.0, (8, 1))).astype(np.float32)
    nodes = [helper.make_node("Reshape", ["input", "rows"], ["flat"], name="to_rows"),
             helper.make_node("MatMul", ["flat", "w"], ["xw"], name="fc/MatMul"),
             helper.make_node("Reshape", ["xw", "back"], ["xw3"], name="to_tokens"),
             helper.make_node("Add", ["xw3", "b"], ["y"], name="fc/Add")]
    graph = helper.make_graph(nodes, "tf2onnx_linear",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5])],
                              [numpy_helper.from_array(w, "w"),
                               numpy_helper.from_array(rng.normal(0, 0.1, 5).astype(np.float32), "b"),
                               numpy_helper.from_array(np.array([-1, 8], np.int64), "rows"),
                               numpy_helper.from_array(np.array([-1, 4, 5], np.int64), "back")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = model_from_proto(proto)
    x = (rng.normal(0.6, 1.0, (16, 4, 8)) ** 2).astype(np.float32)
    cal = from_arrays({"input": x})
    table = calibrate(model, cal, "minmax").tables["minmax"]
    opts = WriteOptions(target="tensorrt", per_channel_weights=False)
    bc = measure_bias_correction(model, table, cal, opts, batch_size=4)
    assert bc.shift("fc/MatMul") is not None
    fixed = write_model(model, uniform_plan("int8"), table, dataclasses.replace(opts, bias_correction=bc))
    assert fixed.provenance.meta["bias_correction"]["applied"] == ["fc/MatMul"]
    plain = write_model(model, uniform_plan("int8"), table, opts)
    ref = _run_outputs(proto, x)["y"]
    before = (_run_outputs(plain.proto, x)["y"] - ref).mean(axis=(0, 1))
    after = (_run_outputs(fixed.proto, x)["y"] - ref).mean(axis=(0, 1))
    assert np.abs(after).max() < 0.2 * np.abs(before).max()


@pytest.mark.parametrize("with_c", [True, False])
def test_a_gemm_without_a_bias_of_its_own_gets_it_corrected_in_the_add_after_a_squeeze(tmp_path, with_c):
    """TFLite -> ONNX exports write a Dense as ``Gemm(beta=0) -> Reshape [N,1,1,K] -> Squeeze(1,2) -> Add(bias)``
    (openwakeword's embedding): bias correction skipped every such layer. The Add's constant carries it now."""
    rng = np.random.default_rng(7)
    w = (rng.normal(0, 1, (5, 8)) * rng.uniform(0.005, 1.0, (5, 1))).astype(np.float32)  # transB: [K_out, K_in]
    gemm_inputs = ["input", "w", "zeros"] if with_c else ["input", "w"]
    nodes = [helper.make_node("Gemm", gemm_inputs, ["xw"], name="dense/Gemm", transB=1, beta=0.0),
             helper.make_node("Reshape", ["xw", "four_d"], ["xw4"], name="dense/Reshape"),
             helper.make_node("Squeeze", ["xw4", "middle"], ["xw2"], name="dense/Squeeze"),
             helper.make_node("Add", ["xw2", "b"], ["y"], name="dense/Add")]
    graph = helper.make_graph(nodes, "tflite_dense",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(w, "w"),
                               numpy_helper.from_array(np.full(5, 3.0, np.float32), "zeros"),  # times beta 0
                               numpy_helper.from_array(rng.normal(0, 0.1, 5).astype(np.float32), "b"),
                               numpy_helper.from_array(np.array([-1, 1, 1, 5], np.int64), "four_d"),
                               numpy_helper.from_array(np.array([1, 2], np.int64), "middle")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = model_from_proto(proto)
    x = (rng.normal(0.6, 1.0, (32, 8)) ** 2).astype(np.float32)
    cal = from_arrays({"input": x})
    table = calibrate(model, cal, "minmax").tables["minmax"]
    opts = WriteOptions(target="tensorrt", per_channel_weights=False)
    bc = measure_bias_correction(model, table, cal, opts, batch_size=8)
    assert bc.shift("dense/Gemm") is not None
    fixed = write_model(model, uniform_plan("int8"), table, dataclasses.replace(opts, bias_correction=bc))
    assert fixed.provenance.meta["bias_correction"]["applied"] == ["dense/Gemm"]
    plain = write_model(model, uniform_plan("int8"), table, opts)
    ref = _run_outputs(proto, x)["y"]
    before = (_run_outputs(plain.proto, x)["y"] - ref).mean(axis=0)
    after = (_run_outputs(fixed.proto, x)["y"] - ref).mean(axis=0)
    assert np.abs(after).max() < 0.2 * np.abs(before).max()
