"""``python -m service.healthcheck``: exit 0 when the local server reports SERVING.

Used by the container's HEALTHCHECK. It asks the server where it really
listens: the server writes ``server.json`` (its host, port and TLS certificate)
to ``ONNX_PRUNER_RUNTIME_DIR`` (default ``<tmp>/onnx-pruner-<uid>``) once it
serves, so a server started with ``--address`` or ``--tls-cert`` is checked where
it is. Without that file it falls back to ``ONNX_PRUNER_ADDRESS`` (default port
50051) and ``ONNX_PRUNER_TLS_CERT``. With TLS it trusts the server's own
certificate for the name ``localhost``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def runtime_dir() -> Path:
    """Where the server writes ``server.json`` (the server's ``--runtime-dir`` default)."""
    default = os.path.join(tempfile.gettempdir(), f"onnx-pruner-{os.getuid() if hasattr(os, 'getuid') else 0}")
    return Path(os.environ.get("ONNX_PRUNER_RUNTIME_DIR", default))


def _where() -> tuple[str, str, str | None]:
    """(host, port, TLS certificate or None) of the local server."""
    try:
        info = json.loads((runtime_dir() / "server.json").read_text())
        return str(info["host"]), str(info["port"]), info.get("tls_cert")
    except (OSError, ValueError, KeyError, TypeError):
        address = os.environ.get("ONNX_PRUNER_ADDRESS", "0.0.0.0:50051")
        return "127.0.0.1", address.rsplit(":", 1)[-1], os.environ.get("ONNX_PRUNER_TLS_CERT")


def main() -> int:
    host, port, cert = _where()
    if cert:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(cert).read_bytes())
        options = [] if host in ("127.0.0.1", "localhost") else [("grpc.ssl_target_name_override", "localhost")]
        channel = grpc.secure_channel(f"localhost:{port}" if host == "127.0.0.1" else f"{host}:{port}",
                                      credentials, options=options)  # fmt: skip
    else:
        channel = grpc.insecure_channel(f"{host}:{port}" if ":" not in host else f"[{host}]:{port}")
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=4)
        except grpc.RpcError as e:
            print(f"unhealthy: {e.code().name} at {host}:{port}", file=sys.stderr)
            return 1
    serving = response.status == health_pb2.HealthCheckResponse.SERVING
    print("serving" if serving else f"not serving ({response.status})")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
