"""Two server processes (replicas) on one PostgreSQL job store with a shared artifacts folder:
each claims its own jobs, a submit's idempotency key holds across them, and the jobs of a replica
killed mid-job are re-run by the other once it has gone silent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service._gen.onnxpruner.v1 import pruner_pb2 as pb
from service.client import Connection
from tests.helpers import REPO_ROOT
from tests.service.jobs.conftest import postgres_db, postgres_server  # noqa: F401 (fixtures)
from tests.service.test_jobs import (
    MLP,
    MLP_EVAL,
    SLOWISH,
    alive,
    check_result,
    download,
    free_address,
    serving,
    slow_plugins,
    wait_until,
    worker_pids,
)


@pytest.fixture
def replicas(postgres_db: str, tmp_path: Path) -> Iterator[dict[str, tuple[str, subprocess.Popen[bytes]]]]:  # noqa: F811
    """Replicas "a" and "b": (address, process), one job worker each, silent after 3 s taken for dead."""
    started: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
    path = f"{REPO_ROOT}{os.pathsep}{slow_plugins(tmp_path / 'plugins')}"  # SLOWISH's metric
    env = {"PYTHONPATH": path, "PATH": "/usr/bin:/bin", "ONNX_PRUNER_JOB_STORE": postgres_db}
    for name in ("a", "b"):
        address = free_address()
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--address", address, "--artifacts", str(tmp_path / "shared"),
             "--replica-id", f"replica-{name}", "--job-workers", "1", "--job-dead-after", "3"],
            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{name}.log", "wb"),
        )  # fmt: skip
        started[name] = (address, process)
    for address, process in started.values():
        assert wait_until(lambda a=address, p=process: serving(a) or p.poll() is not None)
        assert process.poll() is None
    yield started
    for _, process in started.values():
        if process.poll() is None:
            process.terminate()
            process.wait(60)


def test_two_replicas_share_the_queue_and_rerun_the_jobs_of_a_killed_one(
    replicas: dict[str, tuple[str, subprocess.Popen[bytes]]],
) -> None:
    (a, process_a), (b, _) = replicas["a"], replicas["b"]
    with Connection(a) as on_a, Connection(b) as on_b:
        first, _ = on_a.submit(MLP, MLP_EVAL, SLOWISH, idempotency_key="one")
        same, created = on_b.submit(MLP, MLP_EVAL, SLOWISH, idempotency_key="one")
        assert (same, created) == (first, False)
        second, _ = on_b.submit(MLP, MLP_EVAL, SLOWISH, idempotency_key="two")

        def both_running() -> bool:
            jobs = on_a.list_jobs()
            return len(jobs) == 2 and all(job.state == pb.JOB_STATE_RUNNING and job.events >= 2 for job in jobs)

        assert wait_until(both_running)  # one worker per replica: each replica took one
        assert all(len(worker_pids(job_id)) == 1 for job_id in (first, second))
        # kill replica a: its job is re-run by b once a has been silent for 3 s
        doomed = [pid for job_id in (first, second) for pid in worker_pids(job_id) if _child_of(pid, process_a.pid)]
        assert len(doomed) == 1
        process_a.send_signal(signal.SIGKILL)
        process_a.wait(30)
        assert wait_until(lambda: not alive(doomed[0]), 30)
        finals = [on_b.follow(job_id) for job_id in (first, second)]
        assert [job.state for job in finals] == [pb.JOB_STATE_SUCCEEDED] * 2
        assert sorted(job.attempts for job in finals) == [1, 2]
        for job in finals:
            check_result(download(on_b, job.job_id), job)


def _child_of(pid: int, parent: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return int(stat[1]) == parent
