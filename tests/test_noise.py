"""quantlab.noise: the SQNR a range keeps, predicted from the histogram, against quantizing the values themselves."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from quantlab.histogram import AbsHistogram
from quantlab.noise import predicted_sqnr_db


def _sqnr_db(x: np.ndarray, q: np.ndarray) -> float:
    x = x.astype(np.float64)
    return 10.0 * math.log10(float(np.sum(x * x)) / float(np.sum((x - q.astype(np.float64)) ** 2)))


def _fake_quant(x: np.ndarray, amax: float, levels: int = 127) -> np.ndarray:
    """Symmetric INT8 with ``amax``, value by value: round to the nearest step, saturate at +-amax."""
    step = amax / levels
    return np.clip(np.rint(x.astype(np.float64) / step), -levels, levels) * step


def _samples() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 1 << 19
    return {
        "normal": rng.standard_normal(n),
        "relu": np.maximum(rng.standard_normal(n), 0.0),  # half exact zeros
        "heavy tail": rng.standard_t(2, n),
        "one outlier": np.concatenate([rng.standard_normal(n), [400.0]]),
        "hardswish on paper": np.concatenate([rng.exponential(0.1, n), rng.uniform(50, 400, 40)]),
    }


@pytest.mark.parametrize("name", list(_samples()))
@pytest.mark.parametrize("share", [1.0, 0.5, 0.1, 0.01, 0.001])
def test_prediction_matches_quantizing_the_values(name, share):
    """From the full range (rounding only) down to a thousandth of it (mostly saturation; fine bins then
    coarser than a quarter step on the outlier sets), within 0.1 dB of quantizing every value."""
    x = _samples()[name].astype(np.float32)
    hist = AbsHistogram()
    hist.update(x)
    state = hist.state()
    amax = float(np.abs(x).max()) * share
    predicted = state.predicted_sqnr_db(amax)
    assert predicted == pytest.approx(_sqnr_db(x, _fake_quant(x, amax)), abs=0.1)


def test_prediction_matches_onnx_runtime_quantize_dequantize():
    """The same against ONNX Runtime's own QuantizeLinear -> DequantizeLinear (int8, zero point 0), on ReLU-like
    values, where its -128 level never comes into play."""
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(1)
    x = np.maximum(rng.standard_normal((64, 512)), 0).astype(np.float32) * 3
    amax = float(x.max()) * 0.6
    scale = np.float32(amax / 127)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [float(scale)]),
         helper.make_tensor("z", TensorProto.INT8, [], [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    hist = AbsHistogram()
    hist.update(x)
    assert hist.state().predicted_sqnr_db(amax) == pytest.approx(_sqnr_db(x, y), abs=0.05)


def test_edge_cases_no_signal_zero_range_and_the_bins_above_the_values():
    zeros = AbsHistogram()
    zeros.update(np.zeros(100, np.float32))
    assert math.isnan(zeros.state().predicted_sqnr_db(1.0))  # no signal
    assert math.isnan(predicted_sqnr_db(np.zeros(8), 0.0, 0, 1.0))  # nothing seen
    values = AbsHistogram()
    values.update(np.linspace(-1, 1, 1001, dtype=np.float32))
    state = values.state()
    assert state.predicted_sqnr_db(0.0) == 0.0  # everything becomes 0: noise equals signal
    padded = np.concatenate([state.counts, np.zeros_like(state.counts)])  # twice the range, empty above
    assert predicted_sqnr_db(padded, 2 * state.upper, state.zeros, 0.9) == pytest.approx(
        state.predicted_sqnr_db(0.9), abs=1e-9)
    assert state.predicted_sqnr_db(0.9) < state.predicted_sqnr_db(1.0)  # saturating the top costs more than it saves
