"""A client in another language, written from protos/ alone: clients/node/prune.js (the one-call
``Prune``) and clients/node/job.js (the durable job API) against the real server.

Also what such a client relies on that the Python side can check without Node: the vendored
protos are the ones the server serves, ``Tensor`` is onnx.TensorProto on the wire, and model
and eval chunks may interleave as the proto says.

The Node tests skip when ``node`` is not installed, except under CI (``CI`` or
``PRUNER_CI_REQUIRE_NODE`` set; .ci/run sets the latter), where they fail. .ci/run installs the
client's dependencies (``npm ci --prefix clients/node``); where ``clients/node/node_modules`` is
missing, the tests install them the same way, from the lock file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.unknown_fields import UnknownFieldSet
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_tools import protoc
from onnx import numpy_helper

import pruner
from service import convert
from service._gen.onnxpruner.v1 import pruner_pb2 as pb
from service.client import Connection
from tests.service import test_jobs as jobs
from tests.service import test_server as base
from tests.service.test_report_schema import validate
from tests.service.test_server import QUICK, Start, call_prune, tensor_requests

start_server = base.start_server  # the fixtures
job_server = jobs.job_server

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
CLIENT = ROOT / "clients" / "node"
FIXTURES = ROOT / "tests" / "fixtures"
MLP = FIXTURES / "mlp.onnx"
MLP_EVAL = FIXTURES / "mlp_eval.npz"
TOKEN = "node-client-test-token"


@pytest.fixture(scope="module")
def node() -> Iterator[str]:
    """The node executable, with the client's dependencies installed."""
    found = shutil.which("node")
    if found is None:
        if os.environ.get("CI") or os.environ.get("PRUNER_CI_REQUIRE_NODE"):
            pytest.fail("node is not installed, and CI must run the Node client's tests (install node >= 18 and npm)")
        pytest.skip("node is not installed")
    if not (CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        npm = shutil.which("npm")
        assert npm is not None, "npm is needed to install clients/node's dependencies (npm ci --prefix clients/node)"
        done = subprocess.run([npm, "ci", "--prefix", str(CLIENT)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    yield found


def run_client(node: str, *args: str | Path, script: str = "prune.js") -> subprocess.CompletedProcess[str]:
    # the server runs in this process, on threads: the client is a child process that we wait for
    return subprocess.run(
        [node, str(CLIENT / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "ONNX_PRUNER_TOKEN"},
    )


def test_the_node_client_prunes_a_model(start_server: Start, node: str, tmp_path: Path) -> None:
    address = start_server(token=TOKEN)
    out, report_path = tmp_path / "pruned.onnx", tmp_path / "report.json"
    done = run_client(
        node, MLP, MLP_EVAL, out, "--address", address, "--token", TOKEN, "--max-evaluations", "3",
        "--report", report_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "health: SERVING"
    assert lines[1].startswith("inspect: 3 prunable layers, 25856 of 26122 parameters prunable")
    progress = [line for line in lines if line.startswith("progress: ")]
    assert "baseline" in progress[0] and "done" in progress[-1]
    assert sum(" candidate: " in line for line in progress) == 3
    assert lines[-1].startswith("result: pruned at sparsity ") and str(out) in lines[-1]

    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    x = np.load(MLP_EVAL)["input"][:32]
    (logits,) = ort.InferenceSession(out, providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert logits.shape == (32, 10) and np.isfinite(logits).all()

    report_json = report_path.read_text()
    validate(report_json)
    report = pruner.Report.from_json(report_json)
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer]
    assert sum(int(np.count_nonzero(w)) for w in weights if w.ndim == 2) == report.nonzero_after < 25856
    assert report.evaluations == 3


def test_a_truncated_model_is_invalid_argument_naming_the_problem(
    start_server: Start, node: str, tmp_path: Path
) -> None:
    address = start_server()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(MLP.read_bytes()[:3000])
    done = run_client(node, truncated, MLP_EVAL, tmp_path / "out.onnx", "--address", address)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: INVALID_ARGUMENT: ")
    assert "not an ONNX model or is truncated" in done.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_an_eval_set_for_another_model_is_invalid_argument_naming_the_input(
    start_server: Start, node: str, tmp_path: Path
) -> None:
    address = start_server()
    evalset = tmp_path / "eval.npz"
    np.savez(evalset, image=np.zeros((8, 64), np.float32), labels=np.zeros(8, np.int64))  # the input is 'input'
    done = run_client(node, MLP, evalset, tmp_path / "out.onnx", "--address", address)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: INVALID_ARGUMENT: ")
    assert "'input'" in done.stderr, done.stderr


def test_a_wrong_token_is_unauthenticated(start_server: Start, node: str, tmp_path: Path) -> None:
    address = start_server(token=TOKEN)
    done = run_client(node, MLP, MLP_EVAL, tmp_path / "out.onnx", "--address", address, "--token", "not-the-token")
    assert done.stdout.splitlines() == ["health: SERVING"]  # health checks need no token
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: UNAUTHENTICATED: missing or wrong bearer token")
    assert not (tmp_path / "out.onnx").exists()


# -- what a client written from protos/ relies on


def compiled(relative: str) -> descriptor_pb2.FileDescriptorProto:
    """``protos/<relative>`` compiled by protoc, as a descriptor without source info."""
    include = Path(protoc.__file__).parent / "_proto"
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"onnx-pruner-{os.getpid()}-descriptor.binpb"
    code = protoc.main(["grpc_tools.protoc", f"-I{PROTOS}", f"-I{include}", f"--descriptor_set_out={out}", relative])
    assert code == 0, relative
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    out.unlink()
    return files.file[0]


def shape_of(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """The messages, enums and services of ``file``: what goes on the wire, without its name and options."""
    shape = descriptor_pb2.FileDescriptorProto(
        package=file.package, message_type=file.message_type, enum_type=file.enum_type, service=file.service
    )
    messages = list(shape.message_type)
    while messages:  # protoc writes each field's default JSON name, the runtime's descriptors do not
        message = messages.pop()
        for field in message.field:
            field.ClearField("json_name")
        messages += message.nested_type
    return shape


@pytest.mark.parametrize(
    ("shipped", "served"),
    [
        ("grpc/health/v1/health.proto", health_pb2.DESCRIPTOR),
        ("google/rpc/status.proto", status_pb2.DESCRIPTOR),
        ("google/rpc/error_details.proto", error_details_pb2.DESCRIPTOR),
    ],
)
def test_the_shipped_protos_are_the_ones_the_server_uses(shipped: str, served: object) -> None:
    expected = descriptor_pb2.FileDescriptorProto()
    served.CopyToProto(expected)  # type: ignore[attr-defined]
    assert shape_of(compiled(shipped)) == shape_of(expected)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        np.arange(-3, 3, dtype=np.int64).reshape(2, 3),
        np.array([[True, False]]),
        np.arange(4, dtype=np.float16).reshape(4, 1),
        np.arange(6, dtype=np.float64).reshape(3, 2) / 3,
    ],
    ids=["float32", "int64", "bool", "float16", "float64"],
)
def test_the_tensor_message_is_an_onnx_tensor_proto_on_the_wire(array: np.ndarray) -> None:
    # raw data, as numpy_helper writes it, and typed fields, as make_tensor writes them
    raw = numpy_helper.from_array(array, "x")
    typed = onnx.helper.make_tensor(
        "x", onnx.helper.np_dtype_to_tensor_dtype(array.dtype), array.shape, array.flatten().tolist()
    )
    for tensor in (raw, typed):
        ours = pb.Tensor.FromString(tensor.SerializeToString())
        assert len(UnknownFieldSet(ours)) == 0  # every field onnx wrote is one of ours
        assert (ours.name, list(ours.dims), ours.data_type) == ("x", list(array.shape), tensor.data_type)
        back = onnx.TensorProto.FromString(ours.SerializeToString())
        np.testing.assert_array_equal(numpy_helper.to_array(back), array)


def npz_bytes(path: Path) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **dict(np.load(path)))
    return buffer.getvalue()


def test_model_and_eval_messages_may_interleave(start_server: Start) -> None:
    address = start_server()
    model, evalset = MLP.read_bytes(), npz_bytes(MLP_EVAL)
    config = pb.PruneRequest(config=convert.options_to_proto(QUICK))
    halves = len(model) // 2, len(evalset) // 2
    as_npz = [
        config,
        pb.PruneRequest(eval_npz_chunk=evalset[: halves[1]]),
        pb.PruneRequest(model_chunk=model[: halves[0]]),
        pb.PruneRequest(eval_npz_chunk=evalset[halves[1] :]),
        pb.PruneRequest(model_chunk=model[halves[0] :]),
    ]
    # a model chunk between a tensor's header and its data does not end the tensor
    tensors = tensor_requests(dict(np.load(MLP_EVAL)), inline=False)
    as_tensors = [config, tensors[0], pb.PruneRequest(model_chunk=model[: halves[0]]), *tensors[1:]]
    as_tensors.append(pb.PruneRequest(model_chunk=model[halves[0] :]))
    expected = pruner.prune(MLP, MLP_EVAL, QUICK).report.nonzero_after
    for requests in (as_npz, as_tensors):
        results = [r.result for r in call_prune(address, requests) if r.WhichOneof("payload") == "result"]
        assert pruner.Report.from_json(results[0].report_json).nonzero_after == expected


def test_the_node_client_passes_search_width(start_server: Start, node: str, tmp_path: Path) -> None:
    address = start_server()
    done = run_client(node, MLP, MLP_EVAL, tmp_path / "out.onnx", "--address", address, "--search-width", "17")
    assert done.returncode == 2 and "--search-width must be an integer in [1, 16], got 17" in done.stderr
    report_path = tmp_path / "report.json"
    done = run_client(
        node, MLP, MLP_EVAL, tmp_path / "out.onnx", "--address", address, "--max-evaluations", "4",
        "--search-width", "2", "--report", report_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = pruner.Report.from_json(report_path.read_text())
    assert report.options["search_width"] == 2  # type: ignore[index]


# -- clients/node/job.js: the durable job API (docs/jobs.md)


@pytest.fixture(scope="module")
def jobs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[jobs.JobServer]:
    """One ``python -m service`` with a job store for this module's job tests (its plugins: the slow metrics)."""
    folder = tmp_path_factory.mktemp("node-jobs")
    server = jobs.JobServer(folder / "artifacts", pythonpath=(jobs.slow_plugins(folder / "plugins"),))
    yield server.start()
    server.stop()


def run_job(node: str, address: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    command, *rest = args
    return run_client(node, command, *rest, "--address", address, script="job.js")


def event_indices(stdout: str) -> list[int]:
    return [
        int(line.split(":", 1)[0].removeprefix("event ")) for line in stdout.splitlines() if line.startswith("event ")
    ]


class Finished:
    """A job the Node client submitted and watched to its end."""

    def __init__(
        self, job_id: str, submitted: subprocess.CompletedProcess[str], watched: subprocess.CompletedProcess[str]
    ):
        self.job_id, self.submitted, self.watched = job_id, submitted, watched


@pytest.fixture(scope="module")
def finished(jobs_server: jobs.JobServer, node: str) -> Finished:
    submitted = run_job(
        node, jobs_server.address, "submit", MLP, MLP_EVAL, "--max-evaluations", "3", "--idempotency-key", "node-1"
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    watched = run_job(node, jobs_server.address, "watch", job_id)
    return Finished(job_id, submitted, watched)


def test_node_submit_watch_fetch_gives_the_python_clients_model_and_a_report(
    jobs_server: jobs.JobServer, node: str, finished: Finished, tmp_path: Path
) -> None:
    assert len(finished.job_id) == 32 and finished.submitted.stderr == ""
    watched = finished.watched
    assert watched.returncode == 0, watched.stderr
    lines = watched.stdout.splitlines()
    indices = event_indices(watched.stdout)
    assert indices == list(range(len(indices))) and len(indices) >= 5  # every event, in order
    assert lines[0].startswith("event 0: [0/0] baseline: ") and lines[-2].startswith(
        f"event {indices[-1]}: [3/3] done: "
    )
    assert sum(" candidate: " in line for line in lines) == 3
    assert lines[-1].startswith(f"job {finished.job_id}: succeeded, pruned at sparsity ")

    out, report_path = tmp_path / "pruned.onnx", tmp_path / "report.json"
    fetched = run_job(node, jobs_server.address, "fetch", finished.job_id, out, "--report", report_path)
    assert fetched.returncode == 0, fetched.stderr
    data = out.read_bytes()
    with Connection(jobs_server.address) as connection:
        theirs = bytearray()
        size, sha256 = connection.fetch(finished.job_id, theirs)
        job = connection.get_job(finished.job_id)
    assert data == bytes(theirs) and hashlib.sha256(data).hexdigest() == sha256 == job.result_sha256
    assert fetched.stdout.strip() == f"{out}: {size} bytes, sha256 {sha256}"
    assert not out.with_name(out.name + ".part").exists()
    jobs.check_result(data, job)
    validate(report_path.read_text())
    report = pruner.Report.from_json(report_path.read_text())
    assert report.status == "pruned" and report.evaluations == 3 and report_path.read_text() == job.report_json

    status = run_job(node, jobs_server.address, "status", finished.job_id)
    assert status.returncode == 0
    assert "state            succeeded" in status.stdout and "idempotency key  node-1" in status.stdout
    listed = run_job(node, jobs_server.address, "list", "--state", "succeeded")
    assert listed.returncode == 0 and any(
        line.startswith(f"{finished.job_id}  succeeded") for line in listed.stdout.splitlines()
    )


def test_a_node_resubmit_with_the_same_idempotency_key_returns_the_same_job(
    jobs_server: jobs.JobServer, node: str, finished: Finished
) -> None:
    again = run_job(
        node, jobs_server.address, "submit", MLP, MLP_EVAL, "--max-evaluations", "3", "--idempotency-key", "node-1"
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == finished.job_id
    assert f"the idempotency key names job {finished.job_id}, submitted before" in again.stderr
    with Connection(jobs_server.address) as connection:
        job = connection.get_job(finished.job_id)
        keyed = [j for j in connection.list_jobs() if j.idempotency_key == "node-1"]
    assert job.attempts == 1 and len(keyed) == 1  # it ran once


def test_a_node_submit_cut_off_midway_is_sent_again_with_its_key_and_stored_once(
    jobs_server: jobs.JobServer, node: str
) -> None:
    with Connection(jobs_server.address) as connection:
        before = {j.job_id for j in connection.list_jobs()}
    proxy = jobs.CuttingProxy(jobs_server.address, cut_after=MLP.stat().st_size // 2)
    try:
        submitted = run_job(node, proxy.address, "submit", MLP, MLP_EVAL, "--max-evaluations", "3")
    finally:
        proxy.close()
    assert submitted.returncode == 0, submitted.stderr
    assert proxy.connections >= 2 and "submit: connection lost (UNAVAILABLE" in submitted.stderr
    assert "submitted before" not in submitted.stderr
    with Connection(jobs_server.address) as connection:
        new = [j for j in connection.list_jobs() if j.job_id not in before]
    assert [j.job_id for j in new] == [submitted.stdout.strip()] and new[0].idempotency_key


def test_node_watch_from_n_starts_at_event_n(jobs_server: jobs.JobServer, node: str, finished: Finished) -> None:
    later = run_job(node, jobs_server.address, "watch", finished.job_id, "--from", "3")
    assert later.returncode == 0, later.stderr
    assert later.stdout.splitlines() == finished.watched.stdout.splitlines()[3:]
    assert later.stdout.startswith("event 3: ")


def test_node_fetch_checks_the_sha256_and_never_overwrites(
    jobs_server: jobs.JobServer, node: str, finished: Finished, tmp_path: Path
) -> None:
    address = jobs_server.address
    with Connection(address) as connection:
        data = bytearray()
        connection.fetch(finished.job_id, data)
    out = tmp_path / "pruned.onnx"
    out.write_bytes(b"mine")
    refused = run_job(node, address, "fetch", finished.job_id, out)
    assert refused.returncode == 2
    assert refused.stderr == f"error: {out} exists; pass --force to replace it\n"
    assert out.read_bytes() == b"mine"
    forced = run_job(node, address, "fetch", finished.job_id, out, "--force")
    assert forced.returncode == 0, forced.stderr
    assert out.read_bytes() == data

    # a part downloaded earlier is resumed from its size: a good one gives the model, a bad one is caught
    part = tmp_path / "resumed.onnx.part"
    part.write_bytes(data[:40_000])
    resumed = run_job(node, address, "fetch", finished.job_id, tmp_path / "resumed.onnx")
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "resumed.onnx").read_bytes() == data and not part.exists()
    bad = tmp_path / "bad.onnx"
    bad.with_name("bad.onnx.part").write_bytes(b"\0" * 40_000)
    mismatch = run_job(node, address, "fetch", finished.job_id, bad)
    assert mismatch.returncode == 1
    assert f"the downloaded result of job {finished.job_id} ({len(data)} bytes, sha256 " in mismatch.stderr
    assert "does not match the server's" in mismatch.stderr
    assert not bad.exists() and not bad.with_name("bad.onnx.part").exists()


def test_a_node_job_of_a_truncated_model_fails_with_exit_2_naming_the_problem(
    jobs_server: jobs.JobServer, node: str, tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(MLP.read_bytes()[:3000])
    # the server stores the model as it is (it checks the config and the eval set at submit): the job fails
    submitted = run_job(node, jobs_server.address, "submit", truncated, MLP_EVAL, "--max-evaluations", "3")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    watched = run_job(node, jobs_server.address, "watch", job_id)
    assert watched.returncode == 2, watched.stderr
    assert watched.stderr.startswith(f"error: job {job_id} failed: INVALID_ARGUMENT: InvalidModelError: ")
    assert "not an ONNX model or is truncated" in watched.stderr
    fetched = run_job(node, jobs_server.address, "fetch", job_id, tmp_path / "out.onnx")
    assert fetched.returncode == 2
    assert f"error: the job {job_id} is failed, not succeeded (InvalidModelError: " in fetched.stderr
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "out.onnx.part").exists()
    unknown = run_job(node, jobs_server.address, "status", "0" * 32)
    assert unknown.returncode == 2
    assert unknown.stderr.startswith(f"error: NOT_FOUND: no job has the id '{'0' * 32}'")
    bad_option = run_job(node, jobs_server.address, "submit", MLP, MLP_EVAL, "--max-evaluations", "0")
    assert bad_option.returncode == 2
    assert bad_option.stderr.startswith("error: --max-evaluations must be a positive integer, got 0")


def test_node_cancel_of_a_running_job_ends_it_cancelled(jobs_server: jobs.JobServer, node: str) -> None:
    with Connection(jobs_server.address) as connection:
        job_id, _ = connection.submit(MLP, MLP_EVAL, jobs.SLOWISH)
        assert jobs.wait_until(jobs.running_with_events(connection, job_id, 1))
    cancelled = run_job(node, jobs_server.address, "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"job       {job_id}" in cancelled.stdout
    assert "cancel    requested" in cancelled.stdout or "state     cancelled" in cancelled.stdout
    watched = run_job(node, jobs_server.address, "watch", job_id)
    assert watched.returncode == 130, watched.stderr
    assert watched.stderr.startswith(f"error: job {job_id} was cancelled: ")
    status = run_job(node, jobs_server.address, "status", job_id, "--json")
    job = json.loads(status.stdout)
    assert (job["state"], job["error_code"]) == ("JOB_STATE_CANCELLED", "CancelledError")


def test_node_watch_goes_on_from_where_it_was_across_a_server_restart(
    job_server: Callable[..., jobs.JobServer], node: str
) -> None:
    server = job_server()
    with Connection(server.address) as connection:
        job_id, _ = connection.submit(MLP, MLP_EVAL, jobs.SLOWISH)
    watch = subprocess.Popen(
        # retries enough for a server that takes its time to start on a loaded machine (~90 s of backoff)
        [node, str(CLIENT / "job.js"), "watch", job_id, "--address", server.address, "--retries", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with Connection(server.address) as connection:
            assert jobs.wait_until(jobs.running_with_events(connection, job_id))
        server.kill()
        time.sleep(1.0)  # the watch sees the server gone and backs off
        server.start()
        stdout, stderr = watch.communicate(timeout=300)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(30)
    assert watch.returncode == 0, stderr
    assert "watch: connection lost (UNAVAILABLE: " in stderr and "; reconnecting from event " in stderr
    with Connection(server.address) as connection:
        job = connection.get_job(job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.attempts == 2  # re-run from the start after the kill
    indices = event_indices(stdout)
    assert indices == list(range(job.events))  # no event missed, none twice
    assert sum(" baseline: " in line for line in stdout.splitlines()) == 2
    assert stdout.splitlines()[-1].startswith(f"job {job_id}: succeeded, ")
