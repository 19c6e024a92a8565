"""Release handoff: a chosen plan as something a server loads.

    export/
    ├── source.py   a build folder or a report folder -> the model to release (ExportSource)
    ├── pbtxt.py    protobuf text format writer (strings escaped)
    ├── config.py   Triton ModelConfig: I/O, batching, instances, TensorRT settings, warm-up
    └── triton.py   export_triton: the model repository entry, versioned, written atomically
"""

from __future__ import annotations

from .config import PLATFORMS, TritonOptions
from .source import ExportSource, resolve_source
from .triton import ExportResult, export_triton

__all__ = ["ExportSource", "resolve_source", "TritonOptions", "PLATFORMS", "ExportResult", "export_triton"]
