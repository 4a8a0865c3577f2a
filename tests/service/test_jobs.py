"""Durable jobs on a real server subprocess with a SQLite job store: submit, watch, download,
restarts (SIGKILL), idempotency, crashing and over-limit jobs, and the CLI."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import pruner
from service import convert, errors
from service._gen.onnxpruner.v1 import pruner_pb2 as pb
from service._gen.onnxpruner.v1 import pruner_pb2_grpc as pb_grpc
from service.client import Connection, raise_for_job
from tests.helpers import REPO_ROOT, run_cli, status_mib

FIXTURES = REPO_ROOT / "tests" / "fixtures"
MLP = FIXTURES / "mlp.onnx"
MLP_EVAL = FIXTURES / "mlp_eval.npz"
QUICK = pruner.PruneOptions(max_evaluations=3)
SLOWISH = pruner.PruneOptions(max_evaluations=8, batch_size=1, metric=convert.server_metric("slowish"))
"""At least 4 s of work however fast the machine (the plugin metric "slowish" sleeps 50 ms for each of
its ~80 calls): long enough to be interrupted after its first events."""


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def wait_until(condition: Callable[[], bool], seconds: float = 120.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


class JobServer:
    """``python -m service`` with a job store in ``artifacts``; restartable on the same address."""

    def __init__(self, artifacts: Path, *args: str, pythonpath: tuple[Path, ...] = ()) -> None:
        self.address = free_address()
        self.artifacts = artifacts
        self.args = args
        environment = {k: v for k, v in os.environ.items() if not k.startswith("ONNX_PRUNER_")}
        path = os.pathsep.join(str(p) for p in (REPO_ROOT, *pythonpath))
        self.env = {**environment, "PYTHONPATH": path}
        self.process: subprocess.Popen[bytes] | None = None
        self.log = artifacts.parent / f"server-{self.address.rsplit(':', 1)[1]}.log"

    def start(self) -> JobServer:
        command = [sys.executable, "-m", "service", "--address", self.address, "--artifacts", str(self.artifacts)]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*command, "--replica-id", "replica-1", "--job-workers", "1", *self.args],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        process = self.process
        assert wait_until(lambda: serving(self.address) or process.poll() is not None), "the server did not start"
        assert process.poll() is None, f"the server exited: {self.log.read_text()[-2000:]}"
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)


@pytest.fixture
def job_server(tmp_path: Path) -> Iterator[Callable[..., JobServer]]:
    servers: list[JobServer] = []

    plugins = slow_plugins(tmp_path / "slow-plugins")

    def make(*args: str, pythonpath: tuple[Path, ...] = ()) -> JobServer:
        server = JobServer(tmp_path / f"artifacts-{len(servers)}", *args, pythonpath=(plugins, *pythonpath))
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


def worker_pids(job_id: str) -> list[int]:
    """The worker processes running ``job_id`` (read from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"service.jobs.worker" in command and job_id.encode() in command:
            pids.append(int(entry.name))
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def running_with_events(connection: Connection, job_id: str, events: int = 2) -> Callable[[], bool]:
    def check() -> bool:
        job = connection.get_job(job_id)
        assert job.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING), job
        return job.state == pb.JOB_STATE_RUNNING and job.events >= events

    return check


def download(connection: Connection, job_id: str, offset: int = 0) -> bytes:
    return b"".join(chunk for chunk, _, _ in connection.download(job_id, offset))


def check_result(data: bytes, job: pb.Job) -> None:
    """The model is whole (its digest and size are the job's), passes the full check and runs."""
    assert hashlib.sha256(data).hexdigest() == job.result_sha256
    assert len(data) == job.result_size
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    inputs = np.load(MLP_EVAL)["input"][:8]
    (out,) = session.run(None, {session.get_inputs()[0].name: inputs})
    assert out.shape[0] == 8


