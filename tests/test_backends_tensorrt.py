"""TensorRT / TensorRT-RTX backend: the real ONNX parser and builder, no GPU needed.

TensorRT-RTX's parser and builder run on the CPU, so every model here is parsed
and built into a serialized engine for real; any parser or builder error fails
the test. Running an engine needs a CUDA GPU: those tests skip, saying why.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import models
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantlab.backends import get_backend
from quantlab.errors import (
    BackendError,
    BackendUnavailableError,
    InputMismatchError,
    UnsupportedOpError,
)
from quantlab.graph import LoadedModel, activation_names, model_from_proto
from quantlab.table import CalibrationTable, TensorRange

trt_rtx = pytest.importorskip(
    "tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed: pip install 'quantlab[tensorrt-rtx]'"
)

from quantlab.backends.tensorrt import (  # noqa: E402 - after the importorskip above
    CPU_BUILD,
    DEFAULT_DYNAMIC_DIM,
    EngineCache,
    EngineCacheWarning,
    TensorRTBackend,
    cuda_device,
    profile_shapes,
)

DEVICE = cuda_device()
needs_gpu = pytest.mark.skipif(
    not DEVICE.available,
    reason=f"running a TensorRT engine needs a CUDA GPU; none here ({DEVICE.reason})",
)


@pytest.fixture(scope="module")
def rtx() -> TensorRTBackend:
    return TensorRTBackend("tensorrt-rtx")


def _engine_ok(engine: bytes) -> None:
    assert isinstance(engine, bytes)
    assert len(engine) > 10_000  # a real plan, not an empty or error blob


def test_every_shared_model_parses_and_builds_fp32(rtx, any_model):
    name, model = any_model
    _engine_ok(rtx.build_engine(model, label=name))


def test_profiles_from_data_shapes_and_intermediate_outputs_build(rtx):
    model = models.residual_net()
    engine = rtx.build_engine(model, profiles_from={"input": (4, 3, 16, 16)}, outputs=["r1", "sum"])
    _engine_ok(engine)


def test_profile_shapes_follow_the_data():
    assert profile_shapes("x", (-1, 3, 16, 16), (8, 3, 16, 16)) == ((1, 3, 16, 16), (8, 3, 16, 16), (8, 3, 16, 16))
    lo, opt, hi = DEFAULT_DYNAMIC_DIM
    assert profile_shapes("x", (-1, 8, 16), None) == ((lo, 8, 16), (opt, 8, 16), (hi, 8, 16))
    with pytest.raises(InputMismatchError, match="axis 1"):
        profile_shapes("x", (-1, 3, 16, 16), (2, 4, 16, 16))
    with pytest.raises(InputMismatchError, match="rank"):
        profile_shapes("x", (-1, 3, 16, 16), (2, 3, 16))


def test_profiles_for_unknown_input_are_refused(rtx):
    with pytest.raises(InputMismatchError, match="'image'"):
        rtx.build_engine(models.conv_net(), profiles_from={"image": (1, 3, 16, 16)})


def test_unknown_intermediate_output_is_named(rtx):
    with pytest.raises(BackendError, match="'no_such_tensor'"):
        rtx.build_engine(models.conv_net(), outputs=["no_such_tensor"])


def _model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    inits: Sequence[onnx.TensorProto] = (),
    extra_opsets: Sequence[onnx.OperatorSetIdProto] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *extra_opsets])


def test_unsupported_op_names_node_and_op(rtx):
    model = _model([helper.make_node("FooBar", ["x"], ["y"], name="weird_node", domain="com.example")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                   extra_opsets=[helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedOpError) as err:
        rtx.build_engine(model, label="weird.onnx")
    text = str(err.value)
    assert "weird.onnx" in text and "weird_node" in text and "FooBar" in text
    assert "--backend ort" in text


def test_onnx_runtime_contrib_ops_say_the_model_went_through_its_optimizer(rtx):
    """A BERT fused by ORT's transformer optimizer (FastGelu, SkipLayerNormalization, ... in com.microsoft): ONNX
    Runtime runs it, TensorRT cannot parse it; the error says where such ops come from and what to give instead."""
    model = _model([helper.make_node("FastGelu", ["x"], ["y"], name="gelu_fused", domain="com.microsoft")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                   extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    x = np.array([[-1.0, 0.0, 2.0]], np.float32)
    assert get_backend("ort").build(model).run({"x": x}, ["y"])["y"].shape == (1, 3)  # ORT knows the op
    with pytest.raises(UnsupportedOpError) as err:
        rtx.build_engine(model, label="bert_opt.onnx")
    text = str(err.value)
    assert "bert_opt.onnx" in text and "gelu_fused" in text and "FastGelu is an op" in text
    assert "com.microsoft" in text and "transformer optimizer" in text and "--backend ort" in text


def test_nonzero_zero_point_is_a_backend_error_naming_the_node(rtx):
    """ORT's uint8 form: the TensorRT parser refuses it; the error says which node and what to do."""
    model = _model(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q_input"),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq_input")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
         numpy_helper.from_array(np.array(128, np.uint8), "z")],
    )
    with pytest.raises(BackendError) as err:
        rtx.build_engine(model)
    assert not isinstance(err.value, UnsupportedOpError)
    text = str(err.value)
    assert "q_input" in text and "QuantizeLinear" in text and "zero point" in text.lower()
    assert "catchCudaError" not in text  # no-GPU noise is stripped


