"""Eval sets: reading .npz files (pruner.load_eval_set) and matching them to the model (pruner.prune)."""

from __future__ import annotations

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
