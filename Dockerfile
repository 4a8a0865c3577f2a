# onnx-pruner gRPC server.
#   docker build -t onnx-pruner .
#   docker run -p 50051:50051 onnx-pruner
# Settings come from ONNX_PRUNER_* environment variables (see `python -m service --help`).
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
ENV ONNX_PRUNER_ADDRESS=0.0.0.0:50051
EXPOSE 50051
# a real gRPC health check (grpc.health.v1), not a port probe
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 CMD ["python", "-m", "service.healthcheck"]
ENTRYPOINT ["python", "-m", "service"]
