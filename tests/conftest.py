from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import models  # noqa: E402


@pytest.fixture(params=sorted(models.ALL_BUILDERS))
def any_model(request):
    """Every shared small model, one at a time."""
    return request.param, models.ALL_BUILDERS[request.param]()


@pytest.fixture
def conv_model_path(tmp_path):
    import onnx

    path = tmp_path / "conv_net.onnx"
    onnx.save(models.conv_net(), path)
    return path
