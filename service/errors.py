"""The one table from errors to what a caller sees: a gRPC status and a CLI exit code.

The library's error tree (``pruner.PrunerError``) plus the few errors only a
service has. An error is looked up by its class, the most specific entry
winning (its method resolution order is walked)::

    error                          gRPC status          details          CLI exit
    InvalidInputError (+ subtree)  INVALID_ARGUMENT     BadRequest       2  bad input
    UnsupportedModelError          INVALID_ARGUMENT     BadRequest       2  bad input
    AuthenticationError            UNAUTHENTICATED                       2  bad input
    ResourceLimitError             RESOURCE_EXHAUSTED   QuotaFailure     2  too large: never retry
    ServerBusyError                RESOURCE_EXHAUSTED   RetryInfo        5  busy: retry later
    ServerUnavailableError         UNAVAILABLE          RetryInfo        4  unreachable or shutting down
    TimeLimitError                 DEADLINE_EXCEEDED                     6  over the time limit
    JobNotFoundError               NOT_FOUND                             2  no job has this id
    JobStateError                  FAILED_PRECONDITION                   2  e.g. downloading an unfinished job
    JobMemoryLimitError            RESOURCE_EXHAUSTED   QuotaFailure     2  a job over its memory limit
    JobCrashedError                INTERNAL                              1  a job's process died
    CancelledError                 CANCELLED                             130 interrupted
    InternalError, PrunerError     INTERNAL                              1  internal error
    anything else                  INTERNAL                              1  internal error

The server turns an error into a status with :func:`to_status` (rich details
from ``google.rpc.error_details``, so clients in any language can tell "busy,
retry" from "too large, never retry"); the client turns a status back into an
error of the same class with :func:`from_rpc_error`; the CLI exits with
:func:`exit_code` of whatever it caught. Exit 0 (done) and 3 (nothing pruned,
with ``--fail-unchanged``) are results, not errors.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

import pruner

__all__ = [
    "TABLE",
    "AuthenticationError",
    "Exit",
    "JobCrashedError",
    "JobMemoryLimitError",
    "JobNotFoundError",
    "JobStateError",
    "Row",
    "ServerBusyError",
    "ServerUnavailableError",
    "TimeLimitError",
    "error_named",
    "exit_code",
    "from_rpc_error",
    "row_of",
    "to_status",
]


class Exit(enum.IntEnum):
    """Exit codes of ``onnx-prune``."""

    OK = 0
    INTERNAL = 1
    BAD_INPUT = 2
    UNCHANGED = 3
    UNAVAILABLE = 4
    BUSY = 5
    TIME_LIMIT = 6
    INTERRUPTED = 130


class AuthenticationError(pruner.InvalidInputError):
    """The server wants a bearer token that was not sent, or another one."""


class ServerBusyError(pruner.PrunerError):
    """The server runs its maximum of jobs (or uploads); the same call may pass later."""

    def __init__(self, message: str, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServerUnavailableError(pruner.PrunerError):
    """The server cannot be reached, or is shutting down; another replica or a later try may serve."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TimeLimitError(pruner.PrunerError):
    """The job, or its upload, ran past a time limit (the server's, or the client's deadline)."""


class JobNotFoundError(pruner.InvalidInputError):
    """No job has this id: it never existed, or retention removed it."""


class JobStateError(pruner.InvalidInputError):
    """The job is not in a state that allows the call (its result asked for before it succeeded)."""


class JobMemoryLimitError(pruner.ResourceLimitError):
    """A job's process went over the server's per-job memory limit (``job_memory_limit``)."""

    def __init__(self, message: str, subject: str = "job_memory_limit") -> None:
        super().__init__(message, subject)


class JobCrashedError(pruner.PrunerError):
    """A job's process died (killed by a signal, or its replica died too often); no result."""


@dataclass(frozen=True)
class Row:
    """What callers see of one error class."""

    code: grpc.StatusCode
    exit: Exit


