"""The client's failures are the error table's classes, and the CLI exits with the table's codes for them.

A tiny in-process server of our own ends calls with the statuses a real server
sends (``errors.to_status``), so every row is reached without waiting for the
real server to be busy or to shut down; the last tests use the real server.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import onnx
import pytest

import pruner
from service import errors
from service._gen.onnxpruner.v1 import pruner_pb2 as pb
from service._gen.onnxpruner.v1 import pruner_pb2_grpc as pb_grpc
from service.client import Connection, check_target
from service.errors import Exit
from tests.helpers import run_cli, tiny_mlp
from tests.service.test_server import GOOD_EVAL, QUICK, Start, start_server, start_slow  # noqa: F401 (fixture)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MODEL = tiny_mlp().SerializeToString()


class Scripted(pb_grpc.PrunerServiceServicer):
    """Reads the whole request stream, sends ``progress`` events, then ends the call with ``status``
    (or, when ``status`` is None, sends a result whose digest does not match its model, or ``sent``:
    a report and a model that match their digest)."""

    def __init__(self, status: grpc.Status | None, progress: int = 1, sent: tuple[str, bytes] | None = None) -> None:
        self.status = status
        self.progress = progress
        self.sent = sent

    def Prune(self, request_iterator: Iterator[pb.PruneRequest], context: grpc.ServicerContext) -> Iterator[object]:
        for _ in request_iterator:
            pass
        for i in range(self.progress):
            yield pb.PruneResponse(progress=pb.ProgressEvent(kind=pb.EVENT_KIND_CANDIDATE, message=f"candidate {i}"))
        if self.sent is not None:
            report_json, model = self.sent
            digest = hashlib.sha256(model).hexdigest()
            yield pb.PruneResponse(
                result=pb.PruneResult(report_json=report_json, model_size=len(model), model_sha256=digest)
            )
            yield pb.PruneResponse(model_chunk=model)
            return
        if self.status is None:
            yield pb.PruneResponse(result=pb.PruneResult(report_json="{}", model_size=4, model_sha256="0" * 64))
            yield pb.PruneResponse(model_chunk=b"abcd")
            return
        context.abort_with_status(self.status)

    def Inspect(self, request_iterator: Iterator[pb.InspectRequest], context: grpc.ServicerContext) -> object:
        for _ in request_iterator:
            pass
        assert self.status is not None
        context.abort_with_status(self.status)


@pytest.fixture
def scripted() -> Iterator[object]:
    """Starts a scripted server for a status; returns its address."""
    servers: list[grpc.Server] = []

    def start(status: grpc.Status | None, progress: int = 1, sent: tuple[str, bytes] | None = None) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_PrunerServiceServicer_to_server(Scripted(status, progress, sent), server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


def closed_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# every row a server may end a call with: (the error the server raises, the class the client raises)
SERVER_ERRORS = [
    (pruner.InvalidEvalSetError("eval input 'x' has shape (4, 3)"), pruner.InvalidInputError),
    (pruner.UnsupportedModelError("op Loop is not supported"), pruner.InvalidInputError),
    (errors.AuthenticationError("missing or wrong bearer token"), errors.AuthenticationError),
    (pruner.ResourceLimitError("the model exceeds the server's limit of 1000 bytes"), pruner.ResourceLimitError),
    (errors.ServerBusyError("the server runs its maximum of 1 job(s)", retry_after=7), errors.ServerBusyError),
    (errors.ServerUnavailableError("the server is shutting down; retry"), errors.ServerUnavailableError),
    (errors.TimeLimitError("the job ran past the server's time limit of 60 s"), errors.TimeLimitError),
    (pruner.CancelledError("the job was cancelled"), pruner.CancelledError),
    (pruner.InternalError("internal error (job 1234); the server's log has the details"), pruner.InternalError),
]


@pytest.mark.parametrize(("error", "cls"), SERVER_ERRORS, ids=lambda v: type(v).__name__)
def test_a_server_error_arrives_as_its_class_with_its_message(
    scripted: Start, error: pruner.PrunerError, cls: type[pruner.PrunerError]
) -> None:
    address = scripted(errors.to_status(error))
    events: list[pruner.ProgressEvent] = []
    with Connection(address) as connection:
        with pytest.raises(cls) as prune_info:
            connection.prune(MODEL, GOOD_EVAL, QUICK, on_progress=events.append)
        with pytest.raises(cls) as inspect_info:
            connection.inspect(MODEL)
    assert str(error) in str(prune_info.value) and str(error) in str(inspect_info.value)
    assert errors.exit_code(prune_info.value) == errors.exit_code(error)
    assert [e.message for e in events] == ["candidate 0"]  # the failure came mid-job


def test_busy_carries_the_servers_retry_delay(scripted: Start) -> None:
    address = scripted(errors.to_status(errors.ServerBusyError("busy", retry_after=2.5)))
    with Connection(address) as connection, pytest.raises(errors.ServerBusyError) as info:
        connection.inspect(MODEL)
    assert info.value.retry_after == 2.5


def test_a_model_that_does_not_match_its_digest_is_an_internal_error(scripted: Start) -> None:
    address = scripted(None)
    with Connection(address) as connection, pytest.raises(pruner.InternalError, match="does not match the server's"):
        connection.prune(MODEL, GOOD_EVAL, QUICK)


@pytest.mark.parametrize("report_json", ["{}", "not json"], ids=["report-without-fields", "report-not-json"])
def test_a_report_that_cannot_be_read_is_an_internal_error(scripted: Start, report_json: str) -> None:
    address = scripted(None, sent=(report_json, MODEL))
    with Connection(address) as connection, pytest.raises(pruner.InternalError) as info:
        connection.prune(MODEL, GOOD_EVAL, QUICK)
    assert str(info.value).startswith("the server's result cannot be read")
    assert errors.exit_code(info.value) == Exit.INTERNAL


def test_a_model_that_is_not_onnx_is_an_internal_error(scripted: Start) -> None:
    report = pruner.prune(MODEL, GOOD_EVAL, QUICK).report
    address = scripted(None, sent=(report.to_json(), b"not a model"))
    with Connection(address) as connection, pytest.raises(pruner.InternalError) as info:
        connection.prune(MODEL, GOOD_EVAL, QUICK)
    assert str(info.value).startswith("the server's result cannot be read: DecodeError")


def test_a_remote_result_is_the_librarys_result(start_server: Start, tmp_path: Path) -> None:  # noqa: F811
    address = start_server()
    with Connection(address) as connection:
        remote = connection.prune(MODEL, GOOD_EVAL, QUICK)
    local = pruner.prune(MODEL, GOOD_EVAL, QUICK)
    assert type(remote) is type(local) is pruner.PruneResult
    assert remote.report.status == "pruned"
    assert remote.model_bytes is not None and remote.model == onnx.ModelProto.FromString(remote.model_bytes)
    assert remote.plan == local.plan and remote.plan.to_dict() == remote.report.plan
    # one save for both: the model exactly as the server sent it, the report as the library writes it
    remote.save(tmp_path / "remote.onnx", tmp_path / "remote.json")
    assert (tmp_path / "remote.onnx").read_bytes() == remote.model_bytes
    assert pruner.Report.from_json((tmp_path / "remote.json").read_text()) == remote.report


def test_a_status_without_the_servers_details_is_a_lost_connection(scripted: Start) -> None:
    # what the transport reports when a connection breaks: UNAVAILABLE without rich details
    plain = _PlainStatus(grpc.StatusCode.UNAVAILABLE, "Socket closed", ())
    address = scripted(plain)
    with Connection(address) as connection, pytest.raises(errors.ServerUnavailableError) as info:
        connection.inspect(MODEL)
    assert str(info.value) == f"lost the connection to the server at {address}: Socket closed"


class _PlainStatus(grpc.Status):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[object, ...]) -> None:
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


def test_nothing_listening_fails_at_once_as_unavailable() -> None:
    address = f"127.0.0.1:{closed_port()}"
    with Connection(address, connect_timeout=120) as connection:
        start = time.monotonic()
        with pytest.raises(errors.ServerUnavailableError, match=f"cannot reach the server at {address}"):
            connection.inspect(MODEL)
        # refused connections do not wait for the connect timeout (generous: it is 120 s)
        assert time.monotonic() - start < 60


def test_a_server_that_never_answers_fails_after_the_connect_timeout() -> None:
    # a socket that accepts connections (the kernel does) but never speaks HTTP/2
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        with Connection(address, connect_timeout=1) as connection:
            with pytest.raises(errors.ServerUnavailableError, match=r"no answer within 1 s"):
                connection.inspect(MODEL)


ACCEPTED = ["localhost:50051", "127.0.0.1:1", "[::1]:50051", "my-host.example.com:65535"]
REFUSED = [
    ("localhost", "needs HOST:PORT"),
    (":50051", "with a host"),
    ("[]:50051", "with a host"),
    ("localhost:", "port from 1 to 65535"),
    ("localhost:http", "port from 1 to 65535"),
    ("localhost:0", "port from 1 to 65535"),
    ("localhost:65536", "port from 1 to 65535"),
    ("::1:50051", "IPv6 address in brackets"),
    ("[::1]", "needs HOST:PORT"),
    ("", "needs HOST:PORT"),
]


@pytest.mark.parametrize("target", ACCEPTED)
def test_check_target_accepts_host_and_port(target: str) -> None:
    assert check_target(target) == target


@pytest.mark.parametrize(("target", "words"), REFUSED, ids=[t or "empty" for t, _ in REFUSED])
def test_check_target_refuses_what_grpc_would_guess_at(target: str, words: str) -> None:
    with pytest.raises(pruner.InvalidConfigError, match=words) as info:
        check_target(target, "--server")
    assert str(info.value).startswith("--server needs HOST:PORT") and repr(target) in str(info.value)
    with pytest.raises(pruner.InvalidConfigError):
        Connection(target)


# --- the CLI: one table of exit codes for local and remote failures --------------------------------


def remote_prune(address: str, tmp_path: Path) -> tuple[int, str]:
    """``onnx-prune prune`` of the MLP fixture on ``address``: (exit code, the last line of stderr)."""
    proc = run_cli(
        "prune", FIXTURES / "mlp.onnx", "--eval", FIXTURES / "mlp_eval.npz", "-o", tmp_path / "o.onnx",
        "--report", tmp_path / "r.json", "--server", address, timeout=120,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing written
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return proc.returncode, lines[0]


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (errors.ServerBusyError("the server runs its maximum of 1 job", retry_after=7), "server is busy; retry in 7 s"),
        (errors.ServerUnavailableError("the server is shutting down; retry on another"), "the server is shutting down"),
        (errors.TimeLimitError("the job ran past the server's time limit of 60 s"), "time limit of 60 s"),
        (errors.AuthenticationError("missing or wrong bearer token"), "bearer token"),
        (pruner.InternalError("internal error (job 1234)"), "internal error (job 1234)"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else "",
)
def test_cli_exits_with_the_tables_code_for_a_remote_failure(
    scripted: Start, tmp_path: Path, error: pruner.PrunerError, words: str
) -> None:
    code, line = remote_prune(scripted(errors.to_status(error)), tmp_path)
    assert code == errors.exit_code(error)
    assert line.startswith("onnx-prune: ") and words in line, line


def test_cli_shutdown_mid_job_exits_4_and_says_so(scripted: Start, tmp_path: Path) -> None:
    status = errors.to_status(errors.ServerUnavailableError("the server is shutting down; retry on another server"))
    code, line = remote_prune(scripted(status, progress=3), tmp_path)
    assert code == Exit.UNAVAILABLE == 4
    assert line == "onnx-prune: error: the server is shutting down; retry on another server"


def test_cli_digest_mismatch_is_an_internal_error(scripted: Start, tmp_path: Path) -> None:
    code, line = remote_prune(scripted(None), tmp_path)
    assert code == Exit.INTERNAL
    assert "internal error: the model received does not match the server's digest" in line


def test_cli_internal_error_shows_the_traceback_only_with_debug(scripted: Start, tmp_path: Path) -> None:
    address = scripted(None)  # a model that does not match its digest
    args = ["prune", FIXTURES / "mlp.onnx", "--eval", FIXTURES / "mlp_eval.npz", "-o", tmp_path / "o.onnx"]
    proc = run_cli("--debug", *args, "--server", address, timeout=120)
    assert proc.returncode == Exit.INTERNAL
    assert "Traceback" in proc.stderr and "pruner._errors.InternalError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "onnx-prune: internal error: the model received does not match the server's digest"
    )
    assert list(tmp_path.iterdir()) == []


def test_cli_unreachable_server_exits_4(tmp_path: Path) -> None:
    address = f"127.0.0.1:{closed_port()}"
    code, line = remote_prune(address, tmp_path)
    assert code == Exit.UNAVAILABLE == 4
    assert line.startswith(f"onnx-prune: error: cannot reach the server at {address}"), line


def test_cli_busy_real_server_exits_5(start_server: Start, tmp_path: Path) -> None:  # noqa: F811
    address = start_server(max_jobs=1)
    call, channel = start_slow(address)
    try:
        assert next(call).progress.kind == pb.EVENT_KIND_BASELINE  # the slow job holds the only slot
        code, line = remote_prune(address, tmp_path)
    finally:
        call.cancel()
        channel.close()
    assert code == Exit.BUSY == 5, line
    assert "the server is busy; retry in" in line
