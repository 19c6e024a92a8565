"""Every error quantlab raises on purpose.

The library never prints or exits: it raises one of these, with a message that
names the file, tensor, input, node or key at fault and says what to do. Only
``quantlab.cli`` turns them into a message on stderr and a non-zero exit code.

    QuantlabError
     ├── ModelError              not ONNX, truncated, opset, external data outside the folder
     ├── DataError               calibration / validation data
     │    ├── ManifestError      a TOML manifest: unknown key, wrong type, missing file
     │    └── InputMismatchError data does not fit the model's inputs (name, shape, dtype)
     ├── CalibrationError        calibration table: wrong model, missing range, bad cache
     ├── PlanError               precision plan: unknown node, int8 on an op that cannot be
     │                           quantized, malformed file
     ├── BackendError            a backend failed to build or run a model
     │    ├── BackendUnavailableError  not installed (names the extra) or no device (also a ResourceError)
     │    └── UnsupportedOpError       an op the chosen backend cannot run (names node + op)
     ├── CompareError            reference and candidate cannot be compared
     ├── ThresholdError          a threshold expression such as "top1_drop<=0.5" is malformed
     ├── SearchError             sensitivity search cannot proceed
     ├── ExperimentError         an experiment TOML or a report directory is unusable
     ├── OutputError             an output path would replace files quantlab did not write, or is a
     │                           file where a folder is needed (or the reverse)
     └── ResourceError           the machine, not the input, is at fault: an output folder that cannot
                                 be written, a full disk, not enough memory, a missing backend

The command line maps ``ResourceError`` (and any ``OSError`` or ``MemoryError``) to
exit code 3 and every other ``QuantlabError`` to 2 (see ``quantlab.cli.ExitCode``).
"""

from __future__ import annotations

__all__ = [
    "QuantlabError",
    "ModelError",
    "DataError",
    "ManifestError",
    "InputMismatchError",
    "CalibrationError",
    "PlanError",
    "BackendError",
    "BackendUnavailableError",
    "UnsupportedOpError",
    "CompareError",
    "ThresholdError",
    "SearchError",
    "ExperimentError",
    "OutputError",
    "ResourceError",
]


class QuantlabError(Exception):
    """Base class: catch this to handle every error quantlab raises on purpose."""


class ModelError(QuantlabError):
    """An ONNX model cannot be loaded or used as given."""


class DataError(QuantlabError):
    """Calibration or validation data is unusable (empty, unreadable, NaN/Inf...)."""


class ManifestError(DataError):
    """A data-set manifest (TOML) is malformed: unknown key, wrong type, missing file."""


class InputMismatchError(DataError):
    """Data does not fit the model's inputs: name, shape or dtype."""


class CalibrationError(QuantlabError):
    """A calibration table or cache is malformed, for another model, or incomplete."""


class PlanError(QuantlabError):
    """A precision plan does not fit the model it is applied to."""


class BackendError(QuantlabError):
    """A backend failed to build or run a model."""


class ResourceError(QuantlabError):
    """The machine cannot do what was asked: unwritable folder, full disk, no memory, missing backend.

    Retrying elsewhere (another folder, disk or machine, or after installing an extra)
    can succeed with the same input; the command line exits 3 for it, not 2.
    """


class BackendUnavailableError(BackendError, ResourceError):
    """The backend is not installed (install the named extra) or has no device to run on."""


class UnsupportedOpError(BackendError):
    """The model holds an op the chosen backend does not support. ``foreign_ops``: those of another runtime's
    own domain (ONNX Runtime's ``com.microsoft``): the model's export is the cause, not a precision or the backend."""

    def __init__(self, message: str, foreign_ops: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.foreign_ops = foreign_ops


class CompareError(QuantlabError):
    """Reference and candidate cannot be compared (mismatched inputs/outputs, labels...)."""


class ThresholdError(QuantlabError):
    """A threshold expression is malformed or names an unknown metric."""


class SearchError(QuantlabError):
    """The sensitivity search cannot proceed."""


class ExperimentError(QuantlabError):
    """An experiment file or report directory is unusable."""


class OutputError(QuantlabError):
    """An output path cannot be used as given: replacing it would delete files quantlab did not write."""
