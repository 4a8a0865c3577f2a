"""Loading and saving models: pruner.load_model / pruner.save_model on good and bad input."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import pruner
from tests.helpers import parse, seeded, tiny_mlp

UNKNOWN_OP = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8] x) => (float[N, 8] y) {
    y = FrobnicateOp (x)
}
"""

BAD_SHAPES = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8] x) => (float[N, 4] y) {
    y = MatMul (x, w)
}
"""


def weights_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_same_weights(got: onnx.ModelProto, want: onnx.ModelProto) -> None:
    got_w, want_w = weights_of(got), weights_of(want)
    assert sorted(got_w) == sorted(want_w)
    for name, array in want_w.items():
        np.testing.assert_array_equal(got_w[name], array)
        assert got_w[name].dtype == array.dtype


def load_error(source: str | os.PathLike[str] | bytes) -> str:
    with pytest.raises(pruner.InvalidModelError) as info:
        pruner.load_model(source)
    return str(info.value)


# --- valid models -------------------------------------------------------------------------------


def test_valid_model_loads_from_path(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(tiny_mlp(), str(path))
    model = pruner.load_model(path)
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Relu", "MatMul"]
    assert_same_weights(model, tiny_mlp())


def test_valid_model_loads_from_str_path(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(tiny_mlp(), str(path))
    assert_same_weights(pruner.load_model(str(path)), tiny_mlp())


def test_valid_model_loads_from_bytes() -> None:
    model = pruner.load_model(tiny_mlp().SerializeToString())
    assert [i.name for i in model.graph.input] == ["x"]
    assert [o.name for o in model.graph.output] == ["y"]
    assert_same_weights(model, tiny_mlp())


# --- not a model --------------------------------------------------------------------------------


def test_empty_bytes() -> None:
    message = load_error(b"")
    assert "empty" in message
    assert "not an ONNX model" in message


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    message = load_error(path)
    assert "not an ONNX model" in message
    assert "empty.onnx" in message


def test_random_bytes() -> None:
    data = np.random.default_rng(0).bytes(512)
    assert "not an ONNX model" in load_error(data)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.onnx"
    path.write_text("this is a text file, not a model\n")
    message = load_error(path)
    assert "not an ONNX model" in message
    assert "notes.onnx" in message


def test_missing_file(tmp_path: Path) -> None:
    message = load_error(tmp_path / "nope.onnx")
    assert "nope.onnx" in message
    assert "does not exist" in message


def test_directory_is_not_a_model(tmp_path: Path) -> None:
    assert "not a file" in load_error(tmp_path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=200))
def test_arbitrary_bytes_raise_only_invalid_model_error(data: bytes) -> None:
    # whatever protobuf makes of them, garbage never escapes as another exception type
    with pytest.raises(pruner.InvalidModelError):
        pruner.load_model(data)


# --- truncated ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
def test_truncated_model_from_bytes(fraction: float) -> None:
    data = tiny_mlp().SerializeToString()
    message = load_error(data[: int(len(data) * fraction)])
    assert "truncated" in message


def test_truncated_model_file(tmp_path: Path) -> None:
    data = tiny_mlp().SerializeToString()
    path = tmp_path / "half.onnx"
    path.write_bytes(data[: len(data) // 2])
    message = load_error(path)
    assert "truncated" in message
    assert "half.onnx" in message


def test_every_proper_prefix_is_rejected() -> None:
    # a cut on a field boundary parses; then the missing graph or opset must still be caught
    data = tiny_mlp().SerializeToString()
    accepted = []
    for cut in range(len(data)):
        try:
            pruner.load_model(data[:cut])
        except pruner.InvalidModelError:
            continue
        accepted.append(cut)
    assert accepted == []


# --- checker and opset --------------------------------------------------------------------------


def test_unknown_op_fails_checker() -> None:
    model = onnx.parser.parse_model(UNKNOWN_OP)
    message = load_error(model.SerializeToString())
    assert "checker" in message
    assert "FrobnicateOp" in message


def test_shape_error_only_full_check_finds_is_rejected() -> None:
    model = parse(BAD_SHAPES, {"w": seeded((5, 4))}, check=False)
    onnx.checker.check_model(model)  # the plain check passes: only strict shape inference sees it
    message = load_error(model.SerializeToString())
    assert "checker" in message
    assert "MatMul" in message


def test_unknown_op_file_fails_checker(tmp_path: Path) -> None:
    path = tmp_path / "unknown.onnx"
    path.write_bytes(onnx.parser.parse_model(UNKNOWN_OP).SerializeToString())
    assert "checker" in load_error(path)


def test_no_opset_import() -> None:
    model = tiny_mlp()
    del model.opset_import[:]
    assert "opset" in load_error(model.SerializeToString())


def test_no_opset_import_file(tmp_path: Path) -> None:
    model = tiny_mlp()
    del model.opset_import[:]
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert "opset" in load_error(path)


def test_model_without_nodes_is_rejected() -> None:
    model = tiny_mlp()
    del model.graph.node[:]
    assert "no graph nodes" in load_error(model.SerializeToString())


# --- external data ------------------------------------------------------------------------------


def save_external(folder: Path, name: str = "m.onnx", location: str = "w.data") -> Path:
    """tiny_mlp saved with every initializer in ``folder/location``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    # onnx.save_model rewrites the tensors it externalizes, so give it a throwaway model
    onnx.save_model(tiny_mlp(), str(path), save_as_external_data=True, location=location, size_threshold=0)
    return path


