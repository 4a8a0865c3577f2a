"""Eval sets: reading .npz files (pruner.load_eval_set) and matching them to the model (pruner.prune)."""

from __future__ import annotations

import gc
import io
import resource
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

import pruner
from pruner import EvalSet, MetricKind, PruneOptions
from tests.helpers import parse, seeded, tiny_mlp, tiny_mlp_evalset, write_npz

FAST = PruneOptions(max_evaluations=2)

TWO_INPUTS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8] a, float[N, 8] b) => (float[N, 4] y) {
    s = Add (a, b)
    y = MatMul (s, w)
}
"""

# S is symbolic: the eval set may use any size for it
SYMBOLIC = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, S] x) => (float[N, 4] y) {
    m = ReduceMean <axes = [1], keepdims = 1> (x)
    y = MatMul (m, w)
}
"""


def mlp_data(n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    arrays = tiny_mlp_evalset(n)
    return arrays["x"], arrays["labels"]


def prune_error(evalset: EvalSet | bytes | Path, options: PruneOptions = FAST) -> str:
    with pytest.raises(pruner.InvalidEvalSetError) as info:
        pruner.prune(tiny_mlp(), evalset, options)
    return str(info.value)


def load_error(source: Path | bytes) -> str:
    with pytest.raises(pruner.InvalidEvalSetError) as info:
        pruner.load_eval_set(source)
    return str(info.value)


# --- load_eval_set ------------------------------------------------------------------------------


def test_valid_npz_from_path(tmp_path: Path) -> None:
    arrays = tiny_mlp_evalset(10)
    evalset = pruner.load_eval_set(write_npz(tmp_path / "eval.npz", arrays))
    assert sorted(evalset.inputs) == ["x"]
    np.testing.assert_array_equal(evalset.inputs["x"], arrays["x"])
    assert evalset.labels is not None
    np.testing.assert_array_equal(evalset.labels, arrays["labels"])
    assert len(evalset) == 10


def test_valid_npz_from_str_path(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "eval.npz", tiny_mlp_evalset(10))
    assert len(pruner.load_eval_set(str(path))) == 10


def test_valid_npz_from_bytes(tmp_path: Path) -> None:
    arrays = tiny_mlp_evalset(10)
    evalset = pruner.load_eval_set(write_npz(tmp_path / "eval.npz", arrays).read_bytes())
    np.testing.assert_array_equal(evalset.inputs["x"], arrays["x"])
    assert evalset.labels is not None
    assert evalset.labels.dtype == np.int64


def test_npz_without_labels(tmp_path: Path) -> None:
    evalset = pruner.load_eval_set(write_npz(tmp_path / "eval.npz", {"x": seeded((5, 8))}))
    assert evalset.labels is None
    assert len(evalset) == 5


def test_pickled_object_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    message = load_error(path)
    assert "pickle" in message
    assert "pickled.npz" in message


def test_pickled_object_array_is_refused_from_bytes(tmp_path: Path) -> None:
    path = tmp_path / "pickled.npz"
    np.savez(path, x=np.array([[1, "a"]], dtype=object), allow_pickle=True)
    assert "pickle" in load_error(path.read_bytes())


def test_non_zip_file(tmp_path: Path) -> None:
    path = tmp_path / "eval.npz"
    path.write_text("x,y\n1,2\n")
    message = load_error(path)
    assert "eval.npz" in message
    assert "not a readable .npz" in message
    # a text file holds no pickled data: saying so would send the user the wrong way
    assert "pickle" not in message


def test_truncated_npz(tmp_path: Path) -> None:
    data = write_npz(tmp_path / "full.npz", tiny_mlp_evalset()).read_bytes()
    path = tmp_path / "half.npz"
    path.write_bytes(data[: len(data) // 2])
    assert "not a readable .npz" in load_error(path)


def test_empty_bytes() -> None:
    assert "not a readable .npz" in load_error(b"")


def test_single_npy_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, seeded((4, 8)))
    assert ".npy" in load_error(path)


def test_missing_file(tmp_path: Path) -> None:
    message = load_error(tmp_path / "nope.npz")
    assert "nope.npz" in message
    assert "does not exist" in message


def test_npz_with_no_arrays(tmp_path: Path) -> None:
    path = tmp_path / "empty.npz"
    np.savez(path)
    assert "no arrays" in load_error(path)


# --- decompression bombs and lying headers ------------------------------------------------------

GIB = 1 << 30


def write_bomb(path: Path, nbytes: int, *, name: str = "x.npy") -> Path:
    """A deflated .npz whose member is ``nbytes`` of float64 zeros, streamed: never held in memory."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f8")), "fortran_order": False, "shape": (nbytes // 8,)}
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open(name, "w", force_zip64=True) as stream:
            np.lib.format.write_array_header_2_0(stream, header)
            for _ in range(nbytes // len(chunk)):
                stream.write(chunk)
    return path


def write_claim(path: Path, shape: tuple[int, ...], data: bytes = b"", *, name: str = "x.npy") -> Path:
    """An .npz whose member's header declares ``shape`` float64 but holds only ``data``."""
    header = {"descr": "<f8", "fortran_order": False, "shape": shape}
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, header)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, stream.getvalue() + data)
    return path


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_bomb(tmp_path_factory.mktemp("bomb") / "bomb.npz", GIB)
    assert path.stat().st_size < 8 << 20  # a few MB on disk
    return path


