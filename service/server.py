"""The gRPC server: a thin layer that turns requests into library calls.

    python -m service [--address [::]:50051] [--max-jobs N] ...   (or environment variables)

Every flag has an environment variable (``ONNX_PRUNER_<FLAG>``, e.g.
``ONNX_PRUNER_MAX_JOBS``); flags win.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import pruner
from service import convert
from service._gen.onnxpruner.v1 import pruner_pb2 as pb
from service._gen.onnxpruner.v1 import pruner_pb2_grpc as pb_grpc

__all__ = ["ServerConfig", "create_server", "main"]

logger = logging.getLogger("onnxpruner.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PrunerService"].full_name
MiB = 1 << 20


@dataclass(frozen=True)
class ServerConfig:
    """How the server runs. Sizes in bytes, times in seconds."""

    address: str = "[::]:50051"
    max_jobs: int = os.cpu_count() or 1
    max_model_bytes: int = 1024 * MiB
    max_eval_bytes: int = 1024 * MiB
    job_time_limit: float = 3600.0
    grace: float = 30.0
    """On SIGTERM, how long running jobs may go on before they are cancelled."""
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = None
    """When set, every call but health checks needs ``authorization: Bearer <token>``."""
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.max_jobs < 1:
            raise ValueError(f"max_jobs must be >= 1, got {self.max_jobs}")
        for name in ("max_model_bytes", "max_eval_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.job_time_limit > 0 or not self.grace >= 0:
            raise ValueError("job_time_limit must be > 0 and grace >= 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key")


class _Abort(Exception):
    """Ends a call with ``code`` and a message for the client."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _status_of(error: BaseException, timed_out: bool) -> tuple[grpc.StatusCode, str]:
    """The one mapping from library errors to gRPC status codes."""
    if isinstance(error, _Abort):
        return error.code, error.message
    if isinstance(error, (pruner.InvalidInputError, pruner.UnsupportedModelError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, pruner.ResourceLimitError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, pruner.CancelledError):
        if timed_out:
            return grpc.StatusCode.DEADLINE_EXCEEDED, "the job exceeded the server's time limit"
        return grpc.StatusCode.CANCELLED, "the job was cancelled"
    return grpc.StatusCode.INTERNAL, "internal error"


@dataclass
class _Job:
    """Bookkeeping of one call, logged when it ends."""

    rpc: str
    id: str
    started: float
    model_bytes: int = 0
    eval_bytes: int = 0

    def log(self, outcome: str, **extra: Any) -> None:
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
        logger.info(json.dumps(record))


class PrunerServicer(pb_grpc.PrunerServiceServicer):
    """Receives inputs, runs the library in a worker thread, streams the results."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._slots = threading.BoundedSemaphore(config.max_jobs)
        self._threads = max(1, (os.cpu_count() or 1) // config.max_jobs)

    @contextlib.contextmanager
    def _slot(self, job: _Job) -> Iterator[None]:
        if not self._slots.acquire(blocking=False):
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is running its maximum of {self.config.max_jobs} job(s); retry later",
            )
        try:
            yield
        finally:
            self._slots.release()

    @staticmethod
    def _add(buffer: bytearray, data: bytes, what: str, limit: int) -> None:
        if len(buffer) + len(data) > limit:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the {what} exceeds the server's limit of {limit} bytes")
        buffer += data

    def Prune(self, request_iterator: Iterator[pb.PruneRequest], context: grpc.ServicerContext) -> Iterator[Any]:
        job = _Job("Prune", uuid.uuid4().hex[:12], time.monotonic())
        stop = threading.Event()
        timed_out = threading.Event()
        context.add_callback(stop.set)  # cancel, deadline, or the call ending for any reason
        try:
            with self._slot(job):
                options, model, evalset = self._receive(request_iterator, job)
                yield from self._run(job, options, model, evalset, stop, timed_out)
        except BaseException as error:
            self._fail(job, context, error, timed_out.is_set())
        finally:
            stop.set()

    def _receive(self, requests: Iterator[pb.PruneRequest], job: _Job) -> tuple[pruner.PruneOptions, bytes, Any]:
        config: pb.PruneConfig | None = None
        model = bytearray()
        npz = bytearray()
        tensors = convert.EvalTensors()
        for request in requests:
            kind = request.WhichOneof("payload")
            if kind is None:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "a PruneRequest carries nothing")
            if config is None and kind != "config":
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "the first PruneRequest must carry the config")
            if kind == "config":
                if config is not None:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "the config was sent twice")
                config = request.config
            elif kind == "model_chunk":
                self._add(model, request.model_chunk, "model", self.config.max_model_bytes)
                job.model_bytes = len(model)
            elif kind == "eval_npz_chunk":
                self._add(npz, request.eval_npz_chunk, "eval set", self.config.max_eval_bytes)
                job.eval_bytes = len(npz)
            elif kind == "eval_tensor":
                tensors.start(request.eval_tensor)
                job.eval_bytes += len(request.eval_tensor.tensor_proto)
            else:
                tensors.add(request.eval_tensor_data)
                job.eval_bytes += len(request.eval_tensor_data)
            if job.eval_bytes > self.config.max_eval_bytes:
                raise _Abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the eval set exceeds the server's limit of {self.config.max_eval_bytes} bytes",
                )
        if config is None:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "no config was sent")
        if not model:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "no model was sent")
        if npz and tensors:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "send the eval set as .npz chunks or as tensors, not both")
        if not npz and not tensors:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "no eval set was sent")
        options = convert.options_from_proto(config, threads=self._threads)
        evalset = tensors.evalset() if tensors else pruner.load_eval_set(bytes(npz))
        return options, bytes(model), evalset

    def _run(
        self,
        job: _Job,
        options: pruner.PruneOptions,
        model: bytes,
        evalset: pruner.EvalSet,
        stop: threading.Event,
        timed_out: threading.Event,
    ) -> Iterator[pb.PruneResponse]:
        events: queue.Queue[pruner.ProgressEvent | None] = queue.Queue()
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["result"] = pruner.prune(model, evalset, options, on_progress=events.put, stop=stop)
            except BaseException as e:
                outcome["error"] = e
            finally:
                events.put(None)

        def time_up() -> None:
            timed_out.set()
            stop.set()

        timer = threading.Timer(self.config.job_time_limit, time_up)
        timer.daemon = True
        worker = threading.Thread(target=work, name=f"job-{job.id}", daemon=True)
        timer.start()
        worker.start()
        try:
            while (event := events.get()) is not None:
                yield pb.PruneResponse(progress=convert.event_to_proto(event))
            worker.join()
        finally:
            timer.cancel()
        if "error" in outcome:
            raise outcome["error"]
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

    def Inspect(self, request_iterator: Iterator[pb.InspectRequest], context: grpc.ServicerContext) -> Any:
        job = _Job("Inspect", uuid.uuid4().hex[:12], time.monotonic())
        try:
            with self._slot(job):
                config = pb.InspectConfig()
                model = bytearray()
                for i, request in enumerate(request_iterator):
                    kind = request.WhichOneof("payload")
                    if kind == "config":
                        if i:
                            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "the config must come first")
                        config = request.config
                    elif kind == "model_chunk":
                        self._add(model, request.model_chunk, "model", self.config.max_model_bytes)
                        job.model_bytes = len(model)
                    else:
                        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "an InspectRequest carries nothing")
                if not model:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "no model was sent")
                inspection = pruner.inspect(bytes(model), include=tuple(config.include), exclude=tuple(config.exclude))
                job.log("ok")
                return convert.inspection_to_proto(inspection)
        except BaseException as error:
            self._fail(job, context, error, False)

    def _fail(self, job: _Job, context: grpc.ServicerContext, error: BaseException, timed_out: bool) -> NoReturn:
        if isinstance(error, GeneratorExit):
            job.log("CANCELLED")
            raise error
        code, message = _status_of(error, timed_out)
        if code is grpc.StatusCode.INTERNAL:
            message = f"internal error (job {job.id}); the server's log has the details"
            logger.error("job %s failed", job.id, exc_info=error)
        job.log(code.name, error=message)
        context.abort(code, message)
        raise AssertionError("unreachable: abort raises")


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
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

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
    interceptors = [_TokenCheck(config.token)] if config.token else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_jobs * 2 + 8, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=[("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_PrunerServiceServicer_to_server(PrunerServicer(config), server)  # type: ignore[no-untyped-call]
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
    return server, port, health_servicer


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
    p.add_argument("--max-model-bytes", type=int, default=_env("max_model_bytes", d.max_model_bytes))
    p.add_argument("--max-eval-bytes", type=int, default=_env("max_eval_bytes", d.max_eval_bytes))
    p.add_argument("--job-time-limit", type=float, default=_env("job_time_limit", d.job_time_limit), help="seconds")
    p.add_argument("--grace", type=float, default=_env("grace", d.grace), help="seconds jobs get on SIGTERM")
    p.add_argument("--tls-cert", default=_env("tls_cert", None), help="PEM certificate (with --tls-key)")
    p.add_argument("--tls-key", default=_env("tls_key", None), help="PEM private key")
    p.add_argument("--token-file", default=_env("token_file", None), help="file holding the bearer token")
    p.add_argument("--log-level", default=_env("log_level", d.log_level))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    token = os.environ.get("ONNX_PRUNER_TOKEN")
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            print(f"onnx-pruner server: error: cannot read the token file: {e}", file=sys.stderr)
            return 2
    try:
        config = ServerConfig(
            address=args.address,
            max_jobs=int(args.max_jobs),
            max_model_bytes=int(args.max_model_bytes),
            max_eval_bytes=int(args.max_eval_bytes),
            job_time_limit=float(args.job_time_limit),
            grace=float(args.grace),
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            token=token or None,
            log_level=str(args.log_level).upper(),
        )
    except ValueError as e:
        print(f"onnx-pruner server: error: {e}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler()
    handler.setFormatter(_JsonLogs())
    logging.basicConfig(level=config.log_level, handlers=[handler], force=True)
    try:
        server, port, health_servicer = create_server(config)
    except OSError as e:  # an unreadable certificate or key, a port in use
        print(f"onnx-pruner server: error: {e}", file=sys.stderr)
        return 2
    server.start()
    set_serving(health_servicer, True)
    serving = {"event": "serving", "address": config.address, "port": port, "max_jobs": config.max_jobs}
    logger.info(json.dumps({**serving, "tls": bool(config.tls_cert), "auth": bool(token)}))
    stopped = threading.Event()

    def shutdown(signum: int, frame: object) -> None:
        logger.info(json.dumps({"event": "stopping", "signal": signum, "grace": config.grace}))
        health_servicer.enter_graceful_shutdown()  # NOT_SERVING for every service, for good
        server.stop(config.grace).wait()
        stopped.set()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    while not stopped.wait(0.5):
        pass
    logger.info(json.dumps({"event": "stopped"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
