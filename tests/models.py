"""Small real ONNX models built with onnx.helper, shared by the whole test suite.

Each builder returns an ``onnx.ModelProto`` (opset 17, checked) with
deterministic weights from ``seed``. Add new builders here (append only) and
register them in ``ALL_BUILDERS`` so cross-cutting tests (e.g. "TensorRT
parses every written model") pick them up.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def _model(nodes, inputs, outputs, inits, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="quantlab-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def ort_session(proto: onnx.ModelProto, options: Any = None) -> Any:
    """A plain ONNX Runtime session of ``proto`` (CPU) with the Q/DQ semantics quantlab's runs have on this CPU.

    Without a VNNI dot product ORT's fused u8 x s8 kernels saturate, so quantlab runs such a model unfused (and
    any model under QUANTLAB_ORT_QDQ_FUSION=off): a default session would measure that saturation instead
    (Silero-like free-running INT8: 33.9 against 41.1 dB on an AVX2-only CPU), and a check against it would
    pass only on a VNNI CPU."""
    import onnxruntime as ort

    from quantlab.backends.ort import DISABLE_QDQ_FUSION, OrtBackend
    from quantlab.graph.load import serialize

    if options is None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
    if not OrtBackend().fuses(proto):
        options.add_session_config_entry(DISABLE_QDQ_FUSION, "1")
    return ort.InferenceSession(serialize(proto), options, providers=["CPUExecutionProvider"])


def run_exact(proto: onnx.ModelProto, name: str, output: str, values: np.ndarray, batch: int) -> np.ndarray:
    """``output`` of ``proto`` fed ``values`` as input ``name`` in batches of ``batch`` (concatenated on axis 0),
    Q/DQ as written and one thread: the kernels a comparison with ``qdq_fusion=False, threads=1`` runs, so a
    near-tie falls the same way in both on any CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([output], {name: values[i:i + batch]})[0]
                           for i in range(0, len(values), batch)])


def run_ort(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of ``proto`` on ``feeds``, through quantlab's ONNX Runtime backend (its session options)."""
    from quantlab.backends import get_backend

    runner = get_backend("ort").build(proto)
    try:
        return runner.run(feeds)
    finally:
        runner.close()


def _loop_body(nodes: list[onnx.NodeProto], name: str, state: list[int | str],
               scans: list[tuple[str, int, list[int | str]]] = ()) -> onnx.GraphProto:
    """A Loop body with one float state: (i, cond_in, h_in[state]) -> (cond_out, h_out[state], *scans)."""
    return helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, state)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, state),
         *(helper.make_tensor_value_info(n, t, shape) for n, t, shape in scans)])