def test_submit_disconnect_reconnect_watch_from_the_last_event_and_download(
    job_server: Callable[..., JobServer],
) -> None:
    server = job_server()
    with Connection(server.address) as connection:
        job_id, created = connection.submit(MLP, MLP_EVAL, SLOWISH)
    assert created and len(job_id) == 32
    # the first connection sees two events and goes away mid-job
    channel = grpc.insecure_channel(server.address)
    call = pb_grpc.PrunerServiceStub(channel).WatchJob(pb.WatchJobRequest(job_id=job_id))  # type: ignore[no-untyped-call]
    seen = []
    for response in call:
        seen.append(response.event.index)
        if len(seen) == 2:
            break
    call.cancel()
    channel.close()
    assert seen == [0, 1]
    with Connection(server.address) as connection:
        assert connection.get_job(job_id).state in (pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED)
        updates = list(connection.watch(job_id, seen[-1] + 1))
        final = updates[-1]
        assert isinstance(final, pb.Job)
        indices = [update[0] for update in updates[:-1] if isinstance(update, tuple)]
        events = [update[1] for update in updates[:-1] if isinstance(update, tuple)]
        assert indices == list(range(2, 2 + len(indices)))  # no gap, no repeat
        assert final.state == pb.JOB_STATE_SUCCEEDED and final.events == indices[-1] + 1
        assert events[-1].kind is pruner.EventKind.DONE
        data = download(connection, job_id)
        # a download resumed from an offset continues the same bytes
        assert data[:50_000] + download(connection, job_id, 50_000) == data
        status = connection.get_job(job_id)
    assert status.result_sha256 == final.result_sha256 and status.status == "pruned"
    check_result(data, status)
    report = pruner.Report.from_json(status.report_json)
    assert report.evaluations == len(report.trace) > 0 and report.metric == "slowish"


def test_a_duplicate_submit_with_the_same_idempotency_key_runs_once(job_server: Callable[..., JobServer]) -> None:
    server = job_server()
    with Connection(server.address) as connection:
        first, created = connection.submit(MLP, MLP_EVAL, QUICK, idempotency_key="build-42")
        again, created_again = connection.submit(MLP, MLP_EVAL, QUICK, idempotency_key="build-42")
        assert created and not created_again and again == first
        final = connection.follow(first)
        late, created_late = connection.submit(MLP, MLP_EVAL, QUICK, idempotency_key="build-42")
        jobs = connection.list_jobs()
        kinds = [update[1].kind for update in connection.watch(first) if isinstance(update, tuple)]
    assert (late, created_late) == (first, False)  # a finished job is not run again either
    assert final.state == pb.JOB_STATE_SUCCEEDED and final.attempts == 1
    assert [job.job_id for job in jobs] == [first]
    assert kinds.count(pruner.EventKind.BASELINE) == 1 and kinds.count(pruner.EventKind.DONE) == 1


class CuttingProxy:
    """A TCP proxy to ``target`` on a loopback port that cuts its first connection once the client
    has sent ``cut_after`` bytes (an upload dropped midway, as by a proxy or a restart); the
    connections after it pass whole."""

    def __init__(self, target: str, cut_after: int) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.cut_after = cut_after
        self.connections = 0
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.connections += 1
            server = socket.create_connection(self.target)
            limit = self.cut_after if self.connections == 1 else None
            threading.Thread(target=self._pump, args=(client, server, limit), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, None), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := source.recv(16384):
                if limit is not None and sent + len(data) > limit:
                    break
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for sock in (source, sink):  # one side gone, or the cut: the connection ends both ways
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.listener.close()


