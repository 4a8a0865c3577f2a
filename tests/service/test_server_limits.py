"""The server's limits: chunk and message sizes, decoded eval bytes, slow uploads, slots, rich error details.

Raw stubs on a real loopback server; statuses are checked as gRPC codes and
``google.rpc`` details, as a client in any language sees them.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import onnx
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

import pruner
from service import convert
from service._gen.onnxpruner.v1 import pruner_pb2 as pb
from service._gen.onnxpruner.v1 import pruner_pb2_grpc as pb_grpc
from tests.service import test_server as base
from tests.service.test_server import GOOD_EVAL, GOOD_MODEL, QUICK, Start, header, start_slow, wait_until

start_server = base.start_server  # the fixture

CONFIG = pb.PruneRequest(config=convert.options_to_proto(QUICK))


def failure(call: Callable[[], object]) -> tuple[grpc.StatusCode, str, status_pb2.Status | None]:
    """The code, message and rich status of a call that must fail."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    return error.code(), error.details(), rpc_status.from_call(error)  # type: ignore[attr-defined]


def detail(status: status_pb2.Status | None, kind: type) -> object:  # type: ignore[type-arg]
    assert status is not None, "no rich status"
    for packed in status.details:
        message = kind()
        if packed.Is(message.DESCRIPTOR):
            packed.Unpack(message)
            return message
    raise AssertionError(f"no {kind.__name__} in the status details")


def prune(
    address: str, requests: Iterator[pb.PruneRequest] | list[pb.PruneRequest], **kwargs: object
) -> list[pb.PruneResponse]:
    with grpc.insecure_channel(address) as channel:
        return list(pb_grpc.PrunerServiceStub(channel).Prune(iter(requests), **kwargs))


def good_requests() -> list[pb.PruneRequest]:
    return [CONFIG, pb.PruneRequest(model_chunk=GOOD_MODEL), pb.PruneRequest(eval_npz_chunk=GOOD_EVAL)]


def eval_tensor(tensor: onnx.TensorProto) -> pb.PruneRequest:
    return pb.PruneRequest(eval_tensor=pb.EvalTensor(tensor_proto=tensor.SerializeToString()))


# -- eval tensors (issue 15, item 4)


def test_eval_tensor_dims_that_overflow_are_invalid_argument_naming_the_tensor(start_server: Start) -> None:
    address = start_server()
    requests = [
        CONFIG,
        pb.PruneRequest(model_chunk=GOOD_MODEL),
        eval_tensor(header("x", onnx.TensorProto.FLOAT, [2**32, 2**32])),
        pb.PruneRequest(eval_tensor_data=b""),
    ]
    code, message, status = failure(lambda: prune(address, requests))
    assert code is grpc.StatusCode.INVALID_ARGUMENT, message
    assert "'x'" in message and "dims" in message
    violation = detail(status, error_details_pb2.BadRequest).field_violations[0]  # type: ignore[attr-defined]
    assert violation.field == "eval_tensor.dims"


def test_inline_eval_tensors_count_their_decoded_bytes(start_server: Start) -> None:
    # 100 000 zeros as int64_data: ~100 kB on the wire (one-byte varints), 800 kB once parsed
    tensor = header("x", onnx.TensorProto.INT64, [100_000])
    tensor.int64_data.extend([0] * 100_000)
    assert len(tensor.SerializeToString()) < 200_000
    address = start_server(max_eval_bytes=500_000)
    requests = [CONFIG, pb.PruneRequest(model_chunk=GOOD_MODEL), eval_tensor(tensor)]
    code, message, status = failure(lambda: prune(address, requests))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, message
    assert "500000 bytes" in message and "'x'" in message
    violation = detail(status, error_details_pb2.QuotaFailure).violations[0]  # type: ignore[attr-defined]
    assert violation.subject == "max_eval_bytes"


