"""``python -m service.healthcheck``: exit 0 when the local server reports SERVING.

Used by the container's HEALTHCHECK. Reads the port from ``ONNX_PRUNER_ADDRESS``
(default 50051) and, when the server uses TLS, trusts ``ONNX_PRUNER_TLS_CERT``
for the name ``localhost``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    address = os.environ.get("ONNX_PRUNER_ADDRESS", "0.0.0.0:50051")
    port = address.rsplit(":", 1)[-1]
    cert = os.environ.get("ONNX_PRUNER_TLS_CERT")
    target = f"localhost:{port}"
    if cert:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(cert).read_bytes())
        channel = grpc.secure_channel(target, credentials)
    else:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=4)
        except grpc.RpcError as e:
            print(f"unhealthy: {e.code().name}", file=sys.stderr)
            return 1
    serving = response.status == health_pb2.HealthCheckResponse.SERVING
    print("serving" if serving else f"not serving ({response.status})")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
