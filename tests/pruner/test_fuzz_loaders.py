"""Fuzzing the loaders: every mutated model or eval set ends in a documented ``pruner.PrunerError``.

The property, for ``pruner.load_model(bytes)``, ``pruner.inspect(bytes)``, ``pruner.load_eval_set(bytes)``
and the eval-set validation against a model: the call returns, or raises one of the documented
subclasses (:data:`DOCUMENTED`) with a message, never another exception type, never hangs (a guard
kills the process with a traceback if one call runs over :data:`HANG_SECONDS`) and never writes a file.

Inputs start from the fixtures (``tests/fixtures/*.onnx``, ``*_eval.npz``) and tiny generated ones, and
are mutated at two levels: bytes (bit flips, truncation, inserted bytes) and structure (through the
protobuf API for models: dropped nodes, outputs, inputs, wrong or huge dims, hostile external-data
entries, bad opsets, duplicate names; through ``zipfile`` and hand-written ``.npy`` headers for eval
sets). Hypothesis runs a short, derandomized budget here; ``python tools/fuzz.py`` runs the same
properties for as long as asked (see docs/fuzzing.md). Cases worth keeping live in
``tests/fixtures/fuzz/`` with their expected outcome in ``expected.json`` and are replayed below.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import pruner
from pruner._evalset import model_inputs, validate_eval_set
from tests.helpers import tiny_mlp, tiny_mlp_evalset

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CORPUS = FIXTURES / "fuzz"
DOCUMENTED: tuple[type[pruner.PrunerError], ...] = (
    pruner.InvalidModelError,
    pruner.InvalidEvalSetError,
    pruner.InvalidConfigError,
    pruner.UnsupportedModelError,
    pruner.ResourceLimitError,
)
HANG_SECONDS = 60.0
"""A single load over this long is a hang: the process dies with every thread's traceback."""

# The CI budget: fixed examples (derandomized), no per-example deadline, no example database.
CI = settings(
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# ---------------------------------------------------------------------------------------------- seeds

SEED_MODELS = {
    "tiny_mlp": tiny_mlp().SerializeToString(),
    "compact": (FIXTURES / "compact.onnx").read_bytes(),
    "attention": (FIXTURES / "attention.onnx").read_bytes(),
    "mlp": (FIXTURES / "mlp.onnx").read_bytes(),
}


def _npz(arrays: dict[str, np.ndarray], compressed: bool = False) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)  # type: ignore[operator]
    return buffer.getvalue()


SEED_EVALSETS = {
    "tiny": _npz(tiny_mlp_evalset(8)),
    "tiny_compressed": _npz(tiny_mlp_evalset(8), compressed=True),
    "mlp_eval": (FIXTURES / "mlp_eval.npz").read_bytes(),
}
# models the validator checks eval sets against: (its inputs, a name for messages)
VALIDATION_MODELS = {
    "tiny_mlp": model_inputs(tiny_mlp()),
    "mlp": model_inputs(onnx.load(FIXTURES / "mlp.onnx")),
    "cnn": model_inputs(onnx.load(FIXTURES / "cnn.onnx")),
}

# --------------------------------------------------------------------------------------- the guards