def test_a_decompression_bomb_is_refused_by_its_decoded_size_before_it_is_decoded(bomb: Path) -> None:
    before = peak_rss()
    for source in (bomb, bomb.read_bytes()):
        with pytest.raises(pruner.ResourceLimitError) as info:
            pruner.load_eval_set(source, max_bytes=64 << 20)
        message = str(info.value)
        assert "'x.npy'" in message and "1.0 GiB" in message and "64.0 MiB" in message
        assert info.value.subject == "max_eval_bytes"
    assert peak_rss() - before < GIB // 4  # the array (1 GiB) was never allocated


def test_the_limit_counts_decoded_bytes_of_all_members(tmp_path: Path) -> None:
    arrays = {"x": np.zeros((1000, 8), np.float32), "labels": np.zeros(1000, np.int64)}
    path = tmp_path / "eval.npz"
    np.savez_compressed(path, **arrays)
    assert path.stat().st_size < 4000  # compressed, far below what it decodes to
    total = sum(a.nbytes for a in arrays.values())
    assert len(pruner.load_eval_set(path, max_bytes=total)) == 1000
    with pytest.raises(pruner.ResourceLimitError, match=rf"over the limit of .*\({total - 1} bytes\)"):
        pruner.load_eval_set(path, max_bytes=total - 1)


def test_a_header_claiming_more_than_the_machine_has_is_refused_without_a_limit(tmp_path: Path) -> None:
    path = write_claim(tmp_path / "claim.npz", (10_000_000_000,))  # 80 GB of float64
    with pytest.raises(pruner.ResourceLimitError) as info:
        pruner.load_eval_set(path)
    assert "'x.npy'" in str(info.value) and "free" in str(info.value)
    assert info.value.subject == "max_eval_bytes"
    # the same guard when prune is given the path
    with pytest.raises(pruner.ResourceLimitError, match=r"'x\.npy'"):
        pruner.prune(tiny_mlp(), path, FAST)


def test_a_header_whose_product_is_absurd_is_a_resource_limit(tmp_path: Path) -> None:
    path = write_claim(tmp_path / "claim.npz", (1 << 62, 1 << 62, 16))  # would overflow int64
    with pytest.raises(pruner.ResourceLimitError, match=r"'x\.npy'"):
        pruner.load_eval_set(path)


def test_a_header_larger_than_its_data_is_a_truncated_archive(tmp_path: Path) -> None:
    path = write_claim(tmp_path / "short.npz", (100,), np.zeros(5).tobytes())
    message = load_error(path)
    assert "'x.npy'" in message and "800 bytes" in message and "truncated or inconsistent" in message


