"""``quantlab compare REF.onnx CANDIDATE...``: per-layer and end-to-end error of candidates vs the FP32 reference.

    quantlab compare model.onnx build/int8 build/fp16 --data calib_sets/demo_val.toml --out runs/cmp
    quantlab compare model.onnx build/int8 --data val.toml --fail-if "top1_drop>0.5" --out runs/gate
    quantlab compare model.onnx build/int8 --data val.toml --out runs/cmp --shards 4 --ray auto

Each CANDIDATE is a folder written by ``quantlab build`` (model.onnx + provenance.json: per-layer
comparison, accumulated and local) or any .onnx file (no provenance: end to end only). Prints the
worst layers and the end-to-end table, and writes into ``--out`` (all or nothing):

- ``end_to_end.parquet/.csv``  one row per candidate and model output (cosine, SQNR, errors,
                               top-1 agreement, accuracy with bootstrap intervals, McNemar p)
- ``per_layer.parquet/.csv``   one row per candidate, layer and mode (accumulated / local)
- ``per_sample.parquet/.csv``  one row per candidate, output and sample
- ``compare.json``             settings, data hash and manifest, models, versions, warnings

--fail-if: exit 1 when the expression holds for a candidate (or cannot be evaluated because its
figures are NaN); nothing is written on errors (exit 2 or 3).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

from . import add_bind_option, add_command, add_progress_option, bound_inputs, confidence_level, non_negative_int, path_arg, positive_int, prepare_output, probability_arg, resolve_batch_size, text_arg

__all__ = ["HELP", "register", "run", "candidate_name", "owned_files", "check_label_metrics",
           "known_metrics"]

HELP = "per-layer and end-to-end error of FP16/INT8 candidates vs the FP32 reference (a CI gate)"

WORST_LAYERS = 10


def register(subparsers: Any) -> None:
    from ..backends import BACKEND_NAMES
    from ..compare import CompareOptions

    d = CompareOptions()
    p = add_command(subparsers, "compare", __doc__, HELP)
    add_bind_option(p)
    p.add_argument("reference", type=path_arg, help="the FP32 ONNX model")
    p.add_argument("candidates", type=path_arg, nargs="+", metavar="CANDIDATE",
                   help="`quantlab build` output folders or .onnx files")
    p.add_argument("--data", type=path_arg, required=True, metavar="TOML", help="validation set manifest")
    p.add_argument("--out", type=path_arg, required=True, metavar="DIR", help="output folder")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--labels", dest="labels", action="store_const", const=True, default=None,
                        help="require labels in the validation set (accuracy, McNemar); default: use them if present")
    labels.add_argument("--no-labels", dest="labels", action="store_const", const=False,
                        help="ignore the validation set's labels")
    p.add_argument("--label-output", type=text_arg, default=None, metavar="NAME",
                   help="the model output the labels index (default: the classifier output with most classes)")
    p.add_argument("--metric", type=text_arg, default=None, metavar="MODULE:FUNCTION",
                   help="user metric: function(reference_outputs, candidate_outputs, label) -> {name: number}, "
                        "called per sample; a module name or path/to/file.py")
    p.add_argument("--ctc-blank", type=non_negative_int, default=None, metavar="K",
                   help="the outputs scored per position ([N, T, C]) are CTC scores whose blank is class K (often "
                        "0): also compare the text they read (greedy decoding): text_agreement (%% of samples) and "
                        "cer (character error rate, %%)")
    p.add_argument("--class-map", action="append", type=text_arg, default=None, metavar="OUTPUT",
                   help="read output OUTPUT [N, C, H, W] as class scores per pixel (pixel agreement, miou) where its "
                        "head does not show it (SegFormer's 1/4-size logits straight from a 1x1 conv); repeatable")
    p.add_argument("--decision-threshold", type=probability_arg, default=d.decision_threshold, metavar="P",
                   help="outputs a Sigmoid writes (a text detector's map, tags, voice activity) are read as the masks "
                        f"p > P (default {d.decision_threshold}; DBNet reads its map at 0.3): element_match, "
                        "exact_match and mask_iou (%% overlap) of the masks")
    p.add_argument("--fail-if", type=text_arg, default=None, action="append", metavar="EXPR",
                   help='exit 1 when EXPR holds for a candidate, e.g. "top1_drop>0.5" or "cosine<0.999"; '
                        "repeat it to fail when any one holds")
    p.add_argument("--backend", choices=BACKEND_NAMES, default=d.backend, help=f"default {d.backend}")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"default {d.batch_size}, 1 for a model that fixes its batch at 1")
    p.add_argument("--max-samples", type=positive_int, default=None, help="first N samples only")
    p.add_argument("--no-per-layer", action="store_true", help="end to end only (fastest)")
    p.add_argument("--no-local", action="store_true", help="per layer: accumulated mode only")
    p.add_argument("--no-accumulated", action="store_true", help="per layer: local mode only")
    p.add_argument("--layers", choices=["groups", "nodes"], default=d.layers,
                   help="compare fusion-group outputs (default) or every node output")
    p.add_argument("--layer-group-size", type=positive_int, default=d.layer_group_size,
                   help=f"tensors exposed at once (default {d.layer_group_size}); larger models run in segments")
    p.add_argument("--bootstrap", type=non_negative_int, default=d.bootstrap,
                   help=f"bootstrap resamples for intervals (default {d.bootstrap}; 0: none)")
    p.add_argument("--confidence", type=confidence_level, default=d.confidence, help=f"default {d.confidence}")
    p.add_argument("--seed", type=non_negative_int, default=d.seed, help=f"bootstrap seed (default {d.seed})")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="threads running models and metrics side by side (default: 2 on ONNX Runtime, else 1)")
    p.add_argument("--shards", type=positive_int, default=d.shards, metavar="N",
                   help="split the validation set into N shards compared by Ray workers; the tables equal one "
                        "pass's (needs: pip install 'quantlab[ray]')")
    p.add_argument("--ray", type=text_arg, default=None, metavar="ADDRESS",
                   help="where shards run: 'auto' (a local Ray instance; the default with --shards > 1) or a "
                        "cluster, ray://host:10001")
    p.add_argument("--calib", type=path_arg, default=None, metavar="PATH",
                   help="the calibration set (manifest .toml, or data_summary.json of `quantlab calibrate`): "
                        "warn when the validation set shares samples with it, or holds sizes or values beyond it")
    p.add_argument("--worst", type=non_negative_int, default=WORST_LAYERS,
                   help=f"worst layers printed per candidate (default {WORST_LAYERS})")
    add_progress_option(p)


def candidate_name(path: Path) -> str:
    """A build folder's name, the folder of a build's model.onnx, or an .onnx file's stem."""
    if path.is_dir():
        return path.resolve().name
    if path.name == "model.onnx" and (path.parent / "provenance.json").is_file():
        return path.resolve().parent.name
    return path.stem