@contextlib.contextmanager
def hang_guard(seconds: float = HANG_SECONDS) -> Iterator[None]:
    """Kills the process with all tracebacks if the block runs over ``seconds`` (a hang, even in C code)."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@contextlib.contextmanager
def no_new_files(folder: Path) -> Iterator[None]:
    """Fails if the block leaves a new file in ``folder`` (the process's working directory)."""
    before = set(folder.iterdir())
    yield
    after = set(folder.iterdir())
    assert after == before, f"the loader wrote {sorted(str(p) for p in after - before)}"


def outcome_of(call: Callable[[], object]) -> tuple[str, object]:
    """``("ok", result)`` or ``(error class name, error)``; documented errors must carry a message."""
    try:
        return "ok", call()
    except DOCUMENTED as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        assert "Traceback" not in str(e)
        return type(e).__name__, e
    except Exception as e:
        module = type(e).__module__
        return (type(e).__qualname__ if module == "builtins" else f"{module}.{type(e).__qualname__}"), e


def undocumented(name: str) -> bool:
    return name != "ok" and name not in {cls.__name__ for cls in DOCUMENTED}


# ------------------------------------------------------------------------------------ model property


def model_outcome(data: bytes, folder: Path | None = None) -> str:
    """What ``load_model`` and ``inspect`` make of ``data``: ``"<load>|<inspect>"`` outcome names.

    With ``folder`` the model is also written there as ``model.onnx`` and loaded by path (where
    external data is followed), which must end the same way as bytes or in a documented error.
    """
    with hang_guard():
        load, model = outcome_of(lambda: pruner.load_model(data))
        if load == "ok":
            assert isinstance(model, onnx.ModelProto)
            onnx.checker.check_model(model, full_check=True)
        inspected, _ = outcome_of(lambda: pruner.inspect(data))
        if folder is not None:
            path = folder / "model.onnx"
            path.write_bytes(data)
            by_path, _ = outcome_of(lambda: pruner.load_model(path))
            if undocumented(by_path):
                load = f"{load}(path:{by_path})"
    return f"{load}|{inspected}"


def assert_model_property(data: bytes, folder: Path | None = None) -> str:
    outcome = model_outcome(data, folder)
    bad = [part for part in outcome.replace("(path:", "|").replace(")", "").split("|") if undocumented(part)]
    assert not bad, f"undocumented outcome {outcome} for a {len(data)}-byte model: {_reproduce(data)}"
    return outcome


def _reproduce(data: bytes) -> str:
    return f"bytes (hex, first 64): {data[:64].hex()}"


# ------------------------------------------------------------------------------ model mutations


HUGE = [0, -1, -(2**63), 2**31, 2**32 + 1, 2**62, 2**63 - 1]
HOSTILE_LOCATIONS = [
    "../../etc/passwd",
    "/etc/passwd",
    "..\\..\\windows\\win.ini",
    "C:\\evil",
    "data/../../../x",
    "",
    "\x00",
    "a" * 5000,
    "model.onnx",
    ".",
    "~/.ssh/id_rsa",
    "file:///etc/passwd",
]


def _drop(container: Any, index: int) -> None:
    if len(container):
        del container[index % len(container)]


def _tensor_names(model: onnx.ModelProto) -> list[str]:
    names = [v.name for v in model.graph.input] + [t.name for t in model.graph.initializer]
    names += [o for n in model.graph.node for o in n.output]
    return names or ["x"]


def _set_dim(value: onnx.ValueInfoProto, axis: int, size: int | str) -> None:
    dims = value.type.tensor_type.shape.dim
    if not dims:
        dims.add()
    dim = dims[axis % len(dims)]
    if isinstance(size, str):
        dim.dim_param = size
    else:
        dim.dim_value = size


def _mutation(draw: st.DrawFn, model: onnx.ModelProto) -> str:
    """Applies one structural mutation to ``model`` in place; returns its name."""
    g = model.graph
    i = draw(st.integers(0, 1000))
    kind = draw(
        st.sampled_from(
            [
                "drop_node", "drop_all_nodes", "drop_output", "drop_all_outputs", "drop_input", "drop_initializer",
                "input_dim", "output_dim", "initializer_dims", "initializer_dtype", "input_dtype", "external_data",
                "opset", "no_opset", "ir_version", "duplicate_name", "duplicate_initializer", "rename_input",
                "op_type", "attribute", "node_input", "recursive_function", "empty_graph_name", "sparse_initializer",
            ]
        )
    )  # fmt: skip
    if kind == "drop_node":
        _drop(g.node, i)
    elif kind == "drop_all_nodes":
        del g.node[:]
    elif kind == "drop_output":
        _drop(g.output, i)
    elif kind == "drop_all_outputs":
        del g.output[:]
    elif kind == "drop_input":
        _drop(g.input, i)
    elif kind == "drop_initializer":
        _drop(g.initializer, i)
    elif kind in ("input_dim", "output_dim"):
        values = g.input if kind == "input_dim" else g.output
        if len(values):
            size = draw(st.one_of(st.sampled_from(HUGE), st.integers(0, 64), st.sampled_from(["", "N", "batch"])))
            _set_dim(values[i % len(values)], draw(st.integers(0, 5)), size)
    elif kind == "initializer_dims" and len(g.initializer):
        tensor = g.initializer[i % len(g.initializer)]
        dims = draw(st.lists(st.one_of(st.sampled_from(HUGE), st.integers(0, 300)), max_size=6))
        tensor.ClearField("dims")
        tensor.dims.extend(dims)
    elif kind == "initializer_dtype" and len(g.initializer):
        g.initializer[i % len(g.initializer)].data_type = draw(st.sampled_from([0, 8, 13, 16, 23, 99, -1]))
    elif kind == "input_dtype" and len(g.input):
        g.input[i % len(g.input)].type.tensor_type.elem_type = draw(st.sampled_from([0, 7, 8, 9, 10, 16, 99]))
    elif kind == "external_data" and len(g.initializer):
        tensor = g.initializer[i % len(g.initializer)]
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.data_location = TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value=draw(st.sampled_from(HOSTILE_LOCATIONS)))
        if draw(st.booleans()):
            tensor.external_data.add(key="offset", value=draw(st.sampled_from(["0", "-5", "99999999999", "x"])))
            tensor.external_data.add(key="length", value=draw(st.sampled_from(["4", "-1", str(2**62), "", "1e3"])))
    elif kind == "opset":
        entry = model.opset_import[0] if len(model.opset_import) else model.opset_import.add()
        entry.version = draw(st.sampled_from([-1, 0, 1, 6, 12, 99, 10**6, 2**62]))
        entry.domain = draw(st.sampled_from(["", "", "ai.onnx", "ai.onnx.ml", "evil.domain", "com.microsoft"]))
        if draw(st.booleans()):
            model.opset_import.add(domain=entry.domain, version=entry.version + 1)
    elif kind == "no_opset":
        del model.opset_import[:]
    elif kind == "ir_version":
        model.ir_version = draw(st.sampled_from([-1, 0, 1, 3, 99, 2**62]))
    elif kind == "duplicate_name" and len(g.node) >= 2:
        g.node[i % len(g.node)].output[0] = g.node[(i + 1) % len(g.node)].output[0]
    elif kind == "duplicate_initializer" and len(g.initializer):
        g.initializer.append(g.initializer[i % len(g.initializer)])
    elif kind == "rename_input" and len(g.input):
        g.input[i % len(g.input)].name = draw(st.sampled_from(["", "y", g.output[0].name if g.output else "z"]))
    elif kind == "op_type" and len(g.node):
        node = g.node[i % len(g.node)]
        node.op_type = draw(st.sampled_from(["", "Loop", "If", "Scan", "NoSuchOp", "Conv", "Gemm", "Reshape"]))
        node.domain = draw(st.sampled_from(["", "", "evil.domain"]))
    elif kind == "attribute" and len(g.node):
        node = g.node[i % len(g.node)]
        if len(node.attribute) and draw(st.booleans()):
            _drop(node.attribute, i)
        else:
            name = draw(st.sampled_from(["transB", "group", "kernel_shape", "axis", "pads", "strides", "then_branch"]))
            value = draw(st.sampled_from([0, -1, 2**62, [0, 0], [2**31] * 4, "x", 1.5]))
            node.attribute.append(helper.make_attribute(name, value))
    elif kind == "node_input" and len(g.node):
        node = g.node[i % len(g.node)]
        node.input.append(draw(st.sampled_from(["", "nowhere", *_tensor_names(model)[:5]])))
    elif kind == "recursive_function":
        # a model-local function that calls itself, used by the graph
        call = helper.make_node("Rec", ["a"], ["b"], domain="local")
        model.functions.append(
            helper.make_function("local", "Rec", ["a"], ["b"], [call], [helper.make_opsetid("", 17)])
        )
        model.opset_import.add(domain="local", version=1)
        if len(g.node):
            g.node.append(helper.make_node("Rec", [g.node[-1].output[0]], ["rec_out"], domain="local"))
    elif kind == "empty_graph_name":
        g.name = ""
    elif kind == "sparse_initializer" and len(g.initializer):
        tensor = g.initializer[i % len(g.initializer)]
        sparse = g.sparse_initializer.add()
        sparse.values.CopyFrom(tensor)
        sparse.indices.CopyFrom(helper.make_tensor("idx", TensorProto.INT64, [2], [2**62, -1]))
        sparse.dims.extend(tensor.dims)
    return kind


