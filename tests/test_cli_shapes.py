"""``--shapes`` on ``quantlab build`` and ``quantlab perf``: profiles given, recorded in engine.json, errors named."""

from __future__ import annotations

import json
from pathlib import Path

import models
import numpy as np
import onnx
import pytest

from quantlab.cli import ExitCode, main

pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed: pip install 'quantlab[tensorrt-rtx]'")


@pytest.fixture
def recognizer(tmp_path: Path) -> Path:
    path = tmp_path / "rec.onnx"
    onnx.save(models.text_recognizer(), path)
    return path


def _run(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capfd.readouterr()
    code = main(argv)
    out, err = capfd.readouterr()
    return int(code), out, err


def test_build_with_shapes_records_the_profiles(recognizer, tmp_path, capfd):
    build = ["build", str(recognizer), "--precision", "fp32", "--backend", "tensorrt-rtx"]
    code, out, _ = _run([*build, "--out", str(tmp_path / "b"), "--shapes", "image:1x3x48x64,8x3x48x320,32x3x48x1600"],
                        capfd)
    assert code == ExitCode.OK
    info = json.loads((tmp_path / "b" / "engine.json").read_text())
    assert info["profiles"] == {"image": [[1, 3, 48, 64], [8, 3, 48, 320], [32, 3, 48, 1600]]}
    assert info["profiles_from"] == "--shapes" and "profiles from --shapes: image:1x3x48x64," in out

    code, _, err = _run([*build, "--out", str(tmp_path / "guess")], capfd)  # the OCR failure, explained
    assert code != ExitCode.OK and not (tmp_path / "guess").exists()
    assert "violate shape constraints" in err and "--shapes image:" in err

    code, _, err = _run([*build, "--out", str(tmp_path / "bad"), "--shapes", "image:1x3x48x64,8x3x48x320"], capfd)
    assert code == ExitCode.BAD_INPUT and "'image' has 2 shapes" in err and "NAME:MIN,OPT,MAX" in err
    code, _, err = _run(["build", str(recognizer), "--precision", "fp32", "--out", str(tmp_path / "o"),
                         "--shapes", "image:1x3x48x64"], capfd)
    assert code == ExitCode.BAD_INPUT and "ONNX Runtime runs any shape" in err


def test_build_takes_the_shapes_a_calibration_table_recorded(recognizer, tmp_path, capfd):
    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays
    from quantlab.graph import load_model
    from quantlab.table import write_table

    images = np.random.default_rng(0).uniform(-1, 1, (4, 3, 48, 96)).astype(np.float32)
    table = calibrate(load_model(recognizer), from_arrays({"image": images}), "minmax", batch_size=2).tables["minmax"]
    assert table.calib_set["input_shapes"] == {"image": [[1, 3, 48, 96, 4]]}  # [*sample shape, samples]
    assert table.calib_set["batch_axes"] == {"image": 0}
    write_table(table, tmp_path / "t.json")
    code, out, _ = _run(["build", str(recognizer), "--table", str(tmp_path / "t.json"), "--backend", "tensorrt-rtx",
                         "--out", str(tmp_path / "b")], capfd)
    assert code == ExitCode.OK
    info = json.loads((tmp_path / "b" / "engine.json").read_text())
    assert info["profiles"] == {"image": [[1, 3, 48, 96], [8, 3, 48, 96], [8, 3, 48, 96]]}  # batch: PROFILE_BATCH
    assert info["profiles_from"] == "the calibration data"
    # lines of 96 px only: a narrower or wider line is refused at run time, which the build now says
    note = "the engine takes only the sizes the calibration data had on the model's dynamic axes ('image' axis 3: 96)"
    assert note in out and "give --shapes NAME:MIN,OPT,MAX" in out and info["profile_note"].startswith(note[:40])


def test_perf_times_the_opt_shape(recognizer, tmp_path, capfd):
    code, _, _ = _run(["perf", str(recognizer), "--backend", "ort", "--iterations", "3", "--warmup", "1",
                       "--shapes", "image:1x3x48x64,2x3x48x128,4x3x48x256", "--json", str(tmp_path / "p.json")], capfd)
    assert code == ExitCode.OK
    assert json.loads((tmp_path / "p.json").read_text())["results"][0]["latency"]["batch_size"] == 2
    code, _, err = _run(["perf", str(recognizer), "--backend", "ort", "--shapes", "image:1x3x32x64"], capfd)
    assert code == ExitCode.BAD_INPUT and "axis 2" in err and "write 48" in err


def _line_sets(tmp_path: Path) -> tuple[Path, Path]:
    """Calibration lines of width 64 (3) and validation lines of widths 128 and 64, batched by shape."""
    rng = np.random.default_rng(0)
    paths = []
    for folder, widths in (("calib", (64, 64, 64)), ("valid", (128, 64))):
        (tmp_path / folder).mkdir()
        for i, w in enumerate(widths):
            np.save(tmp_path / folder / f"l{i}.npy", rng.uniform(-1, 1, (3, 48, w)).astype(np.float32))
        paths.append(tmp_path / f"{folder}.toml")
        paths[-1].write_text(f'batching = "by_shape"\nshuffle = false\n[source]\nkind = "npy"\npath = "{folder}"\n'
                             '[inputs]\nimage = "array"\n')
    return paths[0], paths[1]


def test_search_takes_shapes_or_derives_them_from_calibration_and_validation_data(recognizer, tmp_path, capfd):
    calib, valid = _line_sets(tmp_path)
    search = ["search", str(recognizer), "--calib", str(calib), "--data", str(valid), "--threshold", "cosine>=0.9",
              "--batch-size", "2"]
    code, out, err = _run([*search, "--out", str(tmp_path / "ort"), "--shapes", "image:1x3x48x64"], capfd)
    assert code != ExitCode.OK and "ONNX Runtime runs any shape" in err and not (tmp_path / "ort").exists()
    code, out, err = _run([*search, "--backend", "tensorrt-rtx", "--shapes", "image:1x3x32x64",
                           "--out", str(tmp_path / "bad")], capfd)
    assert code == ExitCode.BAD_INPUT and "--shapes: input 'image'" in err and "write 48" in err
    # no --shapes: the table's calibration lines (64 wide) and the validation's (128, 64), batch 1..--batch-size
    code, out, err = _run([*search, "--backend", "tensorrt-rtx", "--out", str(tmp_path / "rtx")], capfd)
    assert "engine profiles image:1x3x48x64,2x3x48x64,2x3x48x128 (from the calibration and validation data)" in out
    assert code == ExitCode.OK or "no CUDA GPU" in err  # the engines build anywhere; running them needs a GPU


def test_search_options_give_every_engine_the_shapes(recognizer):
    """SearchOptions.shapes become the backend's default ranges (what the evaluator's runners and the
    comparator's get): the written INT8 candidate builds with exactly those profiles."""
    from quantlab.backends import get_backend
    from quantlab.errors import SearchError
    from quantlab.search import SearchOptions

    text = "image:1x3x48x64,2x3x48x128,4x3x48x256"
    options = SearchOptions(threshold="cosine>=0.9", backend="tensorrt-rtx", shapes=text)
    options.check()
    backend = get_backend(options.backend, **options.backend_options)
    proto = onnx.load(recognizer)
    assert backend.profiles_for(proto) == {"image": [[1, 3, 48, 64], [2, 3, 48, 128], [4, 3, 48, 256]]}
    assert len(backend.build_engine(proto, label="recognizer")) > 10_000
    assert SearchOptions(threshold="cosine>=0.9").backend_options == {}
    with pytest.raises(SearchError, match="ONNX Runtime runs any shape"):
        SearchOptions(threshold="cosine>=0.9", shapes=text).check()
    with pytest.raises(SearchError, match="'image' has 2 shapes"):
        SearchOptions(threshold="cosine>=0.9", backend="tensorrt-rtx", shapes="image:1x3x48x64,2x3x48x64").check()


def test_experiment_engine_shapes_come_from_the_file_or_the_data(recognizer, tmp_path):
    from quantlab.calibrate import calibrate
    from quantlab.data import open_dataset
    from quantlab.experiment.spec import parse_experiment
    from quantlab.experiment.stages import engine_shapes_for
    from quantlab.graph import load_model

    calib, valid = _line_sets(tmp_path)
    model = load_model(recognizer)
    table = calibrate(model, open_dataset(calib), "minmax", batch_size=2).tables["minmax"]
    head = f'backend = "tensorrt-rtx"\n[data]\ncalibration = "{calib}"\nvalidation = "{valid}"\n[model]\npath = "{recognizer}"\n'
    derived = engine_shapes_for(parse_experiment(head), model, table, open_dataset(valid))
    assert derived == "image:1x3x48x64,8x3x48x64,8x3x48x128"  # the batch up to the stages' batch size (8)
    given = parse_experiment(head + 'shapes = "image:1x3x48x64,8x3x48x320,32x3x48x1600"\n')
    assert engine_shapes_for(given, model, table, open_dataset(valid)) == "image:1x3x48x64,8x3x48x320,32x3x48x1600"
    ort = parse_experiment(head.replace("tensorrt-rtx", "ort"))
    assert engine_shapes_for(ort, model, table, open_dataset(valid)) is None


def test_build_of_a_model_with_onnx_runtime_ops_says_so_and_writes_nothing(tmp_path, capfd):
    """MatMul -> com.microsoft FastGelu (an ORT-optimized transformer's): INT8 calibrates and runs on ONNX Runtime;
    the TensorRT build fails naming the domain, without the FP32 check's 'report it upstream' (no TensorRT bug)."""
    from onnx import TensorProto, helper, numpy_helper

    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays
    from quantlab.graph import load_model
    from quantlab.table import write_table

    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.3, (8, 8)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
         helper.make_node("FastGelu", ["h"], ["y"], name="gelu_fused", domain="com.microsoft")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], initializer=[w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]),
              tmp_path / "opt.onnx")
    x = np.random.default_rng(1).normal(0, 1, (16, 8)).astype(np.float32)
    table = calibrate(load_model(tmp_path / "opt.onnx"), from_arrays({"x": x}), "minmax").tables["minmax"]
    write_table(table, tmp_path / "t.json")
    code, _, err = _run(["build", str(tmp_path / "opt.onnx"), "--table", str(tmp_path / "t.json"), "--backend",
                         "tensorrt-rtx", "--out", str(tmp_path / "int8"), "--no-progress"], capfd)
    assert code == ExitCode.BAD_INPUT and not (tmp_path / "int8").exists()
    assert "opt.onnx" in err and "gelu_fused" in err and "com.microsoft" in err and "transformer optimizer" in err
    assert "report it upstream" not in err