def conv_net(seed: int = 0, channels: int = 8, size: int = 16) -> onnx.ModelProto:
    """input[N,3,H,W] -> Conv+BN-folded bias -> Relu -> Conv -> Relu -> GlobalAvgPool -> Flatten -> Gemm -> logits[N,10]."""
    rng = np.random.default_rng(seed)
    c = channels
    w1 = rng.normal(0, 0.3, (c, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (c,)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (c, c, 3, 3)).astype(np.float32)
    b2 = rng.normal(0, 0.1, (c,)).astype(np.float32)
    wf = rng.normal(0, 0.3, (10, c)).astype(np.float32)
    bf = rng.normal(0, 0.1, (10,)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("Conv", ["relu1", "w2", "b2"], ["conv2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["relu2"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])]
    inits = [_init(n, a) for n, a in [("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("wf", wf), ("bf", bf)]]
    return _model(nodes, inputs, outputs, inits, "conv_net")


def noisy_conv_net(seed: int = 0, gain: float = 1.0, size: int = 16) -> onnx.ModelProto:
    """:func:`conv_net` whose logits get latent noise drawn in the graph, as VITS's do: ``logits + gain *
    RandomNormalLike(logits, scale=0.1)`` (``gain`` 0: the export with its noise off, same graph)."""
    model = conv_net(seed, size=size)
    graph = model.graph
    graph.node[-1].output[0] = "clean"
    graph.node.extend([
        helper.make_node("RandomNormalLike", ["clean"], ["noise"], name="latent_noise", scale=0.1),
        helper.make_node("Mul", ["noise", "gain"], ["scaled"], name="noise_scale"),
        helper.make_node("Add", ["clean", "scaled"], ["logits"], name="add_noise")])
    graph.initializer.append(_init("gain", np.array(gain, np.float32)))
    onnx.checker.check_model(model)
    return model


def detr_head(seed: int = 0, queries: int = 10, width: int = 8, classes: int = 6) -> onnx.ModelProto:
    """A DETR/YOLOS head: queries[N, Q, W] -> MatMul -> logits[N, Q, classes] (the last class "no object"), and
    MatMul -> Add(bias) -> Sigmoid -> pred_boxes[N, Q, 4] (a box per query)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["queries", "wc"], ["logits"], name="class_head"),
             helper.make_node("MatMul", ["queries", "wb"], ["mm"], name="box_mm"),
             helper.make_node("Add", ["mm", "bb"], ["box_logit"], name="box_bias"),
             helper.make_node("Sigmoid", ["box_logit"], ["pred_boxes"], name="box_sigmoid")]
    inputs = [helper.make_tensor_value_info("queries", TensorProto.FLOAT, ["N", queries, width])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", queries, classes]),
               helper.make_tensor_value_info("pred_boxes", TensorProto.FLOAT, ["N", queries, 4])]
    inits = [_init("wc", rng.normal(0, 1, (width, classes)).astype(np.float32)),
             _init("wb", rng.normal(0, 1, (width, 4)).astype(np.float32)),
             _init("bb", rng.normal(0, 1, (4,)).astype(np.float32))]
    return _model(nodes, inputs, outputs, inits, "detr_head")


def residual_net(seed: int = 0, channels: int = 8, size: int = 16) -> onnx.ModelProto:
    """ResNet-style block: stem Conv+Relu, then Conv+Relu -> Conv -> Add(skip) -> Relu, depthwise Conv, pool, Gemm."""
    rng = np.random.default_rng(seed)
    c = channels
    w = {
        "w0": rng.normal(0, 0.3, (c, 3, 3, 3)), "b0": rng.normal(0, 0.1, (c,)),
        "w1": rng.normal(0, 0.2, (c, c, 3, 3)), "b1": rng.normal(0, 0.1, (c,)),
        "w2": rng.normal(0, 0.2, (c, c, 3, 3)), "b2": rng.normal(0, 0.1, (c,)),
        "wd": rng.normal(0, 0.3, (c, 1, 3, 3)), "bd": rng.normal(0, 0.1, (c,)),
        "wf": rng.normal(0, 0.3, (10, c)), "bf": rng.normal(0, 0.1, (10,)),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w0", "b0"], ["stem"], name="stem_conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["stem"], ["stem_relu"], name="stem_relu"),
        helper.make_node("Conv", ["stem_relu", "w1", "b1"], ["c1"], name="block_conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="block_relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="block_conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "stem_relu"], ["sum"], name="block_add"),
        helper.make_node("Relu", ["sum"], ["r2"], name="block_relu2"),
        helper.make_node("Conv", ["r2", "wd", "bd"], ["dw"], name="dw_conv", pads=[1, 1, 1, 1], group=c),
        helper.make_node("Clip", ["dw", "clip_min", "clip_max"], ["dw_relu6"], name="dw_relu6"),
        helper.make_node("GlobalAveragePool", ["dw_relu6"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])]
    inits = [_init(k, v.astype(np.float32)) for k, v in w.items()]
    inits += [_init("clip_min", np.array(0.0, np.float32)), _init("clip_max", np.array(6.0, np.float32))]
    return _model(nodes, inputs, outputs, inits, "residual_net")


def concat_net(seed: int = 0, channels: int = 4, size: int = 8) -> onnx.ModelProto:
    """Two Conv branches concatenated then a Conv: concat inputs must share one scale."""
    rng = np.random.default_rng(seed)
    c = channels
    w = {
        "wa": rng.normal(0, 0.3, (c, 3, 1, 1)), "ba": rng.normal(0, 0.1, (c,)),
        "wb": rng.normal(0, 0.6, (c, 3, 3, 3)), "bb": rng.normal(0, 0.1, (c,)),
        "wc": rng.normal(0, 0.2, (c, 2 * c, 1, 1)), "bc": rng.normal(0, 0.1, (c,)),
    }
    nodes = [
        helper.make_node("Conv", ["input", "wa", "ba"], ["a"], name="branch_a"),
        helper.make_node("Conv", ["input", "wb", "bb"], ["b"], name="branch_b", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "wc", "bc"], ["out"], name="fuse_conv"),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", c, size, size])]
    inits = [_init(k, v.astype(np.float32)) for k, v in w.items()]
    return _model(nodes, inputs, outputs, inits, "concat_net")


def mlp_attention(seed: int = 0, seq: int = 8, hidden: int = 16) -> onnx.ModelProto:
    """Transformer-ish: MatMul projections, additive attention mask at float32.min, Softmax, MatMul.

    Inputs: x[N,seq,hidden] float32, mask[N,1,seq] float32 (0 or float32.min, as HF models do).
    """
    rng = np.random.default_rng(seed)
    h = hidden
    w = {
        "wq": rng.normal(0, 0.3, (h, h)), "wk": rng.normal(0, 0.3, (h, h)),
        "wv": rng.normal(0, 0.3, (h, h)), "wo": rng.normal(0, 0.3, (h, h)), "bo": rng.normal(0, 0.1, (h,)),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], name="k_transpose", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        helper.make_node("Add", ["scores", "mask"], ["masked"], name="add_mask"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="attn_v"),
        helper.make_node("MatMul", ["ctx", "wo"], ["o"], name="o_proj"),
        helper.make_node("Add", ["o", "bo"], ["out"], name="o_bias"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, h]),
        helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1, seq]),
    ]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", seq, h])]
    inits = [_init(k, v.astype(np.float32)) for k, v in w.items()]
    return _model(nodes, inputs, outputs, inits, "mlp_attention")


def outlier_channel_net(seed: int = 0, channels: int = 8, size: int = 16, outlier_gain: float = 200.0) -> onnx.ModelProto:
    """Like ``residual_net`` but one channel of ``block_conv1`` has a huge outlier gain.

    Per-tensor INT8 of that conv's output crushes every other channel, so the
    sensitive fusion group is known by construction: the one holding ``block_conv2``
    (which reads the outlier tensor) and ``block_conv1``'s output range.
    """
    model = residual_net(seed, channels, size)
    for init in model.graph.initializer:
        if init.name == "w1":
            w1 = numpy_helper.to_array(init).copy()
            w1[0] *= outlier_gain
            init.CopyFrom(_init("w1", w1))
    model.graph.name = "outlier_channel_net"
    return model


def unet_block(seed: int = 0, channels: int = 8, size: int = 16) -> onnx.ModelProto:
    """Encoder/decoder block: Conv -> BatchNorm -> swish (x*sigmoid(x)), MaxPool, Conv -> LeakyRelu,
    ConvTranspose (stride 2) -> Relu and a nearest Resize, Concat of three branches, 1x1 Conv.

    Exercises ops the other models lack; Resize's ``scales`` input must stay float32 in fp16 models.
    """
    rng = np.random.default_rng(seed)
    c = channels
    w = {
        "w0": rng.normal(0, 0.3, (c, 3, 3, 3)), "bn_scale": rng.uniform(0.5, 1.5, (c,)),
        "bn_bias": rng.normal(0, 0.1, (c,)), "bn_mean": rng.normal(0, 0.1, (c,)),
        "bn_var": rng.uniform(0.5, 1.5, (c,)),
        "w1": rng.normal(0, 0.2, (c, c, 3, 3)), "b1": rng.normal(0, 0.1, (c,)),
        "wt": rng.normal(0, 0.3, (c, c, 2, 2)), "bt": rng.normal(0, 0.1, (c,)),
        "w2": rng.normal(0, 0.2, (c // 2, 3 * c, 1, 1)), "b2": rng.normal(0, 0.1, (c // 2,)),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w0"], ["c0"], name="enc_conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c0", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn0"],
                         name="enc_bn"),
        helper.make_node("Sigmoid", ["bn0"], ["sig0"], name="enc_sigmoid"),
        helper.make_node("Mul", ["bn0", "sig0"], ["enc"], name="enc_swish"),
        helper.make_node("MaxPool", ["enc"], ["down"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["down", "w1", "b1"], ["c1"], name="mid_conv", pads=[1, 1, 1, 1]),
        helper.make_node("LeakyRelu", ["c1"], ["mid"], name="mid_leaky", alpha=0.1),
        helper.make_node("ConvTranspose", ["mid", "wt", "bt"], ["up"], name="up_deconv", strides=[2, 2]),
        helper.make_node("Relu", ["up"], ["up_relu"], name="up_relu"),
        helper.make_node("Resize", ["mid", "", "resize_scales"], ["resized"], name="resize", mode="nearest"),
        helper.make_node("Concat", ["enc", "up_relu", "resized"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "w2", "b2"], ["out"], name="head_conv"),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", c // 2, size, size])]
    inits = [_init(k, v.astype(np.float32)) for k, v in w.items()]
    inits.append(_init("resize_scales", np.array([1, 1, 2, 2], np.float32)))
    return _model(nodes, inputs, outputs, inits, "unet_block")


def random_inputs(model: onnx.ModelProto, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic float feeds for every graph input (masks get 0 / float32.min)."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in inp.type.tensor_type.shape.dim]
        if inp.name == "mask":
            m = np.zeros(dims, np.float32)
            m[..., -2:] = np.finfo(np.float32).min
            feeds[inp.name] = m
        else:
            feeds[inp.name] = rng.normal(0, 1, dims).astype(np.float32)
    return feeds



def batch_factory(feeds: dict[str, np.ndarray], size: int) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
    """A ``batches()`` factory (what collect_statistics takes) cutting ``feeds`` into batches of ``size`` on axis 0."""
    n = next(iter(feeds.values())).shape[0]
    return lambda: ({k: v[i:i + size] for k, v in feeds.items()} for i in range(0, n, size))

ALL_BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "conv_net": conv_net,
    "residual_net": residual_net,
    "concat_net": concat_net,
    "mlp_attention": mlp_attention,
    "outlier_channel_net": outlier_channel_net,
    "unet_block": unet_block,
}


def sensitive_chain_net(seed: int = 0, depth: int = 10, channels: int = 8, size: int = 8, sensitive: int = 6,
                        decoy: int = 2, gain: float = 100.0, decoy_gain: float = 1000.0,
                        decoy_scale: float = 0.01) -> onnx.ModelProto:
    """A chain of ``depth`` Conv+Relu groups where exactly one group is sensitive to INT8, and a decoy.

    ``conv{sensitive-1}`` emits channel 0 ``gain`` times larger than the others and
    ``conv{sensitive}`` divides its weights for that channel by ``gain``: the FP32 function
    is unchanged, but a per-tensor INT8 scale on ``conv{sensitive}``'s input crushes the other
    channels, so pinning the group ``conv{sensitive}`` alone restores the accuracy (the
    sensitive group is known by construction).

    The decoy: after ``relu{decoy}`` a side branch ``side_a`` (1x1, channel 0 x
    ``decoy_gain``) -> ``side_b`` (1x1, compensating) is scaled by ``decoy_scale`` (a
    stand-alone Mul) and added into ``conv{decoy+1}`` (a fused residual Add). ``side_b``'s
    local INT8 error is the worst of the model, yet it barely changes the output: a local
    ranking alone puts it first, measuring pins shows it does not matter.
    """
    rng = np.random.default_rng(seed)
    c = channels
    nodes, inits = [], []
    x = "input"
    for i in range(depth):
        cin = 3 if i == 0 else c
        w = rng.normal(0, np.sqrt(2.0 / (cin * 9)), (c, cin, 3, 3))
        b = rng.normal(0, 0.05, (c,))
        if i == sensitive - 1:
            w[0] *= gain
            b[0] = abs(b[0]) * gain
        if i == sensitive:
            w[:, 0] /= gain
        inits += [_init(f"w{i}", w.astype(np.float32)), _init(f"b{i}", b.astype(np.float32))]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        pre = f"c{i}"
        if i == decoy + 1:
            nodes.append(helper.make_node("Add", [pre, "side_scaled"], [f"s{i}"], name=f"add{i}"))
            pre = f"s{i}"
        nodes.append(helper.make_node("Relu", [pre], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
        if i == decoy:
            wa = rng.normal(0, np.sqrt(2.0 / c), (c, c, 1, 1))
            wa[0] *= decoy_gain
            wb = rng.normal(0, np.sqrt(2.0 / c), (c, c, 1, 1))
            wb[:, 0] /= decoy_gain
            inits += [_init("side_wa", wa.astype(np.float32)), _init("side_wb", wb.astype(np.float32)),
                      _init("side_k", np.array(decoy_scale, np.float32))]
            nodes += [
                helper.make_node("Conv", [x, "side_wa"], ["side_a"], name="side_a"),
                helper.make_node("Relu", ["side_a"], ["side_ar"], name="side_a_relu"),
                helper.make_node("Conv", ["side_ar", "side_wb"], ["side_b"], name="side_b"),
                helper.make_node("Mul", ["side_b", "side_k"], ["side_scaled"], name="side_scale"),
            ]
    wf = rng.normal(0, 0.5, (10, c))
    bf = rng.normal(0, 0.1, (10,))
    inits += [_init("wf", wf.astype(np.float32)), _init("bf", bf.astype(np.float32))]
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])]
    return _model(nodes, inputs, outputs, inits, "sensitive_chain_net")


ALL_BUILDERS["sensitive_chain_net"] = sensitive_chain_net


def relu_net(shape: list[int | str], elem_type: int = TensorProto.FLOAT, name: str = "relu_net") -> onnx.ModelProto:
    """input[shape] -> Relu -> out[shape]: the smallest model with a given input shape (e.g. a dim of 10**12).

    Integer element types get Abs instead of Relu (Relu takes integers only from opset 14 on
    and int64 Abs is what an index pipeline would hold): no float tensor anywhere.
    """
    op = "Relu" if elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16) else "Abs"
    nodes = [helper.make_node(op, ["input"], ["out"], name="act")]
    inputs = [helper.make_tensor_value_info("input", elem_type, shape)]
    outputs = [helper.make_tensor_value_info("out", elem_type, shape)]
    return _model(nodes, inputs, outputs, [], name)


def duplicate_names_net() -> onnx.ModelProto:
    """input[N,4] -> Relu 'dup' -> Relu 'dup' -> out: two nodes share a name (the ONNX checker allows it)."""
    nodes = [helper.make_node("Relu", ["input"], ["a"], name="dup"),
             helper.make_node("Relu", ["a"], ["out"], name="dup")]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])]
    return _model(nodes, inputs, outputs, [], "duplicate_names_net")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@contextlib.contextmanager
def permissions_enforced() -> Iterator[None]:
    """Make file permissions apply in the block, even when the tests run as root (not a model builder).

    Root reads a mode-000 file through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH;
    clearing those two from this thread's effective set (Linux capset) leaves
    root an ordinary owner, so ``open`` raises a real EACCES. Restored after.
    Other users need nothing: the block runs as is.
    """
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    saved = data[0].effective
    data[0].effective &= ~((1 << 1) | (1 << 2))  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    try:
        yield
    finally:
        data[0].effective = saved
        libc.capset(ctypes.byref(header), data)


def text_recognizer(seed: int = 0, channels: int = 8, height: int = 48, classes: int = 12) -> onnx.ModelProto:
    """A CRNN-style text-line recognizer with a dynamic width: image[N,3,48,W] -> logits[N,W/4,classes].

    Conv(stride 2) -> Relu -> Conv -> Relu -> MaxPool(4x2) gives [N, C, 6, W/4]; the
    sequence reshape's target is computed from the input's shape as exporters trace it,
    ``[N, C*6, (W+3)//4]``, which equals the pooled width for every W that is a multiple
    of 4 (real text lines) but not for W < 4: at W = 1 the pool is empty and the reshape
    asks for volume 0 -> N*C*6 ("reshape would change volume 0 to 48"), the failure of an
    engine profile that puts a dynamic width at 1. Then Transpose -> MatMul per time step.
    Not in ALL_BUILDERS: its width must be a multiple of 4 (random_inputs would give W = N).
    """
    rng = np.random.default_rng(seed)
    c = channels
    feat = c * (height // 8)
    w = {"w1": rng.normal(0, 0.3, (c, 3, 3, 3)), "b1": rng.normal(0, 0.1, (c,)),
         "w2": rng.normal(0, 0.2, (c, c, 3, 3)), "b2": rng.normal(0, 0.1, (c,)),
         "wf": rng.normal(0, 0.2, (feat, classes))}
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["pooled"], name="pool", kernel_shape=[4, 2], strides=[4, 2]),
        helper.make_node("Shape", ["image"], ["image_shape"], name="image_shape"),
        helper.make_node("Gather", ["image_shape", "axis0"], ["n"], name="batch_dim", axis=0),
        helper.make_node("Gather", ["image_shape", "axis3"], ["width"], name="width_dim", axis=0),
        helper.make_node("Add", ["width", "three"], ["width3"], name="width_plus_3"),
        helper.make_node("Div", ["width3", "four"], ["steps_count"], name="steps_ceil"),
        helper.make_node("Concat", ["n", "feat", "steps_count"], ["seq_shape"], name="seq_shape", axis=0),
        helper.make_node("Reshape", ["pooled", "seq_shape"], ["seq"], name="to_sequence"),
        helper.make_node("Transpose", ["seq"], ["steps"], name="time_major", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["steps", "wf"], ["logits"], name="classifier"),
    ]
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, height, "W"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "T", classes])]
    inits = [_init(k, v.astype(np.float32)) for k, v in w.items()]
    inits += [_init(k, np.array([v], np.int64)) for k, v in
              [("axis0", 0), ("axis3", 3), ("three", 3), ("four", 4), ("feat", feat)]]
    return _model(nodes, inputs, outputs, inits, "text_recognizer")


def text_detector(seed: int = 0, channels: int = 8) -> onnx.ModelProto:
    """A DBNet-style text detector with a dynamic image size: image[N,3,H,W] -> probability map[N,1,H,W].

    Conv(stride 2) -> Relu -> Conv -> Relu -> 1x1 Conv (one channel, a negative bias: most pixels are
    background) -> Resize x2 -> Sigmoid. H and W must be even.
    """
    rng = np.random.default_rng(seed)
    c = channels
    w = {"w1": rng.normal(0, 0.4, (c, 3, 3, 3)), "b1": rng.normal(0, 0.1, (c,)),
         "w2": rng.normal(0, 0.3, (c, c, 3, 3)), "b2": rng.normal(0, 0.1, (c,)),
         "w3": rng.normal(0, 0.6, (1, c, 1, 1)), "b3": np.array([-3.0])}
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["binarize"], name="binarize"),
        helper.make_node("Resize", ["binarize", "", "scales"], ["upsampled"], name="upsample", mode="linear"),
        helper.make_node("Sigmoid", ["upsampled"], ["maps"], name="probability"),
    ]
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])]
    outputs = [helper.make_tensor_value_info("maps", TensorProto.FLOAT, ["N", 1, "H", "W"])]
    inits = [_init(k, v.astype(np.float32)) for k, v in w.items()]
    inits.append(_init("scales", np.array([1, 1, 2, 2], np.float32)))
    return _model(nodes, inputs, outputs, inits, "text_detector")


def voice_activity(seed: int = 0, hidden: int = 128, chunk: int = 64, sample_rate: int = 16000) -> onnx.ModelProto:
    """A Silero-style voice-activity model: weights per sample rate inside an ``If``, a recurrent state.

    Inputs: ``input[N, chunk]`` audio, ``state[2, N, hidden]`` (batch on axis 1: h and c of
    the previous chunk) and ``sr``, a scalar int64 given here as an initializer (the sample
    rate the data always has). ``If(sr == 16000)`` holds the 16 kHz encoder in its then
    branch and the 8 kHz one in its else branch, each ``MatMul(Constant W) -> Add(Constant b)
    -> Relu`` reading the outer ``input``. Then ``h = Tanh(enc @ Wx + h_prev @ Wh)``,
    ``c = Sigmoid(h) * c_prev + h``, ``stateN = [h; c]`` and ``prob = Sigmoid(h @ Wo)``.
    Not in ALL_BUILDERS: ``state`` does not have its batch on axis 0.
    """
    rng = np.random.default_rng(seed)

    def branch(tag: str, scale: float) -> onnx.GraphProto:
        w = (rng.normal(0, scale, (chunk, hidden))).astype(np.float32)
        b = rng.normal(0, 0.1, (hidden,)).astype(np.float32)
        nodes = [
            helper.make_node("Constant", [], [f"w_{tag}"], name=f"w_{tag}", value=numpy_helper.from_array(w)),
            helper.make_node("Constant", [], [f"b_{tag}"], name=f"b_{tag}", value=numpy_helper.from_array(b)),
            helper.make_node("MatMul", ["input", f"w_{tag}"], [f"mm_{tag}"], name=f"encoder_{tag}"),
            helper.make_node("Add", [f"mm_{tag}", f"b_{tag}"], [f"pre_{tag}"], name=f"encoder_bias_{tag}"),
            helper.make_node("Relu", [f"pre_{tag}"], [f"enc_{tag}"], name=f"encoder_relu_{tag}"),
        ]
        out = helper.make_tensor_value_info(f"enc_{tag}", TensorProto.FLOAT, ["N", hidden])
        return helper.make_graph(nodes, f"encoder_{tag}", [], [out])

    then_branch, else_branch = branch("16k", 0.2), branch("8k", 0.3)
    w = {"wx": rng.normal(0, 0.1, (hidden, hidden)), "wh": rng.normal(0, 0.1, (hidden, hidden)),
         "wo": rng.normal(0, 0.2, (hidden, 1))}
    nodes = [
        helper.make_node("Equal", ["sr", "sr_16k"], ["is_16k"], name="is_16k"),
        helper.make_node("If", ["is_16k"], ["enc"], name="by_sample_rate",
                         then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Gather", ["state", "zero"], ["h_prev"], name="h_prev", axis=0),
        helper.make_node("Gather", ["state", "one"], ["c_prev"], name="c_prev", axis=0),
        helper.make_node("MatMul", ["enc", "wx"], ["xh"], name="input_gate"),
        helper.make_node("MatMul", ["h_prev", "wh"], ["hh"], name="recurrent_gate"),
        helper.make_node("Add", ["xh", "hh"], ["gates"], name="gates"),
        helper.make_node("Tanh", ["gates"], ["h"], name="h"),
        helper.make_node("Sigmoid", ["h"], ["keep"], name="keep"),
        helper.make_node("Mul", ["keep", "c_prev"], ["kept"], name="kept"),
        helper.make_node("Add", ["kept", "h"], ["c"], name="c"),
        helper.make_node("Unsqueeze", ["h", "axis0"], ["h1"], name="h_unsqueeze"),
        helper.make_node("Unsqueeze", ["c", "axis0"], ["c1"], name="c_unsqueeze"),
        helper.make_node("Concat", ["h1", "c1"], ["stateN"], name="stateN", axis=0),
        helper.make_node("MatMul", ["h", "wo"], ["logit"], name="head"),
        helper.make_node("Sigmoid", ["logit"], ["prob"], name="prob"),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", chunk]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", hidden]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, [])]
    outputs = [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 1]),
               helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "N", hidden])]
    inits = [_init(k, v.astype(np.float32)) for k, v in w.items()]
    scalars = {"sr": sample_rate, "sr_16k": 16000, "zero": 0, "one": 1}  # 0-d: not through _init (makes 1-d)
    inits += [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in scalars.items()]
    inits.append(_init("axis0", np.array([0], np.int64)))
    return _model(nodes, inputs, outputs, inits, "voice_activity")


def refinement_loop(seed: int = 0, width: int = 16, trips: int = 3) -> onnx.ModelProto:
    """A ``Loop`` with a static trip count: ``h = Tanh(h @ W + x)`` ``trips`` times, each step also scanned out.

    input[N, width] -> Loop(M=trips initializer, cond=true; body: h -> MatMul(Constant W) -> Add(x, outer)
    -> Tanh -> h', scan Relu(h')) -> refined[N, width], steps[trips, N, width]. The body's
    continue condition passes its input through (Identity), as exporters write for-loops.
    """
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.4, (width, width)).astype(np.float32)
    body = _loop_body(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
         helper.make_node("Constant", [], ["w_step"], name="w_step", value=numpy_helper.from_array(w)),
         helper.make_node("MatMul", ["h_in", "w_step"], ["mixed"], name="mix"),
         helper.make_node("Add", ["mixed", "input"], ["pre"], name="add_input"),
         helper.make_node("Tanh", ["pre"], ["h_out"], name="tanh"),
         helper.make_node("Relu", ["h_out"], ["step"], name="step_relu")],
        "refine", ["N", width], scans=[("step", TensorProto.FLOAT, ["N", width])])
    nodes = [
        helper.make_node("Relu", ["input"], ["h0"], name="start"),
        helper.make_node("Loop", ["trips", "go", "h0"], ["refined", "steps"], name="refine", body=body),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])]
    outputs = [helper.make_tensor_value_info("refined", TensorProto.FLOAT, ["N", width]),
               helper.make_tensor_value_info("steps", TensorProto.FLOAT, [trips, "N", width])]
    inits = [numpy_helper.from_array(np.array(trips, np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "go")]
    return _model(nodes, inputs, outputs, inits, "refinement_loop")


def _until_still(tol: float) -> list[onnx.NodeProto]:
    """A while loop's continue condition: ``cond_out = ReduceMax|h_out - h_in| > tol`` (a state that still moves)."""
    return [helper.make_node("Sub", ["h_out", "h_in"], ["delta"], name="delta"),
            helper.make_node("Abs", ["delta"], ["moved"], name="moved"),
            helper.make_node("ReduceMax", ["moved"], ["change"], name="change", keepdims=0),
            helper.make_node("Constant", [], ["tol"], name="tol", value=numpy_helper.from_array(np.array(tol, np.float32))),
            helper.make_node("Greater", ["change", "tol"], ["cond_out"], name="not_converged")]


def scripted_while_loop(seed: int = 0, width: int = 4, limit: int = 5) -> onnx.ModelProto:
    """torch.jit.script's ``i = 0; ys = []; while i < limit and not bool(h.max() < -100): h = tanh(h @ W); i += 1;
    ys.append(h)`` then ``torch.stack(ys, 1)``, as torch writes it: trip count INT64_MAX, the ``and`` an If::

        x[N, 4] -> Loop(M=2**63-1; carried h, i, ys; body: h' = Tanh(h @ W), i' = i + 1,
                        cond = If(i' < limit, then: max(h') >= -100, else: False), ys' = SequenceInsert(ys, h'))
                -> ConcatFromSequence(ys, axis 1, new_axis 1) -> out[N, T, 4], h_last

    The data decides the condition (it never stops the loop), the counter bounds it at ``limit`` steps.
    """
    rng = np.random.default_rng(seed)
    seq_type = helper.make_tensor_sequence_value_info
    scalar_bool = [helper.make_tensor_value_info("/go_on", TensorProto.BOOL, [])]
    then_branch = helper.make_graph(
        [helper.make_node("ReduceMax", ["h_out"], ["/top"], name="/top", keepdims=0),
         helper.make_node("Less", ["/top", "floor"], ["/sunk"], name="/sunk"),
         helper.make_node("Not", ["/sunk"], ["/go_on"], name="/go_on")], "then", [], scalar_bool)
    else_branch = helper.make_graph([helper.make_node("Identity", ["/false"], ["/go_on"], name="/stop")], "else", [],
                                    scalar_bool)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "w"], ["/mixed"], name="/mix"),
         helper.make_node("Tanh", ["/mixed"], ["h_out"], name="/tanh"),
         helper.make_node("Add", ["i_in", "/one"], ["i_out"], name="/count"),
         helper.make_node("Less", ["i_out", "/limit"], ["/below"], name="/below"),
         helper.make_node("If", ["/below"], ["cond_out"], name="/and", then_branch=then_branch,
                          else_branch=else_branch),
         helper.make_node("SequenceInsert", ["ys_in", "h_out"], ["ys_out"], name="/append")],
        "body",
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["N", width]),
         helper.make_tensor_value_info("i_in", TensorProto.INT64, []),
         seq_type("ys_in", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["N", width]),
         helper.make_tensor_value_info("i_out", TensorProto.INT64, []),
         seq_type("ys_out", TensorProto.FLOAT, ["N", width])])
    nodes = [helper.make_node("SequenceEmpty", [], ["ys0"], name="/empty", dtype=TensorProto.FLOAT),
             helper.make_node("Loop", ["trips", "go", "x", "i0", "ys0"], ["h_last", "i_last", "ys"], name="/Loop",
                              body=body),
             helper.make_node("ConcatFromSequence", ["ys"], ["out"], name="/stack", axis=1, new_axis=1)]
    inits = [numpy_helper.from_array(np.array(2**63 - 1, np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "go"), numpy_helper.from_array(np.array(0, np.int64), "i0"),
             numpy_helper.from_array(rng.normal(0, 0.6, (width, width)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(-100.0, np.float32), "floor"),
             numpy_helper.from_array(np.array(1, np.int64), "/one"),
             numpy_helper.from_array(np.array(limit, np.int64), "/limit"),
             numpy_helper.from_array(np.array(False), "/false")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", "T", width]),
               helper.make_tensor_value_info("h_last", TensorProto.FLOAT, ["N", width])]
    return _model(nodes, inputs, outputs, inits, "scripted_while_loop")


def until_converged(seed: int = 0, width: int = 16, max_trips: int = 30, tol: float = 0.05) -> onnx.ModelProto:
    """A while loop: ``h = Tanh(h @ W + x)`` until no element moves by more than ``tol`` (at most ``max_trips``).

    input[N, width] -> MatMul(w0) -> Relu -> Loop(body: h -> MatMul(Constant W) -> Add(x0) -> Tanh -> h';
    continue while ReduceMax|h' - h| > tol; scan Relu(h') and ArgMax(h')) -> refined[N, width],
    steps[T, N, width], ids[T, N]. How many steps it takes depends on the values: an INT8 ``embed`` may
    take one more or one less than FP32, so ``steps`` and ``ids`` may have another length.
    """
    rng = np.random.default_rng(seed)
    body = _loop_body(
        [helper.make_node("Constant", [], ["w_step"], name="w_step",
                          value=numpy_helper.from_array(rng.normal(0, 0.25, (width, width)).astype(np.float32))),
         helper.make_node("MatMul", ["h_in", "w_step"], ["mixed"], name="mix"),
         helper.make_node("Add", ["mixed", "x0"], ["pre"], name="add_input"),
         helper.make_node("Tanh", ["pre"], ["h_out"], name="tanh"),
         *_until_still(tol),
         helper.make_node("ArgMax", ["h_out"], ["step_id"], name="step_id", axis=1, keepdims=0),
         helper.make_node("Relu", ["h_out"], ["step"], name="step_relu")],
        "refine", ["N", width], scans=[("step", TensorProto.FLOAT, ["N", width]), ("step_id", TensorProto.INT64, ["N"])])
    nodes = [helper.make_node("MatMul", ["input", "w0"], ["x0"], name="embed"),
             helper.make_node("Relu", ["x0"], ["h0"], name="start"),
             helper.make_node("Loop", ["trips", "go", "h0"], ["refined", "steps", "ids"], name="refine", body=body)]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])]
    outputs = [helper.make_tensor_value_info("refined", TensorProto.FLOAT, ["N", width]),
               helper.make_tensor_value_info("steps", TensorProto.FLOAT, ["T", "N", width]),
               helper.make_tensor_value_info("ids", TensorProto.INT64, ["T", "N"])]
    inits = [_init("w0", rng.normal(0, 0.5, (width, width)).astype(np.float32)),
             numpy_helper.from_array(np.array(max_trips, np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "go")]
    return _model(nodes, inputs, outputs, inits, "until_converged")


def loop_carrying_weights(seed: int = 0, width: int = 16, max_trips: int = 30, tol: float = 0.05) -> onnx.ModelProto:
    """:func:`until_converged` as paddle2onnx writes its loops: the step's weight ``w`` and bias ``b`` are
    initializers carried through the Loop, which its body returns unchanged (body output = body input), and the
    loop's final ``w`` is read after it (``head``) and is a graph output (``w_final``).

    input[N, width] -> MatMul(w0) -> Relu -> Loop(carried: w, b, h; body: h -> MatMul(w) -> Add(b) -> Tanh -> h';
    continue while ReduceMax|h' - h| > tol; scan Relu(h')) -> w_final, b_final, refined, steps[T, N, width];
    refined -> MatMul(w_final) -> head.
    """
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "w_in"], ["mixed"], name="mix"),
         helper.make_node("Add", ["mixed", "b_in"], ["pre"], name="add_bias"),
         helper.make_node("Tanh", ["pre"], ["h_out"], name="tanh"),
         *_until_still(tol),
         helper.make_node("Relu", ["h_out"], ["step"], name="step_relu")],
        "refine",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [width, width]),
         helper.make_tensor_value_info("b_in", TensorProto.FLOAT, [width]),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [width, width]),
         helper.make_tensor_value_info("b_in", TensorProto.FLOAT, [width]),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["N", width]),
         helper.make_tensor_value_info("step", TensorProto.FLOAT, ["N", width])])
    nodes = [helper.make_node("MatMul", ["input", "w0"], ["x0"], name="embed"),
             helper.make_node("Relu", ["x0"], ["h0"], name="start"),
             helper.make_node("Loop", ["trips", "go", "w", "b", "h0"], ["w_final", "b_final", "refined", "steps"],
                              name="refine", body=body),
             helper.make_node("MatMul", ["refined", "w_final"], ["head"], name="head")]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])]
    outputs = [helper.make_tensor_value_info("head", TensorProto.FLOAT, ["N", width]),
               helper.make_tensor_value_info("w_final", TensorProto.FLOAT, [width, width]),
               helper.make_tensor_value_info("steps", TensorProto.FLOAT, ["T", "N", width])]
    inits = [_init("w0", rng.normal(0, 0.5, (width, width)).astype(np.float32)),
             _init("w", rng.normal(0, 0.25, (width, width)).astype(np.float32)),
             _init("b", rng.normal(0, 0.1, (width,)).astype(np.float32)),
             numpy_helper.from_array(np.array(max_trips, np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "go")]
    return _model(nodes, inputs, outputs, inits, "loop_carrying_weights")


def sdpa_block(seed: int = 0, hidden: int = 32, heads: int = 4) -> onnx.ModelProto:
    """A transformer block as torch's dynamo exporter writes it at opset 23: ONNX ``Attention`` and
    ``RMSNormalization`` ops. x[N, S, hidden] -> MatMul q/k/v -> Attention -> MatMul -> Add x -> RMSNorm -> y."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
        helper.make_node("Attention", ["q", "k", "v"], ["a"], name="sdpa", q_num_heads=heads, kv_num_heads=heads),
        helper.make_node("MatMul", ["a", "wo"], ["o"], name="o_proj"),
        helper.make_node("Add", ["o", "x"], ["res"], name="residual"),
        helper.make_node("RMSNormalization", ["res", "g"], ["y"], name="norm", axis=-1),
    ]
    inits = [_init(n, rng.normal(0, 0.2, (hidden, hidden)).astype(np.float32)) for n in ("wq", "wk", "wv", "wo")]
    inits.append(_init("g", np.ones(hidden, np.float32)))
    graph = helper.make_graph(nodes, "sdpa_block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def dynamic_attention(seed: int = 0, hidden: int = 16, heads: int = 2) -> onnx.ModelProto:
    """A transformer attention block with a dynamic sequence length and an additive mask.

    Inputs: ``x[N, S, hidden]`` float32 and ``mask[N, S]`` float32, additive (0 on tokens,
    a large negative value on padding, as ``[pad] mask_values = [0.0, -1e9]`` makes it).
    Heads are split with ``Reshape [0, 0, heads, hidden/heads]`` (0 copies N and S, as
    exporters write it), scores ``q k^T / sqrt(d) + mask[:, None, None, :]``, Softmax,
    heads merged with ``Reshape [0, 0, hidden]``, output projection and a residual Add.
    Not in ALL_BUILDERS: its mask must be 0 / -1e9, not random.
    """
    rng = np.random.default_rng(seed)
    h, d = hidden, hidden // heads
    w = {k: rng.normal(0, 0.3, (h, h)) for k in ("wq", "wk", "wv", "wo")}
    w["bo"] = rng.normal(0, 0.1, (h,))
    w["scale"] = np.array(1 / np.sqrt(d))
    nodes = [
        helper.make_node("Unsqueeze", ["mask", "mask_axes"], ["mask4"], name="mask_unsqueeze"),
        *[helper.make_node("MatMul", ["x", f"w{t}"], [t], name=f"{t}_proj") for t in ("q", "k", "v")],
        *[helper.make_node("Reshape", [t, "split_shape"], [f"{t}_heads"], name=f"{t}_split") for t in ("q", "k", "v")],
        helper.make_node("Transpose", ["q_heads"], ["qh"], name="q_transpose", perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k_heads"], ["kt"], name="k_transpose", perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v_heads"], ["vh"], name="v_transpose", perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qh", "kt"], ["scores"], name="qk"),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scale_scores"),
        helper.make_node("Add", ["scaled", "mask4"], ["masked"], name="add_mask"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "vh"], ["ctx_heads"], name="attn_v"),
        helper.make_node("Transpose", ["ctx_heads"], ["ctx_t"], name="ctx_transpose", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["ctx"], name="merge_heads"),
        helper.make_node("MatMul", ["ctx", "wo"], ["o"], name="o_proj"),
        helper.make_node("Add", ["o", "bo"], ["ob"], name="o_bias"),
        helper.make_node("Add", ["ob", "x"], ["out"], name="residual"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", h]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", "S"])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", "S", h])]
    inits = [_init(k, v.astype(np.float32)) for k, v in w.items()]
    inits += [_init("mask_axes", np.array([1, 2], np.int64)), _init("split_shape", np.array([0, 0, heads, d], np.int64)),
              _init("merge_shape", np.array([0, 0, h], np.int64))]
    return _model(nodes, inputs, outputs, inits, "dynamic_attention")


def hardsigmoid_detector(seed: int = 0, channels: int = 8) -> onnx.ModelProto:
    """An OCR-detector-style head whose HardSigmoid piles its outputs at exactly 1.0 (and 0.0).

    image[N, 3, H, W] (dynamic H, W) -> Conv -> Relu -> Conv (gain 4) -> HardSigmoid(alpha 0.2,
    beta 0.5) 'gate' -> Mul with the features -> Conv 1x1 -> Sigmoid 'prob' [N, 1, H, W].
    With inputs in [-1, 1] most gate values sit on the plateaus at 0 and 1: the spike a
    threshold must not be pinned by.
    """
    rng = np.random.default_rng(seed)
    c = channels
    w = {"w1": rng.normal(0, 0.4, (c, 3, 3, 3)), "b1": rng.normal(0, 0.1, (c,)),
         "w2": rng.normal(0, 4 * 0.4, (c, c, 3, 3)), "b2": rng.normal(0, 1.0, (c,)),
         "w3": rng.normal(0, 0.3, (1, c, 1, 1)), "b3": rng.normal(0, 0.1, (1,))}
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("HardSigmoid", ["c2"], ["gate"], name="gate", alpha=0.2, beta=0.5),
        helper.make_node("Mul", ["r1", "gate"], ["gated"], name="gated"),
        helper.make_node("Conv", ["gated", "w3", "b3"], ["logit"], name="head"),
        helper.make_node("Sigmoid", ["logit"], ["prob"], name="prob"),
    ]
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])]
    outputs = [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 1, "H", "W"])]
    inits = [_init(k, v.astype(np.float32)) for k, v in w.items()]
    return _model(nodes, inputs, outputs, inits, "hardsigmoid_detector")


def hardsigmoid_plateau_net(seed: int = 0, channels: int = 8, size: int = 16) -> onnx.ModelProto:
    """A squeeze-excite gate whose HardSigmoid output piles up at exactly 1.0 (a saturation plateau at the top).

    input[N,3,H,W] -> Conv -> HardSwish -> GlobalAveragePool -> Conv(1x1, bias +4) -> HardSigmoid -> gate[N,C,1,1];
    Mul(features, gate) -> Conv -> HardSigmoid -> out. The gate's pre-activation is mostly above 2.5
    (HardSigmoid(x) = clip(0.2 x + 0.5, 0, 1)), so ~90 % of the gate values are exactly 1.0, the
    rest spread below it; the last HardSigmoid has a plateau at 1.0 (~15 %) and one at 0.
    """
    rng = np.random.default_rng(seed)
    c = channels
    w = {"w1": rng.normal(0, 0.4, (c, 3, 3, 3)), "b1": rng.normal(0, 0.1, (c,)),
         "ws": rng.normal(0, 0.3, (c, c, 1, 1)), "bs": np.full((c,), 4.0) + rng.normal(0, 0.3, (c,)),
         "w2": rng.normal(0, 0.5, (c, c, 3, 3)), "b2": rng.normal(1.0, 0.3, (c,))}
    w["bs"][0] = 0.0  # one gate channel stays in the linear part: the plateau is not the whole tensor
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c1"], ["features"], name="hswish1"),
        helper.make_node("GlobalAveragePool", ["features"], ["squeezed"], name="squeeze"),
        helper.make_node("Conv", ["squeezed", "ws", "bs"], ["excite"], name="excite"),
        helper.make_node("HardSigmoid", ["excite"], ["gate"], name="gate", alpha=0.2, beta=0.5),
        helper.make_node("Mul", ["features", "gate"], ["gated"], name="scale"),
        helper.make_node("Conv", ["gated", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("HardSigmoid", ["c2"], ["out"], name="head", alpha=0.2, beta=0.5),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", c, size, size])]
    inits = [_init(k, v.astype(np.float32)) for k, v in w.items()]
    return _model(nodes, inputs, outputs, inits, "hardsigmoid_plateau_net")


def layernorm_decomposed_net(seed: int = 0, seq: int = 8, hidden: int = 32) -> onnx.ModelProto:
    """LayerNorm as exporters write it before opset 17, between two MatMuls::

        x[N,seq,hidden] -> MatMul -> h -> ReduceMean(-1) -> mean ─┐
                                     h ───────────────────────> Sub -> d -> Pow 2 -> ReduceMean(-1) -> var
                                     var -> Add eps -> Sqrt -> std ;  d / std -> Mul gamma -> Add beta -> MatMul

    ``mean``, ``var`` and ``std`` hold one value per token (N * seq values), near-constant:
    the tensors whose entropy range fell below every value they hold.
    """
    rng = np.random.default_rng(seed)
    h = hidden
    w = {"w_in": rng.normal(0, 0.5, (h, h)) + 0.3, "gamma": rng.normal(1.0, 0.1, (h,)),
         "beta": rng.normal(0, 0.1, (h,)), "w_out": rng.normal(0, 0.3, (h, h)),
         "two": np.array(2.0), "eps": np.array(1e-5)}
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["h"], name="proj_in"),
        helper.make_node("ReduceMean", ["h"], ["mean"], name="ln_mean", axes=[-1], keepdims=1),
        helper.make_node("Sub", ["h", "mean"], ["d"], name="ln_sub"),
        helper.make_node("Pow", ["d", "two"], ["sq"], name="ln_pow"),
        helper.make_node("ReduceMean", ["sq"], ["var"], name="ln_var", axes=[-1], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="ln_add_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="ln_sqrt"),
        helper.make_node("Div", ["d", "std"], ["normed"], name="ln_div"),
        helper.make_node("Mul", ["normed", "gamma"], ["scaled"], name="ln_gamma"),
        helper.make_node("Add", ["scaled", "beta"], ["ln"], name="ln_beta"),
        helper.make_node("MatMul", ["ln", "w_out"], ["out"], name="proj_out"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, h])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", seq, h])]
    inits = [_init(k, v.astype(np.float32)) for k, v in w.items()]
    return _model(nodes, inputs, outputs, inits, "layernorm_decomposed_net")


def sparse_tail_residual_net(seed: int = 0, seq: int = 16, hidden: int = 64, jump: float = 180.0,
                             shift: float = 3.5) -> onnx.ModelProto:
    """A residual stream with a sparse tail far from its bulk (a transformer's "massive activations")::

        x[N,seq,hidden] -> Mul 3 ---------------------------------------------> bulk (|x| < 14) ─┐
        x -> MatMul -> Sub shift -> Relu -> on ─> Sign -> Mul jump ─┐                            Add -> stream -> MatMul
                                               └> Mul 20 ───────────Add -> rare (0, or jump..jump+30) ┘

    About 0.02 % of the stream's elements (shift 3.5 standard deviations) sit at 180-210, nothing
    between the bulk and them (one token's outlier dimensions in a real encoder are rarer still): the
    residual-stream Add of the issue, where unsmoothed entropy put amax next to the absolute maximum.
    """
    rng = np.random.default_rng(seed)
    h = hidden
    w = {"w_gate": rng.normal(0, 1.0 / np.sqrt(h), (h, h)), "w_out": rng.normal(0, 0.2, (h, h)),
         "three": np.array(3.0), "shift": np.array(shift), "jump": np.array(jump),
         "twenty": np.array(20.0)}
    nodes = [
        helper.make_node("Mul", ["x", "three"], ["bulk"], name="bulk_scale"),
        helper.make_node("MatMul", ["x", "w_gate"], ["g"], name="gate_proj"),
        helper.make_node("Sub", ["g", "shift"], ["g3"], name="gate_shift"),
        helper.make_node("Relu", ["g3"], ["on"], name="gate_relu"),
        helper.make_node("Sign", ["on"], ["step"], name="gate_step"),
        helper.make_node("Mul", ["step", "jump"], ["jumped"], name="gate_jump"),
        helper.make_node("Mul", ["on", "twenty"], ["ramp"], name="gate_ramp"),
        helper.make_node("Add", ["jumped", "ramp"], ["rare"], name="rare_values"),
        helper.make_node("Add", ["bulk", "rare"], ["stream"], name="residual_add"),
        helper.make_node("MatMul", ["stream", "w_out"], ["out"], name="proj_out"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, h])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", seq, h])]
    inits = [_init(k, np.asarray(v, np.float32)) for k, v in w.items()]
    return _model(nodes, inputs, outputs, inits, "sparse_tail_residual_net")


def depthwise_separable_net(seed: int = 0, channels: int = 8, size: int = 12, spread: float = 30.0) -> onnx.ModelProto:
    """MobileNet-style blocks whose weight channels differ in range by up to ``spread``x (planted for CLE).

    input[N,3,H,W] -> stem Conv 3x3 -> Clip(0,6) -> depthwise 3x3 -> Relu -> pointwise 1x1 (2C)
    -> Clip(0,6) -> depthwise 3x3 -> Clip(0,6) -> project 1x1 (C, linear) -> GlobalAveragePool
    -> Flatten -> Gemm -> logits[N,10]. Every conv has a bias. Each conv's output channels are
    multiplied by log-uniform gains in [1/sqrt(spread), sqrt(spread)], so one per-tensor weight
    scale fits some channels badly: the case cross-layer equalization repairs.
    """
    rng = np.random.default_rng(seed)
    c = channels

    def gains(n: int) -> np.ndarray:
        return np.exp(rng.uniform(-0.5, 0.5, n) * np.log(spread))

    def conv_w(out: int, inp: int, k: int, std: float) -> np.ndarray:
        return (rng.normal(0, std, (out, inp, k, k)) * gains(out)[:, None, None, None]).astype(np.float32)

    w = {
        "stem_w": conv_w(c, 3, 3, 0.3), "stem_b": rng.normal(0, 0.1, c),
        "dw1_w": conv_w(c, 1, 3, 0.4), "dw1_b": rng.normal(0, 0.1, c),
        "pw1_w": conv_w(2 * c, c, 1, 0.3), "pw1_b": rng.normal(0, 0.1, 2 * c),
        "dw2_w": conv_w(2 * c, 1, 3, 0.4), "dw2_b": rng.normal(0, 0.1, 2 * c),
        "proj_w": conv_w(c, 2 * c, 1, 0.3), "proj_b": rng.normal(0, 0.1, c),
        "fc_w": rng.normal(0, 0.3, (10, c)), "fc_b": rng.normal(0, 0.1, 10),
        "zero": np.array(0.0), "six": np.array(6.0),
    }
    nodes = [
        helper.make_node("Conv", ["input", "stem_w", "stem_b"], ["stem"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["stem", "zero", "six"], ["stem_act"], name="stem_relu6"),
        helper.make_node("Conv", ["stem_act", "dw1_w", "dw1_b"], ["dw1"], name="dw1", pads=[1, 1, 1, 1], group=c),
        helper.make_node("Relu", ["dw1"], ["dw1_act"], name="dw1_relu"),
        helper.make_node("Conv", ["dw1_act", "pw1_w", "pw1_b"], ["pw1"], name="pw1"),
        helper.make_node("Clip", ["pw1", "zero", "six"], ["pw1_act"], name="pw1_relu6"),
        helper.make_node("Conv", ["pw1_act", "dw2_w", "dw2_b"], ["dw2"], name="dw2", pads=[1, 1, 1, 1],
                         group=2 * c),
        helper.make_node("Clip", ["dw2", "zero", "six"], ["dw2_act"], name="dw2_relu6"),
        helper.make_node("Conv", ["dw2_act", "proj_w", "proj_b"], ["proj"], name="proj"),
        helper.make_node("GlobalAveragePool", ["proj"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])]
    inits = [_init(k, np.asarray(v, dtype=np.float32)) for k, v in w.items()]
    return _model(nodes, inputs, outputs, inits, "depthwise_separable_net")


def smoothquant_block(seed: int = 0, seq: int = 8, hidden: int = 16, outliers: tuple[int, ...] = (3, 11),
                      outlier_gain: float = 60.0) -> onnx.ModelProto:
    """A transformer MLP block whose LayerNorm output has a few outlier channels (as LLM activations do).

    x[N,seq,hidden] -> LayerNormalization (gamma large on ``outliers``) -> MatMul W1 [hidden, 4h] -> Add b1
    -> Relu -> MatMul W2 [4h, hidden] -> Add(residual x) -> out; and out -> ReduceMean(seq) ->
    Gemm (transB) -> logits[N, 4]. W1's rows for the outlier channels are ``outlier_gain`` times
    smaller (as in trained LLMs), so every channel matters to fc1; the outliers make per-tensor INT8
    of the LayerNorm output crush the others: SmoothQuant moves that range into W1's rows (folded
    into gamma/beta).
    """
    rng = np.random.default_rng(seed)
    h = hidden
    gamma = rng.uniform(0.5, 1.5, h)
    gamma[list(outliers)] *= outlier_gain
    w = {
        "ln_g": gamma, "ln_b": rng.normal(0, 0.1, h),
        "w1": rng.normal(0, 0.3, (h, 4 * h)) / np.where(np.isin(np.arange(h), outliers), outlier_gain, 1.0)[:, None],
        "b1": rng.normal(0, 0.1, 4 * h),
        "w2": rng.normal(0, 0.15, (4 * h, h)),
        "head_w": rng.normal(0, 0.3, (4, h)), "head_b": rng.normal(0, 0.1, 4),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln_g", "ln_b"], ["ln"], name="ln", axis=-1),
        helper.make_node("MatMul", ["ln", "w1"], ["fc1"], name="fc1"),
        helper.make_node("Add", ["fc1", "b1"], ["fc1_b"], name="fc1_bias"),
        helper.make_node("Relu", ["fc1_b"], ["act"], name="act"),
        helper.make_node("MatMul", ["act", "w2"], ["fc2"], name="fc2"),
        helper.make_node("Add", ["fc2", "x"], ["out"], name="residual"),
        helper.make_node("ReduceMean", ["out"], ["pooled"], name="pool", axes=[1], keepdims=0),
        helper.make_node("Gemm", ["pooled", "head_w", "head_b"], ["logits"], name="head", transB=1),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, h])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])]
    inits = [_init(k, np.asarray(v, dtype=np.float32)) for k, v in w.items()]
    return _model(nodes, inputs, outputs, inits, "smoothquant_block")


def blocked_layout_net(seed: int = 0, channels: int = 12, size: int = 14) -> onnx.ModelProto:
    """A CNN that ONNX Runtime runs in its NCHWc layout, with a channel count that pads its blocks (8 or 16).

    input[N,3,H,W] -> Conv -> Clip(0,6) -> depthwise Conv -> Relu -> Conv (project) -> Add(residual)
    -> x*Sigmoid(x) (same-shape Mul) -> Mul by a per-channel constant (broadcast) -> MaxPool
    -> GlobalAveragePool -> Flatten -> Gemm -> logits[N,10].
    """
    rng = np.random.default_rng(seed)
    c = channels
    w = {
        "w0": rng.normal(0, 0.4, (c, 3, 3, 3)), "b0": rng.normal(0, 0.2, c),
        "wd": rng.normal(0, 0.5, (c, 1, 3, 3)), "bd": rng.normal(0, 0.1, c),
        "wp": rng.normal(0, 0.3, (c, c, 1, 1)), "bp": rng.normal(0, 0.1, c),
        "gain": rng.uniform(0.5, 2.0, (1, c, 1, 1)),
        "lo": np.array(0.0), "hi": np.array(6.0),
        "wf": rng.normal(0, 0.3, (10, c)), "bf": rng.normal(0, 0.1, 10),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["stem"], pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["stem", "lo", "hi"], ["stem6"]),
        helper.make_node("Conv", ["stem6", "wd", "bd"], ["dw"], pads=[1, 1, 1, 1], group=c),
        helper.make_node("Relu", ["dw"], ["dwr"]),
        helper.make_node("Conv", ["dwr", "wp", "bp"], ["proj"]),
        helper.make_node("Add", ["proj", "stem6"], ["res"]),
        helper.make_node("Sigmoid", ["res"], ["gate"]),
        helper.make_node("Mul", ["res", "gate"], ["silu"]),
        helper.make_node("Mul", ["silu", "gain"], ["scaled"]),
        helper.make_node("MaxPool", ["scaled"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["pool"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])]
    inits = [_init(k, np.asarray(v, dtype=np.float32)) for k, v in w.items()]
    return _model(nodes, inputs, outputs, inits, "blocked_layout_net")


def clipped_activations_net(seed: int = 0, channels: int = 8, size: int = 8) -> onnx.ModelProto:
    """Every kind of Relu / Clip the statistics pass may derive from its input, and kinds it must not.

    input[N,4,H,W] -> Neg (x0: -0.0 where the input is +0.0) -> Relu (r0)          derived
    r0 -> Conv (c1) -> Clip(0, 6) (c1_6)                                              derived
                   -> Clip(0, 3) (c1_3)        a second clip of c1                    not derived
    c1 * gain (m) -> Clip(Constant 0, Constant 1.5) (m_c)                             derived (Constant bounds)
    c1 + c1_6 (s) -> Clip(-1, 1) (s_c)         min below 0                             not derived
    s -> Clip(-0.0, 2) (s_z)                   min -0.0                               not derived
    m -> Clip(0) (m_open)                      no max: a Relu                         derived
    r0 -> Relu (rr)                            its input is derived, not run out        not derived
    output = r0-free sum of the clips (so every branch reaches it) -> out[N,8,H,W]
    """
    rng = np.random.default_rng(seed)
    c = channels
    inits = [_init(k, np.asarray(v, dtype=np.float32)) for k, v in {
        "w1": rng.normal(0, 0.4, (c, 4, 3, 3)), "b1": rng.normal(0, 0.3, c), "gain": rng.uniform(0.5, 3.0, (1, c, 1, 1)),
        "zero": np.array(0.0), "six": np.array(6.0), "three": np.array(3.0), "neg1": np.array(-1.0),
        "one": np.array(1.0), "negzero": np.array(-0.0), "two": np.array(2.0)}.items()]
    nodes = [
        helper.make_node("Neg", ["input"], ["x0"]),
        helper.make_node("Relu", ["x0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1", "zero", "six"], ["c1_6"]),
        helper.make_node("Clip", ["c1", "zero", "three"], ["c1_3"]),
        helper.make_node("Mul", ["c1", "gain"], ["m"]),
        helper.make_node("Constant", [], ["lo_c"], value=helper.make_tensor("lo_c", TensorProto.FLOAT, [], [0.0])),
        helper.make_node("Constant", [], ["hi_c"], value=helper.make_tensor("hi_c", TensorProto.FLOAT, [], [1.5])),
        helper.make_node("Clip", ["m", "lo_c", "hi_c"], ["m_c"]),
        helper.make_node("Add", ["c1", "c1_6"], ["s"]),
        helper.make_node("Clip", ["s", "neg1", "one"], ["s_c"]),
        helper.make_node("Clip", ["s", "negzero", "two"], ["s_z"]),
        helper.make_node("Clip", ["m", "zero"], ["m_open"]),
        helper.make_node("Relu", ["r0"], ["rr"]),
        helper.make_node("Conv", ["rr", "w1", "b1"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Sum", ["c1_3", "m_c", "s_c", "s_z", "m_open", "c2"], ["out"]),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, size, size])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", c, size, size])]
    return _model(nodes, inputs, outputs, inits, "clipped_activations_net")


def position_table_net(seed: int = 0, hidden: int = 8, max_len: int = 16) -> onnx.ModelProto:
    """Tensors with no sample axis, as a transformer has them: computed once per model run for every sample.

    Inputs ``x[N, S, hidden]`` and ``temperature`` (a scalar: no batch axis, fed with
    ``batch_axes={"temperature": None}``). ``table = Tanh(pos_table)`` has a static shape
    ``[max_len, hidden]`` (the graph says it carries no samples); ``positions`` is its slice of
    the first S rows (its shape is unknown to shape inference: S comes from ``Shape(x)``, only x's shape);
    ``y = x + positions``, ``flat = Reshape(y, [-1, hidden])`` (samples merged with the sequence axis, as
    transformer exports do) and ``out = y * temperature`` carry the batch. Not in ALL_BUILDERS:
    ``temperature`` needs its batch axis.
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Tanh", ["pos_table"], ["table"], name="table_tanh"),
        helper.make_node("Shape", ["x"], ["x_shape"], name="x_shape"),
        helper.make_node("Gather", ["x_shape", "one"], ["seq"], name="seq_len", axis=0),
        helper.make_node("Slice", ["table", "zero", "seq", "zero"], ["positions"], name="take_positions"),
        helper.make_node("Add", ["x", "positions"], ["y"], name="add_positions"),
        helper.make_node("Mul", ["y", "temperature"], ["out"], name="temper"),
        helper.make_node("Reshape", ["y", "flat_shape"], ["flat"], name="flatten_tokens"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", hidden]),
              helper.make_tensor_value_info("temperature", TensorProto.FLOAT, [])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", "S", hidden])]
    inits = [_init("pos_table", rng.normal(0, 1.5, (max_len, hidden)).astype(np.float32)),
             _init("one", np.array([1], np.int64)), _init("zero", np.array([0], np.int64)),
             _init("flat_shape", np.array([-1, hidden], np.int64))]
    return _model(nodes, inputs, outputs, inits, "position_table_net")


def any_size_classifier(seed: int = 0, channels: int = 8, classes: int = 5) -> onnx.ModelProto:
    """An image classifier for any image size: Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm,
    ``image[N, 3, H, W]`` -> ``logits[N, classes]`` (photos of several sizes batched by shape)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["image", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])]
    inits = [_init("w", rng.normal(0, 0.4, (channels, 3, 3, 3)).astype(np.float32)),
             _init("b", rng.normal(0, 0.1, (channels,)).astype(np.float32)),
             _init("fc_w", rng.normal(0, 0.5, (classes, channels)).astype(np.float32)),
             _init("fc_b", rng.normal(0, 0.1, (classes,)).astype(np.float32))]
    return _model(nodes, inputs, outputs, inits, "any_size_classifier")


def voice_activity_feeds(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of :func:`voice_activity` for ``n`` samples: ``input[n, 64]`` and ``state[2, n, 128]``
    (the samples of the state on axis 1: ``batch_axes={"state": 1}``)."""
    rng = np.random.default_rng(seed)
    return {"input": rng.normal(size=(n, 64)).astype(np.float32),
            "state": rng.normal(0, 0.5, size=(2, n, 128)).astype(np.float32)}


def text_line_set(folder: str | os.PathLike[str], widths: list[int], seed: int = 0, role: str = "validation") -> str:
    """Text lines for :func:`text_recognizer` (``[3, 48, w]`` .npy files in ``folder/lines``) and the manifest
    that batches them by shape (``folder/lines.toml``); returns the manifest's path."""
    root = os.fspath(folder)
    lines = os.path.join(root, "lines")
    os.makedirs(lines, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, w in enumerate(widths):
        np.save(os.path.join(lines, f"line{i}.npy"), rng.uniform(-1, 1, (3, 48, w)).astype(np.float32))
    manifest = os.path.join(root, "lines.toml")
    with open(manifest, "w", encoding="utf-8") as f:
        f.write(f'batching = "by_shape"\nshuffle = false\nrole = "{role}"\n'
                '[source]\nkind = "npy"\npath = "lines"\n[inputs]\nimage = "array"\n')
    return manifest


def _sequence_io(features: int, width: int, classes: int) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """The inputs x[N, T, features] and h0[N, width] and the output logits[N, classes] of the recurrent nets."""
    return ([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", features]),
             helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["N", width])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])])


def token_rnn(seed: int = 0, features: int = 6, width: int = 12, classes: int = 4) -> onnx.ModelProto:
    """A recurrent net as torch.jit.script exports it: a ``Loop`` over the sequence, its trip count from the data.

    x[N, T, features] -> MatMul(W_in) -> Relu -> xp[N, T, width];
    Loop(M = Shape(x)[1], body: h -> Tanh(Gather(xp, i, axis 1) + h @ W_rec) -> h') -> h_T[N, width]
    -> MatMul(W_out) -> logits[N, classes]. The body reads ``xp``, a tensor of the outer graph, by name:
    whatever precision the plan gives xp's producer, the body must still find it in float32.
    """
    rng = np.random.default_rng(seed)
    body = _loop_body(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
         helper.make_node("Gather", ["xp", "i"], ["x_t"], name="take_step", axis=1),
         helper.make_node("Constant", [], ["w_rec"], name="w_rec",
                          value=numpy_helper.from_array(rng.normal(0, 0.3, (width, width)).astype(np.float32))),
         helper.make_node("MatMul", ["h_in", "w_rec"], ["recurrent"], name="recur"),
         helper.make_node("Add", ["x_t", "recurrent"], ["pre"], name="add_step"),
         helper.make_node("Tanh", ["pre"], ["h_out"], name="tanh")],
        "over_tokens", ["N", width])
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["xp_pre"], name="embed"),
        helper.make_node("Relu", ["xp_pre"], ["xp"], name="embed_relu"),
        helper.make_node("Shape", ["x"], ["x_shape"], name="x_shape"),
        helper.make_node("Gather", ["x_shape", "one"], ["steps"], name="steps", axis=0),
        helper.make_node("Loop", ["steps", "go", "h0"], ["h_last"], name="over_tokens", body=body),
        helper.make_node("MatMul", ["h_last", "w_out"], ["logits"], name="head"),
    ]
    inputs, outputs = _sequence_io(features, width, classes)
    inits = [_init("w_in", rng.normal(0, 0.5, (features, width)).astype(np.float32)),
             _init("w_out", rng.normal(0, 0.5, (width, classes)).astype(np.float32)),
             numpy_helper.from_array(np.array(1, np.int64), "one"), numpy_helper.from_array(np.array(True), "go")]
    return _model(nodes, inputs, outputs, inits, "token_rnn")