def _byte_mutation(draw: st.DrawFn, data: bytes) -> bytes:
    if not data:
        return data
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
    buf = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            pos = draw(st.integers(0, len(buf) - 1))
            buf[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del buf[draw(st.integers(0, len(buf) - 1)) :]
    elif kind == "insert":
        pos = draw(st.integers(0, len(buf)))
        buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    else:
        pos = draw(st.integers(0, len(buf) - 1))
        chunk = draw(st.binary(min_size=1, max_size=16))
        buf[pos : pos + len(chunk)] = chunk
    return bytes(buf)


@st.composite
def mutated_models(draw: st.DrawFn) -> bytes:
    """Serialized models: a seed, zero to three structural mutations, then maybe byte mutations."""
    model = onnx.ModelProto.FromString(SEED_MODELS[draw(st.sampled_from(sorted(SEED_MODELS)))])
    for _ in range(draw(st.integers(0, 3))):
        _mutation(draw, model)
    data = model.SerializeToString()
    if draw(st.integers(0, 3)) == 0:
        data = _byte_mutation(draw, data)
    return data


@given(data=mutated_models())
@settings(CI, max_examples=200)
def test_mutated_models_end_in_a_documented_error(data: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("model")
    with no_new_files(Path.cwd()):
        assert_model_property(data, folder)


# ------------------------------------------------------------------------------ eval set property


def evalset_outcome(data: bytes) -> str:
    """What ``load_eval_set`` and the validation against each validation model make of ``data``.

    ``"<load>"`` when loading fails, else ``"ok|<validation outcome per model>"``. The submit
    path's ``verify_eval_set`` must end as ``load_eval_set`` does (else ``"BUG: ..."``).
    """
    with hang_guard():
        load, evalset = outcome_of(lambda: pruner.load_eval_set(data))
        verify, _ = outcome_of(lambda: pruner.verify_eval_set(data))
        if verify != load:
            return f"BUG: verify_eval_set ends in {verify} where load_eval_set ends in {load}"
        if load != "ok":
            return load
        assert isinstance(evalset, pruner.EvalSet)
        checks = [outcome_of(lambda s=specs: validate_eval_set(evalset, s))[0] for specs in VALIDATION_MODELS.values()]
    return "|".join(["ok", *checks])


def assert_evalset_property(data: bytes) -> str:
    outcome = evalset_outcome(data)
    bad = [part for part in outcome.split("|") if undocumented(part)]
    assert not bad, f"undocumented outcome {outcome} for a {len(data)}-byte eval set: {_reproduce(data)}"
    return outcome


def npy_member(descr: str, shape: object, fortran: object = False, data: bytes = b"", version: int = 1) -> bytes:
    """A hand-written ``.npy`` file: any header text numpy's parser may be asked to read."""
    header = f"{{'descr': {descr!r}, 'fortran_order': {fortran!r}, 'shape': {shape!r}, }}"
    header = header.ljust(((len(header) + 11) // 64 + 1) * 64 - 11) + "\n"
    size = struct.pack("<H", len(header)) if version == 1 else struct.pack("<I", len(header))
    return b"\x93NUMPY" + bytes([version, 0]) + size + header.encode("latin1") + data


def zip_of(members: list[tuple[str, bytes]], method: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w", compression=method) as archive:
        warnings.simplefilter("ignore")  # duplicate names are wanted here
        for name, data in members:
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data, compress_type=method)
    return buffer.getvalue()


DESCRS = ["<f4", "<f8", "<i8", "|b1", "|O", "<U8", "|S4", "|V8", "<c8", "<f2", ">f4", "<M8[ns]", "<m8[s]", "garbage",
          "[('a', '<f4'), ('b', '|O')]", "[('a', '<f4', (2,))]", "<f4\x00"]  # fmt: skip
SHAPES = [(), (0,), (8, 8), (-1,), (2**40,), (2**31, 2**31), (2**62,), (1,) * 40, (3, "a"), "x", None, (4, -4), (8, 64)]
NAMES = ["x", "input", "labels", "x.npy", "../x", "/abs", " ", "a/b", "x" * 300, "\u00e9", "labels.npy"]


@st.composite
def npz_members(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    members = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(NAMES))
        name = name if name.endswith(".npy") or draw(st.booleans()) else name + ".npy"
        kind = draw(st.sampled_from(["header", "array", "nested_zip", "garbage", "truncated"]))
        if kind == "header":
            shape = draw(st.sampled_from(SHAPES))
            data = draw(st.binary(max_size=64))
            member = npy_member(
                draw(st.sampled_from(DESCRS)),
                shape,
                draw(st.sampled_from([False, True, "maybe"])),
                data,
                draw(st.sampled_from([1, 2, 3, 9])),
            )
        elif kind == "array":
            dtype = draw(st.sampled_from(["float32", "float64", "int64", "bool", "complex64", "float16", "uint8"]))
            shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=4)))
            fill = draw(st.sampled_from([0.0, 1.0, float("nan"), float("inf")]))
            buffer = io.BytesIO()
            with np.errstate(invalid="ignore"):
                np.save(buffer, np.full(shape, fill).astype(dtype))
            member = buffer.getvalue()
        elif kind == "nested_zip":
            member = SEED_EVALSETS["tiny"]
        elif kind == "garbage":
            member = draw(st.binary(max_size=64))
        else:
            member = _npz_member(SEED_EVALSETS["tiny"])[: draw(st.integers(0, 100))]
        members.append((name, member))
    return members


def _npz_member(npz: bytes, name: str = "x.npy") -> bytes:
    with zipfile.ZipFile(io.BytesIO(npz)) as archive:
        return archive.read(name)


@st.composite
def semantic_evalsets(draw: st.DrawFn) -> bytes:
    """Real ``np.savez`` archives of arrays whose names, dtypes, shapes and values may not fit the model."""
    arrays: dict[str, np.ndarray] = {}
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(["x", "input", "labels", "other"]))
        dtype = draw(st.sampled_from(["float32", "float64", "int64", "int32", "bool", "complex64", "float16", "U3"]))
        samples = draw(st.sampled_from([0, 1, 4, 8]))
        tail = draw(st.sampled_from([(), (8,), (64,), (1, 8, 8), (8, 8), (7,)]))
        fill = draw(st.sampled_from([0.5, float("nan"), float("inf"), -1.0]))
        with np.errstate(invalid="ignore"):
            arrays[name] = np.full((samples, *tail), fill).astype(dtype)
    return _npz(arrays, compressed=draw(st.booleans()))


