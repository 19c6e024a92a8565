"""What a comparison gives (:class:`CompareResult`: three tables and a record) and its folder on disk.

The table columns and the on-disk format change together with the result, so they live here::

    out_dir/
      compare.json                    format, settings, data, models, environment, warnings, end-to-end rows
      end_to_end.parquet / .csv       one row per candidate x model output
      per_layer.parquet / .csv        one row per candidate x layer x mode ("accumulated" | "local")
      per_sample.parquet / .csv       one row per candidate x sample (x output)
      mask_examples.npz               maps read as masks: each candidate's most changed sample (.mask_examples)

end_to_end columns (NaN where not applicable): candidate, output, samples, cosine, sqnr_db,
max_abs, mean_abs, rel_l2, and for classifier outputs ([N, C] or [N, C, 1, 1] scores, C > 1): top1_agreement,
top1_agreement_ci_low/high; with labels: ref_top1, top1, top1_drop (percentage points,
reference minus candidate), top5 / ref_top5 / top5_drop, each with _ci_low/_ci_high
(bootstrap, options.bootstrap resamples, options.confidence), mcnemar_p
(exact McNemar between reference and candidate correctness); for outputs scored per position
(:mod:`.choices`: OCR/CTC scores, token logits [N, T, C]): classes, token_agreement (% of positions whose
best class is the reference's, per sample then averaged) and sequence_agreement (% of samples that agree at
every position), for segmentation maps [N, C, H, W] also miou (mean over the classes either map holds of their
overlap, %), and with ``ctc_blank`` (CTC scores) text_agreement (% of samples whose greedy CTC text is the
reference's) and cer (character error rate against that text, %, mean over samples); for integer and boolean
outputs (ArgMax ids, decoded tokens): element_match and exact_match,
alike over elements (their cosine, cosine_min, sqnr_db and rel_l2 are NaN); for outputs a Sigmoid writes
(:mod:`.probabilities`: a text detector's map, tags, voice activity) element_match and exact_match of the masks
``p > decision_threshold``, and mask_iou (% overlap of the two masks, mean over the samples where either holds
anything); each with _ci_low/_ci_high; and one column per number a user metric returns. nan_count counts
NaN/inf elements in the candidate's outputs; shape_mismatch the samples whose output had another shape than the
reference's (a data-sized output: the boxes NMS keeps), left out of the other figures (gate on it:
``shape_mismatch<=0``).

per_layer columns: candidate, mode, order (topological index of the node in the reference),
layer (reference node name), group (fusion group name), op_type, tensor (reference output
tensor compared), precision (the group's precision in the candidate), cosine, sqnr_db,
max_abs, mean_abs, rel_l2, nan_count.

Definitions (see :mod:`quantlab.metrics`): per layer, every figure is over all elements of
the tensor and all samples (float64 running sums). End to end, ``sqnr_db``, ``max_abs``,
``mean_abs`` and ``rel_l2`` are over all elements too, while ``cosine`` is the mean over
samples of each sample's cosine (``cosine_min``: the worst sample; ``cosine_ci_low/high``:
its bootstrap interval). Accuracy and agreement figures are percentages (0-100); the
``_drop`` columns are percentage points. Extra columns: ``cosine_min``, ``cosine_ci_*``,
``ref_only_correct`` / ``cand_only_correct`` (McNemar's discordant counts), ``nan_count``;
per layer also ``node`` (the reference node producing ``tensor``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..atomic import atomic_dir, json_dumps
from ..errors import CompareError
from ..threshold import Threshold, ThresholdCheck, parse_threshold
from .determinism import unjudged_reason
from .mask_examples import MASK_EXAMPLES_FILE, MaskExample, load_mask_examples, save_mask_examples

__all__ = ["CompareResult", "load_comparison", "COMPARE_FORMAT", "FRAMES", "END_TO_END_COLUMNS",
           "CLASSIFIER_COLUMNS", "LABEL_COLUMNS", "POSITION_COLUMNS", "CTC_COLUMNS", "MASK_COLUMNS", "MATCH_COLUMNS",
           "PER_LAYER_COLUMNS", "PER_SAMPLE_COLUMNS", "RESERVED_COLUMNS", "SEGMENTATION_COLUMNS", "LIVE_MODES"]

COMPARE_FORMAT = "quantlab.compare/1"
FRAMES = ("end_to_end", "per_layer", "per_sample")

OWNED_FILES = ("compare.json", MASK_EXAMPLES_FILE,
               *(f"{name}.{ext}" for name in FRAMES for ext in ("parquet", "csv")))
"""What :meth:`CompareResult.save` writes: the only files a later save into the same folder may replace."""

END_TO_END_COLUMNS: tuple[str, ...] = (
    "candidate", "output", "samples", "cosine", "cosine_min", "cosine_ci_low", "cosine_ci_high", "sqnr_db",
    "max_abs", "mean_abs", "rel_l2", "nan_count", "shape_mismatch",
)
CLASSIFIER_COLUMNS: tuple[str, ...] = ("classes", "top1_agreement", "top1_agreement_ci_low", "top1_agreement_ci_high")
LABEL_COLUMNS: tuple[str, ...] = (
    "ref_top1", "ref_top1_ci_low", "ref_top1_ci_high", "top1", "top1_ci_low", "top1_ci_high",
    "top1_drop", "top1_drop_ci_low", "top1_drop_ci_high",
    "ref_top5", "ref_top5_ci_low", "ref_top5_ci_high", "top5", "top5_ci_low", "top5_ci_high",
    "top5_drop", "top5_drop_ci_low", "top5_drop_ci_high",
    "mcnemar_p", "ref_only_correct", "cand_only_correct",
)
POSITION_COLUMNS: tuple[str, ...] = (
    "classes", "token_agreement", "token_agreement_ci_low", "token_agreement_ci_high",
    "sequence_agreement", "sequence_agreement_ci_low", "sequence_agreement_ci_high",
)
CTC_COLUMNS: tuple[str, ...] = (
    "text_agreement", "text_agreement_ci_low", "text_agreement_ci_high", "cer", "cer_ci_low", "cer_ci_high",
)
MASK_COLUMNS: tuple[str, ...] = ("mask_iou", "mask_iou_ci_low", "mask_iou_ci_high")
SEGMENTATION_COLUMNS: tuple[str, ...] = ("miou", "miou_ci_low", "miou_ci_high")
MATCH_COLUMNS: tuple[str, ...] = (
    "element_match", "element_match_ci_low", "element_match_ci_high", "exact_match", "exact_match_ci_low",
    "exact_match_ci_high",
)
PER_LAYER_COLUMNS: tuple[str, ...] = (
    "candidate", "mode", "order", "layer", "group", "op_type", "tensor", "precision", "cosine", "sqnr_db",
    "max_abs", "mean_abs", "rel_l2", "nan_count", "node",
)
PER_SAMPLE_COLUMNS: tuple[str, ...] = ("candidate", "output", "sample", "key", "cosine", "sqnr_db", "max_abs")
RESERVED_COLUMNS = frozenset(END_TO_END_COLUMNS + CLASSIFIER_COLUMNS + LABEL_COLUMNS + POSITION_COLUMNS
                             + CTC_COLUMNS + MASK_COLUMNS + SEGMENTATION_COLUMNS + MATCH_COLUMNS
                             + PER_SAMPLE_COLUMNS)
"""Names a user metric may not return: the comparator's own columns."""
LIVE_MODES = ("accumulated", "local")
"""The per-layer modes, in the order of the per-layer table."""