def scan_rnn(seed: int = 0, features: int = 6, width: int = 10, classes: int = 3, reverse: bool = False
             ) -> onnx.ModelProto:
    """A recurrent net as a ``Scan`` over the sequence axis (axis 1), as tf2onnx writes a dynamic RNN.

    x[N, T, features] -> Scan(state h[N, width], over x on axis 1 (backwards with ``reverse``): body
    h' = Tanh(x_t @ W_in + h @ W_rec)) -> h_T -> MatMul(W_out) -> logits[N, classes]. Every MatMul but the head is
    inside the body.
    """
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "w_x"], ["from_x"], name="input_step"),
         helper.make_node("MatMul", ["h_in", "w_h"], ["from_h"], name="recur_step"),
         helper.make_node("Add", ["from_x", "from_h"], ["pre"], name="add_step"),
         helper.make_node("Tanh", ["pre"], ["h_out"], name="tanh_step")],
        "over_sequence",
        [helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["N", width]),
         helper.make_tensor_value_info("x_t", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["N", width])])
    nodes = [
        helper.make_node("Scan", ["h0", "x"], ["h_last"], name="scan", body=body, num_scan_inputs=1,
                         scan_input_axes=[1], scan_input_directions=[1 if reverse else 0]),
        helper.make_node("MatMul", ["h_last", "w_out"], ["logits"], name="head"),
    ]
    inputs, outputs = _sequence_io(features, width, classes)
    inits = [_init("w_x", rng.normal(0, 0.5, (features, width)).astype(np.float32)),
             _init("w_h", rng.normal(0, 0.3, (width, width)).astype(np.float32)),
             _init("w_out", rng.normal(0, 0.5, (width, classes)).astype(np.float32))]
    return _model(nodes, inputs, outputs, inits, "scan_rnn")