def test_a_compressed_npz_counts_its_decoded_bytes(start_server: Start) -> None:
    """Needs ``pruner.load_eval_set(..., max_bytes=)`` from the library's side of issue 15."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros((100_000, 8), np.float32))  # 3.2 MB of arrays, a few kB zipped
    assert len(buffer.getvalue()) < 100_000
    address = start_server(max_eval_bytes=1_000_000)
    requests = [CONFIG, pb.PruneRequest(model_chunk=GOOD_MODEL), pb.PruneRequest(eval_npz_chunk=buffer.getvalue())]
    code, message, status = failure(lambda: prune(address, requests))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, message
    violation = detail(status, error_details_pb2.QuotaFailure).violations[0]  # type: ignore[attr-defined]
    assert violation.subject == "max_eval_bytes"


# -- chunk and message sizes (item 15)


@pytest.mark.parametrize("field", ["model_chunk", "eval_npz_chunk"])
def test_a_chunk_over_the_documented_limit_is_invalid_argument(start_server: Start, field: str) -> None:
    address = start_server()
    big = pb.PruneRequest(**{field: b"\0" * (convert.CHUNK_BYTES + 1)})  # type: ignore[arg-type]
    requests = [CONFIG, big] if field == "model_chunk" else [CONFIG, pb.PruneRequest(model_chunk=GOOD_MODEL), big]
    code, message, status = failure(lambda: prune(address, requests))
    assert code is grpc.StatusCode.INVALID_ARGUMENT, message
    assert field in message and str(convert.CHUNK_BYTES) in message
    violation = detail(status, error_details_pb2.BadRequest).field_violations[0]  # type: ignore[attr-defined]
    assert violation.field == field


def test_a_message_over_the_receive_limit_is_refused_by_grpc(start_server: Start) -> None:
    address = start_server()
    requests = [CONFIG, pb.PruneRequest(model_chunk=b"\0" * (3 << 20))]
    code, message, _ = failure(lambda: prune(address, requests))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, message
    assert str(convert.MAX_MESSAGE_BYTES) in message  # gRPC names its limit
    # and the server still serves
    assert any(r.WhichOneof("payload") == "result" for r in prune(address, good_requests()))


# -- slow uploads (item 5)


class Stalling:
    """Requests that stop coming until ``release`` is set (a client that went silent)."""

    def __init__(self, first: list[pb.PruneRequest]) -> None:
        self.first = first
        self.release = threading.Event()
        self.sent = threading.Event()

    def __iter__(self) -> Iterator[pb.PruneRequest]:
        yield from self.first
        self.sent.set()
        self.release.wait(60)


def stalled_call(address: str, stalling: Stalling) -> tuple[grpc.Channel, object]:
    channel = grpc.insecure_channel(address)
    call = pb_grpc.PrunerServiceStub(channel).Prune(iter(stalling))
    return channel, call


def upload_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("upload-") and t.is_alive()]


def test_a_silent_client_is_ended_by_the_idle_timeout_and_its_reader_released(start_server: Start) -> None:
    address = start_server(upload_idle_timeout=1.0)
    stalling = Stalling([CONFIG, pb.PruneRequest(model_chunk=GOOD_MODEL[:100])])
    channel, call = stalled_call(address, stalling)
    try:
        started = time.monotonic()
        code, message, _ = failure(lambda: list(call))  # type: ignore[call-overload]
        assert code is grpc.StatusCode.DEADLINE_EXCEEDED, message
        assert "upload_idle_timeout" in message
        assert time.monotonic() - started < 20
        assert wait_until(lambda: not upload_threads(), 10), "the request reader stayed blocked"
    finally:
        stalling.release.set()
        channel.close()


def test_a_trickling_client_is_ended_by_the_upload_deadline(start_server: Start) -> None:
    address = start_server(upload_deadline=2.0, upload_idle_timeout=30.0)
    stop = threading.Event()

    def trickle() -> Iterator[pb.PruneRequest]:
        yield CONFIG
        while not stop.is_set():
            yield pb.PruneRequest(model_chunk=b"\0")
            time.sleep(0.2)

    try:
        code, message, _ = failure(lambda: prune(address, trickle()))
        assert code is grpc.StatusCode.DEADLINE_EXCEEDED, message
        assert "upload_deadline" in message
    finally:
        stop.set()


def test_silent_uploads_do_not_hold_the_job_slots(start_server: Start) -> None:
    address = start_server(max_jobs=1)
    stalled = [Stalling([CONFIG, pb.PruneRequest(model_chunk=GOOD_MODEL[:100])]) for _ in range(2)]
    calls = [stalled_call(address, s) for s in stalled]
    try:
        for stalling in stalled:
            assert stalling.sent.wait(10)
        time.sleep(0.5)  # the server has taken both uploads in
        responses = prune(address, good_requests(), timeout=120)
        assert any(r.WhichOneof("payload") == "result" for r in responses)
    finally:
        for stalling in stalled:
            stalling.release.set()
        for channel, call in calls:
            call.cancel()  # type: ignore[attr-defined]
            channel.close()


def test_the_upload_slots_are_capped_and_busy_carries_retry_info(start_server: Start) -> None:
    address = start_server(max_uploads=1)
    stalling = Stalling([CONFIG, pb.PruneRequest(model_chunk=GOOD_MODEL[:100])])
    channel, call = stalled_call(address, stalling)
    try:
        assert stalling.sent.wait(10)
        time.sleep(0.5)
        code, message, status = failure(lambda: prune(address, good_requests()))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, message
        assert "1 upload" in message
        retry = detail(status, error_details_pb2.RetryInfo)
        assert retry.retry_delay.seconds > 0  # type: ignore[attr-defined]
    finally:
        stalling.release.set()
        call.cancel()  # type: ignore[attr-defined]
        channel.close()


# -- slots (items 8, 10)


def inspect(address: str) -> pb.InspectResponse:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.PrunerServiceStub(channel)
        return stub.Inspect(iter([pb.InspectRequest(model_chunk=GOOD_MODEL)]), timeout=30)  # type: ignore[no-any-return]


def test_inspect_is_served_while_every_job_slot_is_busy(start_server: Start) -> None:
    address = start_server(max_jobs=1)
    call, channel = start_slow(address)
    try:
        assert next(call).progress.kind == pb.EVENT_KIND_BASELINE
        code, message, status = failure(lambda: prune(address, good_requests()))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "maximum of 1 job" in message
        assert detail(status, error_details_pb2.RetryInfo) is not None
        assert inspect(address).layers
    finally:
        call.cancel()
        channel.close()


def test_size_limits_carry_quota_failure_naming_the_setting(start_server: Start) -> None:
    address = start_server(max_model_bytes=1000)
    code, message, status = failure(lambda: prune(address, good_requests()))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1000 bytes" in message
    violation = detail(status, error_details_pb2.QuotaFailure).violations[0]  # type: ignore[attr-defined]
    assert violation.subject == "max_model_bytes"


def test_bad_input_carries_bad_request_naming_the_field(start_server: Start) -> None:
    address = start_server()
    code, message, status = failure(lambda: prune(address, [CONFIG, pb.PruneRequest(model_chunk=GOOD_MODEL)]))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "no eval set" in message
    violation = detail(status, error_details_pb2.BadRequest).field_violations[0]  # type: ignore[attr-defined]
    assert violation.field == "eval_npz_chunk"


def test_an_internal_error_of_the_library_is_internal_without_its_text(
    start_server: Start, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> pruner.PruneResult:
        raise pruner.InternalError("the pruned model fails onnx.checker: secret detail")

    monkeypatch.setattr(pruner, "prune", broken)
    address = start_server()
    with caplog.at_level("INFO", logger="onnxpruner.service"):
        code, message, _ = failure(lambda: prune(address, good_requests()))
    assert code is grpc.StatusCode.INTERNAL
    assert "internal error (job" in message and "secret" not in message
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert errors and errors[0].exc_info is not None and "secret detail" in str(errors[0].exc_info[1])
