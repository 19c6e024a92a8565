"""``quantlab coverage MODEL``: does the calibration set represent the data the model will see? (a CI gate)

    quantlab coverage model.onnx --table calib/calib_entropy.json --data calib_sets/demo_val.toml --out runs/cov
    quantlab coverage model.onnx --table calib/calib_entropy.json --data prod_day.toml --data prod_night.toml \\
        --fail-if "saturated_max>0.01" --out runs/cov

One streaming FP32 pass over each --data set, then per tensor and set: the share of values the table's
range saturates (|x| > amax) and of samples with any saturation, values beyond anything calibration saw,
how far the |x| distribution moved (PSI with a block-bootstrap interval and its noise level, Wasserstein-1),
the worst samples by key, and the model inputs side by side with the calibration set's. The calibration
histograms come from the statistics.npz `quantlab calibrate` wrote beside the table (--stats to give another).

Writes into --out (all or nothing): coverage.json (figures, verdict, worst samples, input summaries),
coverage_tensors.csv, and <set>/statistics.npz per data set: add a set to the calibration without running
the model again with `quantlab calibrate MODEL --stats CALIB/statistics.npz --stats OUT/<set>/statistics.npz`.

--fail-if EXPR (default: "outside_surprise_max>2 and outside_samples_max>0.2 | zeroed_excess_max>0.2", ` | `
between thresholds that fail when any one holds): exit 1 (verdict) when EXPR holds, e.g. "saturated_max>0.01",
"outside_samples_max>0.05", "psi_ci_low_max>0.25". Metrics: saturated, saturated_calib,
saturated_excess, saturated_samples, zeroed, zeroed_calib, zeroed_excess (non-zero values under half an INT8 step,
read as 0: a set far below the calibrated range), sqnr_drop (dB of predicted INT8 SQNR this set loses against the
calibration set at the calibrated ranges: both ends weighed by energy), outside, outside_samples, outside_surprise (-log10 of the chance that data of the calibration
set's own distribution has that many samples beyond the calibration maximum in some tensor), psi, psi_ci_low, psi_ci_high, psi_noise, psi_excess,
wasserstein, each also as <metric>_max (largest over tensors and sets). Nothing is written on errors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..coverage.gate import DEFAULT_GATE
from . import add_bind_option, add_command, add_progress_option, bound_inputs, confidence_level, non_negative_int, path_arg, positive_int, prepare_output, resolve_batch_size, text_arg

__all__ = ["HELP", "register", "run", "owned_files"]

HELP = "does the calibration set cover these data sets? saturation, distribution shift, worst samples (a CI gate)"


def owned_files() -> tuple[str, ...]:
    """The files a coverage run writes into --out (the only ones a rerun may replace)."""
    from ..coverage.result import OWNED_FILES

    return OWNED_FILES

WORST_TENSORS = 8


def register(subparsers: Any) -> None:
    p = add_command(subparsers, "coverage", __doc__, HELP)
    add_bind_option(p)
    p.add_argument("model", type=path_arg, help="the FP32 ONNX model the table was calibrated for")
    p.add_argument("--table", type=path_arg, required=True, metavar="JSON",
                   help="calibration table, DIR/calib_METHOD.json")
    p.add_argument("--stats", type=path_arg, default=None, metavar="NPZ",
                   help="calibration statistics (default: statistics.npz beside the table)")
    p.add_argument("--data", type=path_arg, required=True, action="append", metavar="TOML",
                   help="data set manifest to check (repeat for several)")
    p.add_argument("--out", type=path_arg, required=True, metavar="DIR", help="output folder")
    p.add_argument("--fail-if", type=text_arg, default=None, action="append", metavar="EXPR",
                   help=f'exit 1 when EXPR holds (default "{DEFAULT_GATE}"), e.g. "saturated_max>0.01"; '
                        "repeat it to fail when any one holds")
    add_progress_option(p)
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="samples per model run (default 8, 1 for a model that fixes its batch at 1)")
    p.add_argument("--bootstrap", type=non_negative_int, default=400, help="bootstrap resamples (default 400)")
    p.add_argument("--confidence", type=confidence_level, default=0.95, help="interval confidence (default 0.95)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--worst", type=non_negative_int, default=10, help="worst samples kept per set (default 10)")
    p.add_argument("--backend", type=text_arg, default="ort", help="backend running the FP32 model (default ort)")
    p.add_argument("--tensors", choices=["quantizable", "all"], default="quantizable",
                   help="the table's tensors to check: those an INT8 plan may quantize (default; a YOLO's anchor "
                        "grid and box decoding are not) or all of them")


def calibration_summary(table: Path) -> Any:
    """The calibration set's DataSummary from data_summary.json beside the table (None when absent)."""
    import json

    from ..data import DataSummary

    path = table.parent / "data_summary.json"
    if not path.is_file():
        return None
    return DataSummary.from_dict(json.loads(path.read_text(encoding="utf-8")))


