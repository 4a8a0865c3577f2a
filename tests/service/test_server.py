"""The gRPC server on a real loopback port, through the real client."""

from __future__ import annotations

import io
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from onnx import numpy_helper

import pruner
from service import convert
from service._gen.onnxpruner.v1 import pruner_pb2 as pb
from service._gen.onnxpruner.v1 import pruner_pb2_grpc as pb_grpc
from service.client import Connection
from service.errors import row_of
from service.server import ServerConfig, create_server, set_serving
from tests.helpers import tiny_mlp, tiny_mlp_evalset

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MLP = FIXTURES / "mlp.onnx"
MLP_EVAL = FIXTURES / "mlp_eval.npz"
QUICK = pruner.PruneOptions(max_evaluations=3)

Start = Callable[..., str]


@pytest.fixture
def start_server() -> Iterator[Start]:
    """Starts servers on free loopback ports; returns their addresses. Stopped at the end."""
    servers = []

    def start(**settings: object) -> str:
        config = ServerConfig(address="127.0.0.1:0", **settings)  # type: ignore[arg-type]
        server, port, health = create_server(config)
        server.start()
        set_serving(health, True)
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def slow_job() -> tuple[bytes, bytes]:
    """A tiny model with a large eval set at batch size 1: each candidate takes seconds."""
    model = tiny_mlp().SerializeToString()
    return model, npz_bytes(tiny_mlp_evalset(200_000))


SLOW = pruner.PruneOptions(batch_size=1, metric=pruner.MetricKind.COSINE, max_evaluations=50)


def healthy(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service="onnxpruner.v1.PrunerService"), timeout=5).status


def wait_until(condition: Callable[[], bool], seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_remote_prune_matches_local(start_server: Start) -> None:
    address = start_server()
    events: list[pruner.ProgressEvent] = []
    with Connection(address) as connection:
        remote = connection.prune(MLP, MLP_EVAL, QUICK, on_progress=events.append)
    local = pruner.prune(MLP, MLP_EVAL, QUICK)
    assert remote.report.status == local.report.status == "pruned"
    assert remote.report.nonzero_after == local.report.nonzero_after
    assert remote.report.options == {**local.report.options, "threads": remote.report.options["threads"]}
    model = onnx.ModelProto.FromString(remote.model_bytes)
    onnx.checker.check_model(model, full_check=True)
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer]
    assert sum(int(np.count_nonzero(w)) for w in weights if w.ndim == 2) == remote.report.nonzero_after
    kinds = [e.kind for e in events]
    assert kinds[0] is pruner.EventKind.BASELINE
    assert kinds[-1] is pruner.EventKind.DONE
    assert kinds.count(pruner.EventKind.CANDIDATE) == remote.report.evaluations


def test_remote_inspect_matches_local(start_server: Start) -> None:
    address = start_server()
    with Connection(address) as connection:
        remote = connection.inspect(FIXTURES / "cnn_bn.onnx", exclude=("head*",))
    local = pruner.inspect(FIXTURES / "cnn_bn.onnx", exclude=("head*",)).to_dict()
    assert remote == json.loads(json.dumps(local))  # as JSON: tuples arrive as lists


def tensor_requests(evalset: dict[str, np.ndarray], *, inline: bool) -> list[pb.PruneRequest]:
    """The eval set as ONNX tensors, as a client without numpy's .npz would send it."""
    out = []
    for name, array in evalset.items():
        tensor = numpy_helper.from_array(array, name)
        if inline:
            out.append(pb.PruneRequest(eval_tensor=pb.EvalTensor(tensor_proto=tensor.SerializeToString())))
            continue
        raw = tensor.raw_data
        tensor.ClearField("raw_data")
        out.append(pb.PruneRequest(eval_tensor=pb.EvalTensor(tensor_proto=tensor.SerializeToString())))
        out += [pb.PruneRequest(eval_tensor_data=raw[i : i + 1000]) for i in range(0, len(raw), 1000)]
    return out


def call_prune(address: str, requests: list[pb.PruneRequest], **kwargs: object) -> list[pb.PruneResponse]:
    with grpc.insecure_channel(address) as channel:
        return list(pb_grpc.PrunerServiceStub(channel).Prune(iter(requests), **kwargs))


@pytest.mark.parametrize("inline", [True, False])
def test_eval_set_as_onnx_tensors(start_server: Start, inline: bool) -> None:
    address = start_server()
    arrays = dict(np.load(MLP_EVAL))
    requests = [
        pb.PruneRequest(config=convert.options_to_proto(QUICK)),
        pb.PruneRequest(model_chunk=MLP.read_bytes()),
        *tensor_requests(arrays, inline=inline),
    ]
    responses = call_prune(address, requests)
    (result,) = [r.result for r in responses if r.WhichOneof("payload") == "result"]
    report = pruner.Report.from_json(result.report_json)
    assert report.nonzero_after == pruner.prune(MLP, MLP_EVAL, QUICK).report.nonzero_after