def test_int32_bias_dequantize_is_refused_with_the_node_named(rtx):
    model = _model(
        [helper.make_node("DequantizeLinear", ["b", "s", "z"], ["y"], name="dq_bias")], [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.arange(4, dtype=np.int32), "b"),
         numpy_helper.from_array(np.array(0.1, np.float32), "s"),
         numpy_helper.from_array(np.array(0, np.int32), "z")],
    )
    with pytest.raises(BackendError, match="dq_bias"):
        rtx.build_engine(model)


def test_symmetric_int8_qdq_conv_builds(rtx):
    """The TensorRT form (int8, zero point 0, per-channel weights, float bias) parses and builds."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    w_scale = (np.abs(w).reshape(4, -1).max(axis=1) / 127).astype(np.float32)
    w_q = np.clip(np.round(w / w_scale.reshape(4, 1, 1, 1)), -127, 127).astype(np.int8)
    model = _model(
        [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="x_q"),
         helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xdq"], name="x_dq"),
         helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wdq"], name="w_dq", axis=0),
         helper.make_node("Conv", ["xdq", "wdq", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
         numpy_helper.from_array(np.array(0, np.int8), "xz"),
         numpy_helper.from_array(w_q, "wq"), numpy_helper.from_array(w_scale, "ws"),
         numpy_helper.from_array(np.zeros(4, np.int8), "wz"),
         numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b")],
    )
    onnx.checker.check_model(model)
    _engine_ok(rtx.build_engine(model))


def test_missing_tensorrt_module_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, as when not installed
    with pytest.raises(BackendUnavailableError, match=r"pip install 'quantlab\[tensorrt\]'"):
        get_backend("tensorrt")


def test_missing_tensorrt_rtx_module_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'quantlab\[tensorrt-rtx\]'"):
        get_backend("tensorrt-rtx")


def test_describe_reports_library_version_and_device(rtx):
    info = rtx.describe()
    assert info.name == "tensorrt-rtx"
    assert info.library == "tensorrt_rtx"
    assert info.version == trt_rtx.__version__
    assert info.details["strongly_typed"] is True
    if DEVICE.available:
        assert DEVICE.compute_capability in info.device
    else:
        assert info.device.startswith("no GPU: parse/build only")
        assert info.details["compute_capability"] == CPU_BUILD


@pytest.mark.skipif(DEVICE.available, reason="a GPU is present: build() succeeds here")
def test_build_without_gpu_says_why_and_points_to_ort(rtx):
    with pytest.raises(BackendUnavailableError) as err:
        rtx.build(models.conv_net())
    text = str(err.value)
    assert "no CUDA GPU" in text or "cuda-python" in text
    assert "ONNX Runtime" in text


# ----------------------------------------------------------------- engine cache


def test_cache_key_changes_with_model_plan_version_gpu_and_settings(rtx):
    model = models.conv_net()
    settings = rtx._settings_for(model, [], None)
    key = rtx.cache_key(model, settings=settings)
    assert key.compute_capability == DEVICE.capability_key
    assert key.version == trt_rtx.__version__
    digests = {
        key.digest,
        rtx.cache_key(model, plan_sha256="a" * 64, settings=settings).digest,
        rtx.cache_key(models.conv_net(seed=1), settings=settings).digest,
        rtx.cache_key(model, settings=rtx._settings_for(model, ["relu1"], None)).digest,
        rtx.cache_key(model, settings=rtx._settings_for(model, [], {"input": (4, 3, 16, 16)})).digest,
        dataclasses.replace(key, version="1.0.0").digest,
        dataclasses.replace(key, compute_capability="8.6").digest,
    }
    assert len(digests) == 7
    assert rtx.cache_key(model, settings=settings) == key  # deterministic


def test_engine_cache_hit_then_stale_entry_from_another_version_is_rebuilt(rtx, tmp_path):
    model = models.conv_net()
    first = rtx.engine_for(model, cache_dir=tmp_path, plan_sha256="p" * 64)
    assert first.status == "built" and first.path is not None and first.path.is_file()
    sidecar = json.loads(first.path.with_suffix(".json").read_text())
    assert sidecar["key"]["version"] == trt_rtx.__version__
    assert sidecar["engine_sha256"]
    second = rtx.engine_for(model, cache_dir=tmp_path, plan_sha256="p" * 64)
    assert second.status == "cached" and second.engine == first.engine

    # the same cache folder as seen by another TensorRT version on a GPU
    other = dataclasses.replace(first.key, version="0.9.0", compute_capability="8.6")
    cache = EngineCache(tmp_path)
    cache.store(other, b"engine from elsewhere", {"note": "other machine"})
    for path in [first.path, first.path.with_suffix(".json")]:
        path.unlink()
    with pytest.warns(EngineCacheWarning) as caught:
        third = rtx.engine_for(model, cache_dir=tmp_path, plan_sha256="p" * 64)
    message = str(caught[0].message)
    assert third.status == "rebuilt"
    assert "0.9.0" in message and "8.6" in message and trt_rtx.__version__ in message
    assert "not portable across GPUs" in message
    assert cache.engine_path(other).is_file()  # the other machine's engine is left alone
    assert third.engine != b"engine from elsewhere"


def test_engine_cache_mismatched_sidecar_and_corrupt_engine_are_rebuilt(rtx, tmp_path):
    model = models.concat_net()
    built = rtx.engine_for(model, cache_dir=tmp_path)
    meta_path = built.path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["key"]["compute_capability"] = "12.0"  # a sidecar copied from another GPU under this name
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(EngineCacheWarning, match="12.0.*not portable"):
        again = rtx.engine_for(model, cache_dir=tmp_path)
    assert again.status == "rebuilt"

    built.path.write_bytes(b"truncated")
    with pytest.warns(EngineCacheWarning, match="does not match its recorded hash"):
        fixed = rtx.engine_for(model, cache_dir=tmp_path)
    assert fixed.status == "rebuilt" and len(fixed.engine) > 10_000


def test_rtx_ignores_timing_cache_file(tmp_path):
    backend = TensorRTBackend("tensorrt-rtx", timing_cache=tmp_path / "timing.cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the no-op RTX API is never called
        _engine_ok(backend.build_engine(models.conv_net()))
    assert not (tmp_path / "timing.cache").exists()


# ----------------------------------------------------------------- running (GPU only)


@needs_gpu
@pytest.mark.gpu
def test_engine_runs_and_matches_onnx_runtime(rtx, tmp_path):
    model = models.residual_net()
    feeds = models.random_inputs(model, batch=2, seed=4)
    reference = get_backend("ort").build(model, outputs=["sum"]).run(feeds)
    runner = rtx.build(model, outputs=["sum"], cache_dir=tmp_path, profiles_from={"input": (2, 3, 16, 16)})
    try:
        out = runner.run(feeds)
        for name in ("logits", "sum"):
            np.testing.assert_allclose(out[name], reference[name], rtol=1e-2, atol=1e-2)
        smaller = runner.run({"input": feeds["input"][:1]})
        np.testing.assert_allclose(smaller["logits"], reference["logits"][:1], rtol=1e-2, atol=1e-2)
        with pytest.raises(InputMismatchError, match="optimisation profile"):
            runner.run({"input": np.concatenate([feeds["input"]] * 4)})
    finally:
        runner.close()


# ----------------------------------------------------------------- every model quantlab writes


def _minmax_table(model: LoadedModel) -> CalibrationTable:
    """MinMax ranges of every float activation over a few batches, computed with ONNX Runtime.

    Values with |x| > 1e30 (additive masks at float32.min) are left out of the
    ranges, as quantlab's calibrators do, and counted as ``huge``.
    """
    names = activation_names(model.proto)
    runner = get_backend("ort").build(model.proto, outputs=[n for n in names if n not in model.input_names])
    stats: dict[str, list[float]] = {}
    for seed in range(3):
        feeds = models.random_inputs(model.proto, batch=2, seed=seed)
        values = {**feeds, **runner.run(feeds)}
        for name in names:
            v = values[name].astype(np.float64).ravel()
            finite = v[np.isfinite(v) & (np.abs(v) <= 1e30)]
            lo, hi, huge = stats.setdefault(name, [np.inf, -np.inf, 0])
            stats[name] = [min(lo, finite.min(initial=np.inf)), max(hi, finite.max(initial=-np.inf)),
                           huge + int(v.size - finite.size)]
    ranges = {}
    for name, (lo, hi, huge) in stats.items():
        lo, hi = (0.0, 0.0) if not np.isfinite(lo) else (float(lo), float(hi))
        ranges[name] = TensorRange(amax=max(abs(lo), abs(hi)), min=lo, max=hi,
                                   excluded={"huge": huge} if huge else {})
    return CalibrationTable(method="minmax", ranges=ranges, model_sha256=model.sha256)


def _writer() -> tuple[ModuleType, ModuleType]:
    quantize = pytest.importorskip("quantlab.quantize", reason="the Q/DQ writer (quantlab.quantize) is not there yet")
    plan = pytest.importorskip("quantlab.plan", reason="precision plans (quantlab.plan) are not there yet")
    return quantize, plan


def _written_proto(result: Any) -> onnx.ModelProto:
    return result if isinstance(result, onnx.ModelProto) else result.proto


WRITTEN = ["int8", "fp16", "mixed"]


def _plan(plan_module: ModuleType, which: str) -> Any:
    if which == "mixed":  # int8 body, first compute group fp16, last fp32: all three in one model
        return plan_module.PrecisionPlan(default="int8", rules=(plan_module.Rule("fp16", first=1),
                                                                plan_module.Rule("fp32", last=1)))
    return plan_module.uniform_plan(which)


@pytest.mark.parametrize("which", WRITTEN)
def test_every_written_model_parses_and_builds(rtx, any_model, which):
    """INT8 (TensorRT form), FP16 and a mixed plan of every shared model: parse + build, no error."""
    quantize, plan_module = _writer()
    name, proto = any_model
    model = model_from_proto(proto, label=name)
    written = quantize.write_model(model, _plan(plan_module, which), _minmax_table(model),
                                   quantize.WriteOptions(target="tensorrt"))
    out = _written_proto(written)
    ops = {n.op_type for n in out.graph.node}
    if which in ("int8", "mixed"):
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, f"{name}/{which}: no Q/DQ written"
    if which in ("fp16", "mixed"):
        assert "Cast" in ops, f"{name}/{which}: no float16 casts written"
    _engine_ok(rtx.build_engine(out, label=f"{name} ({which}, written by quantlab)"))


def test_ort_form_int8_is_refused_by_tensorrt_with_a_clear_error(rtx):
    """The uint8/int32-bias form is for ONNX Runtime only; TensorRT says which node and why."""
    quantize, plan_module = _writer()
    model = model_from_proto(models.conv_net(), label="conv_net")
    written = quantize.write_model(model, plan_module.uniform_plan("int8"), _minmax_table(model),
                                   quantize.WriteOptions(target="ort"))
    with pytest.raises(BackendError) as err:
        rtx.build_engine(_written_proto(written), label="conv_net (ort form)")
    text = str(err.value)
    assert "conv_net (ort form)" in text
    assert "QuantizeLinear" in text or "DequantizeLinear" in text


def test_onnx_attention_builds_fp32_and_int8(rtx):
    """Opset-23 ``Attention`` (torch's dynamo export of scaled_dot_product_attention): TensorRT-RTX found no fused
    float32 kernel and failed the build ("not supported by a dedicated kernel"); quantlab lets it decompose."""
    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, write_model
    from quantlab.shapes import parse_shapes

    model = model_from_proto(models.sdpa_block(), label="sdpa_block")
    data = from_arrays({"x": np.random.default_rng(0).normal(0, 1, (8, 10, 32)).astype(np.float32)})
    table = calibrate(model, data, "minmax", batch_size=4).tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    assert sum(n.op_type == "QuantizeLinear" for n in written.proto.graph.node) >= 2  # x (shared by q, k, v) and a
    shapes = parse_shapes("x:1x4x32,2x10x32,4x16x32")
    for proto in (model.proto, written.proto):
        _engine_ok(rtx.build_engine(proto, shapes=shapes, label="sdpa_block"))


# ----------------------------------------------------------------- dynamic shapes (profiles)


def test_dynamic_width_recognizer_fails_with_the_guess_and_says_what_to_write(rtx):
    """The OCR recognizer failure, reproduced: a guessed width of 1 empties the pool before the reshape."""
    with pytest.raises(BackendError) as err:
        rtx.build_engine(models.text_recognizer(), label="text_recognizer")
    text = str(err.value)
    assert "violate shape constraints" in text and "to_sequence" in text  # TensorRT's own words
    assert "input 'image' axis 0, 3" in text and "--shapes image:1x3x48xMIN,1x3x48xOPT,32x3x48xMAX" in text
    assert "image:1x3x48x1," not in text  # not the guess that just failed, as an example to copy


def test_dynamic_width_recognizer_builds_with_profiles_from_its_data(rtx):
    from quantlab.shapes import ShapeLog, profiles_from_data

    model = models.text_recognizer()
    log = ShapeLog()
    for batch, width in [(4, 64), (4, 320), (2, 128)]:
        log.observe({"image": np.zeros((batch, 3, 48, width), np.float32)})
    shapes = profiles_from_data({"image": (-1, 3, 48, -1)}, log)
    _engine_ok(rtx.build_engine(model, shapes=shapes, label="text_recognizer"))
    assert rtx.profiles_for(model, shapes=shapes) == {"image": [[1, 3, 48, 64], [4, 3, 48, 320], [4, 3, 48, 320]]}
    # one data shape: the width is that width, not 1..width
    assert rtx.profiles_for(model, profiles_from={"image": (2, 3, 48, 96)})["image"][0] == [1, 3, 48, 96]
    _engine_ok(rtx.build_engine(model, profiles_from={"image": (2, 3, 48, 96)}))


def test_shapes_flag_text_builds_and_is_recorded_in_the_cache_sidecar(rtx, tmp_path):
    from quantlab.shapes import parse_shapes

    model = models.text_recognizer()
    shapes = parse_shapes("image:1x3x48x64,8x3x48x320,16x3x48x1600")
    built = rtx.engine_for(model, shapes=shapes, cache_dir=tmp_path, label="text_recognizer")
    _engine_ok(built.engine)
    sidecar = json.loads(built.path.with_suffix(".json").read_text())
    assert sidecar["settings"]["profiles"] == {"image": [[1, 3, 48, 64], [8, 3, 48, 320], [16, 3, 48, 1600]]}
    with pytest.raises(InputMismatchError, match="axis 2 .* fixes it to 48"):
        rtx.build_engine(model, shapes=parse_shapes("image:1x3x32x64,1x3x32x64,1x3x32x64"))
    with pytest.raises(InputMismatchError, match="'img'"):
        rtx.build_engine(model, shapes=parse_shapes("img:1x3x48x64"))


def test_backend_default_shapes_apply_to_models_holding_those_inputs():
    """get_backend(..., shapes=) is how compare/search pass --shapes; sub-models without the input ignore it."""
    from quantlab.shapes import parse_shapes

    shapes = parse_shapes("image:1x3x48x64,2x3x48x128,4x3x48x256")
    backend = get_backend("tensorrt-rtx", shapes=shapes)
    _engine_ok(backend.build_engine(models.text_recognizer(), label="text_recognizer"))
    assert backend.profiles_for(models.text_recognizer()) == {"image": [[1, 3, 48, 64], [2, 3, 48, 128],
                                                                         [4, 3, 48, 256]]}
    assert backend.profiles_for(models.conv_net())["input"][1] == [1, 3, 16, 16]  # no 'image' here: the guess


def _kv_cache_attention() -> onnx.ModelProto:
    """One attention step with a KV cache, as decoders export it: present = Concat(past, k) is a graph output the
    next step reads back; the past length P and the new length S are dynamic."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (16, 16)).astype(np.float32), n) for n in ("wk", "wq", "wo")]
    nodes = [helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
             helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
             helper.make_node("Concat", ["past", "k"], ["present"], name="cache", axis=1),
             helper.make_node("Transpose", ["present"], ["kt"], name="kt", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
             helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["probs", "present"], ["ctx"], name="attend"),
             helper.make_node("MatMul", ["ctx", "wo"], ["y"], name="o_proj")]
    graph = helper.make_graph(
        nodes, "kv_step",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 16]),
         helper.make_tensor_value_info("past", TensorProto.FLOAT, ["N", "P", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 16]),
         helper.make_tensor_value_info("present", TensorProto.FLOAT, ["N", "T", 16])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def test_a_kv_cache_concat_stays_float_and_int8_builds_with_a_dynamic_past(rtx):
    """The Concat that makes a KV cache output is not quantized: its Q/DQ'd inputs made TensorRT-RTX's Myelin fail
    (CHECK(is_const())) on a 2-layer optimum-style merged decoder with a dynamic past length (this one-layer step
    built either way), and would hand the next step INT8-rounded keys. The MatMuls around it are INT8 all the
    same, and the step builds with a dynamic past."""
    from quantlab.shapes import ShapeRange

    quantize, plan_module = _writer()
    model = model_from_proto(_kv_cache_attention(), label="kv_step")
    written = quantize.write_model(model, plan_module.uniform_plan("int8"), _minmax_table(model),
                                   quantize.WriteOptions(target="tensorrt"))
    out = _written_proto(written)
    cache = next(n for n in out.graph.node if n.op_type == "Concat")
    assert list(cache.input) == ["past", "k"]  # read as they are: no DQ in front
    quantized = {t for t, q in written.provenance.quantized_inputs.items() if q["kind"] == "activation"}
    assert {"x", "q", "probs", "ctx"} <= quantized and not {"past", "k"} & quantized
    shapes = {"x": ShapeRange("x", (1, 1, 16), (4, 1, 16), (8, 4, 16)),
              "past": ShapeRange("past", (1, 1, 16), (4, 5, 16), (8, 12, 16))}
    _engine_ok(rtx.build_engine(out, shapes=shapes, label="kv_step (int8, written by quantlab)"))
    first_step = {"x": shapes["x"], "past": ShapeRange("past", (1, 0, 16), (4, 0, 16), (8, 0, 16))}  # no past yet
    _engine_ok(rtx.build_engine(out, shapes=first_step, label="kv_step (int8, first step: empty past)"))


