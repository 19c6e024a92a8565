"""ONNX Runtime backend: real sessions on the shared test models, checked against numpy."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

import models
from quantlab.backends import get_backend
from quantlab.backends.ort import FUSION_ENV, THREADS_ENV, OrtBackend, int8_dot_saturates, saturation_free
from quantlab.errors import BackendError, InputMismatchError, UnsupportedOpError
from quantlab.graph import activation_names


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int, group: int = 1) -> np.ndarray:
    """Direct NCHW convolution, stride 1 (independent of ONNX Runtime)."""
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    win = sliding_window_view(x, (kh, kw), axis=(2, 3))  # N, C, H, W, kh, kw
    cin_g, cout_g = w.shape[1], w.shape[0] // group
    outs = []
    for g in range(group):
        xs = win[:, g * cin_g:(g + 1) * cin_g]
        ws = w[g * cout_g:(g + 1) * cout_g].astype(np.float64)
        outs.append(np.einsum("nchwij,ocij->nohw", xs, ws))
    return np.concatenate(outs, axis=1) + b.reshape(1, -1, 1, 1)


def _conv_net_reference(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    w = _weights(model)
    relu1 = np.maximum(_conv2d(x, w["w1"], w["b1"], 1), 0)
    relu2 = np.maximum(_conv2d(relu1, w["w2"], w["b2"], 1), 0)
    pooled = relu2.mean(axis=(2, 3))
    return {"relu1": relu1, "logits": pooled @ w["wf"].T.astype(np.float64) + w["bf"]}


def _residual_reference(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    w = _weights(model)
    stem = np.maximum(_conv2d(x, w["w0"], w["b0"], 1), 0)
    r1 = np.maximum(_conv2d(stem, w["w1"], w["b1"], 1), 0)
    total = _conv2d(r1, w["w2"], w["b2"], 1) + stem
    r2 = np.maximum(total, 0)
    dw = np.clip(_conv2d(r2, w["wd"], w["bd"], 1, group=w["wd"].shape[0]), 0, 6)
    return {"sum": total, "logits": dw.mean(axis=(2, 3)) @ w["wf"].T.astype(np.float64) + w["bf"]}


def _gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u), u = 2**-24: the worst-case relative error of n float32 roundings."""
    u = 2.0 ** -24
    return n * u / (1 - n * u)


def _conv_error(x: np.ndarray, err: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int, group: int = 1) -> np.ndarray:
    """Worst float32 error of a convolution output, in any summation order and with any kernel (AVX2, AVX-512,
    FMA or not): gamma_{K+1} * (|W| |x^| + |b|) for its own roundings plus |W| err for the input's error, where
    |x^| <= |x| + err bounds the input ORT actually saw (Higham, Accuracy and Stability, 3.1)."""
    k = int(np.prod(w.shape[1:])) + 1
    own = _gamma(k) * _conv2d(np.abs(x) + err, np.abs(w), np.abs(b), pad, group)
    return own + _conv2d(err, np.abs(w), np.zeros_like(b), pad, group)


def _pool_gemm_error(x: np.ndarray, err: np.ndarray, wf: np.ndarray, bf: np.ndarray) -> np.ndarray:
    """Worst float32 error of mean over H, W (one sum and one scaling) then a Gemm, given x's error ``err``."""
    size = x.shape[2] * x.shape[3]
    pooled, pooled_err = np.abs(x).mean(axis=(2, 3)), err.mean(axis=(2, 3))
    pooled_err = pooled_err + _gamma(size + 1) * (pooled + pooled_err)
    wf_abs = np.abs(wf.astype(np.float64)).T
    return _gamma(wf.shape[1] + 1) * ((pooled + pooled_err) @ wf_abs + np.abs(bf)) + pooled_err @ wf_abs


