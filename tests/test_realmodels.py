"""The issue-14 test models end to end: calibrate -> write -> TensorRT-RTX parse + build (profiles) -> compare.

``text_recognizer`` is the OCR recognizer's shape problem (dynamic width, a reshape
that a width of 1 breaks); ``refinement_loop`` a Loop with a static trip count,
unrolled before statistics. The ``slow`` tests at the end take every issue model
(recognizer, ``dynamic_attention`` with padded sentences and an additive mask,
``voice_activity`` with its state on axis 1, ``hardsigmoid_detector``, a Hugging Face BERT export) through the CLI
as a user would: manifests, calibrate, build with TensorRT-RTX without --shapes, compare,
search, and a TensorRT-RTX build of the plan the search chose.
"""

from __future__ import annotations

from pathlib import Path

import models
import numpy as np
import pytest

from quantlab.calibrate import calibrate
from quantlab.compare import CompareOptions, compare
from quantlab.controlflow import resolve_static_control_flow
from quantlab.data import from_arrays
from quantlab.graph import model_from_proto
from quantlab.plan import uniform_plan
from quantlab.quantize import WriteOptions, write_model
from quantlab.shapes import ShapeLog, profiles_from_data

trt = pytest.importorskip("quantlab.backends.tensorrt")
pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed: pip install 'quantlab[tensorrt-rtx]'")


def _images(count: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (count, 3, 48, width)).astype(np.float32)


def _shape_log(*datasets, batch_size: int) -> ShapeLog:
    log = ShapeLog()
    for dataset in datasets:
        for batch in dataset.batches(batch_size):
            log.observe(batch.feeds)
    return log


def _end_to_end(model, written, validation, output: str):
    result = compare(model, {"int8": written}, validation, CompareOptions(batch_size=4, local=False, bootstrap=0))
    e2e = result.end_to_end.set_index(["candidate", "output"])
    return e2e.loc[("int8", output)]


def test_text_recognizer_calibrates_builds_with_data_profiles_and_compares():
    model = model_from_proto(models.text_recognizer(), label="text_recognizer")
    calib = from_arrays({"image": _images(8, 64, 0)})
    valid = from_arrays({"image": _images(8, 128, 1)}, role="validation")
    table = calibrate(model, calib, "minmax", batch_size=4).tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    shapes = profiles_from_data({"image": (-1, 3, 48, -1)}, _shape_log(calib, valid, batch_size=4))
    assert shapes["image"].as_lists() == [[1, 3, 48, 64], [4, 3, 48, 128], [4, 3, 48, 128]]
    backend = trt.TensorRTBackend("tensorrt-rtx")
    for proto, label in [(model.proto, "fp32"), (written.proto, "int8")]:
        assert len(backend.build_engine(proto, shapes=shapes, label=f"text_recognizer {label}")) > 10_000
    row = _end_to_end(model, written, valid, "logits")
    assert row["samples"] == 8 and row["cosine"] > 0.99 and row["sqnr_db"] > 20  # INT8 noise, not a broken graph


def test_unrolled_loop_calibrates_builds_and_compares():
    loop = models.refinement_loop(trips=3)  # its scanned "steps" output is [trips, N, 16]: samples on axis 1
    proto, done = resolve_static_control_flow(loop)
    assert done
    model = model_from_proto(proto, label="refinement_loop")
    rng = np.random.default_rng(0)
    calib = from_arrays({"input": rng.normal(0, 1, (16, 16)).astype(np.float32)})
    valid = from_arrays({"input": rng.normal(0, 1, (8, 16)).astype(np.float32)}, role="validation")
    table = calibrate(model, calib, "minmax", batch_size=4).tables["minmax"]
    assert "refine/2/h_out" in table.ranges
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    shapes = profiles_from_data({"input": (-1, 16)}, _shape_log(calib, valid, batch_size=4))
    assert len(trt.TensorRTBackend("tensorrt-rtx").build_engine(written.proto, shapes=shapes)) > 10_000
    row = _end_to_end(model, written, valid, "refined")
    assert row["cosine"] > 0.99 and row["sqnr_db"] > 20
    steps = _end_to_end(model, written, valid, "steps")
    assert steps["samples"] == 8 and steps["cosine"] > 0.99


