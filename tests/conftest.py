from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import models  # noqa: E402


def _cache_bytecode_of_child_processes() -> None:
    """Where the environment sets PYTHONDONTWRITEBYTECODE (this VM's does), every process the tests start
    (CLI runs, spawned sweep workers, ray workers, the notebook's kernel) compiled quantlab's ~230 modules from
    source again (~0.6 s a start; the import-order test compiles them ~230 times: 26 s of its 27). Children
    write and read ``__pycache__`` beside the sources (git-ignored) as Python does by default; installed
    packages have theirs from pip."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False  # this process too: it imports quantlab before most children start


_cache_bytecode_of_child_processes()

NUMERIC_MODULES = frozenset({
    "test_backends_ort", "test_calibrate", "test_compare", "test_quantize", "test_search", "test_stats", "test_zoo",
    "test_coverage", "test_compare_deployed", "test_backends_coupling", "test_graph_einsum",
})
"""Modules whose tests compare numbers that come out of ONNX Runtime runs: all marked ``numeric``.

``make test`` runs them a second time with ``QUANTLAB_ORT_QDQ_FUSION=off QUANTLAB_ORT_THREADS=1``
(other integer kernels, another float32 reduction order), so a tolerance that holds for one
CPU's kernels only fails here rather than on a user's machine.
"""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "numeric: compares numbers from ONNX Runtime runs; `make test` runs these again with the other "
        "Q/DQ fusion mode and one ORT thread (bounds must hold for any CPU's kernels)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the numeric modules' tests, and move the ``slow`` ones to the front (stable otherwise): `make test`
    runs two xdist workers, and a minute-long real-model run handed out last would leave one worker idle while
    the other finishes it."""
    for item in items:
        if item.module is not None and item.module.__name__ in NUMERIC_MODULES:
            item.add_marker(pytest.mark.numeric)
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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
