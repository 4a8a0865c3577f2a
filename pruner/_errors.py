"""Errors raised by onnx-pruner.

Every error the library raises on purpose derives from :class:`PrunerError`::

    PrunerError
    ├── InvalidInputError          the caller gave us something we cannot use
    │   ├── InvalidModelError      not ONNX, truncated, fails the checker, bad external data
    │   ├── InvalidEvalSetError    eval set does not match the model, NaN, pickled data
    │   ├── InvalidConfigError     an option is out of range or inconsistent
    │   └── PlanMismatchError      a pruning plan does not apply to the model given
    ├── UnsupportedModelError      a valid model that onnxruntime or the pruner cannot run
    ├── ResourceLimitError         input over a configured size limit
    ├── CancelledError             the caller asked the run to stop
    └── InternalError              a bug of ours: a model we built fails our own checks

Messages say what is wrong and what to fix; they never carry a traceback.
"""

from __future__ import annotations

import threading

__all__ = [
    "CancelledError",
    "InternalError",
    "InvalidConfigError",
    "InvalidEvalSetError",
    "InvalidInputError",
    "InvalidModelError",
    "PlanMismatchError",
    "PrunerError",
    "ResourceLimitError",
    "UnsupportedModelError",
]


class PrunerError(Exception):
    """Base class of every error onnx-pruner raises on purpose."""


class InvalidInputError(PrunerError):
    """The caller's input (model, eval set or options) cannot be used."""


class InvalidModelError(InvalidInputError):
    """The model is not a valid, self-contained ONNX model."""


class InvalidEvalSetError(InvalidInputError):
    """The eval set cannot be read or does not match the model."""


class InvalidConfigError(InvalidInputError):
    """An option is out of range or inconsistent with the others."""


class PlanMismatchError(InvalidInputError):
    """A pruning plan does not apply to the model given: not the model it was made from (exact
    replay), its layers do not fit the model (transfer), or it lacks what the operation needs."""


class UnsupportedModelError(PrunerError):
    """A valid model that onnxruntime (or the pruner) cannot run."""


class ResourceLimitError(PrunerError):
    """An input exceeds a configured size limit (or the memory the machine has free)."""

    def __init__(self, message: str, subject: str = "") -> None:
        super().__init__(message)
        self.subject = subject
        """The limit that was hit, named as the service configures it (e.g. ``"max_eval_bytes"``); empty if unnamed."""


class CancelledError(PrunerError):
    """The run was stopped through its stop event."""


def check_stop(stop: threading.Event | None) -> None:
    """Raise :class:`CancelledError` if ``stop`` is set: every long loop calls it once a step."""
    if stop is not None and stop.is_set():
        raise CancelledError("the run was cancelled")


class InternalError(PrunerError):
    """A bug in onnx-pruner, not a problem of the caller's input: a model it built fails its own checks."""
