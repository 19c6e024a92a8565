"""Experiments: the TOML file (validation with key + line), stages reused and restarted, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantlab.errors import ExperimentError
from quantlab.experiment import CALIBRATORS, ExperimentConfig, load_experiment, parse_experiment

GOOD = """\
name = "unit"
seed = 3
threshold = "cosine>=0.99"

[model]
path = "model.onnx"

[data]
calibration = "calib.toml"
validation = "val.toml"

[calibrate]
methods = ["minmax", "entropy"]

[candidates]
fp16 = false
int8 = ["minmax"]

[search]
enabled = false
"""


@pytest.fixture
def exp_dir(tmp_path: Path) -> Path:
    for name in ("model.onnx", "calib.toml", "val.toml"):
        (tmp_path / name).write_text("x")
    (tmp_path / "e.toml").write_text(GOOD)
    return tmp_path


def test_good_file_parses_with_paths_relative_to_it(exp_dir: Path) -> None:
    cfg = load_experiment(exp_dir / "e.toml")
    assert cfg.name == "unit" and cfg.seed == 3 and cfg.threshold == "cosine>=0.99"
    assert cfg.model_path == (exp_dir / "model.onnx").resolve()
    assert cfg.calibrators == ("minmax", "entropy") and cfg.int8 == ("minmax",)
    assert cfg.fp16 is False and cfg.search is False and cfg.backend == "ort"


def test_defaults_fill_what_is_left_out(exp_dir: Path) -> None:
    text = 'model = { path = "model.onnx" }\ndata = { calibration = "calib.toml", validation = "val.toml" }\n'
    cfg = parse_experiment(text, source=exp_dir / "minimal.toml")
    assert cfg.name == "minimal" and cfg.calibrators == CALIBRATORS and cfg.int8 == CALIBRATORS
    assert cfg.threshold is None and cfg.fp16 and cfg.search


@pytest.mark.parametrize(
    ("old", "new", "line", "words"),
    [
        ("seed = 3", "seed = 3\ncolour = 1", 3, ["key 'colour'", "unknown key"]),
        ("fp16 = false", "fp16 = false\nbf16 = true", 17, ["[candidates] key 'bf16'", "Did you mean 'fp16'"]),
        ("seed = 3", 'seed = "three"', 2, ["key 'seed'", "integer", "string"]),
        ("enabled = false", "enabled = 1", 20, ["[search] key 'enabled'", "true or false"]),
        ('validation = "val.toml"', 'validation = "nope.toml"', 10, ["[data] key 'validation'", "nope.toml"]),
        ('methods = ["minmax", "entropy"]', 'methods = ["minmax", "kl"]', 13, ["[calibrate] key 'methods'", "'kl'"]),
        ('int8 = ["minmax"]', 'int8 = ["percentile"]', 17, ["[candidates] key 'int8'", "percentile"]),
        ('threshold = "cosine>=0.99"', 'threshold = "cosine is high"', 3, ["key 'threshold'"]),
        ('threshold = "cosine>=0.99"', 'threshold = "top1_agree>=99"', 3,
         ["key 'threshold'", "unknown metric 'top1_agree'", "did you mean 'top1_agreement'"]),
    ],
)
def test_bad_key_names_key_and_line(exp_dir: Path, old: str, new: str, line: int, words: list[str]) -> None:
    path = exp_dir / "bad.toml"
    path.write_text(GOOD.replace(old, new))
    with pytest.raises(ExperimentError) as info:
        load_experiment(path)
    msg = str(info.value)
    assert f"bad.toml: line {line}:" in msg, msg
    for w in words:
        assert w in msg, msg


def test_ctc_blank_lets_the_threshold_name_the_text_figures(exp_dir: Path) -> None:
    base = 'model = { path = "model.onnx" }\ndata = { calibration = "calib.toml", validation = "val.toml" }\n'
    cfg = parse_experiment('threshold = "cer<=2"\nctc_blank = 0\n' + base, source=exp_dir / "ocr.toml")
    assert cfg.ctc_blank == 0 and cfg.settings()["ctc_blank"] == 0
    assert "ctc_blank" not in parse_experiment(base, source=exp_dir / "plain.toml").settings()  # older keys stay
    with pytest.raises(ExperimentError, match="unknown metric 'cer'"):
        parse_experiment('threshold = "cer<=2"\n' + base, source=exp_dir / "ocr.toml")
    with pytest.raises(ExperimentError, match="ctc_blank"):
        parse_experiment('ctc_blank = -1\n' + base, source=exp_dir / "ocr.toml")


def test_decision_threshold_is_a_probability_recorded_when_set(exp_dir: Path) -> None:
    base = 'model = { path = "model.onnx" }\ndata = { calibration = "calib.toml", validation = "val.toml" }\n'
    cfg = parse_experiment('threshold = "mask_iou>=95"\ndecision_threshold = 0.3\n' + base, source=exp_dir / "db.toml")
    assert cfg.decision_threshold == 0.3 and cfg.settings()["decision_threshold"] == 0.3
    assert "decision_threshold" not in parse_experiment(base, source=exp_dir / "plain.toml").settings()
    for bad in ("1.5", "0", '"0.3"', "true"):
        with pytest.raises(ExperimentError, match="decision_threshold.*a probability in \\(0, 1\\)"):
            parse_experiment(f"decision_threshold = {bad}\n" + base, source=exp_dir / "db.toml")


def test_class_maps_are_output_names_recorded_when_set(exp_dir: Path) -> None:
    base = 'model = { path = "model.onnx" }\ndata = { calibration = "calib.toml", validation = "val.toml" }\n'
    cfg = parse_experiment('threshold = "miou>=95"\nclass_maps = ["logits"]\n' + base, source=exp_dir / "seg.toml")
    assert cfg.class_maps == ("logits",) and cfg.settings()["class_maps"] == ["logits"]
    assert "class_maps" not in parse_experiment(base, source=exp_dir / "plain.toml").settings()
    for bad in ('"logits"', "[]", '[""]', "[1]"):
        with pytest.raises(ExperimentError, match="class_maps.*a list of output names"):
            parse_experiment(f"class_maps = {bad}\n" + base, source=exp_dir / "seg.toml")


def test_model_needs_exactly_one_source(exp_dir: Path) -> None:
    path = exp_dir / "two.toml"
    path.write_text(GOOD.replace('path = "model.onnx"', 'path = "model.onnx"\nzoo = "efficientnet_lite0"'))
    with pytest.raises(ExperimentError, match=r"two.toml: line 5: \[model\]: give exactly one of 'model.path'"):
        load_experiment(path)


def test_not_toml_and_missing_file(exp_dir: Path) -> None:
    bad = exp_dir / "broken.toml"
    bad.write_text("name = \n")
    with pytest.raises(ExperimentError, match="not valid TOML.*line 1"):
        load_experiment(bad)
    with pytest.raises(ExperimentError, match="no such experiment file"):
        load_experiment(exp_dir / "absent.toml")


# --------------------------------------------------------------------------- stages

from quantlab.experiment import STAGE_KEY_FILE, run_stage  # noqa: E402


def test_stage_is_reused_only_when_its_key_is_unchanged(tmp_path: Path) -> None:
    calls: list[int] = []

    def produce(folder: Path) -> None:
        calls.append(1)
        (folder / "out.txt").write_text(str(len(calls)))

    first = run_stage(tmp_path, "calibrate", {"model": "a", "n": 1}, produce)
    again = run_stage(tmp_path, "calibrate", {"n": 1, "model": "a"}, produce)  # same key, other order
    assert not first.reused and again.reused and len(calls) == 1
    changed = run_stage(tmp_path, "calibrate", {"model": "a", "n": 2}, produce)
    assert not changed.reused and len(calls) == 2
    assert (changed.path / "out.txt").read_text() == "2"
    assert first.key_sha256 != changed.key_sha256


def test_interrupted_stage_leaves_nothing_that_looks_finished(tmp_path: Path) -> None:
    run_stage(tmp_path, "build", {"v": 1}, lambda f: (f / "model.onnx").write_text("old"))

    def crash(folder: Path) -> None:
        (folder / "model.onnx").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, "build", {"v": 2}, crash)
    stage = tmp_path / "stages" / "build"
    # the previous complete result is untouched, its key still says v=1, no temp folders are left
    assert (stage / "model.onnx").read_text() == "old"
    assert '"v": 1' in (stage / STAGE_KEY_FILE).read_text()
    assert [p.name for p in (tmp_path / "stages").iterdir()] == ["build"]
    redo = run_stage(tmp_path, "build", {"v": 2}, lambda f: (f / "model.onnx").write_text("new"))
    assert not redo.reused and (stage / "model.onnx").read_text() == "new"


# --------------------------------------------------------------------------- whole runs on small models

import importlib.util  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pandas as pd  # noqa: E402

import models  # noqa: E402
from quantlab.cli import main as cli_main  # noqa: E402
from quantlab.experiment import run_experiment  # noqa: E402
from quantlab.fingerprint import sha256_file  # noqa: E402

EVIL = "<script>alert(1)</script>"
needs_compare = pytest.mark.skipif(importlib.util.find_spec("quantlab.compare") is None,
                                   reason="quantlab/compare.py (the comparator) is not in this tree yet")


def _small_experiment(folder: Path, *, threshold: str = "cosine>=0.9", evil: bool = True,
                      search: bool = False, calib_shape: tuple[int, ...] = (24, 3, 16, 16)) -> Path:
    model = models.residual_net()
    if evil:  # a model-supplied name that must come out of the report as text
        for node in model.graph.node:
            if node.name == "stem_conv":
                node.name = EVIL
    onnx.save(model, folder / "model.onnx")
    rng = np.random.default_rng(0)
    np.savez(folder / "calib.npz", input=rng.normal(0, 1, calib_shape).astype(np.float32))
    np.savez(folder / "val.npz", input=rng.normal(0, 1, (16, 3, 16, 16)).astype(np.float32))
    for role, name in (("calibration", "calib"), ("validation", "val")):
        (folder / f"{name}.toml").write_text(
            f'role = "{role}"\nshuffle = false\n[[source]]\nkind = "npz"\npath = "{name}.npz"\nbatched = true\n')
    path = folder / "small.toml"
    path.write_text(
        f'name = "small"\nthreshold = "{threshold}"\n[model]\npath = "model.onnx"\n'
        '[data]\ncalibration = "calib.toml"\nvalidation = "val.toml"\n'
        '[calibrate]\nmethods = ["minmax", "entropy"]\n'
        f'[search]\nenabled = {"true" if search else "false"}\n'
    )
    return path


@needs_compare
def test_run_writes_a_finished_report_and_reuses_stages(tmp_path: Path) -> None:
    cfg = load_experiment(_small_experiment(tmp_path))
    first = run_experiment(cfg, reports_dir=tmp_path / "reports", command="quantlab run small.toml")
    report = tmp_path / "reports" / "small"
    assert first.index_html == report / "index.html" and first.index_html.is_file()
    manifest = json.loads((report / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["model"]["sha256"]
    assert manifest["command"] == "quantlab run small.toml" and "onnxruntime" in manifest["versions"]
    assert (report / "results" / "end_to_end.parquet").is_file() and (report / "results" / "end_to_end.csv").is_file()
    page = first.index_html.read_text()
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert first.verdict is not None and first.verdict.threshold == "cosine>=0.9"
    assert not any(s.reused for s in first.stages)

    again = run_experiment(cfg, reports_dir=tmp_path / "reports")
    assert all(s.reused for s in again.stages if s.name != "report")
    assert again.verdict == first.verdict
    _the_plan_says_why_without_a_search(page, first.verdict.candidate)
    _fp16_is_measured_in_simulation(tmp_path, report, first.messages)
    _per_layer_rows_carry_their_inputs_predicted_sqnr(report)


def _the_plan_says_why_without_a_search(page: str, candidate: str) -> None:
    """Without a search the report's plan is the verdict candidate's: each group says it is that candidate's
    precision (its written plan, an override per group, said only "overrides", as if a user had pinned them)."""
    plan = page[page.index("precision plan"):]
    assert f"INT8 in candidate &#x27;{candidate}&#x27;" in plan or f"INT8 in candidate '{candidate}'" in plan
    assert "<td>overrides</td>" not in plan


def _per_layer_rows_carry_their_inputs_predicted_sqnr(report: Path) -> None:
    """Each INT8 candidate's per-layer row names the lowest predicted SQNR of the layer's quantized inputs, as its
    own table records it for them; fp16 has no ranges (nan)."""
    from quantlab.experiment import load_written
    from quantlab.graph import load_model
    from quantlab.table import read_table

    layers = pd.read_parquet(report / "results" / "per_layer.parquet")
    assert layers.loc[layers["candidate"] == "fp16", "input_sqnr_pred"].isna().all()
    written = load_written(report / "stages" / "build-int8-minmax", load_model(report.parents[1] / "model.onnx"))
    table = read_table(report / "stages" / "calibrate" / "table-minmax.json")
    quantized = set(written.provenance.quantized_activations())
    groups = {n: g for g in written.plan.groups for n in g.nodes}
    rows = layers[(layers["candidate"] == "int8-minmax") & layers["input_sqnr_pred"].notna()]
    assert len(rows) >= 3
    for layer, value in zip(rows["layer"], rows["input_sqnr_pred"], strict=True):
        expected = min(table.ranges[t].predicted_sqnr_db for t in groups[layer].input_tensors if t in quantized)
        assert value == expected and 10 < value < 80


def _fp16_is_measured_in_simulation(folder: Path, report: Path, messages: tuple[str, ...]) -> None:
    """On ONNX Runtime the fp16 figures are the simulated write's (ORT's CPU provider would compute the native
    model's activations in float32: 5-10 dB better here); the build folder keeps the native model."""
    import pandas as pd

    from quantlab.compare import CompareOptions, compare
    from quantlab.data import open_dataset
    from quantlab.experiment import load_written
    from quantlab.graph import load_model
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, write_model

    assert [m for m in messages if m.startswith("fp16: measured with every float16 tensor rounded")]
    model = load_model(folder / "model.onnx")
    native = load_written(report / "stages" / "build-fp16", model)
    assert not native.options.fp16_simulation
    simulated = write_model(model, uniform_plan("fp16"), None, WriteOptions(fp16_simulation=True))
    direct = compare(model, {"native": native, "simulated": simulated}, open_dataset(folder / "val.toml"),
                     CompareOptions(per_layer=False, bootstrap=0)).end_to_end.set_index("candidate")["sqnr_db"]
    run = pd.read_parquet(report / "stages" / "compare" / "end_to_end.parquet").set_index("candidate")["sqnr_db"]
    assert run["fp16"] == direct["simulated"] and direct["native"] > direct["simulated"] + 1