def _gru_with_state(tmp_path: Path) -> Path:
    """feats [batch, 16, time] -> GRU (batch on axis 1 of its state h0 [1, batch, 8]) -> hn."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["feats"], ["ft"], perm=[2, 0, 1]),
         helper.make_node("GRU", ["ft", "W", "R", "", "", "h0"], ["y", "hn"], hidden_size=8)], "gru",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, ["batch", 16, "time"]),
         helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "batch", 8])],
        [helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, "batch", 8])],
        [onnx.numpy_helper.from_array(rng.normal(0, 0.3, (1, 24, 16)).astype(np.float32), "W"),
         onnx.numpy_helper.from_array(rng.normal(0, 0.3, (1, 24, 8)).astype(np.float32), "R")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "gru.onnx")
    return tmp_path / "gru.onnx"


def test_shapes_fill_an_input_left_out_from_the_symbols_it_shares_and_refuse_two_ranges_for_one(tmp_path, capfd):
    """--shapes for feats only: the state h0 shares its batch symbol, took the default guess, and TensorRT refused
    ("Dimensions with name batch must be equal"), which quantlab blamed on the graph. h0 now takes the batch's
    range from feats; two optimum sizes for one symbol are refused before any build, naming both inputs (other
    minima build: ranges from data see a state's batch from 2)."""
    from quantlab.backends.tensorrt.builder import input_symbols, resolve_profiles
    from quantlab.shapes import ShapeRange

    path = _gru_with_state(tmp_path)
    model = onnx.load(path)
    symbols = input_symbols(model)
    assert symbols == {"feats": ("batch", None, "time"), "h0": (None, "batch", None)}
    feats = ShapeRange("feats", (1, 16, 10), (4, 16, 32), (8, 16, 64))
    profiles, guessed = resolve_profiles({"feats": (-1, 16, -1), "h0": (1, -1, 8)}, None, {"feats": feats}, symbols)
    assert profiles["h0"] == ((1, 1, 8), (1, 4, 8), (1, 8, 8)) and not guessed
    code, out, err = _run(["build", str(path), "--precision", "fp32", "--backend", "tensorrt-rtx", "--out",
                           str(tmp_path / "b"), "--shapes", "feats:1x16x10,4x16x32,8x16x64"], capfd)
    assert code == ExitCode.OK, err
    info = json.loads((tmp_path / "b" / "engine.json").read_text())
    assert info["profiles"]["h0"] == [[1, 1, 8], [1, 4, 8], [1, 8, 8]]
    code, _, err = _run(["build", str(path), "--precision", "fp32", "--backend", "tensorrt-rtx", "--out",
                         str(tmp_path / "bad"), "--shapes", "feats:1x16x10,4x16x32,8x16x64",
                         "--shapes", "h0:1x1x8,1x2x8,1x4x8"], capfd)
    assert code == ExitCode.BAD_INPUT and "give dimension 'batch' two optimum sizes" in err and "'h0' axis 1" in err
    assert not (tmp_path / "bad").exists()
