"""The settings of one comparison (:class:`CompareOptions`); every default is defined here once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..errors import CompareError
from ..schema import is_probability

__all__ = ["DECISION_THRESHOLD", "CompareOptions"]

DECISION_THRESHOLD = 0.5
"""The probability above which a Sigmoid's output marks its mask (:mod:`.probabilities`): a logit above 0."""


@dataclass(frozen=True)
class CompareOptions:
    """Settings of one comparison; every default is defined here once.

    ``accumulated`` / ``local``: the two per-layer modes (both need ``per_layer``);
    ``layers``: "groups" (fusion-group outputs) or "nodes" (every float node output);
    ``labels``: None uses the set's labels when it has them, False ignores them, True
    requires them; ``label_output``: the output the labels index (default: the
    classifier output with the most classes); ``memory_budget_mb``: reference
    activations exposed per batch before the model is cut into another segment;
    ``backend_options``: keyword arguments of ``get_backend`` (e.g. ``{"qdq_fusion":
    False}`` for ONNX Runtime's exact Q/DQ semantics, ``{"threads": 1}``);
    ``workers``: threads running the models and metric kernels concurrently (with 2,
    ONNX Runtime sessions get ``cores / 2`` threads each unless ``backend_options``
    sets ``threads``); ``shards``: contiguous shards of whole batches evaluated by Ray
    workers, merged into exactly the tables of one pass (:mod:`.shards`); ``ray``: where
    they run, "auto" (a local Ray instance) or a cluster address (``ray://host:10001``);
    None with ``shards > 1`` means "auto". ``shards = 1`` with ``ray`` set runs the whole
    set as one Ray task.
    ``ctc_blank``: the blank class of CTC scores; the outputs scored per position ``[N, T, C]`` are
    then also read as greedy CTC text (:mod:`quantlab.metrics.text`): ``text_agreement`` (% of samples
    reading the reference's text) and ``cer`` (the character error rate against it, %).
    ``decision_threshold``: the probability above which an output a Sigmoid writes (a text detector's map,
    multi-label tags, voice activity: :mod:`.probabilities`) marks its mask; those outputs get
    ``element_match``, ``exact_match`` and ``mask_iou`` of the masks.
    ``class_maps``: outputs ``[N, C, H, W]`` to read as class scores per pixel (pixel agreement and ``miou``) where
    their head does not show it (SegFormer's logits at 1/4 of the input's size straight from a 1x1 conv, which a
    keypoint heatmap also is).
    """

    backend: str = "ort"
    batch_size: int = 8
    per_layer: bool = True          # accumulated per-layer errors (candidates with provenance)
    local: bool = True              # also the local mode (each quantized group fed reference inputs)
    layer_group_size: int = 48      # tensors exposed per pass; large models run several passes
    max_samples: int | None = None  # first N samples of the set only (the search's cheap probes)
    metric: str | None = None       # "module:function" user metric
    bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0
    accumulated: bool = True        # the accumulated mode (False: local only, e.g. for sensitivity)
    layers: Literal["groups", "nodes"] = "groups"
    labels: bool | None = None
    label_output: str | None = None
    memory_budget_mb: float = 1024.0
    backend_options: Mapping[str, Any] = field(default_factory=dict)  # get_backend(backend, **these)
    workers: int | None = None      # threads running models and metrics; None: 2 on ONNX Runtime, else 1
    shards: int = 1                 # > 1: Ray tasks over contiguous shards of the set (quantlab[ray])
    ray: str | None = None          # "auto" (local Ray) or a cluster address; None: in process unless shards > 1
    free_running: bool = True       # sequence mode: also run every model over the streams on its own state
    branches: bool = True           # a data-decided If, TopK or ArgMax: also count where a candidate decided otherwise
    ctc_blank: int | None = None    # outputs scored per position [N, T, C] are CTC: also text_agreement and cer
    decision_threshold: float = DECISION_THRESHOLD  # Sigmoid outputs read as masks p > this (DBNet: 0.3)
    class_maps: tuple[str, ...] = ()  # [N, C, H, W] outputs read as class scores per pixel whatever their head

    def __post_init__(self) -> None:
        def bad(what: str) -> CompareError:
            return CompareError(f"CompareOptions: {what}")

        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise bad(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.layer_group_size, int) or self.layer_group_size < 1:
            raise bad(f"layer_group_size must be an integer >= 1, got {self.layer_group_size!r}")
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 1):
            raise bad(f"max_samples must be None or an integer >= 1, got {self.max_samples!r}")
        if not isinstance(self.bootstrap, int) or self.bootstrap < 0:
            raise bad(f"bootstrap must be an integer >= 0 (0: no intervals), got {self.bootstrap!r}")
        if not 0.0 < float(self.confidence) < 1.0:
            raise bad(f"confidence must be in (0, 1), e.g. 0.95; got {self.confidence!r}")
        if self.layers not in ("groups", "nodes"):
            raise bad(f"layers must be 'groups' or 'nodes', got {self.layers!r}")
        if not self.memory_budget_mb > 0:
            raise bad(f"memory_budget_mb must be > 0, got {self.memory_budget_mb!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise bad(f"workers must be None or an integer >= 1, got {self.workers!r}")
        if not isinstance(self.shards, int) or isinstance(self.shards, bool) or self.shards < 1:
            raise bad(f"shards must be an integer >= 1, got {self.shards!r}")
        if self.ray is not None and (not isinstance(self.ray, str) or not self.ray.strip()):
            raise bad(f"ray must be None, 'auto' or a cluster address such as 'ray://head:10001', got {self.ray!r}")
        if self.ctc_blank is not None and (not isinstance(self.ctc_blank, int) or isinstance(self.ctc_blank, bool)
                                           or self.ctc_blank < 0):
            raise bad(f"ctc_blank must be None or a class index >= 0 (the blank of CTC scores), got {self.ctc_blank!r}")
        if not is_probability(self.decision_threshold):
            raise bad(f"decision_threshold must be a probability in (0, 1), e.g. 0.5 (DBNet's maps: 0.3), got "
                      f"{self.decision_threshold!r}")
        if not isinstance(self.class_maps, tuple) or not all(isinstance(o, str) and o for o in self.class_maps):
            raise bad(f"class_maps must be a tuple of output names, got {self.class_maps!r}")
        if self.metric is not None and ":" not in self.metric:
            raise bad(f"metric must be 'module:function' (or 'path/to/file.py:function'), got {self.metric!r}")

    @property
    def on_ray(self) -> bool:
        """The comparison runs as Ray tasks (``shards > 1`` or ``ray`` given)."""
        return self.shards > 1 or self.ray is not None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