def nms_detector(seed: int = 0, score_threshold: float = 0.5) -> onnx.ModelProto:
    """A detector with its post-processing in the graph, exported at a fixed batch of 1 as such models are.

    image[1, 3, 16, 16] -> Conv/Relu/Conv -> 16 anchors x (4 box coordinates, 1 score logit) -> Sigmoid ->
    ``NonMaxSuppression`` (up to 10 boxes, IoU 0.5, scores above ``score_threshold``) -> kept_boxes[K, 4]
    (Gather of the selected anchors) and scores[1, 1, 16]. K is decided by the data: with the threshold
    near the median score, an INT8 model keeps a few boxes more or fewer than FP32.
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", strides=[2, 2]),
        helper.make_node("Reshape", ["c2", "anchor_shape"], ["flat"], name="flat"),
        helper.make_node("Transpose", ["flat"], ["anchors"], name="anchors", perm=[0, 2, 1]),
        helper.make_node("Split", ["anchors", "split"], ["boxes", "logit"], name="split", axis=2),
        helper.make_node("Sigmoid", ["logit"], ["score"], name="sigmoid"),
        helper.make_node("Transpose", ["score"], ["scores"], name="scores", perm=[0, 2, 1]),
        helper.make_node("NonMaxSuppression", ["boxes", "scores", "max_boxes", "iou", "threshold"], ["selected"],
                         name="nms"),
        helper.make_node("Gather", ["selected", "two"], ["box_index"], name="box_index", axis=1),
        helper.make_node("Squeeze", ["boxes", "zero"], ["boxes0"], name="first_image"),
        helper.make_node("Gather", ["boxes0", "box_index"], ["kept_boxes"], name="keep", axis=0),
    ]
    inits = [_init("w1", rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)),
             _init("w2", rng.normal(0, 0.3, (5, 8, 2, 2)).astype(np.float32)),
             _init("anchor_shape", np.array([0, 5, -1], np.int64)), _init("split", np.array([4, 1], np.int64)),
             _init("max_boxes", np.array([10], np.int64)), _init("iou", np.array([0.5], np.float32)),
             _init("threshold", np.array([score_threshold], np.float32)), _init("zero", np.array([0], np.int64)),
             numpy_helper.from_array(np.array(2, np.int64), "two")]
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 16, 16])]
    outputs = [helper.make_tensor_value_info("kept_boxes", TensorProto.FLOAT, ["K", 4]),
               helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, 16])]
    return _model(nodes, inputs, outputs, inits, "nms_detector")


def hf_mask_softmax(width: int = 4) -> onnx.ModelProto:
    """HF transformers' additive mask: ``(1 - keep) * finfo(float32).min`` from two Constant nodes, added to the
    scores before a Softmax (``scores, keep [N, width] -> probs``). Not in ALL_BUILDERS: no compute layer."""
    lowest = numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32))
    nodes = [helper.make_node("Constant", [], ["one"], name="one", value=numpy_helper.from_array(np.float32(1.0))),
             helper.make_node("Constant", [], ["lowest"], name="lowest", value=lowest),
             helper.make_node("Sub", ["one", "keep"], ["dropped"], name="invert"),
             helper.make_node("Mul", ["dropped", "lowest"], ["mask"], name="to_mask"),
             helper.make_node("Add", ["scores", "mask"], ["masked"], name="add_mask"),
             helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1)]
    graph = helper.make_graph(nodes, "hf_mask", [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", width]),
                                                 helper.make_tensor_value_info("keep", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", width])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])



def transposed_loop_rnn(seed: int = 0, channels: int = 8, hidden: int = 16) -> onnx.ModelProto:
    """A conv front end whose output a data-length ``Loop`` reads by name, through a Transpose (torch.jit.script's
    ``for t in range(u.shape[1])``): x[N, T, C] ─► Transpose ─► Conv ─► Relu ─► Transpose ─► u[N, T, C];
    Loop(Gather(Shape(u), 1)) body: h' = Tanh(Gather(u, i, axis 1) @ Win + h @ Wh), scan h' ─► ys[T, N, H]."""
    rng = np.random.default_rng(seed)
    c, h = channels, hidden
    body = _loop_body(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body/cond"),
         helper.make_node("Gather", ["u", "i"], ["u_t"], name="body/take_t", axis=1),
         helper.make_node("MatMul", ["u_t", "Win"], ["xu"], name="body/mm_in"),
         helper.make_node("MatMul", ["h_in", "Wh"], ["hh"], name="body/mm_rec"),
         helper.make_node("Add", ["xu", "hh"], ["pre"], name="body/add"),
         helper.make_node("Tanh", ["pre"], ["h_out"], name="body/tanh"),
         helper.make_node("Identity", ["h_out"], ["y_t"], name="body/scan_out")],
        "rnn_body", ["N", h], scans=[("y_t", TensorProto.FLOAT, ["N", h])])
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (c, c, 3)).astype(np.float32), "conv_w"),
             numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "conv_b"),
             numpy_helper.from_array(rng.normal(0, 0.3, (c, h)).astype(np.float32), "Win"),
             numpy_helper.from_array(rng.normal(0, 0.3, (h, h)).astype(np.float32), "Wh"),
             numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array(True), "go")]
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], name="to_ncl", perm=[0, 2, 1]),
             helper.make_node("Conv", ["xt", "conv_w", "conv_b"], ["c"], name="frontend", pads=[1, 1]),
             helper.make_node("Relu", ["c"], ["cr"], name="frontend_relu"),
             helper.make_node("Transpose", ["cr"], ["u"], name="to_ntc", perm=[0, 2, 1]),
             helper.make_node("Shape", ["u"], ["u_shape"], name="shape"),
             helper.make_node("Gather", ["u_shape", "one"], ["trips"], name="trip_count", axis=0),
             helper.make_node("Loop", ["trips", "go", "h0"], ["hN", "ys"], name="rnn_loop", body=body)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", c]),
              helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["N", h])]
    outputs = [helper.make_tensor_value_info("hN", TensorProto.FLOAT, ["N", h]),
               helper.make_tensor_value_info("ys", TensorProto.FLOAT, ["T", "N", h])]
    return _model(nodes, inputs, outputs, inits, "transposed_loop_rnn")


def gru_head(seed: int = 0, hidden: int = 16) -> onnx.ModelProto:
    """A bidirectional GRU's output joined and projected, as torch exports it (AECMOS's head):
    x[T, N, F] ─► GRU ─► y[T, 2, N, H] ─► Transpose ─► Reshape[0, 0, -1] ─► Transpose ─► MatMul ─► out[N, T, H].
    Written in float16, ONNX Runtime 1.32's NCHWc transformer segfaults while it creates the session."""
    rng = np.random.default_rng(seed)
    h, f = hidden, 8
    inits = [_init("W", rng.normal(0, 0.3, (2, 3 * h, f)).astype(np.float32)),
             _init("R", rng.normal(0, 0.3, (2, 3 * h, h)).astype(np.float32)),
             _init("B", rng.normal(0, 0.1, (2, 6 * h)).astype(np.float32)),
             _init("join", np.array([0, 0, -1], np.int64)),
             _init("proj", rng.normal(0, 0.2, (2 * h, h)).astype(np.float32))]
    nodes = [helper.make_node("GRU", ["x", "W", "R", "B"], ["y", "yh"], name="gru", direction="bidirectional",
                              hidden_size=h, linear_before_reset=1),
             helper.make_node("Transpose", ["y"], ["yt"], name="dirs_last", perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["yt", "join"], ["yj"], name="join_dirs"),
             helper.make_node("Transpose", ["yj"], ["yb"], name="batch_first", perm=[1, 0, 2]),
             helper.make_node("MatMul", ["yb", "proj"], ["out"], name="proj")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "N", f])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", "T", h])]
    return _model(nodes, inputs, outputs, inits, "gru_head")


