"""The process that runs one job: ``python -m service.jobs.worker --artifacts DIR --job ID`` (store URL in
``$ONNX_PRUNER_WORKER_STORE``).

The server's :class:`service.jobs.runner.Runner` starts one per job, so a job
that crashes (a segfault in onnxruntime or a plugin) or runs out of memory takes
only itself down. The worker reads the job's inputs from their blobs, runs
``pruner.prune`` with a progress callback that appends each event to the store,
writes the result model as a blob and finishes the job (SUCCEEDED, or FAILED
with the error table's class name and message). With ``--executor ray`` the run
itself is a Ray task on the cluster (:mod:`service.jobs.ray_task`): this process
sends it the inputs, writes its events and its result, and stops it on SIGTERM.

It leaves the job RUNNING and lets the runner decide in three cases: SIGTERM
(the runner stops it: cancel, time limit, shutdown), which it turns into the
library's stop event and answers with exit code :data:`EXIT_STOPPED`; a memory
error, answered with :data:`EXIT_MEMORY` when finishing the job itself fails too;
and of course a death by a signal.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path

EXIT_STOPPED = 75
"""Exit code: the runner's SIGTERM stopped the job; the runner finishes it (cancelled, time limit, shutdown)."""
EXIT_MEMORY = 86
"""Exit code: the job ran out of its memory limit and could not record it; the runner does."""
STORE_ENV = "ONNX_PRUNER_WORKER_STORE"
"""The environment variable the runner hands the store's URL (with its password, if any) in."""
_PR_SET_PDEATHSIG = 1

logger = logging.getLogger("onnxpruner.service.jobs.worker")


def die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when the runner's thread that started it dies (a SIGKILLed server)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux/glibc: the progress callback checks the parent instead
        pass
    if os.getppid() != parent:  # the parent died before prctl: nobody wants this job any more
        os._exit(EXIT_STOPPED)


