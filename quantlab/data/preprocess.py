"""``[preprocess]``: how a decoded image (or an array field) becomes one input array of a sample.

    image ──> augment (a view) ──> preprocess_image: RGB/L ─ resize ─ center crop ─ (x-mean)/std ─ layout ─ dtype
          └─> or a user hook "module:function" (replaces the built-in pipeline)
    array ──> dtype cast (integer targets: rounded and clipped)

The keys, their parsing into :class:`PreprocessSpec` and the pipeline sit
together, so a new preprocessing option changes this module only.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DataError, ManifestError
from ..hooks import load_hook
from ..schema import Key, Where, check_table, is_int, is_num, is_str, one_of
from .augment import AugmentSpec, augment_image, view_rng

__all__ = ["CHANNEL_ORDERS", "DTYPES", "INTERPOLATIONS", "LAYOUTS", "PREPROCESS_KEYS", "FeedMaker", "PreprocessSpec",
           "cast", "decode_image", "parse_preprocess", "preprocess_image", "resolve_hook"]

LAYOUTS = ("NCHW", "NHWC")
CHANNEL_ORDERS = ("RGB", "BGR", "L")
DTYPES = ("float32", "float16", "float64", "uint8", "int8", "int32", "int64")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box")
IMAGE_PREPROCESS_KEYS = ("resize", "center_crop", "mean", "std", "layout", "channel_order", "interpolation", "hook")
"""The keys of the image pipeline ('dtype' applies to arrays too)."""


def _int_or_pair(v: Any) -> bool:
    if is_int(v):
        return v >= 1
    return isinstance(v, list) and len(v) == 2 and all(is_int(x) and x >= 1 for x in v)


def _num_or_list(v: Any) -> bool:
    if is_num(v):
        return True
    return isinstance(v, list) and len(v) in (1, 3) and all(is_num(x) for x in v)


def _dtype_value(v: Any) -> bool:
    if isinstance(v, str):
        return v in DTYPES
    return isinstance(v, dict) and len(v) > 0 and all(isinstance(x, str) and x in DTYPES for x in v.values())


PREPROCESS_KEYS: dict[str, Key] = {
    "resize": Key("an integer (shorter side, pixels) or [height, width]", _int_or_pair, "resize = 256"),
    "center_crop": Key("an integer or [height, width]", _int_or_pair, "center_crop = 224"),
    "mean": Key("a number or a list of 1 or 3 numbers (0..255 pixel units)", _num_or_list,
                "mean = [127.0, 127.0, 127.0]"),
    "std": Key("a non-zero number or a list of 1 or 3 of them (0..255 pixel units)",
               lambda v: _num_or_list(v) and all(x != 0 for x in (v if isinstance(v, list) else [v])),
               "std = [128.0, 128.0, 128.0]"),
    "layout": Key(f"one of {', '.join(map(repr, LAYOUTS))}", one_of(LAYOUTS), 'layout = "NCHW"'),
    "dtype": Key(f"one of {', '.join(map(repr, DTYPES))}, or a table input = dtype", _dtype_value,
                 'dtype = "float32"'),
    "channel_order": Key(f"one of {', '.join(map(repr, CHANNEL_ORDERS))}", one_of(CHANNEL_ORDERS),
                         'channel_order = "RGB"'),
    "interpolation": Key(f"one of {', '.join(map(repr, INTERPOLATIONS))}", one_of(INTERPOLATIONS),
                         'interpolation = "bilinear"'),
    "hook": Key('"module:function"', lambda v: is_str(v) and re.fullmatch(r"[\w.]+:\w+", v) is not None,
                'hook = "my_preprocessing:prepare"'),
}


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes an array (see :func:`preprocess_image`), and dtype casts for array fields.

    ``resize``: shorter side in pixels (int) or exact (height, width).
    ``center_crop``: (height, width). ``mean``/``std``: per output channel, in
    0..255 pixel units, listed in ``channel_order``. ``dtype``: one dtype for
    every input, or per input name.
    """

    resize: int | tuple[int, int] | None = None
    center_crop: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    dtype: str | tuple[tuple[str, str], ...] | None = None
    channel_order: str = "RGB"
    interpolation: str = "bilinear"
    hook: str | None = None

    @property
    def channels(self) -> int:
        return 1 if self.channel_order == "L" else 3

    def dtype_for(self, input_name: str | None) -> str | None:
        """The dtype an input is cast to (None: keep the source's dtype; images default to float32)."""
        if isinstance(self.dtype, tuple):
            return dict(self.dtype).get(input_name or "")
        return self.dtype