def _names(paths: list[Path]) -> list[str]:
    names: list[str] = []
    for path in paths:
        base = candidate_name(path) or "candidate"
        name, k = base, 2
        while name in names:
            name, k = f"{base}#{k}", k + 1
        names.append(name)
    return names


def owned_files() -> tuple[str, ...]:
    """The files a comparison writes into --out (the only ones a rerun may replace)."""
    from ..compare.result import OWNED_FILES

    return OWNED_FILES


def _calibration_summary(path: Path | None, reference: Any, batch_size: int) -> Any:
    """The --calib set's summary, hashed as calibrate hashed it: a ``[sequence]`` set with the state its streams
    carry (so a step fed another state is another sample, as in the validation set's summary)."""
    if path is None:
        return None
    import json

    from ..data import DataSummary, open_dataset, summarize
    from ..errors import CompareError

    if path.suffix == ".json":
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CompareError(f"--calib {path}: cannot read ({exc})") from None
        if isinstance(doc, dict) and "tensors" in doc and "inputs" not in doc:
            raise CompareError(f"--calib {path}: this is a calibration table (per-tensor ranges), not the calibration "
                               f"set; give its manifest (.toml) or the data_summary.json beside it "
                               f"({path.parent / 'data_summary.json'})")
        summary = DataSummary.from_dict(doc.get("summary", doc) if isinstance(doc, dict) else doc)
        if not summary.sample_hashes:
            raise CompareError(f"--calib {path}: holds no per-sample hashes; give the calibration manifest instead")
        return summary
    # one sample at a time: a set whose input has no batch axis but differs per sample (Silero's clips) batches
    # only so, and the summary is per sample anyway
    dataset = open_dataset(path)
    if getattr(dataset, "sequence_carry", None):
        from ..sequence import with_carry

        streams = getattr(dataset, "sequence_streams", None) or batch_size
        return summarize(with_carry(dataset, reference, streams=streams), batch_size=streams)
    return summarize(dataset, batch_size=1)


