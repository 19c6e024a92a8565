"""The coverage stage of ``quantlab run``: does the calibration set cover the validation set (and ``[[coverage]]`` sets)?

Runs after the verdict, on the table behind it (the search's when the search
gave the verdict, else the verdict candidate's; without an INT8 verdict the
first INT8 candidate's, else the first calibrator's), and is reused like any stage while
the model, the calibration stage and the data are unchanged. Its result feeds
the report's "Calibration coverage" section; it never changes the run's verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..coverage import CoverageOptions, check_coverage, load_coverage
from ..data import NOT_CALIBRATED_SIZES, DataSet, DataSummary, open_dataset
from ..graph import LoadedModel
from ..quantize import WrittenModel
from ..report.coverage import coverage_view
from ..stats import load_statistics
from ..table import CalibrationTable
from .spec import ExperimentConfig
from .store import StageRecord, data_key, run_stage

__all__ = ["coverage_method", "coverage_stage", "quantized_tensors", "run_coverage"]


def coverage_method(config: ExperimentConfig, judged: str | None = None) -> str:
    """The calibrator whose table is checked: ``judged`` (the verdict's table) when the run calibrated it, else the
    first INT8 candidate's, else the first calibrator."""
    if judged is not None and judged in config.calibrators:
        return judged
    return config.int8[0] if config.int8 else config.calibrators[0]


def quantized_tensors(written: Mapping[str, WrittenModel]) -> list[str] | None:
    """The activation tensors some INT8 candidate quantizes (the coverage check's tensors), in first-seen order;
    None when no candidate quantizes any (FP16 only: every tensor of the table is checked)."""
    names = [t for w in written.values() for t in w.provenance.quantized_activations()]
    return list(dict.fromkeys(names)) or None


def coverage_stage(folder: Path, model: LoadedModel, datasets: Sequence[DataSet], table: CalibrationTable,
                   cal_dir: Path, config: ExperimentConfig, progress: bool = False,
                   tensors: Sequence[str] | None = None) -> None:
    import json

    summary = DataSummary.from_dict(json.loads((cal_dir / "data_summary.json").read_text(encoding="utf-8")))
    result = check_coverage(model, datasets, table, load_statistics(cal_dir / "statistics.npz"),
                            options=CoverageOptions(gate=config.coverage_gate, seed=config.seed,
                                                    tensors=tuple(tensors) if tensors is not None else None,
                                                    **config.batch_size_option()),
                            calibration_summary=summary,
                            calibration_source={"manifest": str(config.calibration), "method": table.method},
                            progress=progress)
    result.save(folder / "coverage")


def run_coverage(report_dir: Path, model: LoadedModel, config: ExperimentConfig, val: DataSet,
                 tables: Mapping[str, CalibrationTable], cal_dir: Path, common: Mapping[str, Any],
                 calib_key: str, progress: bool = False,
                 tensors: Sequence[str] | None = None,
                 judged: str | None = None) -> tuple[StageRecord, dict[str, Any], str]:
    """Run (or reuse) the stage on :func:`coverage_method`'s table; its record, the report's view of it, and a
    one-line message."""
    method = coverage_method(config, judged)
    datasets = [val, *(open_dataset(p) for p in config.coverage_sets)]
    key = {"stage": "coverage", **common, "table": calib_key, "method": method, "gate": config.coverage_gate,
           "data": [data_key(d) for d in datasets], "seed": config.seed,
           **({"tensors": sorted(tensors)} if tensors is not None else {})}
    rec = run_stage(report_dir, "coverage", key,
                    lambda f: coverage_stage(f, model, datasets, tables[method], cal_dir, config, progress,
                                             tensors))
    result = load_coverage(rec.path / "coverage")
    view = coverage_view(result, load_statistics(cal_dir / "statistics.npz"))
    verdict = result.verdict()
    flagged = len({(f["dataset"], f["tensor"]) for f in verdict["failing_tensors"]})
    sizes = [n for d in result.datasets for n in d.notes if NOT_CALIBRATED_SIZES in n]
    message = (f"calibration coverage ({method}): {'FLAGGED' if verdict['fails'] else 'covered'} (a data set is "
               f"flagged where {verdict['gate']})" + (f", {flagged} tensor(s) flagged; see the Calibration coverage "
                                                      "section" if verdict["fails"] else "")
               # the gate reads values: "covered" beside a note that sizes went beyond calibration read as a slip
               + ("; it judges the values seen, and some sizes were never calibrated: " + sizes[0]
                  if sizes and not verdict["fails"] else ""))
    return rec, view, message
