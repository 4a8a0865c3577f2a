"""A stored job run as one Ray task on a cluster (the server's ``--executor ray``).

The job's worker process (:mod:`service.jobs.worker`) stays what the runner supervises; with the
Ray executor it submits the job as one task and waits for it::

    worker process (server's machine)              Ray cluster
    ─────────────────────────────────              ───────────
    ray.put(model bytes), ray.put(eval set) ──────> object store
    progress actor (num_cpus=0) <──── put(event) ── job task (num_cpus=1, memory=limit):
      take() every 0.2 s -> job store                 pruner.prune(executor=RAY): its
      stop() on SIGTERM ─────────────── flag ─────>     evaluations fan out to actors
    result <──────────────── (model bytes, report JSON) ┘

- **Progress.** The task's ``on_progress`` hands each event to a small actor, synchronously, so
  every event is there before the task returns; the worker takes them every
  :data:`POLL_SECONDS` and writes them to the job store.
- **Stop.** On SIGTERM the worker sets the actor's flag; a thread of the task reads it every
  :data:`POLL_SECONDS` and sets the library's stop event, so the run ends within one step with
  ``CancelledError``. A task still running :data:`FORCE_AFTER` seconds later is cancelled with
  ``ray.cancel(force=True)`` (its worker process is killed, and the executor's actors it owns
  with it). When the worker process itself dies, Ray ends everything it owns.
- **Failures.** An error raised in the task (``RayTaskError``) is unwrapped to its cause, so a
  model's :class:`pruner.PrunerError` ends the job as it would locally; a task that dies (its
  process killed, its node lost, killed by Ray for memory) is a
  :class:`service.errors.JobCrashedError` naming what Ray said. The task is never retried by
  Ray (``max_retries=0``): the runner's attempts count as for a local job.
- **Same model.** The task's numpy BLAS runs on the worker process's thread count (Ray starts
  it with one): the least-squares refits are then a local job's to the bit.

``ray`` is imported only here, and only for ``--executor ray``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pruner
from pruner._ray import blas_threads, ray_module
from service import errors

__all__ = ["FORCE_AFTER", "POLL_SECONDS", "TASK_CPUS", "run"]

logger = logging.getLogger("onnxpruner.service.jobs.ray")

TASK_CPUS = 1
"""CPUs the job's task holds (its onnxruntime sessions run on as many threads): the driver's
steps are serial; the evaluations run on the executor's actors, one CPU each."""
POLL_SECONDS = 0.2
"""How often the worker takes the task's events, and the task reads the stop flag."""
FORCE_AFTER = 5.0
"""Seconds from the stop flag to ``ray.cancel(force=True)`` (the runner kills the worker after 10)."""
_CANCEL_WAIT = 3.0
"""Seconds to wait for a force-cancelled task to be gone before the worker exits."""


class _Progress:
    """A Ray actor between the task and the worker: the events not yet taken, and the stop flag."""

    def __init__(self) -> None:
        self.events: list[pruner.ProgressEvent] = []
        self.stopped = False

    def put(self, event: pruner.ProgressEvent) -> bool:
        self.events.append(event)
        return self.stopped

    def take(self) -> list[pruner.ProgressEvent]:
        events, self.events = self.events, []
        return events

    def stop(self) -> None:
        self.stopped = True

    def is_stopped(self) -> bool:
        return self.stopped


def _run_job(
    model: bytes, evalset: pruner.EvalSet, options: pruner.PruneOptions, progress: Any, blas: int | None
) -> tuple[bytes, str]:
    """The task: ``pruner.prune`` on the cluster; returns the model's bytes and the report's JSON.

    numpy's BLAS runs on ``blas`` threads, the worker process's count: Ray starts the task's
    process with one, and OpenBLAS splits a product's sums by its thread count, so the
    least-squares refits (and the calibration the executor sends out at this count) would
    differ from a local job's in the last bits.
    """
    import ray
    from threadpoolctl import threadpool_limits  # in the ray extra

    stop = threading.Event()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(POLL_SECONDS):
            try:
                if ray.get(progress.is_stopped.remote()):
                    stop.set()
            except ray.exceptions.RayError:  # the actor died with its worker process: nobody wants the job
                stop.set()
            if stop.is_set():
                return

    def on_progress(event: pruner.ProgressEvent) -> None:
        try:
            if ray.get(progress.put.remote(event)):
                stop.set()
        except ray.exceptions.RayError:  # as in watch(): the worker process is gone
            stop.set()

    watcher = threading.Thread(target=watch, name="job-stop-watch", daemon=True)
    watcher.start()
    limits = threadpool_limits(limits=blas, user_api="blas") if blas else contextlib.nullcontext()
    try:
        with limits:
            result = pruner.prune(model, evalset, options, on_progress=on_progress, stop=stop)
    finally:
        done.set()
    data = result.model_bytes if result.model_bytes is not None else result.model.SerializeToString()
    return data, result.report.to_json()


def _connect(address: str | None) -> Any:
    ray = ray_module()
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise pruner.InvalidConfigError(f"cannot connect to the Ray cluster at {address or 'local'}: {e}") from e
    return ray


