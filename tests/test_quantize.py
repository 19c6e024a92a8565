from __future__ import annotations

import importlib.util
import json

import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from quantlab.backends.ort import DISABLE_QDQ_FUSION, OrtBackend, int8_dot_saturates
from quantlab.errors import CalibrationError, ModelError, PlanError
from quantlab.graph import model_from_proto, serialize, tensor_specs, with_outputs
from quantlab.plan import (
    PrecisionPlan,
    Rule,
    fusion_groups,
    load_plan,
    node_names,
    resolve_plan,
    uniform_plan,
)
from quantlab.quantize import (
    Provenance,
    WriteOptions,
    activation_qparams,
    load_provenance,
    save_written,
    weight_qparams,
    write_model,
)
from quantlab.table import CalibrationTable, TensorRange

# --------------------------------------------------------------------------- helpers


def _calibration_feeds(proto, n=4):
    return [models.random_inputs(proto, 2, seed=s) for s in range(n)]


class _Reader:
    """An onnxruntime.quantization CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def _ort_minmax_table(proto, path, model, feeds) -> CalibrationTable:
    """Ranges computed by ONNX Runtime's own MinMax calibrator (an independent implementation)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    calibrator = create_calibrator(str(path), None, augmented_model_path=str(path.with_suffix(".aug.onnx")),
                                   calibrate_method=CalibrationMethod.MinMax)
    calibrator.collect_data(_Reader(feeds))
    ranges = {}
    for name, data in calibrator.compute_data().data.items():
        lo, hi = (float(np.asarray(v).reshape(-1)[0]) for v in data.range_value)
        ranges[name] = TensorRange(amax=max(abs(lo), abs(hi)), min=lo, max=hi)
    return CalibrationTable("minmax", ranges, model.sha256, settings={"source": "onnxruntime MinMaxCalibrater"})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """name -> (LoadedModel, table from ORT's calibrator, onnx path, calibration feeds)."""
    folder = tmp_path_factory.mktemp("models")
    out = {}
    for name, build in models.ALL_BUILDERS.items():
        proto = build()
        path = folder / f"{name}.onnx"
        onnx.save(proto, path)
        model = model_from_proto(proto)
        feeds = _calibration_feeds(proto)
        out[name] = (model, _ort_minmax_table(proto, path, model, feeds), path, feeds)
    return out


def _run(proto, feeds, outputs=None, optimize=True, fuse=False):
    """Run on ORT's CPU provider with the Q/DQ semantics the ONNX states (``fuse=False``).

    ``fuse=True`` lets ORT turn Q/DQ into integer kernels (QLinearConv...): on x86
    CPUs without VNNI their int16 pair sums saturate, so those results are wrong
    by design of the hardware path (see quantlab.backends.ort), not by the model.
    """
    options = ort.SessionOptions()
    if not fuse:
        options.add_session_config_entry(DISABLE_QDQ_FUSION, "1")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(serialize(proto), options, providers=["CPUExecutionProvider"])
    names = outputs or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _mixed_plan(model) -> PrecisionPlan:
    """First compute group fp16, last fp32, the rest int8."""
    return PrecisionPlan(default="int8", rules=(Rule("fp16", first=1), Rule("fp32", last=1)))


WRITERS = {
    "int8": lambda m: (uniform_plan("int8"), WriteOptions(target="tensorrt")),
    "int8-ort": lambda m: (uniform_plan("int8"), WriteOptions(target="ort")),
    "fp16": lambda m: (uniform_plan("fp16"), WriteOptions()),
    "fp16-sim": lambda m: (uniform_plan("fp16"), WriteOptions(fp16_simulation=True)),
    "mixed": lambda m: (_mixed_plan(m), WriteOptions(target="tensorrt")),
}


INT8_SENSITIVE = {"sensitive_chain_net"}
"""Models whose INT8 error is large by construction (for the sensitivity search), not by a writer bug."""


def _write(prepared, name, writer):
    model, table, _, _ = prepared[name]
    plan, options = WRITERS[writer](model)
    return write_model(model, plan, table, options)


_WRITTEN_FOR_TENSORRT: dict[str, tuple[str, onnx.ModelProto]] = {}
"""sha256 -> (test that wrote it, model): every TensorRT-form model this module writes."""


@pytest.fixture(autouse=True)
def _record_models_written_for_tensorrt(monkeypatch, request):
    """Wrap ``write_model`` so the last test can parse and build every model written here."""
    import quantlab.quantize

    def recording(model, plan, table, options=WriteOptions()):
        written = quantlab.quantize.write_model(model, plan, table, options)
        if options.target == "tensorrt" and not options.fp16_simulation:
            _WRITTEN_FOR_TENSORRT.setdefault(written.sha256, (request.node.name, written.proto))
        return written

    monkeypatch.setitem(globals(), "write_model", recording)


def _producers(proto):
    return {o: n for n in proto.graph.node for o in n.output}


# --------------------------------------------------------------------------- every model, every writer


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("name", sorted(models.ALL_BUILDERS))
def test_written_models_pass_the_checker_and_run_close_to_fp32(prepared, name, writer):
    """End-to-end sanity on the calibration feeds (no tensor leaves its calibrated range, so
    nothing clips), run with the model's own Q/DQ semantics (not ORT's saturating fused kernels).

    Models built to break INT8 (INT8_SENSITIVE) are exempt from the end-to-end INT8 bound;
    the per-op bound below holds for them too.
    """
    model, _, _, calibration = prepared[name]
    int8_bound = writer.startswith("fp16") or name not in INT8_SENSITIVE
    written = _write(prepared, name, writer)
    onnx.checker.check_model(written.proto, full_check=True)
    for feeds in calibration:
        ref = _run(model.proto, feeds)
        got = _run(written.proto, feeds)
        assert list(got) == list(ref)
        for out, value in got.items():
            assert value.dtype == np.float32  # model I/O stays float32
            err = np.abs(value - ref[out]).max() / np.abs(ref[out]).max()
            assert np.isfinite(value).all()
            assert err < (5e-3 if writer.startswith("fp16") else 0.15) or not int8_bound, (out, err)
    # graph inputs untouched
    assert [i.name for i in written.proto.graph.input] == [i.name for i in model.proto.graph.input]


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("name", sorted(models.ALL_BUILDERS))
def test_provenance_maps_every_original_tensor_and_node(prepared, name, writer):
    model, _, _, _ = prepared[name]
    written = _write(prepared, name, writer)
    prov = written.provenance
    g = model.proto.graph
    originals = [i.name for i in g.input] + [i.name for i in g.initializer] + [o for n in g.node for o in n.output]
    assert set(prov.tensor_map) == set(originals)
    produced = {o for n in written.proto.graph.node for o in n.output}
    present = produced | {i.name for i in written.proto.graph.input} | {i.name for i in written.proto.graph.initializer}
    inits = {i.name for i in g.initializer}
    inferred = tensor_specs(onnx.shape_inference.infer_shapes(written.proto))
    for tensor, target in prov.tensor_map.items():
        assert target in present, (tensor, target)
        if tensor not in inits:
            assert target == tensor  # the naming rule: activations keep their names
        assert inferred[target].dtype == prov.tensor_dtype[tensor], tensor
    for out in g.output:
        assert prov.tensor_dtype[out.name] == "float32"
    written_nodes = {n.name for n in written.proto.graph.node}
    assert set(prov.node_map) == {n.name for n in g.node}
    for original, nodes in prov.node_map.items():
        assert nodes[0] == original and set(nodes) <= written_nodes
    # every inserted node is accounted for
    assert set(prov.inserted_nodes) == written_nodes - set(prov.node_map)
    assert prov.group_precision == written.plan.precision
    assert Provenance.from_dict(json.loads(json.dumps(prov.to_dict()))) == prov


# --------------------------------------------------------------------------- cross-check with ORT's quantizer