@dataclass(frozen=True)
class CompareResult:
    end_to_end: pd.DataFrame
    per_layer: pd.DataFrame
    per_sample: pd.DataFrame
    settings: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)        # manifest record, content sha256, count
    models: Mapping[str, Any] = field(default_factory=dict)      # name -> sha256, plan hash, provenance meta
    environment: Mapping[str, Any] = field(default_factory=dict)  # tool versions, backend describe()
    warnings: tuple[str, ...] = ()                               # e.g. NaN first seen at layer X
    mask_examples: tuple[MaskExample, ...] = ()                  # each candidate's most changed mask (maps)

    def check(self, threshold: str | Threshold) -> dict[str, ThresholdCheck]:
        """The threshold's outcome per candidate."""
        t = parse_threshold(threshold)
        return {str(name): t.check(rows) for name, rows in self.end_to_end.groupby("candidate", sort=False)}

    def unjudged(self) -> str:
        """Why no threshold on these figures can be judged ("" when one can): the FP32 reference drew other random
        numbers on a second run of the same batch (``settings["reference_noise"]``), so the figures measure that
        noise beside quantization's, or hide it."""
        return unjudged_reason(self.settings.get("reference_noise") or {})

    def worst_layers(self, n: int = 10, *, candidate: str | None = None, mode: str = "local",
                     metric: str = "sqnr_db") -> pd.DataFrame:
        """The ``n`` layers with the lowest ``metric`` (SQNR: lower is worse)."""
        df = self.per_layer
        if df.empty:
            return df
        df = df[df["mode"] == mode]
        if candidate is not None:
            df = df[df["candidate"] == candidate]
        return df.sort_values(metric, kind="stable").head(n).reset_index(drop=True)

    @property
    def candidates(self) -> list[str]:
        return [str(c) for c in dict.fromkeys(self.end_to_end["candidate"])] if not self.end_to_end.empty else []

    def to_dict(self) -> dict[str, Any]:
        """The JSON record (``compare.json``): settings, data, models, environment, warnings, end-to-end rows."""
        return {
            "format": COMPARE_FORMAT,
            "settings": _plain(dict(self.settings)),
            "data": _plain(dict(self.data)),
            "models": _plain(dict(self.models)),
            "environment": _plain(dict(self.environment)),
            "warnings": list(self.warnings),
            "end_to_end": _plain(self.end_to_end.to_dict("records")),
            "tables": {name: [f"{name}.parquet", f"{name}.csv"] for name in FRAMES},
        }

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write the three tables as .parquet and .csv plus ``compare.json``, all or nothing.

        The folder is built beside ``out_dir`` and renamed into place, so a failure
        leaves the previous result (or nothing). ``out_dir`` must be new, empty, or
        a previous comparison (holding ``compare.json``): other folders are refused.
        """
        out = Path(out_dir)
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "compare.json").is_file())):
            raise CompareError(f"{out}: exists and is not a comparison folder (no compare.json); refusing to "
                               "replace it. Choose a new or empty folder for --out.")
        names: dict[str, Path] = {}
        with atomic_dir(out, owned=OWNED_FILES) as tmp:
            for name in FRAMES:
                frame = getattr(self, name)
                frame.to_parquet(tmp / f"{name}.parquet", index=False)
                frame.to_csv(tmp / f"{name}.csv", index=False)
                names[name] = out / f"{name}.parquet"
                names[f"{name}_csv"] = out / f"{name}.csv"
            (tmp / "compare.json").write_text(json_dumps(self.to_dict()), encoding="utf-8")
            names["json"] = out / "compare.json"
            if save_mask_examples(self.mask_examples, tmp) is not None:
                names["mask_examples"] = out / MASK_EXAMPLES_FILE
        return names


def load_comparison(out_dir: str | Path) -> CompareResult:
    """A :class:`CompareResult` back from a folder written by :meth:`CompareResult.save`."""
    folder = Path(out_dir)
    record_path = folder / "compare.json"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CompareError(f"{record_path}: cannot read the comparison record ({exc}); is {folder} a folder "
                           "written by `quantlab compare --out` / CompareResult.save?") from None
    if not isinstance(record, dict) or record.get("format") != COMPARE_FORMAT:
        raise CompareError(f"{record_path}: not a quantlab comparison (format {record.get('format')!r}, "
                           f"expected {COMPARE_FORMAT!r})")
    frames: dict[str, pd.DataFrame] = {}
    for name in FRAMES:
        path = folder / f"{name}.parquet"
        try:
            frames[name] = pd.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
            csv = folder / f"{name}.csv"
            if csv.is_file():
                frames[name] = pd.read_csv(csv)
            else:
                raise CompareError(f"{path}: cannot read table {name!r} ({exc})") from None
    return CompareResult(
        end_to_end=frames["end_to_end"], per_layer=frames["per_layer"], per_sample=frames["per_sample"],
        settings=record.get("settings", {}), data=record.get("data", {}), models=record.get("models", {}),
        environment=record.get("environment", {}), warnings=tuple(record.get("warnings", ())),
        mask_examples=load_mask_examples(folder),
    )


def _plain(obj: Any) -> Any:
    """JSON-ready copy: numpy scalars to Python, tuples to lists, NaN kept (json_dumps allows it)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if obj is pd.NA:
        return None
    return obj
