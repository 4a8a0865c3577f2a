"""The server's life: workers joined before their slot is free, memory given back, shutdown, auth, health, logs.

Raw stubs, real servers: in process where the test must see the server's
threads or logs, as a subprocess where it must signal it or read its memory.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

import pruner
from service import convert, server
from service._gen.onnxpruner.v1 import pruner_pb2 as pb
from service._gen.onnxpruner.v1 import pruner_pb2_grpc as pb_grpc
from tests.helpers import status_mib, tiny_mlp, tiny_mlp_evalset
from tests.service import test_server as base
from tests.service.test_server import GOOD_MODEL, Start, _serving, npz_bytes, start_slow, wait_until
from tests.service.test_server_limits import CONFIG, Stalling, detail, failure, good_requests, prune, stalled_call

start_server = base.start_server  # the fixture
ROOT = Path(__file__).resolve().parents[2]
STUBBORN = 99
"""max_evaluations that makes the patched prune below ignore its stop event."""


def job_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("job-") and t.is_alive()]


def stubborn_prune(seconds: float) -> object:
    """``pruner.prune``, but a job asking for STUBBORN evaluations runs ``seconds`` without looking at its stop."""
    real = pruner.prune

    def prune(model: object, evalset: object, options: pruner.PruneOptions, **kwargs: object) -> object:
        if options.max_evaluations != STUBBORN:
            return real(model, evalset, options, **kwargs)  # type: ignore[arg-type]
        kwargs["on_progress"](pruner.ProgressEvent(pruner.EventKind.BASELINE, "baseline"))  # type: ignore[operator]
        time.sleep(seconds)  # a loop that never checks the stop event
        raise pruner.CancelledError("stopped")

    return prune


def stubborn_call(address: str) -> tuple[grpc.Channel, object]:
    config = convert.options_to_proto(pruner.PruneOptions(max_evaluations=STUBBORN))
    requests = [pb.PruneRequest(config=config), *good_requests()[1:]]
    channel = grpc.insecure_channel(address)
    return channel, pb_grpc.PrunerServiceStub(channel).Prune(iter(requests))


def prune_seeing_threads(address: str) -> list[str]:
    """Runs a quick job; returns the job threads alive in this process when its first event arrived."""
    seen: list[str] = []
    with grpc.insecure_channel(address) as channel:
        for _ in pb_grpc.PrunerServiceStub(channel).Prune(iter(good_requests()), timeout=120):
            if not seen:
                seen = [t.name for t in job_threads()]
    return seen


# -- item 6: a cancelled job's worker is joined before its slot is handed on


def test_a_cancelled_worker_holds_its_slot_until_it_has_stopped(
    start_server: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pruner, "prune", stubborn_prune(3.0))
    address = start_server(max_jobs=1)
    channel, call = stubborn_call(address)
    assert next(call).progress.kind == pb.EVENT_KIND_BASELINE  # type: ignore[call-overload]
    (stubborn,) = job_threads()
    call.cancel()  # type: ignore[attr-defined]
    channel.close()

    def accepted() -> bool:
        try:
            seen = prune_seeing_threads(address)
        except grpc.RpcError as e:
            assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
            return False
        assert stubborn.name not in seen, "the slot was handed on while the cancelled worker still ran"
        return True

    assert wait_until(accepted, 30)
    assert not stubborn.is_alive()


def test_a_worker_that_ignores_its_stop_is_logged_and_keeps_its_slot(
    start_server: Start, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pruner, "prune", stubborn_prune(4.0))
    monkeypatch.setattr(server, "JOIN_SECONDS", 0.5)
    address = start_server(max_jobs=1)
    with caplog.at_level(logging.INFO, logger="onnxpruner.service"):
        channel, call = stubborn_call(address)
        assert next(call).progress.kind == pb.EVENT_KIND_BASELINE  # type: ignore[call-overload]
        (stubborn,) = job_threads()
        call.cancel()  # type: ignore[attr-defined]
        channel.close()
        assert wait_until(lambda: any("worker-ignores-stop" in r.getMessage() for r in caplog.records), 10)
        assert stubborn.is_alive()
        code, message, _ = failure(lambda: prune(address, good_requests()))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, message  # its slot is still taken
        stubborn.join(10)
        assert wait_until(lambda: _accepts(address), 20)  # and free once it ended
    (record,) = [r for r in caplog.records if "worker-ignores-stop" in r.getMessage()]
    assert record.levelno == logging.ERROR


def _accepts(address: str) -> bool:
    try:
        prune(address, good_requests(), timeout=120)
        return True
    except grpc.RpcError as e:
        assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
        return False


# -- item 13: logs say what happened, at a level that says whose fault it was


def job_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    out = []
    for record in caplog.records:
        try:
            fields = json.loads(record.getMessage())
        except ValueError:
            continue
        if fields.get("event") == "job":
            out.append({**fields, "level": record.levelname})
    return out


def test_a_client_cancelling_its_upload_is_logged_as_cancelled_at_info(
    start_server: Start, caplog: pytest.LogCaptureFixture
) -> None:
    address = start_server()
    with caplog.at_level(logging.INFO, logger="onnxpruner.service"):
        for close_channel in (False, True):
            stalling = Stalling([CONFIG, pb.PruneRequest(model_chunk=GOOD_MODEL[:100])])
            channel, call = stalled_call(address, stalling)
            assert stalling.sent.wait(10)
            time.sleep(0.5)
            if close_channel:
                channel.close()
            else:
                call.cancel()  # type: ignore[attr-defined]
            stalling.release.set()
            assert wait_until(lambda n=close_channel: len(job_records(caplog)) == 1 + n, 10)  # type: ignore[misc]
            channel.close()
    records = job_records(caplog)
    assert [r["outcome"] for r in records] == ["CANCELLED", "CANCELLED"], records
    assert {r["level"] for r in records} == {"INFO"}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_an_oversized_message_and_a_time_limit_are_not_errors_in_the_log(
    start_server: Start, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="onnxpruner.service"):
        address = start_server(upload_idle_timeout=1.0)
        failure(lambda: prune(address, [CONFIG, pb.PruneRequest(model_chunk=b"\0" * (3 << 20))]))
        stalling = Stalling([CONFIG])
        channel, call = stalled_call(address, stalling)
        code, _, _ = failure(lambda: list(call))  # type: ignore[call-overload]
        stalling.release.set()
        channel.close()
        assert code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_until(lambda: len(job_records(caplog)) == 2, 10)
    records = job_records(caplog)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], records
    (limit,) = [r for r in records if r["outcome"] == "DEADLINE_EXCEEDED"]
    assert limit["level"] == "WARNING" and "upload_idle_timeout" in str(limit["error"])


# -- subprocess servers


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def spawn(*args: str, env: dict[str, str] | None = None) -> tuple[str, subprocess.Popen[str]]:
    """``python -m service`` on a free loopback port, stderr captured: (address, process)."""
    address = free_address()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ONNX_PRUNER_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "--address", address, *args],
        cwd=ROOT,
        env={**environment, **(env or {})},
        stderr=subprocess.PIPE,
        text=True,
    )
    return address, process


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        process.kill()
        process.wait(30)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_cancelled_jobs_give_their_memory_back(spawned: list[subprocess.Popen[str]], tmp_path: Path) -> None:
    address, process = spawn("--max-jobs", "1", env={"ONNX_PRUNER_RUNTIME_DIR": str(tmp_path)})
    spawned.append(process)
    assert wait_until(lambda: _serving(address), 30), "server did not come up"
    model = tiny_mlp().SerializeToString()
    evalset = npz_bytes(tiny_mlp_evalset(1_000_000))  # 40 MB: what a job keeps alive shows
    options = pruner.PruneOptions(batch_size=256, metric=pruner.MetricKind.COSINE, max_evaluations=50)
    requests = [
        pb.PruneRequest(config=convert.options_to_proto(options)),
        pb.PruneRequest(model_chunk=model),
        *(
            pb.PruneRequest(eval_npz_chunk=evalset[i : i + convert.CHUNK_BYTES])
            for i in range(0, len(evalset), convert.CHUNK_BYTES)
        ),
    ]

    def cancelled_job() -> None:
        with grpc.insecure_channel(address) as channel:
            call = pb_grpc.PrunerServiceStub(channel).Prune(iter(requests))
            assert next(call).progress.kind == pb.EVENT_KIND_BASELINE
            call.cancel()
        assert wait_until(lambda: _accepts(address), 60)  # the slot is free: the job has ended

    for _ in range(3):  # warm-up: libraries, arenas, caches
        cancelled_job()
    time.sleep(1)
    idle = status_mib(process.pid, "VmRSS")
    for _ in range(15):
        cancelled_job()
    time.sleep(1)
    after = status_mib(process.pid, "VmRSS")
    assert after - idle < 40, f"RSS grew from {idle:.0f} MiB to {after:.0f} MiB over 15 cancelled jobs"


@pytest.mark.parametrize(
    ("token_file", "env", "words"),
    [
        ("", {}, ["token file", "empty"]),
        (" \n\t", {}, ["token file", "empty"]),
        (None, {"ONNX_PRUNER_TOKEN": ""}, ["ONNX_PRUNER_TOKEN", "empty"]),
        (None, {"ONNX_PRUNER_TOKEN": "  "}, ["ONNX_PRUNER_TOKEN", "empty"]),
    ],
)
def test_an_empty_token_stops_the_server_from_starting(
    tmp_path: Path, token_file: str | None, env: dict[str, str], words: list[str]
) -> None:
    args = []
    if token_file is not None:
        (tmp_path / "token").write_text(token_file)
        args = ["--token-file", str(tmp_path / "token")]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ONNX_PRUNER_")}
    done = subprocess.run(
        [sys.executable, "-m", "service", "--address", free_address(), *args],
        cwd=ROOT, env={**environment, **env}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    for word in words:
        assert word in done.stderr


def test_a_wrong_token_is_unauthenticated_and_names_the_header(start_server: Start) -> None:
    address = start_server(token="s3cret")
    code, message, _ = failure(lambda: prune(address, good_requests()))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in message


def test_shutdown_tells_running_and_new_calls_it_is_shutting_down(spawned: list[subprocess.Popen[str]]) -> None:
    address, process = spawn("--grace", "3")
    spawned.append(process)
    assert wait_until(lambda: _serving(address), 30), "server did not come up"
    call, channel = start_slow(address)
    try:
        assert next(call).progress.kind == pb.EVENT_KIND_BASELINE
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        code, message, status = failure(lambda: prune(address, good_requests()))  # a new call in the grace period
        assert code is grpc.StatusCode.UNAVAILABLE and "shutting down" in message, message
        assert detail(status, error_details_pb2.RetryInfo) is not None
        code, message, status = failure(lambda: list(call))  # the running job, once the grace ends
        assert code is grpc.StatusCode.UNAVAILABLE and "shutting down" in message, message
        assert detail(status, error_details_pb2.RetryInfo) is not None
    finally:
        channel.close()
    assert process.wait(30) == 0
    assert time.monotonic() - started < 20
    log = process.stderr.read() if process.stderr else ""
    assert '"event": "stopped"' in log and '"level": "ERROR"' not in log


def test_the_health_check_follows_the_address_the_server_uses(
    spawned: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    env = {"ONNX_PRUNER_RUNTIME_DIR": str(tmp_path)}
    address, process = spawn(env=env)  # --address 127.0.0.1:<port>, no ONNX_PRUNER_ADDRESS
    spawned.append(process)
    assert wait_until(lambda: _serving(address), 30), "server did not come up"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ONNX_PRUNER_")}

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service.healthcheck"],
            cwd=ROOT, env={**environment, **env}, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    done = check()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "serving"
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    assert not (tmp_path / "server.json").exists()
    assert check().returncode == 1
