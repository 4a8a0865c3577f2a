"""Runs a replica's share of the queued jobs, one worker process each.

A :class:`Runner` lives in the server process. Its one thread claims queued
jobs from the store (``store.claim(replica_id)``) while fewer than ``workers``
run, starts ``python -m service.jobs.worker`` for each, and watches them:

- a worker that finishes its job (SUCCEEDED, or FAILED with the error table's
  class name) exits 0 and is forgotten;
- a worker killed by a signal (a segfault, the kernel's OOM killer) fails its job
  with ``JobCrashedError`` "the job's process died of SIGSEGV"; one that ran out
  of its memory limit (RLIMIT_AS) with ``JobMemoryLimitError``;
- a job whose ``cancel_requested`` is set, or that runs past ``time_limit``, gets
  SIGTERM (the worker sets the library's stop event and the run ends within one
  step), SIGKILL after :data:`STOP_SECONDS` more; then CANCELLED, or FAILED
  with ``TimeLimitError``.

It sends the store a heartbeat every ``heartbeat`` seconds; on start it re-queues
the jobs the store still has RUNNING under its own ``replica_id`` (they died with
an earlier process of this replica), and every ``dead_after / 2`` seconds those of
replicas without a heartbeat for ``dead_after`` seconds. On :meth:`stop` it
claims nothing more, lets running workers go on for the grace period, then stops
them and re-queues their jobs for the next start (or another replica).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from service.jobs import worker
from service.jobs.store import FINISHED, Job, JobState, JobStore

__all__ = ["STOP_SECONDS", "Runner"]

logger = logging.getLogger("onnxpruner.service.jobs")

STOP_SECONDS = 10.0
"""How long a worker has after SIGTERM to stop before it gets SIGKILL."""
_POLL = 0.2
_CHECK = 0.5
"""Seconds between two reads of a running job's cancel flag."""


@dataclass(eq=False)
class _Run:
    job: Job
    process: subprocess.Popen[bytes]
    started: float
    reason: str | None = None
    """Why the runner stopped it: "cancel", "time limit" or "shutdown"."""
    signalled: float | None = None
    checked: float = field(default=0.0)