def status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises((grpc.RpcError, pruner.PrunerError)) as info:
        call()
    error = info.value
    if isinstance(error, pruner.PrunerError):
        return row_of(error).code, str(error)
    return error.code(), error.details()  # type: ignore[attr-defined]


def config_request(**fields: object) -> pb.PruneRequest:
    return pb.PruneRequest(config=pb.PruneConfig(**fields))  # type: ignore[arg-type]


def external_data_model() -> bytes:
    model = tiny_mlp()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="/etc/passwd")
    return model.SerializeToString()


def header(name: str, data_type: int, dims: list[int]) -> onnx.TensorProto:
    """A TensorProto without data, announcing eval_tensor_data chunks."""
    tensor = onnx.TensorProto(name=name, data_type=data_type)
    tensor.dims.extend(dims)
    return tensor


GOOD_MODEL = tiny_mlp().SerializeToString()
GOOD_EVAL = npz_bytes(tiny_mlp_evalset(64))
# (id, requests, words the status message must contain)
BAD_REQUESTS = [
    ("no-config", [pb.PruneRequest(model_chunk=GOOD_MODEL)], ["first", "config"]),
    ("two-configs", [config_request(), config_request()], ["config", "twice"]),
    ("no-model", [config_request(), pb.PruneRequest(eval_npz_chunk=GOOD_EVAL)], ["no model"]),
    ("no-eval", [config_request(), pb.PruneRequest(model_chunk=GOOD_MODEL)], ["no eval set"]),
    (
        "truncated-model",
        [config_request(), pb.PruneRequest(model_chunk=GOOD_MODEL[:50]), pb.PruneRequest(eval_npz_chunk=GOOD_EVAL)],
        ["truncated"],
    ),
    (
        "external-data",
        [
            config_request(),
            pb.PruneRequest(model_chunk=external_data_model()),
            pb.PruneRequest(eval_npz_chunk=GOOD_EVAL),
        ],
        ["external data"],
    ),
    (
        "pickled-eval",
        [
            config_request(),
            pb.PruneRequest(model_chunk=GOOD_MODEL),
            pb.PruneRequest(
                eval_npz_chunk=npz_bytes({"x": np.array([{"a": 1}] * 4, dtype=object)}),
            ),
        ],
        ["pickled"],
    ),
    (
        "wrong-input-name",
        [
            config_request(),
            pb.PruneRequest(model_chunk=GOOD_MODEL),
            pb.PruneRequest(eval_npz_chunk=npz_bytes({"input": np.zeros((4, 8), np.float32)})),
        ],
        ["'x'", "'input'"],
    ),
    (
        "nan-tolerance",
        [
            config_request(tolerance=pb.Tolerance(value=float("nan"))),
            pb.PruneRequest(model_chunk=GOOD_MODEL),
            pb.PruneRequest(eval_npz_chunk=GOOD_EVAL),
        ],
        ["tolerance", "finite"],
    ),
    (
        "absurd-evaluations",
        [
            config_request(max_evaluations=0),
            pb.PruneRequest(model_chunk=GOOD_MODEL),
            pb.PruneRequest(eval_npz_chunk=GOOD_EVAL),
        ],
        ["max_evaluations"],
    ),
    (
        "absurd-search-width",
        [
            config_request(search_width=17),
            pb.PruneRequest(model_chunk=GOOD_MODEL),
            pb.PruneRequest(eval_npz_chunk=GOOD_EVAL),
        ],
        ["search_width", "[1, 16]", "17"],
    ),
    (
        "unknown-enum",
        [config_request(metric=99), pb.PruneRequest(model_chunk=GOOD_MODEL), pb.PruneRequest(eval_npz_chunk=GOOD_EVAL)],
        ["metric", "99"],
    ),
    (
        "npz-and-tensors",
        [
            config_request(),
            pb.PruneRequest(model_chunk=GOOD_MODEL),
            pb.PruneRequest(eval_npz_chunk=GOOD_EVAL),
            *tensor_requests({"x": np.zeros((4, 8), np.float32)}, inline=True),
        ],
        ["not both"],
    ),
    (
        "tensor-size-mismatch",
        [
            config_request(),
            pb.PruneRequest(model_chunk=GOOD_MODEL),
            pb.PruneRequest(
                eval_tensor=pb.EvalTensor(tensor_proto=header("x", onnx.TensorProto.FLOAT, [4, 8]).SerializeToString())
            ),
            pb.PruneRequest(eval_tensor_data=b"\0" * 10),
        ],
        ["'x'", "10 data bytes"],
    ),
]