def _issue_models():
    """(name, proto, feeds of one batch, engine shapes) for each issue-14 test model."""
    from quantlab.shapes import parse_shapes

    rng = np.random.default_rng(3)
    vad = {"input": rng.normal(0, 1, (4, 64)).astype(np.float32),
           "state": rng.normal(0, 0.5, (2, 4, 128)).astype(np.float32)}
    vad_free = models.voice_activity()
    del vad_free.graph.initializer[[i.name for i in vad_free.graph.initializer].index("sr")]
    return [
        ("text_recognizer", models.text_recognizer(), {"image": _images(4, 64, 3)},
         parse_shapes("image:1x3x48x64,4x3x48x128,8x3x48x256")),
        ("voice_activity", models.voice_activity(), vad, parse_shapes("input:1x64,4x64,8x64 state:2x1x128,2x4x128,2x8x128")),
        ("voice_activity_data_sr", vad_free, {**vad, "sr": np.array(8000, np.int64)},
         parse_shapes("input:1x64,4x64,8x64 state:2x1x128,2x4x128,2x8x128")),
        ("refinement_loop", models.refinement_loop(), {"input": rng.normal(0, 1, (4, 16)).astype(np.float32)},
         parse_shapes("input:1x16,4x16,8x16")),
    ]


@pytest.mark.parametrize("which", ["int8", "fp16", "mixed"])
def test_every_issue_model_written_parses_and_builds(which):
    """INT8, FP16 and mixed writes of each model (control flow resolved at load) build with TensorRT-RTX."""
    from quantlab.calibrate import table_from_statistics
    from quantlab.plan import PrecisionPlan, Rule
    from quantlab.stats import collect_statistics

    backend = trt.TensorRTBackend("tensorrt-rtx")
    plan = (PrecisionPlan(default="int8", rules=(Rule("fp16", first=1), Rule("fp32", last=1)))
            if which == "mixed" else uniform_plan(which))
    for name, proto, feeds, shapes in _issue_models():
        model = model_from_proto(proto, label=name)
        table = table_from_statistics(collect_statistics(model, lambda feeds=feeds: [feeds]), "minmax")
        written = write_model(model, plan, table, WriteOptions(target="tensorrt"))
        engine = backend.build_engine(written.proto, shapes=shapes, label=f"{name} ({which})")
        assert len(engine) > 10_000, name


def test_onnx_wheel_model_of_opset_9_and_ir_3_is_written_and_built():
    """light_squeezenet (opset 9, IR 3, weights from ConstantOfShape): upgraded on load to an IR that lets
    initializers stand outside the graph inputs, so the written Q/DQ model passes the checker and builds."""
    import onnx as onnx_module

    from quantlab.graph import load_model
    from quantlab.simplify import fold_constant_subgraphs

    path = Path(onnx_module.__file__).parent / "backend/test/data/light/light_squeezenet.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is not in this onnx wheel")
    model = load_model(path)
    assert model.upgraded_from_opset == 9 and model.proto.ir_version >= 7
    model = model_from_proto(fold_constant_subgraphs(model.proto), label="light_squeezenet")  # weights as initializers
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32)
    table = calibrate(model, from_arrays({"data_0": images}), "minmax", batch_size=1).tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    assert written.plan.counts()["int8"] > 20
    assert len(trt.TensorRTBackend("tensorrt-rtx").build_engine(written.proto, label="light_squeezenet")) > 10_000


_ONNX_LAYER_MODELS = ("test_Conv1d_groups", "test_Conv2d_depthwise_with_multiplier", "test_Conv2d_dilated",
                      "test_Conv3d_dilated_strided", "test_ConvTranspose2d", "test_Linear_no_bias",
                      "test_Embedding", "test_PReLU_2d", "test_PixelShuffle")


