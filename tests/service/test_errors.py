"""The one table from errors to gRPC statuses and CLI exit codes."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import status_pb2

import pruner
from service import errors
from service.errors import Exit


def public_error_classes() -> list[type[BaseException]]:
    exported = [getattr(pruner, name) for name in pruner.__all__]
    service = [getattr(errors, name) for name in errors.__all__]
    return [c for c in [*exported, *service] if isinstance(c, type) and issubclass(c, BaseException)]


@pytest.mark.parametrize("cls", public_error_classes(), ids=lambda c: c.__name__)
def test_every_public_error_class_has_its_own_row(cls: type[BaseException]) -> None:
    assert cls in errors.TABLE


@pytest.mark.parametrize(
    ("error", "code", "exit"),
    [
        (pruner.InvalidModelError("m"), grpc.StatusCode.INVALID_ARGUMENT, Exit.BAD_INPUT),
        (pruner.UnsupportedModelError("m"), grpc.StatusCode.INVALID_ARGUMENT, Exit.BAD_INPUT),
        (pruner.ResourceLimitError("m"), grpc.StatusCode.RESOURCE_EXHAUSTED, Exit.BAD_INPUT),
        (errors.ServerBusyError("m"), grpc.StatusCode.RESOURCE_EXHAUSTED, Exit.BUSY),
        (errors.ServerUnavailableError("m"), grpc.StatusCode.UNAVAILABLE, Exit.UNAVAILABLE),
        (pruner.InternalError("m"), grpc.StatusCode.INTERNAL, Exit.INTERNAL),
        (pruner.CancelledError("m"), grpc.StatusCode.CANCELLED, Exit.INTERRUPTED),
        (KeyError("m"), grpc.StatusCode.INTERNAL, Exit.INTERNAL),
    ],
)
def test_most_specific_class_wins(error: BaseException, code: grpc.StatusCode, exit: Exit) -> None:
    assert errors.row_of(error) == errors.Row(code, exit)
    assert errors.exit_code(error) == exit


def test_a_library_bug_is_internal_not_the_users_fault() -> None:
    assert errors.row_of(pruner.InternalError("the pruned model fails the checker")).code is grpc.StatusCode.INTERNAL
    assert not issubclass(pruner.InternalError, (pruner.InvalidInputError, pruner.UnsupportedModelError))


def detail_types(status: grpc.Status) -> list[str]:
    ((key, value),) = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    return [d.TypeName() for d in status_pb2.Status.FromString(value).details]


def test_busy_and_too_large_differ_in_their_details() -> None:
    busy = errors.to_status(errors.ServerBusyError("busy", retry_after=2.5))
    large = errors.to_status(pruner.ResourceLimitError("too large"))
    assert busy.code is large.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert detail_types(busy) == ["google.rpc.RetryInfo"]
    assert detail_types(large) == ["google.rpc.QuotaFailure"]
    assert detail_types(errors.to_status(pruner.InvalidEvalSetError("bad"))) == ["google.rpc.BadRequest"]
