"""``[augment]``: extra views of each image (random resized crop + horizontal flip), seeded per view.

    image ──(seed, sample key, view)──> rng ──> crop box ──> crop ──> maybe flip ──> preprocess

The schema keys, their parsing into :class:`AugmentSpec` and the image
operations sit together: a new augmentation touches this module only.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ManifestError
from ..schema import Key, Where, check_table, is_int, is_num

__all__ = ["AUGMENT_KEYS", "AugmentSpec", "augment_image", "parse_augment", "random_resized_crop_box", "view_rng"]

AUGMENT_KEYS: dict[str, Key] = {
    "views": Key("an integer >= 1", lambda v: is_int(v) and v >= 1, "views = 8"),
    "min_scale": Key("a number in (0, 1]", lambda v: is_num(v) and 0 < v <= 1, "min_scale = 0.35"),
    "max_scale": Key("a number in (0, 1]", lambda v: is_num(v) and 0 < v <= 1, "max_scale = 1.0"),
    "ratio": Key("[low, high] aspect ratios, 0 < low <= high",
                 lambda v: isinstance(v, list) and len(v) == 2 and all(is_num(x) and x > 0 for x in v)
                 and v[0] <= v[1], "ratio = [0.75, 1.3333]"),
    "hflip": Key("a probability in [0, 1]", lambda v: is_num(v) and 0 <= v <= 1, "hflip = 0.5"),
    "include_original": Key("true or false", lambda v: isinstance(v, bool), "include_original = true"),
}


@dataclass(frozen=True)
class AugmentSpec:
    """Extra views of each image: random resized crop (torchvision's algorithm) + horizontal flip.

    ``views`` counts every sample made from one image, the unaugmented one
    included when ``include_original``. Crops draw a fraction of the image area
    in [min_scale, max_scale] and an aspect ratio log-uniform in ``ratio``; the
    crop then goes through the normal preprocessing (resize, center crop).
    Randomness comes from (seed, sample key, view), so a view does not change
    when other files are added.
    """

    views: int = 1
    min_scale: float = 0.35
    max_scale: float = 1.0
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    include_original: bool = True


def parse_augment(table: dict[str, Any] | None, where: Where, kinds: AbstractSet[str]) -> AugmentSpec | None:
    """The manifest's ``[augment]`` (None without one); ``kinds``: the source kinds in use."""
    if table is None:
        return None
    check_table(table, AUGMENT_KEYS, where, "augment", error=ManifestError, guide="calib_sets/README.md")
    if kinds <= {"npy", "npz"}:
        raise ManifestError(f"{where.at('augment')}: augmentation applies to images, and every source holds "
                            "arrays (npy/npz). Remove [augment].")
    spec = AugmentSpec(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in table.items()})
    if spec.min_scale > spec.max_scale:
        raise ManifestError(f"{where.at('augment', None, 'min_scale')}: {spec.min_scale} is above max_scale "
                            f"{spec.max_scale}; make min_scale <= max_scale.")
    return spec


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float],
                            ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop: torchvision's RandomResizedCrop.get_params.

    Area fraction uniform in ``scale``, aspect ratio (w/h) log-uniform in
    ``ratio``; 10 tries, then a center crop at the clamped ratio.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def view_rng(seed: int, key: str, view: int) -> np.random.Generator:
    """The generator of one augmented view: from (seed, CRC-32 of the sample key, view)."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(key.encode("utf-8")), view]))


def augment_image(image: Image.Image, spec: AugmentSpec, rng: np.random.Generator) -> Image.Image:
    """One random resized crop of ``image``, flipped left-right with probability ``spec.hflip``."""
    box = random_resized_crop_box(image.width, image.height, rng, (spec.min_scale, spec.max_scale), spec.ratio)
    out = image.crop(box)
    if rng.uniform() < spec.hflip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out
