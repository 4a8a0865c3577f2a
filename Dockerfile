# onnx-pruner gRPC server.
#   docker build -t onnx-pruner .
#   docker run -p 50051:50051 onnx-pruner [--address ...] [--max-jobs N] ...
# Settings come from flags or ONNX_PRUNER_* environment variables (see `python -m service --help`
# and docs/security.md).
#
# Stopping: on SIGTERM the server refuses new calls (UNAVAILABLE "shutting down"), lets running
# jobs go on for ONNX_PRUNER_GRACE seconds, cancels them, and exits within about GRACE + 5 s.
# The image sets GRACE=4 so that `docker stop`'s default 10 s timeout is never reached; with a
# longer grace, stop with a longer timeout: e.g. ONNX_PRUNER_GRACE=30 and `docker stop -t 40`
# (Kubernetes: terminationGracePeriodSeconds >= GRACE + 10).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# dependencies come from pyproject.toml: install the package, nothing else
COPY pyproject.toml README.md ./
COPY pruner ./pruner
COPY service ./service
RUN pip install --no-cache-dir . \
    && groupadd --gid 10001 pruner \
    && useradd --create-home --uid 10001 --gid 10001 pruner

USER 10001:10001
ENV ONNX_PRUNER_ADDRESS=0.0.0.0:50051 \
    ONNX_PRUNER_GRACE=4 \
    ONNX_PRUNER_RUNTIME_DIR=/tmp/onnx-pruner
EXPOSE 50051
STOPSIGNAL SIGTERM
# a real gRPC health check (grpc.health.v1), not a port probe; it reads the port and TLS mode the
# server really uses from $ONNX_PRUNER_RUNTIME_DIR/server.json, so `--address` works too
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 CMD ["python", "-m", "service.healthcheck"]
ENTRYPOINT ["python", "-m", "service"]