def test_a_state_input_that_fixes_the_batch_at_1_gets_batch_1_profiles_and_builds(rtx, tmp_path):
    """AECMOS: ``input [N, 3, F, 160]`` is dynamic, but its GRU state ``h0 [4, 1, 64]`` (samples on axis 1, as its
    set says) fixes the batch at 1. quantlab gave the dynamic input a batch of 1..8 and TensorRT-RTX failed with
    "inherently false condition"; the model fixes its batch at 1 now, for every command, and the engine builds."""
    from quantlab.data import fixed_batch, from_arrays
    from quantlab.shapes import network_shapes, shapes_for_table

    model = model_from_proto(models.gru_with_state(), label="gru_with_state")
    rng = np.random.default_rng(0)
    data = from_arrays({"x": rng.normal(size=(5, 4, 6)).astype(np.float32),
                        "h0": np.zeros((1, 4, 8), np.float32)}, batch_axes={"x": 1, "h0": 1})
    assert fixed_batch(model, data) == 1
    calib_set = {"input_shapes": {"x": [[5, 1, 6, 4]], "h0": [[1, 1, 8, 4]]}, "batch_axes": {"x": 1, "h0": 1}}
    ranges = shapes_for_table(None, calib_set, network_shapes(model.inputs))
    assert ranges["x"].min[1] == ranges["x"].max[1] == 1
    _engine_ok(rtx.build_engine(model.proto, shapes=ranges))


