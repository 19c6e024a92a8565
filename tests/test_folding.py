"""quantlab.folding's constant readers: one-element constants and Clip bounds, in every form ONNX writes them."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantlab.folding import clip_bounds, scalar_constant


def _constants() -> tuple[dict, dict]:
    inits = {n: numpy_helper.from_array(np.asarray(v), n) for n, v in {
        "zero": np.float32(0.0), "six": np.array([6.0], np.float32), "pair": np.array([0.0, 6.0], np.float32),
        "half64": np.float64(0.5), "count": np.int64(3)}.items()}
    nodes = [
        helper.make_node("Constant", [], ["k_tensor"], value=helper.make_tensor("t", TensorProto.FLOAT, [], [1.5])),
        helper.make_node("Constant", [], ["k_float"], value_float=2.5),
        helper.make_node("Constant", [], ["k_floats"], value_floats=[4.0]),
        helper.make_node("Constant", [], ["k_ints"], value_ints=[1, 2]),
        helper.make_node("Relu", ["x"], ["computed"]),
    ]
    return inits, {n.output[0]: n for n in nodes}


@pytest.mark.parametrize(("name", "value", "dtype"), [
    ("zero", 0.0, np.float32), ("six", 6.0, np.float32), ("half64", 0.5, np.float64), ("count", 3, np.int64),
    ("k_tensor", 1.5, np.float32), ("k_float", 2.5, np.float32), ("k_floats", 4.0, np.float32)])
def test_one_element_constants_are_read_in_their_own_dtype(name, value, dtype):
    inits, producers = _constants()
    got = scalar_constant(name, inits, producers)
    assert got is not None and got.shape == () and got.dtype == dtype and got == value


@pytest.mark.parametrize("name", ["pair", "k_ints", "computed", "x", "missing"])
def test_several_elements_or_a_computed_value_is_not_a_scalar_constant(name):
    inits, producers = _constants()
    assert scalar_constant(name, inits, producers) is None


def _bounds(node) -> tuple | None:
    inits, producers = _constants()
    got = clip_bounds(node, inits, producers)
    return None if got is None else tuple(None if b is None else float(b) for b in got)


def test_clip_bounds_from_attributes_inputs_and_constant_nodes():
    assert _bounds(helper.make_node("Clip", ["x"], ["y"], min=0.0, max=6.0)) == (0.0, 6.0)  # opset < 11
    assert _bounds(helper.make_node("Clip", ["x"], ["y"], min=-1.0)) == (-1.0, None)
    assert _bounds(helper.make_node("Clip", ["x"], ["y"])) == (None, None)
    assert _bounds(helper.make_node("Clip", ["x", "zero", "six"], ["y"])) == (0.0, 6.0)
    assert _bounds(helper.make_node("Clip", ["x", "zero"], ["y"])) == (0.0, None)
    assert _bounds(helper.make_node("Clip", ["x", "", "six"], ["y"])) == (None, 6.0)
    assert _bounds(helper.make_node("Clip", ["x", "zero", "k_float"], ["y"])) == (0.0, 2.5)
    # a bound computed at run time (or one that is not a single value) makes the bounds unknown
    assert _bounds(helper.make_node("Clip", ["x", "zero", "computed"], ["y"])) is None
    assert _bounds(helper.make_node("Clip", ["x", "pair"], ["y"])) is None