def log_mel(seed: int = 0, bins: int = 16, mels: int = 8) -> onnx.ModelProto:
    """openwakeword's log-mel front end: power[N, T, bins] ─► MatMul(melW) ─► Clip(1e-10) ─► Log ─► Mul(10 / ln 10)
    ─► db[N, T, mels]. Powers span many decades, so many mel energies sit under half an INT8 step of the
    largest."""
    rng = np.random.default_rng(seed)
    inits = [_init("melW", np.abs(rng.normal(0, 0.5, (bins, mels))).astype(np.float32)),
             _init("floor", np.array(1e-10, np.float32)),
             _init("to_db", np.array(10 / np.log(10), np.float32))]
    nodes = [helper.make_node("MatMul", ["power", "melW"], ["mel"], name="mel_filter"),
             helper.make_node("Clip", ["mel", "floor"], ["mel_floor"], name="floor"),
             helper.make_node("Log", ["mel_floor"], ["log_mel"], name="log"),
             helper.make_node("Mul", ["log_mel", "to_db"], ["db"], name="to_db")]
    inputs = [helper.make_tensor_value_info("power", TensorProto.FLOAT, ["N", "T", bins])]
    outputs = [helper.make_tensor_value_info("db", TensorProto.FLOAT, ["N", "T", mels])]
    return _model(nodes, inputs, outputs, inits, "log_mel")