def edit_external(path: Path, **entries: str) -> None:
    """Rewrite the external_data entries (location, offset, length) of every tensor of ``path``."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key in entries:
                entry.value = entries[entry.key]
    path.write_bytes(model.SerializeToString())


def test_external_data_loads_from_path(tmp_path: Path) -> None:
    path = save_external(tmp_path)
    raw = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in raw.graph.initializer)
    model = pruner.load_model(path)
    assert_same_weights(model, tiny_mlp())
    # the loaded model is self-contained
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)
    assert_same_weights(pruner.load_model(model.SerializeToString()), tiny_mlp())


def test_external_data_parent_folder_is_refused(tmp_path: Path) -> None:
    save_external(tmp_path)  # a real w.data in the parent, so only the location is wrong
    path = save_external(tmp_path / "model")
    edit_external(path, location="../w.data")
    message = load_error(path)
    assert "w1" in message
    assert "../w.data" in message
    assert "outside" in message


def test_external_data_absolute_location_is_refused(tmp_path: Path) -> None:
    path = save_external(tmp_path)
    location = str((tmp_path / "w.data").resolve())
    edit_external(path, location=location)
    message = load_error(path)
    assert "w1" in message
    assert location in message


def test_external_data_missing_file(tmp_path: Path) -> None:
    path = save_external(tmp_path)
    (tmp_path / "w.data").unlink()
    message = load_error(path)
    assert "w1" in message
    assert "w.data" in message
    assert "missing" in message


def test_external_data_symlink_out_of_folder_is_refused(tmp_path: Path) -> None:
    save_external(tmp_path)
    path = save_external(tmp_path / "model", location="link.data")
    (tmp_path / "model" / "link.data").unlink()
    (tmp_path / "model" / "link.data").symlink_to(tmp_path / "w.data")
    message = load_error(path)
    assert "link.data" in message
    assert "outside" in message


def test_external_data_range_past_end_of_file(tmp_path: Path) -> None:
    path = save_external(tmp_path)
    edit_external(path, length=str(10**9))
    message = load_error(path)
    assert "w1" in message
    assert "exceeds" in message


def test_external_data_via_bytes_is_refused(tmp_path: Path) -> None:
    path = save_external(tmp_path)
    message = load_error(path.read_bytes())
    assert "external data" in message
    assert "w1" in message


@pytest.mark.parametrize("location", ["../w.data", "/etc/passwd", "missing.data"])
def test_bad_external_location_via_bytes_mentions_external_data(tmp_path: Path, location: str) -> None:
    path = save_external(tmp_path)
    edit_external(path, location=location)
    assert "external data" in load_error(path.read_bytes())


# --- save_model ---------------------------------------------------------------------------------


def test_save_model_writes_loadable_model_and_no_temp_files(tmp_path: Path) -> None:
    model = tiny_mlp()
    before = model.SerializeToString()
    target = tmp_path / "out.onnx"
    pruner.save_model(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    assert_same_weights(pruner.load_model(target), tiny_mlp())
    assert model.SerializeToString() == before


def test_save_model_replaces_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old content")
    pruner.save_model(tiny_mlp(seed=3), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    assert_same_weights(pruner.load_model(target), tiny_mlp(seed=3))


def test_save_model_to_str_path(tmp_path: Path) -> None:
    pruner.save_model(tiny_mlp(), str(tmp_path / "out.onnx"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_save_model_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()  # a folder where the file should go: the final rename fails
    with pytest.raises(pruner.InvalidConfigError, match=r"taken.*is a folder"):
        pruner.save_model(tiny_mlp(), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert list(target.iterdir()) == []


def test_save_model_file_mode_follows_umask(tmp_path: Path) -> None:
    # a saved model must be as readable as any file the user writes, not private to its owner
    old = os.umask(0o022)
    try:
        pruner.save_model(tiny_mlp(), tmp_path / "out.onnx")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.onnx").stat().st_mode) == 0o644


# --- debug log ------------------------------------------------------------------------------------


def debug_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pruner._model" and r.levelno == logging.DEBUG]


def test_loading_logs_what_was_loaded_at_debug(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = save_external(tmp_path)
    size = path.stat().st_size
    with caplog.at_level(logging.DEBUG, logger="pruner._model"):
        pruner.load_model(path)
        pruner.load_model(tiny_mlp().SerializeToString())
    from_path, from_bytes = debug_lines(caplog)
    inits = len(tiny_mlp().graph.initializer)
    assert from_path.startswith(
        f"loaded {str(path)!r}: {size} bytes ({inits} tensors in external data), opset ai.onnx:"
    )
    assert f"{len(tiny_mlp().graph.node)} nodes, {inits} initializers; parsed and checked in " in from_path
    assert from_bytes.startswith(f"loaded the model bytes: {tiny_mlp().ByteSize()} bytes (0 tensors in external")


def test_saving_logs_every_file_written_at_debug(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tiny_mlp().SerializeToString()
    with caplog.at_level(logging.DEBUG, logger="pruner._model"):
        pruner.save_model(data, tmp_path / "m.onnx", companions=[(tmp_path / "r.json", b"{}")])
    (line,) = debug_lines(caplog)
    assert line.startswith(
        f"wrote {str(tmp_path / 'm.onnx')!r} ({len(data)} bytes), {str(tmp_path / 'r.json')!r} (2 bytes) in "
    )


def test_nothing_is_logged_above_debug(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pruner._model"):
        pruner.save_model(tiny_mlp(), tmp_path / "m.onnx")
        pruner.load_model(tmp_path / "m.onnx")
    assert [r for r in caplog.records if r.name == "pruner._model"] == []
