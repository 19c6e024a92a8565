"""Experiments: one TOML file takes a model and two data sets to an HTML accuracy report.

    quantlab run experiments/NAME.toml

runs the stages below and writes ``reports/NAME/``::

    model ─► calibrate (one statistics pass, every calibrator) ─► build (FP16, INT8 per calibrator)
          ─► compare (FP32 reference vs candidates) ─► search (if the threshold is missed)
          ─► coverage (does the calibration set cover the validation / [[coverage]] sets?) ─► report

Each stage writes its output folder under ``reports/NAME/stages/`` through
:func:`quantlab.atomic.atomic_dir`, with ``key.json`` holding the hash of its
inputs (model, data, settings, upstream outputs, tool versions). A rerun whose
inputs hash the same reuses the folder; an interrupted run leaves only whole
stage folders, so it restarts cleanly from the first missing one. The
report's ``index.html`` is removed when a run starts and written last:
a failed run never leaves a page that looks finished.

The experiment file (paths are relative to the file itself)::

    name = "demo"                       # report folder name (default: file stem)
    seed = 0
    backend = "ort"                     # ort | tensorrt | tensorrt-rtx
    threshold = "cosine>=0.995"         # end-to-end gate; omit for no verdict
    # metric = "ctc.py:line_accuracy"   # a user metric (as compare --metric): the threshold may name what it
    #                                   # returns; it gets the validation labels when they are not class indices
    # ctc_blank = 0                     # CTC outputs (OCR, speech): blank class; adds text_agreement and cer
    # decision_threshold = 0.3          # Sigmoid outputs (text maps, tags) read as masks p > it (default 0.5)
    # class_maps = ["logits"]            # [N, C, H, W] outputs read as class scores per pixel (SegFormer's 1/4 logits)

    [model]
    zoo = "efficientnet_lite0"          # or: path = "model.onnx"
    # shapes = "image:1x3x48x64,8x3x48x320,32x3x48x1600"   # TensorRT backends: engine shape ranges
    #                                   # (as --shapes); default: the calibration and validation data's
    # bind = { sr = 16000 }             # inputs the data always feeds one value (as --bind): an If they
    #                                   # decide is inlined, so its branch is calibrated and quantized

    [data]
    calibration = "../calib_sets/demo_calib.toml"
    validation = "../calib_sets/demo_val.toml"
    # batch_size = 8                    # samples per model run in every stage; default: each stage's own
    #                                   # (8), or 1 for a model that fixes its batch at 1

    [calibrate]
    methods = ["entropy", "minmax", "percentile"]
    percentile = 99.99
    equalize = false                    # cross-layer equalization before calibrating (quantlab.quantize)
    # smoothquant = 0.5                 # SmoothQuant's alpha for MatMul/Gemm inputs with outlier channels

    [candidates]
    fp16 = true
    int8 = ["entropy", "minmax", "percentile"]    # one INT8 candidate per calibrator
    target = "tensorrt"                            # Q/DQ form: tensorrt | ort
    int8_bodies = false                            # true: calibrated Loop/Scan/If bodies in INT8 too

    [search]
    enabled = true
    calibrator = "best"                 # ranges the search starts from: a method or "best"
    budget = 0                          # max full evaluations; 0 = the search's default bound
    bias_correction = true              # fold INT8's per-channel output mean shift into the biases

    [report]
    worst_tensors = 6                   # histograms drawn for this many tensors
    coverage = true                     # the "Calibration coverage" section (quantlab.coverage)
    coverage_gate = "outside_samples_max>0.2 | zeroed_excess_max>0.2"  # its verdict (default: `quantlab coverage --fail-if`'s)

    [[coverage]]                        # optional, repeatable: more data sets checked against the
    data = "../calib_sets/night.toml"   # calibration set, besides the validation set

    [export]                            # optional: after the report, `quantlab export triton`
    repository = "../models"            # Triton model repository (relative to this file)
    name = "efficientnet"               # default: the experiment's name
    platform = "onnxruntime"            # onnxruntime | tensorrt
    max_batch_size = 8                  # default: 8 with a dynamic batch axis, else 0
    dynamic_batching = true
    instances = 1

Package layout (each module reads only those above it)::

    spec.py           the experiment file: schema (quantlab.schema), validation, ExperimentConfig
    store.py          stage folders reused by key hash; the run manifest
    stages.py         what each stage writes, and how its results are read back
    report_inputs.py  from stage folders to quantlab.report.ReportInputs
    coverage.py       the coverage stage and its report view
    run.py            run_experiment: the stages in order
"""

from __future__ import annotations

from .report_inputs import HISTOGRAM_BINS_SHOWN, disagreeing_tensors, histogram_view, per_layer_for_report
from .run import ExperimentResult, run_experiment
from .spec import CALIBRATORS, TARGETS, ExperimentConfig, load_experiment, parse_experiment
from .stages import SEARCH_CANDIDATE, Candidate, experiment_candidates, load_written, verdict_for
from .store import MANIFEST_FILE, STAGE_KEY_FILE, StageRecord, data_key, run_stage, stage_key_hash

__all__ = [
    "ExperimentConfig",
    "load_experiment",
    "parse_experiment",
    "CALIBRATORS",
    "TARGETS",
    "run_experiment",
    "ExperimentResult",
    "StageRecord",
    "STAGE_KEY_FILE",
    "MANIFEST_FILE",
    "run_stage",
    "stage_key_hash",
    "data_key",
    "Candidate",
    "experiment_candidates",
    "load_written",
    "verdict_for",
    "SEARCH_CANDIDATE",
    "histogram_view",
    "disagreeing_tensors",
    "per_layer_for_report",
    "HISTOGRAM_BINS_SHOWN",
]
