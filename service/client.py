"""The gRPC client: runs ``prune`` and ``inspect`` on a server (the CLI's ``--server`` mode).

A failed call raises the error class of the one table in :mod:`service.errors`
(``pruner.InvalidInputError`` and its subtree, ``ServerBusyError``,
``ServerUnavailableError``, ...), the same classes a local run raises, so callers
handle local and remote failures with the same code. A finished job returns what
``pruner.prune`` returns, a ``pruner.PruneResult``, so its results are handled
(and saved) with the same code too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import grpc
import onnx
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

import pruner
from service import convert, errors
from service._gen.onnxpruner.v1 import pruner_pb2 as pb
from service._gen.onnxpruner.v1 import pruner_pb2_grpc as pb_grpc

__all__ = ["CONNECT_TIMEOUT", "RECONNECT_SECONDS", "Connection", "JobUpdate", "check_target"]

Source = str | os.PathLike[str] | bytes

CONNECT_TIMEOUT = 10.0
"""Seconds to wait for a connection before a call fails with ``ServerUnavailableError``."""
RECONNECT_SECONDS = 120.0
"""How long :meth:`Connection.prune_job` keeps reconnecting to a server that is unavailable."""
_BACKOFF = (0.5, 5.0)
"""The first and the longest wait between two reconnects (doubling)."""

FINISHED = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
JobUpdate = tuple[int, pruner.ProgressEvent] | pb.Job
"""What :meth:`Connection.watch` yields: ``(index, event)``, then the final ``pb.Job``."""
_PRUNER_SERVICE = pb.DESCRIPTOR.services_by_name["PrunerService"].full_name

_TARGET = re.compile(r"(?:\[(?P<v6>[^\[\]]*)\]|(?P<host>[^:\[\]]*)):(?P<port>[^:]*)")


def check_target(target: str, what: str = "the server address") -> str:
    """``target`` if it is ``HOST:PORT`` or ``[IPv6]:PORT``; ``what`` names it in the error.

    Raises:
        pruner.InvalidConfigError: no port (gRPC would silently dial 443), an empty
            host, a port that is not a number from 1 to 65535.
    """
    match = _TARGET.fullmatch(target)
    if match is None:
        raise pruner.InvalidConfigError(
            f"{what} needs HOST:PORT (an IPv6 address in brackets: [::1]:50051), got {target!r}"
        )
    host, port = match["v6"] if match["v6"] is not None else match["host"], match["port"]
    if not host.strip():
        raise pruner.InvalidConfigError(f"{what} needs HOST:PORT with a host, got {target!r}")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise pruner.InvalidConfigError(f"{what} needs HOST:PORT with a port from 1 to 65535, got {target!r}")
    return target


def _chunks(source: Source) -> Iterator[bytes]:
    """The bytes of ``source`` in pieces, read from disk as they are sent."""
    if isinstance(source, (bytes, bytearray)):
        view = memoryview(source)
        for start in range(0, len(view), convert.CHUNK_BYTES):
            yield bytes(view[start : start + convert.CHUNK_BYTES])
        return
    try:
        handle = open(source, "rb")  # closed by the with below
    except FileNotFoundError as e:
        raise pruner.InvalidInputError(f"file {str(source)!r} does not exist") from e
    except OSError as e:
        raise pruner.InvalidInputError(f"cannot read {str(source)!r}: {e.strerror or e}") from e
    with handle:
        while chunk := handle.read(convert.CHUNK_BYTES):
            yield chunk


def _check_readable(*sources: Source) -> None:
    for source in sources:
        if not isinstance(source, (bytes, bytearray)) and not Path(source).is_file():
            raise pruner.InvalidInputError(f"file {str(source)!r} does not exist or is not a file")


def _result(data: bytes, report_json: str) -> pruner.PruneResult:
    """The library's result of a job from what the server sent: the model, and the report,
    which carries the plan."""
    try:
        report = pruner.Report.from_json(report_json)
        plan = pruner.PruningPlan.from_dict(report.plan)
        model = onnx.ModelProto.FromString(data)
    except (DecodeError, ValueError, KeyError, TypeError) as e:
        raise pruner.InternalError(f"the server's result cannot be read: {type(e).__name__}: {e}") from e
    return pruner.PruneResult(model, plan, report, data)


class Connection:
    """A channel to an onnx-pruner server.

    Args:
        target: ``host:port`` or ``[IPv6]:port``.
        token: bearer token, if the server wants one.
        tls_ca: PEM file of the CA that signed the server's certificate; enables TLS.
            ``tls=True`` without it uses the system's roots.
        connect_timeout: seconds a call waits for a connection; a server that
            refuses connections fails at once.

    Raises:
        pruner.InvalidConfigError: ``target`` is not ``host:port``.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls_ca: str | None = None,
        tls: bool = False,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.target = check_target(target)
        self.connect_timeout = connect_timeout
        self._metadata = [("authorization", f"Bearer {token}")] if token else []
        if tls_ca or tls:
            roots = Path(tls_ca).read_bytes() if tls_ca else None
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots))
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.PrunerServiceStub(self.channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.channel.close()

    def _connect(self) -> None:
        """Fail fast when the server cannot be reached: at once when the connection is refused,
        after ``connect_timeout`` when nothing answers (a host that drops packets).

        A health check is the probe: cheap, exempt from the bearer token, and any answer,
        even "no such service", shows that a server is there.
        """
        probe = health_pb2_grpc.HealthStub(self.channel)
        try:
            probe.Check(health_pb2.HealthCheckRequest(service=_PRUNER_SERVICE), timeout=self.connect_timeout)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise errors.ServerUnavailableError(
                    f"cannot reach the server at {self.target}: no answer within {self.connect_timeout:g} s"
                ) from None
            if code is grpc.StatusCode.UNAVAILABLE:
                reason = e.details() if hasattr(e, "details") else ""
                raise errors.ServerUnavailableError(f"cannot reach the server at {self.target}: {reason}") from None

    def _error(self, error: grpc.RpcError) -> pruner.PrunerError:
        """The table's error for a failed call; a connection lost without the server's word says so."""
        mapped = errors.from_rpc_error(error)
        said = hasattr(error, "trailing_metadata") and rpc_status.from_call(error) is not None
        if isinstance(mapped, errors.ServerUnavailableError) and not said:
            return errors.ServerUnavailableError(f"lost the connection to the server at {self.target}: {mapped}")
        return mapped

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prune(
        self,
        model: Source,
        evalset: Source,
        options: pruner.PruneOptions,
        *,
        on_progress: Callable[[pruner.ProgressEvent], None] | None = None,
        timeout: float | None = None,
    ) -> pruner.PruneResult:
        """Run a Prune job on the server.

        Returns:
            What ``pruner.prune`` returns for the same job: the model (``model_bytes``
            as the server sent it), its plan and the report.

        Raises:
            pruner.PrunerError: the class of the table in :mod:`service.errors` that the
                server's status stands for (``InvalidInputError`` with the server's
                message for bad input, ``ServerBusyError``, ``ServerUnavailableError``
                when the server cannot be reached or shuts down, ...), or
                ``pruner.InvalidInputError`` when a local file cannot be read.
        """
        _check_readable(model, evalset)
        self._connect()

        def requests() -> Iterator[pb.PruneRequest]:
            yield pb.PruneRequest(config=convert.options_to_proto(options))
            for chunk in _chunks(model):
                yield pb.PruneRequest(model_chunk=chunk)
            for chunk in _chunks(evalset):
                yield pb.PruneRequest(eval_npz_chunk=chunk)

        calls = self.stub.Prune(requests(), metadata=self._metadata, timeout=timeout)
        result: pb.PruneResult | None = None
        parts: list[bytes] = []
        try:
            for response in calls:
                kind = response.WhichOneof("payload")
                if kind == "progress" and on_progress is not None:
                    on_progress(convert.event_from_proto(response.progress))
                elif kind == "result":
                    result = response.result
                elif kind == "model_chunk":
                    parts.append(response.model_chunk)
        except grpc.RpcError as e:
            raise self._error(e) from None
        except BaseException:
            calls.cancel()
            raise
        if result is None:
            raise pruner.InternalError("the server sent no result")
        data = b"".join(parts)
        if len(data) != result.model_size or hashlib.sha256(data).hexdigest() != result.model_sha256:
            raise pruner.InternalError("the model received does not match the server's digest")
        return _result(data, result.report_json)

    def inspect(
        self,
        model: Source,
        *,
        include: tuple[str, ...] = (),
        exclude: tuple[str, ...] = (),
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """The server's inspection of ``model``, as ``pruner.inspect(...).to_dict()``.

        Raises:
            pruner.PrunerError: as :meth:`prune`.
        """
        _check_readable(model)
        self._connect()

        def requests() -> Iterator[pb.InspectRequest]:
            yield pb.InspectRequest(config=pb.InspectConfig(include=list(include), exclude=list(exclude)))
            for chunk in _chunks(model):
                yield pb.InspectRequest(model_chunk=chunk)

        try:
            response = self.stub.Inspect(requests(), metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as e:
            raise self._error(e) from None
        data: dict[str, Any] = json.loads(response.json)
        return data

    def list_metrics(self, *, timeout: float | None = None) -> pb.ListMetricsResponse:
        """The server's built-in metrics and its installed metric plugins (for ``convert.server_metric``).

        Raises:
            pruner.PrunerError: as :meth:`prune`.
        """
        self._connect()
        try:
            response: pb.ListMetricsResponse = self.stub.ListMetrics(
                pb.ListMetricsRequest(), metadata=self._metadata, timeout=timeout
            )
        except grpc.RpcError as e:
            raise self._error(e) from None
        return response

    # -- durable jobs (docs/jobs.md)

    def submit(
        self,
        model: Source,
        evalset: Source,
        options: pruner.PruneOptions,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> tuple[str, bool]:
        """Store a job on the server: returns ``(job id, created)``.

        ``created`` is False when ``idempotency_key`` named an existing job (nothing new runs).

        Raises:
            pruner.PrunerError: as :meth:`prune`; ``JobsUnsupportedError`` when the server has no job API.
        """
        _check_readable(model, evalset)
        config = convert.options_to_proto(options)
        self._connect()

        def requests() -> Iterator[pb.SubmitJobRequest]:
            if idempotency_key:
                yield pb.SubmitJobRequest(idempotency_key=idempotency_key)
            yield pb.SubmitJobRequest(prune=pb.PruneRequest(config=config))
            for chunk in _chunks(model):
                yield pb.SubmitJobRequest(prune=pb.PruneRequest(model_chunk=chunk))
            for chunk in _chunks(evalset):
                yield pb.SubmitJobRequest(prune=pb.PruneRequest(eval_npz_chunk=chunk))

        try:
            response = self.stub.SubmitJob(requests(), metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as e:
            raise self._job_error(e) from None
        return response.job_id, response.created

    def submit_retrying(
        self,
        model: Source,
        evalset: Source,
        options: pruner.PruneOptions,
        *,
        idempotency_key: str,
        reconnect_seconds: float = RECONNECT_SECONDS,
    ) -> tuple[str, bool, int]:
        """:meth:`submit`, sent again with the same key while the server is unavailable (a
        restart, or a connection dropped mid-upload), with backoff for up to ``reconnect_seconds``
        since the last answer: the job is stored once. Returns ``(job id, created, attempts)``;
        after a retry ``created`` may be False for the job this call's own lost attempt stored. A
        server that cannot be reached at all fails at once."""
        self._connect()
        retry = _Retry(reconnect_seconds)
        attempts = 0
        while True:
            attempts += 1
            try:
                job_id, created = self.submit(model, evalset, options, idempotency_key=idempotency_key)
                return job_id, created, attempts
            except errors.ServerUnavailableError:
                retry.wait()

    def watch(self, job_id: str, from_event: int = 0) -> Iterator[JobUpdate]:
        """The job's progress events from ``from_event`` as ``(index, event)``, then its final status.

        Raises:
            pruner.PrunerError: as :meth:`prune` (``JobNotFoundError`` for an unknown id).
        """
        self._connect()
        calls = self.stub.WatchJob(pb.WatchJobRequest(job_id=job_id, from_event=from_event), metadata=self._metadata)
        try:
            for response in calls:
                if response.WhichOneof("payload") == "event":
                    yield int(response.event.index), convert.event_from_proto(response.event.progress)
                else:
                    yield response.job
                    return
        except grpc.RpcError as e:
            raise self._job_error(e) from None
        finally:
            calls.cancel()
        raise errors.ServerUnavailableError(f"the watch of job {job_id} ended before the job finished")

    def get_job(self, job_id: str, *, timeout: float | None = None) -> pb.Job:
        """The job's status (``pb.Job``). Raises as :meth:`watch`."""
        self._connect()
        try:
            response = self.stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as e:
            raise self._job_error(e) from None
        job: pb.Job = response.job
        return job

    def cancel_job(self, job_id: str, *, timeout: float | None = None) -> pb.Job:
        """Ask the server to cancel the job; its status after the request. Raises as :meth:`watch`."""
        self._connect()
        try:
            response = self.stub.CancelJob(pb.CancelJobRequest(job_id=job_id), metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as e:
            raise self._job_error(e) from None
        job: pb.Job = response.job
        return job

    def list_jobs(self, *, limit: int = 100, timeout: float | None = None) -> list[pb.Job]:
        """The server's jobs, newest first. Raises as :meth:`watch`."""
        self._connect()
        try:
            response = self.stub.ListJobs(pb.ListJobsRequest(limit=limit), metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as e:
            raise self._job_error(e) from None
        return list(response.jobs)

    def download(self, job_id: str, offset: int = 0) -> Iterator[tuple[bytes, int, str]]:
        """The result of a succeeded job from ``offset``, as ``(chunk, total size, sha256)``.

        Raises:
            pruner.PrunerError: as :meth:`watch`; ``JobStateError`` when the job has not succeeded.
        """
        self._connect()
        calls = self.stub.DownloadResult(
            pb.DownloadResultRequest(job_id=job_id, offset=offset), metadata=self._metadata
        )
        try:
            for response in calls:
                if response.offset != offset:
                    raise pruner.InternalError(f"the server sent bytes from {response.offset}, not {offset}")
                offset += len(response.chunk)
                yield response.chunk, int(response.total_size), response.sha256
        except grpc.RpcError as e:
            raise self._job_error(e) from None
        finally:
            calls.cancel()

    def _job_error(self, error: grpc.RpcError) -> pruner.PrunerError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        if code is grpc.StatusCode.UNIMPLEMENTED:
            return JobsUnsupportedError(f"the server at {self.target} runs no job store")
        return self._error(error)

    def prune_job(
        self,
        model: Source,
        evalset: Source,
        options: pruner.PruneOptions,
        *,
        on_progress: Callable[[pruner.ProgressEvent], None] | None = None,
        on_submitted: Callable[[str], None] | None = None,
        reconnect_seconds: float = RECONNECT_SECONDS,
    ) -> pruner.PruneResult:
        """:meth:`prune` as a durable job: submit, watch, download; reconnects by itself.

        A server that is unavailable (restarting, or a dropped connection) is retried with
        backoff for up to ``reconnect_seconds`` since the last answer: the submit with the
        same idempotency key (it runs once), the watch from the event after the last one
        seen, the download from the last byte received. A server without the job API
        gets the one-call :meth:`prune` instead.

        Raises:
            pruner.PrunerError: as :meth:`prune`; a failed job raises its error's class
                (``errors.error_named``), a cancelled one ``pruner.CancelledError``.
        """
        _check_readable(model, evalset)
        try:
            job_id, _, _ = self.submit_retrying(
                model, evalset, options, idempotency_key=uuid.uuid4().hex, reconnect_seconds=reconnect_seconds
            )
        except JobsUnsupportedError:
            return self.prune(model, evalset, options, on_progress=on_progress)
        if on_submitted is not None:
            on_submitted(job_id)
        final = self.follow(job_id, on_progress=on_progress, reconnect_seconds=reconnect_seconds)
        raise_for_job(final)
        data = bytearray()
        self.fetch(job_id, data, reconnect_seconds=reconnect_seconds)
        return _result(bytes(data), final.report_json)

    def follow(
        self,
        job_id: str,
        from_event: int = 0,
        *,
        on_progress: Callable[[pruner.ProgressEvent], None] | None = None,
        reconnect_seconds: float = RECONNECT_SECONDS,
    ) -> pb.Job:
        """Watches the job until it finishes, reconnecting as :meth:`prune_job` does; its final status."""
        retry = _Retry(reconnect_seconds)
        index = from_event
        while True:
            try:
                for update in self.watch(job_id, index):
                    if isinstance(update, tuple):
                        index = update[0] + 1
                        retry.reset()
                        if on_progress is not None:
                            on_progress(update[1])
                    else:
                        return update
            except errors.ServerUnavailableError:
                retry.wait()

    def fetch(
        self, job_id: str, sink: bytearray | BinaryIO, offset: int = 0, *, reconnect_seconds: float = RECONNECT_SECONDS
    ) -> tuple[int, str]:
        """Appends the job's result from ``offset`` to ``sink``, reconnecting as :meth:`prune_job` does.

        Returns ``(size, sha256)`` as the server gave them, once all bytes arrived; the caller checks
        the digest of the whole (``sink`` may hold a part downloaded earlier).
        """
        retry = _Retry(reconnect_seconds)
        size, digest = -1, ""
        while True:
            try:
                for chunk, total, sha256 in self.download(job_id, offset):
                    size, digest = total, sha256
                    if isinstance(sink, bytearray):
                        sink += chunk
                    else:
                        sink.write(chunk)
                    offset += len(chunk)
                    retry.reset()
                if isinstance(sink, bytearray) and (len(sink) != size or hashlib.sha256(sink).hexdigest() != digest):
                    raise pruner.InternalError(f"the result of job {job_id} does not match the server's digest")
                return size, digest
            except errors.ServerUnavailableError:
                retry.wait()


class JobsUnsupportedError(pruner.PrunerError):
    """The server has no job API (an older server, or one started without a job store)."""


def raise_for_job(job: pb.Job) -> None:
    """Nothing for a SUCCEEDED job; the error of its class for a FAILED or CANCELLED one."""
    if job.state == pb.JOB_STATE_SUCCEEDED:
        return
    if job.state == pb.JOB_STATE_CANCELLED:
        raise pruner.CancelledError(job.error_message or f"the job {job.job_id} was cancelled")
    if job.state == pb.JOB_STATE_FAILED:
        raise errors.error_named(job.error_code, job.error_message or f"the job {job.job_id} failed")
    raise errors.JobStateError(f"the job {job.job_id} has not finished")


class _Retry:
    """Waits with doubling backoff; gives up ``seconds`` after the last success."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.reset()

    def reset(self) -> None:
        self.since = time.monotonic()
        self.delay = _BACKOFF[0]

    def wait(self) -> None:
        error = sys.exc_info()[1]
        if time.monotonic() - self.since + self.delay > self.seconds:
            if error is not None:
                raise error
            raise errors.ServerUnavailableError("the server stayed unavailable")
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, _BACKOFF[1])
