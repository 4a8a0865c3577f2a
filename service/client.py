"""The gRPC client: runs ``prune`` and ``inspect`` on a server (the CLI's ``--server`` mode)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

import pruner
from service import convert
from service._gen.onnxpruner.v1 import pruner_pb2 as pb
from service._gen.onnxpruner.v1 import pruner_pb2_grpc as pb_grpc

__all__ = ["Connection", "RemoteError", "RemoteResult"]

Source = str | os.PathLike[str] | bytes


class RemoteError(Exception):
    """The server ended the call with an error status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{message} ({code.name})")
        self.code = code
        self.message = message


@dataclass
class RemoteResult:
    """What a remote Prune returns: the model's bytes and the report."""

    model_bytes: bytes
    report: pruner.Report

    def save(
        self,
        path: str | os.PathLike[str],
        report_path: str | os.PathLike[str] | None = None,
        *,
        extra: Sequence[tuple[str | os.PathLike[str], bytes]] = (),
    ) -> None:
        """Write the model, optionally the report and extra files, all or nothing (as ``PruneResult.save``)."""
        companions = [] if report_path is None else [(report_path, self.report.to_json().encode())]
        pruner.save_model(self.model_bytes, path, companions=[*companions, *extra])


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


class Connection:
    """A channel to an onnx-pruner server.

    Args:
        target: ``host:port``.
        token: bearer token, if the server wants one.
        tls_ca: PEM file of the CA that signed the server's certificate; enables TLS.
            ``tls=True`` without it uses the system's roots.
    """

    def __init__(self, target: str, *, token: str | None = None, tls_ca: str | None = None, tls: bool = False) -> None:
        self._metadata = [("authorization", f"Bearer {token}")] if token else []
        if tls_ca or tls:
            roots = Path(tls_ca).read_bytes() if tls_ca else None
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots))
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.PrunerServiceStub(self.channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.channel.close()

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
    ) -> RemoteResult:
        """Run a Prune job on the server.

        Raises:
            RemoteError: the server's status (INVALID_ARGUMENT with its message for bad input).
            pruner.InvalidInputError: a local file cannot be read.
        """
        _check_readable(model, evalset)

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
            raise _remote_error(e) from None
        except BaseException:
            calls.cancel()
            raise
        if result is None:
            raise RemoteError(grpc.StatusCode.INTERNAL, "the server sent no result")
        data = b"".join(parts)
        if len(data) != result.model_size or hashlib.sha256(data).hexdigest() != result.model_sha256:
            raise RemoteError(grpc.StatusCode.DATA_LOSS, "the model received does not match the server's digest")
        return RemoteResult(data, pruner.Report.from_json(result.report_json))

    def inspect(
        self,
        model: Source,
        *,
        include: tuple[str, ...] = (),
        exclude: tuple[str, ...] = (),
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """The server's inspection of ``model``, as ``pruner.inspect(...).to_dict()``."""
        _check_readable(model)

        def requests() -> Iterator[pb.InspectRequest]:
            yield pb.InspectRequest(config=pb.InspectConfig(include=list(include), exclude=list(exclude)))
            for chunk in _chunks(model):
                yield pb.InspectRequest(model_chunk=chunk)

        try:
            response = self.stub.Inspect(requests(), metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as e:
            raise _remote_error(e) from None
        data: dict[str, Any] = json.loads(response.json)
        return data


def _remote_error(error: grpc.RpcError) -> RemoteError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return RemoteError(code, details or code.name)