def check_label_metrics(threshold: Any, flag: str, data: Path, dataset: Any, no_labels: bool) -> None:
    """Accuracy metrics (top1_drop, mcnemar_p, ...) need labels: say where to add them, before any work."""
    from ..compare import LABEL_COLUMNS
    from ..errors import ThresholdError

    wanted = [m for m in threshold.metrics if m in LABEL_COLUMNS]
    if not wanted:
        return
    names = ", ".join(wanted)
    if no_labels:
        raise ThresholdError(f"{flag} {threshold.text!r} names {names}, an accuracy figure, but --no-labels ignores "
                             "the labels: drop --no-labels, or gate on a label-free metric (cosine, sqnr_db, "
                             "top1_agreement)")
    if not getattr(dataset, "has_labels", False):
        raise ThresholdError(f"{flag} {threshold.text!r} names {names}, an accuracy figure, but the validation set "
                             f"{data} has no labels: add a [labels] table to {data} (see calib_sets/README.md), "
                             "or gate on a label-free metric (cosine, sqnr_db, top1_agreement)")


def known_metrics(reference: Any, use_labels: bool, dataset: Any = None, ctc_blank: int | None = None,
                  class_maps: Any = ()) -> set[str] | None:
    """The end-to-end columns a comparison of ``reference`` on ``dataset`` reports: what a threshold may name
    (a sequence set adds the free-running figures, ``ctc_blank`` the CTC text's)."""
    from ..compare.choices import exact_outputs, position_scorers, segmentation_maps
    from ..compare.labels import classifier_outputs
    from ..compare.probabilities import probability_outputs
    from ..compare.reported import reported_metrics
    from ..sequence import SequenceData

    sequence = isinstance(dataset, SequenceData) or bool(getattr(dataset, "sequence_carry", None))
    positions = position_scorers(reference, {}, tuple(class_maps or ()))
    return reported_metrics(classifiers=bool(classifier_outputs(reference)), labels=use_labels,
                            positions=bool(positions), ctc=ctc_blank is not None,
                            segmentation=bool(segmentation_maps(reference, positions)),
                            exact=bool(exact_outputs(reference)), masks=bool(probability_outputs(reference)),
                            free_running=sequence)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        if 0.99 <= abs(v) < 1:
            return f"{v:.6f}"
        return f"{v:.4g}"
    return str(v)


def _end_to_end_view(result: Any) -> Any:
    df = result.end_to_end
    cols = ["candidate", "output", "samples", "cosine", "sqnr_db", "max_abs", "rel_l2", "nan_count"]
    for c in ("top1_agreement", "token_agreement", "miou", "sequence_agreement", "text_agreement", "cer", "mask_iou",
              "exact_match", "ref_top1", "top1", "top1_drop", "top1_drop_ci_low", "top1_drop_ci_high",
              "top5_drop", "mcnemar_p"):
        if c in df.columns and df[c].notna().any():
            cols.append(c)
    if "shape_mismatch" in df.columns and (df["shape_mismatch"] > 0).any():  # else a column of zeros
        cols.insert(cols.index("nan_count") + 1, "shape_mismatch")
    extra = [c for c in df.columns if c not in cols and not c.endswith(("_ci_low", "_ci_high"))
             and c not in ("cosine_min", "mean_abs", "classes", "ref_top5", "top5", "ref_only_correct", "shape_mismatch",
                           "cand_only_correct", "free_cosine", "free_max_abs", "free_rel_l2")]
    return df[cols + extra]