def masked_token_tagger(seed: int = 0, hidden: int = 16, classes: int = 5) -> onnx.ModelProto:
    """A Hugging Face-style token classifier: ``x[N, S, hidden]`` and an int64 ``attention_mask[N, S]`` of 1s and
    0s (padding), made additive (``(1 - mask) * -1e9``) for :func:`dynamic_attention`, then a tag head
    ``MatMul + Add`` to ``logits[N, S, classes]``. The outputs at padded positions are computed and read by no one."""
    block = dynamic_attention(seed, hidden)
    rng = np.random.default_rng(seed + 1)
    graph = block.graph
    graph.input[1].CopyFrom(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "S"]))
    head = [helper.make_node("Cast", ["attention_mask"], ["mask_f"], name="mask_cast", to=TensorProto.FLOAT),
            helper.make_node("Sub", ["one", "mask_f"], ["pad"], name="mask_invert"),
            helper.make_node("Mul", ["pad", "minus_big"], ["mask"], name="mask_additive")]
    nodes = head + list(graph.node) + [
        helper.make_node("MatMul", ["out", "w_tag"], ["tags"], name="tag_proj"),
        helper.make_node("Add", ["tags", "b_tag"], ["logits"], name="tag_bias")]
    inits = list(graph.initializer) + [
        _init("one", np.array(1.0, np.float32)), _init("minus_big", np.array(-1e9, np.float32)),
        _init("w_tag", rng.normal(0, 0.5, (hidden, classes)).astype(np.float32)),
        _init("b_tag", rng.normal(0, 0.1, classes).astype(np.float32))]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "S", classes])]
    return _model(nodes, list(graph.input), outputs, inits, "masked_token_tagger")


