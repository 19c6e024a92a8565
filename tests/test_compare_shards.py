"""Sharded validation on a real local Ray instance (2 CPUs, started once for the module): the merged
tables equal one pass's byte for byte, for even and uneven shards and more shards than samples;
a shard whose worker is killed is retried and reported; worker errors come back as raised."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import models
import numpy as np
import pandas as pd
import pytest

from quantlab.calibrate import calibrate
from quantlab.cli import main
from quantlab.compare import CompareOptions, compare
from quantlab.compare.shards import KILL_ONCE, shard_ranges
from quantlab.data import from_arrays
from quantlab.errors import BackendUnavailableError, CompareError
from quantlab.graph import model_from_proto, serialize
from quantlab.plan import uniform_plan
from quantlab.quantize import WriteOptions, save_written, write_model

ray = pytest.importorskip("ray")

N_VAL = 44          # 6 batches of 8, the last one of 4
EXACT = {"qdq_fusion": False}
FRAMES = ("end_to_end", "per_layer", "per_sample")


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory: pytest.TempPathFactory):
    marker = tmp_path_factory.mktemp("kill") / "killed"
    os.environ[KILL_ONCE] = f"1:{marker}"  # workers inherit the driver's environment
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield marker
    ray.shutdown()
    os.environ.pop(KILL_ONCE, None)


@pytest.fixture(scope="module")
def setup():
    proto = models.residual_net()
    model = model_from_proto(proto, label="residual_net")
    table = calibrate(model, from_arrays(models.random_inputs(proto, 16, seed=11)), ["minmax"]).tables["minmax"]
    written = {
        "int8": write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt")),
        "fp16": write_model(model, uniform_plan("fp16"), table, WriteOptions(fp16_simulation=True)),
    }
    feeds = models.random_inputs(proto, N_VAL, seed=3)
    labels = np.random.default_rng(0).integers(0, 10, N_VAL)
    return {"model": model, "written": written, "val": from_arrays(feeds, labels=labels, role="validation",
                                                                  name="val")}


def _options(**kw) -> CompareOptions:
    return CompareOptions(**{"batch_size": 8, "bootstrap": 200, "backend_options": EXACT, **kw})


def _run(setup, only: str | None = None, **kw):
    written = setup["written"] if only is None else {only: setup["written"][only]}
    return compare(setup["model"], written, setup["val"], _options(**kw))


def _assert_same_tables(local, sharded, tmp_path: Path) -> None:
    """Equal frames, equal bits in every float column, equal saved files (CSV and Parquet bytes)."""
    for name in FRAMES:
        a, b = getattr(local, name), getattr(sharded, name)
        pd.testing.assert_frame_equal(a, b, check_exact=True)
        for col in a.columns:
            if a[col].dtype == np.float64:
                assert a[col].to_numpy().tobytes() == b[col].to_numpy().tobytes(), (name, col)
    local.save(tmp_path / "local")
    sharded.save(tmp_path / "sharded")
    for name in FRAMES:
        for ext in ("csv", "parquet"):
            assert (tmp_path / "local" / f"{name}.{ext}").read_bytes() == \
                   (tmp_path / "sharded" / f"{name}.{ext}").read_bytes(), f"{name}.{ext}"
    assert local.data == sharded.data   # the same samples, fingerprinted in the same order


def test_shard_ranges_are_contiguous_even_and_never_empty() -> None:
    assert shard_ranges(6, 2) == [range(0, 3), range(3, 6)]
    assert shard_ranges(6, 4) == [range(0, 1), range(1, 3), range(3, 4), range(4, 6)]
    assert shard_ranges(3, 100) == [range(0, 1), range(1, 2), range(2, 3)]


def test_two_shards_equal_one_pass_and_a_killed_worker_is_retried(setup, ray_instance, tmp_path) -> None:
    local = _run(setup)
    sharded = _run(setup, shards=2)
    assert ray_instance.is_file(), "the fault hook did not kill shard 1's first attempt"
    _assert_same_tables(local, sharded, tmp_path)
    e2e = sharded.end_to_end.set_index("candidate")
    # the figures the brief names are there and finite: intervals from per-sample results, McNemar
    for column in ("top1_ci_low", "top1_ci_high", "cosine_ci_low", "top1_drop_ci_high", "mcnemar_p"):
        assert np.isfinite(e2e[column]).all(), column
    assert set(sharded.per_layer["mode"]) == {"accumulated", "local"}
    assert sharded.settings["shards_run"] == 2 and sharded.settings["shard_attempts"] == [1, 2]
    retried = [w for w in sharded.warnings if "retried by Ray" in w]
    assert len(retried) == 1 and retried[0].startswith("shard 1 ")
    assert [w for w in sharded.warnings if w not in retried] == list(local.warnings)


def test_uneven_shards_of_a_truncated_set_equal_one_pass(setup, ray_instance, tmp_path) -> None:
    # 37 samples in batches of 5: 8 batches, the last of 2; 3 shards of 2, 3 and 3 batches
    kw = {"max_samples": 37, "batch_size": 5, "only": "int8"}
    local, sharded = _run(setup, **kw), _run(setup, shards=3, **kw)
    _assert_same_tables(local, sharded, tmp_path)
    assert sharded.settings["shards_run"] == 3 and len(sharded.per_sample) == 37


def test_more_shards_than_samples(setup, ray_instance, tmp_path) -> None:
    kw = {"max_samples": 5, "batch_size": 2, "per_layer": False}
    local, sharded = _run(setup, **kw), _run(setup, shards=50, **kw)
    _assert_same_tables(local, sharded, tmp_path)
    assert sharded.settings["shards_run"] == 3 and len(sharded.per_sample) == 5 * 2


def test_a_workers_error_comes_back_as_raised(setup, ray_instance, tmp_path) -> None:
    metric = tmp_path / "bad_metric.py"
    metric.write_text("def score(ref, cand, label):\n    raise ValueError('no score for you')\n")
    with pytest.raises(CompareError, match=r"no score for you on sample \d+"):
        _run(setup, shards=2, per_layer=False, metric=f"{metric}:score")


def test_a_bad_label_in_a_later_shard_is_refused_naming_the_sample(setup, ray_instance) -> None:
    val = setup["val"]
    labels = val.labels.copy()
    labels[30] = 99
    bad = from_arrays(val.arrays, labels=labels, role="validation", name="bad")
    with pytest.raises(CompareError, match=r"sample 30 .* has label 99"):
        compare(setup["model"], {"int8": setup["written"]["int8"]}, bad, _options(shards=2, per_layer=False))


def test_without_ray_the_error_names_the_extra(setup, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` fails as when it is not installed
    with pytest.raises(BackendUnavailableError, match=r"pip install 'quantlab\[ray\]'"):
        _run(setup, shards=2)


def test_cli_shards_write_the_same_tables(setup, ray_instance, tmp_path, capsys) -> None:
    (tmp_path / "ref.onnx").write_bytes(serialize(setup["model"].proto))
    save_written(setup["written"]["int8"], tmp_path / "int8")
    val = setup["val"]
    np.savez(tmp_path / "val.npz", input=val.arrays["input"], label=val.labels)
    (tmp_path / "val.toml").write_text('name = "val"\nrole = "validation"\nshuffle = false\n[[source]]\n'
                                       'kind = "npz"\npath = "val.npz"\nbatched = true\n[labels]\ncolumn = "label"\n')
    base = ["compare", str(tmp_path / "ref.onnx"), str(tmp_path / "int8"), "--data", str(tmp_path / "val.toml"),
            "--bootstrap", "100", "--no-progress", "--no-local"]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    assert main([*base, "--out", str(tmp_path / "two"), "--shards", "2", "--ray", "auto"]) == 0
    for name in FRAMES:
        assert (tmp_path / "one" / f"{name}.csv").read_bytes() == (tmp_path / "two" / f"{name}.csv").read_bytes()
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setitem(sys.modules, "ray", None)
    try:
        code = main([*base, "--out", str(tmp_path / "three"), "--shards", "2"])
    finally:
        monkeypatch.undo()
    assert code == 3 and "pip install 'quantlab[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "three" / "end_to_end.csv").exists()


def test_bad_shard_options_are_refused() -> None:
    with pytest.raises(CompareError, match="shards must be an integer >= 1"):
        CompareOptions(shards=0)
    with pytest.raises(CompareError, match="ray must be None, 'auto' or a cluster address"):
        CompareOptions(ray="")


def test_shards_of_text_lines_batched_by_shape_equal_one_pass(ray_instance, tmp_path) -> None:
    """Batches by shape leave a partial batch per width: the shards are cut on the real batches (before,
    ceil(samples / batch size) batches were sent and the rest of the set silently left out)."""
    from quantlab.compare.shards import batch_sizes
    from quantlab.data import open_dataset

    data = open_dataset(models.text_line_set(tmp_path, [64, 128, 64, 192, 64, 128, 64, 96, 128]))
    model = model_from_proto(models.text_recognizer(), label="text_recognizer")
    table = calibrate(model, data, "minmax", batch_size=2).tables["minmax"]
    written = {"int8": write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))}
    assert batch_sizes(data, 2, 9) == [2, 2, 2, 1, 1, 1]
    options = CompareOptions(batch_size=2, bootstrap=50, backend_options=EXACT)
    local = compare(model, written, data, options)
    sharded = compare(model, written, data, CompareOptions(batch_size=2, bootstrap=50, backend_options=EXACT,
                                                           shards=2))
    assert int(local.end_to_end["samples"].iloc[0]) == 9
    assert local.end_to_end["token_agreement"].notna().all()  # per-position figures concatenate across shards too
    _assert_same_tables(local, sharded, tmp_path)


def test_shards_keep_a_state_batched_on_axis_1(ray_instance, tmp_path) -> None:
    model = model_from_proto(models.voice_activity(), label="vad")
    data = from_arrays(models.voice_activity_feeds(10), batch_axes={"state": 1}, role="validation")
    table = calibrate(model, data, "minmax").tables["minmax"]
    written = {"int8": write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))}
    local = compare(model, written, data, _options(batch_size=4, bootstrap=50))
    sharded = compare(model, written, data, _options(batch_size=4, bootstrap=50, shards=2))
    _assert_same_tables(local, sharded, tmp_path)
    assert local.end_to_end.set_index("output").loc["prob", ["element_match", "exact_match"]].notna().all()  # masks


def test_shards_keep_the_same_most_changed_mask(ray_instance, tmp_path) -> None:
    """Each shard keeps its own lowest-IoU sample; the merge keeps the worst of them (the earlier on ties)."""
    model = model_from_proto(models.text_detector(), label="detector")
    rng = np.random.default_rng(0)
    table = calibrate(model, from_arrays({"image": rng.uniform(-0.8, 0.8, (8, 3, 32, 48)).astype(np.float32)}),
                      "minmax", batch_size=4).tables["minmax"]
    written = {"int8": write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))}
    data = from_arrays({"image": rng.uniform(-1, 1, (12, 3, 32, 48)).astype(np.float32)}, role="validation")
    local = compare(model, written, data, _options(batch_size=4, bootstrap=50, per_layer=False))
    sharded = compare(model, written, data, _options(batch_size=4, bootstrap=50, per_layer=False, shards=3))
    _assert_same_tables(local, sharded, tmp_path)
    (a,), (b,) = local.mask_examples, sharded.mask_examples
    assert (a.sample, a.iou) == (b.sample, b.iou) and np.array_equal(a.changed, b.changed)
    per_sample = local.per_sample
    assert a.sample == int(per_sample.loc[per_sample["mask_iou"].idxmin(), "sample"])
