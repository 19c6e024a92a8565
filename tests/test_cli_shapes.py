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
    assert table.calib_set["input_shapes"] == {"image": [[2, 3, 48, 96, 2]]}  # [*shape, batches]
    assert table.calib_set["batch_axes"] == {"image": 0}
    write_table(table, tmp_path / "t.json")
    code, _, _ = _run(["build", str(recognizer), "--table", str(tmp_path / "t.json"), "--backend", "tensorrt-rtx",
                       "--out", str(tmp_path / "b")], capfd)
    assert code == ExitCode.OK
    info = json.loads((tmp_path / "b" / "engine.json").read_text())
    assert info["profiles"] == {"image": [[1, 3, 48, 96], [2, 3, 48, 96], [2, 3, 48, 96]]}
    assert info["profiles_from"] == "the calibration data"


def test_perf_times_the_opt_shape(recognizer, tmp_path, capfd):
    code, _, _ = _run(["perf", str(recognizer), "--backend", "ort", "--iterations", "3", "--warmup", "1",
                       "--shapes", "image:1x3x48x64,2x3x48x128,4x3x48x256", "--json", str(tmp_path / "p.json")], capfd)
    assert code == ExitCode.OK
    assert json.loads((tmp_path / "p.json").read_text())["results"][0]["latency"]["batch_size"] == 2
    code, _, err = _run(["perf", str(recognizer), "--backend", "ort", "--shapes", "image:1x3x32x64"], capfd)
    assert code == ExitCode.BAD_INPUT and "axis 2" in err and "write 48" in err