def lstm_head(input_name: str = "x", seed: int = 0) -> onnx.ModelProto:
    """ddddocr's shape in small: an LSTM (no INT8 form) holding most of the weights before an INT8-able MatMul
    head. input[N, 5, 8] -> Transpose -> LSTM(16) -> Squeeze -> MatMul -> logits[5, N, 4]."""
    rng = np.random.default_rng(seed)
    weights = {"W": (1, 64, 8), "R": (1, 64, 16), "B": (1, 128), "w_out": (16, 4)}
    nodes = [helper.make_node("Transpose", [input_name], ["xt"], name="time_major", perm=[1, 0, 2]),
             helper.make_node("LSTM", ["xt", "W", "R", "B"], ["y"], name="lstm", hidden_size=16),
             helper.make_node("Squeeze", ["y", "one"], ["ys"], name="squeeze"),
             helper.make_node("MatMul", ["ys", "w_out"], ["logits"], name="head")]
    inits = [_init(k, rng.normal(0, 0.3, v).astype(np.float32)) for k, v in weights.items()]
    inits.append(_init("one", np.array([1], np.int64)))
    return _model(nodes, [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 5, 8])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [5, "N", 4])], inits, "lstm_net")


def gru_with_state(seed: int = 0, hidden: int = 8, features: int = 6) -> onnx.ModelProto:
    """AECMOS's shape: ``x[T, N, F]`` with a dynamic batch beside a GRU state input ``h0[1, 1, H]`` whose batch
    (axis 1) the export fixed at 1: the model runs one sample at a time only. ``y[N, H]`` is the last step."""
    rng = np.random.default_rng(seed)
    h, f = hidden, features
    inits = [_init("W", rng.normal(0, 0.3, (1, 3 * h, f)).astype(np.float32)),
             _init("R", rng.normal(0, 0.3, (1, 3 * h, h)).astype(np.float32)),
             _init("B", rng.normal(0, 0.1, (1, 6 * h)).astype(np.float32)),
             _init("axis0", np.array([0], np.int64))]
    nodes = [helper.make_node("GRU", ["x", "W", "R", "B", "", "h0"], ["ys", "yh"], name="gru", hidden_size=h,
                              linear_before_reset=1),
             helper.make_node("Squeeze", ["yh", "axis0"], ["y"], name="last_step")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "N", f]),
              helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 1, h])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", h])]
    return _model(nodes, inputs, outputs, inits, "gru_with_state")


