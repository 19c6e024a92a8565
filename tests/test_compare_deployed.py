"""The plain-session check of ORT-form candidates (quantlab.compare.deployed) on real ONNX Runtime sessions."""

from __future__ import annotations

import numpy as np
import onnx
import pandas as pd

import models
from quantlab.backends import get_backend
from quantlab.calibrate import calibrate
from quantlab.compare import CompareOptions, compare
from quantlab.compare.deployed import exposure_notes
from quantlab.data import from_arrays
from quantlab.graph import model_from_proto
from quantlab.plan import uniform_plan
from quantlab.quantize import WriteOptions, write_model


def _setup():
    model = model_from_proto(models.conv_net(size=8))
    x = np.random.default_rng(0).normal(0, 1, (8, 3, 8, 8)).astype(np.float32)
    table = calibrate(model, from_arrays({"input": x}), "minmax").tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="ort"))
    return model, written, x


def test_a_candidate_whose_plain_outputs_differ_from_the_measured_ones_is_warned_of():
    """HF EfficientNet's fused QLinearAveragePool gave all-zero logits in a plain session while the comparison,
    its tensors exposed, measured 29 dB. Here the measured cosines say 1.0 for samples whose plain-session outputs
    are an INT8 model's with its weights zeroed: the note names the candidate, both cosines and --no-per-layer."""
    model, written, x = _setup()
    batch = next(iter(from_arrays({"input": x}).batches(4)))
    backend = get_backend("ort")
    ref_runner = backend.build(model.proto)
    reference = ref_runner.run(batch.feeds, ["logits"])
    broken = written.proto.__class__()
    broken.CopyFrom(written.proto)
    for init in broken.graph.initializer:
        if init.data_type == 3:  # int8 weights: zeroed, the output collapses to the biases
            init.raw_data = bytes(len(init.raw_data))
    measured = pd.DataFrame({"candidate": "int8", "output": "logits", "sample": list(batch.indices), "cosine": 1.0})
    (note,) = exposure_notes(["int8"], {"int8": broken}, lambda name: backend, reference, batch, ["logits"], {},
                             measured)
    assert note.startswith("WARNING candidate 'int8'") and "where the comparison measured 1.0000" in note
    assert "--no-per-layer" in note


def test_an_ort_form_candidate_that_computes_alike_both_ways_gets_no_warning():
    """The check runs on every per-layer comparison of an ORT-form candidate: a model that computes alike with and
    without its tensors exposed (fused kernels round a little otherwise) gets no warning."""
    model, written, x = _setup()
    result = compare(model, {"int8": written}, from_arrays({"input": x}, role="validation"),
                     CompareOptions(batch_size=4, bootstrap=0))
    assert not any("plain ONNX Runtime session" in w for w in result.warnings)


def test_a_model_whose_every_output_is_sized_by_the_data_skips_the_check():
    """VITS's waveform is as long as its predicted durations say: no output was left for the plain-session check,
    and ONNX Runtime, asked for none, returned every output, which failed the comparison at its end."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Reshape", ["r", "flat"], ["values"], name="flatten"),
         helper.make_node("Greater", ["values", "half"], ["keep"], name="keep"),
         helper.make_node("Compress", ["values", "keep"], ["kept"], name="compress")], "sized",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("kept", TensorProto.FLOAT, ["K"])],
        [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([-1], np.int64), "flat"),
         numpy_helper.from_array(np.array(0.5, np.float32), "half")])
    model = model_from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    x = rng.normal(0, 1, (4, 3, 8, 8)).astype(np.float32)
    table = calibrate(model, from_arrays({"x": x}), "minmax", batch_size=1).tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="ort"))
    result = compare(model, {"int8": written}, from_arrays({"x": x}, role="validation"),
                     CompareOptions(batch_size=1, bootstrap=0))
    assert list(result.end_to_end["output"]) == ["kept"]
    assert get_backend("ort").build(model.proto).run({"x": x[:1]}, []) == {}


def test_a_plain_session_closer_to_the_reference_or_within_rounding_is_no_warning():
    """DPT's ORT-form INT8 measured 0.9734 with its tensors exposed and 0.9802 plain: the deployed model is better,
    and the warning said a fused kernel may be broken. Only a plain session worse by 0.005 and by half again the
    measured deficit (1 - cosine) is warned of: at a low cosine, 0.006 worse is kernel rounding."""
    model, written, x = _setup()
    batch = next(iter(from_arrays({"input": x}).batches(4)))
    backend = get_backend("ort")
    reference = backend.build(model.proto).run(batch.feeds, ["logits"])
    broken = written.proto.__class__()
    broken.CopyFrom(written.proto)
    for init in broken.graph.initializer:
        if init.data_type == 3 and init.name.startswith("w1"):  # the first conv's int8 weights halved: a poor model
            w = np.frombuffer(init.raw_data, np.int8) // 2
            init.raw_data = w.astype(np.int8).tobytes()

    def cosine(proto) -> float:
        out = backend.build(proto).run(batch.feeds, ["logits"])["logits"].astype(np.float64)
        ref = reference["logits"].astype(np.float64)
        return float(np.mean([r @ c / (np.linalg.norm(r) * np.linalg.norm(c)) for r, c in zip(ref, out)]))

    def notes(proto, measured: float) -> list[str]:
        frame = pd.DataFrame({"candidate": "int8", "output": "logits", "sample": list(batch.indices),
                              "cosine": measured})
        return exposure_notes(["int8"], {"int8": proto}, lambda name: backend, reference, batch, ["logits"], {},
                              frame)

    assert notes(written.proto, cosine(written.proto) - 0.01) == []  # the plain session is the better one
    poor = cosine(broken)
    assert poor < 0.98, poor  # a deficit well above the 0.005 of kernel rounding
    assert notes(broken, poor + 0.006) == []  # worse by 0.006, but not by 1.5x the measured deficit
    assert len(notes(broken, 1.0)) == 1  # worse by all its deficit: warned of