def _channel_stats(table: dict[str, Any], where: Where, channel_order: str) -> dict[str, tuple[float, ...]]:
    """mean and std as tuples of 1 or ``channels`` floats."""
    channels = 1 if channel_order == "L" else 3
    stats: dict[str, tuple[float, ...]] = {}
    for key, default in (("mean", 0.0), ("std", 1.0)):
        value = table.get(key, default)
        values = tuple(float(x) for x in (value if isinstance(value, list) else [value]))
        if len(values) not in (1, channels):
            raise ManifestError(f"{where.at('preprocess', None, key)}: has {len(values)} values but "
                                f"channel_order = {channel_order!r} gives {channels} channel(s); give 1 or "
                                f"{channels} values.")
        stats[key] = values
    return stats


def parse_preprocess(table: dict[str, Any], where: Where, folder: Path, kinds: AbstractSet[str]) -> PreprocessSpec:
    """The manifest's ``[preprocess]``; ``kinds``: the source kinds in use (image keys need an image source)."""
    check_table(table, PREPROCESS_KEYS, where, "preprocess", error=ManifestError, guide="calib_sets/README.md")
    image_keys = [k for k in table if k in IMAGE_PREPROCESS_KEYS]
    if image_keys and kinds <= {"npy", "npz"}:
        raise ManifestError(f"{where.at('preprocess', None, image_keys[0])}: applies to images, and every "
                            "source holds arrays (npy/npz). Remove it; only 'dtype' applies to arrays.")
    if "hook" in table:
        clash = [k for k in table if k in IMAGE_PREPROCESS_KEYS and k != "hook"]
        if clash:
            raise ManifestError(f"{where.at('preprocess', None, clash[0])}: the hook replaces the built-in image "
                                f"pipeline; remove {', '.join(clash)} (or the hook).")
        resolve_hook(table["hook"], folder, where.at("preprocess", None, "hook"))
    channel_order = table.get("channel_order", "RGB")
    stats = _channel_stats(table, where, channel_order)
    resize = table.get("resize")
    crop = table.get("center_crop")
    dtype = table.get("dtype")
    return PreprocessSpec(
        resize=tuple(resize) if isinstance(resize, list) else resize,
        center_crop=(tuple(crop) if isinstance(crop, list) else (crop, crop)) if crop is not None else None,
        mean=stats["mean"],
        std=stats["std"],
        layout=table.get("layout", "NCHW"),
        dtype=tuple(sorted(dtype.items())) if isinstance(dtype, dict) else dtype,
        channel_order=channel_order,
        interpolation=table.get("interpolation", "bilinear"),
        hook=table.get("hook"),
    )


def resolve_hook(spec: str, folder: Path, where: str) -> Callable[[Any], Any]:
    """Import ``module:function``: ``module.py`` beside the manifest, or an importable module."""
    module_name = spec.rpartition(":")[0]
    return load_hook(spec, folder, ManifestError, where,
                     f"Put {module_name}.py next to the manifest or make it importable.")


def decode_image(path: Path) -> Image.Image:
    """Open and fully decode an image with Pillow (DataError naming the file when it cannot)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy() if im.mode != "P" else im.convert("RGBA")
    except PermissionError:
        raise
    except Exception as exc:  # noqa: BLE001 - UnidentifiedImageError, truncated data, decompression bombs...
        raise DataError(f"{path}: unreadable image ({type(exc).__name__}: {exc}). Replace or remove the file "
                        "(or narrow the source's pattern).") from None


def _resized_size(width: int, height: int, resize: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) after resizing: the shorter side to ``resize`` (torchvision's rule), or exact (h, w)."""
    if isinstance(resize, tuple):
        return resize[1], resize[0]
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def _resized_and_cropped(image: Image.Image, spec: PreprocessSpec, name: str) -> Image.Image:
    if spec.resize is not None:
        size = _resized_size(image.width, image.height, spec.resize)
        if size != image.size:
            resample = getattr(Image.Resampling, spec.interpolation.upper())
            image = image.resize(size, resample)
    if spec.center_crop is not None:
        ch, cw = spec.center_crop
        if ch > image.height or cw > image.width:
            raise DataError(f"{name}: is {image.height}x{image.width} (h x w) after resize, smaller than "
                            f"center_crop {ch}x{cw}; raise [preprocess] resize to at least {max(ch, cw)}.")
        top = round((image.height - ch) / 2.0)
        left = round((image.width - cw) / 2.0)
        image = image.crop((left, top, left + cw, top + ch))
    return image