@st.composite
def mutated_evalsets(draw: st.DrawFn) -> bytes:
    """``.npz`` bytes: rebuilt archives with hostile members, real archives, or byte-mutated seeds."""
    kind = draw(st.sampled_from(["members", "semantic", "bytes", "many_members", "method"]))
    if kind == "members":
        method = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]))
        return zip_of(draw(npz_members()), method)
    if kind == "semantic":
        return draw(semantic_evalsets())
    if kind == "many_members":
        member = npy_member("<f4", (1, 8), data=b"\0" * 32)
        return zip_of([(f"m{k}.npy", member) for k in range(draw(st.sampled_from([100, 2000])))])
    if kind == "method":
        # an unknown compression method number in both headers
        data = bytearray(SEED_EVALSETS["tiny"])
        method = draw(st.sampled_from([1, 6, 9, 98, 99, 0xFFFF]))
        for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
            start = 0
            while (at := data.find(signature, start)) >= 0:
                data[at + offset : at + offset + 2] = struct.pack("<H", method)
                start = at + 4
        return bytes(data)
    seed = SEED_EVALSETS[draw(st.sampled_from(sorted(SEED_EVALSETS)))]
    data = seed
    for _ in range(draw(st.integers(1, 3))):
        data = _byte_mutation(draw, data)
    return data