CROSS_CHECKS = [
    # (model, target, reduce_range, ORT op types, ORT ops whose output is not quantized)
    ("conv_net", "tensorrt", False, ["Conv", "Gemm", "GlobalAveragePool"], ["Conv", "Gemm", "GlobalAveragePool"]),
    ("mlp_attention", "tensorrt", False, ["MatMul"], ["MatMul"]),
    ("conv_net", "ort", False, ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"], ["Gemm"]),
    ("residual_net", "ort", False, ["Conv", "Relu", "Clip", "Add", "GlobalAveragePool", "Flatten", "Gemm"],
     ["Gemm"]),
    ("residual_net", "ort", True, ["Conv", "Relu", "Clip", "Add", "GlobalAveragePool", "Flatten", "Gemm"],
     ["Gemm"]),
]


def _weights_of(proto):
    """node name -> int8 weight array feeding input 1 through a DequantizeLinear."""
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    prod = _producers(proto)
    out = {}
    for n in proto.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in prod:
            dq = prod[n.input[1]]
            if dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
                out[n.name] = (inits[dq.input[0]], inits[dq.input[1]])
    return out


def _activation_qparams(proto):
    """quantized tensor -> (scale, zero point) of its QuantizeLinear."""
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    return {n.input[0]: (inits[n.input[1]], inits[n.input[2]]) for n in proto.graph.node if n.op_type == "QuantizeLinear"}


@pytest.mark.parametrize(("name", "target", "reduce_range", "ops", "no_output"), CROSS_CHECKS,
                         ids=[f"{c[0]}-{c[1]}{'-reduce_range' if c[2] else ''}" for c in CROSS_CHECKS])
def test_int8_matches_onnxruntime_quantize_static(prepared, tmp_path, name, target, reduce_range, ops, no_output):
    """Same ranges -> the same Q/DQ parameters as ORT's quantizer, and outputs within one output step."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model, table, path, feeds = prepared[name]
    mine = write_model(model, uniform_plan("int8"), table, WriteOptions(target=target, reduce_range=reduce_range))
    extra = {"WeightSymmetric": True, "OpTypesToExcludeOutputQuantization": no_output}
    if target == "tensorrt":
        extra.update(ActivationSymmetric=True, QuantizeBias=False)
    theirs_path = tmp_path / "ort_qdq.onnx"
    quantize_static(
        str(path), str(theirs_path), _Reader(feeds), quant_format=QuantFormat.QDQ, op_types_to_quantize=ops,
        per_channel=True, activation_type=QuantType.QInt8 if target == "tensorrt" else QuantType.QUInt8,
        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax, extra_options=extra,
        reduce_range=reduce_range,
    )
    theirs = onnx.load(theirs_path)

    # same ranges -> the same weights, scales and zero points, bit for bit
    w_mine, w_theirs = _weights_of(mine.proto), _weights_of(theirs)
    assert set(w_mine) == set(w_theirs) and w_mine
    for node in w_mine:
        for mine_value, their_value in zip(w_mine[node], w_theirs[node]):
            assert mine_value.dtype == their_value.dtype
            np.testing.assert_array_equal(mine_value, their_value, strict=True)
    a_mine, a_theirs = _activation_qparams(mine.proto), _activation_qparams(theirs)
    common = set(a_mine) & set(a_theirs)
    assert len(common) >= 3
    for tensor in common:
        for mine_value, their_value in zip(a_mine[tensor], a_theirs[tensor]):
            assert mine_value.shape == their_value.shape == (), tensor  # per-tensor: scalars
            assert mine_value.dtype == their_value.dtype and mine_value.tobytes() == their_value.tobytes(), tensor

    if reduce_range:
        assert all(np.abs(q.astype(np.int16)).max() <= 64 for q, _ in w_mine.values())

    # and the outputs agree within one quantization step of the output: with the Q/DQ
    # semantics both models state, and (where it cannot saturate) in ORT's fused kernels
    val = models.random_inputs(model.proto, 8, seed=99)
    modes = [False] + ([True] if reduce_range or not int8_dot_saturates() else [])
    for fuse in modes:
        got, ref = _run(mine.proto, val, fuse=fuse), _run(theirs, val, fuse=fuse)
        for out in model.output_names:
            r = table.ranges[out]
            step = r.amax / 127 if target == "tensorrt" else (max(r.max, 0) - min(r.min, 0)) / 255
            assert np.abs(got[out] - ref[out]).max() <= step, (out, fuse)


# --------------------------------------------------------------------------- local error bounds

_BILINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _one_node(node, n_inputs):
    """``node`` alone, reading feeds a, b[, c] and writing y (attributes kept)."""
    from onnx import TensorProto, helper

    names = ["a", "b", "c"][:n_inputs]
    single = helper.make_node(node.op_type, names, ["y"], name="single")
    single.attribute.extend(node.attribute)
    graph = helper.make_graph([single], "one", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                                for n in names],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _apply(node, *arrays):
    proto = _one_node(node, len(arrays))
    return _run(proto, dict(zip(["a", "b", "c"], arrays)))["y"]


def _table_step(r: TensorRange, target: str) -> float:
    """The activation step the spec asks for: amax/127 (int8 symmetric) or the uint8 span / 255."""
    if target == "tensorrt":
        return r.amax / 127
    return (max(min(r.max, r.amax), 0.0) - min(max(r.min, -r.amax), 0.0)) / 255


def _weight_step(w: np.ndarray, op: str, attrs: dict, qmax: int) -> np.ndarray:
    """Per-output-channel absmax / qmax, broadcastable against ``w`` (the axis each op's outputs run along)."""
    axis = {"Conv": 0, "ConvTranspose": 1, "MatMul": w.ndim - 1,
            "Gemm": 0 if attrs.get("transB", 0) else 1}[op]
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    return np.abs(w).max(axis=reduce, keepdims=True) / qmax


@pytest.mark.parametrize("writer", ["int8", "int8-ort", "mixed"])
@pytest.mark.parametrize("name", sorted(models.ALL_BUILDERS))
def test_int8_compute_ops_stay_within_their_quantization_bound(prepared, name, writer):
    """Every INT8 Conv/ConvTranspose/Gemm/MatMul is wrong by no more than its inputs' rounding allows.

    On the calibration feeds (nothing clips), for each int8 compute op y = op(x, W) + b of the
    written model, with x its float input there and x^, W^, b^ what it reads after Q/DQ:
      1. |x - x^| <= s_x / 2 with s_x from the *table* (amax/127, or the uint8 span/255),
      2. |W - W^| <= s_W / 2 with s_W = absmax / 127 of each output channel (or / 64 with
         reduce_range), an activation B of a MatMul like 1.; an int32 bias within s_x * s_W / 2,
         a float bias untouched,
      3. op is bilinear, so y - y^ = op(x - x^, W) + op(x^, W - W^) + (b - b^) and
         |y_written - op(x, W) - b| <= op(|x - x^|, |W|) + op(|x^|, |W - W^|) + |b - b^|.
    A wrong scale, axis, zero point, double rounding or a compute op reading anything other
    than its own Q/DQ outputs breaks one of the three.
    """
    model, table, _, calibration = prepared[name]
    plan, options = WRITERS[writer](model)
    written = write_model(model, plan, table, options)
    src_nodes = dict(zip(node_names(model.proto), model.proto.graph.node))
    out_nodes = {n.name: n for n in written.proto.graph.node}
    inits = {i.name: numpy_helper.to_array(i) for i in model.proto.graph.initializer}
    checked = [n for n in written.plan.groups if written.plan.precision[n.name] == "int8"
               and src_nodes[n.name].op_type in _BILINEAR]
    assert checked, "no int8 compute op to check"
    feeds = calibration[0]
    producer = _producers(written.proto)

    def quantized_from(dq_output):
        """The float32 tensor the QuantizeLinear behind ``dq_output`` reads (a cast of an fp16 tensor
        in mixed plans: ORT's CPU provider may skip the fp16 rounding of the exposed original)."""
        return producer[producer[dq_output].input[0]].input[0]

    exposed = set()
    for g in checked:
        src, out = src_nodes[g.name], out_nodes[g.name]
        exposed.update(t for t in [quantized_from(out.input[0]), *out.input, src.output[0]]
                       if t and t not in feeds and t not in inits)
        if src.input[1] not in inits:
            exposed.add(quantized_from(out.input[1]))
    exposed = sorted(exposed)
    values = {**feeds, **inits, **_run(with_outputs(written.proto, exposed), feeds, exposed)}
    for g in checked:
        src, out = src_nodes[g.name], out_nodes[g.name]
        attrs = {a.name: helper_value(a) for a in src.attribute}
        x, x_hat = values[quantized_from(out.input[0])], values[out.input[0]]
        w = values[src.input[1] if src.input[1] in inits else quantized_from(out.input[1])]
        w_hat = values[out.input[1]]
        r = table.ranges[src.input[0]]
        inside = (x >= min(r.min, 0.0)) & (x <= max(r.max, 0.0))
        assert np.abs(x - x_hat)[inside].max(initial=0) <= _table_step(r, options.target) / 2 * (1 + 1e-5), g.name
        if src.input[1] in inits:
            step_w = _weight_step(w, src.op_type, attrs, options.weight_qmax)
            assert np.all(np.abs(w - w_hat) <= step_w / 2 * (1 + 1e-5) + 1e-12), g.name
        else:
            rb = table.ranges[src.input[1]]
            inside_b = (w >= min(rb.min, 0.0)) & (w <= max(rb.max, 0.0))
            assert np.abs(w - w_hat)[inside_b].max(initial=0) <= _table_step(rb, options.target) / 2 * (1 + 1e-5)
        bias = [values[src.input[2]]] if len(src.input) > 2 and src.input[2] else []
        bias_hat = [values[out.input[2]]] if bias else []
        if bias and options.bias_int32:  # int32 with scale s_x * s_W: half of that step
            step_b = _table_step(r, options.target) * _weight_step(w, src.op_type, attrs, options.weight_qmax)
            assert np.all(np.abs(bias[0] - bias_hat[0]) <= step_b.reshape(-1) / 2 * (1 + 1e-4)), g.name
        elif bias:
            np.testing.assert_array_equal(bias_hat[0], bias[0])  # float bias: untouched
        exact = _apply(src, x, w, *bias)
        zeros_bias = [np.abs(bias[0] - bias_hat[0])] if bias else []
        bound = _apply(src, np.abs(x - x_hat), np.abs(w), *zeros_bias) + _apply(src, np.abs(x_hat), np.abs(w - w_hat))
        got = values[src.output[0]]
        slack = 1e-5 * np.abs(exact).max()
        excess = np.abs(got - exact) - bound
        assert excess.max() <= slack, (g.name, float(excess.max()), float(bound.max()))
        assert np.abs(got - exact).max() > 0  # INT8 really changed something


def helper_value(attribute):
    from onnx import helper

    return helper.get_attribute_value(attribute)


def test_ort_fused_integer_kernels_are_exact_with_reduced_range_weights(prepared, monkeypatch):
    """ORT's fused QLinear kernels (fast path) compute what the Q/DQ graph says once weights fit 7 bits.

    Full-range weights saturate ORT's int16 pair sums on x86 without VNNI (checked in
    test_backends_ort); reduce_range removes that, so fused and unfused agree to one
    output step on every model (they may round a requantization differently).
    """
    monkeypatch.delenv("QUANTLAB_ORT_QDQ_FUSION", raising=False)  # the auto mode's choice is the subject
    for name in sorted(models.ALL_BUILDERS):
        model, table, _, calibration = prepared[name]
        written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="ort", reduce_range=True))
        assert OrtBackend().fuses(written.proto), name  # auto mode keeps the fast path
        for feeds in calibration[:2]:
            fused, plain = _run(written.proto, feeds, fuse=True), _run(written.proto, feeds)
            for out in model.output_names:
                step = table.ranges[out].amax / 127
                assert np.abs(fused[out] - plain[out]).max() <= step, (name, out)


# --------------------------------------------------------------------------- placement


def _dq_readers(proto):
    """name of every node reading a DequantizeLinear output, with the tensor it reads."""
    prod = _producers(proto)
    return [(n, t) for n in proto.graph.node for t in n.input
            if t in prod and prod[t].op_type == "DequantizeLinear"]


@pytest.mark.parametrize("target", ["tensorrt", "ort"])
def test_residual_add_quantizes_its_skip_input(prepared, target):
    written = write_model(prepared["residual_net"][0], uniform_plan("int8"), prepared["residual_net"][1],
                          WriteOptions(target=target))
    add = next(n for n in written.proto.graph.node if n.name == "block_add")
    prod = _producers(written.proto)
    assert add.input[1] == "stem_relu/dq" and prod[add.input[1]].op_type == "DequantizeLinear"
    # TensorRT fuses the conv's output straight into the add: no Q/DQ there; ORT wants both for QLinearAdd
    assert (add.input[0] == "c2") == (target == "tensorrt")
    # the skip shares the Q/DQ that block_conv1's input already has (same tensor, same scale)
    conv1 = next(n for n in written.proto.graph.node if n.name == "block_conv1")
    assert conv1.input[0] == "stem_relu/dq"
    assert written.provenance.quantized_inputs["stem_relu"]["consumers"] == ["block_conv1", "block_add"]


@pytest.mark.parametrize("target", ["tensorrt", "ort"])
def test_concat_inputs_share_one_scale(prepared, target):
    model, table, _, _ = prepared["concat_net"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target=target))
    concat = next(n for n in written.proto.graph.node if n.op_type == "Concat")
    inits = {i.name: numpy_helper.to_array(i) for i in written.proto.graph.initializer}
    prod = _producers(written.proto)
    params = []
    for t in concat.input:
        dq = prod[t]
        assert dq.op_type == "DequantizeLinear"
        params.append((inits[dq.input[1]].tobytes(), inits[dq.input[2]].tobytes()))
    assert params[0] == params[1]
    if target == "tensorrt":
        shared = max(table.ranges["a"].amax, table.ranges["b"].amax) / 127
        assert np.frombuffer(params[0][0], np.float32)[0] == np.float32(shared)


def test_mixed_plan_puts_qdq_only_on_int8_groups(prepared):
    model, table, _, _ = prepared["residual_net"]
    plan = PrecisionPlan(default="int8", overrides={"stem_conv": "fp16", "block_conv2": "fp32", "fc": "fp16"})
    written = write_model(model, plan, table, WriteOptions(target="tensorrt"))
    prec = written.plan.precision
    group_of = written.provenance.node_group
    for node, tensor in _dq_readers(written.proto):
        if node.op_type == "DequantizeLinear" or node.name not in group_of:
            continue
        assert prec[group_of[node.name]] == "int8", (node.name, tensor)
    dtypes = written.provenance.tensor_dtype
    assert dtypes["stem_relu"] == "float16" and dtypes["r2"] == "float32" and dtypes["logits"] == "float32"
    # every int8 compute anchor reads only dequantized activations and weights
    nodes = {n.name: n for n in written.proto.graph.node}
    prod = _producers(written.proto)
    for g in written.plan.groups_at("int8"):
        if g.is_compute:
            assert all(prod[t].op_type == "DequantizeLinear" for t in nodes[g.name].input[:2])
    # the fp32 group's residual add reads stem_relu cast back to float32, not quantized
    assert nodes["block_add"].input[1] == "stem_relu/to_fp32"
    quantized = written.provenance.quantized_inputs
    assert {"stem_relu", "w1", "r2", "wd"} <= set(quantized)
    assert "r1" not in quantized and "w2" not in quantized  # block_conv2 stayed float
    assert "input" not in quantized and "flat" not in quantized  # so did stem_conv and fc


