"""Comparator: FP32 ONNX reference vs FP16/INT8 candidates, end to end and per layer.

INTERFACE (agreed in code; the search, experiments, report and CLI use exactly this):

    result = compare(reference, {"int8-entropy": written, "fp16": written16}, dataset,
                     CompareOptions(backend="ort"), progress=True)
    result.end_to_end   # DataFrame, one row per candidate x model output (columns: .result)
    result.per_layer    # DataFrame, long: one row per candidate x layer x mode ("accumulated" | "local")
    result.per_sample   # DataFrame, one row per candidate x sample (x output for multi-output models)
    result.check("top1_drop<=0.5")        # {candidate: ThresholdCheck}
    result.save(out_dir); load_comparison(out_dir)
    load_candidate("build/int8", reference)   # a `quantlab build` folder or an .onnx file

Two per-layer modes: ``accumulated`` (the candidate runs end to end; each layer's written
counterpart is compared with the reference's tensor) and ``local`` (each int8/fp16 group runs
alone, fed the reference's values of its inputs: its own error, not the one it inherits).
Memory stays bounded (running sums, models cut into segments per chunk of layers) and each
batch is a small task graph run by ``CompareOptions.workers`` threads; the same data and seed
give the same tables whatever the timing.
``CompareOptions(shards=N, ray="auto" | "ray://head:10001")`` splits the set into N
contiguous shards of whole batches compared by Ray workers; their per-batch sums and
per-sample records merge into tables byte-identical to one pass (:mod:`.shards` says why).

Package layout (arrows: "imports"; each module's docstring has the details and diagrams)::

    __init__      the public API below
    run           compare(), Comparison: checks, plans, the pass over the data, the tables
     ├─► shards        options.shards / ray: contiguous shards of batches as Ray tasks, merged exactly
     │    └─► cluster       Ray start-up (optional import, session, attempt counter), shared with sweeps
     ├─► options       CompareOptions (every default once)
     ├─► result        CompareResult, column names, save / load_comparison (the folder format)
     ├─► candidates    Candidate, load_candidate (a build folder or .onnx from disk)
     ├─► layers        which reference tensors are compared; chunks of them (memory budget)
     ├─► alignment     per candidate: I/O check, written carriers of the compared tensors
     │    └─► islands       local mode: each group's written nodes, cut out and fed reference values
     │         └─► submodel     cutting ONNX sub-models (typed inputs/outputs), building runners
     ├─► runners       the sessions: reference and candidates as staged models, local models
     │    └─► segments      a model run in consecutive segments, one per chunk
     ├─► schedule      Task, BatchState, Pipeline: the per-batch task graph on worker threads
     ├─► batch_tasks   BatchTasks: one batch's runs, sums and releases per chunk, and what each waits for
     ├─► labels        classifier outputs, whether labels give accuracy, label checks
     ├─► choices       outputs read as choices (best class per position, integer ids) and their agreement
     ├─► probabilities outputs a Sigmoid writes, read as the masks p > decision_threshold (mask_iou)
     ├─► end_to_end    running end-to-end statistics of every candidate output, batch by batch
     │    ├─► end_to_end_tables   those statistics -> the end-to-end and per-sample tables
     │    │    └─► intervals     bootstrap intervals, exact ones where the bootstrap collapses
     │    ├─► output_warnings   what the outputs call for: NaN reference, near-zero samples, rows of mixed
     │    │                     scales, shapes unlike the declared ones
     │    └─► user_metric   --metric file.py:function, loaded and called per sample
     ├─► per_layer     the per-layer table and where NaN/inf first appear
     └─► records       the data / models / environment records and the data warnings

Below the package: :mod:`quantlab.metrics` (the numeric kernels and statistics), ``graph``,
``plan``, ``quantize`` (provenance), ``data``, ``backends``.
"""

from __future__ import annotations

from ..lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "Candidate": "candidates",
    "load_candidate": "candidates",
    "computes_in_float16": "candidates",
    "holds_float16": "candidates",
    "CompareOptions": "options",
    "CLASSIFIER_COLUMNS": "result",
    "COMPARE_FORMAT": "result",
    "END_TO_END_COLUMNS": "result",
    "LABEL_COLUMNS": "result",
    "POSITION_COLUMNS": "result",
    "CTC_COLUMNS": "result",
    "MATCH_COLUMNS": "result",
    "PER_LAYER_COLUMNS": "result",
    "PER_SAMPLE_COLUMNS": "result",
    "CompareResult": "result",
    "load_comparison": "result",
    "compare": "run",
})


__all__ = ["CompareOptions", "CompareResult", "compare", "load_comparison", "load_candidate", "Candidate",
           "computes_in_float16", "holds_float16",
           "COMPARE_FORMAT", "END_TO_END_COLUMNS", "CLASSIFIER_COLUMNS", "LABEL_COLUMNS", "POSITION_COLUMNS",
           "CTC_COLUMNS", "MATCH_COLUMNS", "PER_LAYER_COLUMNS", "PER_SAMPLE_COLUMNS"]
