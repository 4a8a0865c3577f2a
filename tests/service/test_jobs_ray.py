"""Stored jobs run as Ray tasks (``python -m service --executor ray --ray-address ADDR``) on a real
two-node Ray cluster (``tests/ray_cluster.py``): the job's model and events are a local job's, a
cancel ends the task on the cluster (by force when the run cannot stop), a task killed mid-run
fails its job naming it, a SIGKILLed server takes its task down and re-runs the job after its
restart, and an error of the model is the local job's error.

The cluster's nodes import the slow and failing metric plugins the server has, as a cluster
built from the server's image would. Needs the ``ray`` extra (skipped without it, a failure
under PRUNER_CI_REQUIRE_RAY=1).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

import pruner
from service import convert, errors
from service._gen.onnxpruner.v1 import pruner_pb2 as pb
from service.client import Connection, raise_for_job
from service.jobs import ray_task
from tests.ray_cluster import Cluster, running_cluster
from tests.service.test_jobs import (
    MLP,
    MLP_EVAL,
    SLEEPY,
    JobServer,
    alive,
    download,
    metric_plugin,
    running_with_events,
    serving,
    slow_plugins,
    wait_until,
    worker_pids,
)

TASK = "ray::onnx-prune job "
"""The process title of a Ray worker running a job's task (its task name, which ends with the job id)."""
STUCK = "stuck-metric-runs"
"""The file the metric "stuck" touches in the plugins' folder when it starts its 120 s call."""
BROKEN = pruner.PruneOptions(max_evaluations=3, metric=convert.server_metric("broken"))


@pytest.fixture(scope="module")
def plugins() -> Path:
    site = Path(tempfile.mkdtemp(prefix="ray-plugins-"))
    slow_plugins(site)
    stuck = f"__import__('pathlib').Path({str(site / STUCK)!r}).touch(); time.sleep(120); return [1.0] * len(labels)"
    metric_plugin(site, "stuck", stuck)
    return metric_plugin(site, "broken", "raise ValueError('the labels are not class ids')")


@pytest.fixture(scope="module")
def cluster(plugins: Path) -> Iterator[Cluster]:
    with running_cluster(pythonpath=(plugins,)) as started:
        yield started


@pytest.fixture
def servers(tmp_path: Path, plugins: Path) -> Iterator[Callable[..., JobServer]]:
    started: list[JobServer] = []

    def make(*args: str) -> JobServer:
        server = JobServer(tmp_path / f"artifacts-{len(started)}", *args, pythonpath=(plugins,))
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


def ray_server(servers: Callable[..., JobServer], cluster: Cluster, *args: str) -> JobServer:
    return servers("--executor", "ray", "--ray-address", cluster.address, *args)


def free_cpus() -> float:
    import ray

    return float(ray.available_resources().get("CPU", 0.0))


def events_of(connection: Connection, job_id: str) -> tuple[list[int], list[pruner.ProgressEvent], pb.Job]:
    updates = list(connection.watch(job_id))
    final = updates[-1]
    assert isinstance(final, pb.Job)
    pairs = [update for update in updates[:-1] if isinstance(update, tuple)]
    return [index for index, _ in pairs], [event for _, event in pairs], final


def test_a_job_runs_as_a_ray_task_with_the_local_model_and_events(
    cluster: Cluster, servers: Callable[..., JobServer]
) -> None:
    local, remote = servers(), ray_server(servers, cluster, "--ray-workers", "1")
    options = pruner.PruneOptions(max_evaluations=4)
    with Connection(local.address) as connection:
        local_id, _ = connection.submit(MLP, MLP_EVAL, options)
        assert connection.follow(local_id).state == pb.JOB_STATE_SUCCEEDED
        _, local_events, local_job = events_of(connection, local_id)
        local_model = download(connection, local_id)
    seen: list[int] = []
    with Connection(remote.address) as connection:
        job_id, _ = connection.submit(MLP, MLP_EVAL, options)
        # the job's task shows on the cluster while it runs (a process titled with its name)
        assert wait_until(
            lambda: bool(cluster.processes(TASK + job_id)) or connection.get_job(job_id).state == pb.JOB_STATE_SUCCEEDED
        )
        seen = cluster.processes(TASK + job_id)
        indices, events, final = events_of(connection, job_id)
        model = download(connection, job_id)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final
    assert final.result_sha256 == local_job.result_sha256 and model == local_model
    assert final.attempts == 1
    # WatchJob has every event of the task, numbered without a gap, as the local job's
    assert indices == list(range(len(local_events)))
    assert [(e.kind, e.evaluation, e.sparsity, e.metric) for e in events] == [
        (e.kind, e.evaluation, e.sparsity, e.metric) for e in local_events
    ]
    assert events[-1].kind is pruner.EventKind.DONE
    options_run = json.loads(final.report_json)["options"]
    assert (options_run["executor"], options_run["ray_address"]) == ("ray", cluster.address)
    assert options_run["executor_workers"] == 1  # the server's --ray-workers
    assert options_run["threads"] == ray_task.TASK_CPUS  # set in the task: the job did not run in the worker
    assert seen, "the job's Ray task was not seen on the cluster"
    # the task ended, the executor's actors with it: the cluster's CPUs are free again
    assert wait_until(lambda: free_cpus() == 2.0, 60)