def test_a_zip_directory_that_lies_about_a_members_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lying.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        stream = io.BytesIO()
        np.save(stream, np.arange(16, dtype=np.float64))
        archive.writestr("x.npy", stream.getvalue())
    data = bytearray(path.read_bytes())
    central = data.index(b"PK\x01\x02")  # uncompressed size: 4 bytes at offset 24 of the entry
    size = int.from_bytes(data[central + 24 : central + 28], "little")
    data[central + 24 : central + 28] = (size + 64).to_bytes(4, "little")
    message = load_error(bytes(data))
    assert "'x.npy'" in message and "zip directory" in message


def test_a_member_that_decodes_to_other_data_than_declared_is_refused(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "eval.npz", {"x": np.arange(4096, dtype=np.float64)})
    with zipfile.ZipFile(path) as archive:
        info = archive.infolist()[0]
    data = bytearray(path.read_bytes())
    middle = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2
    data[middle] ^= 0xFF
    assert "not a readable .npz" in load_error(bytes(data))


def bad_archives(tmp_path: Path) -> dict[str, bytes]:
    """Archives ``load_eval_set`` refuses, one of each kind."""
    np.savez(tmp_path / "pickled.npz", x=np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(tmp_path / "single.npy", seeded((4, 8)))
    np.savez(tmp_path / "empty.npz")
    full = write_npz(tmp_path / "full.npz", {"x": np.arange(4096, dtype=np.float64)}).read_bytes()
    with zipfile.ZipFile(tmp_path / "full.npz") as archive:
        info = archive.infolist()[0]
    corrupt = bytearray(full)
    corrupt[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2] ^= 0xFF
    return {
        "pickled": (tmp_path / "pickled.npz").read_bytes(),
        "single npy": (tmp_path / "single.npy").read_bytes(),
        "no arrays": (tmp_path / "empty.npz").read_bytes(),
        "text": b"x,y\n1,2\n",
        "truncated": full[: len(full) // 2],
        "short member": write_claim(tmp_path / "short.npz", (100,), np.zeros(5).tobytes()).read_bytes(),
        "bad crc": bytes(corrupt),
        "over the limit": write_claim(tmp_path / "big.npz", (1 << 24,)).read_bytes(),
    }


def test_verify_eval_set_refuses_what_load_eval_set_refuses_with_the_same_message(tmp_path: Path) -> None:
    for kind, data in bad_archives(tmp_path).items():
        errors = []
        for read in (pruner.load_eval_set, pruner.verify_eval_set):
            with pytest.raises(pruner.PrunerError) as info:
                read(data, max_bytes=1 << 20)
            errors.append((type(info.value), str(info.value)))
        assert errors[0] == errors[1], kind


def test_verify_eval_set_keeps_no_array_and_returns_the_decoded_bytes(bomb: Path) -> None:
    before = peak_rss()
    assert pruner.verify_eval_set(bomb, max_bytes=2 * GIB) == GIB  # 1 GiB decoded, a chunk at a time
    assert peak_rss() - before < 64 << 20


def test_an_error_mid_archive_leaves_no_array_alive(tmp_path: Path) -> None:
    """The arrays read before a bad member are freed, even while the error is kept (as a server
    logs it): no frame of its traceback holds them."""
    path = tmp_path / "bad.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in (("a", np.ones(4 << 20)), ("b", np.arange(1024, dtype=np.float64))):
            stream = io.BytesIO()
            np.save(stream, array)
            archive.writestr(f"{name}.npy", stream.getvalue())
    data = bytearray(path.read_bytes())
    data[data.index(b"b.npy") + 200] ^= 0xFF  # a byte of b's data: its CRC no longer matches
    path.write_bytes(data)
    del data
    tracemalloc.start()
    try:
        with pytest.raises(pruner.InvalidEvalSetError, match=r"not a readable \.npz") as info:
            pruner.load_eval_set(path)
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.__cause__ is not None
    assert peak > 32 << 20  # a (32 MiB) was read
    assert current < 4 << 20  # and is gone


def test_a_member_that_is_not_an_npy_array_is_named(tmp_path: Path) -> None:
    path = tmp_path / "extra.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    assert "'notes.txt' is not a .npy array" in load_error(path)


def test_fortran_order_and_big_endian_arrays_read_back_exactly(tmp_path: Path) -> None:
    x = np.asfortranarray(seeded((7, 5))).astype(">f4")
    path = tmp_path / "eval.npz"
    np.savez_compressed(path, x=x, labels=np.arange(7))
    evalset = pruner.load_eval_set(path, max_bytes=1 << 20)
    np.testing.assert_array_equal(evalset.inputs["x"], x)
    assert evalset.inputs["x"].dtype == x.dtype
    np.testing.assert_array_equal(evalset.labels, np.arange(7))


def test_running_out_of_memory_while_reading_is_a_resource_limit(bomb: Path) -> None:
    """The header's 1 GiB passes the free-memory guard, but the process may not have it (an address
    space limit, as a container's would be): the allocation fails and the error says so."""
    script = f"""
import resource, sys
import numpy as np
import pruner
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), vm + (256 << 20)))
try:
    pruner.load_eval_set({str(bomb)!r})
except pruner.ResourceLimitError as e:
    print("refused:", e)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2]
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused:") and "'x.npy'" in done.stdout and "not enough memory" in done.stdout


# --- matching the model (validated by prune) ----------------------------------------------------


def test_matching_evalset_is_accepted() -> None:
    x, labels = mlp_data()
    result = pruner.prune(tiny_mlp(), EvalSet({"x": x}, labels), FAST)
    assert result.report.evaluations <= 2 + 3


def test_matching_npz_path_is_accepted(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "eval.npz", tiny_mlp_evalset())
    result = pruner.prune(tiny_mlp(), path, FAST)
    assert result.report.evaluations <= 2 + 3


def test_missing_input_name() -> None:
    x, labels = mlp_data()
    message = prune_error(EvalSet({"input": x}, labels))
    assert "'x'" in message
    assert "lacks" in message


def test_missing_input_name_from_npz_bytes(tmp_path: Path) -> None:
    x, labels = mlp_data()
    data = write_npz(tmp_path / "eval.npz", {"input": x, "labels": labels}).read_bytes()
    assert "'x'" in prune_error(data)


def test_extra_array_that_is_not_an_input() -> None:
    x, labels = mlp_data()
    message = prune_error(EvalSet({"x": x, "mask": x}, labels))
    assert "'mask'" in message
    assert "not model inputs" in message


def test_wrong_dtype() -> None:
    x, labels = mlp_data()
    message = prune_error(EvalSet({"x": x.astype(np.float64)}, labels))
    assert "'x'" in message
    assert "float64" in message
    assert "float32" in message


@pytest.mark.parametrize("shape", [(32,), (32, 8, 1), (32, 2, 4)])
def test_wrong_rank(shape: tuple[int, ...]) -> None:
    _, labels = mlp_data()
    message = prune_error(EvalSet({"x": np.zeros(shape, np.float32)}, labels))
    assert "'x'" in message
    assert str(list(shape)) in message


def test_wrong_fixed_dim() -> None:
    _, labels = mlp_data()
    message = prune_error(EvalSet({"x": np.zeros((32, 7), np.float32)}, labels))
    assert "'x'" in message
    assert "axis 1 must be 8" in message


def test_sample_count_differs_between_inputs() -> None:
    model = parse(TWO_INPUTS, {"w": seeded((8, 4))})
    evalset = EvalSet({"a": seeded((32, 8), 1), "b": seeded((31, 8), 2)}, None)
    with pytest.raises(pruner.InvalidEvalSetError) as info:
        pruner.prune(model, evalset, PruneOptions(metric=MetricKind.AGREEMENT, max_evaluations=2))
    message = str(info.value)
    assert "sample count" in message
    assert "a: 32" in message
    assert "b: 31" in message


def test_sample_count_differs_between_inputs_and_labels() -> None:
    x, labels = mlp_data()
    message = prune_error(EvalSet({"x": x}, labels[:-1]))
    assert "sample count" in message
    assert "labels: 31" in message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input(bad: float) -> None:
    x, labels = mlp_data()
    x[5, 3] = bad
    message = prune_error(EvalSet({"x": x}, labels))
    assert "'x'" in message
    assert "NaN or Inf" in message


def test_zero_samples() -> None:
    x, labels = mlp_data()
    assert "0 samples" in prune_error(EvalSet({"x": x[:0]}, labels[:0]))


@pytest.mark.parametrize("metric", [MetricKind.ACCURACY, MetricKind.TOPK, MetricKind.MSE])
def test_labels_missing_for_a_metric_that_needs_them(metric: MetricKind) -> None:
    x, _ = mlp_data()
    message = prune_error(EvalSet({"x": x}, None), PruneOptions(metric=metric, max_evaluations=2))
    assert "labels" in message
    assert metric.value in message


def test_no_labels_needed_for_agreement() -> None:
    x, _ = mlp_data()
    result = pruner.prune(tiny_mlp(), EvalSet({"x": x}, None), PruneOptions(metric=MetricKind.AGREEMENT))
    assert result.report.metric == "agreement"


@pytest.mark.parametrize("shift", [1, -1])
def test_labels_out_of_class_range(shift: int) -> None:
    x, labels = mlp_data()
    message = prune_error(EvalSet({"x": x}, labels + shift))
    assert "labels" in message
    assert "[0, 4)" in message


def test_float_labels_for_accuracy() -> None:
    x, labels = mlp_data()
    message = prune_error(EvalSet({"x": x}, labels.astype(np.float32)))
    assert "integer" in message
    assert "float32" in message


def test_string_labels() -> None:
    x, _ = mlp_data()
    assert "labels" in prune_error(EvalSet({"x": x}, np.array(["cat"] * 32)))


def test_nan_labels_for_mse() -> None:
    x, _ = mlp_data()
    labels = np.zeros((32, 4), np.float32)
    labels[0, 0] = np.nan
    message = prune_error(EvalSet({"x": x}, labels), PruneOptions(metric=MetricKind.MSE, max_evaluations=2))
    assert "labels" in message
    assert "NaN" in message


@pytest.mark.parametrize("size", [1, 3, 17])
def test_symbolic_dim_accepts_any_size(size: int) -> None:
    model = parse(SYMBOLIC, {"w": seeded((1, 4))})
    evalset = EvalSet({"x": seeded((16, size), size)}, None)
    result = pruner.prune(model, evalset, PruneOptions(metric=MetricKind.AGREEMENT, max_evaluations=2))
    assert result.report.baseline.search == 1.0


def test_output_that_is_not_a_model_output() -> None:
    x, labels = mlp_data()
    with pytest.raises(pruner.InvalidConfigError) as info:
        pruner.prune(tiny_mlp(), EvalSet({"x": x}, labels), PruneOptions(output="h", max_evaluations=2))
    assert "'h'" in str(info.value)
    assert "not a model output" in str(info.value)


@pytest.mark.parametrize("where", [0, 31, 63])
def test_the_finite_check_finds_a_nan_in_any_slice_without_a_mask_of_the_whole_set(where: int) -> None:
    from pruner._evalset import FINITE_CHUNK, InputSpec, validate_eval_set

    x = np.zeros((64, FINITE_CHUNK // 16), np.float32)  # 4x the elements of one slice tested
    specs = [InputSpec("x", np.dtype(np.float32), (None, x.shape[1]))]
    tracemalloc.start()
    try:
        validate_eval_set(EvalSet({"x": x}), specs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= x.size // 2  # a whole-set boolean mask is x.size bytes
    x[where, -1] = np.nan
    with pytest.raises(pruner.InvalidEvalSetError, match="'x' contains NaN or Inf"):
        validate_eval_set(EvalSet({"x": x}), specs)