def test_fp16_keeps_risky_ops_fp32_and_io_float32(prepared):
    model = prepared["mlp_attention"][0]
    written = write_model(model, uniform_plan("fp16"), None)
    d = written.provenance.tensor_dtype
    assert d["probs"] == "float32"  # Softmax stays float32 by default
    assert d["scores"] == d["ctx"] == d["q"] == "float16"
    assert d["x"] == d["mask"] == d["out"] == "float32"
    assert written.provenance.tensor_map["wq"] == "wq/fp16"
    assert not written.provenance.quantized_inputs
    all_fp16 = write_model(model, uniform_plan("fp16"), None, WriteOptions(fp32_ops=()))
    assert all_fp16.provenance.tensor_dtype["probs"] == "float16"


def test_fp16_simulation_rounds_like_float16_storage_on_ort():
    """ORT's CPU provider runs a native fp16 model in float32 and drops the casts: only weights get
    rounded. The simulation form must match a numpy model of float16 storage exactly; native must not."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w1, b1, w2 = (rng.normal(0, 0.5, (16, 32)).astype(np.float32), rng.normal(0, 0.1, 32).astype(np.float32),
                  rng.normal(0, 0.5, (32, 8)).astype(np.float32))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="bias1"),
             helper.make_node("Relu", ["a1"], ["h"], name="relu1"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                              initializer=[numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = rng.normal(0, 1, (4, 16)).astype(np.float32)

    def r(a):
        return a.astype(np.float16).astype(np.float32)

    reference = r(r(np.maximum(r(r(r(x) @ r(w1)) + r(b1)), 0)) @ r(w2))
    sim = write_model(model, uniform_plan("fp16"), None, WriteOptions(fp16_simulation=True))
    native = write_model(model, uniform_plan("fp16"), None)
    got_sim = _run(sim.proto, {"x": x})["y"]
    got_native = _run(native.proto, {"x": x})["y"]
    # float32 sums differ by CPU (and numpy vs ORT) by at most gamma_K * sum|a*b|: a float16 rounding may go the
    # other way only where the exact value lies that close to a rounding boundary, and then moves by one ulp
    e = {k: r(v).astype(np.float64) for k, v in (("x", x), ("w1", w1), ("b1", b1), ("w2", w2))}
    u = 2.0 ** -24

    def flip(v, drift):
        h = v.astype(np.float16)
        other = np.nextafter(h, np.where(v > h, np.inf, -np.inf).astype(np.float16)).astype(np.float64)
        return np.where(np.abs(v - (h + other) / 2) < drift, np.abs(other - h), 0.0)

    m1 = e["x"] @ e["w1"]
    d_m1 = flip(m1, 16 * u * (np.abs(e["x"]) @ np.abs(e["w1"])))
    a1 = r(m1.astype(np.float32)) + e["b1"]
    d_h = d_m1 + flip(a1, u * np.abs(a1) * (a1 != a1.astype(np.float32)) + d_m1)  # float32 add: exact or 1 rounding
    h = np.maximum(r(a1.astype(np.float32)), 0).astype(np.float64)
    y, d_y = h @ e["w2"], d_h @ np.abs(e["w2"])
    bound = d_y + flip(y, 32 * u * (h @ np.abs(e["w2"])) + d_y)
    assert (np.abs(got_sim.astype(np.float64) - reference) <= bound).all()
    unambiguous = bound == 0  # no float16 rounding on the way can flip: the simulation is exact there, native is not
    assert unambiguous.any() and np.abs(got_native - reference)[unambiguous].max() > 0
    # the original names carry the rounded values, in float32
    assert set(sim.provenance.tensor_dtype.values()) == {"float32"}
    assert sim.provenance.meta["options"]["fp16_simulation"] is True
    full = _run(with_outputs(sim.proto, ["m1", "h"]), {"x": x}, ["m1", "h"])
    for t in ("m1", "h"):
        np.testing.assert_array_equal(full[t], r(full[t]))


def test_group_subgraphs_extract_with_original_names(prepared):
    """The comparator cuts per-group subgraphs at original tensor names: they must run alone.

    ORT runs unoptimised here: its QDQ fusions legitimately change rounding
    when an intermediate tensor is also an output. (fp16 -> fp32 boundaries are
    avoided on purpose: ORT's CPU cast-insertion drops the float16 rounding of
    a tensor when the fp16 op has no CPU kernel, but keeps it for an exposed one.)
    """
    model, table, _, _ = prepared["residual_net"]
    plan = PrecisionPlan(default="int8", overrides={"block_conv2": "fp32", "fc": "fp16"})
    written = write_model(model, plan, table)
    feeds = models.random_inputs(model.proto, 2, seed=3)
    everything = list(dict.fromkeys(t for g in written.plan.groups for t in (*g.input_tensors, g.output_tensor)))
    full = _run(with_outputs(written.proto, everything), feeds, everything, optimize=False)
    for g in written.plan.groups:
        sub = onnx.utils.Extractor(written.proto).extract_model(list(g.input_tensors), [g.output_tensor])
        got = _run(sub, {t: full[t] for t in g.input_tensors}, optimize=False)[g.output_tensor]
        np.testing.assert_array_equal(got, full[g.output_tensor], err_msg=g.name)
    assert full["logits"].dtype == np.float32


# --------------------------------------------------------------------------- numerics


def test_weight_qparams_per_channel_symmetric():
    w = np.array([[[[0.5, -1.0]]], [[[0.0, 0.0]]], [[[2.54, 1.27]]]], dtype=np.float32)
    qp, q = weight_qparams(w, 0)
    np.testing.assert_array_equal(qp.scale, np.float32([1.0 / 127, 1.0, 2.54 / 127]))
    assert q.dtype == np.int8 and qp.zero_point.dtype == np.int8 and not qp.zero_point.any()
    np.testing.assert_array_equal(q.reshape(3, 2), [[64, -127], [0, 0], [127, 64]])
    deq = q.astype(np.float32) * qp.scale.reshape(-1, 1, 1, 1)
    assert np.all(np.abs(deq - w) <= qp.scale.reshape(-1, 1, 1, 1) / 2 + 1e-7)


def test_activation_qparams_both_targets():
    r = TensorRange(amax=2.0, min=-0.5, max=3.0)  # max above amax: clipped to amax
    trt = activation_qparams(r, "tensorrt")
    assert trt.scale == np.float32(2.0 / 127) and trt.zero_point == 0 and trt.zero_point.dtype == np.int8
    o = activation_qparams(r, "ort")
    assert o.zero_point.dtype == np.uint8
    assert o.scale == np.float32(2.5 / 255) and o.zero_point == round(0.5 / (2.5 / 255))
    relu = activation_qparams(TensorRange(amax=6.0, min=0.0, max=6.0), "ort")
    assert relu.zero_point == 0  # lets ORT drop a Relu/Clip before the Q
    assert activation_qparams(TensorRange(amax=0.0, min=0.0, max=0.0), "ort").scale == 1.0


def test_same_inputs_same_bytes(prepared):
    a = _write(prepared, "residual_net", "mixed")
    b = _write(prepared, "residual_net", "mixed")
    assert serialize(a.proto) == serialize(b.proto)
    assert a.provenance.to_dict() == b.provenance.to_dict()


# --------------------------------------------------------------------------- bad input


def _table_without(table: CalibrationTable, *names: str) -> CalibrationTable:
    return CalibrationTable(table.method, {k: v for k, v in table.ranges.items() if k not in names}, table.model_sha256)


def test_table_of_another_model(prepared):
    model, _, _, _ = prepared["residual_net"]
    other = prepared["conv_net"][1]
    with pytest.raises(CalibrationError, match="made for the model with sha256"):
        write_model(model, uniform_plan("int8"), other)


def test_missing_range_names_tensor_and_group(prepared):
    model, table, _, _ = prepared["residual_net"]
    with pytest.raises(CalibrationError, match=r"no range for 1 tensor\(s\).*'r1' \(group 'block_conv2'\)"):
        write_model(model, uniform_plan("int8"), _table_without(table, "r1"))
    # pinning that group avoids the need
    written = write_model(model, PrecisionPlan(overrides={"block_conv2": "fp16"}), _table_without(table, "r1"))
    assert written.plan.precision["block_conv2"] == "fp16"


def test_int8_without_a_table(prepared):
    with pytest.raises(CalibrationError, match="no calibration table was given"):
        write_model(prepared["conv_net"][0], uniform_plan("int8"), None)


def test_huge_sentinels_are_not_quantized_silently(prepared):
    model, table, _, _ = prepared["residual_net"]
    ranges = dict(table.ranges)
    r = ranges["stem_relu"]
    ranges["stem_relu"] = TensorRange(r.amax, r.min, r.max, excluded={"huge": 3})
    with pytest.raises(CalibrationError, match="'stem_relu'.*huge.*Pin those groups"):
        write_model(model, uniform_plan("int8"), CalibrationTable("minmax", ranges, model.sha256))


def test_already_quantized_model_is_refused(prepared):
    written = _write(prepared, "conv_net", "int8")
    with pytest.raises(ModelError, match="already quantized: it holds DequantizeLinear .*QuantizeLinear"):
        write_model(model_from_proto(written.proto), uniform_plan("int8"), None)


def test_an_ort_dynamically_quantized_opset_12_model_loads_and_is_refused(tmp_path):
    """ddddocr ships an ORT quantize_dynamic model (ConvInteger, DynamicQuantizeLinear) at opset 12 declaring
    ORT's contrib domains: loading it raised "Unsupported opset-version" (a traceback from every command), and
    once loaded, calibrate measured its int32 accumulators and build wrote Q/DQ around them."""
    from onnxruntime.quantization import quantize_dynamic

    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays
    from quantlab.graph import load_model

    onnx.save(models.conv_net(), tmp_path / "fp32.onnx")  # its ops read the same at opset 12 (set below)
    quantize_dynamic(tmp_path / "fp32.onnx", tmp_path / "dynamic.onnx")
    proto = onnx.load(tmp_path / "dynamic.onnx")
    proto.opset_import.extend([onnx.helper.make_opsetid(d, 1) for d in (
        "com.microsoft", "com.microsoft.nchwc", "ai.onnx.training", "ai.onnx.preview.training")])
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 12
    onnx.save(proto, tmp_path / "dynamic.onnx")
    assert {"ConvInteger", "DynamicQuantizeLinear"} <= {n.op_type for n in proto.graph.node}
    model = load_model(tmp_path / "dynamic.onnx")  # raised before
    x = np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32)
    from quantlab.compare import CompareOptions, compare
    from quantlab.coverage import check_coverage

    float_model = load_model(tmp_path / "fp32.onnx")
    cal = calibrate(float_model, from_arrays({"input": x}), "minmax")
    for step in (lambda: calibrate(model, from_arrays({"input": x}), "minmax"),
                 lambda: write_model(model, uniform_plan("fp16"), None),
                 lambda: compare(model, {"fp32": float_model}, from_arrays({"input": x}, role="validation"),
                                 CompareOptions(per_layer=False, bootstrap=0)),  # as the reference
                 lambda: check_coverage(model, [from_arrays({"input": x})], cal.tables["minmax"], cal.statistics)):
        with pytest.raises(ModelError, match=r"dynamic.onnx is already quantized: it holds ConvInteger .*"
                                             r"DynamicQuantizeLinear.*give the FP32 model"):
            step()
    result = compare(float_model, {"dynamic": model}, from_arrays({"input": x}, role="validation"),
                     CompareOptions(per_layer=False, bootstrap=0))  # as a candidate it is measured
    assert result.end_to_end.iloc[0]["samples"] == 4


@pytest.mark.parametrize("where", ["input", "weight"])
def test_a_model_that_already_computes_in_float16_is_refused(where):
    """Q/DQ (opset 13-18) and the FP16 casts are written around float32 tensors: an FP16 export is refused
    by name, not written into a model that fails ("internal error: written tensor 'y' is float16")."""
    from onnx import TensorProto, numpy_helper

    half = onnx.ModelProto()
    half.CopyFrom(models.conv_net())
    if where == "input":
        half.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
        name = half.graph.input[0].name
    else:
        init = half.graph.initializer[0]
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
        name = init.name
    with pytest.raises(ModelError, match=rf"already computes in float16 \({where} '{name}' is float16\).*FP32 export"):
        write_model(_loaded(half), uniform_plan("int8"), None)
    # calibrate refuses it before the pass: no build could use its table (a keep_io_types float16 export, float32
    # inputs over float16 weights, was calibrated in full before build refused it)
    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays

    dtype = np.float16 if where == "input" else np.float32
    data = from_arrays({half.graph.input[0].name: np.zeros((2, 3, 16, 16), dtype)})
    with pytest.raises(ModelError, match="already computes in float16"):
        calibrate(_loaded(half), data, "minmax")


def test_a_float16_input_only_cast_to_float32_is_a_float32_model():
    """An export with float16 I/O whose network computes in float32 (input -> Cast(float) -> ...) was refused as
    "already computes in float16": it calibrates on float16 data and writes INT8 that runs; a bfloat16 input, which
    numpy cannot hold, is refused saying what to export instead."""
    from onnx import TensorProto, helper

    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays
    from quantlab.errors import InputMismatchError

    def behind_cast(dtype: int) -> onnx.ModelProto:
        proto = onnx.ModelProto()
        proto.CopyFrom(models.conv_net())
        first = proto.graph.input[0]
        for node in proto.graph.node:
            node.input[:] = ["x32" if t == first.name else t for t in node.input]
        proto.graph.node.insert(0, helper.make_node("Cast", [first.name], ["x32"], name="to_float",
                                                    to=TensorProto.FLOAT))
        first.type.tensor_type.elem_type = dtype
        return proto

    model = _loaded(behind_cast(TensorProto.FLOAT16))
    x = np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float16)
    table = calibrate(model, from_arrays({"input": x}), "minmax").tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    ref, int8 = models.run_ort(model.proto, {"input": x}), models.run_ort(written.proto, {"input": x})
    out = model.outputs[0].name
    assert int8[out].shape == ref[out].shape and np.isfinite(int8[out]).all()
    with pytest.raises(InputMismatchError, match=r"expects bfloat16, which numpy .* Export the model with float32"):
        calibrate(_loaded(behind_cast(TensorProto.BFLOAT16)), from_arrays({"input": x.astype(np.float32)}), "minmax")


def _loaded(proto):
    """The model as quantlab loads it (a float16 weight in a float32 Conv is type-inconsistent: loading must
    still work, the refusal is the writer's)."""
    return model_from_proto(proto)


def test_subgraph_reading_an_fp16_tensor_reads_it_in_float32():
    """An If branch reads 'r' by name and stays float32: the fp16 Relu writes 'r/fp16' and a Cast gives 'r' back
    in float32 (before: the plan was refused, and with it every FP16 candidate of a model with control flow)."""
    from onnx import TensorProto, helper

    def branch(name, op):
        return helper.make_graph([helper.make_node(op, ["r"], [name])], name, [],
                                 [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2])])

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("If", ["c"], ["y"], name="branch", then_branch=branch("t", "Identity"),
                              else_branch=branch("e", "Neg"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                                           helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    written = write_model(model, uniform_plan("fp16"), None)
    relu = next(n for n in written.proto.graph.node if n.name == "relu")
    assert list(relu.output) != ["r"]
    cast = next(n for n in written.proto.graph.node if n.op_type == "Cast" and list(n.output) == ["r"])
    assert list(cast.input) == list(relu.output)
    typed = {v.name: v.type.tensor_type.elem_type
             for v in onnx.shape_inference.infer_shapes(written.proto).graph.value_info}
    assert typed[relu.output[0]] == TensorProto.FLOAT16 and typed["r"] == TensorProto.FLOAT
    for c, expected in ((False, [0.0, -2.0]), (True, [0.0, 2.0])):
        feeds = {"x": np.array([-1.0, 2.0], np.float32), "c": np.array(c)}
        np.testing.assert_array_equal(_run(written.proto, feeds)["y"], expected)


@pytest.mark.parametrize("simulation", [False, True], ids=["float16", "simulated"])
def test_fp16_mask_from_a_constant_node_at_float32_min_stays_finite(simulation):
    """HF transformers build the mask as (1 - m) * torch.finfo(float32).min, the minimum a Constant node: its
    float16 copy is clipped to -65504 when written (a Cast at run time made it -inf, and 0 * -inf = NaN on
    every token the mask keeps)."""

    model = model_from_proto(models.hf_mask_softmax())
    written = write_model(model, uniform_plan("fp16"), None, WriteOptions(fp16_simulation=simulation))
    feeds = {"scores": np.array([[0.5, -1.0, 2.0, 0.0]] * 2, np.float32),
             "keep": np.array([[1, 1, 0, 1], [1, 0, 0, 0]], np.float32)}
    got = _run(written.proto, feeds)["probs"]
    np.testing.assert_allclose(got, _run(model.proto, feeds)["probs"], atol=2e-3)
    assert any("clipped to +-65504" in note for note in written.provenance.notes)
    assert not any(note.startswith("WARNING") for note in written.provenance.notes)  # a sentinel, meant to clip


@pytest.mark.parametrize("simulation", [False, True], ids=["float16", "simulated"])
def test_fp16_copy_of_a_parameter_beyond_its_range_is_a_warning_naming_it(simulation):
    """A BatchNorm variance of 2e7 left unfolded (PP-OCRv4's detector) is clipped to 65504 in FP16: the layer then
    computes something else (SQNR -0.7 dB), and only a count of clipped values said so."""
    from onnx import TensorProto, helper

    scale = numpy_helper.from_array(np.array([2e7, 1.0], np.float32), "scale")
    graph = helper.make_graph([helper.make_node("Div", ["x", "scale"], ["y"], name="div")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [scale])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    written = write_model(model, uniform_plan("fp16"), None, WriteOptions(fp16_simulation=simulation))
    warning = [n for n in written.provenance.notes if n.startswith("WARNING")]
    assert len(warning) == 1 and "'scale' (|x| up to 2e+07)" in warning[0] and "FP32" in warning[0]


@pytest.mark.parametrize("simulation", [False, True], ids=["float16", "simulated"])
def test_fp16_rnn_whose_loop_reads_an_outer_tensor(simulation):
    """torch's scripted RNN: a Loop over the sequence (trip count from the data) reads the embedded sequence
    by name. The FP16 candidate computes the embedding in float16, the loop body in float32."""
    model = model_from_proto(models.token_rnn())
    written = write_model(model, uniform_plan("fp16"), None, WriteOptions(fp16_simulation=simulation))
    rng = np.random.default_rng(0)
    for steps in (1, 7):
        feeds = {"x": rng.normal(size=(3, steps, 6)).astype(np.float32),
                 "h0": rng.normal(0, 0.3, (3, 12)).astype(np.float32)}
        ref = _run(model.proto, feeds)["logits"]
        got = _run(written.proto, feeds)["logits"]
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-2 * np.abs(ref).max())
        assert not np.array_equal(got, ref)  # the embedding did compute in (or round to) float16


def test_resolved_plan_of_another_model(prepared):
    resolved = resolve_plan(uniform_plan("fp16"), models.conv_net())
    with pytest.raises(PlanError, match="made for another model"):
        write_model(prepared["residual_net"][0], resolved, None)


# --------------------------------------------------------------------------- saving


def test_save_written_round_trips(prepared, tmp_path):
    written = _write(prepared, "residual_net", "mixed")
    paths = save_written(written, tmp_path / "out")
    assert {p.name for p in paths.values()} == {"model.onnx", "provenance.json", "plan.json"}
    assert onnx.load(paths["model"]).SerializeToString() == written.proto.SerializeToString()
    prov = load_provenance(paths["provenance"])
    assert prov == written.provenance
    assert prov.meta["plan_hash"] == written.plan.plan_hash()
    assert prov.meta["source_sha256"] == prepared["residual_net"][0].sha256
    assert prov.meta["options"]["target"] == "tensorrt"
    assert "onnx" in prov.meta["versions"]
    again = resolve_plan(load_plan(paths["plan"]), prepared["residual_net"][0].proto)
    assert again.plan_hash() == written.plan.plan_hash()
    assert [g.name for g in fusion_groups(prepared["residual_net"][0].proto)] == [g.name for g in written.plan.groups]


# --------------------------------------------------------------------------- CLI: quantlab build


def _cli(*argv):
    from quantlab.cli import main

    return main([str(a) for a in argv])


def test_cli_build_int8_for_tensorrt_rtx(prepared, tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx_bindings", reason="the tensorrt-rtx extra is not installed")
    from quantlab.table import write_table

    _, table, path, _ = prepared["residual_net"]
    table = CalibrationTable(table.method, table.ranges, model_sha256=_file_sha(path))
    write_table(table, tmp_path / "calib.json")
    out = tmp_path / "build"
    assert _cli("build", path, "--table", tmp_path / "calib.json", "--backend", "tensorrt-rtx", "--out", out) == 0
    assert {p.name for p in out.iterdir()} == {"model.onnx", "provenance.json", "plan.json", "model.engine",
                                               "engine.json"}
    written = onnx.load(out / "model.onnx")
    onnx.checker.check_model(written)
    zero_points = [i for i in written.graph.initializer if i.name.endswith("/zero_point")]
    assert zero_points and all(numpy_helper.to_array(z).dtype == np.int8 for z in zero_points)  # target tensorrt
    assert json.loads((out / "engine.json").read_text())["engine_bytes"] == (out / "model.engine").stat().st_size
    assert "int8 6" in capsys.readouterr().out


def test_cli_build_mixed_plan_for_ort(prepared, tmp_path, capsys):
    from quantlab.table import write_table

    _, table, path, _ = prepared["residual_net"]
    write_table(CalibrationTable(table.method, table.ranges, _file_sha(path)), tmp_path / "calib.json")
    plan = tmp_path / "plan.toml"
    plan.write_text('default = "int8"\n[overrides]\nblock_conv2 = "fp16"\n')
    out = tmp_path / "build"
    assert _cli("build", path, "--table", tmp_path / "calib.json", "--plan", plan, "--out", out) == 0
    prov = load_provenance(out / "provenance.json")
    assert prov.group_precision["block_conv2"] == "fp16" and prov.meta["options"]["target"] == "ort"
    assert prov.tensor_dtype["r2"] == "float16"
    # the effective plan reproduces the build
    assert _cli("build", path, "--table", tmp_path / "calib.json", "--plan", out / "plan.json",
                "--out", tmp_path / "again") == 0
    assert (tmp_path / "again" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()


def test_cli_build_errors_leave_nothing_behind(prepared, tmp_path, capsys):
    from quantlab.table import write_table

    path = prepared["residual_net"][2]
    write_table(prepared["conv_net"][1], tmp_path / "other.json")
    out = tmp_path / "build"
    assert _cli("build", path, "--table", tmp_path / "other.json", "--out", out) == 2
    assert "made for the model" in capsys.readouterr().err
    bad_plan = tmp_path / "plan.json"
    bad_plan.write_text(json.dumps({"overrides": {"block_cnv2": "fp16"}}))
    assert _cli("build", path, "--plan", bad_plan, "--precision", "fp16", "--out", out) == 2
    assert "disagree" in capsys.readouterr().err
    assert _cli("build", path, "--plan", bad_plan, "--out", out) == 2
    assert "did you mean 'block_conv2'" in capsys.readouterr().err
    assert _cli("build", path, "--precision", "mixed", "--out", out) == 2
    assert _cli("build", path, "--out", out) == 2  # int8 without a table
    assert "no calibration table" in capsys.readouterr().err
    assert _cli("build", path, "--precision", "fp16", "--fp16-simulation", "--backend", "tensorrt-rtx",
                "--out", out) == 2
    assert "--fp16-simulation" in capsys.readouterr().err
    assert not out.exists()
    # fp16 needs no table
    assert _cli("build", path, "--precision", "fp16", "--out", out) == 0


def test_cli_build_replaces_the_folder_as_a_whole(prepared, tmp_path, capsys):
    """A second build never leaves files of the first (a stale engine beside a new model)."""
    from quantlab.table import write_table

    _, table, path, _ = prepared["residual_net"]
    write_table(CalibrationTable(table.method, table.ranges, _file_sha(path)), tmp_path / "calib.json")
    out = tmp_path / "build"
    if importlib.util.find_spec("tensorrt_rtx_bindings") is not None:
        assert _cli("build", path, "--table", tmp_path / "calib.json", "--backend", "tensorrt-rtx",
                    "--out", out) == 0
        assert (out / "model.engine").is_file()
    assert _cli("build", path, "--table", tmp_path / "calib.json", "--reduce-range", "--out", out) == 0
    assert {p.name for p in out.iterdir()} == {"model.onnx", "provenance.json", "plan.json"}
    prov = load_provenance(out / "provenance.json")
    assert prov.meta["options"]["reduce_range"] is True and prov.meta["options"]["weight_qmax"] == 64
    weights = [numpy_helper.to_array(i) for i in onnx.load(out / "model.onnx").graph.initializer
               if i.name.endswith("/int8")]
    assert weights and max(int(np.abs(w.astype(np.int16)).max()) for w in weights) == 64
    captured = capsys.readouterr().out
    assert "saturate" not in captured  # 7-bit weights: nothing to warn about
    assert _cli("build", path, "--table", tmp_path / "calib.json", "--out", out) == 0
    assert ("saturate" in capsys.readouterr().out) == int8_dot_saturates()
    # a folder holding anything else is refused before any work, and left alone
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert _cli("build", path, "--precision", "fp16", "--out", mine) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("backend", ["ort", "tensorrt-rtx"])
def test_cli_build_unsupported_op_names_node_and_op_and_writes_nothing(tmp_path, capsys, backend):
    if backend == "tensorrt-rtx":
        pytest.importorskip("tensorrt_rtx_bindings", reason="the tensorrt-rtx extra is not installed")
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("FooBar", ["r"], ["y"], name="weird_node", domain="com.example")]
    graph = helper.make_graph(nodes, "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    out = tmp_path / "build"
    assert _cli("build", path, "--precision", "fp32", "--backend", backend, "--out", out) == 2
    err = capsys.readouterr().err
    assert "weird_node" in err and "FooBar" in err
    assert not out.exists()


def _file_sha(path):
    from quantlab.fingerprint import sha256_file

    return sha256_file(path)


def _ort_optimized_ops(proto, tmp_path):
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(serialize(proto), options, providers=["CPUExecutionProvider"])
    return {n.name: n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node}


def test_ort_target_fuses_into_integer_kernels(prepared, tmp_path):
    """The ORT form only pays off when ORT turns DQ -> Conv -> Q into QLinearConv (scalar scales, zp 0 after ReLU)."""
    model, table, _, _ = prepared["residual_net"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="ort"))
    ops = _ort_optimized_ops(written.proto, tmp_path)
    assert list(ops.values()).count("QLinearConv") == 4, ops  # every conv; their Relu/Clip dropped
    assert "QLinearAdd" in ops.values() and "QLinearGlobalAveragePool" in ops.values()
    assert not {"Conv", "FusedConv", "Relu", "Clip"} & set(ops.values())
    # a LeakyRelu after the conv needs the conv's own output quantized for ORT to fuse
    model, table, _, _ = prepared["unet_block"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="ort"))
    ops = _ort_optimized_ops(written.proto, tmp_path)
    fused = {name.split("_token")[0] for name, op in ops.items() if op == "QLinearConv"}
    assert {"mid_conv", "enc_conv"} <= fused and "QLinearLeakyRelu" in ops.values()
    assert "c1" in written.provenance.quantized_inputs
    # the TensorRT form never quantizes inside a fusion group
    trt = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    assert "c1" not in trt.provenance.quantized_inputs and "c0" not in trt.provenance.quantized_inputs


# --------------------------------------------------------------------------- TensorRT: all of the above (keep last)


def test_tensorrt_rtx_parses_and_builds_every_model_written_in_this_module(prepared):
    """The real TensorRT-RTX ONNX parser + builder (CPU, no GPU) on every TensorRT-form model written above.

    Every model of tests/models.py in INT8, FP16 and mixed is written here too, so the
    test covers them even when run alone; ad-hoc plans of the tests above come on top.
    Any parser or builder error fails the test, naming the model and the test that wrote it.
    """
    pytest.importorskip("tensorrt_rtx_bindings", reason="the tensorrt-rtx extra is not installed")
    from quantlab.backends.tensorrt import TensorRTBackend

    for name in sorted(models.ALL_BUILDERS):
        for writer in ("int8", "fp16", "mixed"):
            _write(prepared, name, writer)
    backend = TensorRTBackend("tensorrt-rtx")
    labels = []
    for sha, (test, proto) in sorted(_WRITTEN_FOR_TENSORRT.items()):
        label = f"{proto.graph.name} written by {test} ({sha[:12]})"
        engine = backend.build_engine(proto, label=label)
        assert isinstance(engine, bytes) and len(engine) > 10_000, label
        labels.append(label)
    assert len(labels) >= 3 * len(models.ALL_BUILDERS)


def _bucket_model(k: float) -> onnx.ModelProto:
    """T5's relative-position buckets in small: float arithmetic on Range(Shape(ids)), cast back to int64, picks
    a bias row added to the scores."""
    from onnx import TensorProto, helper

    def const(name: str, value: object) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value), name)

    nodes = [helper.make_node("Shape", ["ids"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "one"], ["length"], name="length", axis=0),
             helper.make_node("Range", ["zero", "length", "one"], ["pos"], name="range"),
             helper.make_node("Cast", ["pos"], ["posf"], name="to_float", to=TensorProto.FLOAT),
             helper.make_node("Div", ["posf", "eight"], ["ratio"], name="div"),
             helper.make_node("Add", ["ratio", "onef"], ["ratio1"], name="shift"),
             helper.make_node("Log", ["ratio1"], ["logs"], name="log"),
             helper.make_node("Mul", ["logs", "k"], ["scaled"], name="mul"),
             helper.make_node("Cast", ["scaled"], ["bucket"], name="to_int", to=TensorProto.INT64),
             helper.make_node("Gather", ["table", "bucket"], ["bias"], name="lookup", axis=0),
             helper.make_node("Add", ["scores", "bias"], ["y"], name="add_bias")]
    graph = helper.make_graph(
        nodes, "buckets",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "S"]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S"])],
        [const("one", np.int64(1)), const("zero", np.int64(0)), const("eight", np.float32(8.0)),
         const("onef", np.float32(1.0)), const("k", np.float32(k)),
         const("table", (np.arange(256) * 10.0).astype(np.float32))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


@pytest.mark.parametrize("simulation", [False, True], ids=["float16", "simulated"])
def test_index_arithmetic_on_shapes_stays_float32_in_fp16(simulation):
    """Float maths on shapes only (T5's bucket = int(log(1 + pos / 8) * k)) computes the same for every sample:
    in an FP16 candidate it stays float32, where float16 rounding moved positions into the next bucket (a
    different bias row: an error of 10 here, which no layer's precision explains)."""
    from onnx import TensorProto

    length = 200
    pos = np.arange(length, dtype=np.float32)
    logs = np.log(pos / np.float32(8.0) + np.float32(1.0)).astype(np.float32)
    k = next(float(k) for k in np.linspace(3.0, 9.0, 601, dtype=np.float32)
             if np.any((logs * k).astype(np.int64) != (logs * k).astype(np.float16).astype(np.int64)))
    model = model_from_proto(_bucket_model(k))
    written = write_model(model, uniform_plan("fp16"), None, WriteOptions(fp16_simulation=simulation))
    typed = {v.name: v.type.tensor_type.elem_type
             for v in onnx.shape_inference.infer_shapes(written.proto).graph.value_info}
    for t in ("ratio", "ratio1", "logs", "scaled"):
        assert typed[t] == TensorProto.FLOAT, t
    add = next(n for n in written.proto.graph.node if n.name == "add_bias")
    assert add.input[0] != "scores"  # the scores still go through float16 (a cast, or a rounding round trip)
    feeds = {"ids": np.zeros((2, length), np.int64), "scores": np.zeros((2, length), np.float32)}
    np.testing.assert_array_equal(_run(written.proto, feeds)["y"], _run(model.proto, feeds)["y"])


def _weight_first_model() -> onnx.ModelProto:
    """x[N, 8, T] ─► MatMul(W1[12, 8], x) ─► Relu ─► Gemm-free transpose-free W @ x again (W2[6, 12]), and a Gemm
    whose constant is A, stored transposed (transA=1): the weight-as-first-input layouts."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(12, 8)) * np.linspace(0.05, 3, 12)[:, None]  # rows of very different ranges
    w2 = rng.normal(size=(6, 12)) * np.linspace(3, 0.05, 6)[:, None]
    wa = rng.normal(size=(5, 4)) * np.linspace(0.05, 3, 4)[None, :]  # A stored [K, M]: out rows = its columns
    inits = [numpy_helper.from_array(w.astype(np.float32), n) for w, n in ((w1, "W1"), (w2, "W2"), (wa, "WA"))]
    nodes = [helper.make_node("MatMul", ["W1", "x"], ["h"], name="first_mm"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["W2", "r"], ["y"], name="second_mm"),
             helper.make_node("Gemm", ["WA", "z"], ["g"], name="gemm_a", transA=1)]
    graph = helper.make_graph(nodes, "wfirst", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 10]),
                                                helper.make_tensor_value_info("z", TensorProto.FLOAT, [5, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 10]),
                               helper.make_tensor_value_info("g", TensorProto.FLOAT, [4, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("target", ["tensorrt", "ort"])
def test_a_weight_given_as_the_first_input_is_quantized_per_output_row(target):
    """``MatMul(W, x)`` and a Gemm whose constant is A had per-tensor weights (``axis`` None, no note): 37 dB where
    per row gives 45. Each output row now gets its own scale; every weight is within half its row's step."""
    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays

    proto = _weight_first_model()
    model = model_from_proto(proto, label="wfirst")
    rng = np.random.default_rng(1)
    feeds = {"x": rng.normal(size=(4, 8, 10)).astype(np.float32), "z": rng.normal(size=(5, 3)).astype(np.float32)}
    table = calibrate(model, from_arrays(feeds, batch_axes={"z": None}), "minmax", batch_size=4).tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target=target))
    inits = {i.name: numpy_helper.to_array(i) for i in written.proto.graph.initializer}
    dq = {n.output[0]: n for n in written.proto.graph.node if n.op_type == "DequantizeLinear"}
    for node_name, slot, weight, axis in (("first_mm", 0, "W1", 0), ("second_mm", 0, "W2", 0), ("gemm_a", 0, "WA", 1)):
        node = next(n for n in written.proto.graph.node if n.name == node_name)
        deq = dq[node.input[slot]]
        assert next(a.i for a in deq.attribute if a.name == "axis") == axis, node_name
        w = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == weight))
        scale, q = inits[deq.input[1]], inits[deq.input[0]].astype(np.float64)
        shape = [1, 1]
        shape[axis] = -1
        step = np.abs(w).max(axis=1 - axis) / 127
        np.testing.assert_allclose(scale, step, rtol=1e-6)
        assert np.all(np.abs(q * scale.reshape(shape) - w) <= step.reshape(shape) / 2 * (1 + 1e-5) + 1e-12)
    got = _run(written.proto, feeds)
    ref = _run(proto, feeds)
    for name in ("y", "g"):
        err = np.abs(got[name] - ref[name]).max() / np.abs(ref[name]).max()
        assert 0 < err < 0.05, (name, err)