def test_cancel_mid_job_ends_its_ray_task(cluster: Cluster, servers: Callable[..., JobServer]) -> None:
    server = ray_server(servers, cluster)
    with Connection(server.address) as connection:
        job_id, _ = connection.submit(MLP, MLP_EVAL, SLEEPY)
        assert wait_until(running_with_events(connection, job_id))
        tasks = cluster.processes(TASK + job_id)
        assert len(tasks) == 1, "the job's task is not running on the cluster"
        assert free_cpus() < 2.0
        connection.cancel_job(job_id)
        final = connection.follow(job_id)
    assert final.state == pb.JOB_STATE_CANCELLED and final.error_code == "CancelledError"
    # the task is gone from the cluster: no process runs it, and its CPU and its actors' are free
    assert wait_until(lambda: not cluster.processes(TASK + job_id), 30)
    assert wait_until(lambda: free_cpus() == 2.0, 60)
    with pytest.raises(pruner.CancelledError):
        raise_for_job(final)


def test_a_task_that_does_not_stop_is_cancelled_by_force(
    cluster: Cluster, servers: Callable[..., JobServer], plugins: Path
) -> None:
    # the metric "stuck" runs 120 s in one call: the library cannot see its stop event meanwhile
    server = ray_server(servers, cluster)
    stuck = pruner.PruneOptions(max_evaluations=2, metric=convert.server_metric("stuck"))
    with Connection(server.address) as connection:
        job_id, _ = connection.submit(MLP, MLP_EVAL, stuck)
        assert wait_until(lambda: (plugins / STUCK).exists())
        (task,) = cluster.processes(TASK + job_id)
        connection.cancel_job(job_id)
        final = connection.follow(job_id)
    assert final.state == pb.JOB_STATE_CANCELLED and final.error_code == "CancelledError"
    # ray.cancel(force=True) killed the task's process (a stop of its own would have left it idle)
    assert wait_until(lambda: not alive(task), 30)
    assert wait_until(lambda: free_cpus() == 2.0, 60)
    assert f"its Ray task did not stop within {ray_task.FORCE_AFTER:g} s; cancelling it" in server.log.read_text()


def test_a_ray_task_killed_mid_run_fails_its_job_naming_it(cluster: Cluster, servers: Callable[..., JobServer]) -> None:
    server = ray_server(servers, cluster)
    with Connection(server.address) as connection:
        job_id, _ = connection.submit(MLP, MLP_EVAL, SLEEPY)
        assert wait_until(running_with_events(connection, job_id))
        (task,) = cluster.processes(TASK + job_id)
        os.kill(task, signal.SIGKILL)
        start = time.monotonic()
        final = connection.follow(job_id)
        waited = time.monotonic() - start
        assert serving(server.address)
    assert final.state == pb.JOB_STATE_FAILED and final.attempts == 1
    assert final.error_code == "JobCrashedError"
    assert final.error_message.startswith("the job's Ray task died: its worker process on the cluster died")
    assert "WorkerCrashedError" in final.error_message
    assert final.error_status == grpc.StatusCode.INTERNAL.value[0]
    assert waited < 120  # Ray reports the death; a hang would be the job's time limit (3600 s)
    with pytest.raises(errors.JobCrashedError, match="Ray task died"):
        raise_for_job(final)


def test_sigkill_of_the_server_mid_job_ends_its_ray_task_and_the_restart_runs_it_again(
    cluster: Cluster, servers: Callable[..., JobServer]
) -> None:
    server = ray_server(servers, cluster)
    with Connection(server.address) as connection:
        job_id, _ = connection.submit(MLP, MLP_EVAL, SLEEPY)
        assert wait_until(running_with_events(connection, job_id))
    (task,) = cluster.processes(TASK + job_id)
    workers = worker_pids(job_id)
    server.kill()
    # the worker dies with its server, and Ray ends the task of the driver that is gone (its process)
    assert wait_until(lambda: not any(alive(pid) for pid in workers), 30)
    assert wait_until(lambda: not alive(task), 60)
    assert wait_until(lambda: free_cpus() == 2.0, 60)
    server.start()
    with Connection(server.address) as connection:
        assert wait_until(lambda: bool(cluster.processes(TASK + job_id)))
        assert connection.get_job(job_id).attempts == 2
        connection.cancel_job(job_id)
        final = connection.follow(job_id)
    assert final.state == pb.JOB_STATE_CANCELLED and final.attempts == 2


def test_an_error_of_the_model_in_the_task_is_the_local_jobs_error(
    cluster: Cluster, servers: Callable[..., JobServer]
) -> None:
    local, remote = servers(), ray_server(servers, cluster)
    jobs = []
    for server in (local, remote):
        with Connection(server.address) as connection:
            job_id, _ = connection.submit(MLP, MLP_EVAL, BROKEN)
            jobs.append(connection.follow(job_id))
    local_job, ray_job = jobs
    assert local_job.state == ray_job.state == pb.JOB_STATE_FAILED
    assert ray_job.error_code == local_job.error_code == "InvalidConfigError"
    assert ray_job.error_message == local_job.error_message
    assert "custom metric 'broken' raised ValueError: the labels are not class ids" in ray_job.error_message
    assert ray_job.error_status == local_job.error_status == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_a_memory_limit_no_node_offers_fails_the_job_naming_it(
    cluster: Cluster, servers: Callable[..., JobServer]
) -> None:
    server = ray_server(servers, cluster, "--job-memory-limit", str(1 << 50))
    with Connection(server.address) as connection:
        job_id, _ = connection.submit(MLP, MLP_EVAL, pruner.PruneOptions(max_evaluations=2))
        final = connection.follow(job_id)
    assert final.state == pb.JOB_STATE_FAILED and final.error_code == "JobMemoryLimitError"
    assert "memory limit of 1.07374e+09 MiB (job_memory_limit) is more than any node" in final.error_message
    assert final.error_status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