def _conv_net_error_bound(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Per element, how far a correct float32 evaluation of conv_net can be from the float64 reference."""
    w, ref = _weights(model), _conv_net_reference(model, x)
    e1 = _conv_error(x, np.zeros(x.shape), w["w1"], w["b1"], 1)
    e2 = _conv_error(ref["relu1"], e1, w["w2"], w["b2"], 1)  # Relu is 1-Lipschitz: errors pass through
    relu2 = np.maximum(_conv2d(ref["relu1"], w["w2"], w["b2"], 1), 0)
    return {"relu1": e1, "logits": _pool_gemm_error(relu2, e2, w["wf"], w["bf"])}


def _residual_error_bound(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Per element, how far a correct float32 evaluation of residual_net can be from the float64 reference."""
    w = _weights(model)
    stem = np.maximum(_conv2d(x, w["w0"], w["b0"], 1), 0)
    e_stem = _conv_error(x, np.zeros(x.shape), w["w0"], w["b0"], 1)
    r1 = np.maximum(_conv2d(stem, w["w1"], w["b1"], 1), 0)
    e_r1 = _conv_error(stem, e_stem, w["w1"], w["b1"], 1)
    total = _conv2d(r1, w["w2"], w["b2"], 1) + stem
    e_conv2 = _conv_error(r1, e_r1, w["w2"], w["b2"], 1)
    e_sum = e_conv2 + e_stem + _gamma(1) * (np.abs(total) + e_conv2 + e_stem)  # the Add, fused or not
    r2 = np.maximum(total, 0)
    dw = np.clip(_conv2d(r2, w["wd"], w["bd"], 1, group=w["wd"].shape[0]), 0, 6)
    e_dw = _conv_error(r2, e_sum, w["wd"], w["bd"], 1, group=w["wd"].shape[0])  # Clip is 1-Lipschitz too
    return {"sum": e_sum, "logits": _pool_gemm_error(dw, e_dw, w["wf"], w["bf"])}


def _attention_reference(model: onnx.ModelProto, x: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    w = {k: v.astype(np.float64) for k, v in _weights(model).items()}
    x = x.astype(np.float64)
    q, k, v = x @ w["wq"], x @ w["wk"], x @ w["wv"]
    scores = q @ k.transpose(0, 2, 1) + mask.astype(np.float64)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    return {"probs": probs, "out": (probs @ v) @ w["wo"] + w["bo"]}


def test_get_backend_default_is_ort():
    assert isinstance(get_backend(), OrtBackend)


def test_conv_net_matches_numpy_and_exposes_intermediate():
    model = models.conv_net()
    feeds = models.random_inputs(model, batch=3, seed=1)
    runner = get_backend("ort").build(model, outputs=["relu1"])
    assert runner.input_names == ("input",)
    assert runner.output_names == ("logits", "relu1")
    out = runner.run(feeds)
    ref = _conv_net_reference(model, feeds["input"])
    bound = _conv_net_error_bound(model, feeds["input"])  # float32 rounding on any CPU, not what this one printed
    for name in ("logits", "relu1"):
        assert (np.abs(out[name] - ref[name]) <= bound[name]).all(), name
    assert out["relu1"].shape == (3, 8, 16, 16)
    only = runner.run(feeds, ["relu1"])
    assert list(only) == ["relu1"]


def test_residual_net_matches_numpy_including_the_skip_add():
    model = models.residual_net()
    feeds = models.random_inputs(model, batch=2, seed=2)
    out = get_backend("ort").build(model, outputs=["sum"]).run(feeds)
    ref = _residual_reference(model, feeds["input"])
    bound = _residual_error_bound(model, feeds["input"])
    for name in ("sum", "logits"):
        assert (np.abs(out[name] - ref[name]) <= bound[name]).all(), name


def test_attention_with_float32_min_mask_matches_numpy():
    model = models.mlp_attention()
    feeds = models.random_inputs(model, batch=2, seed=3)
    out = get_backend("ort").build(model, outputs=["probs"]).run(feeds)
    ref = _attention_reference(model, feeds["x"], feeds["mask"])
    np.testing.assert_allclose(out["probs"], ref["probs"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["out"], ref["out"], rtol=1e-4, atol=1e-4)
    assert np.all(out["probs"][..., -2:] == 0)  # masked keys get exactly zero weight


def test_every_shared_model_runs_with_all_activations_exposed(any_model):
    name, model = any_model
    acts = activation_names(model, include_inputs=False)
    runner = get_backend("ort").build(model, outputs=acts)
    out = runner.run(models.random_inputs(model, batch=2))
    assert set(acts) <= set(out)
    for tensor in acts:
        assert out[tensor].shape[0] == 2, (name, tensor)
        assert np.isfinite(out[tensor]).all() or tensor in ("masked",), (name, tensor)


def test_float16_intermediate_keeps_its_type():
    """An exposed float16 tensor is declared float16 (ORT refuses a float32 declaration)."""
    nodes = [
        helper.make_node("Cast", ["x"], ["h"], name="to_half", to=TensorProto.FLOAT16),
        helper.make_node("Relu", ["h"], ["hr"], name="relu_half"),
        helper.make_node("Cast", ["hr"], ["y"], name="to_float", to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([[-1.0, 0.5, 2.0], [3.0, -4.0, 0.25]], np.float32)
    out = get_backend("ort").build(model, outputs=["hr"]).run({"x": x})
    assert out["hr"].dtype == np.float16
    np.testing.assert_array_equal(out["hr"], np.maximum(x, 0).astype(np.float16))


def _single_node_model(op: str, dtype: int, name: str) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], name=name)], "g",
                              [helper.make_tensor_value_info("x", dtype, [2, 3])],
                              [helper.make_tensor_value_info("y", dtype, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_missing_kernel_is_unsupported_op_naming_node_and_op():
    with pytest.raises(UnsupportedOpError) as err:
        get_backend("ort").build(_single_node_model("Erf", TensorProto.DOUBLE, "erf_double"))
    text = str(err.value)
    assert "'erf_double'" in text and "Erf" in text and "float64" in text


def test_unknown_custom_op_is_unsupported_op_naming_node():
    graph = helper.make_graph([helper.make_node("FooBar", ["x"], ["y"], name="weird", domain="com.example")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedOpError, match="FooBar.*'weird'"):
        get_backend("ort").build(model)


def test_unknown_intermediate_output_is_named():
    with pytest.raises(BackendError, match="nope"):
        get_backend("ort").build(models.conv_net(), outputs=["nope"])


def test_bad_feeds_name_the_input():
    runner = get_backend("ort").build(models.conv_net())
    x = models.random_inputs(models.conv_net(), batch=1)["input"]
    with pytest.raises(InputMismatchError, match="missing \\['input'\\]"):
        runner.run({"image": x})
    with pytest.raises(InputMismatchError, match="'input' is float64"):
        runner.run({"input": x.astype(np.float64)})
    with pytest.raises(BackendError, match="does not output"):
        runner.run({"input": x}, ["relu1"])


def test_describe_reports_library_version_device_and_threads():
    info = get_backend("ort", threads=1).describe()
    assert info.name == "ort"
    assert info.library == "onnxruntime"
    assert info.version == onnxruntime.__version__
    assert info.device == onnxruntime.get_device()
    assert info.details["threads"] == 1
    assert "CPUExecutionProvider" in info.details["providers"]
    assert info.as_dict()["version"] == onnxruntime.__version__


def test_missing_provider_is_a_clear_error():
    with pytest.raises(BackendError, match="onnxruntime-gpu"):
        OrtBackend(providers=["NoSuchExecutionProvider"])


def test_optimized_model_shows_the_fusions_ort_applied():
    """Conv+Relu fuse in ORT's CPU graph optimiser: no standalone Relu is left to run."""
    model = models.conv_net()
    optimized = get_backend("ort").optimized_model(model)
    ops = [n.op_type for n in optimized.graph.node]
    assert "Relu" not in ops
    assert ops.count("Conv") + ops.count("FusedConv") == 2
    plain = get_backend("ort", optimization="none").optimized_model(model)
    assert [n.op_type for n in plain.graph.node].count("Relu") == 2


# ----------------------------------------------------------------- INT8: fused integer kernels vs Q/DQ semantics


def _qdq_matmul(w_q: np.ndarray, act_dtype: type) -> onnx.ModelProto:
    """x[1,K] -> Q/DQ (scale 1, zero point 0) -> MatMul with int8 weights w_q[K,N] (scale 1).

    Its exact result is the integer dot product x . w_q, for an independent check.
    """
    k, n = w_q.shape
    inits = [numpy_helper.from_array(w_q, "wq"), numpy_helper.from_array(np.array(1.0, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "wz"), numpy_helper.from_array(np.array(0, act_dtype), "xz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "xz"], ["xq"], name="x_q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "xz"], ["xd"], name="x_dq"),
             helper.make_node("DequantizeLinear", ["wq", "s", "wz"], ["wd"], name="w_dq"),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "qdq_matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def auto_mode(monkeypatch):
    """No QUANTLAB_ORT_* variable: OrtBackend() decides the fusion per model (what the auto tests check)."""
    monkeypatch.delenv(FUSION_ENV, raising=False)
    monkeypatch.delenv(THREADS_ENV, raising=False)


@pytest.mark.usefixtures("auto_mode")
@pytest.mark.parametrize(("act_dtype", "x_value"), [(np.uint8, 255.0), (np.int8, 127.0)])
def test_auto_mode_never_returns_saturated_int8_results(act_dtype, x_value):
    """Two products 255 * 127 overflow int16: ORT's VPMADDUBSW path (x86 without VNNI) clips them.

    quantlab's default (qdq_fusion=None) must give the exact integer result on any CPU;
    qdq_fusion=False always does; on a saturating CPU the forced fused path shows the error
    the auto mode avoids.
    """
    k = 64
    model = _qdq_matmul(np.full((k, 1), 127, np.int8), act_dtype)
    feeds = {"x": np.full((1, k), x_value, np.float32)}
    exact = x_value * 127 * k
    assert not saturation_free(model)
    auto = OrtBackend().build(model)
    assert auto.run(feeds)["y"].item() == exact
    assert auto.qdq_fusion == (not int8_dot_saturates())
    assert OrtBackend(qdq_fusion=False).build(model).run(feeds)["y"].item() == exact
    fused = OrtBackend(qdq_fusion=True).build(model).run(feeds)["y"].item()
    if int8_dot_saturates():
        assert fused != exact  # the hardware path the auto mode steers around
    # 7-bit weights cannot saturate: the auto mode keeps the fast path, and it is exact
    small = _qdq_matmul(np.full((k, 1), 64, np.int8), act_dtype)
    assert saturation_free(small)
    runner = OrtBackend().build(small)
    assert runner.qdq_fusion is True
    assert runner.run(feeds)["y"].item() == x_value * 64 * k


def _qdq_matmul_in_a_branch(w_q: np.ndarray, act_dtype: type) -> onnx.ModelProto:
    """:func:`_qdq_matmul` as the then branch of an If on a bool input (its initializers the branch's own, as a
    merged decoder's): the main graph holds no DequantizeLinear at all."""
    flat = _qdq_matmul(w_q, act_dtype)
    then = helper.make_graph(list(flat.graph.node), "then", [], list(flat.graph.output),
                             initializer=list(flat.graph.initializer))
    other = helper.make_graph([helper.make_node("MatMul", ["x", "wf"], ["y_else"], name="mm_float")], "else", [],
                              [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [1, w_q.shape[1]])],
                              initializer=[numpy_helper.from_array(w_q.astype(np.float32), "wf")])
    graph = helper.make_graph([helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then,
                                                else_branch=other)], "qdq_in_if",
                              [*flat.graph.input, helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              list(flat.graph.output))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.usefixtures("auto_mode")
@pytest.mark.parametrize("act_dtype", [np.uint8, np.int8])
def test_auto_mode_looks_inside_control_flow_for_saturating_kernels(act_dtype, monkeypatch):
    """An optimum-style model keeps every Q/DQ inside an If: the check saw no DequantizeLinear in the main graph,
    fused, and on an AVX2 CPU a decoder written INT8 inside its branches measured 13 dB instead of 39."""
    from quantlab.backends import ort as ort_backend

    k = 64
    model = _qdq_matmul_in_a_branch(np.full((k, 1), 127, np.int8), act_dtype)
    feeds = {"x": np.full((1, k), 255.0 if act_dtype is np.uint8 else 127.0, np.float32), "cond": np.array(True)}
    exact = float(feeds["x"][0, 0]) * 127 * k
    assert not saturation_free(model)
    assert OrtBackend().build(model).run(feeds)["y"].item() == exact
    monkeypatch.setattr(ort_backend, "int8_dot_saturates", lambda: True)  # as on a CPU without VNNI, on any CPU
    assert OrtBackend().fuses(model) is False
    small = _qdq_matmul_in_a_branch(np.full((k, 1), 64, np.int8), act_dtype)
    assert saturation_free(small) and OrtBackend().fuses(small) is True


def test_int8_dot_saturates_reads_the_cpu_flags(tmp_path, monkeypatch):
    import platform

    from quantlab.backends import ort as ort_backend

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    check = ort_backend.int8_dot_saturates.__wrapped__  # bypass the per-process cache
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor : 0\nflags : fpu sse4_1 avx avx2 fma\n")
    vnni = tmp_path / "vnni"
    vnni.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_vnni\n")
    assert check(str(avx2)) is True
    assert check(str(vnni)) is False
    assert check(str(tmp_path / "missing")) is True  # unknown x86: accuracy first
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert check(str(avx2)) is False


@pytest.mark.usefixtures("auto_mode")
def test_describe_records_the_int8_kernel_choice():
    info = OrtBackend().describe().details
    assert info["qdq_fusion"] == "auto" and isinstance(info["int8_dot_saturates"], bool)
    assert info["forced_by_environment"] == {}
    assert OrtBackend(qdq_fusion=False).describe().details["qdq_fusion"] is False


@pytest.mark.parametrize(("value", "fusion"), [("on", True), ("OFF", False), (" auto ", "auto"), ("", "auto")])
def test_environment_forces_the_fusion_mode_and_threads_unless_an_argument_does(monkeypatch, value, fusion):
    monkeypatch.setenv(FUSION_ENV, value)
    monkeypatch.setenv(THREADS_ENV, "1")
    model = _qdq_matmul(np.full((8, 1), 127, np.int8), np.uint8)
    backend = OrtBackend()
    details = backend.describe().details
    assert details["qdq_fusion"] == fusion and details["threads"] == 1
    assert details["forced_by_environment"].get(FUSION_ENV, "auto") == fusion
    assert details["forced_by_environment"][THREADS_ENV] == 1
    auto_choice = not int8_dot_saturates() or saturation_free(model)
    assert backend.build(model).qdq_fusion is (auto_choice if fusion == "auto" else fusion)
    explicit = OrtBackend(qdq_fusion=True, threads=2)  # arguments win over the environment
    assert explicit.describe().details["forced_by_environment"] == {}
    assert explicit.build(model).qdq_fusion is True and explicit.threads == 2
    assert OrtBackend(qdq_fusion=False).build(model).qdq_fusion is False


@pytest.mark.parametrize(("name", "value"), [(FUSION_ENV, "yes"), (THREADS_ENV, "two"), (THREADS_ENV, "-1")])
def test_bad_environment_value_is_an_error_naming_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(BackendError, match=f"{name}='{value}'.*unset it"):
        OrtBackend()


def _scaled_qdq_matmul(w_q: np.ndarray, w_scale: float, act_dtype: type, zero_point: int, rows: int) -> onnx.ModelProto:
    """x[rows,K] -> Q/DQ (scale 2**-5, ``zero_point``) -> MatMul with int8 weights w_q[K,N] * ``w_scale``."""
    k, n = w_q.shape
    inits = [numpy_helper.from_array(w_q, "wq"), numpy_helper.from_array(np.array(2.0 ** -5, np.float32), "sx"),
             numpy_helper.from_array(np.array(w_scale, np.float32), "sw"),
             numpy_helper.from_array(np.array(0, np.int8), "wz"),
             numpy_helper.from_array(np.array(zero_point, act_dtype), "xz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "xz"], ["xq"], name="x_q"),
             helper.make_node("DequantizeLinear", ["xq", "sx", "xz"], ["xd"], name="x_dq"),
             helper.make_node("DequantizeLinear", ["wq", "sw", "wz"], ["wd"], name="w_dq"),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "scaled_qdq_matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("env", ["", "on", "off"])
@pytest.mark.parametrize(("act_dtype", "zero_point", "lo", "hi"), [(np.uint8, 128, 0, 255), (np.int8, 0, -128, 127)])
@pytest.mark.parametrize("qmax", [64, 127])
def test_each_fusion_mode_keeps_its_promise_on_any_cpu(monkeypatch, env, act_dtype, zero_point, lo, hi, qmax):
    """Forced either way (argument or environment), each mode computes what it promises.

    Unfused: Q/DQ then a float32 MatMul, within the worst-case float32 bound of a K-term
    dot product (any summation order, any kernel): |y - exact| <= gamma_{K+1} * sum |x_dq * w_dq|.
    Fused: int32 accumulation then one float scaling, |y - exact| <= gamma_2 * |exact|, when the
    int16 pair sums cannot saturate (weights within [-64, 64], or a VNNI CPU). Full-range weights
    on a CPU without VNNI may saturate: there only the mode and the integer op are asserted.
    """
    monkeypatch.setenv(FUSION_ENV, env)
    rng = np.random.default_rng(qmax)
    k, n, rows = 64, 24, 16
    w_q = rng.integers(-qmax, qmax + 1, (k, n)).astype(np.int8)
    w_q[0, 0] = qmax
    q = rng.integers(lo, hi + 1, (rows, k))
    q[0, :2] = hi  # two large products side by side: the pair a saturating kernel clips
    w_q[:2, 0] = qmax
    model = _scaled_qdq_matmul(w_q, 0.0123, act_dtype, zero_point, rows)
    x_dq = (q - zero_point) * 2.0 ** -5  # exact in float32: Q/DQ returns x itself
    w_dq = w_q.astype(np.float64) * float(np.float32(0.0123))
    exact = x_dq @ w_dq
    feeds = {"x": x_dq.astype(np.float32)}
    for fuse in (False, True):
        backend = OrtBackend(qdq_fusion=fuse) if env == "" else OrtBackend()
        if env != "" and (env == "on") is not fuse:
            continue
        runner = backend.build(model)
        assert runner.qdq_fusion is fuse and backend.describe().details["qdq_fusion"] is fuse
        ops = [node.op_type for node in backend.optimized_model(model).graph.node]
        assert ("MatMul" in ops and "DequantizeLinear" in ops) is not fuse, ops
        assert any("Integer" in op or op.startswith("QLinear") for op in ops) is fuse, ops
        y = runner.run(feeds)["y"].astype(np.float64)
        if not fuse:
            assert (np.abs(y - exact) <= _gamma(k + 1) * (np.abs(x_dq) @ np.abs(w_dq))).all()
        elif qmax <= 64 or not int8_dot_saturates():
            assert (np.abs(y - exact) <= _gamma(2) * np.abs(exact)).all()


def test_profile_times_the_nodes_ort_runs():
    model = models.conv_net()
    backend = get_backend("ort", threads=1)
    feeds = models.random_inputs(model, 2, seed=0)
    times = backend.profile(model, feeds, runs=3)
    optimized = {n.name: n.op_type for n in backend.optimized_model(model).graph.node}
    assert times and set(times) <= set(optimized)
    assert all(t["ms"] >= 0 and t["op"] == optimized[name] for name, t in times.items())
    assert sum(t["ms"] for name, t in times.items() if "Conv" in t["op"]) > 0
    with pytest.raises(BackendError, match="runs >= 1"):
        backend.profile(model, feeds, runs=0)


def test_sessions_without_spinning_give_the_same_outputs():
    """allow_spinning=0 only lets idle threads sleep: same kernels, same values, recorded in describe()."""
    model = models.residual_net()
    feeds = models.random_inputs(model, 4, seed=3)
    names = [o.name for o in model.graph.output]
    spinning, sleeping = OrtBackend(), OrtBackend(spinning=False)
    a, b = spinning.build(model).run(feeds, names), sleeping.build(model).run(feeds, names)
    for name in names:
        np.testing.assert_array_equal(a[name], b[name])
    assert spinning.describe().details["spinning"] is True and sleeping.describe().details["spinning"] is False


def test_a_failing_run_names_the_input_shapes_and_prints_nothing_itself(capfd):
    """A Reshape an exporter baked at the traced length (4 x 8 values): another length fails inside ONNX
    Runtime. The error names the shapes given; ONNX Runtime's own log line does not reach stderr."""
    from quantlab.errors import BackendError

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="baked")], "baked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([4, 8], np.int64), "shape")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    runner = get_backend("ort").build(proto)
    assert runner.run({"x": np.ones((4, 8), np.float32)})["y"].shape == (4, 8)
    capfd.readouterr()
    with pytest.raises(BackendError, match=r"on x \[4, 10\]: .*Reshape"):
        runner.run({"x": np.ones((4, 10), np.float32)})
    assert "onnxruntime" not in capfd.readouterr().err


def test_ort_form_qdq_beside_a_loop_runs_without_aborting_the_process(tmp_path):
    """ORT 1.32 moved the conv output's DequantizeLinear past the Transpose a Loop body reads by name and then
    aborted the process (an assertion in its graph code: no exception, exit 134, a half-written report). The
    backend turns that propagation off for such models; run in a child process, as a regression would kill us."""
    import subprocess
    import sys

    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays
    from quantlab.graph import model_from_proto
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, write_model

    model = model_from_proto(models.transposed_loop_rnn(), label="loop_rnn")
    rng = np.random.default_rng(0)
    feeds = {"x": rng.normal(size=(4, 6, 8)).astype(np.float32), "h0": np.zeros((4, 16), np.float32)}
    table = calibrate(model, from_arrays(feeds), "minmax", batch_size=4).tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="ort"))
    assert any(n.op_type == "DequantizeLinear" for n in written.proto.graph.node)
    assert any("QDQPropagationTransformer" in n for n in written.provenance.notes)  # the user's own session too
    onnx.save(written.proto, tmp_path / "int8.onnx")
    np.savez(tmp_path / "feeds.npz", **feeds)
    script = ("import numpy as np, onnx\nfrom quantlab.backends import get_backend\n"
              f"feeds = dict(np.load({str(tmp_path / 'feeds.npz')!r}))\n"
              f"out = get_backend('ort').build(onnx.load({str(tmp_path / 'int8.onnx')!r})).run(feeds)\n"
              "print(sorted((k, v.shape) for k, v in out.items()))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    assert "('hN', (4, 16)), ('ys', (6, 4, 16))" in done.stdout


def test_a_native_fp16_model_loads_where_ort_nchwc_transformer_segfaults(tmp_path):
    """ORT 1.32 segfaults at ORT_ENABLE_ALL creating the session of a float16 ``Transpose -> Reshape ->
    Transpose -> MatMul`` (its NCHWc transformer; AECMOS's GRU head, written FP16 by quantlab): exit 139,
    nothing written. The backend turns that transformer off for models computing in float16, and the written
    model's notes tell the user's own session to do the same. A child process, as a regression would kill us."""
    import subprocess
    import sys

    from quantlab.backends.ort import unsafe_optimizers
    from quantlab.graph.halves import computes_in_float16
    from quantlab.graph import model_from_proto
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, write_model

    model = model_from_proto(models.gru_head(), label="gru_head")
    written = write_model(model, uniform_plan("fp16"), None, WriteOptions())
    assert computes_in_float16(written.proto) and "NchwcTransformer" in unsafe_optimizers(written.proto)
    assert any("NchwcTransformer" in n for n in written.provenance.notes)
    simulated = write_model(model, uniform_plan("fp16"), None, WriteOptions(fp16_simulation=True))
    assert not computes_in_float16(simulated.proto)  # float32 kernels with float16 round trips keep NCHWc
    onnx.save(written.proto, tmp_path / "fp16.onnx")
    x = np.random.default_rng(0).normal(size=(5, 3, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = ("import numpy as np, onnx\nfrom quantlab.backends import get_backend\n"
              f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
              f"out = get_backend('ort').build(onnx.load({str(tmp_path / 'fp16.onnx')!r})).run({{'x': x}})\n"
              "print(out['out'].shape, out['out'].dtype)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-500:])
    assert "(3, 5, 16) float32" in done.stdout
    reference = get_backend("ort").build(models.gru_head()).run({"x": x})["out"]
    fp16 = get_backend("ort").build(written.proto).run({"x": x})["out"]
    np.testing.assert_allclose(fp16, reference, atol=2e-2)