def test_an_int32_bias_over_a_near_zero_weight_channel_fits_its_scale():
    """PP-OCRv4's recogniser: a bias of 0.139 over a near-zero weight channel was written as 0.0946 (int32's
    limit times s_x * s_w = 4.4e-11), and other scales fell below float32's normals, without a word. That
    channel's weight scale is raised until the bias fits (as ONNX Runtime's quantizer does): the bias is
    written exactly and the ORT form computes it."""
    from onnx import TensorProto, helper

    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (3, 2, 1, 1)).astype(np.float32)
    w[1] = 1e-12  # a dead channel with a live bias
    b = np.array([0.1, 0.5, -0.2], np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = rng.normal(size=(4, 2, 4, 4)).astype(np.float32)
    table = calibrate(model, from_arrays({"x": x}), "minmax").tables["minmax"]
    ort_form = write_model(model, uniform_plan("int8"), table, WriteOptions(target="ort"))
    assert not any(n.startswith("WARNING") for n in ort_form.provenance.notes)
    inits = {i.name: numpy_helper.to_array(i) for i in ort_form.proto.graph.initializer}
    bias = inits["b/int32"].astype(np.float64) * inits["b/scale"].astype(np.float64)
    assert np.all(np.abs(bias - b) <= 0.5 * inits["b/scale"] * (1 + 1e-6))  # rounded, not clipped (0.5 was)
    assert np.all(inits["b/scale"] >= np.finfo(np.float32).tiny)
    w_scale = inits["w/scale"]
    assert w_scale[1] > 1e-11 and w_scale[0] == np.float32(np.abs(w[0]).max() / 127)  # only channel 1 moved
    y = _run(ort_form.proto, {"x": x})["y"]
    np.testing.assert_allclose(y[:, 1], 0.5, atol=1e-3)  # the dead channel outputs its bias


def test_a_weight_two_biased_layers_share_is_written_once():
    """The int32 bias's scale floor (qparams.bias_scale_floor) differs per input scale; a weight whose natural
    scales already meet every floor is still one int8 copy and one DequantizeLinear for both readers."""
    from onnx import TensorProto, helper

    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (3, 2, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0.1, 0.2, -0.1], np.float32), "b1"),
             numpy_helper.from_array(np.array([0.3, -0.2, 0.1], np.float32), "b2")]
    graph = helper.make_graph([helper.make_node("Conv", ["x1", "w", "b1"], ["y1"], name="conv1"),
                               helper.make_node("Conv", ["x2", "w", "b2"], ["y2"], name="conv2")], "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 2, 4, 4]) for n in ("x1", "x2")],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3, 4, 4]) for n in ("y1", "y2")],
                              inits)
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    data = from_arrays({"x1": rng.normal(size=(4, 2, 4, 4)).astype(np.float32),
                        "x2": 5 * rng.normal(size=(4, 2, 4, 4)).astype(np.float32)})
    table = calibrate(model, data, "minmax").tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="ort"))
    dqs = [n for n in written.proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("w/")]
    assert len(dqs) == 1


