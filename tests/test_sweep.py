"""Sweeps: the grid, cached cells, failures kept in the table, and the same table locally (1 or 2
processes) and on a real local Ray instance (2 CPUs), including a worker killed mid-task and retried."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest

import models
from quantlab.cli import main as cli_main
from quantlab.errors import ExperimentError
from quantlab.sweep import SweepOptions, load_sweep, parse_sweep, run_sweep, sweep_cells
from quantlab.sweep.executors import KILL_ONCE

METRICS = ["cosine", "sqnr_db", "top1_agreement", "rel_l2"]


def _sweep_dir(tmp_path: Path, *, methods: str = '["minmax", "entropy"]', extra: str = "") -> Path:
    for seed, name in ((0, "a"), (1, "b")):
        onnx.save(models.conv_net(seed=seed, size=8), tmp_path / f"{name}.onnx")
    proto = models.conv_net(size=8)
    np.savez(tmp_path / "cal.npz", input=models.random_inputs(proto, 16, seed=1)["input"])
    x = models.random_inputs(proto, 24, seed=2)["input"]
    np.savez(tmp_path / "val.npz", input=x, label=np.arange(24) % 10)
    (tmp_path / "cal.toml").write_text('shuffle = false\n[[source]]\nkind = "npz"\npath = "cal.npz"\nbatched = true\n')
    (tmp_path / "val.toml").write_text('role = "validation"\nshuffle = false\n[[source]]\nkind = "npz"\n'
                                       'path = "val.npz"\nbatched = true\n[labels]\ncolumn = "label"\n')
    (tmp_path / "s.toml").write_text(f'''name = "unit"
threshold = "cosine>=0.99"
[data]
calibration = "cal.toml"
validation = "val.toml"
[[model]]
path = "a.onnx"
[[model]]
path = "b.onnx"
[grid]
methods = {methods}
fp16 = false
{extra}''')
    return tmp_path / "s.toml"


def _metrics(table: pd.DataFrame) -> pd.DataFrame:
    return table[["cell", "output", *METRICS, "top1"]].sort_values(["cell", "output"]).reset_index(drop=True)


def test_grid_and_bad_files(tmp_path: Path) -> None:
    spec = load_sweep(_sweep_dir(tmp_path, methods='["minmax", "percentile"]', extra="percentile = [99.9, 99.99]"))
    assert [c.name for c in sweep_cells(spec)] == ["a--minmax", "a--percentile-99.9", "a--percentile-99.99",
                                                   "b--minmax", "b--percentile-99.9", "b--percentile-99.99"]
    with pytest.raises(ExperimentError, match=r"line 11: \[grid\] key 'methods': must be a non-empty list"):
        parse_sweep((tmp_path / "s.toml").read_text().replace('["minmax", "percentile"]', '["kl"]'),
                    source=tmp_path / "s.toml")
    text = (tmp_path / "s.toml").read_text().replace('path = "b.onnx"', 'path = "a.onnx"')
    with pytest.raises(ExperimentError, match=r"two models have the label 'a'"):
        parse_sweep(text, source=tmp_path / "s.toml")


@pytest.mark.parametrize("key, value, default, threshold, bad", [
    ("ctc_blank", 0, None, "cer<=1", '"zero"'),
    ("decision_threshold", 0.3, 0.5, "mask_iou>=95", "1.0"),
])
def test_comparison_keys_reach_every_cell_and_its_key(tmp_path: Path, key, value, default, threshold, bad) -> None:
    """ctc_blank (CTC outputs read as text) and decision_threshold (Sigmoid outputs read as masks) at the top of a
    sweep file: every cell's experiment gets them and a cell's cache key changes with them."""
    from quantlab.data import open_dataset
    from quantlab.sweep.cells import cell_config, cell_key

    plain = load_sweep(_sweep_dir(tmp_path))
    text = (tmp_path / "s.toml").read_text()
    spec = parse_sweep(text.replace('threshold = "cosine>=0.99"', f'threshold = "{threshold}"\n{key} = {value}'),
                       source=tmp_path / "s.toml")
    assert getattr(spec, key) == value and getattr(plain, key) == default
    cell, model = sweep_cells(spec)[0], tmp_path / "a.onnx"
    assert getattr(cell_config(spec, cell, model, spec.calibration, spec.validation), key) == value
    calib, val = open_dataset(spec.calibration), open_dataset(spec.validation)
    assert cell_key(spec, cell, model, calib, val) != cell_key(plain, cell, model, calib, val)
    with pytest.raises(ExperimentError, match=f"key '{key}'"):
        parse_sweep(f"{key} = {bad}\n" + text, source=tmp_path / "s.toml")


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory: pytest.TempPathFactory):
    """The sweep run once locally in one process: (its folder, its reports folder, the result). The Ray test
    compares with this table; the local test goes on in the same folder (and breaks b.onnx at its end)."""
    folder = tmp_path_factory.mktemp("local_sweep")
    path = _sweep_dir(folder)
    reports = folder / "reports"
    return folder, reports, run_sweep(load_sweep(path), SweepOptions(processes=1), reports_dir=reports)


def test_local_runs_reuse_cells_and_keep_failures(local_sweep, capsys: pytest.CaptureFixture[str]) -> None:
    tmp_path, reports, one = local_sweep
    path = tmp_path / "s.toml"
    assert [r.status for r in one.results] == ["ok"] * 4
    assert set(one.table["cell"]) == {"a--minmax", "a--entropy", "b--minmax", "b--entropy"}
    assert (reports / "unit" / "index.html").is_file() and (reports / "unit" / "cells" / "a--minmax" / "index.html").is_file()
    assert (reports / "unit" / "sweep.parquet").is_file() and (reports / "unit" / "plots" / "cosine.png").is_file()
    again = run_sweep(load_sweep(path), SweepOptions(processes=1), reports_dir=reports)
    assert [r.status for r in again.results] == ["reused"] * 4
    pd.testing.assert_frame_equal(_metrics(one.table), _metrics(again.table))
    two = run_sweep(load_sweep(path), SweepOptions(processes=2, force=True), reports_dir=tmp_path / "r2")
    pd.testing.assert_frame_equal(_metrics(one.table), _metrics(two.table))

    (tmp_path / "b.onnx").write_bytes(b"not onnx")
    assert cli_main(["sweep", str(path), "--reports-dir", str(reports)]) == 2  # a failed cell is an error
    out = capsys.readouterr().out
    assert "a--minmax" in out and "reused" in out and "b--minmax" in out and "failed" in out
    table = pd.read_parquet(reports / "unit" / "sweep.parquet")
    failed = table[table["model"] == "b"]
    assert set(failed["status"]) == {"failed"} and failed["error"].str.contains("b.onnx").all()


ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory: pytest.TempPathFactory):
    marker = tmp_path_factory.mktemp("kill") / "killed"
    os.environ[KILL_ONCE] = f"a--entropy:{marker}"  # workers inherit the driver's environment
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield marker
    ray.shutdown()
    os.environ.pop(KILL_ONCE, None)


def test_ray_sweep_equals_local_and_retries_a_killed_worker(tmp_path: Path, ray_instance: Path,
                                                           local_sweep) -> None:
    path = _sweep_dir(tmp_path)  # the same files as the local run's: the same table
    local = local_sweep[2]
    remote = run_sweep(load_sweep(path), SweepOptions(ray="auto"), reports_dir=tmp_path / "ray")
    assert ray_instance.is_file(), "the fault hook did not kill the first attempt"
    by_cell = {r.cell.name: r for r in remote.results}
    assert by_cell["a--entropy"].status == "ok" and by_cell["a--entropy"].attempts == 2
    assert all(r.attempts == 1 for n, r in by_cell.items() if n != "a--entropy")
    pd.testing.assert_frame_equal(_metrics(local.table), _metrics(remote.table))
    assert (tmp_path / "ray" / "unit" / "cells" / "a--entropy" / "index.html").is_file()
    assert remote.table.loc[remote.table["cell"] == "a--entropy", "attempts"].iloc[0] == 2
