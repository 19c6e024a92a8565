"""``quantlab run EXPERIMENT.toml``: calibrate, build, compare, search and report in one go.

    quantlab run experiments/demo.toml --reports-dir reports

Writes ``reports/NAME/`` (``index.html``, ``manifest.json``, ``results/``,
``plots/``, and the reusable ``stages/``). Stages whose inputs did not change
are reused, so a rerun after an interruption or an edit only redoes what changed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from . import ExitCode, add_command, add_progress_option, path_arg, prepare_output

__all__ = ["HELP", "register", "run", "print_result", "prepare_report_dir"]

HELP = "run an experiment file: calibrate -> build -> compare -> search -> HTML report"



def register(subparsers: Any) -> None:
    p = add_command(subparsers, "run", __doc__, HELP)
    p.add_argument("experiment", type=path_arg, help="experiment TOML file (e.g. experiments/demo.toml)")
    p.add_argument("--reports-dir", type=path_arg, default=Path("reports"),
                   help="folder that receives reports/NAME/ (default: ./reports)")
    p.add_argument("--force", action="store_true", help="redo every stage even when its inputs are unchanged")
    p.add_argument("--fail-on-verdict", action="store_true",
                   help="exit with code 1 when the final candidate misses the threshold, or when no candidate "
                        "could be judged (CI gate)")
    add_progress_option(p, "--quiet")


def print_result(result: Any, *, stream: Any = None) -> None:
    """The stage summary, the verdict and where the report is."""
    out = stream or sys.stdout
    for stage in result.stages:
        how = "reused" if stage.reused else f"{stage.seconds:7.1f} s"
        print(f"  {stage.name:<28} {how}", file=out)
    if result.verdict is not None:
        v = result.verdict
        ci = f" (95 % CI {v.ci_low:.6g} – {v.ci_high:.6g})" if v.ci_low is not None else ""
        word = "PASS" if v.passed else "FAIL"
        print(f"verdict: {word}: {v.candidate}: {v.metric} = {v.value:.6g}{ci}; threshold {v.threshold}", file=out)
    elif result.config.threshold:
        print(f"verdict: NONE: {result.unjudged}", file=out)
    for note in result.messages:
        print(f"note: {note}", file=out)
    print(f"report: {result.index_html}", file=out)


def prepare_report_dir(reports_dir: Path, name: str, command: str, inputs: list[Path]) -> None:
    """reports/NAME must be new or hold only what a run wrote, and be writable, before any stage runs."""
    from ..experiment.store import MANIFEST_FILE, REPORT_FILES

    prepare_output(reports_dir / name, REPORT_FILES, command=command, flag="report folder", inputs=inputs,
                   marker=MANIFEST_FILE)


def export_release(config: Any, report_dir: Path) -> None:
    """The experiment's ``[export]`` table: its verdict's model into a Triton model repository."""
    from ..export import TritonOptions, export_triton, resolve_source

    options = TritonOptions(name=config.export_name or config.name, platform=config.export_platform,
                            max_batch_size=config.export_max_batch_size,
                            dynamic_batching=config.export_dynamic_batching, instances=config.export_instances)
    exported = export_triton(resolve_source(report_dir), config.export_repository, options)
    print(f"export: {exported.model_dir} version {exported.version} ({exported.model_file.name})")
    for note in exported.notes:
        print(f"note: export: {note}")


def run(args: Any) -> int:
    from ..experiment import load_experiment, run_experiment

    config = load_experiment(args.experiment)
    prepare_report_dir(args.reports_dir, config.name, "run", [args.experiment])
    command = "quantlab " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0] else "quantlab run"
    print(f"experiment {config.name}: {args.experiment}", file=sys.stderr)
    result = run_experiment(config, reports_dir=args.reports_dir, progress=not args.no_progress, force=args.force,
                            command=command)
    print_result(result)
    if config.export_repository is not None:
        export_release(config, result.report_dir)
    if args.fail_on_verdict and (result.verdict is None and config.threshold
                                 or result.verdict is not None and not result.verdict.passed):
        return ExitCode.VERDICT  # a CI gate does not pass a threshold it could not check
    return 0