def _beyond_fp16_net() -> onnx.ModelProto:
    """x -> MatMul (outputs ~1e5, beyond float16) -> Mul 1e-3 -> y (~100): fine in FP32, inf in float16."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.normal(0, 1, (16, 8)) * 3e4).astype(np.float32), "w")
    small = numpy_helper.from_array(np.array(1e-3, np.float32), "small")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["big"], name="matmul"),
         helper.make_node("Mul", ["big", "small"], ["scaled"], name="scale"),
         helper.make_node("Relu", ["scaled"], ["y"], name="relu")], "beyond_fp16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [w, small])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("simulation", [False, True], ids=["float16", "simulated"])
def test_fp16_keeps_nodes_whose_calibrated_activations_pass_float16s_range_in_fp32(simulation):
    """Magika's LayerNorm reached 6e5: in float16 that is inf, and the FP16 candidate agreed with FP32 on 2 % of
    files. With a table, the nodes that read or write such a tensor compute in FP32 and the build says which;
    without one nothing is known (the model still overflows)."""
    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays

    model = model_from_proto(_beyond_fp16_net())
    x = np.random.default_rng(1).normal(0, 1, (16, 16)).astype(np.float32)
    table = calibrate(model, from_arrays({"x": x}), "minmax").tables["minmax"]
    assert table.ranges["big"].max > 65504
    want = _run(model.proto, {"x": x})["y"]
    options = WriteOptions(fp16_simulation=simulation)
    guarded = write_model(model, uniform_plan("fp16"), table, options)
    np.testing.assert_allclose(_run(guarded.proto, {"x": x})["y"], want, rtol=2e-2, atol=0.5)
    note = next(n for n in guarded.provenance.notes if "compute in FP32" in n)
    assert "2 node(s)" in note and "'matmul'" in note and "'scale'" in note
    bare = write_model(model, uniform_plan("fp16"), None, options)

    def matmul_reads(proto):
        return next(n for n in proto.graph.node if n.name == "matmul").input[0]

    assert matmul_reads(guarded.proto) == "x" and matmul_reads(bare.proto) != "x"  # float32 / a float16 cast
    if simulation:  # ORT's CPU provider runs a native float16 MatMul in float32: only simulation shows the inf
        assert not np.isfinite(_run(bare.proto, {"x": x})["y"]).all()  # the failure the table prevents
    stricter = write_model(model, uniform_plan("fp16"), table, WriteOptions(fp16_simulation=simulation,
                                                                            fp16_data_max=100.0))
    assert "3 node(s)" in next(n for n in stricter.provenance.notes if "compute in FP32" in n)  # Relu's ~100s too


def _timestep_embedding_net() -> onnx.ModelProto:
    """t[N] (0..999) -> Unsqueeze -> Mul(freqs) -> Sin, Cos -> Concat -> MatMul -> y[N, 8], a diffusion UNet's
    timestep embedding."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    freqs = numpy_helper.from_array(np.exp(-np.log(1e4) * np.arange(8) / 8).astype(np.float32)[None], "freqs")
    w = numpy_helper.from_array(rng.normal(0, 0.3, (16, 8)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("Unsqueeze", ["t", "axes"], ["t2"], name="unsqueeze"),
         helper.make_node("Mul", ["t2", "freqs"], ["phase"], name="phase"),
         helper.make_node("Sin", ["phase"], ["s"], name="sin"),
         helper.make_node("Cos", ["phase"], ["c"], name="cos"),
         helper.make_node("Concat", ["s", "c"], ["e"], name="concat", axis=1),
         helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")], "timestep_embedding",
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [freqs, w, axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fp16_computes_a_sin_cos_argument_of_many_radians_in_fp32():
    """A diffusion UNet's timestep embedding sin(t * f) for t up to 999: float16 rounds a 999 rad phase by up to
    0.25 rad, and the FP16 UNet's Sin read 28 dB (end to end 46.6 dB; 58.7 with the phase in FP32). With a table the
    argument's chain computes in FP32 (the projection after it stays FP16) and the build says which nodes."""
    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays

    model = model_from_proto(_timestep_embedding_net())
    t = np.random.default_rng(1).uniform(0, 999, 64).astype(np.float32)
    table = calibrate(model, from_arrays({"t": t}), "minmax").tables["minmax"]
    want = _run(model.proto, {"t": t})["y"]

    def sqnr(proto):
        got = _run(proto, {"t": t})["y"]
        return 10 * np.log10((want ** 2).sum() / ((got - want) ** 2).sum())

    options = WriteOptions(fp16_simulation=True)
    guarded = write_model(model, uniform_plan("fp16"), table, options)
    bare = write_model(model, uniform_plan("fp16"), None, options)
    assert sqnr(guarded.proto) > 45 > 30 > sqnr(bare.proto)
    note = next(n for n in guarded.provenance.notes if "Sin/Cos argument" in n)
    assert "4 node(s)" in note and all(f"'{n}'" in note for n in ("unsqueeze", "phase", "sin", "cos"))
    dtypes = write_model(model, uniform_plan("fp16"), table, WriteOptions()).provenance.tensor_dtype  # native
    assert (dtypes["phase"], dtypes["s"], dtypes["w"]) == ("float32", "float32", "float16")  # the MatMul in FP16


@pytest.mark.parametrize("simulation", [False, True], ids=["float16", "simulated"])
def test_fp16_computes_a_written_out_normalisations_statistics_in_fp32(simulation):
    """tf2onnx/jax2tf write a LayerNorm's variance as E[x^2] - E[x]^2 with eps 1e-12: in float16 it cancels and
    the epsilon is 0, so 1/sqrt(var + eps) was off by orders of magnitude (Magika: 5 dB after its first
    LayerNorm). The per-row statistics are now float32 (one value per row: free), the rows themselves FP16."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    consts = {"inv_n": np.array(1 / 32, np.float32), "eps": np.array(1e-12, np.float32)}
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["s"], name="sum", keepdims=1),
         helper.make_node("Mul", ["s", "inv_n"], ["mean"], name="mean"),
         helper.make_node("Mul", ["x", "x"], ["sq"], name="square"),
         helper.make_node("ReduceSum", ["sq", "axes"], ["s2"], name="sum_sq", keepdims=1),
         helper.make_node("Mul", ["s2", "inv_n"], ["mean_sq"], name="mean_sq"),
         helper.make_node("Mul", ["mean", "mean"], ["sq_mean"], name="square_mean"),
         helper.make_node("Sub", ["mean_sq", "sq_mean"], ["var"], name="variance"),
         helper.make_node("Add", ["var", "eps"], ["var_eps"], name="add_eps"),
         helper.make_node("Sqrt", ["var_eps"], ["std"], name="std"),
         helper.make_node("Reciprocal", ["std"], ["rstd"], name="rstd"),
         helper.make_node("Sub", ["x", "mean"], ["centred"], name="centre"),
         helper.make_node("Mul", ["centred", "rstd"], ["y"], name="normalise")], "ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()]
        + [numpy_helper.from_array(np.array([1], np.int64), "axes")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = (60 + rng.normal(0, 0.5, (8, 32))).astype(np.float32)  # rows far from 0, small spread
    want = _run(model.proto, {"x": x})["y"]
    written = write_model(model, uniform_plan("fp16"), None, WriteOptions(fp16_simulation=simulation))
    got = _run(written.proto, {"x": x})["y"]
    assert np.isfinite(got).all()
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 0.1  # float16 statistics: var = E[x^2] - E[x]^2 = 3600.25 - 3600 cancels to 0 or 2 (err >= 1)
    halves = _float16_reads(written.proto)
    assert halves["centre"] and halves["normalise"]  # the rows: FP16
    assert not any(halves[n] for n in ("square", "mean", "square_mean", "variance", "add_eps"))


def _float16_reads(proto: onnx.ModelProto) -> dict[str, bool]:
    """Node -> whether it reads a float16 value: a float16 initializer or Cast, or (FP16 simulation) a float32
    Cast of a float16 Cast."""
    from onnx import TensorProto

    casts = {o: n for n in proto.graph.node if n.op_type == "Cast" for o in n.output}
    half = {i.name for i in proto.graph.initializer if i.data_type == TensorProto.FLOAT16}

    def is_half(t: str) -> bool:
        c = casts.get(t)
        if c is None:
            return t in half
        to = next(a.i for a in c.attribute if a.name == "to")
        return to == TensorProto.FLOAT16 or (to == TensorProto.FLOAT and c.input[0] in casts and is_half(c.input[0]))

    return {n.name: any(is_half(t) for t in n.input) for n in proto.graph.node if n.op_type != "Cast"}


def test_a_group_computing_on_weights_alone_is_not_counted_as_weights_left_fp32():
    """DeBERTa projects its relative-position table with the query's weight (LayerNorm and MatMul over constants):
    that MatMul has no activation to quantize and fell back, and the note said 49 % of the weights were left FP32,
    though a builder folds the whole computation into a constant. Weights a group reads beside an activation
    still count."""
    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays

    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weights = {"w1": (8, 8), "table": (64, 8), "wq": (8, 8), "sel": (8, 64)}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["y"], name="dense"),
         helper.make_node("LayerNormalization", ["table", "g", "b"], ["table_ln"], name="rel_ln"),
         helper.make_node("MatMul", ["table_ln", "wq"], ["rel"], name="rel_proj"),
         helper.make_node("MatMul", ["sel", "rel"], ["rel8"], name="pick"),
         helper.make_node("Add", ["y", "rel8"], ["out"], name="add")], "relative",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8, 8])],
        [numpy_helper.from_array(rng.normal(0, 0.3, v).astype(np.float32), k) for k, v in weights.items()]
        + [numpy_helper.from_array(np.ones(8, np.float32), "g"), numpy_helper.from_array(np.zeros(8, np.float32), "b")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    table = calibrate(model, from_arrays({"x": rng.normal(0, 1, (4, 8, 8)).astype(np.float32)}), "minmax").tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    assert written.plan.precision["pick"] == "fp32"  # no activation to quantize: it falls back
    assert not any("no INT8 form" in n for n in written.provenance.notes)


def test_weights_left_fp32_for_lack_of_an_int8_form_are_a_note_and_fallback_fp16_runs_them_fp16(tmp_path, capfd):
    """ddddocr's LSTM (31 % of the weights) has no INT8 form: its "int8 on 100 % of quantizable groups" engine was
    larger than the FP16 one, and nothing said why or that INT8 + FP16 (TensorRT's classic build) was a flag away."""
    from quantlab.calibrate import calibrate
    from quantlab.cli import main
    from quantlab.data import from_arrays

    rng = np.random.default_rng(0)
    proto = models.lstm_head()
    model = model_from_proto(proto)
    feeds = {"x": rng.normal(0, 1, (4, 5, 8)).astype(np.float32)}
    table = calibrate(model, from_arrays(feeds), "minmax").tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    note = next(n for n in written.provenance.notes if "no INT8 form" in n)
    assert "fell back to FP32" in note and "--fallback fp16" in note
    onnx.save(proto, tmp_path / "rnn.onnx")
    from quantlab.table import write_table

    write_table(table, tmp_path / "t.json")
    assert main(["build", str(tmp_path / "rnn.onnx"), "--table", str(tmp_path / "t.json"), "--target", "tensorrt",
                 "--fallback", "fp16", "--out", str(tmp_path / "b")]) == 0
    out = capfd.readouterr().out
    assert "fp32 0" in out and "no INT8 form" not in out
    plan = json.loads((tmp_path / "b" / "plan.json").read_text())
    assert plan["fallback"] == "fp16"
    assert main(["build", str(tmp_path / "rnn.onnx"), "--precision", "fp16", "--fallback", "fp16", "--out",
                 str(tmp_path / "c")]) == 2


def test_fp16_keeps_a_3d_global_average_pool_mean_in_fp32_like_reducemean():
    """tf2onnx writes a LayerNorm's mean as GlobalAveragePool over a 3-D tensor: it stayed float16, with the
    statistics after it (TensorRT-RTX: "Detected layernorm nodes in FP16"). A 4-D pool (a CNN head) is left be."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["mean"], name="gap_mean"),
         helper.make_node("Sub", ["x", "mean"], ["centred"], name="centre"),
         helper.make_node("Mul", ["centred", "centred"], ["sq"], name="square"),
         helper.make_node("GlobalAveragePool", ["sq"], ["var"], name="gap_var"),
         helper.make_node("Add", ["var", "eps"], ["var_eps"], name="add_eps"),
         helper.make_node("Sqrt", ["var_eps"], ["std"], name="std"),
         helper.make_node("Div", ["centred", "std"], ["y"], name="normalise"),
         helper.make_node("GlobalAveragePool", ["img"], ["pooled"], name="cnn_head")], "gap_ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16]),
         helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16]),
         helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 4, 1, 1])],
        [numpy_helper.from_array(np.array(1e-12, np.float32), "eps")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    halves = _float16_reads(write_model(model, uniform_plan("fp16"), None).proto)
    assert not halves["gap_mean"] and not halves["gap_var"] and not halves["add_eps"]
    assert halves["centre"] and halves["normalise"] and halves["cnn_head"]


def test_ort_form_leaves_an_int8_output_float_where_a_log_reads_it():
    """openwakeword's melspectrogram: ``MatMul -> Clip(1e-10) -> Log``. The ORT form's output Q/DQ rounded every
    mel energy under half the INT8 step to 0, and Log made it -inf. The output stays float there (the MatMul still
    reads INT8), and the written model's notes say so."""
    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays

    model = model_from_proto(models.log_mel(), label="log_mel")
    rng = np.random.default_rng(0)
    power = np.exp(rng.normal(0, 4, (8, 5, 16))).astype(np.float32)
    table = calibrate(model, from_arrays({"power": power}), "minmax", batch_size=4).tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="ort"))
    readers = {i: n.op_type for n in written.proto.graph.node for i in n.input}
    log_input = next(n.input[0] for n in written.proto.graph.node if n.op_type == "Log")
    producer = next(n for n in written.proto.graph.node if log_input in n.output)
    assert producer.op_type != "DequantizeLinear", readers
    assert any(n.op_type == "DequantizeLinear" for n in written.proto.graph.node)  # the MatMul is INT8 still
    assert any("read by Log 'log'" in n for n in written.provenance.notes)
    out = OrtBackend().build(written.proto).run({"power": power})["db"]
    assert np.isfinite(out).all()


@pytest.mark.parametrize("exponent, kept_float", [(3.0, False), (-1.0, True)], ids=["cube", "inverse"])
def test_ort_form_keeps_an_output_qdq_a_pow_reads_unless_its_exponent_is_negative(exponent, kept_float):
    """GELU-tanh's ``Pow(x, 3)`` (ALBERT, GPT-2, Funnel) maps a value rounded to 0 to 0: its MatMul keeps the
    ORT form's output Q/DQ. A negative exponent divides by the value: that output stays float, with the note."""
    from onnx import TensorProto, helper

    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="ffn"),
         helper.make_node("Pow", ["h", "p"], ["y"], name="pow")], "pow_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(rng.normal(0, 0.3, (16, 8)).astype(np.float32), "W"),
         numpy_helper.from_array(np.array(exponent, np.float32), "p")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = rng.normal(0, 1, (16, 16)).astype(np.float32)
    table = calibrate(model, from_arrays({"x": x}), "minmax").tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="ort"))
    pow_input = next(n.input[0] for n in written.proto.graph.node if n.op_type == "Pow")
    producer = next(n for n in written.proto.graph.node if pow_input in n.output)
    assert (producer.op_type != "DequantizeLinear") == kept_float
    assert any("read by Pow 'pow'" in n for n in written.provenance.notes) == kept_float