@needs_compare
def test_changed_calibration_data_redoes_calibration_and_what_follows(tmp_path: Path) -> None:
    path = _small_experiment(tmp_path, evil=False)
    run_experiment(load_experiment(path), reports_dir=tmp_path / "reports")
    np.savez(tmp_path / "calib.npz", input=np.random.default_rng(5).normal(0, 2, (24, 3, 16, 16)).astype(np.float32))
    again = run_experiment(load_experiment(path), reports_dir=tmp_path / "reports")
    redone = {s.name for s in again.stages if not s.reused}
    assert {"calibrate", "build-int8-minmax", "build-int8-entropy", "compare"} <= redone
    assert "build-fp16" not in redone  # FP16 reads only the tensors beyond float16's range: none here


def test_failed_run_leaves_no_finished_report(tmp_path: Path) -> None:
    path = _small_experiment(tmp_path, calib_shape=(8, 3, 12, 12))  # wrong spatial size for the model
    report = tmp_path / "reports" / "small"
    report.mkdir(parents=True)
    (report / "index.html").write_text("<html>an old report</html>")
    (report / "manifest.json").write_text('{"status": "complete"}')  # what marks a folder as a run's report
    from quantlab.errors import QuantlabError

    with pytest.raises(QuantlabError):
        run_experiment(load_experiment(path), reports_dir=tmp_path / "reports")
    assert not (report / "index.html").exists()
    manifest = json.loads((report / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "input" in manifest["error"]
    assert not (report / "stages" / "calibrate").exists()


@needs_compare
def test_cli_run_and_compare_two_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _small_experiment(tmp_path)
    reports = tmp_path / "reports"
    assert cli_main(["run", str(path), "--reports-dir", str(reports), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"report: {reports / 'small' / 'index.html'}" in out and "verdict:" in out
    other = tmp_path / "other.toml"
    other.write_text(path.read_text().replace('name = "small"', 'name = "small-b"')
                     .replace('methods = ["minmax", "entropy"]', 'methods = ["minmax", "percentile"]'))
    assert cli_main(["run", str(other), "--reports-dir", str(reports), "--quiet"]) == 0
    capsys.readouterr()
    assert cli_main(["report", "--compare", str(reports / "small"), str(reports / "small-b")]) == 0
    page = (reports / "compare-small-vs-small-b" / "index.html").read_text()
    assert "percentile" in page and "entropy" in page
    assert cli_main(["report", str(reports / "small")]) == 0


def test_cli_bad_experiment_is_one_error_with_key_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _small_experiment(tmp_path)
    path.write_text(path.read_text().replace('threshold = "cosine>=0.9"', 'threshold = 0.9'))
    assert cli_main(["run", str(path), "--reports-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "small.toml: line 2: key 'threshold': must be a threshold expression, got number 0.9" in err
    assert not (tmp_path / "r").exists()


@needs_compare
def test_a_model_that_fixes_its_batch_at_1_runs_one_sample_at_a_time(tmp_path: Path) -> None:
    """A static export ([1, 3, 16, 16], as detection models with NMS are) failed every stage with 'run with
    batch size 1', and an experiment file had no batch size to give: the run now takes 1 by itself, says so,
    and records it; [data] batch_size sets it for any model."""
    path = _small_experiment(tmp_path, evil=False, search=True, threshold="cosine>=0.9999")
    model = onnx.load(tmp_path / "model.onnx")
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, tmp_path / "model.onnx")
    cfg = load_experiment(path)
    assert cfg.batch_size is None
    result = run_experiment(cfg, reports_dir=tmp_path / "reports")
    assert any("its batch fixed at 1" in m for m in result.messages)
    manifest = json.loads((tmp_path / "reports" / "small" / "manifest.json").read_text())
    assert manifest["experiment"]["batch_size"] == 1
    import pandas as pd

    e2e = pd.read_csv(tmp_path / "reports" / "small" / "results" / "end_to_end.csv")
    assert set(e2e["samples"]) == {16}
    path.write_text(path.read_text().replace('validation = "val.toml"', 'validation = "val.toml"\nbatch_size = 0'))
    with pytest.raises(ExperimentError, match=r"\[data\] key 'batch_size'.*integer >= 1"):
        load_experiment(path)


@needs_compare
def test_a_batch_coupling_warning_is_said_once_by_a_run(tmp_path: Path) -> None:
    """A streaming step whose If tests the whole batch's state got the same WARNING twice from `quantlab run`: once
    from the run's own check, once among the comparison's warnings."""
    from onnx import helper

    path = _small_experiment(tmp_path, evil=False)
    model = onnx.load(tmp_path / "model.onnx")
    out = model.graph.output[0].name
    last = next(n for n in model.graph.node if out in n.output)
    last.output[list(last.output).index(out)] = "raw"
    model.graph.node.extend([helper.make_node("ReduceMax", ["raw"], ["top"], name="batch_max"),
                             helper.make_node("Sub", ["raw", "top"], [out], name="from_top")])
    onnx.save(model, tmp_path / "model.onnx")
    path.write_text(path.read_text().replace('validation = "val.toml"', 'validation = "val.toml"\nbatch_size = 4'))
    result = run_experiment(load_experiment(path), reports_dir=tmp_path / "reports")
    said = [m for m in result.messages if "combines values across the samples of a batch" in m]
    assert len(said) == 1 and "WARNING" in said[0]


@needs_compare
def test_an_experiment_takes_a_user_metric_and_gates_on_its_names(tmp_path: Path) -> None:
    """An OCR model's line accuracy is a user metric: `quantlab run` told users to pass --metric, which an
    experiment file could not take. ``metric = "file.py:function"`` (relative to the file) reaches the compare
    stage and the search, the threshold may name what it returns, and the file's hash is in the settings."""
    path = _small_experiment(tmp_path, threshold="close>=50", search=True, evil=False)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "close.py").write_text(
        "import numpy as np\n\n\ndef score(ref, cand, label):\n"
        "    r, c = next(iter(ref.values())), next(iter(cand.values()))\n"
        "    return {'close': 100.0 * float(np.abs(r - c).max() <= 0.05 * np.abs(r).max())}\n")
    text = path.read_text().replace('threshold = "close>=50"\n', 'threshold = "close>=50"\nmetric = "metrics/close.py:score"\n')
    path.write_text(text)
    cfg = load_experiment(path)
    assert cfg.metric == f"{tmp_path / 'metrics' / 'close.py'}:score"
    assert cfg.settings()["metric"]["sha256"] == sha256_file(tmp_path / "metrics" / "close.py")
    result = run_experiment(cfg, reports_dir=tmp_path / "reports")
    assert result.verdict is not None and result.verdict.threshold == "close>=50"
    e2e = pd.read_parquet(tmp_path / "reports" / "small" / "results" / "end_to_end.parquet")
    assert "close" in e2e.columns and e2e["close"].notna().any()
    path.write_text(text.replace("metrics/close.py", "metrics/missing.py"))
    with pytest.raises(ExperimentError, match=r"\[?metric.*no file .*missing.py"):
        load_experiment(path)
    path.write_text(text.replace('metric = "metrics/close.py:score"\n', ""))
    with pytest.raises(ExperimentError, match="unknown metric 'close'"):  # without the metric: misspelt
        load_experiment(path)


def test_the_search_line_carries_the_search_warnings():
    """A search that ended 54 of 55 pinned recorded why in search.json, but quantlab run printed only the count."""
    from quantlab.experiment.stages import search_notes

    search = {"pinned": {f"g{k}": "fp16" for k in range(54)}, "quantizable_groups": 55, "int8_fraction": 1 / 55,
              "notes": ["flip model: 3 critical samples", "WARNING the search kept INT8 on only 2% of the groups"]}
    assert search_notes(search) == [
        "search: final plan pins 54 of 55 quantizable group(s) above INT8; INT8 on 2% of them",
        "search: WARNING the search kept INT8 on only 2% of the groups"]


def test_a_search_that_pins_everything_says_whether_its_plan_is_the_fp16_model():
    """Magika's search ended with 3 groups FP16 and the rest FP32 (64 dB); the line said "this plan is the FP16
    model; compare the fp16 candidate", which got 2 % top-1 agreement."""
    from quantlab.experiment.stages import search_notes

    all_fp16 = {"pinned": {"a": "fp16", "b": "fp16"}, "quantizable_groups": 2, "int8_fraction": 0.0}
    assert "so this plan is the FP16 model" in search_notes(all_fp16)[0]
    mixed = {"pinned": {"a": "fp16", "b": "fp32", "c": "fp32"}, "quantizable_groups": 3, "int8_fraction": 0.0}
    line = search_notes(mixed)[0]
    assert line.startswith("WARNING") and "2 group(s) are FP32 and the rest FP16" in line
    assert "so this plan is the FP16 model" not in line


def test_the_verdicts_interval_is_that_of_the_output_its_value_comes_from():
    """A decoder with five outputs: the verdict shows the worst output's cosine; its interval was the first output's
    ("cosine = 0.999611 (95 % CI 0.999918 – 0.99996)", a value outside its own interval)."""
    from quantlab.experiment.stages import verdict_for

    rows = pd.DataFrame({"candidate": ["int8"] * 3, "output": ["logits", "present.0", "present.1"],
                         "cosine": [0.99994, 0.99961, 0.99998], "cosine_ci_low": [0.99992, 0.99890, 0.99996],
                         "cosine_ci_high": [0.99996, 0.99997, 0.99999]})
    verdict = verdict_for(rows, "int8", "cosine>=0.999")
    assert verdict.value == 0.99961 and (verdict.ci_low, verdict.ci_high) == (0.99890, 0.99997)
    assert verdict.ci_low <= verdict.value <= verdict.ci_high


def _image_experiment(folder: Path, proto: onnx.ModelProto, shape: tuple[int, ...], narrow: float, name: str,
                      top: str) -> ExperimentConfig:
    """An experiment on ``proto`` (input ``image``): 8 calibration images in ``[-narrow, narrow]`` (narrower than
    the 12 validation images in [-1, 1]: INT8 saturates), minmax INT8 only, a search of 3 full validations;
    ``top``: the file's top-level keys (a threshold, ...)."""
    onnx.save(proto, folder / "model.onnx")
    rng = np.random.default_rng(0)
    np.savez(folder / "calib.npz", image=rng.uniform(-narrow, narrow, (8, *shape)).astype(np.float32))
    np.savez(folder / "val.npz", image=rng.uniform(-1, 1, (12, *shape)).astype(np.float32))
    for role, data in (("calibration", "calib"), ("validation", "val")):
        (folder / f"{data}.toml").write_text(
            f'role = "{role}"\nshuffle = false\n[[source]]\nkind = "npz"\npath = "{data}.npz"\nbatched = true\n')
    (folder / f"{name}.toml").write_text(
        f'name = "{name}"\n{top}[model]\npath = "model.onnx"\n'
        '[data]\ncalibration = "calib.toml"\nvalidation = "val.toml"\n[calibrate]\nmethods = ["minmax"]\n'
        '[candidates]\nfp16 = false\n[search]\nbudget = 3\nbias_correction = false\n')
    return load_experiment(folder / f"{name}.toml")


@needs_compare
def test_a_text_detector_experiment_judges_and_searches_on_the_mask_overlap(tmp_path: Path) -> None:
    """A Sigmoid map read as the mask p > 0.3 (DBNet's threshold, set in the file): the threshold names its IoU,
    the search is judged on it and the report shows it."""
    config = _image_experiment(tmp_path, models.text_detector(), (3, 32, 48), 0.5, "db",
                               'threshold = "mask_iou>=99"\ndecision_threshold = 0.3\n')
    result = run_experiment(config, reports_dir=tmp_path / "reports")
    report = tmp_path / "reports" / "db"
    e2e = pd.read_parquet(report / "results" / "end_to_end.parquet").set_index("candidate")  # the search's too
    assert e2e["mask_iou"].notna().all() and e2e.loc["int8-minmax", "mask_iou"] < 99  # narrow ranges
    assert result.verdict is not None and result.verdict.metric == "mask_iou"
    assert result.verdict.value == e2e.loc[result.verdict.candidate, "mask_iou"]
    trajectory = pd.read_csv(next(report.glob("stages/search*/trajectory.csv")))
    assert set(trajectory["metric"]) == {"mask_iou"}
    compared = json.loads(next(report.glob("stages/compare*/compare.json")).read_text())
    assert compared["settings"]["decision_threshold"] == 0.3
    page = (report / "index.html").read_text()
    assert "mask_iou" in page and 'alt="masks the candidates changed most"' in page
    assert (report / "plots" / "masks.png").read_bytes().startswith(b"\x89PNG")  # the worst page's masks, drawn
    from quantlab.report import load_report_inputs

    kept = load_report_inputs(report).mask_examples  # saved with the report's inputs: `quantlab report` redraws it
    assert kept and kept[0].candidate == "int8-minmax" and kept[0].iou < 99


@needs_compare
def test_an_ocr_experiment_judges_and_searches_on_the_ctc_text(tmp_path: Path) -> None:
    """ctc_blank in the experiment file: the comparison reads the recogniser's scores as CTC text, the threshold
    names its character error rate, the search is judged on it and the report shows the text figures."""
    config = _image_experiment(tmp_path, models.text_recognizer(classes=12), (3, 48, 64), 0.3, "ocr",
                               'threshold = "cer<=0"\nctc_blank = 0\n')
    result = run_experiment(config, reports_dir=tmp_path / "reports")
    report = tmp_path / "reports" / "ocr"
    e2e = pd.read_parquet(report / "results" / "end_to_end.parquet").set_index("candidate")  # the search's too
    assert e2e["text_agreement"].notna().all() and e2e["cer"].notna().all()
    assert e2e.loc["int8-minmax", "cer"] > 0 and e2e.loc["int8-minmax", "text_agreement"] < 100  # narrow ranges
    assert result.verdict is not None and result.verdict.metric == "cer"
    assert result.verdict.value == e2e.loc[result.verdict.candidate, "cer"]
    trajectory = pd.read_csv(next(report.glob("stages/search*/trajectory.csv")))
    assert set(trajectory["metric"]) == {"cer"}
    assert "text_agreement" in (report / "index.html").read_text()


@needs_compare
def test_a_run_says_when_the_int8_candidates_leave_most_weights_fp32(tmp_path: Path) -> None:
    """ddddocr's LSTM holds 31 % of its weights and has no INT8 form: the build said so, but `quantlab run` printed
    "PASS: int8-mse" alone. Its messages now carry the build's note."""
    rng = np.random.default_rng(0)
    path = _small_experiment(tmp_path, evil=False, calib_shape=(8, 5, 8))
    onnx.save(models.lstm_head("input"), tmp_path / "model.onnx")
    np.savez(tmp_path / "val.npz", input=rng.normal(0, 1, (8, 5, 8)).astype(np.float32))
    path.write_text(path.read_text().replace('methods = ["minmax", "entropy"]', 'methods = ["minmax"]'))
    result = run_experiment(load_experiment(path), reports_dir=tmp_path / "reports")
    assert any("of the weights are in groups with no INT8 form" in m and "lstm" in m for m in result.messages)


@needs_compare
def test_a_run_on_a_reference_that_draws_random_numbers_is_not_judged(tmp_path: Path, capsys) -> None:
    """VITS with its noise on: `quantlab run` said PASS on figures that held the reference's own noise (or hid it,
    a candidate drawing the reference's numbers). The verdict is now NONE, saying why and what to do; the search
    does not run (it would chase the noise); the report says NOT JUDGED and --fail-on-verdict fails."""
    from quantlab.cli import main

    proto = models.noisy_conv_net()
    proto.graph.input[0].name = proto.graph.node[0].input[0] = "image"
    config = _image_experiment(tmp_path, proto, (3, 16, 16), 1.0, "noisy", 'threshold = "sqnr_db>=10"\n')
    result = run_experiment(config, reports_dir=tmp_path / "reports")
    assert result.verdict is None and "'sqnr_db>=10' was not judged" in result.unjudged
    assert "not deterministic" in result.unjudged and "noise_scale = 0" in result.unjudged
    assert not any(s.name == "search" for s in result.stages)
    report = tmp_path / "reports" / "noisy"
    page = (report / "index.html").read_text()
    assert "NOT JUDGED" in page and "No threshold was set" not in page and "no threshold was set" not in page
    assert json.loads((report / "manifest.json").read_text())["unjudged"] == result.unjudged
    code = main(["run", str(tmp_path / "noisy.toml"), "--reports-dir", str(tmp_path / "r2"), "--quiet",
                 "--fail-on-verdict"])
    out = capsys.readouterr().out
    assert code == 1 and "verdict: NONE: 'sqnr_db>=10' was not judged: the FP32 reference is not deterministic" in out