@given(data=mutated_evalsets())
@settings(CI, max_examples=200)
def test_mutated_eval_sets_end_in_a_documented_error(data: bytes) -> None:
    with no_new_files(Path.cwd()):
        assert_evalset_property(data)


# ---------------------------------------------------------------------------------- kept corpus


def corpus(target: str) -> list[tuple[str, list[str]]]:
    """``(file name, acceptable outcomes)`` of the kept cases of ``target`` ("model" or "evalset")."""
    path = CORPUS / "expected.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    return [(name, entry["expect"]) for name, entry in sorted(manifest.items()) if entry["target"] == target]


@pytest.mark.parametrize(("name", "expect"), corpus("model"), ids=[c[0] for c in corpus("model")])
def test_kept_model_cases(name: str, expect: list[str], tmp_path: Path) -> None:
    outcome = model_outcome((CORPUS / name).read_bytes(), tmp_path)
    assert outcome in expect, f"{name}: got {outcome}, expected one of {expect}"


@pytest.mark.parametrize(("name", "expect"), corpus("evalset"), ids=[c[0] for c in corpus("evalset")])
def test_kept_eval_set_cases(name: str, expect: list[str]) -> None:
    outcome = evalset_outcome((CORPUS / name).read_bytes())
    assert outcome in expect, f"{name}: got {outcome}, expected one of {expect}"


def test_the_corpus_stays_small() -> None:
    files = [p for p in CORPUS.iterdir() if p.is_file()]
    assert all(p.stat().st_size <= 16 * 1024 for p in files), [p.name for p in files if p.stat().st_size > 16384]
    assert sum(p.stat().st_size for p in files) < 512 * 1024
    manifest = json.loads((CORPUS / "expected.json").read_text())
    assert {p.name for p in files} - {"expected.json", "README.md"} == set(manifest)


def test_a_decompression_bomb_is_refused_without_memory_error() -> None:
    """2 MiB of deflated zeros declared as a 2**40-element array: an error, not a 4 TiB allocation."""
    member = npy_member("<f4", (2**40,), data=b"\0" * (2 << 20))
    data = zip_of([("x.npy", member)], zipfile.ZIP_DEFLATED)
    assert len(data) < 16 * 1024
    name, error = outcome_of(lambda: pruner.load_eval_set(data))
    assert name in ("InvalidEvalSetError", "ResourceLimitError"), f"{name}: {error}"
    assert "x" in str(error)