@pytest.mark.parametrize("simulation", [False, True], ids=["float16", "simulated"])
def test_fp16_keeps_a_guard_constant_float16_reads_as_zero_in_fp32(simulation):
    """A log-mel front end floors its mel energies at 1e-10 before the Log: in float16 the floor is 0, and on quiet
    audio the FP16 model returned -inf dB (7 of 1280 values) where FP32 gives -85. The Clip that reads the guard
    computes in FP32 and the build says so; the output stays finite."""
    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays

    model = model_from_proto(models.log_mel())
    power = (10.0 ** np.random.default_rng(0).uniform(-14, -4, (16, 10, 16))).astype(np.float32)
    table = calibrate(model, from_arrays({"power": power}), "minmax", batch_size=8).tables["minmax"]
    written = write_model(model, uniform_plan("fp16"), table, WriteOptions(fp16_simulation=simulation))
    got, want = _run(written.proto, {"power": power})["db"], _run(model.proto, {"power": power})["db"]
    assert np.isfinite(got).all() and want.min() < -80
    assert np.abs(got - want).max() < (30.0 if simulation else 0.1)  # simulated: float16's own underflow of mel
    note = next(n for n in written.provenance.notes if "guard constant" in n)
    assert "1 node(s)" in note and "'floor' ('floor' = 1e-10)" in note
    clip = next(n for n in written.proto.graph.node if n.name == "floor")
    assert tensor_specs(written.proto)[clip.input[1]].dtype == "float32"  # the floor is read as float32


