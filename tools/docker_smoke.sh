#!/usr/bin/env bash
# Container smoke test: build the image, start it, run a real Prune against it from
# the host over 127.0.0.1, check the result, check SIGTERM ends it cleanly.
#
#   tools/docker_smoke.sh
#
# Needs a Docker engine. Where none runs, it tries the workplace's
# container-engine.sh ($CONTAINER_ENGINE_SCRIPT, or ../shared/tools/ beside the
# repository); where no engine can start it prints SKIPPED and exits 0.
# The host side needs the package installed (pip install -e .).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
image=onnx-pruner:smoke
name=onnx-pruner-smoke-$$

skip() { echo "docker smoke: SKIPPED: $*" >&2; exit 0; }

if ! docker version >/dev/null 2>&1; then
  script=${CONTAINER_ENGINE_SCRIPT:-}
  for candidate in "$repo/../shared/tools/container-engine.sh" /work/shared/tools/container-engine.sh; do
    [ -z "$script" ] && [ -x "$candidate" ] && script=$candidate
  done
  [ -n "$script" ] || skip "no Docker engine and no container-engine.sh to start one"
  command -v docker >/dev/null 2>&1 || [ "$(id -u)" = 0 ] || skip "no Docker and not root to install it"
  code=0
  "$script" start python:3.11-slim >&2 || code=$?
  [ "$code" = 0 ] || { [ "$code" = 3 ] && skip "the container engine cannot start here"; exit "$code"; }
fi

work=$(mktemp -d)
cleanup() { docker rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

echo "docker smoke: building $image" >&2
docker build --network host -q -t "$image" . >/dev/null

port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# the address as a flag, not ONNX_PRUNER_ADDRESS: the health check must follow it
docker run -d --network host --name "$name" --health-interval 1s --health-start-period 1s \
  -e ONNX_PRUNER_GRACE=20 "$image" --address "127.0.0.1:$port" >/dev/null

echo "docker smoke: waiting for the container's health check" >&2
for _ in $(seq 120); do
  status=$(docker inspect --format '{{.State.Health.Status}}' "$name")
  [ "$status" = healthy ] && break
  [ "$(docker inspect --format '{{.State.Running}}' "$name")" = true ] || { docker logs "$name" >&2; exit 1; }
  sleep 0.5
done
[ "$status" = healthy ] || { echo "docker smoke: container never became healthy ($status)" >&2; docker logs "$name" >&2; exit 1; }

uid=$(docker exec "$name" id -u)
[ "$uid" != 0 ] || { echo "docker smoke: the server runs as root" >&2; exit 1; }

echo "docker smoke: pruning tests/fixtures/mlp.onnx through 127.0.0.1:$port" >&2
onnx-prune prune tests/fixtures/mlp.onnx --eval tests/fixtures/mlp_eval.npz --tolerance 0.01 \
  -o "$work/pruned.onnx" --report "$work/report.json" --server "127.0.0.1:$port" --quiet
python - "$work/pruned.onnx" "$work/report.json" <<'PY'
import json, sys
import onnx, onnxruntime as ort
model, report = sys.argv[1], json.load(open(sys.argv[2]))
onnx.checker.check_model(model, full_check=True)
ort.InferenceSession(model, providers=["CPUExecutionProvider"])
assert report["status"] == "pruned", report["status"]
assert report["baseline"]["holdout"] - report["final"]["holdout"] <= 0.01 + 1e-9
print(f"docker smoke: pruned to sparsity {report['sparsity']:.1%}, holdout "
      f"{report['baseline']['holdout']:.4f} -> {report['final']['holdout']:.4f}", file=sys.stderr)
PY

# bad input gets INVALID_ARGUMENT (exit 2) and the server keeps serving
if onnx-prune prune tests/fixtures/mlp.onnx --eval tests/fixtures/cnn_eval.npz -o "$work/bad.onnx" \
     --server "127.0.0.1:$port" --quiet 2>"$work/bad.err"; then
  echo "docker smoke: a mismatched eval set was accepted" >&2; exit 1
fi
grep -q "eval input 'input' has shape" "$work/bad.err"
docker exec "$name" python -m service.healthcheck >/dev/null

docker stop -t 30 "$name" >/dev/null
exit_code=$(docker inspect --format '{{.State.ExitCode}}' "$name")
[ "$exit_code" = 0 ] || { echo "docker smoke: exit code $exit_code after SIGTERM" >&2; docker logs "$name" >&2; exit 1; }
docker logs "$name" 2>&1 | grep -q '"event": "stopped"'
echo "docker smoke: OK" >&2