def _worst_view(result: Any, candidate: str, n: int) -> Any:
    import pandas as pd

    df = result.per_layer[result.per_layer["candidate"] == candidate]
    if df.empty or n == 0:
        return df
    keys = ["layer", "tensor"]
    acc = df[df["mode"] == "accumulated"].set_index(keys)
    loc = df[df["mode"] == "local"].set_index(keys)
    base = (loc if not loc.empty else acc)[["order", "group", "op_type", "precision"]]
    view = base.copy()
    if not acc.empty:
        view["accumulated_db"] = acc["sqnr_db"]
    if not loc.empty:
        view["local_db"] = loc["sqnr_db"]
        view["local_cosine"] = loc["cosine"]
    else:
        view["accumulated_cosine"] = acc["cosine"]
    view = view.reset_index()
    by = "local_db" if "local_db" in view.columns else "accumulated_db"
    view = view.sort_values([by, "order"], kind="stable").head(n)
    several = view["layer"].duplicated(keep=False).any()  # an LSTM's y, hn and cn: which row is which
    return pd.DataFrame(view).drop(columns=[] if several else ["tensor"]).reset_index(drop=True)


CHANGED_SHOWN = 5
"""Changed samples printed per candidate (the report lists more)."""


def _engine_profile_notes(name: str, path: Path, result: Any) -> list[str]:
    """:func:`quantlab.shapes.outside_profiles` for a build folder that holds an engine (``engine.json``)."""
    import json

    from ..shapes import outside_profiles

    folder = path if path.is_dir() else path.parent
    info = folder / "engine.json"
    if not info.is_file():
        return []
    try:
        profiles = json.loads(info.read_text(encoding="utf-8")).get("profiles") or {}
    except (OSError, ValueError, AttributeError):
        return [f"candidate {name!r}: {info} is not readable JSON: its engine's profiles were not checked"]
    inputs = ((result.data or {}).get("summary") or {}).get("inputs") or {}  # name -> InputStats.as_dict()
    if not isinstance(profiles, dict) or not isinstance(inputs, dict):
        return []
    return outside_profiles(f"candidate {name!r} ({info})", profiles, inputs.values())