def test_a_submit_cut_off_midway_is_sent_again_with_its_key_and_stored_once(
    job_server: Callable[..., JobServer],
) -> None:
    server = job_server()
    proxy = CuttingProxy(server.address, cut_after=MLP.stat().st_size // 2)
    try:
        submitted = run_cli("submit", MLP, "--eval-set", MLP_EVAL, "--max-evaluations", "3", "--server", proxy.address)
    finally:
        proxy.close()
    assert submitted.returncode == 0, submitted.stderr
    assert proxy.connections >= 2  # the first was cut, the retry came on a new one
    assert "submitted before" not in submitted.stderr and "Traceback" not in submitted.stderr
    job_id = submitted.stdout.strip()
    with Connection(server.address) as connection:
        jobs = connection.list_jobs()
        final = connection.follow(job_id)
    assert [job.job_id for job in jobs] == [job_id]
    assert jobs[0].idempotency_key  # the CLI's own key: a retry cannot store a second job
    assert final.state == pb.JOB_STATE_SUCCEEDED


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_submit_checks_a_large_eval_set_without_holding_its_arrays(
    job_server: Callable[..., JobServer], tmp_path: Path
) -> None:
    server = job_server()
    assert server.process is not None
    rows = 256 * 2**20 // (64 * 4)  # 256 MiB of float32 decoded, a few hundred KiB compressed
    evalset = tmp_path / "large.npz"
    np.savez_compressed(evalset, input=np.zeros((rows, 64), np.float32), labels=np.zeros(rows, np.int64))
    with Connection(server.address) as connection:
        warm, _ = connection.submit(MLP, MLP_EVAL, QUICK)  # the submit path's code and buffers
        connection.follow(warm)
        before = status_mib(server.process.pid, "VmHWM")
        job_id, created = connection.submit(MLP, evalset, QUICK)
        after = status_mib(server.process.pid, "VmHWM")
        connection.cancel_job(job_id)
        final = connection.follow(job_id)
    assert created and final.state in (pb.JOB_STATE_CANCELLED, pb.JOB_STATE_SUCCEEDED)
    # decoding it would take the server's peak up by the arrays' 258 MiB
    assert after - before < 64, f"the server's peak RSS rose from {before:.0f} to {after:.0f} MiB"


def test_sigkill_of_the_server_mid_job_reruns_it_after_a_restart_and_keeps_finished_results(
    job_server: Callable[..., JobServer],
) -> None:
    server = job_server()
    with Connection(server.address) as connection:
        done, _ = connection.submit(MLP, MLP_EVAL, QUICK)
        finished = connection.follow(done)
        assert finished.state == pb.JOB_STATE_SUCCEEDED
        job_id, _ = connection.submit(MLP, MLP_EVAL, SLOWISH)
        assert wait_until(running_with_events(connection, job_id))
    workers = worker_pids(job_id)
    assert len(workers) == 1
    server.kill()
    # the job's process dies with its server: nothing finishes the job twice
    assert wait_until(lambda: not alive(workers[0]), 30)
    server.start()
    with Connection(server.address) as connection:
        final = connection.follow(job_id)
        kinds = [update[1].kind for update in connection.watch(job_id) if isinstance(update, tuple)]
        data = download(connection, job_id)
        kept = download(connection, done)
        assert connection.get_job(done).result_sha256 == finished.result_sha256
    assert final.state == pb.JOB_STATE_SUCCEEDED, final
    assert final.attempts == 2  # re-run from the start
    assert kinds.count(pruner.EventKind.BASELINE) == 2 and kinds[-1] is pruner.EventKind.DONE
    check_result(data, final)
    check_result(kept, finished)


def metric_plugin(site: Path, name: str, body: str) -> Path:
    """A metric plugin ``name`` (an entry point of onnx_pruner.metrics) whose function runs ``body``."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{name}_metric.py").write_text(
        "import ctypes, time\n"
        "from pruner import CustomMetric\n\n"
        "def _fn(outputs, labels, reference):\n"
        f"    {body}\n\n"
        f"{name} = CustomMetric(name='{name}', fn=_fn, best=1.0)\n"
    )
    info = site / f"{name}_metric-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-metric\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[onnx_pruner.metrics]\n{name} = {name}_metric:{name}\n")
    return site


def slow_plugins(site: Path) -> Path:
    """Metrics that take their time, so that a job outlasts a grace, a limit or a race on any machine:
    "slowish" 50 ms a call (SLOWISH), "sleepy" 1 s a call (SLEEPY)."""
    metric_plugin(site, "slowish", "time.sleep(0.05); return [1.0] * len(labels)")
    return metric_plugin(site, "sleepy", "time.sleep(1.0); return [1.0] * len(labels)")


SLEEPY = pruner.PruneOptions(max_evaluations=20, metric=convert.server_metric("sleepy"))


def segfault_plugin(site: Path) -> Path:
    """A metric that dereferences NULL."""
    return metric_plugin(site, "crash", "ctypes.string_at(0)")


def test_a_segfaulting_job_fails_cleanly_and_the_server_runs_the_next_one(
    job_server: Callable[..., JobServer], tmp_path: Path
) -> None:
    server = job_server(pythonpath=(segfault_plugin(tmp_path / "site"),))
    crashing = pruner.PruneOptions(max_evaluations=3, metric=convert.server_metric("crash"))
    with Connection(server.address) as connection:
        job_id, _ = connection.submit(MLP, MLP_EVAL, crashing)
        crashed = connection.follow(job_id)
        assert serving(server.address)
        next_id, _ = connection.submit(MLP, MLP_EVAL, QUICK)
        after = connection.follow(next_id)
    assert crashed.state == pb.JOB_STATE_FAILED
    assert crashed.error_code == "JobCrashedError"
    assert crashed.error_message == "the job's process died of SIGSEGV"
    assert crashed.error_status == grpc.StatusCode.INTERNAL.value[0]
    with pytest.raises(errors.JobCrashedError, match="SIGSEGV"):
        raise_for_job(crashed)
    assert after.state == pb.JOB_STATE_SUCCEEDED
    assert server.process is not None and server.process.poll() is None


def test_a_job_of_a_truncated_model_fails_naming_the_submitted_model_not_a_server_path(
    job_server: Callable[..., JobServer], tmp_path: Path
) -> None:
    server = job_server()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(MLP.read_bytes()[:1000])
    with Connection(server.address) as connection:
        job_id, _ = connection.submit(truncated, MLP_EVAL, QUICK)
        failed = connection.follow(job_id)
    assert failed.state == pb.JOB_STATE_FAILED
    assert failed.error_code == "InvalidModelError"
    assert failed.error_status == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "the submitted model" in failed.error_message
    assert "blobs" not in failed.error_message and str(tmp_path) not in failed.error_message
    with pytest.raises(pruner.InvalidModelError) as raised:
        raise_for_job(failed)
    assert errors.exit_code(raised.value) == errors.Exit.BAD_INPUT


def zeros_npz(samples: int) -> bytes:
    """An eval set of ``samples`` x 64 float32 zeros: about 256 bytes a sample decoded, almost nothing zipped."""
    buffer = io.BytesIO()
    inputs = np.zeros((samples, 64), np.float32)
    np.savez_compressed(buffer, input=inputs, labels=np.zeros(samples, np.int64))
    return buffer.getvalue()


def test_a_job_over_its_memory_limit_fails_cleanly_and_the_server_runs_the_next_one(
    job_server: Callable[..., JobServer], tmp_path: Path
) -> None:
    limit = 400 << 20
    server = job_server("--job-memory-limit", str(limit))
    big = tmp_path / "big.npz"
    big.write_bytes(zeros_npz(1_500_000))  # 384 MB of inputs decoded, beside the ~240 MB the process maps
    with Connection(server.address) as connection:
        job_id, _ = connection.submit(MLP, big, QUICK)
        over = connection.follow(job_id)
        assert serving(server.address)
        next_id, _ = connection.submit(MLP, MLP_EVAL, QUICK)
        after = connection.follow(next_id)
    assert over.state == pb.JOB_STATE_FAILED
    assert over.error_code == "JobMemoryLimitError"
    assert "the job exceeded its memory limit of 400 MiB" in over.error_message
    assert over.error_status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    with pytest.raises(errors.JobMemoryLimitError) as raised:
        raise_for_job(over)
    assert errors.exit_code(raised.value) == errors.Exit.BAD_INPUT
    assert after.state == pb.JOB_STATE_SUCCEEDED


def test_the_job_rpcs_name_unknown_jobs_and_unfinished_results(
    job_server: Callable[..., JobServer], tmp_path: Path
) -> None:
    server = job_server()
    with Connection(server.address) as connection:
        with pytest.raises(errors.JobNotFoundError, match="no job has the id 'f00'"):
            connection.get_job("f00")
        with pytest.raises(errors.JobNotFoundError, match="no job has the id"):
            connection.cancel_job("f00")
        job_id, _ = connection.submit(MLP, MLP_EVAL, SLEEPY)
        with pytest.raises(errors.JobStateError, match="not succeeded"):
            download(connection, job_id)
        cancelled = connection.cancel_job(job_id)
        assert cancelled.state == pb.JOB_STATE_CANCELLED or cancelled.cancel_requested
        final = connection.follow(job_id)
    assert final.state == pb.JOB_STATE_CANCELLED and final.error_code == "CancelledError"
    assert worker_pids(job_id) == []


def test_the_cli_submits_watches_reports_fetches_and_cancels(
    job_server: Callable[..., JobServer], tmp_path: Path
) -> None:
    server = job_server()
    remote = ("--server", server.address)
    submitted = run_cli("submit", MLP, "--eval-set", MLP_EVAL, "--max-evaluations", "3", *remote)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    watched = run_cli("watch", job_id, *remote)
    assert watched.returncode == 0, watched.stderr
    assert "status" in watched.stdout and "pruned" in watched.stdout
    assert "baseline" in watched.stderr
    status = run_cli("status", job_id, "--json", *remote)
    assert status.returncode == 0
    job = json.loads(status.stdout)
    assert job["state"] == "JOB_STATE_SUCCEEDED" and job["job_id"] == job_id
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    fetched = run_cli("fetch", job_id, "-o", out, "--report", report, *remote)
    assert fetched.returncode == 0, fetched.stderr
    data = out.read_bytes()
    assert hashlib.sha256(data).hexdigest() == job["result_sha256"]
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    assert json.loads(report.read_text())["status"] == "pruned"
    # a partial download resumes from the part file's size
    resumed = tmp_path / "resumed.onnx"
    (tmp_path / "resumed.onnx.part").write_bytes(data[:40_000])
    assert run_cli("fetch", job_id, "-o", resumed, *remote).returncode == 0
    assert resumed.read_bytes() == data and not (tmp_path / "resumed.onnx.part").exists()

    # one second a metric call: the job cannot end before the cancel lands, on any machine
    slow = run_cli("submit", MLP, "--eval", MLP_EVAL, "--max-evaluations", "20", "--metric-plugin", "sleepy", *remote)
    slow_id = slow.stdout.strip()
    cancelled = run_cli("cancel", slow_id, *remote)
    assert cancelled.returncode == 0 and slow_id in cancelled.stdout
    after = run_cli("watch", slow_id, "--quiet", *remote)
    assert after.returncode == errors.Exit.INTERRUPTED
    assert "the job was cancelled" in after.stderr
    refused = run_cli("fetch", slow_id, "-o", tmp_path / "none.onnx", *remote)
    assert refused.returncode == errors.Exit.BAD_INPUT
    assert "cancelled, not succeeded" in refused.stderr and "Traceback" not in refused.stderr
    unknown = run_cli("status", "0" * 32, *remote)
    assert unknown.returncode == errors.Exit.BAD_INPUT
    assert f"no job has the id '{'0' * 32}'" in unknown.stderr and "Traceback" not in unknown.stderr


def test_prune_on_a_server_survives_a_server_restart_mid_job(
    job_server: Callable[..., JobServer], tmp_path: Path
) -> None:
    server = job_server()
    out = tmp_path / "pruned.onnx"
    command = [sys.executable, "-m", "service.cli", "prune", str(MLP), "--eval", str(MLP_EVAL), "-o", str(out)]
    command += ["--max-evaluations", "8", "--batch-size", "1", "--metric-plugin", "slowish"]
    cli = subprocess.Popen(
        [*command, "--server", server.address],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with Connection(server.address) as connection:
            assert wait_until(lambda: bool(connection.list_jobs()))
            job_id = connection.list_jobs()[0].job_id
            assert wait_until(running_with_events(connection, job_id))
        server.kill()
        time.sleep(1.0)  # the client sees the server gone and backs off
        server.start()
        stdout, stderr = cli.communicate(timeout=300)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(30)
    assert cli.returncode == 0, stderr
    assert "status" in stdout
    with Connection(server.address) as connection:
        job = connection.get_job(job_id)
    assert job.attempts == 2 and job.state == pb.JOB_STATE_SUCCEEDED
    check_result(out.read_bytes(), job)


def test_sigterm_requeues_a_job_still_running_after_the_grace_and_the_next_start_runs_it(
    job_server: Callable[..., JobServer],
) -> None:
    server = job_server("--grace", "1")
    with Connection(server.address) as connection:
        job_id, _ = connection.submit(MLP, MLP_EVAL, SLOWISH)
        assert wait_until(running_with_events(connection, job_id))
    workers = worker_pids(job_id)
    server.stop()
    assert server.process is not None and server.process.returncode == 0
    assert all(not alive(pid) for pid in workers)
    server.start()
    with Connection(server.address) as connection:
        final = connection.follow(job_id)
    assert final.state == pb.JOB_STATE_SUCCEEDED and final.attempts == 2
    assert "job-requeued" in server.log.read_text()


def test_a_job_past_the_time_limit_fails_naming_it(job_server: Callable[..., JobServer], tmp_path: Path) -> None:
    server = job_server("--job-time-limit", "3")
    with Connection(server.address) as connection:
        job_id, _ = connection.submit(MLP, MLP_EVAL, SLEEPY)
        final = connection.follow(job_id)
    assert final.state == pb.JOB_STATE_FAILED and final.error_code == "TimeLimitError"
    assert "time limit of 3 s (job_time_limit)" in final.error_message
    with pytest.raises(errors.TimeLimitError):
        raise_for_job(final)


def test_retention_removes_finished_jobs_past_their_ttl_at_the_next_start(
    job_server: Callable[..., JobServer],
) -> None:
    server = job_server()
    with Connection(server.address) as connection:
        job_id, _ = connection.submit(MLP, MLP_EVAL, QUICK)
        assert connection.follow(job_id).state == pb.JOB_STATE_SUCCEEDED
    server.stop()
    time.sleep(2.0)
    server.args = ("--retention-ttl", "1")
    server.start()
    with Connection(server.address) as connection:
        assert wait_until(lambda: not connection.list_jobs(), 30)
        with pytest.raises(errors.JobNotFoundError, match="no job has the id"):
            connection.get_job(job_id)