def test_onnx_wheel_layer_models_are_written_and_build_where_their_fp32_builds():
    """A sample of the onnx wheel's pytorch-converted layer models (bench/onnx_testdata.py runs all ~140):
    each, with its own test input, is calibrated, written INT8 and built; the written model builds."""
    import onnx as onnx_module
    from onnx import numpy_helper

    from quantlab.calibrate import table_from_statistics
    from quantlab.graph import load_model
    from quantlab.stats import collect_statistics

    folder = Path(onnx_module.__file__).parent / "backend/test/data/pytorch-converted"
    present = [n for n in _ONNX_LAYER_MODELS if (folder / n / "model.onnx").is_file()]
    if not present:
        pytest.skip(f"{folder} holds none of the models")
    backend = trt.TensorRTBackend("tensorrt-rtx")
    quantized = 0
    for name in present:
        model = load_model(folder / name / "model.onnx")
        tensor = onnx_module.TensorProto()
        tensor.ParseFromString((folder / name / "test_data_set_0/input_0.pb").read_bytes())
        feeds = {model.inputs[0].name: numpy_helper.to_array(tensor)}
        table = table_from_statistics(collect_statistics(model, lambda feeds=feeds: [feeds]), "entropy")
        written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
        quantized += written.plan.counts().get("int8", 0) > 0
        assert len(backend.build_engine(written.proto, label=name)) > 1_000, name
    assert quantized >= len(present) - 3  # Embedding, PReLU and PixelShuffle hold no Conv/MatMul/Gemm


# --- issue 14, part 5: every test model through the CLI as a user runs it -------------------------------------
# calibrate (a manifest) -> build --backend tensorrt-rtx without --shapes (profiles from the shapes the table
# recorded) -> compare (ORT) -> search (ORT) -> build of the search's plan with TensorRT-RTX.


def _save_npz(folder: Path, samples: list[dict[str, np.ndarray]]) -> None:
    folder.mkdir(parents=True)
    for i, feeds in enumerate(samples):
        np.savez(folder / f"s{i}.npz", **feeds)


def _manifest(path: Path, folder: str, role: str, extra: str) -> Path:
    path.write_text(f'role = "{role}"\nshuffle = false\n{extra}\n[source]\nkind = "npz"\npath = "{folder}"\n')
    return path