def run(args: argparse.Namespace) -> int:
    from ..compare import CompareOptions, compare, load_candidate
    from ..data import open_dataset
    from ..graph import load_model
    from ..report.samples import changed_samples
    from ..threshold import parse_threshold

    gates = [parse_threshold(text) for text in args.fail_if or ()]
    prepare_output(args.out, owned_files(), command="compare", inputs=[args.reference, args.data, *args.candidates])
    reference = load_model(args.reference, bind=bound_inputs(args))
    names = _names(list(args.candidates))
    candidates = {name: load_candidate(path, reference) for name, path in zip(names, args.candidates)}
    dataset = open_dataset(args.data)
    resolve_batch_size(args, reference, dataset, CompareOptions.batch_size, "compare", warn_coupled=False)
    for threshold in gates if args.metric is None else ():
        check_label_metrics(threshold, "--fail-if", args.data, dataset, args.labels is False)
        use_labels = bool(getattr(dataset, "has_labels", False)) and args.labels is not False
        parse_threshold(threshold.text, known_metrics=known_metrics(reference, use_labels, dataset, args.ctc_blank,
                                                                          args.class_map))
    calibration = _calibration_summary(args.calib, reference, args.batch_size)
    options = CompareOptions(
        backend=args.backend, batch_size=args.batch_size, per_layer=not args.no_per_layer, local=not args.no_local,
        accumulated=not args.no_accumulated, layer_group_size=args.layer_group_size, max_samples=args.max_samples,
        metric=args.metric, bootstrap=args.bootstrap, confidence=args.confidence, seed=args.seed,
        layers=args.layers, labels=args.labels, label_output=args.label_output, workers=args.workers,
        shards=args.shards, ray=args.ray, ctc_blank=args.ctc_blank, class_maps=tuple(args.class_map or ()),
        decision_threshold=args.decision_threshold,
    )
    print(f"quantlab compare: {reference.label} vs {', '.join(names)} on {args.data}", flush=True)
    for name, cand in candidates.items():
        if not hasattr(cand, "provenance"):
            print(f"  note: {name} has no provenance (not a `quantlab build` folder): end-to-end comparison only")
    result = compare(reference, candidates, dataset, options, progress=not args.no_progress, calibration=calibration)
    engine_notes = [n for name, path in zip(names, args.candidates) for n in _engine_profile_notes(name, path, result)]
    if engine_notes:
        result = dataclasses.replace(result, warnings=(*result.warnings, *engine_notes))
    checks = [(threshold, result.check(threshold)) for threshold in gates]
    paths = result.save(args.out)

    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 30):
        if options.per_layer:
            for name in names:
                view = _worst_view(result, name, args.worst)
                if not view.empty:
                    print(f"\n{name}: worst layers (SQNR dB, lower is worse)")
                    print(view.to_string(index=False, formatters=_formatters(view)))
        e2e = _end_to_end_view(result)
        print("\nend to end (accuracy and agreement in %, drops in percentage points)")
        print(e2e.to_string(index=False, formatters=_formatters(e2e)))
        changed = changed_samples(result.per_sample, shown=CHANGED_SHOWN)
        if changed is not None and not changed.empty:
            print(f"\nsamples whose decision changed (at most {CHANGED_SHOWN} per candidate, the furthest first; "
                  "all in per_sample.csv)")
            print(changed.to_string(index=False, formatters=_formatters(changed)))
    for w in result.warnings:
        print(f"warning: {w}")
    failed = []
    not_judged = result.unjudged()  # a gate that cannot be judged fails, as one that holds does
    for threshold, per_candidate in checks:
        for name, check in per_candidate.items():
            unknown = [k for k, v in check.values.items() if v is None or (isinstance(v, float) and math.isnan(v))]
            shown = ", ".join(f"{k} = {_fmt(v)}" for k, v in check.values.items())
            if check.passed or unknown or not_judged:
                failed.append(name)
                rows = result.end_to_end[result.end_to_end["candidate"] == name]
                why = (f"cannot be judged: {not_judged}" if not_judged else "holds" if check.passed else
                       f"cannot be evaluated ({'; '.join(threshold.nan_reasons(rows)) or ', '.join(unknown)})")
                print(f"FAIL {name}: --fail-if {threshold} {why} ({shown})")
            else:
                print(f"pass {name}: --fail-if {threshold} does not hold ({shown})")
        unjudged = threshold.unjudged_note(result.end_to_end)
        if unjudged:
            print(f"note: --fail-if: {unjudged}")
    print(f"\nwrote {', '.join(str(p) for k, p in paths.items() if not k.endswith('_csv'))} (+ .csv)")
    sys.stdout.flush()
    return 1 if failed else 0


NAME_COLUMNS = ("group", "tensor", "layer", "node", "output")
"""Columns holding model-supplied names: shortened in the terminal (tf2onnx's run to 300 characters)."""


def _formatters(df: Any) -> dict[str, Any]:
    import pandas as pd

    from ..report.markup import short

    out: dict[str, Any] = {c: _fmt for c in df.columns if pd.api.types.is_float_dtype(df[c])}
    for c in NAME_COLUMNS:
        if c in df.columns:
            shown = _distinct_shortening({str(v) for v in df[c]}, 60, short)
            out[c] = lambda v, shown=shown: shown[str(v)]
    return out


def _distinct_shortening(names: set[str], limit: int, short: Any) -> dict[str, str]:
    """name -> its shortened form, whole where two names would shorten alike (three RegNet layers read as one)."""
    shortened = {n: short(n, limit) for n in names}
    counts: dict[str, int] = {}
    for v in shortened.values():
        counts[v] = counts.get(v, 0) + 1
    return {n: (n if counts[v] > 1 else v) for n, v in shortened.items()}
