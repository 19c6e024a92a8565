"""The sample whose mask each candidate changed most, kept to be looked at (a text detector's page, not a number).

For every candidate and probability output that is a map (one plane per sample, ``[N, 1, H, W]`` or ``[N, H, W]``:
:mod:`.probabilities`), the comparison keeps the two masks of the sample with the lowest ``mask_iou`` (the first
such sample on ties): the report draws them one over the other. For a segmentation map (``[N, C, H, W]`` scores:
:func:`.choices.segmentation_maps`) it keeps the two class maps (best class per pixel) of the sample with the
lowest ``miou``. A shard keeps its own worst; the merge takes the worst of the shards' (the earliest shard's on
ties), so sharded and single passes keep the same sample.

On disk (``mask_examples.npz`` beside ``compare.json``; read with ``allow_pickle=False``)::

    meta        JSON text: [{candidate, output, sample, key, iou, classes}, ...]
    reference_0, candidate_0, ...   planes [H, W]: uint8, 1 where the mask marks; int32 class ids where
                                    ``classes`` is true
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import CompareError

__all__ = ["MASK_EXAMPLES_FILE", "MaskExample", "load_mask_examples", "mask_plane", "save_mask_examples",
           "worst_of"]

MASK_EXAMPLES_FILE = "mask_examples.npz"


@dataclass(frozen=True, eq=False)
class MaskExample:
    """One candidate's most changed mask of one output: ``reference`` and ``changed`` are bool ``[H, W]`` masks,
    or int ``[H, W]`` class ids when ``classes`` (a segmentation map; ``iou`` is then the sample's mIoU)."""

    candidate: str
    output: str
    sample: int
    key: str
    iou: float
    reference: np.ndarray
    changed: np.ndarray
    classes: bool = False


def mask_plane(mask: np.ndarray) -> np.ndarray | None:
    """One sample's mask as a plane ``[H, W]`` (leading axes of size 1 dropped), or None when it is no picture
    (tags, one probability, a volume of several channels)."""
    plane = mask.reshape([d for i, d in enumerate(mask.shape) if d != 1 or i >= mask.ndim - 2])
    return plane if plane.ndim == 2 and min(plane.shape) > 1 else None


def worst_of(kept: MaskExample | None, other: MaskExample | None) -> MaskExample | None:
    """The example of lower IoU; ``kept`` (the earlier samples') on ties."""
    if kept is None:
        return other
    if other is None or not other.iou < kept.iou:
        return kept
    return other


def save_mask_examples(examples: Sequence[MaskExample], folder: Path) -> Path | None:
    """Write ``examples`` into ``folder`` (atomically); nothing and None when there are none."""
    if not examples:
        return None
    meta = [{"candidate": e.candidate, "output": e.output, "sample": int(e.sample), "key": e.key,
             "iou": None if math.isnan(e.iou) else float(e.iou), "classes": e.classes} for e in examples]
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta))}
    for i, e in enumerate(examples):
        kind = np.int32 if e.classes else np.uint8
        arrays[f"reference_{i}"] = e.reference.astype(kind)
        arrays[f"candidate_{i}"] = e.changed.astype(kind)
    path = Path(folder) / MASK_EXAMPLES_FILE
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return path


def load_mask_examples(folder: Path) -> tuple[MaskExample, ...]:
    """The examples :func:`save_mask_examples` wrote into ``folder``; () when it wrote none."""
    path = Path(folder) / MASK_EXAMPLES_FILE
    if not path.is_file():
        return ()
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            return tuple(_example(m, data[f"reference_{i}"], data[f"candidate_{i}"]) for i, m in enumerate(meta))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CompareError(f"{path}: unreadable mask examples ({exc}); delete it or compare again") from None


def _example(meta: Mapping[str, object], reference: np.ndarray, changed: np.ndarray) -> MaskExample:
    if reference.shape != changed.shape or reference.ndim != 2:
        raise ValueError(f"planes of shape {reference.shape} and {changed.shape}")
    iou = meta.get("iou")
    classes = meta.get("classes") is True
    if classes and not (np.issubdtype(reference.dtype, np.integer) and np.issubdtype(changed.dtype, np.integer)):
        raise ValueError(f"class maps of type {reference.dtype} and {changed.dtype}")
    kind = np.int32 if classes else bool
    return MaskExample(candidate=str(meta["candidate"]), output=str(meta["output"]), sample=int(meta["sample"]),
                       key=str(meta["key"]), iou=math.nan if iou is None else float(iou),
                       reference=reference.astype(kind), changed=changed.astype(kind), classes=classes)