def test_fp16_keeps_nodes_of_activations_float16_reads_as_zero_in_fp32():
    """Activations whose every value is below float16's smallest (6e-8) are 0 in float16: the nodes reading or
    writing them compute in FP32, named in a note."""
    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays

    model = model_from_proto(models.denormal_branch_net())
    x = np.random.default_rng(0).standard_normal((12, 16)).astype(np.float32)
    table = calibrate(model, from_arrays({"x": x}), "minmax", batch_size=4).tables["minmax"]
    written = write_model(model, uniform_plan("fp16"), table, WriteOptions())
    note = next(n for n in written.provenance.notes if "below float16's smallest" in n)
    assert all(f"'{n}'" in note for n in ("shrink", "far", "sum")) and "'near'" not in note  # 'square': a Pow
    reads = {n.name: list(n.input) for n in written.proto.graph.node}
    assert reads["far"][0] == "tiny" and reads["square"] == ["small", "small"]  # float32, not through a float16 cast
    assert reads["near"][0] != "x"  # the normal branch is float16


def test_a_weight_several_fallback_groups_read_counts_once_in_the_note():
    """A scripted beam search's six unrolled steps each Gather from one embedding table: the note counted the
    table six times (45 % of the weights said, could pass 100 %). Each FP32 weight counts once."""
    from onnx import TensorProto, helper

    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays

    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Gather", ["emb", f"ids{k}"], [f"e{k}"], name=f"embed{k}") for k in range(3)]
    nodes += [helper.make_node("Add", ["e0", "e1"], ["s01"], name="add01"),
              helper.make_node("Add", ["s01", "e2"], ["s"], name="add2"),
              helper.make_node("MatMul", ["s", "w"], ["logits"], name="head")]
    graph = helper.make_graph(
        nodes, "steps", [helper.make_tensor_value_info(f"ids{k}", TensorProto.INT64, ["N", 1]) for k in range(3)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, 4])],
        [numpy_helper.from_array(rng.normal(0, 0.3, (100, 16)).astype(np.float32), "emb"),
         numpy_helper.from_array(rng.normal(0, 0.3, (16, 4)).astype(np.float32), "w")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    feeds = {f"ids{k}": rng.integers(0, 100, (8, 1)).astype(np.int64) for k in range(3)}
    table = calibrate(model, from_arrays(feeds), "minmax").tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    note = next(n for n in written.provenance.notes if "no INT8 form" in n)
    assert note.startswith(f"{1600 / 1664:.0%} of the weights are in groups with no INT8 form")  # 96 %, not 288 %


@pytest.mark.parametrize("op, constant_first, bound", [("Mul", False, True), ("Add", True, True),
                                                      ("Div", False, True), ("Div", True, False)],
                         ids=["mul", "add-constant-first", "divided", "divisor"])
def test_ort_form_leaves_float_a_group_output_scaled_by_a_constant_on_its_way_out(op, constant_first, bound):
    """GLPN's depth head: Conv -> Sigmoid -> Mul(10) -> Squeeze -> output. The output Q/DQ on the Sigmoid left its
    depths (0.486-0.513) 14 INT8 levels: 16 dB against the TensorRT form's 32 with the offset removed. A scale or
    shift by a constant passes values on like a layout op; a Div whose divisor is the group's output does not."""
    from onnx import TensorProto, helper

    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays

    rng = np.random.default_rng(0)
    operands = ["ten", "s"] if constant_first else ["s", "ten"]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="head", pads=[1, 1, 1, 1]),
         helper.make_node("Sigmoid", ["c"], ["s"], name="sigmoid"),
         helper.make_node(op, operands, ["d"], name="scale"),
         helper.make_node("Squeeze", ["d", "one"], ["depth"], name="squeeze")], "depth_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("depth", TensorProto.FLOAT, ["N", 8, 8])],
        [numpy_helper.from_array(rng.normal(0, 0.3, (1, 4, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array(10.0, np.float32), "ten"),
         numpy_helper.from_array(np.array([1], np.int64), "one")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    feeds = {"x": rng.normal(0, 1, (4, 4, 8, 8)).astype(np.float32)}
    table = calibrate(model, from_arrays(feeds), "minmax").tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="ort"))
    made = {o: n for n in written.proto.graph.node for o in n.output}
    scale = next(n for n in written.proto.graph.node if n.op_type == op)
    read = scale.input[0 if not constant_first else 1]
    assert made[read].op_type == "Sigmoid"  # no DequantizeLinear between the Sigmoid and the output
    assert any("'s' (-> 'depth')" in n for n in written.provenance.notes) == bound
    # a divisor stays float for its own reason (values rounded to 0 would divide by zero), named so
    assert any("'s' (read by Div 'scale')" in n for n in written.provenance.notes) == (not bound)


def test_ort_form_leaves_float_the_group_outputs_that_only_reach_the_models_outputs():
    """ddddocr's YOLOX head: Conv -> Sigmoid scores and Conv boxes -> Concat -> output. The ORT form put an output
    Q/DQ on each, though no INT8 layer reads them: entropy clipped the objectness at 0.115 of its 0.50. They now stay
    float, with a note; a group output an INT8 layer also reads keeps its."""
    from onnx import TensorProto, helper

    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays

    rng = np.random.default_rng(0)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w0"], ["f"], name="stem", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["f"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "ws"], ["s"], name="score_conv"),
         helper.make_node("Sigmoid", ["s"], ["score"], name="score_sigmoid"),
         helper.make_node("Conv", ["r", "wb"], ["box"], name="box_conv"),
         helper.make_node("Concat", ["box", "score"], ["cat"], name="cat", axis=1),
         helper.make_node("Reshape", ["cat", "flat"], ["det"], name="flatten")], "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("det", TensorProto.FLOAT, ["N", 5, 64])],
        [w("w0", 8, 3, 3, 3), w("ws", 1, 8, 1, 1), w("wb", 4, 8, 1, 1),
         numpy_helper.from_array(np.array([0, 5, -1], np.int64), "flat")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    feeds = {"x": rng.normal(0, 1, (4, 3, 8, 8)).astype(np.float32)}
    table = calibrate(model, from_arrays(feeds), "minmax").tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="ort"))
    made = {o: n for n in written.proto.graph.node for o in n.output}
    cat = next(n for n in written.proto.graph.node if n.op_type == "Concat")
    assert [made[t].op_type for t in cat.input] == ["Conv", "Sigmoid"]  # read as computed, no DequantizeLinear
    assert any(made[t].op_type == "DequantizeLinear" for t in next(
        n for n in written.proto.graph.node if n.name == "score_conv").input)  # 'r' keeps its Q/DQ: INT8 reads it
    note = next(n for n in written.provenance.notes if "only layout ops (or a scale or shift by a constant) lead" in n)
    assert "'box' (-> 'det')" in note and "'score' (-> 'det')" in note
    got = models.run_ort(written.proto, feeds)["det"]
    want = models.run_ort(model.proto, feeds)["det"]
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99