def preprocess_image(image: Any, spec: PreprocessSpec, *, name: str = "image", dtype: str | None = None) -> np.ndarray:
    """A Pillow image -> one sample array, the classic ImageNet way.

    1. convert to RGB (or L for ``channel_order = "L"``; alpha is dropped),
    2. resize: shorter side to ``resize`` keeping the aspect ratio, the longer
       side ``int(resize * long / short)`` as torchvision does (or exactly
       (h, w)), with Pillow's ``interpolation`` (antialiased when shrinking),
    3. center crop (h, w): top = round((H - h) / 2), left = round((W - w) / 2),
    4. float32 pixels 0..255, channels reversed for BGR,
    5. (x - mean) / std per channel (mean/std in pixel units, in output channel order),
    6. HWC -> CHW for NCHW, then cast to ``dtype`` (integer dtypes: rounded, clipped).
    """
    mode = "L" if spec.channel_order == "L" else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    image = _resized_and_cropped(image, spec, name)
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if spec.channel_order == "BGR":
        arr = arr[:, :, ::-1]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    if not (np.all(mean == 0) and np.all(std == 1)):
        arr = (arr - mean) / std
    if spec.layout == "NCHW":
        arr = arr.transpose(2, 0, 1)
    return cast(np.ascontiguousarray(arr), dtype or spec.dtype_for(None) or "float32")


def cast(arr: np.ndarray, dtype: str | None) -> np.ndarray:
    """``arr`` as ``dtype`` (None: unchanged); float -> integer rounds to nearest and clips to the range."""
    if dtype is None or arr.dtype == np.dtype(dtype):
        return arr
    target = np.dtype(dtype)
    if np.issubdtype(target, np.integer) and not np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(target)
        arr = np.clip(np.rint(arr), info.min, info.max)
    return arr.astype(target)


class FeedMaker:
    """One field value of a sample -> the array fed to one input (augment, image pipeline or hook, dtype)."""

    def __init__(self, spec: PreprocessSpec, augment: AugmentSpec | None, seed: int,
                 hook: Callable[[Any], Any] | None) -> None:
        self.spec, self.augment, self.seed, self.hook = spec, augment, seed, hook

    def array(self, value: Any, key: str, view: int | None, input_name: str) -> np.ndarray:
        dtype = self.spec.dtype_for(input_name)
        if hasattr(value, "getbands"):  # a Pillow image (images source, or an HF Image column)
            image = value
            aug = self.augment
            if aug is not None and view is not None and not (aug.include_original and view == 0):
                image = augment_image(image, aug, view_rng(self.seed, key, view))
            if self.hook is not None:
                return self._hooked(image, key, dtype)
            return preprocess_image(image, self.spec, name=f"sample {key!r}", dtype=dtype)
        try:
            arr = np.asarray(value)
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"sample {key!r}: input {input_name!r} is not an array ({exc}).") from None
        if arr.dtype.kind not in "biuf":
            raise DataError(f"sample {key!r}: input {input_name!r} holds {arr.dtype} values, not numbers; "
                            "map a numeric field in [inputs].")
        return np.ascontiguousarray(cast(arr, dtype))

    def _hooked(self, image: Any, key: str, dtype: str | None) -> np.ndarray:
        hook = self.spec.hook
        try:
            out = self.hook(image)  # type: ignore[misc]
        except Exception as exc:
            raise DataError(f"sample {key!r}: [preprocess] hook {hook} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(out, np.ndarray) or out.dtype.kind not in "biuf":
            raise DataError(f"sample {key!r}: [preprocess] hook {hook} returned {type(out).__name__}"
                            f"{'' if not isinstance(out, np.ndarray) else ' of ' + str(out.dtype)}; it must "
                            "return a numeric numpy array (one sample, no batch axis).")
        return np.ascontiguousarray(cast(out, dtype))
