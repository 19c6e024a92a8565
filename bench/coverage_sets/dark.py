"""Preprocessing hook of the biased calibration set: EfficientNet-Lite0's pipeline on a darkened photo.

Brightness x0.3 (Pillow's ImageEnhance), then exactly the demo's built-in pipeline (resize 256,
center crop 224, RGB, (x - 127) / 128, NCHW float32): night shots of daylight photos.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import ImageEnhance

from quantlab.data import PreprocessSpec, preprocess_image

BRIGHTNESS = 0.3
SPEC = PreprocessSpec(resize=256, center_crop=(224, 224), mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0),
                      layout="NCHW", dtype="float32", channel_order="RGB")


def dark(image: Any) -> np.ndarray:
    """One darkened, preprocessed sample (no batch axis)."""
    return preprocess_image(ImageEnhance.Brightness(image.convert("RGB")).enhance(BRIGHTNESS), SPEC)