def test_class_logits_upsampled_to_the_output_keep_no_output_qdq():
    """SegFormer upsampled to the input's size: Conv (class logits) -> Resize -> output. No INT8 layer reads the
    logits, and the ORT form's output Q/DQ only rounded them before the Resize."""
    from onnx import TensorProto, helper

    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["logits"], name="classifier"),
         helper.make_node("Resize", ["logits", "", "scales"], ["up"], name="upsample", mode="linear")], "seg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 4, 4])],
        [helper.make_tensor_value_info("up", TensorProto.FLOAT, ["N", 5, 16, 16])],
        [numpy_helper.from_array(rng.normal(0, 0.3, (5, 8, 1, 1)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([1, 1, 4, 4], np.float32), "scales")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    feeds = {"x": rng.normal(0, 1, (4, 8, 4, 4)).astype(np.float32)}
    table = calibrate(model, from_arrays(feeds), "minmax").tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="ort"))
    made = {o: n for n in written.proto.graph.node for o in n.output}
    resize = next(n for n in written.proto.graph.node if n.op_type == "Resize")
    assert made[resize.input[0]].op_type == "Conv"  # read as computed, no DequantizeLinear
    assert any("'logits' (-> 'up')" in n for n in written.provenance.notes)


def test_a_table_two_unrolled_steps_gather_from_is_counted_and_named_once():
    """An unrolled greedy decoder's two embedding Gathers read one table: the fallback note listed it twice (each
    with its full share); it names the groups together, once, with the table's share."""
    from onnx import TensorProto, helper

    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids0"], ["e0"], name="embed_step0"),
         helper.make_node("Gather", ["table", "ids1"], ["e1"], name="embed_step1"),
         helper.make_node("Add", ["e0", "e1"], ["e"], name="sum"),
         helper.make_node("MatMul", ["e", "w"], ["out"], name="head")], "unrolled",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["N", 3]) for n in ("ids0", "ids1")],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, 4])],
        [numpy_helper.from_array(rng.normal(0, 1, (64, 32)).astype(np.float32), "table"),
         numpy_helper.from_array(rng.normal(0, 0.2, (32, 4)).astype(np.float32), "w")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    feeds = {n: rng.integers(0, 64, (4, 3)).astype(np.int64) for n in ("ids0", "ids1")}
    table = calibrate(model, from_arrays(feeds), "minmax").tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    fallen = sorted(g for g, p in written.plan.precision.items() if p == "fp32")
    assert {"embed_step0", "embed_step1"} <= set(fallen), written.plan.precision
    note = next(n for n in written.provenance.notes if "no INT8 form" in n)
    assert note.startswith("94% of the weights")  # 2048 of 2176, once
    assert note.count("embed_step") == 1 and "and 1 other group(s) reading the same weights 94%" in note


@pytest.mark.parametrize("transposed", [False, True])
def test_expert_weights_a_gather_picks_for_an_int8_matmul_are_not_called_fp32(transposed):
    """A Mixtral-style MoE: each expert's weights reach its MatMul through Gather(experts, index), and the written
    model quantizes them there (the MatMul's input Q/DQ): the note said 84 % of the weights "fell back to FP32"."""
    from onnx import TensorProto, helper

    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays

    rng = np.random.default_rng(0)
    picked = "w_t" if transposed else "w_sel"  # a Mixtral's gate_up_proj: Gather -> Transpose -> MatMul
    graph = helper.make_graph(
        [helper.make_node("Gather", ["experts", "pick"], ["w_sel"], name="pick_expert", axis=0),
         *([helper.make_node("Transpose", ["w_sel"], ["w_t"], name="to_in_out", perm=[1, 0])] if transposed else []),
         helper.make_node("MatMul", ["x", picked], ["y"], name="expert_mm")], "moe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
         helper.make_tensor_value_info("pick", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(rng.normal(0, 0.3, (16, 8, 8)).astype(np.float32), "experts")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    feeds = {"x": rng.normal(0, 1, (8, 8)).astype(np.float32), "pick": np.array(3, np.int64)}
    table = calibrate(model, from_arrays(feeds, batch_axes={"pick": None}), "minmax").tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    assert written.plan.precision["expert_mm"] == "int8" and written.plan.precision["pick_expert"] == "fp32"
    mm = next(n for n in written.proto.graph.node if n.name == "expert_mm")
    made = {o: n for n in written.proto.graph.node for o in n.output}
    assert made[mm.input[1]].op_type == "DequantizeLinear"  # the picked weights reach the MatMul in INT8
    assert not any("no INT8 form" in n for n in written.provenance.notes)
    # their range is their table's, whatever rows the calibration data picked: mse had clipped a Mixtral's experts
    # (one expert picked here: its range alone would clip the other fifteen)
    experts = numpy_helper.to_array(next(i for i in model.proto.graph.initializer if i.name == "experts"))
    for method in ("minmax", "mse"):
        table = calibrate(model, from_arrays(feeds, batch_axes={"pick": None}), method).tables[method]
        assert table.ranges[picked].amax < np.abs(experts).max()  # the picked expert's own range
        written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
        inits = {i.name: numpy_helper.to_array(i) for i in written.proto.graph.initializer}
        dq = {o: n for n in written.proto.graph.node for o in n.output}[
            next(n for n in written.proto.graph.node if n.name == "expert_mm").input[1]]
        assert float(inits[dq.input[1]]) == pytest.approx(float(np.abs(experts).max()) / 127, rel=1e-6)


def _warp_net(size: int = 8) -> onnx.ModelProto:
    """``Conv -> GridSample(h, grid)``, the grid a constant sampling pattern expanded to the batch (a model's
    registered buffer, as a fixed warp or a spatial transformer's identity grid exports)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    ys, xs = np.meshgrid(np.linspace(-0.9, 0.9, size), np.linspace(-0.9, 0.9, size), indexing="ij")
    grid = np.stack([xs + 0.05 * ys, ys - 0.05 * xs], axis=-1)[None].astype(np.float32)  # [1, H, W, 2], rotated
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(grid, "grid"),
             numpy_helper.from_array(np.array([size, size, 2], np.int64), "hw2")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["x"], ["xs"], name="shape", end=1),
             helper.make_node("Concat", ["xs", "hw2"], ["grid_shape"], name="grid_shape", axis=0),
             helper.make_node("Expand", ["grid", "grid_shape"], ["grid_n"], name="expand"),
             helper.make_node("GridSample", ["h", "grid_n"], ["y"], name="warp", align_corners=0)]
    graph = helper.make_graph(
        nodes, "warp_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, size, size])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fp16_casts_a_grid_sample_grid_of_constants_to_the_inputs_float16():
    """ONNX lets a GridSample's grid (T2) differ from its input's type, TensorRT does not: the grid, computed from
    constants alone, stayed float32 beside a float16 input, and TensorRT's parser refused the FP16 model ("input
    and grid must be of same type"). It is float16 now; TensorRT-RTX parses and builds the model."""
    model = model_from_proto(_warp_net())
    written = write_model(model, uniform_plan("fp16"), None, WriteOptions())
    specs = {name: s.dtype for name, s in tensor_specs(onnx.shape_inference.infer_shapes(written.proto)).items()}
    warp = next(n for n in written.proto.graph.node if n.op_type == "GridSample")
    assert [specs[t] for t in warp.input] == ["float16", "float16"], [specs[t] for t in warp.input]
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    want, got = _run(model.proto, {"x": x})["y"], _run(written.proto, {"x": x})["y"]
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()  # float16's rounding, not a broken warp
    pytest.importorskip("tensorrt_rtx_bindings", reason="the tensorrt-rtx extra is not installed")
    from quantlab.backends.tensorrt import TensorRTBackend

    assert len(TensorRTBackend("tensorrt-rtx").build_engine(written.proto, label="warp_net fp16")) > 10_000