class Runner:
    """Claims and runs jobs of ``store`` in worker processes (see the module's docstring).

    Args:
        store: the job store (this process's connection).
        store_url, artifacts: how a worker process opens the same store.
        replica_id: this replica's name in the store (a stable one, like a pod's name,
            lets a restarted replica re-queue its jobs at once).
        workers: jobs running at once.
        memory_limit: each worker's address-space limit in bytes (0: none).
        time_limit: seconds a job may run.
        threads: onnxruntime intra-op threads per job (0: auto).
        max_eval_bytes: a job's decoded eval set limit.
        dead_after: seconds without a heartbeat after which another replica's jobs re-run.
        max_attempts: a job whose replica died this many times is failed, not re-run.
        retention_ttl, retention_max_bytes: cleanup of finished jobs (None: keep).
        executor, ray_address: where each job runs (``ray``: as a Ray task on the cluster at
            ``ray_address``, which its worker process submits and relays; ``ray_task``).
    """

    def __init__(
        self,
        store: JobStore,
        *,
        store_url: str,
        artifacts: Path,
        replica_id: str,
        workers: int,
        memory_limit: int = 0,
        time_limit: float = 3600.0,
        threads: int = 0,
        max_eval_bytes: int = 0,
        heartbeat: float = 5.0,
        dead_after: float = 60.0,
        max_attempts: int = 3,
        retention_ttl: float | None = None,
        retention_max_bytes: int | None = None,
        cleanup_every: float = 600.0,
        executor: str = "local",
        ray_address: str | None = None,
        ray_workers: int = 0,
    ) -> None:
        self.store = store
        self.store_url = store_url
        self.artifacts = artifacts
        self.replica_id = replica_id
        self.workers = workers
        self.memory_limit = memory_limit
        self.time_limit = time_limit
        self.threads = threads
        self.max_eval_bytes = max_eval_bytes
        # a replica beating less often than others take it for dead would recover its own live jobs
        self.heartbeat = min(heartbeat, dead_after / 3)
        self.dead_after = dead_after
        self.max_attempts = max_attempts
        self.retention_ttl = retention_ttl
        self.retention_max_bytes = retention_max_bytes
        self.cleanup_every = cleanup_every
        self.executor = executor
        self.ray_address = ray_address
        self.ray_workers = ray_workers
        self._runs: dict[str, _Run] = {}
        self._claiming = threading.Event()
        self._claiming.set()
        self._done = threading.Event()
        self._shutdown_at: float | None = None
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)

    # -- life

    def start(self) -> None:
        """Re-queues this replica's jobs left RUNNING by an earlier process, then starts claiming."""
        self.store.heartbeat(self.replica_id)
        for job in self.store.recover(
            owner=self.replica_id, dead_after=self.dead_after, max_attempts=self.max_attempts
        ):
            _log("recovered", job, state=job.state.value, attempts=job.attempts)
        self._thread.start()

    def stop(self, grace: float) -> None:
        """Claims nothing more; running jobs go on for ``grace`` seconds, then are stopped and re-queued.

        Returns once every worker has ended.
        """
        self._claiming.clear()
        self._shutdown_at = time.monotonic() + grace
        if self._thread.is_alive():
            self._thread.join()

    @property
    def running(self) -> int:
        return len(self._runs)

    # -- the loop

    def _loop(self) -> None:
        beat = recovered = time.monotonic()
        cleaned = beat - self.cleanup_every  # the first cleanup at start
        while True:
            now = time.monotonic()
            try:
                if now - beat >= self.heartbeat:
                    beat = now
                    self.store.heartbeat(self.replica_id)
                if now - recovered >= self.dead_after / 2 and self._claiming.is_set():
                    recovered = now
                    for job in self.store.recover(dead_after=self.dead_after, max_attempts=self.max_attempts):
                        _log("recovered", job, state=job.state.value, attempts=job.attempts)
                retention = self.retention_ttl is not None or self.retention_max_bytes is not None
                if retention and now - cleaned >= self.cleanup_every:
                    cleaned = now
                    stats = self.store.cleanup(ttl=self.retention_ttl, max_bytes=self.retention_max_bytes)
                    logger.info(json.dumps({"event": "cleanup", "stats": repr(stats)}))
                self._watch(now)
                if self._shutdown_at is not None:
                    if not self._runs:
                        return
                    if now >= self._shutdown_at:
                        for run in self._runs.values():
                            self._signal(run, "shutdown", now)
                elif self._claiming.is_set():
                    self._claim()
            except Exception:  # the store is unreachable for a while: keep the server up, retry
                logger.exception("the job runner's loop failed; retrying")
            time.sleep(_POLL)

    def _claim(self) -> None:
        while len(self._runs) < self.workers:
            # a read first: an idle replica polling every _POLL s would otherwise commit (and fsync) a claim each time
            if not self.store.list(limit=1, states=(JobState.QUEUED,)):
                return
            job = self.store.claim(self.replica_id)
            if job is None:
                return
            command = [
                sys.executable, "-m", "service.jobs.worker",
                "--artifacts", str(self.artifacts), "--job", job.id,
                "--parent", str(os.getpid()), "--memory-limit", str(self.memory_limit),
                "--threads", str(self.threads), "--max-eval-bytes", str(self.max_eval_bytes),
                "--executor", self.executor,
            ]  # fmt: skip
            if self.ray_address:
                command += ["--ray-address", self.ray_address]
            if self.ray_workers:
                command += ["--ray-workers", str(self.ray_workers)]
            # two malloc arenas keep the address space (what RLIMIT_AS counts) near what is used
            env = {**os.environ, "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}
            env[worker.STORE_ENV] = self.store_url  # not on the command line, where ps shows a password
            process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
            self._runs[job.id] = _Run(job, process, time.monotonic())
            _log("started", job, pid=process.pid, attempt=job.attempts)

    def _watch(self, now: float) -> None:
        for job_id, run in list(self._runs.items()):
            code = run.process.poll()
            if code is not None:
                del self._runs[job_id]
                self._ended(run, code)
                continue
            if run.signalled is not None:
                if now - run.signalled >= STOP_SECONDS:
                    run.process.kill()
                continue
            if now - run.started >= self.time_limit:
                self._signal(run, "time limit", now)
            elif now - run.checked >= _CHECK:
                run.checked = now
                current = self.store.get(job_id)
                if current is not None and current.cancel_requested:
                    self._signal(run, "cancel", now)

    @staticmethod
    def _signal(run: _Run, reason: str, now: float) -> None:
        if run.signalled is None:
            run.reason = reason
            run.signalled = now
            run.process.send_signal(signal.SIGTERM)

    def _ended(self, run: _Run, code: int) -> None:
        job = self.store.get(run.job.id)
        if job is None or job.state in FINISHED or job.attempts != run.job.attempts:
            # finished (by its worker, usually), or recovered and claimed again: not this run's to finish
            _log("ended", run.job, exit=code, state=job.state.value if job else "removed")
            return
        if run.reason == "shutdown":
            for back in self.store.recover(owner=self.replica_id, max_attempts=self.max_attempts):
                _log("requeued", back, state=back.state.value)
            return
        if run.reason == "cancel":
            self._finish(job, JobState.CANCELLED, "CancelledError", "the job was cancelled (CancelJob)")
        elif run.reason == "time limit":
            message = f"the job exceeded the server's time limit of {self.time_limit:g} s (job_time_limit)"
            self._finish(job, JobState.FAILED, "TimeLimitError", message)
        elif code == worker.EXIT_MEMORY:
            self._finish(job, JobState.FAILED, "JobMemoryLimitError", worker.memory_message(self.memory_limit))
        elif code < 0:
            name = _signal_name(-code)
            if self.memory_limit and -code in (signal.SIGABRT, signal.SIGKILL, signal.SIGBUS):
                message = f"{worker.memory_message(self.memory_limit)}: its process died of {name}"
                self._finish(job, JobState.FAILED, "JobMemoryLimitError", message)
            else:
                self._finish(job, JobState.FAILED, "JobCrashedError", f"the job's process died of {name}")
        else:
            self._finish(job, JobState.FAILED, "JobCrashedError", f"the job's process exited with code {code}")

    def _finish(self, job: Job, state: JobState, code: str, message: str) -> None:
        try:
            self.store.finish(job.id, state, error_code=code, error_message=message, owner=self.replica_id)
        except ValueError:  # finished meanwhile (by its worker, or recovered elsewhere)
            return
        _log("finished", job, state=state.value, error_code=code, error=message)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _log(event: str, job: Job, **extra: object) -> None:
    logger.info(json.dumps({"event": f"job-{event}", "job": job.id, **extra}))