def _check_memory(ray: Any, memory: int) -> None:
    """A task asking more memory than any node offers would wait for one for ever: fail instead."""
    offered = [node.get("Resources", {}).get("memory", 0) for node in ray.nodes() if node.get("Alive")]
    largest = max(offered, default=0)
    if memory > largest:
        raise errors.JobMemoryLimitError(
            f"the job's memory limit of {memory / (1 << 20):g} MiB (job_memory_limit) is more than any node "
            f"of the Ray cluster offers (the largest: {largest / (1 << 20):g} MiB of Ray's memory resource); "
            "lower the limit or add a larger node"
        )


def _died(ray: Any, error: BaseException) -> errors.JobCrashedError:
    """The job's error for a task that Ray reports dead, naming what happened."""
    exceptions = ray.exceptions
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, exceptions.OutOfMemoryError):
        what = "Ray killed it: its node ran out of memory"
    elif isinstance(error, exceptions.NodeDiedError):
        what = "the node running it was lost"
    elif isinstance(error, exceptions.WorkerCrashedError):
        what = "its worker process on the cluster died (killed, or crashed)"
    elif isinstance(error, exceptions.TaskCancelledError):
        what = "it was cancelled on the cluster"
    else:
        what = "Ray lost it"
    return errors.JobCrashedError(f"the job's Ray task died: {what} ({type(error).__name__}: {first})")


def run(
    model: Path,
    evalset: Path,
    options: pruner.PruneOptions,
    *,
    max_eval_bytes: int | None,
    address: str | None,
    memory: int,
    name: str,
    on_progress: Callable[[pruner.ProgressEvent], None],
    stop: threading.Event,
) -> tuple[bytes, str]:
    """Runs the job as a Ray task (see the module docstring); returns the model's bytes and the report.

    Args:
        model, evalset: the model's and the eval set's files (read here: a bad eval set fails
            before anything is sent).
        options: the run's options (``options.executor`` is RAY).
        max_eval_bytes: the eval set's decoded size limit (None: the free memory).
        address: the cluster; None: the one this process joined, or a local one.
        memory: the task's ``memory`` resource in bytes (0: none asked).
        name: the task's name on the cluster (``ray list tasks``).
        on_progress: called in this thread with each of the task's events, in order.
        stop: set it (SIGTERM) to stop the task; it then raises :class:`pruner.CancelledError`.

    Raises:
        pruner.PrunerError: what the run raised on the cluster, as it would locally.
        errors.JobCrashedError: the task died.
    """
    arrays = pruner.load_eval_set(evalset, max_bytes=max_eval_bytes)
    ours = signal.getsignal(signal.SIGTERM)
    ray = _connect(address)
    if ours is not None and threading.current_thread() is threading.main_thread():
        # ray.init makes a driver's SIGTERM a SystemExit; the worker's handler sets the stop event instead
        signal.signal(signal.SIGTERM, ours)
    if memory:
        _check_memory(ray, memory)
    progress = ray.remote(num_cpus=0, max_restarts=0)(_Progress).remote()
    task = ray.remote(_run_job).options(
        num_cpus=TASK_CPUS, memory=memory or None, max_retries=0, retry_exceptions=False, name=name
    )
    options = dataclasses.replace(options, threads=TASK_CPUS)
    # top-level references: Ray resolves them to the values (numpy arrays from shared memory) on the task's node
    ref = task.remote(ray.put(model.read_bytes()), ray.put(arrays), options, progress, blas_threads())
    del arrays  # the object store has it
    stopped_at: float | None = None
    try:
        while True:
            ready, _ = ray.wait([ref], timeout=POLL_SECONDS)
            try:
                events = ray.get(progress.take.remote())
            except ray.exceptions.RayError as e:  # its node was lost: the task cannot report or stop
                ray.cancel(ref, force=True)
                raise errors.JobCrashedError(
                    f"the job's Ray progress actor died ({type(e).__name__}); its task was cancelled"
                ) from e
            for event in events:
                on_progress(event)
            if ready:
                break
            if stop.is_set():
                now = time.monotonic()
                if stopped_at is None:
                    stopped_at = now
                    progress.stop.remote()
                elif now - stopped_at >= FORCE_AFTER:
                    logger.warning("%s: its Ray task did not stop within %g s; cancelling it", name, FORCE_AFTER)
                    ray.cancel(ref, force=True)
                    ray.wait([ref], timeout=_CANCEL_WAIT)
                    raise pruner.CancelledError("the job was stopped")
        try:
            result, report = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, BaseException):  # the run's own error, as a local job raises it
                raise cause from e
            raise
        except ray.exceptions.TaskCancelledError as e:
            if stop.is_set():
                raise pruner.CancelledError("the job was stopped") from e
            raise _died(ray, e) from e
        except ray.exceptions.RayError as e:
            raise _died(ray, e) from e
        return bytes(result), str(report)
    finally:
        with contextlib.suppress(Exception):  # gone with its node, or the connection: nothing to end
            ray.kill(progress)
