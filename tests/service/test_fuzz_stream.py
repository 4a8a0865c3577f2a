"""Fuzzing the request streams of a real server: every stream ends in a documented status.

The property: a Prune or Inspect call whose request stream is garbage, reordered, duplicated,
truncated, carries wrong field combinations or absurd option values, or is cancelled by the client at
a random point, ends in one of :data:`DOCUMENTED` (OK only with a model that passes
``onnx.checker.check_model(full_check=True)``), never INTERNAL, UNKNOWN, a hang (every call has a
deadline well above the server's job time limit) or a dead server: after each stream the server
still answers a health check and a normal Inspect.

Requests go out as raw bytes through a generic ``channel.stream_stream`` with identity serializers,
so anything protobuf can carry (and anything it cannot) reaches the server. The server runs
in-process on a loopback port, one per module. ``python tools/fuzz.py stream`` runs the same
property for longer (docs/fuzzing.md); kept cases are replayed from ``tests/fixtures/fuzz/*.stream``.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from service._gen.onnxpruner.v1 import pruner_pb2 as pb
from service.server import ServerConfig, create_server, set_serving
from tests.helpers import tiny_mlp, tiny_mlp_evalset

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "fuzz"
SERVICE = "/onnxpruner.v1.PrunerService/"
DOCUMENTED = frozenset(
    {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "DEADLINE_EXCEEDED", "CANCELLED", "UNAVAILABLE", "OK"}
)
JOB_TIME_LIMIT = 10.0
"""The fuzz server's job time limit: absurd budgets end as DEADLINE_EXCEEDED after this."""
CALL_TIMEOUT = 60.0
"""The client's deadline; reaching it means the server hung (the server's own limit is far lower)."""

