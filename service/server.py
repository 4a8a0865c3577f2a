"""The gRPC server: a thin layer that turns requests into library calls.

    python -m service [--address [::]:50051] [--max-jobs N] ...   (or environment variables)

Every flag has an environment variable (``ONNX_PRUNER_<FLAG>``, e.g.
``ONNX_PRUNER_MAX_JOBS``); flags win.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import hashlib
import hmac
import importlib.util
import io
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import pruner
from service import convert, errors, healthcheck
from service._gen.onnxpruner.v1 import pruner_pb2 as pb
from service._gen.onnxpruner.v1 import pruner_pb2_grpc as pb_grpc
from service.cpus import usable_cpus
from service.jobs.runner import Runner
from service.jobs.store import FINISHED, Job, JobState, JobStore, open_store

__all__ = ["ServerConfig", "create_server", "main"]

logger = logging.getLogger("onnxpruner.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PrunerService"].full_name
MiB = 1 << 20


@dataclass(frozen=True)
class ServerConfig:
    """How the server runs. Sizes in bytes, times in seconds."""

    address: str = "[::]:50051"
    max_jobs: int = field(default_factory=usable_cpus)
    """Prune jobs computing at once (each takes a share of the cores)."""
    max_uploads: int | None = None
    """Calls receiving their inputs at once; None: 4 x ``max_jobs``."""
    max_inspects: int = 2
    """Inspect calls computing at once, apart from the jobs."""
    max_model_bytes: int = 1024 * MiB
    max_eval_bytes: int = 1024 * MiB
    """Bytes of the eval set as received and as decoded arrays."""
    job_time_limit: float = 3600.0
    upload_deadline: float = 600.0
    """Seconds a call may take to send its whole request stream."""
    upload_idle_timeout: float = 30.0
    """Seconds a call may leave between two messages of its request stream."""
    grace: float = 30.0
    """On SIGTERM, how long running jobs may go on before they are cancelled."""
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = None
    """When set, every call but health checks needs ``authorization: Bearer <token>``."""
    log_level: str = "INFO"
    artifacts: str | None = None
    """The job store's artifacts folder; None: no job store, the job RPCs answer UNIMPLEMENTED
    (``python -m service`` always sets one, default ``~/.local/share/onnx-pruner``)."""
    job_store: str | None = None
    """The job store's URL; None: ``sqlite:///<artifacts>/jobs.db``."""
    job_workers: int | None = None
    """Jobs of the store this replica runs at once, each in its own process; None: ``max_jobs``."""
    job_memory_limit: int = 0
    """Each job process's address-space limit in bytes (RLIMIT_AS); 0: none."""
    replica_id: str | None = None
    """This replica's name in the job store; None: ``<hostname>-<pid>``."""
    retention_ttl: float | None = None
    """Seconds a finished job (and its blobs) is kept; None: forever."""
    retention_max_bytes: int | None = None
    """Most bytes of blobs kept; the oldest finished jobs go first; None: no limit."""
    job_dead_after: float = 60.0
    """Seconds without a heartbeat after which another replica's running jobs re-run."""
    executor: str = "local"
    """Where stored jobs do their expensive parts: ``local`` (the job's own process) or ``ray``
    (each job runs as a Ray task on the cluster at ``ray_address``, fanning evaluation, calibration
    and probes out to its actors; docs/ray.md). ``Prune`` calls always run locally."""
    ray_address: str | None = None
    """``executor`` ray: the cluster (``host:port`` or ``ray://host:10001``); None: a Ray local to each job."""
    ray_workers: int = 0
    """``executor`` ray: the workers (Ray actors, one CPU each) of each job; 0: one per CPU of the
    cluster. A job's workers are placed together or not at all, so jobs at once on one cluster
    share it only when each takes part of it: with 0, they run one after the other."""

    def __post_init__(self) -> None:
        if self.executor not in ("local", "ray"):
            raise ValueError(f"executor must be local or ray, got {self.executor!r}")
        if self.ray_address is not None and self.executor != "ray":
            raise ValueError("ray_address needs executor ray")
        if not 0 <= self.ray_workers <= 100_000:
            raise ValueError(f"ray_workers must be 0 (one per CPU of the cluster) to 100000, got {self.ray_workers}")
        if self.ray_workers and self.executor != "ray":
            raise ValueError("ray_workers needs executor ray")
        if self.executor == "ray" and importlib.util.find_spec("ray") is None:
            raise ValueError("executor ray needs the ray extra: pip install 'onnx-pruner[ray]'")
        for name in ("max_jobs", "max_inspects", "max_model_bytes", "max_eval_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_uploads is not None and self.max_uploads < 1:
            raise ValueError(f"max_uploads must be >= 1, got {self.max_uploads}")
        for name in ("job_time_limit", "upload_deadline", "upload_idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if not self.grace >= 0:
            raise ValueError(f"grace must be >= 0 seconds, got {self.grace}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key")
        if self.job_workers is not None and self.job_workers < 1:
            raise ValueError(f"job_workers must be >= 1, got {self.job_workers}")
        if self.job_memory_limit < 0:
            raise ValueError(f"job_memory_limit must be >= 0 bytes (0: none), got {self.job_memory_limit}")
        if self.retention_ttl is not None and not self.retention_ttl > 0:
            raise ValueError(f"retention_ttl must be > 0 seconds, got {self.retention_ttl}")
        if self.retention_max_bytes is not None and self.retention_max_bytes < 0:
            raise ValueError(f"retention_max_bytes must be >= 0, got {self.retention_max_bytes}")
        if not self.job_dead_after > 0:
            raise ValueError(f"job_dead_after must be > 0 seconds, got {self.job_dead_after}")
        if self.token is not None and not self.token.strip():
            raise ValueError("the bearer token is empty; set a non-empty token, or none to run without authentication")

    @property
    def upload_slots(self) -> int:
        return self.max_uploads if self.max_uploads is not None else 4 * self.max_jobs

    @property
    def workers(self) -> int:
        return self.job_workers if self.job_workers is not None else self.max_jobs

    @property
    def watch_slots(self) -> int:
        """WatchJob and DownloadResult calls at once."""
        return 4 * self.workers + 8

    @property
    def store_url(self) -> str:
        if self.job_store:
            return self.job_store
        return f"sqlite://{Path(self.artifacts or '.').expanduser().resolve() / 'jobs.db'}"


JOIN_SECONDS = 10.0
"""How long a call waits for its cancelled worker to stop before it logs an ERROR (the slot stays taken)."""
SHUTDOWN_SECONDS = 2.0
"""After the grace period, how long cancelled calls get to send their status before gRPC stops."""
_POLL = 0.25


def _bad(message: str, field: str) -> pruner.InvalidInputError:
    error = pruner.InvalidInputError(message)
    error.field = field  # type: ignore[attr-defined]
    return error


def _release_memory() -> None:
    """Frees what a finished job left: reference cycles of tracebacks, and glibc's free lists."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_LIBC = _load_libc()
_M_ARENA_MAX = -8  # glibc's mallopt parameter


def _limit_malloc_arenas() -> None:
    """Two malloc arenas for the whole process, not eight per core.

    Every job runs in a new thread; with glibc's default each may get its own
    arena, and the freed tens of MB of a job's arrays stay there, scattered: with
    a 40 MB eval set RSS went 145 -> 345 MB over 12 cancelled jobs even with
    malloc_trim; with two arenas it stays at 130-143 MB. Set before any thread
    starts; no-op without glibc or when MALLOC_ARENA_MAX is set.
    """
    if _LIBC is not None and "MALLOC_ARENA_MAX" not in os.environ:
        with contextlib.suppress(AttributeError):
            _LIBC.mallopt(_M_ARENA_MAX, 2)


@dataclass(eq=False)
class _Job:
    """One call: its bookkeeping (logged when it ends) and how it is stopped."""

    rpc: str
    id: str
    started: float
    model_bytes: int = 0
    eval_bytes: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    reason: str | None = None
    """Why ``stop`` was set by the server: "time limit" or "shutdown"; None: the client went."""
    context: Any = None
    """The call's gRPC context."""

    def gone(self, wait: float = 0.0) -> bool:
        """Whether the call was cancelled (waiting up to ``wait`` seconds to find out).

        A cancel reaches the request stream as its end before it marks the call:
        an upload that ends incomplete waits a moment to tell a cancel from a bad request.
        """
        deadline = time.monotonic() + wait
        while True:
            if self.stop.is_set() or (self.context is not None and not self.context.is_active()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def cancel(self, reason: str) -> None:
        if not self.stop.is_set():
            self.reason = reason
        self.stop.set()

    def log(self, outcome: str, level: int = logging.INFO, **extra: Any) -> None:
        record = {
            "event": "job",
            "job": self.id,
            "rpc": self.rpc,
            "model_bytes": self.model_bytes,
            "eval_bytes": self.eval_bytes,
            "seconds": round(time.monotonic() - self.started, 3),
            "outcome": outcome,
            **extra,
        }
        logger.log(level, json.dumps(record))


class _Slot:
    """A taken job slot: released once, by the call, or by its worker if the call gave up waiting for it."""

    def __init__(self, semaphore: threading.BoundedSemaphore) -> None:
        self._semaphore = semaphore
        self._lock = threading.Lock()
        self._held = True
        self._orphaned = False

    def release(self) -> None:
        with self._lock:
            if self._held:
                self._held = False
                self._semaphore.release()

    def orphan(self) -> None:
        """The worker outlives its call: it releases the slot when it ends."""
        with self._lock:
            self._orphaned = True

    def worker_done(self) -> None:
        with self._lock:
            orphaned = self._orphaned
        if orphaned:
            self.release()


_END = object()
_GONE = object()


class PrunerServicer(pb_grpc.PrunerServiceServicer):
    """Receives inputs, runs the library in a worker thread, streams the results.

    A call first takes an upload slot (``max_uploads``) while it receives its
    inputs, within ``upload_deadline`` and ``upload_idle_timeout``; a Prune then
    takes a job slot (``max_jobs``), an Inspect an inspect slot
    (``max_inspects``). No free slot: RESOURCE_EXHAUSTED with RetryInfo at
    once. A job's slot is free again only once its worker thread has ended.
    """

    def __init__(self, config: ServerConfig, store: JobStore | None = None, runner: Runner | None = None) -> None:
        self.config = config
        self.store = store
        self.runner = runner
        self._watches = threading.BoundedSemaphore(config.watch_slots)
        self._jobs = threading.BoundedSemaphore(config.max_jobs)
        self._uploads = threading.BoundedSemaphore(config.upload_slots)
        self._inspects = threading.BoundedSemaphore(config.max_inspects)
        self._threads = max(1, usable_cpus() // config.max_jobs)
        self._calls: set[_Job] = set()
        self._changed = threading.Condition()
        self._closing = False

    # -- bookkeeping of calls, for a shutdown that tells every call what happened

    def _enter(self, job: _Job) -> None:
        with self._changed:
            if self._closing:
                raise errors.ServerUnavailableError(_SHUTTING_DOWN)
            self._calls.add(job)

    def _leave(self, job: _Job) -> None:
        with self._changed:
            self._calls.discard(job)
            self._changed.notify_all()

    def shut_down(self, grace: float) -> None:
        """Refuses new calls, lets running ones go on for ``grace`` seconds, then cancels them.

        Returns once every call has sent its status (or after ``SHUTDOWN_SECONDS`` more).
        """
        deadline = time.monotonic() + grace
        with self._changed:
            self._closing = True
            self._changed.wait_for(lambda: not self._calls, timeout=grace)
            running = list(self._calls)
        for job in running:
            job.cancel("shutdown")
        with self._changed:
            self._changed.wait_for(lambda: not self._calls, timeout=SHUTDOWN_SECONDS)
        if self.runner is not None:  # job processes get what is left of the grace, then are re-queued
            self.runner.stop(max(0.0, deadline - time.monotonic()))

    @staticmethod
    def _take(semaphore: threading.BoundedSemaphore, busy: str) -> None:
        if not semaphore.acquire(blocking=False):
            raise errors.ServerBusyError(busy)

    def _busy_jobs(self) -> str:
        return f"the server is running its maximum of {self.config.max_jobs} job(s); retry later"

    @contextlib.contextmanager
    def _upload(self) -> Iterator[None]:
        self._take(
            self._uploads, f"the server is receiving its maximum of {self.config.upload_slots} upload(s); retry later"
        )
        try:
            yield
        finally:
            self._uploads.release()

    # -- receiving

    def _requests(self, requests: Iterator[Any], job: _Job) -> Iterator[Any]:
        """The call's requests, each within the idle timeout and all within the upload deadline.

        A helper thread blocks in gRPC's iterator; this generator waits on its
        queue with timeouts, so a silent client cannot hold the call. When the
        call ends (status sent, or cancelled), gRPC wakes the helper and it ends.
        """
        inbox: queue.Queue[Any] = queue.Queue(maxsize=2)
        done = threading.Event()

        def put(item: Any) -> None:
            while not done.is_set():
                try:
                    inbox.put(item, timeout=_POLL)
                    return
                except queue.Full:
                    continue

        def read() -> None:
            try:
                for request in requests:
                    put(request)
                    if done.is_set():
                        return
                put(_END)
            except grpc.RpcError:  # cancelled by the client, or the transport gave up
                put(_GONE)
            except Exception:  # our bug: let the handler report it
                logger.exception("job %s: reading the request stream failed", job.id)
                put(_GONE)

        reader = threading.Thread(target=read, name=f"upload-{job.id}", daemon=True)
        reader.start()
        deadline = job.started + self.config.upload_deadline
        idle = self.config.upload_idle_timeout
        quiet_until = time.monotonic() + idle
        try:
            while True:
                if job.stop.is_set():
                    raise self._stopped(job)
                now = time.monotonic()
                if now >= deadline:
                    raise errors.TimeLimitError(
                        f"the request stream took longer than the server's upload deadline of "
                        f"{self.config.upload_deadline:g} s (upload_deadline)"
                    )
                if now >= quiet_until:
                    raise errors.TimeLimitError(
                        f"no message for {idle:g} s, the server's upload idle timeout (upload_idle_timeout)"
                    )
                try:
                    item = inbox.get(timeout=min(_POLL, deadline - now, quiet_until - now))
                except queue.Empty:
                    continue
                if item is _END:
                    return
                if item is _GONE:
                    raise self._stopped(job)
                if isinstance(item, _Undecodable):
                    raise item.problem()
                quiet_until = time.monotonic() + idle
                yield item
                del item
        finally:
            done.set()
            while not inbox.empty():  # drop what the helper had queued
                inbox.get_nowait()

    @staticmethod
    def _stopped(job: _Job) -> pruner.PrunerError:
        if job.reason == "shutdown":
            return errors.ServerUnavailableError(_SHUTTING_DOWN)
        if job.reason == "time limit":
            return errors.TimeLimitError("the job exceeded the server's time limit (job_time_limit)")
        return pruner.CancelledError("the client cancelled the call or went away")

    @classmethod
    def _missing(cls, job: _Job, message: str, field: str) -> pruner.PrunerError:
        """A request stream that ended too early: a bad request, or a cancel that arrived as its end."""
        return cls._stopped(job) if job.gone(wait=0.5) else _bad(message, field)

    @staticmethod
    def _chunk(data: bytes, field: str) -> bytes:
        if len(data) > convert.CHUNK_BYTES:
            raise _bad(
                f"a {field} of {len(data)} bytes is over the limit of {convert.CHUNK_BYTES} bytes per chunk; "
                "send smaller chunks",
                field,
            )
        return data

    @classmethod
    def _add(cls, buffer: bytearray, data: bytes, field: str, what: str, limit: int, setting: str) -> None:
        cls._chunk(data, field)
        if len(buffer) + len(data) > limit:
            raise pruner.ResourceLimitError(
                f"the {what} exceeds the server's limit of {limit} bytes ({setting})", setting
            )
        buffer += data

    def _receive(self, requests: Iterator[pb.PruneRequest], job: _Job, *, decode: bool = True) -> dict[str, Any]:
        """The inputs of a ``Prune`` or ``SubmitJob`` stream, checked. ``decode=False`` (a submit,
        whose job runs elsewhere) checks an ``.npz`` eval set a chunk at a time and leaves
        ``evalset`` None: the server never holds its decoded arrays."""
        config: pb.PruneConfig | None = None
        model = bytearray()
        npz = bytearray()
        tensors = convert.EvalTensors(max_bytes=self.config.max_eval_bytes)
        limit = self.config.max_eval_bytes
        for request in requests:
            kind = request.WhichOneof("payload")
            if kind is None:
                raise _bad("a PruneRequest carries nothing", "payload")
            if config is None and kind != "config":
                raise _bad("the first PruneRequest must carry the config", "config")
            if kind == "config":
                if config is not None:
                    raise _bad("the config was sent twice", "config")
                config = request.config
                # a bad config (an uninstalled metric plugin, say) is refused before the upload
                options = convert.options_from_proto(config, threads=self._threads)
            elif kind == "model_chunk":
                self._add(model, request.model_chunk, kind, "model", self.config.max_model_bytes, "max_model_bytes")
                job.model_bytes = len(model)
            elif kind == "eval_npz_chunk":
                self._add(npz, request.eval_npz_chunk, kind, "eval set", limit, "max_eval_bytes")
                job.eval_bytes = len(npz)
            elif kind == "eval_tensor":
                self._chunk(request.eval_tensor.tensor_proto, "eval_tensor.tensor_proto")
                tensors.start(request.eval_tensor)
                job.eval_bytes = tensors.decoded_bytes
            else:
                tensors.add(self._chunk(request.eval_tensor_data, "eval_tensor_data"))
            if job.eval_bytes > limit:
                message = f"the eval set exceeds the server's limit of {limit} bytes (max_eval_bytes)"
                raise pruner.ResourceLimitError(message, "max_eval_bytes")
        if config is None:
            raise self._missing(job, "no config was sent", "config")
        if not model:
            raise self._missing(job, "no model was sent", "model_chunk")
        if npz and tensors:
            raise _bad("send the eval set as .npz chunks or as tensors, not both", "eval_npz_chunk")
        if not npz and not tensors:
            raise self._missing(job, "no eval set was sent", "eval_npz_chunk")
        evalset = None
        if tensors:
            evalset = tensors.evalset()
        else:
            try:
                if decode:
                    evalset = pruner.load_eval_set(bytes(npz), max_bytes=limit)
                else:
                    pruner.verify_eval_set(npz, max_bytes=limit)
            except pruner.ResourceLimitError as e:
                e.subject = e.subject or "max_eval_bytes"
                raise
        return {"options": options, "model": bytes(model), "evalset": evalset, "config": config, "npz": npz}

    # -- Prune

    def Prune(self, request_iterator: Iterator[pb.PruneRequest], context: grpc.ServicerContext) -> Iterator[Any]:
        job = _Job("Prune", uuid.uuid4().hex[:12], time.monotonic(), context=context)
        context.add_callback(job.stop.set)  # cancel, deadline, or the call ending for any reason
        try:
            try:
                self._enter(job)
                # refuse at once when every job slot is taken, before the client sends its inputs
                self._take(self._jobs, self._busy_jobs())
                self._jobs.release()
                with self._upload():
                    inputs = self._receive(self._requests(request_iterator, job), job)
                # the slot is taken only now that the inputs are complete
                self._take(self._jobs, self._busy_jobs())
                yield from self._run(job, inputs, _Slot(self._jobs))
            except BaseException as error:
                self._fail(job, context, error)
            finally:
                self._leave(job)
        finally:
            job.stop.set()
            _release_memory()

    def _run(self, job: _Job, inputs: dict[str, Any], slot: _Slot) -> Iterator[pb.PruneResponse]:
        events: queue.Queue[pruner.ProgressEvent | None] = queue.Queue()
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["result"] = pruner.prune(
                    inputs.pop("model"), inputs.pop("evalset"), inputs.pop("options"),
                    on_progress=events.put, stop=job.stop,
                )  # fmt: skip
            except BaseException as e:
                outcome["error"] = e
            finally:
                events.put(None)
                slot.worker_done()

        timer = threading.Timer(self.config.job_time_limit, job.cancel, ("time limit",))
        timer.daemon = True
        worker = threading.Thread(target=work, name=f"job-{job.id}", daemon=True)
        try:
            timer.start()
            worker.start()
            while True:
                try:
                    event = events.get(timeout=_POLL)
                except queue.Empty:
                    if job.stop.is_set():  # cancelled: the worker has JOIN_SECONDS to notice
                        break
                    continue
                if event is None:
                    break
                yield pb.PruneResponse(progress=convert.event_to_proto(event))
        finally:
            # also on GeneratorExit (the client went): the slot is free only when the worker is
            timer.cancel()
            if worker.is_alive():
                job.stop.set()
            self._join(job, worker, slot)
        if not outcome:  # the worker runs on, orphaned
            raise self._stopped(job)
        error = outcome.pop("error", None)
        if error is not None:
            if isinstance(error, pruner.CancelledError):
                raise self._stopped(job) from None
            raise error
        result: pruner.PruneResult = outcome.pop("result")
        report = result.report
        data = result.model_bytes if result.model_bytes is not None else result.model.SerializeToString()
        del result  # the parsed model is not needed any more: only its bytes go out
        yield pb.PruneResponse(
            result=pb.PruneResult(
                report_json=report.to_json(),
                status=report.status,
                model_size=len(data),
                model_sha256=hashlib.sha256(data).hexdigest(),
            )
        )
        view = memoryview(data)
        for start in range(0, len(data), convert.CHUNK_BYTES):
            yield pb.PruneResponse(model_chunk=bytes(view[start : start + convert.CHUNK_BYTES]))
        job.log("ok", status=report.status, sparsity=round(report.sparsity, 4))

    def _join(self, job: _Job, worker: threading.Thread, slot: _Slot) -> None:
        if worker.ident is not None:
            worker.join(JOIN_SECONDS)
        if worker.is_alive():
            slot.orphan()
            logger.error(
                json.dumps(
                    {
                        "event": "worker-ignores-stop",
                        "job": job.id,
                        "seconds": JOIN_SECONDS,
                        "message": "the job's worker runs on after its call ended; its slot stays taken until it ends",
                    }
                )
            )
            if not worker.is_alive():  # it ended between the join and orphan(): release here
                slot.release()
        else:
            slot.release()

    # -- Inspect

    def Inspect(self, request_iterator: Iterator[pb.InspectRequest], context: grpc.ServicerContext) -> Any:
        job = _Job("Inspect", uuid.uuid4().hex[:12], time.monotonic(), context=context)
        context.add_callback(job.stop.set)
        try:
            try:
                self._enter(job)
                with self._upload():
                    config, model = self._receive_inspect(self._requests(request_iterator, job), job)
                self._take(
                    self._inspects,
                    f"the server is running its maximum of {self.config.max_inspects} inspection(s); retry later",
                )
                try:
                    inspection = pruner.inspect(model, include=tuple(config.include), exclude=tuple(config.exclude))
                finally:
                    self._inspects.release()
                job.log("ok")
                return convert.inspection_to_proto(inspection)
            except BaseException as error:
                self._fail(job, context, error)
            finally:
                self._leave(job)
        finally:
            _release_memory()

    def _receive_inspect(self, requests: Iterator[pb.InspectRequest], job: _Job) -> tuple[pb.InspectConfig, bytes]:
        config = pb.InspectConfig()
        model = bytearray()
        for i, request in enumerate(requests):
            kind = request.WhichOneof("payload")
            if kind == "config":
                if i:
                    raise _bad("the config must come first", "config")
                config = request.config
            elif kind == "model_chunk":
                self._add(model, request.model_chunk, kind, "model", self.config.max_model_bytes, "max_model_bytes")
                job.model_bytes = len(model)
            else:
                raise _bad("an InspectRequest carries nothing", "payload")
        if not model:
            raise self._missing(job, "no model was sent", "model_chunk")
        return config, bytes(model)

    # -- ListMetrics

    def ListMetrics(self, request: pb.ListMetricsRequest, context: grpc.ServicerContext) -> Any:
        """The built-in metrics and the plugins installed here; takes no slot."""
        job = _Job("ListMetrics", uuid.uuid4().hex[:12], time.monotonic(), context=context)
        try:
            response = convert.metrics_to_proto()
            job.log("ok")
            return response
        except BaseException as error:
            self._fail(job, context, error)

    # -- durable jobs

    def _job_store(self) -> JobStore:
        if self.store is None:
            raise _NoJobStore("this server runs without a job store (no --artifacts); use Prune")
        return self.store

    def _get_job(self, job_id: str) -> Job:
        if not job_id:
            raise _bad("job_id is empty", "job_id")
        job = self._job_store().get(job_id)
        if job is None:
            raise errors.JobNotFoundError(f"no job has the id {job_id!r} (never submitted, or removed by retention)")
        return job

    def _unary(self, name: str, context: grpc.ServicerContext, work: Callable[[], Any]) -> Any:
        call = _Job(name, uuid.uuid4().hex[:12], time.monotonic(), context=context)
        try:
            response = work()
            call.log("ok")
            return response
        except BaseException as error:
            self._fail(call, context, error)

    def SubmitJob(self, request_iterator: Iterator[pb.SubmitJobRequest], context: grpc.ServicerContext) -> Any:
        job = _Job("SubmitJob", uuid.uuid4().hex[:12], time.monotonic(), context=context)
        context.add_callback(job.stop.set)
        try:
            try:
                store = self._job_store()
                self._enter(job)
                keys: list[str] = []

                def prune_requests() -> Iterator[pb.PruneRequest]:
                    for i, request in enumerate(self._requests(request_iterator, job)):
                        kind = request.WhichOneof("payload")
                        if kind == "idempotency_key":
                            if i:
                                raise _bad("the idempotency_key must come in the first message", "idempotency_key")
                            if len(request.idempotency_key) > MAX_KEY:
                                raise _bad(f"the idempotency_key is over {MAX_KEY} characters", "idempotency_key")
                            keys.append(request.idempotency_key)
                        elif kind == "prune":
                            yield request.prune
                        else:
                            raise _bad("a SubmitJobRequest carries nothing", "payload")

                with self._upload():
                    inputs = self._receive(prune_requests(), job, decode=False)
                npz = inputs["npz"] or _npz(inputs["evalset"])  # the upload as it came, not a copy
                blobs = {
                    "model": store.put_blob([inputs.pop("model")])[0],
                    "eval": store.put_blob([npz])[0],
                    "config": store.put_blob([inputs["config"].SerializeToString()])[0],
                }
                inputs.clear()
                del npz
                stored, created = store.submit(blobs, idempotency_key=(keys[0] if keys else "") or None)
                job.log("ok", job_id=stored.id, created=created)
                return pb.SubmitJobResponse(job_id=stored.id, created=created)
            except BaseException as error:
                self._fail(job, context, error)
            finally:
                self._leave(job)
        finally:
            job.stop.set()
            _release_memory()

    def WatchJob(self, request: pb.WatchJobRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        call = _Job("WatchJob", uuid.uuid4().hex[:12], time.monotonic(), context=context)
        try:
            try:
                self._enter(call)
                job = self._get_job(request.job_id)
                self._take(self._watches, f"the server is serving its maximum of {self.config.watch_slots} watches")
                try:
                    yield from self._watch(job, request.from_event, call)
                finally:
                    self._watches.release()
                call.log("ok", job_id=job.id)
            except BaseException as error:
                self._fail(call, context, error)
            finally:
                self._leave(call)
        finally:
            call.stop.set()

    def _watch(self, job: Job, start: int, call: _Job) -> Iterator[pb.WatchJobResponse]:
        store = self._job_store()
        index = start
        while True:
            if self._closing:
                raise errors.ServerUnavailableError(_SHUTTING_DOWN)
            if call.gone():
                return
            batch = store.events(job.id, index)
            for number, payload in batch:
                progress = pb.ProgressEvent.FromString(payload)
                yield pb.WatchJobResponse(event=pb.JobEvent(index=number, progress=progress))
                index = number + 1
            if batch:
                continue
            current = store.get(job.id)
            if current is None:
                raise errors.JobNotFoundError(f"the job {job.id!r} was removed by retention while it was watched")
            if current.state in FINISHED:
                if current.events > index:  # events appended just before it finished
                    continue
                yield pb.WatchJobResponse(job=_job_to_proto(current, store))
                return
            time.sleep(_WATCH_POLL)

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> Any:
        return self._unary(
            "GetJob",
            context,
            lambda: pb.GetJobResponse(job=_job_to_proto(self._get_job(request.job_id), self._job_store())),
        )

    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> Any:
        def cancel() -> pb.CancelJobResponse:
            job = self._get_job(request.job_id)
            try:
                job = self._job_store().request_cancel(job.id)
            except KeyError:  # removed by retention meanwhile
                raise errors.JobNotFoundError(f"no job has the id {request.job_id!r}") from None
            return pb.CancelJobResponse(job=_job_to_proto(job, self._job_store()))

        return self._unary("CancelJob", context, cancel)

    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> Any:
        def listing() -> pb.ListJobsResponse:
            limit = min(request.limit or MAX_LIST, MAX_LIST)
            states = []
            for value in request.states:
                if value not in _STATES_FROM_PROTO:
                    raise _bad(f"states has an unknown value {value}", "states")
                states.append(_STATES_FROM_PROTO[value])
            jobs = self._job_store().list(limit=limit, states=states)
            return pb.ListJobsResponse(jobs=[_job_to_proto(job, self._job_store(), report=False) for job in jobs])

        return self._unary("ListJobs", context, listing)

    def DownloadResult(self, request: pb.DownloadResultRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        call = _Job("DownloadResult", uuid.uuid4().hex[:12], time.monotonic(), context=context)
        try:
            self._enter(call)
            job = self._get_job(request.job_id)
            if job.state is not JobState.SUCCEEDED or job.result is None:
                raise errors.JobStateError(
                    f"the job {job.id} is {job.state.value}, not succeeded: it has no result to download"
                )
            try:
                path = self._job_store().blob_path(job.result)
                size = path.stat().st_size
            except (KeyError, OSError):
                raise errors.JobNotFoundError(f"the result of job {job.id} was removed by retention") from None
            if request.offset > size:
                raise _bad(f"offset {request.offset} is past the end of the {size}-byte result", "offset")
            self._take(self._watches, f"the server is serving its maximum of {self.config.watch_slots} downloads")
            try:
                with open(path, "rb") as handle:
                    handle.seek(request.offset)
                    offset = request.offset
                    while True:
                        if self._closing:
                            raise errors.ServerUnavailableError(_SHUTTING_DOWN)
                        chunk = handle.read(convert.CHUNK_BYTES)
                        if not chunk and offset < size:
                            raise pruner.InternalError(f"the result blob of job {job.id} is shorter than its size")
                        yield pb.DownloadResultResponse(offset=offset, chunk=chunk, total_size=size, sha256=job.result)
                        offset += len(chunk)
                        if offset >= size:
                            break
            finally:
                self._watches.release()
            call.log("ok", job_id=job.id, offset=request.offset)
        except BaseException as error:
            self._fail(call, context, error)
        finally:
            self._leave(call)

    # -- failing

    def _fail(self, job: _Job, context: grpc.ServicerContext, error: BaseException) -> None:
        """Logs how the call ended, at a level that says whose fault it was, and ends it with its status."""
        if isinstance(error, GeneratorExit):  # gRPC closed the response stream: the client went
            job.log("CANCELLED", reason="the client cancelled or went away while results streamed")
            raise error
        if isinstance(error, _NoJobStore):
            job.log("UNIMPLEMENTED")
            context.abort(grpc.StatusCode.UNIMPLEMENTED, str(error))
        if isinstance(error, pruner.CancelledError) and job.reason is None:
            job.log("CANCELLED", reason="the client cancelled or went away")
            error.__traceback__ = None
            context.abort_with_status(errors.to_status(error))  # ignored by gRPC on a cancelled call
            return
        code = errors.row_of(error).code
        message: str | None = None
        level = logging.INFO
        if code is grpc.StatusCode.INTERNAL:
            message = f"internal error (job {job.id}); the server's log has the details"
            logger.error("job %s failed", job.id, exc_info=error)
            level = logging.ERROR
        elif code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
            level = logging.WARNING
        details = {"error": message or str(error)}
        if isinstance(error, pruner.ResourceLimitError) and error.subject:
            details["limit"] = error.subject
        job.log(code.name, level, **details)
        status = errors.to_status(error, message)
        error.__traceback__ = None  # its frames hold the job's model and arrays
        context.abort_with_status(status)


_SHUTTING_DOWN = "the server is shutting down; retry on another replica or later"
MAX_KEY = 200
"""Characters of an idempotency key."""
MAX_LIST = 1000
_WATCH_POLL = 0.2

_STATES = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}
_STATES_FROM_PROTO = {number: state for state, number in _STATES.items()}


class _NoJobStore(Exception):
    """A job RPC on a server without a job store: UNIMPLEMENTED, as on a server that predates them."""


def _npz(evalset: pruner.EvalSet) -> bytes:
    """An eval set sent as tensors, stored as the .npz a worker reads."""
    arrays = dict(evalset.inputs)
    if evalset.labels is not None:
        arrays["labels"] = evalset.labels
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _job_to_proto(job: Job, store: JobStore, *, report: bool = True) -> pb.Job:
    out = pb.Job(
        job_id=job.id,
        state=_STATES[job.state],
        created=job.created,
        updated=job.updated,
        idempotency_key=job.idempotency_key or "",
        attempts=job.attempts,
        cancel_requested=job.cancel_requested,
        events=job.events,
    )
    if job.report_json and job.state is JobState.SUCCEEDED:
        with contextlib.suppress(ValueError, AttributeError):
            out.status = str(json.loads(job.report_json).get("status", ""))
        if report:
            out.report_json = job.report_json
    if job.error_code:
        out.error_code = job.error_code
        out.error_message = job.error_message or ""
        code = errors.row_of(errors.error_named(job.error_code, "")).code
        if job.state is JobState.CANCELLED:
            code = grpc.StatusCode.CANCELLED
        out.error_status = code.value[0]
    if job.result and job.state is JobState.SUCCEEDED:
        out.result_sha256 = job.result
        with contextlib.suppress(KeyError, OSError):  # removed by retention: size 0, and NOT_FOUND on download
            out.result_size = store.blob_path(job.result).stat().st_size
    return out


@dataclass(frozen=True)
class _Undecodable:
    """A request message that does not parse as the method's request type."""

    method: str
    error: str

    def problem(self) -> pruner.InvalidInputError:
        return _bad(
            f"a request message of {self.method} is not a valid protobuf message of its type ({self.error})",
            "request",
        )


class _DecodeCheck(grpc.ServerInterceptor):  # type: ignore[misc]
    """Makes a request message that does not parse INVALID_ARGUMENT, not gRPC's INTERNAL.

    gRPC ends a call whose request cannot be deserialized with INTERNAL, a status that
    must mean a bug of ours. Each service method's deserializer is wrapped to hand an
    :class:`_Undecodable` on instead; request streams raise its problem where they are
    read (``PrunerServicer._requests``), single requests before the method runs.
    """

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = continuation(details)
        if (
            handler is None
            or handler.request_deserializer is None
            or not details.method.startswith(f"/{SERVICE_NAME}/")
        ):
            return handler
        parse, method = handler.request_deserializer, details.method

        def tolerant(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as e:  # protobuf raises DecodeError, and others on hostile bytes
                return _Undecodable(method, str(e) or type(e).__name__)

        handler = handler._replace(request_deserializer=tolerant)
        if handler.request_streaming:
            return handler
        behaviour = handler.unary_unary or handler.unary_stream

        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                context.abort_with_status(errors.to_status(request.problem()))
            return behaviour(request, context)

        field = "unary_unary" if handler.unary_unary else "unary_stream"
        return handler._replace(**{field: checked})


class _TokenCheck(grpc.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls without ``authorization: Bearer <token>`` (health checks excepted)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = continuation(details)
        if handler is None or details.method.startswith(f"/{health.SERVICE_NAME}/"):
            return handler
        sent = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(str(sent).encode(), self._expected):
            return handler
        return _refusal(handler, details.method)


def _refusal(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        error = errors.AuthenticationError("missing or wrong bearer token; send 'authorization: Bearer <token>'")
        logger.info(json.dumps({"event": "refused", "outcome": "UNAUTHENTICATED", "method": method}))
        context.abort_with_status(errors.to_status(error))

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


def create_server(config: ServerConfig) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started-ready (not yet started) server; returns it, its bound port and its health servicer."""
    server, port, health_servicer, _ = _build(config)
    return server, port, health_servicer


def _build(config: ServerConfig) -> tuple[grpc.Server, int, health.HealthServicer, PrunerServicer]:
    interceptors: list[grpc.ServerInterceptor] = [_DecodeCheck()]
    if config.token:
        interceptors.insert(0, _TokenCheck(config.token))
    # a thread per call that can hold a slot, and some for health checks and refusals
    threads = config.upload_slots + config.max_jobs + config.max_inspects + config.watch_slots + 8
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=[
            ("grpc.so_reuseport", 0),
            # one message of a request stream: a chunk of at most CHUNK_BYTES and its framing
            ("grpc.max_receive_message_length", convert.MAX_MESSAGE_BYTES),
        ],
    )
    store, runner = _jobs(config)
    servicer = PrunerServicer(config, store, runner)
    pb_grpc.add_PrunerServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if config.tls_cert and config.tls_key:
        credentials = grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
        )
        port = server.add_secure_port(config.address, credentials)
    else:
        port = server.add_insecure_port(config.address)
    if port == 0:
        raise OSError(f"cannot listen on {config.address}")
    return server, port, health_servicer, servicer


def _jobs(config: ServerConfig) -> tuple[JobStore | None, Runner | None]:
    """The job store and its runner (started), or none without an artifacts folder.

    Raises:
        ValueError: the store's URL has an unknown scheme, or its database cannot be reached.
    """
    if config.artifacts is None:
        return None, None
    artifacts = Path(config.artifacts).expanduser().resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    store = open_store(config.store_url, artifacts)
    runner = Runner(
        store,
        store_url=config.store_url,
        artifacts=artifacts,
        replica_id=config.replica_id or f"{socket.gethostname()}-{os.getpid()}",
        workers=config.workers,
        memory_limit=config.job_memory_limit,
        time_limit=config.job_time_limit,
        threads=max(1, usable_cpus() // config.workers),
        max_eval_bytes=config.max_eval_bytes,
        dead_after=config.job_dead_after,
        retention_ttl=config.retention_ttl,
        retention_max_bytes=config.retention_max_bytes,
        executor=config.executor,
        ray_address=config.ray_address,
        ray_workers=config.ray_workers,
    )
    runner.start()
    return store, runner


def set_serving(health_servicer: health.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, status)


class _JsonLogs(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        try:
            fields = json.loads(message)
        except ValueError:
            fields = {"message": message}
        out = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name, **fields}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _env(name: str, default: Any) -> Any:
    return os.environ.get(f"ONNX_PRUNER_{name.upper()}", default)


def _parser() -> argparse.ArgumentParser:
    d = ServerConfig()
    p = argparse.ArgumentParser(prog="python -m service", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--address", default=_env("address", d.address), help="host:port to listen on")
    p.add_argument("--max-jobs", type=int, default=_env("max_jobs", d.max_jobs), help="jobs run at once")
    p.add_argument("--max-uploads", type=int, default=_env("max_uploads", None),
                   help="calls receiving their inputs at once (default: 4 x max-jobs)")  # fmt: skip
    p.add_argument("--max-inspects", type=int, default=_env("max_inspects", d.max_inspects),
                   help="Inspect calls run at once, apart from the jobs")  # fmt: skip
    p.add_argument("--max-model-bytes", type=int, default=_env("max_model_bytes", d.max_model_bytes))
    p.add_argument("--max-eval-bytes", type=int, default=_env("max_eval_bytes", d.max_eval_bytes))
    p.add_argument("--job-time-limit", type=float, default=_env("job_time_limit", d.job_time_limit), help="seconds")
    p.add_argument("--upload-deadline", type=float, default=_env("upload_deadline", d.upload_deadline),
                   help="seconds a call may take to send all its inputs")  # fmt: skip
    p.add_argument("--upload-idle-timeout", type=float, default=_env("upload_idle_timeout", d.upload_idle_timeout),
                   help="seconds a call may leave between two messages")  # fmt: skip
    p.add_argument("--grace", type=float, default=_env("grace", d.grace), help="seconds jobs get on SIGTERM")
    p.add_argument("--tls-cert", default=_env("tls_cert", None), help="PEM certificate (with --tls-key)")
    p.add_argument("--tls-key", default=_env("tls_key", None), help="PEM private key")
    p.add_argument("--token-file", default=_env("token_file", None), help="file holding the bearer token")
    p.add_argument("--log-level", default=_env("log_level", d.log_level))
    p.add_argument("--artifacts", default=_env("artifacts", "~/.local/share/onnx-pruner"),
                   help="the job store's folder of blobs (inputs and results)")  # fmt: skip
    p.add_argument("--job-store", default=_env("job_store", None),
                   help="sqlite:///PATH or postgresql://... (default sqlite:///ARTIFACTS/jobs.db)")  # fmt: skip
    p.add_argument("--job-workers", type=int, default=_env("job_workers", None),
                   help="stored jobs run at once, each in its own process (default: max-jobs)")  # fmt: skip
    p.add_argument("--job-memory-limit", type=int, default=_env("job_memory_limit", 0),
                   help="address-space limit of each job process in bytes (RLIMIT_AS; 0: none)")  # fmt: skip
    p.add_argument("--replica-id", default=_env("replica_id", None),
                   help="this replica's name in the job store (default HOSTNAME-PID; a stable one re-queues "
                   "this replica's running jobs at once on restart)")  # fmt: skip
    p.add_argument("--retention-ttl", type=float, default=_env("retention_ttl", None),
                   help="seconds finished jobs are kept (default: forever)")  # fmt: skip
    p.add_argument("--retention-max-bytes", type=int, default=_env("retention_max_bytes", None),
                   help="most bytes of blobs kept; oldest finished jobs go first (default: no limit)")  # fmt: skip
    p.add_argument("--job-dead-after", type=float, default=_env("job_dead_after", d.job_dead_after),
                   help="seconds without a heartbeat after which another replica's jobs re-run")  # fmt: skip
    p.add_argument("--executor", choices=("local", "ray"), default=_env("executor", d.executor),
                   help="where stored jobs run evaluations, calibration and probes (ray: the ray extra)")  # fmt: skip
    p.add_argument("--ray-address", default=_env("ray_address", None),
                   help="--executor ray: host:port or ray://HOST:10001 (default: a Ray per job)")  # fmt: skip
    p.add_argument("--ray-workers", type=int, default=_env("ray_workers", d.ray_workers),
                   help="--executor ray: Ray workers (one CPU each) a job; 0: one per CPU of the cluster")  # fmt: skip
    p.add_argument("--runtime-dir", default=str(healthcheck.runtime_dir()),
                   help="where the server writes server.json (its port and TLS mode) for the health check")  # fmt: skip
    return p


def _connect_host(address: str) -> str:
    host = address.rsplit(":", 1)[0].strip("[]")
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "*") else host


def _write_runtime(directory: str, config: ServerConfig, port: int) -> Path | None:
    """Tells the local health check where this server really listens (atomically)."""
    info = {"pid": os.getpid(), "host": _connect_host(config.address), "port": port, "tls_cert": config.tls_cert}
    try:
        path = Path(directory)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = path / "server.json"
        partial = path / f".server.json.{os.getpid()}"
        partial.write_text(json.dumps(info))
        partial.replace(target)
        return target
    except OSError as e:
        logger.warning(json.dumps({"event": "no-runtime-file", "directory": directory, "error": str(e)}))
        return None


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token from --token-file or ONNX_PRUNER_TOKEN; an empty one is an error, never "no auth"."""
    if args.token_file:
        try:
            text = Path(args.token_file).read_text()
        except OSError as e:
            raise ValueError(f"cannot read the token file: {e}") from e
        if not text.strip():
            raise ValueError(f"the token file {args.token_file} is empty; put the bearer token in it")
        return text.strip()
    env = os.environ.get("ONNX_PRUNER_TOKEN")
    if env is not None and not env.strip():
        raise ValueError("ONNX_PRUNER_TOKEN is set but empty; set the bearer token, or unset it to run without auth")
    return None if env is None else env.strip()


def main(argv: list[str] | None = None) -> int:
    _limit_malloc_arenas()
    args = _parser().parse_args(argv)
    try:
        token = _token(args)
        config = ServerConfig(
            address=args.address,
            max_jobs=int(args.max_jobs),
            max_uploads=None if args.max_uploads is None else int(args.max_uploads),
            max_inspects=int(args.max_inspects),
            max_model_bytes=int(args.max_model_bytes),
            max_eval_bytes=int(args.max_eval_bytes),
            job_time_limit=float(args.job_time_limit),
            upload_deadline=float(args.upload_deadline),
            upload_idle_timeout=float(args.upload_idle_timeout),
            grace=float(args.grace),
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            token=token,
            log_level=str(args.log_level).upper(),
            artifacts=str(args.artifacts),
            job_store=args.job_store or None,
            job_workers=None if args.job_workers is None else int(args.job_workers),
            job_memory_limit=int(args.job_memory_limit),
            replica_id=args.replica_id or None,
            retention_ttl=None if args.retention_ttl is None else float(args.retention_ttl),
            retention_max_bytes=None if args.retention_max_bytes is None else int(args.retention_max_bytes),
            job_dead_after=float(args.job_dead_after),
            executor=str(args.executor),
            ray_address=args.ray_address or None,
            ray_workers=int(args.ray_workers),
        )
    except ValueError as e:
        print(f"onnx-pruner server: error: {e}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler()
    handler.setFormatter(_JsonLogs())
    logging.basicConfig(level=config.log_level, handlers=[handler], force=True)
    try:
        server, port, health_servicer, servicer = _build(config)
    except (OSError, ValueError) as e:  # an unreadable certificate or key, a port in use, a bad job store
        print(f"onnx-pruner server: error: {e}", file=sys.stderr)
        return 2
    server.start()
    runtime = _write_runtime(args.runtime_dir, config, port)
    set_serving(health_servicer, True)
    serving = {
        "event": "serving",
        "address": config.address,
        "port": port,
        "max_jobs": config.max_jobs,
        "max_uploads": config.upload_slots,
        "max_inspects": config.max_inspects,
        "job_store": config.store_url.split(":", 1)[0] if servicer.runner is not None else None,
        "job_workers": config.workers,
        "replica_id": servicer.runner.replica_id if servicer.runner is not None else None,
    }
    logger.info(json.dumps({**serving, "tls": bool(config.tls_cert), "auth": bool(token)}))
    signalled: list[int] = []
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        signalled.append(signum)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stopping.wait(0.5):
        pass
    logger.info(json.dumps({"event": "stopping", "signal": signalled[0], "grace": config.grace}))
    health_servicer.enter_graceful_shutdown()  # NOT_SERVING for every service, for good
    # calls end with UNAVAILABLE "shutting down" before gRPC's own stop would cancel them
    servicer.shut_down(config.grace)
    server.stop(SHUTDOWN_SECONDS).wait()
    if runtime is not None:
        with contextlib.suppress(OSError):
            if json.loads(runtime.read_text()).get("pid") == os.getpid():
                runtime.unlink()
    logger.info(json.dumps({"event": "stopped"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