def inputs_frame(result: Any) -> Any:
    """Per model input: min/max/mean/std of the calibration set and of each data set, one row each."""
    import pandas as pd

    rows = []
    calib = result.calibration.get("summary")
    sets = ([("calibration", calib)] if calib else []) + [(d.name, d.summary.as_dict() if hasattr(d.summary, "as_dict")
                                                         else d.summary) for d in result.datasets]
    for label, summary in sets:
        for name, s in (summary or {}).get("inputs", {}).items():
            rows.append({"input": name, "set": label, "min": s["min"], "max": s["max"], "mean": s["mean"],
                         "std": s["std"]})
    return pd.DataFrame(rows).sort_values(["input"], kind="stable") if rows else pd.DataFrame()


def _print(result: Any) -> None:
    import pandas as pd

    from ..coverage.result import worst_first

    cols = ["tensor", "outside_samples", "saturated", "saturated_calib", "saturated_samples", "zeroed",
            "zeroed_calib", "sqnr_drop", "psi", "psi_ci_low", "psi_ci_high", "psi_noise", "wasserstein"]
    fmt = {c: "{:.4g}".format for c in cols[1:]}
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        for d in result.datasets:
            worst = pd.DataFrame(worst_first(d.rows, result.gate))
            print(f"\n{d.name}: {d.samples} samples; worst tensors by the gate (of {len(worst)})")
            print(worst[cols].head(WORST_TENSORS).to_string(index=False, formatters=fmt))
            print(f"{d.name}: worst samples by saturation")
            for s in d.worst_samples[:5]:
                print(f"  {s['key']}: {s['saturated_excess']:+.2%} of {s['worst_tensor']!r} above amax (vs the "
                      f"calibration set); saturates in "
                      f"{s['tensors_saturated']} tensor(s), beyond the calibration range in {s['tensors_outside']}")
            for note in d.notes:
                print(f"note: {note}")
        frame = inputs_frame(result)
        if not frame.empty:
            print("\nmodel inputs, calibration set vs data sets")
            print(frame.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def run(args: argparse.Namespace) -> int:
    from ..coverage import CoverageOptions, check_coverage, join_gates, parse_gate
    from ..data import open_dataset
    from ..graph import load_model
    from ..stats import load_statistics
    from ..table import read_table

    gate = join_gates(args.fail_if)
    parse_gate(gate)  # a misspelt metric fails before any work
    prepare_output(args.out, owned_files(), command="coverage", inputs=[args.model, args.table, *args.data])
    model = load_model(args.model, bind=bound_inputs(args))
    table = read_table(args.table)
    stats_path = args.stats if args.stats is not None else args.table.parent / "statistics.npz"
    calibration = load_statistics(stats_path)
    datasets = [open_dataset(p) for p in args.data]
    resolve_batch_size(args, model, datasets[0] if datasets else None, CoverageOptions.batch_size, "coverage")
    tensors = None
    if args.tensors == "quantizable":
        from ..stats import scope_tensors

        tensors = tuple(scope_tensors(model.proto, "quantizable"))
    options = CoverageOptions(batch_size=args.batch_size, resamples=args.bootstrap, confidence=args.confidence,
                              seed=args.seed, worst_samples=args.worst, gate=gate, backend=args.backend,
                              tensors=tensors)
    print(f"quantlab coverage: {model.label}, table {args.table} ({table.method}), "
          f"{len(datasets)} data set(s)", file=sys.stderr, flush=True)
    result = check_coverage(model, datasets, table, calibration, options=options,
                            calibration_summary=calibration_summary(args.table),
                            calibration_source={"table": str(args.table), "statistics": str(stats_path)},
                            progress=not args.no_progress)
    _print(result)
    paths = result.save(args.out)
    verdict = result.verdict()
    shown = ", ".join(f"{k} = {v:.4g}" for k, v in verdict["values"].items())
    failing = verdict["failing_tensors"]
    names = ", ".join(f"{f['tensor']!r} ({f['dataset']})" for f in failing[:8])
    if verdict["fails"]:
        why = "cannot be evaluated (NaN)" if verdict["unknown"] else "holds"
        print(f"\nFAIL: --fail-if {verdict['gate']} {why} ({shown}); tensors: {names or '-'}")
    else:
        print(f"\npass: --fail-if {verdict['gate']} does not hold ({shown})")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    sys.stdout.flush()
    return 1 if verdict["fails"] else 0