def _cli(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from quantlab.cli import main

    capfd.readouterr()
    code = int(main([str(a) for a in argv]))
    out, err = capfd.readouterr()
    return code, out + err


def _no_invented_ones(profiles: dict, batch_axes: dict) -> None:
    """No profile puts a dim at 1 except on the batch axis (a last partial batch): the data had none."""
    for name, (lo, _opt, _hi) in profiles.items():
        assert all(d > 1 or axis == batch_axes[name] for axis, d in enumerate(lo)), (name, lo)


def _through_the_cli(tmp_path: Path, capfd, proto, calib: list[dict], valid: list[dict], manifest_extra: str,
                     method: str = "minmax") -> dict:
    """calibrate -> build (RTX, profiles from the table) -> compare -> search -> build the plan; what each gave."""
    import json

    import onnx

    from quantlab.compare import load_candidate
    from quantlab.data import open_dataset
    from quantlab.graph import load_model

    onnx.save(proto, tmp_path / "model.onnx")
    _save_npz(tmp_path / "calib", calib)
    _save_npz(tmp_path / "valid", valid)
    cal = _manifest(tmp_path / "calib.toml", "calib", "calibration", manifest_extra)
    val = _manifest(tmp_path / "valid.toml", "valid", "validation", manifest_extra)
    model_path = tmp_path / "model.onnx"
    code, text = _cli(["calibrate", model_path, "--calib", cal, "--method", method, "--batch-size", 2,
                       "--no-progress", "--out", tmp_path / "cal"], capfd)
    assert code == 0, text
    table = tmp_path / "cal" / f"calib_{method}.json"
    code, text = _cli(["build", model_path, "--table", table, "--backend", "tensorrt-rtx", "--out", tmp_path / "int8"],
                      capfd)
    assert code == 0, text
    engine = json.loads((tmp_path / "int8" / "engine.json").read_text())
    assert engine["profiles_from"] == "the calibration data" and engine["engine_bytes"] > 10_000
    _no_invented_ones(engine["profiles"], json.loads(table.read_text())["calib_set"]["batch_axes"])
    model = load_model(model_path)
    result = compare(model, {"int8": load_candidate(tmp_path / "int8", model)}, open_dataset(val),
                     CompareOptions(batch_size=2, local=False, bootstrap=0))
    code, text = _cli(["search", model_path, "--table", table, "--data", val, "--threshold", "cosine>=0.9",
                       "--budget", 2, "--batch-size", 2, "--out", tmp_path / "search"], capfd)
    assert code == 0 and "met: " in text and (tmp_path / "search" / "final" / "model.onnx").is_file(), text
    code, text = _cli(["build", model_path, "--table", table, "--plan", tmp_path / "search" / "plan.json",
                       "--backend", "tensorrt-rtx", "--out", tmp_path / "mixed"], capfd)
    assert code == 0, text
    written = onnx.load(tmp_path / "int8" / "model.onnx")
    return {"table": json.loads(table.read_text()), "profiles": engine["profiles"],
            "quantized": {n.input[0] for n in written.graph.node if n.op_type == "QuantizeLinear"},
            "end_to_end": result.end_to_end.set_index(["candidate", "output"]),
            "search": json.loads((tmp_path / "search" / "search.json").read_text())}




@pytest.mark.slow
def test_recognizer_lines_of_several_widths_end_to_end(tmp_path, capfd):
    rng = np.random.default_rng(0)
    line = lambda w: {"image": rng.uniform(-1, 1, (3, 48, w)).astype(np.float32)}  # noqa: E731
    got = _through_the_cli(tmp_path, capfd, models.text_recognizer(), [line(w) for w in (64, 128, 64, 64, 192, 64)],
                           [line(w) for w in (128, 64, 128)], 'batching = "by_shape"')
    # [*sample shape, samples], the most frequent first; the batch axis of the profile: 1..PROFILE_BATCH
    assert got["table"]["calib_set"]["input_shapes"] == {"image": [[1, 3, 48, 64, 4], [1, 3, 48, 128, 1],
                                                                   [1, 3, 48, 192, 1]]}
    assert got["profiles"] == {"image": [[1, 3, 48, 64], [8, 3, 48, 64], [8, 3, 48, 192]]}
    row = got["end_to_end"].loc[("int8", "logits")]
    assert row["samples"] == 3 and row["cosine"] > 0.99


@pytest.mark.slow
def test_transformer_with_padded_sentences_and_an_additive_mask_end_to_end(tmp_path, capfd):
    """[pad] to a multiple of 4 with the mask quantlab makes (0 / -1e9): profiles follow the padded lengths."""
    rng = np.random.default_rng(1)
    sentence = lambda n: {"x": rng.normal(0, 1, (n, 16)).astype(np.float32)}  # noqa: E731
    pad = '[pad]\ninputs = ["x"]\nto = 4\nmask = "mask"\nmask_values = [0.0, -1e9]'
    got = _through_the_cli(tmp_path, capfd, models.dynamic_attention(), [sentence(n) for n in (3, 2, 8, 7, 4, 4)],
                           [sentence(n) for n in (5, 3, 6, 2)], pad)
    assert got["table"]["calib_set"]["manifest"]["padding"]["mask"] == "mask"
    assert got["profiles"] == {"x": [[1, 4, 16], [8, 4, 16], [8, 8, 16]], "mask": [[1, 4], [8, 4], [8, 8]]}
    assert not {"mask", "mask4", "masked"} & got["quantized"]  # the additive mask stays float: INT8 would lose it
    row = got["end_to_end"].loc[("int8", "out")]
    assert row["samples"] == 4 and row["cosine"] > 0.97  # INT8 noise of six 16-wide MatMul inputs (~0.99 here)


@pytest.mark.slow
def test_voice_activity_with_state_on_axis_1_end_to_end(tmp_path, capfd):
    """The If on the sample rate (an initializer) is inlined, state is batched on axis 1: so are its profiles."""
    rng = np.random.default_rng(2)
    chunk = lambda: {"input": rng.normal(0, 1, 64).astype(np.float32),  # noqa: E731
                     "state": rng.normal(0, 0.5, (2, 128)).astype(np.float32)}
    proto = models.voice_activity()
    axes = '[inputs]\ninput = "input"\nstate = { field = "state", batch_axis = 1 }'
    got = _through_the_cli(tmp_path, capfd, proto, [chunk() for _ in range(5)], [chunk() for _ in range(4)], axes)
    assert got["table"]["calib_set"]["batch_axes"] == {"input": 0, "state": 1}
    assert got["profiles"] == {"input": [[1, 64], [8, 64], [8, 64]], "state": [[2, 1, 128], [2, 8, 128], [2, 8, 128]]}
    assert any("16k" in name for name in got["table"]["tensors"])  # the taken branch's tensors are calibrated
    row = got["end_to_end"].loc[("int8", "prob")]
    assert row["samples"] == 4 and np.isnan(row["cosine"])  # one value per sample: no cosine (always 1)
    assert row["sqnr_db"] > 30  # 43 dB here
    assert got["end_to_end"].loc[("int8", "stateN")]["samples"] == 4  # an output batched on axis 1 compared too


@pytest.mark.slow
def test_hardsigmoid_spike_detector_end_to_end(tmp_path, capfd):
    """Most HardSigmoid outputs sit at exactly 0 or 1 (a third at 1.0): entropy's range for it keeps the plateau."""
    rng = np.random.default_rng(3)
    image = lambda h, w: {"image": rng.uniform(-1, 1, (3, h, w)).astype(np.float32)}  # noqa: E731
    got = _through_the_cli(tmp_path, capfd, models.hardsigmoid_detector(),
                           [image(32, 48), image(32, 48), image(48, 64), image(48, 64)],
                           [image(32, 48), image(48, 64)], 'batching = "by_shape"', method="entropy")
    assert got["profiles"] == {"image": [[1, 3, 32, 48], [8, 3, 48, 64], [8, 3, 48, 64]]}
    gate = got["table"]["tensors"]["gate"]
    assert gate["max"] == 1.0 and gate["amax"] >= 1.0  # the plateau at 1.0 is inside the range, not clipped
    row = got["end_to_end"].loc[("int8", "prob")]
    assert row["samples"] == 2 and row["cosine"] > 0.99


def _hf_bert_classifier() -> bytes:
    """A two-layer BERT sequence classifier as Hugging Face transformers builds it (random weights, seed 0), exported
    by torch's TorchScript exporter: the graph patterns of a real HF export (the attention mask turned into
    ``Where(mask, float32.min)``, Erf GELU, LayerNormalization, a Gather embedding, dynamic batch and length)."""
    import io
    import warnings

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=3, attn_implementation="eager")
    net = BertForSequenceClassification(config).eval()
    ids = torch.randint(1, 512, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python booleans in the mask code
        torch.onnx.export(net, (ids, mask), out, input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "N", 1: "T"}, "attention_mask": {0: "N", 1: "T"},
                                        "logits": {0: "N"}}, opset_version=17, dynamo=False)
    return out.getvalue()