CI = settings(
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# ------------------------------------------------------------------------------------- the server


class _ServerErrors(logging.Handler):
    """Remembers the exception type behind the server's last logged error (why an INTERNAL happened)."""

    last = ""

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[0] is not None:
            _ServerErrors.last = record.exc_info[0].__name__


def start_fuzz_server() -> tuple[str, Callable[[], None]]:
    """An in-process server on a free loopback port: (address, stop)."""
    server_logger = logging.getLogger("onnxpruner.service")
    if not any(isinstance(h, _ServerErrors) for h in server_logger.handlers):
        server_logger.addHandler(_ServerErrors(logging.ERROR))
    config = ServerConfig(
        address="127.0.0.1:0",
        max_jobs=2,
        job_time_limit=JOB_TIME_LIMIT,
        max_model_bytes=4 << 20,
        max_eval_bytes=4 << 20,
        log_level="ERROR",
    )
    server, port, health = create_server(config)
    server.start()
    set_serving(health, True)
    # bounded: after thousands of hostile calls stop() has been seen to wait forever (see docs/fuzzing.md)
    return f"127.0.0.1:{port}", lambda: server.stop(None).wait(30)


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    where, stop = start_fuzz_server()
    yield where
    stop()


# -------------------------------------------------------------------------------------- the cases


@dataclass
class StreamCase:
    """One call: the method, its raw request messages, and when (if ever) the client cancels."""

    method: str  # "Prune" or "Inspect"
    messages: list[bytes]
    cancel_after: int | None = None
    """Cancel once this many messages were sent (then stop sending)."""
    cancel_delay: float | None = None
    """Cancel this many seconds after the call started."""
    notes: list[str] = field(default_factory=list)


def encode_case(case: StreamCase) -> bytes:
    """A corpus file: one JSON line (method, cancel points, notes), then the zlib-compressed messages,
    each prefixed by its length (4 bytes, big-endian)."""
    head = {k: getattr(case, k) for k in ("method", "cancel_after", "cancel_delay", "notes")}
    frames = b"".join(struct.pack(">I", len(m)) + m for m in case.messages)
    return json.dumps({**head, "zlib": True}).encode() + b"\n" + zlib.compress(frames, 9)


def decode_case(data: bytes) -> StreamCase:
    line, _, rest = data.partition(b"\n")
    head = json.loads(line)
    if head.get("zlib"):
        rest = zlib.decompress(rest)
    messages, at = [], 0
    while at < len(rest):
        (size,) = struct.unpack(">I", rest[at : at + 4])
        messages.append(rest[at + 4 : at + 4 + size])
        at += 4 + size
    return StreamCase(head["method"], messages, head["cancel_after"], head["cancel_delay"], head["notes"])


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


MODEL = tiny_mlp().SerializeToString()


def _variant(change: Callable[[onnx.ModelProto], None]) -> bytes:
    model = tiny_mlp()
    change(model)
    return model.SerializeToString()


# models a Prune stream may carry: the good one, and valid-looking ones the search must refuse cleanly
MODELS = {
    "good": MODEL,
    "no_outputs": _variant(lambda m: m.graph.ClearField("output")),
    "no_inputs": _variant(lambda m: m.graph.ClearField("input")),
    "no_initializers": _variant(lambda m: m.graph.ClearField("initializer")),
    "fixed_batch_0": _variant(lambda m: m.graph.input[0].type.tensor_type.shape.dim[0].ClearField("dim_param")
                              or setattr(m.graph.input[0].type.tensor_type.shape.dim[0], "dim_value", 0)),
}  # fmt: skip
EVAL = tiny_mlp_evalset(32)
NPZ = _npz(EVAL)
QUICK = pb.PruneConfig(max_evaluations=2, holdout_fraction=0.25)


def _req(**payload: object) -> bytes:
    return pb.PruneRequest(**payload).SerializeToString()  # type: ignore[arg-type]


def _chunks(data: bytes, pieces: int) -> list[bytes]:
    size = max(1, -(-len(data) // pieces))
    return [data[i : i + size] for i in range(0, len(data), size)]


def _tensor_messages(arrays: dict[str, np.ndarray], inline: bool) -> list[bytes]:
    out = []
    for name, array in arrays.items():
        tensor = numpy_helper.from_array(array, name)
        if inline:
            out.append(_req(eval_tensor=pb.EvalTensor(tensor_proto=tensor.SerializeToString())))
            continue
        raw = tensor.raw_data
        tensor.ClearField("raw_data")
        out.append(_req(eval_tensor=pb.EvalTensor(tensor_proto=tensor.SerializeToString())))
        out += [_req(eval_tensor_data=c) for c in _chunks(raw, 2)]
    return out


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


# PruneConfig fields by number: (wire type, hostile values). Sent as raw wire bytes, so values that
# the Python API refuses (a uint32 of -1, a varint of 2**64-1) reach the server as any client may send them.
_DOUBLE = [float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e-300, 1e308, 2.0, 0.5]
_UINT = [0, 1, 2**31, 2**32 - 1, 2**32, 10**9, 2**64 - 1, -1]
_ENUM = [0, 1, 2, 3, 4, 5, 6, 7, 99, -1, 2**31 - 1]
CONFIG_FIELDS: dict[int, tuple[str, list[object]]] = {
    1: ("enum", _ENUM), 2: ("enum", _ENUM), 3: ("enum", _ENUM), 4: ("enum", _ENUM),
    5: ("uint", _UINT), 6: ("str", ["", "y", "nope", "\u00e9" * 100]), 8: ("enum", _ENUM), 9: ("uint", _UINT),
    10: ("double", _DOUBLE), 11: ("uint", _UINT), 12: ("double", _DOUBLE), 13: ("uint", _UINT),
    14: ("double", _DOUBLE), 15: ("str", ["[", "*", "", "w1"]), 16: ("str", ["*", "[!", "w2"]),
    17: ("uint", [0, 1, 2]), 18: ("uint", _UINT), 19: ("enum", _ENUM), 20: ("uint", _UINT),
    21: ("double", _DOUBLE), 22: ("uint", _UINT), 23: ("uint", _UINT),
    24: ("str", ["{", "[]", "{}", '{"w1": "x"}', "null", '{"layers": [1, 2]}']),
}  # fmt: skip


def _config_field(number: int, value: object) -> bytes:
    kind, _ = CONFIG_FIELDS[number]
    if kind == "double":
        return _field(number, 1, struct.pack("<d", value))
    if kind == "str":
        data = str(value).encode()
        return _field(number, 2, _varint(len(data)) + data)
    return _field(number, 0, _varint(int(value)))  # type: ignore[call-overload]


@st.composite
def configs(draw: st.DrawFn) -> bytes:
    """A serialized PruneConfig: the quick settings plus up to four hostile fields (raw wire format)."""
    data = QUICK.SerializeToString()
    for number in draw(st.lists(st.sampled_from(sorted(CONFIG_FIELDS)), max_size=4)):
        data += _config_field(number, draw(st.sampled_from(CONFIG_FIELDS[number][1])))
    if draw(st.integers(0, 5)) == 0:
        tolerance = _field(1, 1, struct.pack("<d", draw(st.sampled_from(_DOUBLE)))) + _field(2, 0, b"\x01")
        data += _field(7, 2, _varint(len(tolerance)) + tolerance)
    return data


def _header(name: str, data_type: int, dims: list[int]) -> bytes:
    tensor = onnx.TensorProto(name=name, data_type=data_type)
    tensor.dims.extend(dims)
    return _req(eval_tensor=pb.EvalTensor(tensor_proto=tensor.SerializeToString()))


HOSTILE_MESSAGES: dict[str, Callable[[], bytes | list[bytes]]] = {
    "empty": lambda: b"",
    "garbage": lambda: b"\xff\xff\xff\xff\x0f",
    "unknown_field": lambda: _field(99, 2, b"\x03abc"),
    "truncated_varint": lambda: b"\x12\x80",
    "wrong_wire_type": lambda: _field(2, 0, b"\x05"),
    "config_as_bytes": lambda: _field(1, 2, b"\x03\xff\xff\xff"),
    "data_before_header": lambda: _req(eval_tensor_data=b"\0" * 16),
    "overflow_dims_empty_data": lambda: [_header("x", onnx.TensorProto.FLOAT, [2**62, 4]), _req(eval_tensor_data=b"")],
    "huge_dims": lambda: _header("x", onnx.TensorProto.FLOAT, [2**62, 2**62]),
    "overflow_dims": lambda: _header("x", onnx.TensorProto.FLOAT, [2**40, 2**40]),
    "negative_dims": lambda: _header("x", onnx.TensorProto.FLOAT, [-4, 8]),
    "string_tensor": lambda: _header("x", onnx.TensorProto.STRING, [4, 8]),
    "unknown_dtype": lambda: _header("x", 99, [4, 8]),
    "unnamed_tensor": lambda: _header("", onnx.TensorProto.FLOAT, [4, 8]),
    "external_tensor": lambda: _req(
        eval_tensor=pb.EvalTensor(
            tensor_proto=onnx.TensorProto(
                name="x",
                data_type=1,
                dims=[4, 8],
                data_location=onnx.TensorProto.EXTERNAL,
                external_data=[onnx.StringStringEntryProto(key="location", value="/etc/passwd")],
            ).SerializeToString()
        )
    ),
    "garbage_tensor": lambda: _req(eval_tensor=pb.EvalTensor(tensor_proto=b"\xff\x01\x02")),
    "garbage_model_chunk": lambda: _req(model_chunk=b"\x08\x07\x12\x00garbage"),
    "garbage_npz_chunk": lambda: _req(eval_npz_chunk=b"PK\x03\x04garbage"),
    "big_chunk": lambda: _req(eval_npz_chunk=b"\0" * ((1 << 20) + 1)),
    "inspect_config": lambda: pb.InspectRequest(config=pb.InspectConfig(include=["["])).SerializeToString(),
}


def _insert(messages: list[bytes], at: int, new: bytes | list[bytes]) -> None:
    messages[at:at] = new if isinstance(new, list) else [new]


@st.composite
def prune_streams(draw: st.DrawFn) -> tuple[list[bytes], list[str]]:
    """A Prune stream: a well-formed one, then a few mutations of order and content."""
    notes: list[str] = []
    messages = [_req(config=pb.PruneConfig.FromString(draw(configs())))] if draw(st.integers(0, 3)) else []
    if not messages:
        messages = [_field(1, 2, _varint(len(c)) + c) for c in [draw(configs())]]  # hostile wire values
    model = draw(st.sampled_from(sorted(MODELS)))
    if model != "good":
        notes.append(f"model:{model}")
    messages += [_req(model_chunk=c) for c in _chunks(MODELS[model], draw(st.integers(1, 3)))]
    form = draw(st.sampled_from(["npz", "tensors_inline", "tensors_chunked"]))
    if form == "npz":
        messages += [_req(eval_npz_chunk=c) for c in _chunks(NPZ, draw(st.integers(1, 3)))]
    else:
        messages += _tensor_messages(EVAL, inline=form == "tensors_inline")
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["reorder", "duplicate", "drop", "truncate", "insert", "swap"]))
        notes.append(kind)
        at = draw(st.integers(0, max(0, len(messages) - 1)))
        if kind == "reorder":
            messages = draw(st.permutations(messages))
        elif kind == "duplicate" and messages:
            messages.insert(at, messages[at])
        elif kind == "drop" and messages:
            del messages[at]
        elif kind == "truncate":
            messages = messages[:at]
        elif kind == "insert":
            name = draw(st.sampled_from(sorted(HOSTILE_MESSAGES)))
            notes.append(name)
            _insert(messages, draw(st.integers(0, len(messages))), HOSTILE_MESSAGES[name]())
        elif kind == "swap" and len(messages) > 1:
            other = draw(st.integers(0, len(messages) - 1))
            messages[at], messages[other] = messages[other], messages[at]
    return messages, notes


@st.composite
def stream_cases(draw: st.DrawFn) -> StreamCase:
    method = draw(st.sampled_from(["Prune", "Prune", "Prune", "Inspect"]))
    notes: list[str] = []
    if method == "Prune":
        messages, notes = draw(prune_streams())
    else:
        messages = [pb.InspectRequest(model_chunk=c).SerializeToString() for c in _chunks(MODEL, 2)]
        if draw(st.booleans()):
            name = draw(st.sampled_from(sorted(HOSTILE_MESSAGES)))
            notes.append(name)
            _insert(messages, draw(st.integers(0, len(messages))), HOSTILE_MESSAGES[name]())
    cancel = draw(st.sampled_from(["none", "none", "after", "delay"]))
    return StreamCase(
        method,
        messages,
        cancel_after=draw(st.integers(0, len(messages))) if cancel == "after" else None,
        cancel_delay=draw(st.sampled_from([0.0, 0.05, 0.2, 0.5, 1.0])) if cancel == "delay" else None,
        notes=notes,
    )


# ------------------------------------------------------------------------------------ the property


def stream_outcome(address: str, case: StreamCase) -> str:
    """The status name the call ends with; ``OK`` only if the returned model passes the full checker.

    A call that reaches the client's own deadline is reported as ``HANG``; an OK Prune whose model
    fails the checker as ``OK(bad model: ...)``.
    """
    holder: dict[str, grpc.Future] = {}
    ready = threading.Event()

    def cancel() -> None:
        ready.wait(10)  # the request iterator may run before the call object is returned
        holder["call"].cancel()

    def requests() -> Iterator[bytes]:
        for i, message in enumerate(case.messages):
            if case.cancel_after is not None and i == case.cancel_after:
                cancel()
                return
            yield message
        if case.cancel_after is not None and case.cancel_after >= len(case.messages):
            cancel()

    started = time.monotonic()
    _ServerErrors.last = ""
    with grpc.insecure_channel(address) as channel:
        timer = None
        try:
            if case.method == "Prune":
                call = channel.stream_stream(SERVICE + "Prune")(requests(), timeout=CALL_TIMEOUT)
            else:
                call = channel.stream_unary(SERVICE + "Inspect").future(requests(), timeout=CALL_TIMEOUT)
            holder["call"] = call
            ready.set()
            if case.cancel_delay is not None:
                timer = threading.Timer(case.cancel_delay, call.cancel)
                timer.start()
            responses = list(call) if case.method == "Prune" else [call.result()]
        except grpc.RpcError as error:
            code = error.code()  # type: ignore[attr-defined]
            if code is grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started >= CALL_TIMEOUT - 1:
                return "HANG"
            name = code.name if code is not None else "UNKNOWN"
            if name == "INTERNAL":  # name the server-side exception, or grpc's own words
                name += f"({_ServerErrors.last or error.details()})"  # type: ignore[attr-defined]
            return name
        except grpc.FutureCancelledError:
            return "CANCELLED"
        finally:
            if timer is not None:
                timer.cancel()
    if case.method == "Inspect":
        return "OK" if pb.InspectResponse.FromString(responses[0]).json else "OK(empty inspection)"
    return _checked_prune_result(responses)


def _checked_prune_result(responses: list[bytes]) -> str:
    parsed = [pb.PruneResponse.FromString(r) for r in responses]
    chunks = [r.model_chunk for r in parsed if r.WhichOneof("payload") == "model_chunk"]
    results = [r.result for r in parsed if r.WhichOneof("payload") == "result"]
    if len(results) != 1:
        return f"OK(bad stream: {len(results)} results)"
    try:
        model = onnx.ModelProto.FromString(b"".join(chunks))
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        return f"OK(bad model: {type(e).__name__})"
    return "OK"


def documented(outcome: str) -> bool:
    return outcome in DOCUMENTED


def server_recovers(address: str, seconds: float = 30.0) -> bool:
    """The server answers a health check and a normal Inspect (retried while a cancelled job frees its slot)."""
    request = [pb.InspectRequest(model_chunk=MODEL).SerializeToString()]
    deadline = time.monotonic() + seconds
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        inspect = channel.stream_unary(SERVICE + "Inspect")
        while time.monotonic() < deadline:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service="onnxpruner.v1.PrunerService"), timeout=5)
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    reply = pb.InspectResponse.FromString(inspect(iter(request), timeout=10))
                    return bool(reply.layers)
            except grpc.RpcError as error:
                if error.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:  # type: ignore[attr-defined]
                    return False
            time.sleep(0.1)
    return False


def assert_stream_property(address: str, case: StreamCase) -> str:
    outcome = stream_outcome(address, case)
    assert documented(outcome), f"undocumented outcome {outcome} for {case!r:.1500}"
    assert server_recovers(address), f"the server does not answer a normal Inspect after {case!r:.1500}"
    return outcome


@given(case=stream_cases())
@settings(CI, max_examples=120)
def test_hostile_streams_end_in_a_documented_status(address: str, case: StreamCase) -> None:
    assert_stream_property(address, case)


# ----------------------------------------------------------------------------------- kept corpus


def corpus() -> list[tuple[str, list[str]]]:
    path = CORPUS / "expected.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    return [(name, entry["expect"]) for name, entry in sorted(manifest.items()) if entry["target"] == "stream"]


@pytest.mark.parametrize(("name", "expect"), corpus(), ids=[c[0] for c in corpus()])
def test_kept_stream_cases(address: str, name: str, expect: list[str]) -> None:
    case = decode_case((CORPUS / name).read_bytes())
    outcome = stream_outcome(address, case)
    assert outcome in expect, f"{name}: got {outcome}, expected one of {expect}"
    assert server_recovers(address), f"{name}: the server does not answer a normal Inspect afterwards"
