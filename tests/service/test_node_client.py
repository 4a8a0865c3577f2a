"""A client in another language, written from protos/ alone: clients/node/prune.js against the real server.

Also what such a client relies on that the Python side can check without Node: the vendored
protos are the ones the server serves, ``Tensor`` is onnx.TensorProto on the wire, and model
and eval chunks may interleave as the proto says.

The Node tests skip when ``node`` is not installed, except under CI (``CI`` or
``PRUNER_CI_REQUIRE_NODE`` set; .ci/run sets the latter), where they fail. .ci/run installs the
client's dependencies (``npm ci --prefix clients/node``); where ``clients/node/node_modules`` is
missing, the tests install them the same way, from the lock file.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.unknown_fields import UnknownFieldSet
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_tools import protoc
from onnx import numpy_helper

import pruner
from service import convert
from service._gen.onnxpruner.v1 import pruner_pb2 as pb
from tests.service import test_server as base
from tests.service.test_report_schema import validate
from tests.service.test_server import QUICK, Start, call_prune, tensor_requests

start_server = base.start_server  # the fixture

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
CLIENT = ROOT / "clients" / "node"
FIXTURES = ROOT / "tests" / "fixtures"
MLP = FIXTURES / "mlp.onnx"
MLP_EVAL = FIXTURES / "mlp_eval.npz"
TOKEN = "node-client-test-token"


@pytest.fixture(scope="module")
def node() -> Iterator[str]:
    """The node executable, with the client's dependencies installed."""
    found = shutil.which("node")
    if found is None:
        if os.environ.get("CI") or os.environ.get("PRUNER_CI_REQUIRE_NODE"):
            pytest.fail("node is not installed, and CI must run the Node client's tests (install node >= 18 and npm)")
        pytest.skip("node is not installed")
    if not (CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        npm = shutil.which("npm")
        assert npm is not None, "npm is needed to install clients/node's dependencies (npm ci --prefix clients/node)"
        done = subprocess.run([npm, "ci", "--prefix", str(CLIENT)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    yield found


def run_client(node: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    # the server runs in this process, on threads: the client is a child process that we wait for
    return subprocess.run(
        [node, str(CLIENT / "prune.js"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "ONNX_PRUNER_TOKEN"},
    )


def test_the_node_client_prunes_a_model(start_server: Start, node: str, tmp_path: Path) -> None:
    address = start_server(token=TOKEN)
    out, report_path = tmp_path / "pruned.onnx", tmp_path / "report.json"
    done = run_client(
        node, MLP, MLP_EVAL, out, "--address", address, "--token", TOKEN, "--max-evaluations", "3",
        "--report", report_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "health: SERVING"
    assert lines[1].startswith("inspect: 3 prunable layers, 25856 of 26122 parameters prunable")
    progress = [line for line in lines if line.startswith("progress: ")]
    assert "baseline" in progress[0] and "done" in progress[-1]
    assert sum(" candidate: " in line for line in progress) == 3
    assert lines[-1].startswith("result: pruned at sparsity ") and str(out) in lines[-1]

    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    x = np.load(MLP_EVAL)["input"][:32]
    (logits,) = ort.InferenceSession(out, providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert logits.shape == (32, 10) and np.isfinite(logits).all()

    report_json = report_path.read_text()
    validate(report_json)
    report = pruner.Report.from_json(report_json)
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer]
    assert sum(int(np.count_nonzero(w)) for w in weights if w.ndim == 2) == report.nonzero_after < 25856
    assert report.evaluations == 3


def test_a_truncated_model_is_invalid_argument_naming_the_problem(
    start_server: Start, node: str, tmp_path: Path
) -> None:
    address = start_server()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(MLP.read_bytes()[:3000])
    done = run_client(node, truncated, MLP_EVAL, tmp_path / "out.onnx", "--address", address)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: INVALID_ARGUMENT: ")
    assert "not an ONNX model or is truncated" in done.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_an_eval_set_for_another_model_is_invalid_argument_naming_the_input(
    start_server: Start, node: str, tmp_path: Path
) -> None:
    address = start_server()
    evalset = tmp_path / "eval.npz"
    np.savez(evalset, image=np.zeros((8, 64), np.float32), labels=np.zeros(8, np.int64))  # the input is 'input'
    done = run_client(node, MLP, evalset, tmp_path / "out.onnx", "--address", address)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: INVALID_ARGUMENT: ")
    assert "'input'" in done.stderr, done.stderr


def test_a_wrong_token_is_unauthenticated(start_server: Start, node: str, tmp_path: Path) -> None:
    address = start_server(token=TOKEN)
    done = run_client(node, MLP, MLP_EVAL, tmp_path / "out.onnx", "--address", address, "--token", "not-the-token")
    assert done.stdout.splitlines() == ["health: SERVING"]  # health checks need no token
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: UNAUTHENTICATED: missing or wrong bearer token")
    assert not (tmp_path / "out.onnx").exists()


# -- what a client written from protos/ relies on


def compiled(relative: str) -> descriptor_pb2.FileDescriptorProto:
    """``protos/<relative>`` compiled by protoc, as a descriptor without source info."""
    include = Path(protoc.__file__).parent / "_proto"
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"onnx-pruner-{os.getpid()}-descriptor.binpb"
    code = protoc.main(["grpc_tools.protoc", f"-I{PROTOS}", f"-I{include}", f"--descriptor_set_out={out}", relative])
    assert code == 0, relative
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    out.unlink()
    return files.file[0]


def shape_of(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """The messages, enums and services of ``file``: what goes on the wire, without its name and options."""
    shape = descriptor_pb2.FileDescriptorProto(
        package=file.package, message_type=file.message_type, enum_type=file.enum_type, service=file.service
    )
    messages = list(shape.message_type)
    while messages:  # protoc writes each field's default JSON name, the runtime's descriptors do not
        message = messages.pop()
        for field in message.field:
            field.ClearField("json_name")
        messages += message.nested_type
    return shape


@pytest.mark.parametrize(
    ("shipped", "served"),
    [
        ("grpc/health/v1/health.proto", health_pb2.DESCRIPTOR),
        ("google/rpc/status.proto", status_pb2.DESCRIPTOR),
        ("google/rpc/error_details.proto", error_details_pb2.DESCRIPTOR),
    ],
)
def test_the_shipped_protos_are_the_ones_the_server_uses(shipped: str, served: object) -> None:
    expected = descriptor_pb2.FileDescriptorProto()
    served.CopyToProto(expected)  # type: ignore[attr-defined]
    assert shape_of(compiled(shipped)) == shape_of(expected)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        np.arange(-3, 3, dtype=np.int64).reshape(2, 3),
        np.array([[True, False]]),
        np.arange(4, dtype=np.float16).reshape(4, 1),
        np.arange(6, dtype=np.float64).reshape(3, 2) / 3,
    ],
    ids=["float32", "int64", "bool", "float16", "float64"],
)
def test_the_tensor_message_is_an_onnx_tensor_proto_on_the_wire(array: np.ndarray) -> None:
    # raw data, as numpy_helper writes it, and typed fields, as make_tensor writes them
    raw = numpy_helper.from_array(array, "x")
    typed = onnx.helper.make_tensor(
        "x", onnx.helper.np_dtype_to_tensor_dtype(array.dtype), array.shape, array.flatten().tolist()
    )
    for tensor in (raw, typed):
        ours = pb.Tensor.FromString(tensor.SerializeToString())
        assert len(UnknownFieldSet(ours)) == 0  # every field onnx wrote is one of ours
        assert (ours.name, list(ours.dims), ours.data_type) == ("x", list(array.shape), tensor.data_type)
        back = onnx.TensorProto.FromString(ours.SerializeToString())
        np.testing.assert_array_equal(numpy_helper.to_array(back), array)


def npz_bytes(path: Path) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **dict(np.load(path)))
    return buffer.getvalue()


def test_model_and_eval_messages_may_interleave(start_server: Start) -> None:
    address = start_server()
    model, evalset = MLP.read_bytes(), npz_bytes(MLP_EVAL)
    config = pb.PruneRequest(config=convert.options_to_proto(QUICK))
    halves = len(model) // 2, len(evalset) // 2
    as_npz = [
        config,
        pb.PruneRequest(eval_npz_chunk=evalset[: halves[1]]),
        pb.PruneRequest(model_chunk=model[: halves[0]]),
        pb.PruneRequest(eval_npz_chunk=evalset[halves[1] :]),
        pb.PruneRequest(model_chunk=model[halves[0] :]),
    ]
    # a model chunk between a tensor's header and its data does not end the tensor
    tensors = tensor_requests(dict(np.load(MLP_EVAL)), inline=False)
    as_tensors = [config, tensors[0], pb.PruneRequest(model_chunk=model[: halves[0]]), *tensors[1:]]
    as_tensors.append(pb.PruneRequest(model_chunk=model[halves[0] :]))
    expected = pruner.prune(MLP, MLP_EVAL, QUICK).report.nonzero_after
    for requests in (as_npz, as_tensors):
        results = [r.result for r in call_prune(address, requests) if r.WhichOneof("payload") == "result"]
        assert pruner.Report.from_json(results[0].report_json).nonzero_after == expected