@pytest.mark.slow
def test_hugging_face_bert_with_padded_sentences_end_to_end(tmp_path, capfd):
    """A real exporter's transformer through the CLI: the float32.min mask is left out of the ranges and of INT8,
    the engine's profile admits the shortest sentence alone (not only the shortest padded batch), INT8 logits
    hold up on ONNX Runtime."""
    import onnx

    proto = onnx.load_from_string(_hf_bert_classifier())
    rng = np.random.default_rng(4)
    sentence = lambda n: {"input_ids": rng.integers(1, 512, n).astype(np.int64)}  # noqa: E731
    calib_lengths, valid_lengths = [12, 5, 20, 9, 16, 7, 18, 11], [6, 14, 9, 19]
    got = _through_the_cli(tmp_path, capfd, proto, [sentence(n) for n in calib_lengths],
                           [sentence(n) for n in valid_lengths], '[pad]\ninputs = ["input_ids"]\nmask = "attention_mask"')
    assert got["table"]["calib_set"]["manifest"]["padding"]["mask"] == "attention_mask"
    # batches of 2 are padded to 12, 20, 16, 18; the engine must still take a 5-token sentence alone
    assert got["profiles"]["input_ids"][0] == [1, min(calib_lengths)]
    assert got["profiles"]["input_ids"][2] == [8, max(calib_lengths)]
    assert got["profiles"]["attention_mask"] == got["profiles"]["input_ids"]
    tensors = got["table"]["tensors"]
    huge = [name for name, t in tensors.items() if t.get("excluded", {}).get("huge", 0) > 0]  # the masked scores: float32.min
    assert huge and all(np.isfinite(tensors[name]["amax"]) and tensors[name]["amax"] < 1e3 for name in huge)
    assert not set(huge) & got["quantized"]  # a mask at float32.min in INT8 would turn into garbage
    assert any("MatMul" in name for name in tensors) and len(got["quantized"]) >= 12  # the linear layers are INT8
    row = got["end_to_end"].loc[("int8", "logits")]
    assert row["samples"] == len(valid_lengths) and row["cosine"] > 0.99
    assert got["search"]["met"]
