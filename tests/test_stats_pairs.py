"""Relu / Clip(x, 0, h) outputs derived from their input's pass: which pairs, equal statistics, the fallback."""

from __future__ import annotations

import models
import numpy as np
import pytest

from quantlab.graph import activation_names, model_from_proto
from quantlab.stats import collect_statistics
from quantlab.stats.pairs import clipped_pairs


def _assert_same(a, b):
    assert a.names == b.names and a.samples == b.samples and a.batches == b.batches
    for name in a.names:
        assert a[name] == b[name], name


def _feeds(model, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    return models.random_inputs(model.proto, n, seed=seed)


_batches = models.batch_factory


def test_pairs_are_relus_and_clips_from_zero_of_an_exposed_tensor():
    model = model_from_proto(models.clipped_activations_net())
    names = activation_names(model.proto)
    pairs = clipped_pairs(model, names, 1e30, [t for t in names if t != "input"])
    assert {x: y for x, (y, _) in pairs.items()} == {"x0": "r0", "c1": "c1_6", "m": "m_c"}
    assert [pairs[x][1] for x in ("x0", "c1", "m")] == [np.inf, 6.0, 1.5]
    # only what is asked for, and only from a tensor the model exposes
    assert clipped_pairs(model, ["c1", "m", "m_open"], 1e30, ["c1", "m"]) == {"m": ("m_open", np.inf)}
    assert clipped_pairs(model, names, 1e30, ["m"]) == {"m": ("m_c", 1.5)}
    # a finite h at or above the huge threshold is not derived (Relu-like ones are, and refuse huge x later)
    assert clipped_pairs(model, names, 1.0, ["c1", "m"]) == {"m": ("m_open", np.inf)}


@pytest.mark.parametrize("builder", [models.clipped_activations_net, models.conv_net, models.blocked_layout_net])
def test_derived_statistics_equal_exposing_every_tensor(builder):
    model = model_from_proto(builder())
    feeds = _feeds(model, 12, seed=2)
    derived = collect_statistics(model, _batches(feeds, 5))
    exposed = collect_statistics(model, _batches(feeds, 5), derive_clipped=False)
    assert derived.backend["derived_clipped"] > 0 and exposed.backend["derived_clipped"] == 0
    _assert_same(derived, exposed)


@pytest.mark.parametrize("poison", ["positive zero", "nan"])
def test_ambiguous_values_start_the_pass_again_without_deriving(poison):
    """Neg turns an input +0.0 into -0.0 (Relu(-0.0) is implementation-defined); NaN is too. Both are in a
    late batch: the pass starts again, on_batch still sees each batch once, and the results are exact."""
    model = model_from_proto(models.clipped_activations_net())
    feeds = _feeds(model, 12, seed=3)
    feeds["input"][10, 1, 2, 3] = 0.0 if poison == "positive zero" else np.nan
    seen: list[int] = []
    derived = collect_statistics(model, _batches(feeds, 4), on_batch=lambda item: seen.append(len(seen)))
    exposed = collect_statistics(model, _batches(feeds, 4), derive_clipped=False)
    assert seen == [0, 1, 2]
    assert derived.backend["derived_clipped"] == 0
    why = derived.backend["clipped_not_derived"]  # provenance: which tensor, and why
    assert any(f"'{x}'" in why for x in ("x0", "c1", "m")) and "-0.0" in why
    _assert_same(derived, exposed)


def test_a_value_float_constant_bound_is_derived_and_a_nan_bound_is_not():
    """Clip(x, 0, Constant value_float=2) is a ReLU-2 like any other; Clip(x, 0, NaN) is not derived (what
    ``min(v, NaN)`` gives is implementation-defined), and both give the statistics of exposing every tensor."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Neg", ["input"], ["x"]),
             helper.make_node("Constant", [], ["two"], value_float=2.0),
             helper.make_node("Clip", ["x", "zero", "two"], ["y"]),
             helper.make_node("Mul", ["input", "zero"], ["x2"]),
             helper.make_node("Clip", ["x2", "zero", "nan"], ["y2"]),
             helper.make_node("Sum", ["y", "y2"], ["out"])]
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("zero", 0.0), ("nan", np.nan))]
    proto = models._model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 4, 4])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, 4, 4])], inits, "bounds")
    model = model_from_proto(proto)
    names = activation_names(model.proto)
    assert clipped_pairs(model, names, 1e30, [t for t in names if t != "input"]) == {"x": ("y", 2.0)}
    feeds = _feeds(model, 6, seed=5)
    feeds["input"] = np.abs(feeds["input"]) + 0.5  # positive: Neg gives no -0.0 (nothing ambiguous)
    derived = collect_statistics(model, _batches(feeds, 2), tensors=["x", "y"])
    assert derived.backend["derived_clipped"] == 1
    _assert_same(derived, collect_statistics(model, _batches(feeds, 2), tensors=["x", "y"], derive_clipped=False))


def test_one_thread_gives_the_same_derived_statistics():
    model = model_from_proto(models.clipped_activations_net())
    feeds = _feeds(model, 9, seed=4)
    _assert_same(collect_statistics(model, _batches(feeds, 3), threads=1),
                 collect_statistics(model, _batches(feeds, 3), threads=2))