def denormal_branch_net(seed: int = 0, width: int = 16, out: int = 8) -> onnx.ModelProto:
    """A branch of values too small for any INT8 scale float32 holds as a normal number (an all but dead branch,
    as MobileViT's untrained attention scores: 1e-45 from queries and keys of 1e-23)::

        x[N, 16] ─► MatMul(W1) ─────────────────────────────► Add ─► y[N, 8]
          └─► Mul(1e-20) ─► small ─► Mul(small, small) ─► tiny (~1e-40) ─► MatMul(W2) ─► far (~1e-40) ─┘
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["near"], name="near"),
        helper.make_node("Mul", ["x", "shrink"], ["small"], name="shrink"),
        helper.make_node("Mul", ["small", "small"], ["tiny"], name="square"),
        helper.make_node("MatMul", ["tiny", "w2"], ["far"], name="far"),
        helper.make_node("Add", ["near", "far"], ["y"], name="sum"),
    ]
    inits = [_init("w1", rng.standard_normal((width, out)).astype(np.float32) / 4),
             _init("w2", rng.standard_normal((width, out)).astype(np.float32)),
             _init("shrink", np.array(1e-20, np.float32))]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out])], inits, "denormal_branch_net")


def optional_inputs_net(seed: int = 0) -> onnx.ModelProto:
    """Optional inputs spelled out as "" (valid ONNX, as some converters write them), an unused graph input, and an
    output a later node also reads::

        x ─► Conv(W, b) ─► Clip("", 6) ─► clip (output) ─► Resize("", scales) ─► Conv(W2, "") ─► y
        unused (read by nothing)
    """
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Clip", ["c", "", "six"], ["clip"], name="clip_max_only"),
             helper.make_node("Resize", ["clip", "", "scales"], ["up"], mode="nearest", name="resize"),
             helper.make_node("Conv", ["up", "cw2", ""], ["y"], pads=[1, 1, 1, 1], name="conv_nobias")]
    inits = [_init("cw", (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)),
             _init("cb", (rng.standard_normal(8) * 0.1).astype(np.float32)),
             _init("six", np.array(6.0, np.float32)), _init("scales", np.array([1, 1, 2, 2], np.float32)),
             _init("cw2", (rng.standard_normal((4, 8, 3, 3)) * 0.3).astype(np.float32))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16]),
              helper.make_tensor_value_info("unused", TensorProto.FLOAT, ["N", 2])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 32, 32]),
               helper.make_tensor_value_info("clip", TensorProto.FLOAT, ["N", 8, 16, 16])]
    return _model(nodes, inputs, outputs, inits, "optional_inputs_net")


def kv_cache_step(width: int = 8, seed: int = 0, one_input_concat: bool = False) -> onnx.ModelProto:
    """A decoder step with a KV cache: x[N, 1, width] -> MatMul(W_k) -> k; present = Concat(past[N, P, width], k,
    axis 1) [N, P + 1, width]; logits = MatMul(ReduceMean(present over positions), W_o). ``one_input_concat``: the
    past goes through ``Concat(past)`` first, as torch exports a cache."""
    rng = np.random.default_rng(seed)
    past = "past_cat" if one_input_concat else "past"
    nodes = [helper.make_node("MatMul", ["x", "wk"], ["k"], name="key"),
             *([helper.make_node("Concat", ["past"], ["past_cat"], name="cache_in", axis=1)] if one_input_concat
               else []),
             helper.make_node("Concat", [past, "k"], ["present"], name="cache", axis=1),
             helper.make_node("ReduceMean", ["present"], ["pooled"], name="pool", axes=[1], keepdims=0),
             helper.make_node("MatMul", ["pooled", "wo"], ["logits"], name="head")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, width]),
              helper.make_tensor_value_info("past", TensorProto.FLOAT, ["N", "P", width])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", width]),
               helper.make_tensor_value_info("present", TensorProto.FLOAT, ["N", "P1", width])]
    inits = [_init(n, rng.normal(0, 0.5, (width, width)).astype(np.float32)) for n in ("wk", "wo")]
    return _model(nodes, inputs, outputs, inits, "kv_cache_step")