TABLE: dict[type[BaseException], Row] = {
    pruner.InvalidInputError: Row(grpc.StatusCode.INVALID_ARGUMENT, Exit.BAD_INPUT),
    pruner.InvalidModelError: Row(grpc.StatusCode.INVALID_ARGUMENT, Exit.BAD_INPUT),
    pruner.InvalidEvalSetError: Row(grpc.StatusCode.INVALID_ARGUMENT, Exit.BAD_INPUT),
    pruner.InvalidConfigError: Row(grpc.StatusCode.INVALID_ARGUMENT, Exit.BAD_INPUT),
    pruner.PlanMismatchError: Row(grpc.StatusCode.INVALID_ARGUMENT, Exit.BAD_INPUT),
    pruner.UnsupportedModelError: Row(grpc.StatusCode.INVALID_ARGUMENT, Exit.BAD_INPUT),
    AuthenticationError: Row(grpc.StatusCode.UNAUTHENTICATED, Exit.BAD_INPUT),
    pruner.ResourceLimitError: Row(grpc.StatusCode.RESOURCE_EXHAUSTED, Exit.BAD_INPUT),
    ServerBusyError: Row(grpc.StatusCode.RESOURCE_EXHAUSTED, Exit.BUSY),
    ServerUnavailableError: Row(grpc.StatusCode.UNAVAILABLE, Exit.UNAVAILABLE),
    TimeLimitError: Row(grpc.StatusCode.DEADLINE_EXCEEDED, Exit.TIME_LIMIT),
    JobNotFoundError: Row(grpc.StatusCode.NOT_FOUND, Exit.BAD_INPUT),
    JobStateError: Row(grpc.StatusCode.FAILED_PRECONDITION, Exit.BAD_INPUT),
    JobMemoryLimitError: Row(grpc.StatusCode.RESOURCE_EXHAUSTED, Exit.BAD_INPUT),
    JobCrashedError: Row(grpc.StatusCode.INTERNAL, Exit.INTERNAL),
    pruner.CancelledError: Row(grpc.StatusCode.CANCELLED, Exit.INTERRUPTED),
    pruner.InternalError: Row(grpc.StatusCode.INTERNAL, Exit.INTERNAL),
    pruner.PrunerError: Row(grpc.StatusCode.INTERNAL, Exit.INTERNAL),
}
_OTHER = Row(grpc.StatusCode.INTERNAL, Exit.INTERNAL)


def row_of(error: BaseException | type[BaseException]) -> Row:
    """The table's entry for ``error``: its most specific class that has one."""
    kind = error if isinstance(error, type) else type(error)
    for cls in kind.__mro__:
        if cls in TABLE:
            return TABLE[cls]
    return _OTHER


def exit_code(error: BaseException) -> int:
    """The CLI's exit code for ``error``."""
    return int(row_of(error).exit)


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))


def to_status(error: BaseException, message: str | None = None) -> grpc.Status:
    """The status a server ends a call with for ``error``, with its rich details.

    ``message`` replaces ``str(error)`` (the server hides internal errors' text).
    A ``ResourceLimitError``'s ``subject`` names the limit; an ``InvalidInputError``
    may carry a ``field`` attribute naming the request field.
    """
    row = row_of(error)
    text = str(error) if message is None else message
    details: list[any_pb2.Any] = []
    if isinstance(error, (ServerBusyError, ServerUnavailableError)):
        details.append(_packed(error_details_pb2.RetryInfo(retry_delay=_duration(error.retry_after))))
    elif isinstance(error, pruner.ResourceLimitError):
        violation = error_details_pb2.QuotaFailure.Violation(subject=error.subject, description=text)
        details.append(_packed(error_details_pb2.QuotaFailure(violations=[violation])))
    elif row.code is grpc.StatusCode.INVALID_ARGUMENT and not isinstance(error, AuthenticationError):
        violation = error_details_pb2.BadRequest.FieldViolation(field=getattr(error, "field", ""), description=text)
        details.append(_packed(error_details_pb2.BadRequest(field_violations=[violation])))
    status = status_pb2.Status(code=row.code.value[0], message=text, details=details)
    return rpc_status.to_status(status)


def _detail(status: status_pb2.Status, kind: type[object]) -> object | None:
    for packed in status.details:
        message = kind()
        if packed.Is(message.DESCRIPTOR):  # type: ignore[attr-defined]
            packed.Unpack(message)
            return message
    return None


def from_rpc_error(error: grpc.RpcError) -> pruner.PrunerError:
    """The error of the table's class that a failed call's status stands for (the inverse of :func:`to_status`)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    text = (error.details() if hasattr(error, "details") else None) or code.name
    status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
    retry = _detail(status, error_details_pb2.RetryInfo) if status is not None else None
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        if retry is not None:
            delay = retry.retry_delay  # type: ignore[attr-defined]
            return ServerBusyError(text, retry_after=delay.seconds + delay.nanos / 1e9)
        return pruner.ResourceLimitError(text)
    if code is grpc.StatusCode.UNAVAILABLE:
        return ServerUnavailableError(text)
    classes = (AuthenticationError, TimeLimitError, JobNotFoundError, JobStateError, pruner.CancelledError)
    for cls in (*classes, pruner.InvalidInputError):
        if TABLE[cls].code is code:
            return cls(text)
    return pruner.InternalError(f"the server said {code.name}: {text}")


def error_named(name: str, message: str) -> pruner.PrunerError:
    """An error of the class a job's ``error_code`` names (a class of the table, or of the library's tree).

    A name this version does not know (a newer server's) gives ``pruner.PrunerError``: an internal error.
    """
    classes = {cls.__name__: cls for cls in TABLE}
    candidate = getattr(pruner, name, None)
    if isinstance(candidate, type) and issubclass(candidate, pruner.PrunerError):
        classes.setdefault(name, candidate)
    cls = classes.get(name, pruner.PrunerError)
    try:
        error = cls(message)
    except TypeError:  # a constructor that wants more than a message
        error = pruner.PrunerError(message)
    return error if isinstance(error, pruner.PrunerError) else pruner.PrunerError(message)
