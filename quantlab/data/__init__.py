"""Calibration and validation data sets, described by small TOML manifests.

A manifest (``calib_sets/NAME.toml``, format in ``calib_sets/README.md``) names
where samples come from and how they become model input feeds::

    [[source]] files ──list──> items (file, row, view) ──seed──> order ──count──> samples
                                  │
    sample(i): decode ──> augment (images) ──> preprocess ──> [inputs] mapping ──> feeds
    batches(n): sample(i) ... sample(i+n-1) stacked on axis 0, loaded lazily

Nothing is loaded until a sample is asked for, so a data set of any size
streams in bounded memory. Same manifest + seed give the same samples in the
same order, bit for bit. Images are decoded with Pillow; ``.npy``/``.npz`` with
``allow_pickle=False``; Hugging Face ``datasets`` only from local folders.

Layout (arrows: imports; each manifest table's keys live with the code that uses them)::

    manifest.py    top-level keys, [inputs], DataSetManifest, load_manifest ─┐
      ├─ sources.py     [[source]] kinds + keys, SourceSpec, file listing      │ parse
      ├─ preprocess.py  [preprocess] keys, image pipeline, hooks, FeedMaker    │ (quantlab.schema
      │    └─ augment.py  [augment] keys, random resized crop + flip           │  checks every key)
      ├─ padding.py     [pad] keys, PadSpec, per-batch padding + mask          │
      └─ labels.py      [labels] keys, Labeler                                 ┘
    huggingface.py  hf_disk / hf_imagefolder (imports `datasets` lazily)   ─┐
    reader.py       SourceReader: items per source, raw fields of an item   │ load
    batches.py      Sample, Batch, stacking, DataSet base, head(n)          │
    datasets.py     ManifestDataSet, ArrayDataSet, from_arrays, open_dataset┘
    checks.py       check_inputs: data vs a model's inputs, advice by origin; fixed_batch
    summary.py      DataFingerprint, DataSummary, summarize, overlap, beyond_calibration

:class:`DataFingerprint` reduces the batches a run actually consumed to a
:class:`DataSummary` (count, content hash, per-input value ranges, duplicates,
per-sample hashes for calibration/validation overlap checks), refusing NaN/Inf
samples by name. :func:`check_inputs` compares a data set with a model's inputs
before any work starts.
"""

from __future__ import annotations

from .augment import AugmentSpec, random_resized_crop_box
from .batches import Batch, DataSet, Sample, take_samples
from .checks import PILLOW_MAX_PIXELS, check_inputs, coupled_batch_note, fixed_batch, samples_coupled
from .datasets import (
    ArrayDataSet,
    ManifestDataSet,
    from_arrays,
    load_dataset,
    open_dataset,
)
from .labels import LABEL_DTYPES, LabelSpec
from .manifest import ROLES, DataSetManifest, load_manifest
from .padding import PadSpec
from .preprocess import (
    CHANNEL_ORDERS,
    DTYPES,
    INTERPOLATIONS,
    LAYOUTS,
    PreprocessSpec,
    preprocess_image,
)
from .sources import IMAGE_SUFFIXES, SOURCE_KINDS, SourceSpec
from .summary import (
    NOT_CALIBRATED_SIZES,
    DataFingerprint,
    DataSummary,
    InputStats,
    beyond_calibration,
    overlap,
    summarize,
)

__all__ = [
    "take_samples",
    "CHANNEL_ORDERS",
    "DTYPES",
    "IMAGE_SUFFIXES",
    "INTERPOLATIONS",
    "LABEL_DTYPES",
    "LAYOUTS",
    "PILLOW_MAX_PIXELS",
    "ROLES",
    "SOURCE_KINDS",
    "ArrayDataSet",
    "AugmentSpec",
    "Batch",
    "DataFingerprint",
    "DataSet",
    "DataSetManifest",
    "DataSummary",
    "InputStats",
    "LabelSpec",
    "ManifestDataSet",
    "PadSpec",
    "PreprocessSpec",
    "Sample",
    "SourceSpec",
    "check_inputs",
    "fixed_batch",
    "coupled_batch_note",
    "samples_coupled",
    "from_arrays",
    "load_dataset",
    "load_manifest",
    "open_dataset",
    "overlap",
    "beyond_calibration",
    "NOT_CALIBRATED_SIZES",
    "preprocess_image",
    "random_resized_crop_box",
    "summarize",
]
