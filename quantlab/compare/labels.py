"""Which outputs are classifiers and whether the validation labels give accuracy figures."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..data import Batch, DataSet
from ..errors import CompareError
from ..graph import LoadedModel
from ..graph.samples import data_sized
from .choices import score_outputs
from .options import CompareOptions

__all__ = ["LabelUse", "classifier_outputs", "label_use"]


@dataclass(frozen=True)
class LabelUse:
    """``classifiers``: output -> classes (:func:`classifier_outputs`); ``use_labels``: the set's
    labels are read (accuracy or a user metric); ``accuracy``: top-1/top-5 against them on
    ``label_output``."""

    classifiers: Mapping[str, int]
    label_output: str | None
    use_labels: bool
    accuracy: bool

    def check(self, batch: Batch) -> None:
        """Refuses a label outside the classes of ``label_output``, naming the sample."""
        if not self.accuracy or self.label_output is None:
            return
        c = self.classifiers[self.label_output]
        labels = np.asarray(batch.labels)
        bad = np.flatnonzero((labels < 0) | (labels >= c))
        if bad.size:
            i = int(bad[0])
            raise CompareError(
                f"sample {batch.indices[i]} ({batch.keys[i]!r}) has label {labels[i].item()}, which does not fit "
                f"output {self.label_output!r} with {c} classes (valid 0..{c - 1}). Fix the manifest's [labels] "
                "(regex/column) or choose the output with label_output / --label-output."
            )


def classifier_outputs(reference: LoadedModel) -> dict[str, int]:
    """Output -> classes, for the outputs that score classes: ``[N, C]`` (or ``[N, C, 1, 1]``, a 1x1-conv head as
    SqueezeNet and DenseNet exports end, or ``[C]`` without batch axis) float with C > 1 fixed, computed as
    scores (:func:`.choices.score_outputs`: a linear layer, then only softmax/bias/layout ops). Not an output
    whose size the data decides: NMS's kept boxes ``[K, 4]`` are not 4 classes over K samples; nor a BERT
    pooler's Tanh (768 "classes"), a normalised embedding or a TopK's sorted scores. With both a pooler and
    logits, the labels went to the pooler (the output with the most classes)."""
    sized = data_sized(reference)
    scored = score_outputs(reference)
    found = {spec.name: _classes(spec.shape) for spec in reference.outputs
             if spec.shape is not None and spec.name in scored and spec.name not in sized}
    return {name: classes for name, classes in found.items() if classes is not None}


def _classes(shape: tuple) -> int | None:
    """C of a class-score shape: ``[N, C]``, ``[N, C, 1, 1]`` (a 1x1-conv head) or ``[C]`` (a model without batch
    axis, run one sample at a time); None for any other shape."""
    classes = shape[1] if len(shape) >= 2 and all(d == 1 for d in shape[2:]) else shape[0] if len(shape) == 1 else None
    return classes if isinstance(classes, int) and classes > 1 else None


def label_use(reference: LoadedModel, dataset: DataSet, options: CompareOptions,
              has_metric: bool) -> tuple[LabelUse, list[str]]:
    """How the comparison uses the set's labels, and a warning when they cannot give accuracy."""
    ds, opts = dataset, options
    has = bool(getattr(ds, "has_labels", False))
    if opts.labels is True and not has:
        raise CompareError(f"labels were asked for but the validation set {getattr(ds, 'name', '')!r} has none; "
                           "add a [labels] table to its manifest (see calib_sets/README.md)")
    use_labels = has and opts.labels is not False
    classifiers = classifier_outputs(reference)
    label_output: str | None = None
    integer = str(getattr(ds, "label_dtype", "") or "").startswith(("int", "uint"))
    if opts.label_output is not None:
        if opts.label_output not in classifiers:
            raise CompareError(f"label_output {opts.label_output!r} is not a classifier output ([N, C] scores from a linear layer) of "
                               f"the reference; classifier outputs: {sorted(classifiers) or 'none'}")
        label_output = opts.label_output
    elif classifiers:
        order = list(classifiers)
        label_output = max(order, key=lambda k: (classifiers[k], -order.index(k)))
    warnings: list[str] = []
    if use_labels and (not integer or label_output is None):
        why = ("the labels are not class indices (dtype " + str(getattr(ds, "label_dtype", None)) + ")"
               if not integer else "the reference has no classifier output ([N, C] scores from a linear layer)")
        if not has_metric:
            warnings.append(f"validation labels are not used for accuracy: {why}; only a user metric "
                            "receives them (quantlab compare --metric, or metric = \"file.py:function\" in an "
                            "experiment file)")
        accuracy = False
    else:
        accuracy = use_labels
    return LabelUse(classifiers, label_output, use_labels, accuracy), warnings