def limit_memory(limit: int) -> None:
    """Caps this process's address space at ``limit`` bytes (RLIMIT_AS): allocations past it fail."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def memory_message(limit: int) -> str:
    return f"the job exceeded its memory limit of {limit / (1 << 20):g} MiB (job_memory_limit)"


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` (or what it was raised from) is an allocation that failed."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError):
            return True
        text = str(current)
        if "bad_alloc" in text or "Failed to allocate" in text or "Cannot allocate memory" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


def run(args: argparse.Namespace) -> int:
    # imported here, after die_with_parent: importing onnxruntime takes a second
    import pruner
    from service import convert, errors
    from service._gen.onnxpruner.v1 import pruner_pb2 as pb
    from service.jobs.store import JobState, open_store

    store = open_store(args.store, Path(args.artifacts))
    job = store.get(args.job)
    if job is None or job.state is not JobState.RUNNING:
        logger.warning("job %s is not running any more (%s); nothing to do", args.job, job and job.state.value)
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    on_ray = args.executor == "ray"
    if args.memory_limit and not on_ray:  # on Ray the limit is the task's memory resource (ray_task.run)
        limit_memory(args.memory_limit)
    parent = args.parent

    checked = [time.monotonic()]

    def on_progress(event: pruner.ProgressEvent) -> None:
        if os.getppid() != parent:  # the server died (no PDEATHSIG here): stop, its replacement re-runs the job
            stop.set()
        if time.monotonic() - checked[0] >= 1.0:
            checked[0] = time.monotonic()
            current = store.get(job.id)
            if current is None or current.state is not JobState.RUNNING or current.attempts != job.attempts:
                # recovered and re-queued meanwhile (this replica was taken for dead): another run owns it now
                logger.warning("job %s is no longer this worker's (attempt %d); stopping", job.id, job.attempts)
                stop.set()
                return
        store.append_event(job.id, convert.event_to_proto(event).SerializeToString())

    def finish(state: JobState, **fields: str) -> None:
        try:
            store.finish(job.id, state, owner=job.owner, **fields)
        except ValueError as e:  # recovered, cancelled or finished meanwhile: the store keeps what it has
            logger.warning("job %s: not finished by this worker: %s", job.id, e)

    # the inputs' blob files are the server's business: a message names what the client sent
    public: dict[str, str] = {}
    try:
        config = pb.PruneConfig.FromString(store.blob_path(job.inputs["config"]).read_bytes())
        options = convert.options_from_proto(config, threads=args.threads)
        if args.executor != "local":  # the server's choice: PruneConfig has no such field
            executor = pruner.Executor(args.executor)
            options = dataclasses.replace(
                options, executor=executor, ray_address=args.ray_address, executor_workers=args.ray_workers
            )
        model_path, eval_path = store.blob_path(job.inputs["model"]), store.blob_path(job.inputs["eval"])
        public = {str(model_path): "the submitted model", str(eval_path): "the submitted eval set"}
        max_eval_bytes = args.max_eval_bytes or None
        if on_ray:  # the job runs as a Ray task on the cluster; this process relays its events and its stop
            from service.jobs import ray_task

            data, report_json = ray_task.run(
                model_path,
                eval_path,
                options,
                max_eval_bytes=max_eval_bytes,
                address=args.ray_address,
                memory=args.memory_limit,
                name=f"onnx-prune job {job.id}",
                on_progress=on_progress,
                stop=stop,
            )
        else:
            evalset = pruner.load_eval_set(eval_path, max_bytes=max_eval_bytes)
            result = pruner.prune(model_path, evalset, options, on_progress=on_progress, stop=stop)
            del evalset
            data = result.model_bytes if result.model_bytes is not None else result.model.SerializeToString()
            report_json = result.report.to_json()
        digest, _ = store.put_blob([data])
        finish(JobState.SUCCEEDED, report_json=report_json, result=digest)
        return 0
    except pruner.CancelledError:
        if stop.is_set():
            return EXIT_STOPPED
        code, message = "CancelledError", "the job was cancelled"
    except BaseException as error:  # everything else ends the job FAILED, with the table's class name
        if args.memory_limit and _out_of_memory(error):
            code, message = "JobMemoryLimitError", memory_message(args.memory_limit)
        elif isinstance(error, errors.JobCrashedError) or (
            isinstance(error, pruner.PrunerError) and errors.row_of(error).code.name != "INTERNAL"
        ):
            code, message = type(error).__name__, _named(str(error), public)
        else:
            logger.error("job %s failed", job.id, exc_info=error)
            code = type(error).__name__ if isinstance(error, pruner.PrunerError) else "InternalError"
            message = f"internal error (job {job.id}); the server's log has the details"
    try:
        finish(JobState.FAILED, error_code=code, error_message=message)
    except MemoryError:
        return EXIT_MEMORY
    return 0


def _named(message: str, names: dict[str, str]) -> str:
    """``message`` with each blob file's path (quoted or not) replaced by what the client sent."""
    for path, name in names.items():
        message = message.replace(repr(path), name).replace(path, name)
    return message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.jobs.worker", description=__doc__)
    parser.add_argument(
        "--store", default=os.environ.get(STORE_ENV), help=f"the job store's URL (default ${STORE_ENV})"
    )
    parser.add_argument("--artifacts", required=True, help="the artifacts folder")
    parser.add_argument("--job", required=True, help="the job's id")
    parser.add_argument("--parent", type=int, default=os.getppid(), help="the runner's pid")
    parser.add_argument("--memory-limit", type=int, default=0, help="RLIMIT_AS in bytes (0: none)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: auto)")
    parser.add_argument("--max-eval-bytes", type=int, default=0, help="decoded eval set limit (0: free memory)")
    parser.add_argument("--executor", default="local", choices=("local", "ray"), help="where the job fans work out")
    parser.add_argument("--ray-address", default=None, help="--executor ray: the cluster's address")
    parser.add_argument("--ray-workers", type=int, default=0, help="--executor ray: workers (0: one per CPU)")
    args = parser.parse_args(argv)
    if not args.store:
        parser.error(f"give the job store's URL with --store or ${STORE_ENV}")
    die_with_parent(args.parent)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return run(args)
    except MemoryError:
        return EXIT_MEMORY


if __name__ == "__main__":
    sys.exit(main())