def test_a_squeeze_without_axes_on_a_dynamic_dim_names_the_node_and_the_fix(rtx):
    """AECMOS (opset 9) squeezes ``[N, 1, 2]`` without axes: TensorRT-RTX refused to build it with a message about
    an IShuffleLayer; the error names the Squeeze and says to re-export with axes or a fixed batch."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Squeeze", ["x"], ["y"], name="Squeeze_35")], "axisless",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    with pytest.raises(BackendError, match=r"'Squeeze_35' squeezes without axes.*Re-export with explicit axes"):
        rtx.build_engine(model)


def test_a_failed_build_says_whether_the_fp32_model_builds(tmp_path, capsys):
    """When an FP16/INT8 engine build fails, `quantlab build` builds the FP32 model with the same profiles and
    says which one is at fault: here the export (an axis-less Squeeze TensorRT refuses whatever the precision),
    where SLANet's error (an internal assertion) had left it open whether quantlab's Q/DQ caused it."""
    from onnx import TensorProto, helper

    from quantlab.cli import ExitCode, main

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("Squeeze", ["c"], ["y"], name="Squeeze_35")], "axisless",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(rng.normal(size=(1, 3, 1, 1)).astype(np.float32), "w")])
    path = tmp_path / "axisless.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), path)
    code = main(["build", str(path), "--precision", "fp16", "--backend", "tensorrt-rtx", "--out", str(tmp_path / "b")])
    assert code == ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    assert "squeezes without axes" in err and "The FP32 model fails to build too" in err
    assert not (tmp_path / "b").exists()


def test_a_failed_build_on_guessed_profiles_blames_the_guess_not_the_graph(tmp_path, capsys):
    """SegFormer built from a table that held no sample shapes: its H/W got the guess 1..32, the FP16/INT8 build
    failed, the FP32 model failed with the same guessed profiles, and the verdict sent the user upstream ("cannot
    build this graph as it is"), where the real sizes built at once. The guess gets the blame."""
    from onnx import TensorProto, helper

    from quantlab.cli import ExitCode, main

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", strides=[2, 2]),
         helper.make_node("Reshape", ["c", "shape"], ["y"], name="regroup")], "guess",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 2, "K"])],
        [numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([0, 4, 2, -1], np.int64), "shape")])
    path = tmp_path / "guess.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    code = main(["build", str(path), "--precision", "fp16", "--backend", "tensorrt-rtx", "--out", str(tmp_path / "b")])
    assert code == ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    assert "they got the guess" in err and "fails to build with these guessed profiles too" in err
    assert "report it upstream" not in err
    code = main(["build", str(path), "--precision", "fp16", "--backend", "tensorrt-rtx", "--out", str(tmp_path / "c"),
                 "--shapes", "x:1x3x8x8,2x3x16x16,4x3x32x32"])
    assert code == ExitCode.OK