@pytest.mark.parametrize(("requests", "words"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(
    start_server: Start, requests: list[pb.PruneRequest], words: list[str]
) -> None:
    address = start_server()
    code, message = status_of(lambda: call_prune(address, requests))
    assert code is grpc.StatusCode.INVALID_ARGUMENT, message
    for word in words:
        assert word in message, message
    assert "Traceback" not in message
    assert healthy(address) == health_pb2.HealthCheckResponse.SERVING
    with Connection(address) as connection:
        assert connection.prune(GOOD_MODEL, GOOD_EVAL, QUICK).report.status in ("pruned", "unchanged")


def test_inputs_over_the_limits_are_resource_exhausted(start_server: Start) -> None:
    address = start_server(max_model_bytes=1000, max_eval_bytes=10_000_000)
    with Connection(address) as connection:
        code, message = status_of(lambda: connection.prune(GOOD_MODEL, GOOD_EVAL, QUICK))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "model" in message and "1000 bytes" in message
    address = start_server(max_eval_bytes=1000)
    with Connection(address) as connection:
        code, message = status_of(lambda: connection.prune(GOOD_MODEL, GOOD_EVAL, QUICK))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "eval set" in message


def start_slow(address: str, **kwargs: object) -> tuple[grpc.Future, grpc.Channel]:  # type: ignore[name-defined]
    """Starts a long job; returns its call (iterate or cancel it) and its channel."""
    model, evalset = slow_job()
    requests = [
        pb.PruneRequest(config=convert.options_to_proto(SLOW)),
        pb.PruneRequest(model_chunk=model),
        *(pb.PruneRequest(eval_npz_chunk=evalset[i : i + (1 << 20)]) for i in range(0, len(evalset), 1 << 20)),
    ]
    channel = grpc.insecure_channel(address)
    call = pb_grpc.PrunerServiceStub(channel).Prune(iter(requests), **kwargs)
    return call, channel


def test_busy_server_refuses_at_once_and_a_cancel_frees_the_slot(start_server: Start) -> None:
    address = start_server(max_jobs=1)
    call, channel = start_slow(address)
    first = next(call)  # the job runs: the baseline event arrives
    assert first.progress.kind == pb.EVENT_KIND_BASELINE
    with Connection(address) as connection:
        start = time.monotonic()
        code, message = status_of(lambda: connection.prune(GOOD_MODEL, GOOD_EVAL, QUICK))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "maximum of 1 job" in message
        assert time.monotonic() - start < 5
        call.cancel()
        channel.close()

        # the cancelled job stops within a batch and gives its slot back, only once its worker has ended:
        # when the next job's first event arrives, its worker is the only one
        def slot_free() -> bool:
            workers: list[list[str]] = []

            def first_event(event: pruner.ProgressEvent) -> None:
                if not workers:
                    workers.append([t.name for t in threading.enumerate() if t.name.startswith("job-")])

            try:
                connection.prune(GOOD_MODEL, GOOD_EVAL, QUICK, on_progress=first_event)
            except pruner.PrunerError as e:
                assert row_of(e).code is grpc.StatusCode.RESOURCE_EXHAUSTED
                return False
            assert len(workers[0]) == 1, f"the slot was handed on while a worker still ran: {workers[0]}"
            return True

        assert wait_until(slot_free, 10)


def test_client_deadline_stops_the_job(start_server: Start) -> None:
    address = start_server(max_jobs=1)
    call, channel = start_slow(address, timeout=3)
    code, _ = status_of(lambda: list(call))
    channel.close()
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    with Connection(address) as connection:
        assert wait_until(lambda: _succeeds(connection), 10)


def _succeeds(connection: Connection) -> bool:
    try:
        connection.prune(GOOD_MODEL, GOOD_EVAL, QUICK)
        return True
    except pruner.PrunerError:
        return False


def test_job_time_limit_is_deadline_exceeded(start_server: Start) -> None:
    address = start_server(job_time_limit=1.0)
    call, channel = start_slow(address)
    code, message = status_of(lambda: list(call))
    channel.close()
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "time limit" in message


def test_bearer_token(start_server: Start) -> None:
    address = start_server(token="s3cret")
    for token in (None, "wrong"):
        with Connection(address, token=token) as connection:
            code, message = status_of(lambda c=connection: c.prune(GOOD_MODEL, GOOD_EVAL, QUICK))  # type: ignore[misc]
            assert code is grpc.StatusCode.UNAUTHENTICATED, message
            code, _ = status_of(lambda c=connection: c.inspect(GOOD_MODEL))  # type: ignore[misc]
            assert code is grpc.StatusCode.UNAUTHENTICATED
    with Connection(address, token="s3cret") as connection:
        assert connection.inspect(GOOD_MODEL)["layers"]
    # probes carry no token
    assert healthy(address) == health_pb2.HealthCheckResponse.SERVING


def test_tls(start_server: Start, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, check=False,
    )  # fmt: skip
    if made.returncode:
        pytest.skip(f"openssl cannot make a certificate here: {made.stderr.decode()[:200]}")
    address = start_server(tls_cert=str(cert), tls_key=str(key))
    with Connection(address, tls_ca=str(cert)) as connection:
        assert connection.inspect(GOOD_MODEL)["layers"]
    with Connection(address) as plain:  # a plaintext client cannot talk to a TLS server
        code, _ = status_of(lambda: plain.inspect(GOOD_MODEL, timeout=5))
        assert code is grpc.StatusCode.UNAVAILABLE


def test_reflection_lists_the_services(start_server: Start) -> None:
    address = start_server()
    with grpc.insecure_channel(address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "onnxpruner.v1.PrunerService" in services
    assert "grpc.health.v1.Health" in services


def test_sigterm_lets_running_jobs_finish_and_refuses_new_ones(tmp_path: Path) -> None:
    address, server = server_process(grace=30)
    try:
        assert wait_until(lambda: _serving(address), 20), "server did not come up"
        model, evalset = tiny_mlp().SerializeToString(), npz_bytes(tiny_mlp_evalset(20_000))
        options = pruner.PruneOptions(batch_size=1, max_evaluations=4)
        outcome: dict[str, object] = {}
        events: list[pruner.ProgressEvent] = []

        def run() -> None:
            with Connection(address) as connection:
                try:
                    outcome["result"] = connection.prune(model, evalset, options, on_progress=events.append)
                except pruner.PrunerError as e:
                    outcome["error"] = e

        job = threading.Thread(target=run)
        job.start()
        assert wait_until(lambda: bool(events), 20), "the job did not start"
        server.terminate()  # SIGTERM while the job runs
        job.join(60)
        assert "result" in outcome, outcome.get("error")
        assert server.wait(30) == 0
        stderr = server.stderr.read() if server.stderr else ""
        assert '"event": "stopping"' in stderr and '"outcome": "ok"' in stderr
    finally:
        server.kill()


def server_process(grace: int) -> tuple[str, subprocess.Popen[str]]:
    """``python -m service`` on a free loopback port, stderr captured: (address, process)."""
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "service", "--address", address, "--grace", str(grace)],
        cwd=Path(__file__).resolve().parents[2],
        stderr=subprocess.PIPE,
        text=True,
    )
    return address, server


def _serving(address: str) -> bool:
    try:
        return healthy(address) == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def test_remote_remove_mode_matches_local(start_server: Start) -> None:
    address = start_server()
    options = pruner.PruneOptions(mode=pruner.Mode.REMOVE, max_evaluations=4)
    fixture, evals = FIXTURES / "cnn_bn.onnx", FIXTURES / "cnn_bn_eval.npz"
    with Connection(address) as connection:
        remote = connection.prune(fixture, evals, options)
    local = pruner.prune(fixture, evals, options)
    assert remote.report.bytes_after == local.report.bytes_after < local.report.bytes_before
    assert [la.channels_after for la in remote.report.layers] == [la.channels_after for la in local.report.layers]


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["--tls-cert", "/nope.pem", "--tls-key", "/nope.key"], {}, ["nope"]),
        ([], {"ONNX_PRUNER_MAX_JOBS": "abc"}, ["abc"]),
        (["--max-jobs", "0"], {}, ["max_jobs"]),
        (["--token-file", "/nope"], {}, ["token file"]),
    ],
)
def test_server_refuses_bad_settings_with_one_line(args: list[str], env: dict[str, str], words: list[str]) -> None:
    import os
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "service", "--address", "127.0.0.1:0", *args],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in done.stderr


def test_sigterm_cancels_jobs_that_outlive_the_grace_period() -> None:
    address, server = server_process(grace=1)
    try:
        assert wait_until(lambda: _serving(address), 20), "server did not come up"
        call, channel = start_slow(address)
        assert next(call).progress.kind == pb.EVENT_KIND_BASELINE
        started = time.monotonic()
        server.terminate()
        code, message = status_of(lambda: list(call))
        channel.close()
        assert code is grpc.StatusCode.UNAVAILABLE, message
        assert "shutting down" in message
        assert server.wait(30) == 0
        assert time.monotonic() - started < 20
    finally:
        server.kill()
