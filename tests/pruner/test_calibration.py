"""Calibration's statistics against the straightforward products: each layer's input rows
written out by hand (im2col by loops, a recurrent node's x_t and h_{t-1}), then X^T X in float64."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import pruner
from pruner._analysis import analyze
from pruner._recover import Calibration, _grams, _probe, _recurrent_rows, calibrate, layouts
from tests.helpers import parse
from tests.pruner.test_recurrent import recurrent

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
SAMPLES = 150  # three batches of 64, the last one short


def calibrated(model: onnx.ModelProto, x: np.ndarray, batch: int = 64) -> Calibration:
    layers = list(analyze(model).layers)
    evalset = pruner.EvalSet({"x": x})
    return calibrate(model, layers, evalset, np.arange(len(x)), batch_size=batch, fixed_batch=None, full=True)


def im2col(x: np.ndarray, kernel: int, stride: int, pad: int) -> np.ndarray:
    """[N, C, H, W] -> [N * positions, C * kernel^2] by loops: zero outside the image."""
    n, c, h, w = x.shape
    out_h, out_w = (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1
    rows = []
    for i, oy, ox in itertools.product(range(n), range(out_h), range(out_w)):
        row = []
        for ch, ky, kx in itertools.product(range(c), range(kernel), range(kernel)):
            y, xx = oy * stride + ky - pad, ox * stride + kx - pad
            row.append(x[i, ch, y, xx] if 0 <= y < h and 0 <= xx < w else 0.0)
        rows.append(row)
    return np.array(rows, dtype=np.float64)


def group_products(rows: np.ndarray, groups: int) -> np.ndarray:
    width = rows.shape[1] // groups
    blocks = [rows[:, g * width : (g + 1) * width] for g in range(groups)]
    return np.stack([block.T @ block for block in blocks])


def assert_close(got: np.ndarray | None, expected: np.ndarray) -> None:
    assert got is not None and got.dtype == np.float64 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


@pytest.mark.parametrize(
    ("channels", "groups", "stride"),
    [(4, 1, 1), (4, 1, 2), (6, 2, 1), (6, 3, 2), (8, 8, 1), (8, 8, 2)],
    ids=["dense", "dense-strided", "grouped", "grouped-strided", "depthwise", "depthwise-strided"],
)
def test_conv_gram_matrices_are_the_products_of_its_receptive_fields(channels: int, groups: int, stride: int) -> None:
    # 4x4 maps: few enough positions that every one is kept, so the rows are all of im2col's
    rng = np.random.default_rng(channels + groups + stride)
    out = (4 + 2 - 3) // stride + 1
    weight = rng.standard_normal((5 * groups, channels // groups, 3, 3)).astype(np.float32)
    text = HEADER + (
        f"g (float[N, {channels}, 4, 4] x) => (float[N, {5 * groups}, {out}, {out}] y) "
        f"{{ y = Conv <group = {groups}, strides = [{stride}, {stride}], pads = [1, 1, 1, 1]> (x, w) }}"
    )
    x = (rng.standard_normal((SAMPLES, channels, 4, 4)) + 0.3).astype(np.float32)
    calibration = calibrated(parse(text, {"w": weight}), x)
    rows = im2col(x.astype(np.float64), 3, stride, 1)
    stats = calibration.stats["w"]
    assert stats.count == len(rows)
    assert_close(stats.gram, group_products(rows, groups))
    np.testing.assert_allclose(stats.mean, rows.mean(axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["Gemm", "MatMul", "MatMul-weight-first"])
def test_gemm_and_matmul_gram_matrices_are_x_transpose_x(op: str) -> None:
    rng = np.random.default_rng(5)
    if op == "MatMul":  # a 3-D input: every [.., 7] row is one
        x = rng.standard_normal((SAMPLES, 3, 7)).astype(np.float32)
        text = HEADER + "g (float[N, 3, 7] x) => (float[N, 3, 5] y) { y = MatMul (x, w) }"
        weight, rows = rng.standard_normal((7, 5)), x.reshape(-1, 7)
    elif op == "Gemm":
        x = rng.standard_normal((SAMPLES, 7)).astype(np.float32)
        text = HEADER + "g (float[N, 7] x) => (float[N, 5] y) { y = Gemm <transB = 1> (x, w) }"
        weight, rows = rng.standard_normal((5, 7)), x
    else:  # the weight is the first operand: the data's columns are its rows
        x = rng.standard_normal((SAMPLES, 7, 3)).astype(np.float32)
        text = HEADER + "g (float[N, 7, 3] x) => (float[N, 5, 3] y) { y = MatMul (w, x) }"
        weight, rows = rng.standard_normal((5, 7)), x.swapaxes(1, 2).reshape(-1, 7)
    calibration = calibrated(parse(text, {"w": weight.astype(np.float32)}), x)
    rows64 = rows.astype(np.float64)
    assert_close(calibration.stats["w"].gram, (rows64.T @ rows64)[None])


@pytest.mark.parametrize("op_type", ["LSTM", "GRU"])
def test_recurrent_gram_matrices_are_those_of_x_t_and_h_t_minus_1(op_type: str) -> None:
    model = recurrent(op_type, head=True)
    x = np.random.default_rng(2).standard_normal((10, 5, 12)).astype(np.float32)
    calibration = calibrated(model, x, batch=4)  # three batches
    # W reads each step's input: one row per (sample, step)
    rows = x.reshape(-1, 12).astype(np.float64)
    assert_close(calibration.stats["w"].gram, (rows.T @ rows)[None])
    # R reads h_{t-1} of every gate: the rows the layout makes from one pass over all samples,
    # with the states onnxruntime computed
    found, _ = layouts(model, list(analyze(model).layers))
    use = found["r"].all_uses[0]
    assert use.recurrent is not None
    probe, values = _probe(model, {"r": found["r"]})
    names = [use.input, use.recurrent.state]
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values |= dict(zip(names, session.run(names, {"x": x}), strict=True))
    states = _recurrent_rows(found["r"].unfold, use.input, use.recurrent, values, len(x), len(x)).astype(np.float64)
    assert len(states) == 5 * 10  # every step kept: no subset drawn
    assert_close(calibration.stats["r"].gram, group_products(states, found["r"].groups))


def test_calibration_is_the_same_to_the_bit_run_twice() -> None:
    rng = np.random.default_rng(9)
    weight = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    text = HEADER + (
        "g (float[N, 8, 20, 20] x) => (float[N, 8, 20, 20] y) { y = Conv <group = 8, pads = [1, 1, 1, 1]> (x, w) }"
    )
    x = rng.standard_normal((SAMPLES, 8, 20, 20)).astype(np.float32)
    first, second = calibrated(parse(text, {"w": weight}), x), calibrated(parse(text, {"w": weight}), x)
    for name in ("gram", "total", "squares"):
        np.testing.assert_array_equal(getattr(first.stats["w"], name), getattr(second.stats["w"], name))


def test_the_layers_statistics_on_several_threads_are_one_threads_to_the_bit() -> None:
    """Each layer's sums are made by one thread in batch order whatever the count: a model of
    several layers (a shared weight among them) gives the same bits on 1 and on 4 threads."""
    rng = np.random.default_rng(11)
    weights = {
        "w1": rng.standard_normal((16, 8, 3, 3)).astype(np.float32),
        "w2": rng.standard_normal((16, 1, 3, 3)).astype(np.float32),
        "w3": rng.standard_normal((8, 16, 1, 1)).astype(np.float32),
    }
    text = HEADER + (
        "g (float[N, 8, 12, 12] x) => (float[N, 8, 12, 12] y) {"
        " a = Conv <pads = [1, 1, 1, 1]> (x, w1) b = Conv <group = 16, pads = [1, 1, 1, 1]> (a, w2)"
        " c = Conv (b, w3) d = Conv <pads = [1, 1, 1, 1]> (c, w1) e = Conv <group = 16, pads = [1, 1, 1, 1]> (d, w2)"
        " y = Conv (e, w3) }"
    )
    x = rng.standard_normal((SAMPLES, 8, 12, 12)).astype(np.float32)
    model = parse(text, weights)
    layers = list(analyze(model).layers)
    evalset, rows = pruner.EvalSet({"x": x}), np.arange(SAMPLES)
    options = {"batch_size": 64, "fixed_batch": None, "full": True}
    runs = [calibrate(model, layers, evalset, rows, threads=threads, **options) for threads in (1, 4)]
    assert set(runs[0].stats) == {"w1", "w2", "w3"}
    for name in runs[0].stats:
        for field in ("gram", "total", "squares"):
            np.testing.assert_array_equal(getattr(runs[0].stats[name], field), getattr(runs[1].stats[name], field))


@pytest.mark.parametrize(("groups", "width"), [(1, 30), (40, 9), (200, 25), (3, 70)])
def test_grouped_products_of_two_arrays_are_each_groups_own(groups: int, width: int) -> None:
    rng = np.random.default_rng(groups)
    x, y = (rng.standard_normal((300, groups * width)).astype(np.float32) for _ in range(2))
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    for other, right in ((None, x64), (y, y64)):
        got = _grams(x, groups, other)
        assert got.dtype == np.float32 and got.shape == (groups, width, width)
        expected = np.stack(
            [x64[:, g * width : (g + 1) * width].T @ right[:, g * width : (g + 1) * width] for g in range(groups)]
        )
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def test_one_blas_thread_is_restored_when_the_last_overlapping_pass_leaves() -> None:
    import threadpoolctl

    from pruner._blas import one_blas_thread

    def blas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    first, second = one_blas_thread(), one_blas_thread()  # two jobs' passes overlapping
    first.__enter__()
    second.__enter__()
    assert set(blas_threads()) == {1}
    first.__exit__(None, None, None)
    assert set(blas_threads()) == {1}  # the second pass still computes
    second.__exit__(None, None, None)
    assert blas_threads() == before


def test_a_run_holds_one_blas_thread_from_start_to_end_and_concurrent_runs_give_its_bits() -> None:
    import hashlib
    import threading

    import threadpoolctl

    fixtures = Path(__file__).resolve().parents[1] / "fixtures"

    def blas() -> set[int]:
        return {i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}

    seen: list[set[int]] = []
    options = pruner.PruneOptions(max_evaluations=4)

    def run(record: bool) -> str:
        result = pruner.prune(
            fixtures / "cnn.onnx",
            fixtures / "cnn_eval.npz",
            options,
            on_progress=(lambda event: seen.append(blas())) if record else None,
        )
        return hashlib.sha256(result.model_bytes or result.model.SerializeToString()).hexdigest()

    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):  # as a 2-core machine starts
        solo = run(record=True)
        assert seen and all(threads == {1} for threads in seen)  # every step, not the calibration alone
        assert blas() == {2}  # given back at the end
        together: list[str] = []
        runs = [threading.Thread(target=lambda: together.append(run(record=False))) for _ in range(2)]
        for t in runs:
            t.start()
        for t in runs:
            t.join()
    assert together == [solo, solo]