def test_a_plan_tensorrt_refuses_is_told_from_a_graph_it_refuses(tmp_path, capsys):
    """The other verdict: the ORT form's Q/DQ (uint8, zero points) fails TensorRT's parser, the FP32 model builds.
    The parser's own advice (write target tensorrt) stands alone: no FP32 build is needed to say it."""
    from quantlab.cli import ExitCode, main

    model = tmp_path / "conv.onnx"
    onnx.save(models.conv_net(), model)
    table = tmp_path / "calib"
    data = tmp_path / "data.npz"
    np.savez(data, input=np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32))
    (tmp_path / "set.toml").write_text('name = "s"\n[[source]]\nkind = "npz"\npath = "data.npz"\nbatched = true\n'
                                       '[inputs]\ninput = "input"\n')
    assert main(["calibrate", str(model), "--calib", str(tmp_path / "set.toml"), "--method", "minmax",
                 "--out", str(table), "--no-progress"]) == ExitCode.OK
    code = main(["build", str(model), "--table", str(table / "calib_minmax.json"), "--target", "ort",
                 "--backend", "tensorrt-rtx", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == ExitCode.BAD_INPUT and "target 'tensorrt'" in err and "FP32 model" not in err


def test_an_interrupt_during_the_build_cancels_it_and_is_raised(rtx, monkeypatch):
    """build_serialized_network is one C++ call: Ctrl-C waited for the whole build (a SLANet build ran 15 min and
    ignored SIGTERM). Python runs signal handlers in the builder's progress callbacks; the exception raised there
    (simulated: the bar's update raises it, as the handler would) cancels the build and comes out of build_engine.
    Without an interrupt the bar's builder phases run to the end."""
    import tqdm.auto

    model = models.conv_net()
    updates = []
    real_update = tqdm.auto.tqdm.update

    def counting(self, n=1):
        updates.append(n)
        return real_update(self, n)

    monkeypatch.setattr(tqdm.auto.tqdm, "update", counting)
    _engine_ok(rtx.build_engine(model, progress=True))
    assert updates  # the builder reported its steps

    def interrupted(self, n=1):
        raise KeyboardInterrupt

    monkeypatch.setattr(tqdm.auto.tqdm, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rtx.build_engine(model, progress=True)


def test_a_branch_too_small_for_an_int8_scale_builds_in_int8(rtx):
    """The smallest amax calibration raises such a tensor to gives a normal float32 scale: the TensorRT form parses
    and builds (a denormal scale would be read as 0)."""
    from quantlab.calibrate import table_from_statistics
    from quantlab.stats import collect_statistics
    from quantlab.table import SMALLEST_AMAX

    quantize, plan_module = _writer()
    model = model_from_proto(models.denormal_branch_net(), label="denormal_branch_net")
    stats = collect_statistics(model, models.batch_factory(models.random_inputs(model.proto, batch=8), 4))
    table = table_from_statistics(stats, "entropy")
    assert table.ranges["tiny"].amax == SMALLEST_AMAX
    written = quantize.write_model(model, plan_module.uniform_plan("int8"), table,
                                   quantize.WriteOptions(target="tensorrt"))
    out = _written_proto(written)
    assert "tiny" in {n.input[0] for n in out.graph.node if n.op_type == "QuantizeLinear"}
    _engine_ok(rtx.build_engine(out, label="denormal_branch_net (int8, written by quantlab)"))


def test_an_input_passed_through_as_an_output_builds_with_profiles_by_its_onnx_name(rtx):
    """TensorRT's parser renames a graph input that is also a graph output to '__x': profiles from data (keyed by
    the ONNX name) were refused ("shapes are given for 'x', which are not inputs"). They now reach the renamed
    input, and the engine's record keys them by the ONNX name."""
    from onnx import TensorProto, helper, numpy_helper

    from quantlab.backends.tensorrt.builder import onnx_input_name

    w = numpy_helper.from_array(np.eye(16, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "passthrough",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16]),
                               helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    engine, settings = rtx._builder.build(proto, profiles_from={"x": (4, 16)}, outputs=None, label="passthrough")
    _engine_ok(engine)
    assert settings["profiles"] == {"x": [[1, 16], [4, 16], [4, 16]]}
    assert rtx.profiles_for(proto, profiles_from={"x": (4, 16)}) == settings["profiles"]
    assert onnx_input_name("__x", {"x", "y"}) == "x" and onnx_input_name("__x", {"y"}) == "__x"


@pytest.mark.parametrize("which", ["int8", "fp16"])
def test_optional_inputs_spelled_out_as_empty_names_are_dropped_and_the_written_model_builds(rtx, which):
    """TensorRT's parser refuses Conv(x, W, "") ("Invalid Node"), which is valid ONNX for a Conv without bias: the
    writer drops trailing empty inputs, so the written model parses and builds (the FP32 original does not)."""
    quantize, plan_module = _writer()
    proto = models.optional_inputs_net()
    model = model_from_proto(proto, label="optional_inputs_net")
    with pytest.raises(BackendError, match="conv_nobias"):
        rtx.build_engine(proto, label="optional_inputs_net (FP32, as given)")
    written = quantize.write_model(model, plan_module.uniform_plan(which), _minmax_table(model),
                                   quantize.WriteOptions(target="tensorrt"))
    out = _written_proto(written)
    conv = next(n for n in out.graph.node if n.name == "conv_nobias")
    assert len(conv.input) == 2 and all(conv.input)
    assert next(n for n in out.graph.node if n.name == "clip_max_only").input[1] == ""  # not trailing: kept
    _engine_ok(rtx.build_engine(out, label=f"optional_inputs_net ({which}, written by quantlab)"))
    feeds = models.random_inputs(proto, batch=2)
    got, want = models.run_ort(out, feeds)["y"], models.run_ort(proto, feeds)["y"]
    assert np.isfinite(got).all() and np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.98


def test_a_loop_carrying_a_growing_value_gets_the_unroll_advice_not_the_profile_hint():
    """A greedy decoder's loop concatenates one token id per step: TensorRT refuses ("IRecurrenceLayer must have
    inputs with same shape"), and quantlab blamed the guessed batch profile. It now says what works: unroll the
    loop by binding its trip count."""
    from onnx import TensorProto, helper, numpy_helper

    from quantlab.backends.tensorrt import TensorRTBackend
    from quantlab.errors import BackendError

    value = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("MatMul", ["enc", "w"], ["scores"], name="/head"),
         helper.make_node("ArgMax", ["scores"], ["tok"], name="/pick", axis=1, keepdims=1),
         helper.make_node("Concat", ["ids_in", "tok"], ["ids_out"], name="/grow", axis=1),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="/keep")], "body",
        [value("i", TensorProto.INT64, []), value("cond_in", TensorProto.BOOL, []),
         value("ids_in", TensorProto.INT64, ["N", None])],
        [value("cond_out", TensorProto.BOOL, []), value("ids_out", TensorProto.INT64, ["N", None])])
    empty = numpy_helper.from_array(np.array([0], np.int64))
    graph = helper.make_graph(
        [helper.make_node("Shape", ["enc"], ["batch"], name="/batch", start=0, end=1),
         helper.make_node("Concat", ["batch", "zero"], ["empty_shape"], name="/empty_shape", axis=0),
         helper.make_node("ConstantOfShape", ["empty_shape"], ["ids0"], name="/ids0", value=empty),
         helper.make_node("Loop", ["max_len", "go", "ids0"], ["ids"], name="/Loop", body=body)], "greedy",
        [value("enc", TensorProto.FLOAT, ["N", 4]), value("max_len", TensorProto.INT64, [])],
        [value("ids", TensorProto.INT64, ["N", None])],
        [numpy_helper.from_array(np.random.default_rng(0).normal(0, 1, (4, 6)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([0], np.int64), "zero"), numpy_helper.from_array(np.array(True), "go")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    with pytest.raises(BackendError) as err:
        TensorRTBackend("tensorrt-rtx").build_engine(model, label="greedy")  # enc's batch guessed
    assert "TensorRT's loops keep a carried value's shape" in str(err.value) and "--bind NAME=N" in str(err.value)
    assert "No data or --shapes fixed" not in str(err.value)


def test_an_op_tensorrt_has_no_layer_for_gets_advice_that_can_help(rtx):
    """A Mixtral's NonZero routing: TensorRT-RTX refuses it even in FP32 (no plugin), and the advice was to pin the
    node to another precision, which cannot help."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Greater", ["x", "zero"], ["chosen"], name="choose"),
         helper.make_node("NonZero", ["chosen"], ["where"], name="route")], "nonzero",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("where", TensorProto.INT64, [2, "K"])],
        [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    try:
        rtx.build_engine(model)
    except BackendError as err:
        assert "no precision helps" in str(err) and "--backend ort" in str(err), err
    else:
        pytest.skip("this TensorRT-RTX builds NonZero: nothing to advise")


def test_a_uint8_image_transposed_before_its_cast_is_told_to_cast_first(rtx):
    """``img.permute(0, 3, 1, 2).float()``: TensorRT has no Transpose on uint8 and its parser says only that the
    type is wrong; the error says to cast first, as the export can."""
    transposed_first = _model(
        [helper.make_node("Transpose", ["img"], ["t"], name="to_nchw", perm=[0, 3, 1, 2]),
         helper.make_node("Cast", ["t"], ["y"], name="to_float", to=TensorProto.FLOAT)],
        [helper.make_tensor_value_info("img", TensorProto.UINT8, [1, 4, 4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])])
    with pytest.raises(BackendError) as err:
        rtx.build_engine(transposed_first, label="u8.onnx")
    text = str(err.value)
    assert "u8.onnx" in text and "to_nchw" in text and "img.float().permute(0, 3, 1, 2)" in text
    cast_first = _model(
        [helper.make_node("Cast", ["img"], ["f"], name="to_float", to=TensorProto.FLOAT),
         helper.make_node("Transpose", ["f"], ["y"], name="to_nchw", perm=[0, 3, 1, 2])],
        [helper.make_tensor_value_info("img", TensorProto.UINT8, [1, 4, 4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])])
    _engine_ok(rtx.build_engine(cast_first, label="u8.onnx"))
