"""Recovery from calibration activations, on tiny graphs with known activations."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import pruner
from pruner import _recover
from pruner._analysis import analyze
from pruner._recover import (
    MIN_POSITIONS,
    LayerLayout,
    _damped,
    _fit_rows,
    _inverse_factor,
    _one_pass,
    _solve_rows,
    _unfold,
    calibrate,
    positions_kept,
)
from tests.helpers import parse

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def gemm_model(weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    out, width = weight.shape
    text = HEADER + f"g (float[N, {width}] x) => (float[N, {out}] y) {{ y = Gemm <transB = 1> (x, w, b) }}"
    return parse(text, {"w": weight, "b": bias})


def two_gemms(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """x -> Gemm(w1[, b1]) -> Relu -> Gemm(w2[, b2]) -> y, with ``weights`` as initializers."""
    width = weights["w1"].shape[1]
    out = weights["w2"].shape[0]
    b1, b2 = (", b1", ", b2") if "b1" in weights else ("", "")
    text = HEADER + (
        f"g (float[N, {width}] x) => (float[N, {out}] y) "
        f"{{ h = Gemm <transB = 1> (x, w1{b1}) r = Relu (h) y = Gemm <transB = 1> (r, w2{b2}) }}"
    )
    return parse(text, weights)


def correlated_inputs(n: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((width, width))
    return (rng.standard_normal((n, width)) @ mix + 0.5).astype(np.float32)


def calibrated(model: onnx.ModelProto, x: np.ndarray, full: bool = True):  # type: ignore[no-untyped-def]
    layers = list(analyze(model).layers)
    evalset = pruner.EvalSet({"x": x})
    return calibrate(model, layers, evalset, np.arange(len(x)), batch_size=64, fixed_batch=None, full=full)


def conjugate_gradients_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turn the exact solvers off: every row goes to conjugate gradients."""
    for name in ("DIRECT_STEPS", "DIRECT_ROWS", "DIRECT_SMALL"):
        monkeypatch.setattr(f"pruner._recover.{name}", 0)


@pytest.mark.parametrize("solver", ["exact rows", "conjugate gradients"])
def test_reconstruction_beats_masking_and_keeps_the_mask(monkeypatch: pytest.MonkeyPatch, solver: str) -> None:
    if solver == "conjugate gradients":
        conjugate_gradients_only(monkeypatch)
    rng = np.random.default_rng(1)
    weight, bias = rng.standard_normal((6, 12)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    x = correlated_inputs(400, 12)
    calibration = calibrated(gemm_model(weight, bias), x)
    mask = np.abs(weight) < np.quantile(np.abs(weight), 0.6)
    masked, _ = calibration.recover("w", weight, mask, reconstruct=False)
    refit, _ = calibration.recover("w", weight, mask, reconstruct=True)
    np.testing.assert_array_equal(masked == 0, mask | (weight == 0))
    assert np.all(refit[mask] == 0)
    reference = x @ weight.T
    error_masked = np.mean((x @ masked.T - reference) ** 2)
    error_refit = np.mean((x @ refit.T - reference) ** 2)
    assert error_refit < 0.8 * error_masked
    # close to the exact per-row least-squares fit
    exact = np.zeros_like(weight)
    for row in range(weight.shape[0]):
        keep = ~mask[row]
        exact[row, keep] = np.linalg.lstsq(x[:, keep], reference[:, row], rcond=None)[0]
    assert error_refit <= np.mean((x @ exact.T - reference) ** 2) * 1.05 + 1e-6
    # started from the fit at a lower sparsity (as the search does), the same fit
    lighter = np.abs(weight) < np.quantile(np.abs(weight), 0.4)
    start, _ = calibration.recover("w", weight, lighter, reconstruct=True)
    warm, _ = calibration.recover("w", weight, mask, reconstruct=True, start=start)
    assert np.all(warm[mask] == 0)
    np.testing.assert_allclose(warm, refit, atol=1e-3)


def test_a_mask_shared_by_rows_is_solved_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove mode's consumers lose the same input columns in every row: one factorisation
    solves them all, to the same fit conjugate gradients reach."""
    rng = np.random.default_rng(2)
    weight, bias = rng.standard_normal((16, 24)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    x = correlated_inputs(500, 24)
    calibration = calibrated(gemm_model(weight, bias), x)
    mask = np.zeros(weight.shape, dtype=bool)
    mask[:, [3, 7, 11, 20]] = True
    mask[[2, 5]] = True  # removed outputs: whole rows
    direct, _ = calibration.recover("w", weight, mask, reconstruct=True)
    assert np.all(direct[mask] == 0)
    reference = x @ weight.T
    keep = ~mask[0]
    exact = np.zeros_like(weight)
    exact[:, keep] = np.linalg.lstsq(x[:, keep], reference, rcond=None)[0].T
    exact[mask] = 0
    assert np.mean((x @ direct.T - reference) ** 2) <= np.mean((x @ exact.T - reference) ** 2) * 1.05 + 1e-6
    conjugate_gradients_only(monkeypatch)
    iterative, _ = calibration.recover("w", weight, mask, reconstruct=True)
    np.testing.assert_allclose(direct, iterative, atol=1e-3)


def test_rows_with_few_kept_inputs_are_solved_exactly_per_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """At high sparsity each row is solved on its own kept inputs (padded into one batch): the exact
    per-row least squares, which conjugate gradients approach."""
    rng = np.random.default_rng(6)
    weight, bias = rng.standard_normal((24, 64)).astype(np.float32), rng.standard_normal(24).astype(np.float32)
    x = correlated_inputs(800, 64, seed=7)
    calibration = calibrated(gemm_model(weight, bias), x)
    mask = rng.random(weight.shape) < 0.8  # a different mask in every row, 5-22 kept of 64
    mask[3] = True  # a row with nothing kept
    calls = []
    monkeypatch.setattr("pruner._recover._least_squares", lambda *a: calls.append(a) or a[0])
    direct, _ = calibration.recover("w", weight, mask, reconstruct=True)
    assert not calls  # no conjugate-gradient steps
    np.testing.assert_array_equal(direct == 0, mask | (weight == 0))
    hessian = calibration.hessian("w")
    assert hessian is not None
    exact = np.zeros_like(weight, dtype=np.float64)
    for row in range(len(weight)):
        keep = ~mask[row]
        if keep.any():
            block = hessian[0][np.ix_(keep, keep)]
            exact[row, keep] = np.linalg.solve(block, (weight[row].astype(np.float64) @ hessian[0])[keep])
    np.testing.assert_allclose(direct, exact, rtol=1e-4, atol=1e-5)
    monkeypatch.undo()
    conjugate_gradients_only(monkeypatch)
    iterative, _ = calibration.recover("w", weight, mask, reconstruct=True)
    np.testing.assert_allclose(direct, iterative, atol=2e-3)


def test_a_block_that_cannot_be_factorised_goes_to_conjugate_gradients() -> None:
    hessian = np.eye(4)[None].copy()
    hessian[0, 0, 0] = 0.0  # singular (damping rules this out for finite statistics)
    pruned = np.zeros((1, 2, 4), dtype=bool)
    pruned[..., 3] = True
    out = np.full((1, 2, 4), 7.0)
    assert not _solve_rows(np.ones((1, 2, 4)), pruned, hessian, out)
    assert np.all(out == 7.0)


def test_statistics_that_overflowed_fall_back_to_masking() -> None:
    rng = np.random.default_rng(3)
    weight, bias = rng.standard_normal((4, 8)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    calibration = calibrated(gemm_model(weight, bias), correlated_inputs(100, 8))
    stats = calibration.stats["w"]
    assert stats.gram is not None and stats.total is not None
    stats.gram[0, 1, 1] = np.inf
    stats.total[2] = np.nan
    mask = np.abs(weight) < np.median(np.abs(weight))
    refit, shift = calibration.recover("w", weight, mask, reconstruct=True)
    np.testing.assert_array_equal(refit, np.where(mask, 0, weight))
    assert shift is None


def test_bias_correction_restores_the_mean_output() -> None:
    rng = np.random.default_rng(2)
    weight, bias = rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    x = correlated_inputs(300, 8, seed=3)
    calibration = calibrated(gemm_model(weight, bias), x, full=False)
    mask = np.zeros_like(weight, dtype=bool)
    mask[:, :4] = True
    pruned, shift = calibration.recover("w", weight, mask, reconstruct=False)
    assert shift is not None
    before = (x @ weight.T + bias).mean(axis=0)
    after = (x @ pruned.T + bias + shift).mean(axis=0)
    np.testing.assert_allclose(after, before, atol=1e-4)
    assert np.abs((x @ pruned.T + bias).mean(axis=0) - before).max() > 0.1  # without the shift it drifts


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_a_layer_without_bias_is_corrected_through_the_batch_norm_after_it(op: str) -> None:
    """Conv or Gemm -> BatchNormalization as exporters write it unfused: the norm's running mean
    moves the other way, end to end through the model."""
    rng = np.random.default_rng(4)
    conv = op == "Conv"
    params = {
        "w": rng.standard_normal((6, 3, 3, 3) if conv else (6, 8)).astype(np.float32),
        "gamma": rng.uniform(0.5, 2.0, 6).astype(np.float32),
        "beta": rng.standard_normal(6).astype(np.float32),
        "mean": rng.standard_normal(6).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, 6).astype(np.float32),
    }
    layer = "Conv <pads = [1, 1, 1, 1]> (x, w)" if conv else "Gemm <transB = 1> (x, w)"
    # 4x4 maps: all 16 positions calibrate (MIN_POSITIONS), so the mean is exact
    shapes = ("float[N, 3, 4, 4] x", "float[N, 6, 4, 4] y") if conv else ("float[N, 8] x", "float[N, 6] y")
    text = (
        HEADER
        + f"g ({shapes[0]}) => ({shapes[1]}) {{ h = {layer} y = BatchNormalization (h, gamma, beta, mean, var) }}"
    )
    model = parse(text, params)
    x = (rng.standard_normal((256, 3, 4, 4) if conv else (256, 8)) + 1.0).astype(np.float32)
    calibration = calibrated(model, x, full=False)
    layout = calibration.layouts["w"]
    assert (layout.bias, layout.bias_is_mean) == ("mean", True)
    mask = np.abs(params["w"]) < np.quantile(np.abs(params["w"]), 0.6)
    pruned, shift = calibration.recover("w", params["w"], mask, reconstruct=False)
    assert shift is not None

    def mean_output(weights: dict[str, np.ndarray]) -> np.ndarray:
        session = ort.InferenceSession(parse(text, weights).SerializeToString(), providers=["CPUExecutionProvider"])
        y = np.asarray(session.run(None, {"x": x})[0])
        return y.mean(axis=(0, 2, 3) if conv else 0)

    before = mean_output(params)
    masked = mean_output(params | {"w": pruned})
    corrected = mean_output(params | {"w": pruned, "mean": layout.shifted(params["mean"], shift)})
    assert np.abs(masked - before).max() > 0.1  # without the shift it drifts
    np.testing.assert_allclose(corrected, before, atol=1e-4)  # padded borders included


@pytest.mark.parametrize("weights_as", ["initializers", "Constant nodes"])
def test_the_add_after_a_matmul_is_its_bias(weights_as: str) -> None:
    """MatMul -> Add(b), as exporters write a Linear layer, whether b is an initializer or a
    Constant node (paddle2onnx): the bias correction moves b."""
    rng = np.random.default_rng(6)
    params = {"w": rng.standard_normal((8, 6)).astype(np.float32), "b": rng.standard_normal(6).astype(np.float32)}
    text = HEADER + "g (float[N, 8] x) => (float[N, 6] y) { h = MatMul (x, w) y = Add (h, b) }"
    model = parse(text, params)
    if weights_as == "Constant nodes":
        model = as_constants(model)
    x = correlated_inputs(300, 8, seed=7)
    calibration = calibrated(model, x, full=False)
    layout = calibration.layouts["w"]
    assert (layout.bias, layout.bias_is_mean) == ("b", False)
    mask = np.zeros_like(params["w"], dtype=bool)
    mask[:4] = True  # four input rows of the [in, out] weight
    pruned, shift = calibration.recover("w", params["w"], mask, reconstruct=False)
    assert shift is not None
    before = (x @ params["w"] + params["b"]).mean(axis=0)
    np.testing.assert_allclose((x @ pruned + layout.shifted(params["b"], shift)).mean(axis=0), before, atol=1e-4)


def test_activation_scores_are_wanda() -> None:
    rng = np.random.default_rng(4)
    weight, bias = rng.standard_normal((3, 7)).astype(np.float32), np.zeros(3, np.float32)
    x = correlated_inputs(50, 7, seed=5)
    model = gemm_model(weight, bias)
    calibration = calibrated(model, x, full=False)
    layer = analyze(model).layers[0]
    scores = calibration.activation_scores(layer, weight)
    assert scores is not None
    expected = np.abs(weight) * np.sqrt((x.astype(np.float64) ** 2).mean(axis=0))[None, :]
    np.testing.assert_allclose(scores.reshape(weight.shape), expected, rtol=1e-5)


def test_conv_statistics_unfold_receptive_fields() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    conv = {"kernel": [3, 2], "strides": [2, 1], "pads": [1, 0, 1, 1], "dilations": [1, 2]}
    rows = _unfold(x, conv)
    weight = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    text = HEADER + (
        "g (float[N, 3, 7, 6] x) => (float[N, 4, 4, 5] y) "
        "{ y = Conv <strides = [2, 1], pads = [1, 0, 1, 1], dilations = [1, 2]> (x, w) }"
    )

    model = parse(text, {"w": weight})
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    direct = (rows @ weight.reshape(4, -1).T).reshape(2, 4, 5, 4).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(direct, y, atol=1e-5)


def picked_positions(rows: np.ndarray, full: np.ndarray) -> list[int]:
    """Where each of one sample's subset ``rows`` lies among its ``full`` unfolded rows."""
    return [int(np.flatnonzero((full == row).all(axis=1))[0]) for row in rows]


def test_large_feature_maps_are_unfolded_at_a_subset_of_positions() -> None:
    """Past ROWS_PER_INPUT rows per input, each sample gives its own random output positions:
    the rows are exact receptive fields, two arrays of one shape stay paired row by row, and a
    batch's samples together cover the map."""
    rng = np.random.default_rng(7)
    conv = {"kernel": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1]}
    x, other = (rng.standard_normal((3, 2, 40, 60)).astype(np.float32) for _ in range(2))
    kept = positions_kept(conv, channels=2, groups=1, samples=3)
    assert kept == 128 * 2 * 9 // 3  # over MIN_POSITIONS, under the 2400 positions of a sample
    full, subset = _unfold(x, conv).reshape(3, 2400, 18), _unfold(x, conv, kept).reshape(3, kept, 18)
    other_full, other_subset = (
        _unfold(other, conv).reshape(3, 2400, 18),
        _unfold(other, conv, kept).reshape(3, kept, 18),
    )
    picked = [picked_positions(subset[i], full[i]) for i in range(3)]
    for i, positions in enumerate(picked):
        assert positions == sorted(set(positions))  # distinct positions, in raster order
        np.testing.assert_array_equal(subset[i], full[i, positions])
        np.testing.assert_array_equal(other_subset[i], other_full[i, positions])  # paired with x's rows
    assert picked[0] != picked[1]
    np.testing.assert_array_equal(_unfold(x[:2], conv, kept), subset[:2].reshape(-1, 18))  # a short last batch
    assert positions_kept(conv, channels=64, groups=64, samples=256) == MIN_POSITIONS  # depthwise: 9 inputs a row
    # strides, dilations and uneven pads: still the full unfold's rows at the picked positions
    odd = {"kernel": [3, 2], "strides": [2, 1], "pads": [1, 0, 1, 1], "dilations": [1, 2]}
    whole = _unfold(x, odd).reshape(3, -1, 6 * 2)
    some = _unfold(x, odd, 50).reshape(3, 50, 6 * 2)
    for i in range(3):
        np.testing.assert_array_equal(some[i], whole[i, picked_positions(some[i], whole[i])])
    np.testing.assert_array_equal(_unfold(x, conv, 2400).reshape(3, 2400, 18), full)  # nothing to drop
    # 64 samples at 16 of 100 positions: every position is read (each pixel's value is its index)
    pixels = np.broadcast_to(np.arange(1.0, 101.0, dtype=np.float32).reshape(1, 1, 10, 10), (64, 1, 10, 10))
    pointwise = {"kernel": [1, 1], "strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1]}
    assert set(_unfold(np.ascontiguousarray(pixels), pointwise, 16).ravel().tolist()) == set(range(1, 101))


@pytest.mark.parametrize(
    ("criterion", "recover"),
    [
        (pruner.Criterion.ACTIVATION, pruner.Recovery.NONE),
        (pruner.Criterion.MAGNITUDE, pruner.Recovery.BIAS),
        (pruner.Criterion.MAGNITUDE, pruner.Recovery.LSQ),
        (pruner.Criterion.ACTIVATION, pruner.Recovery.LSQ),
        (pruner.Criterion.MAGNITUDE, pruner.Recovery.SEQUENTIAL),
    ],
)
def test_methods_end_to_end(criterion: pruner.Criterion, recover: pruner.Recovery) -> None:
    options = pruner.PruneOptions(criterion=criterion, recover=recover)
    result = pruner.prune(FIXTURES / "cnn_bn.onnx", FIXTURES / "cnn_bn_eval.npz", options)
    report = result.report
    assert report.status == "pruned"
    assert report.baseline.holdout is not None and report.final.holdout is not None
    assert report.baseline.holdout - report.final.holdout <= 0.01 + 1e-9
    assert any("calibrated on" in note for note in report.notes)
    assert report.timings["calibration"] > 0
    # the fits' own time: none without a recovery, some with one
    assert (report.timings["recovery"] > 0) is (recover is not pruner.Recovery.NONE)


@pytest.mark.parametrize("recover", [pruner.Recovery.LSQ, pruner.Recovery.SEQUENTIAL])
def test_calibration_never_sees_the_held_out_split(monkeypatch: pytest.MonkeyPatch, recover: pruner.Recovery) -> None:
    import pruner._recover as recovery
    from pruner._phases import split_rows

    seen: list[np.ndarray] = []
    real = recovery._batches

    def spy(rows, step, fixed):  # type: ignore[no-untyped-def]
        seen.append(np.asarray(rows))
        return real(rows, step, fixed)

    # every calibration pass (the first, and sequential's per candidate) batches its rows here
    monkeypatch.setattr(recovery, "_batches", spy)
    options = pruner.PruneOptions(recover=recover, max_evaluations=2)
    evalset = pruner.load_eval_set(FIXTURES / "mlp_eval.npz")
    pruner.prune(FIXTURES / "mlp.onnx", evalset, options)
    _, held_out = split_rows(len(evalset), options.holdout_fraction, options.seed)
    assert len(seen) >= (3 if recover is pruner.Recovery.SEQUENTIAL else 1)
    for rows in seen:
        assert len(rows) == options.calibration_samples
        assert not set(rows.tolist()) & set(held_out.tolist())


def test_sequential_refit_fits_what_the_pruned_model_feeds_each_layer() -> None:
    from pruner._evaluate import SplitModel
    from pruner._recover import SequentialRefit

    rng = np.random.default_rng(3)
    w1, w2 = rng.standard_normal((16, 12)).astype(np.float32), rng.standard_normal((5, 16)).astype(np.float32)
    b1, b2 = rng.standard_normal(16).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    model = two_gemms({"w1": w1, "b1": b1, "w2": w2, "b2": b2})
    x = correlated_inputs(512, 12, seed=4)
    calibration = calibrated(model, x)
    masks = {name: np.abs(w) < np.quantile(np.abs(w), 0.6) for name, w in (("w1", w1), ("w2", w2))}

    def output(weights: dict[str, np.ndarray]) -> np.ndarray:
        hidden = np.maximum(x @ weights["w1"].T + weights["b1"], 0)
        return hidden @ weights["w2"].T + weights["b2"]

    plain = {"b1": b1, "b2": b2}
    for name, original in (("w1", w1), ("w2", w2)):
        plain[name], shift = calibration.recover(name, original, masks[name], reconstruct=True)
        bias = "b1" if name == "w1" else "b2"
        plain[bias] = (plain[bias] + shift).astype(np.float32)
    split = SplitModel.take(two_gemms({"w1": w1, "b1": b1, "w2": w2, "b2": b2}), {"w1", "b1", "w2", "b2"})
    refit = SequentialRefit(calibration, split, pruner.EvalSet({"x": x}), batch_size=64, fixed_batch=None)
    weights = {"w1": np.where(masks["w1"], 0, w1), "b1": b1, "w2": np.where(masks["w2"], 0, w2), "b2": b2}
    refit.refit(weights, masks, {"w1": 1, "w2": 1})
    for name in ("w1", "w2"):
        assert np.all(weights[name][masks[name]] == 0)  # the mask holds
    reference = output({"w1": w1, "b1": b1, "w2": w2, "b2": b2})
    error_plain = np.mean((output(plain) - reference) ** 2)
    error_sequential = np.mean((output(weights) - reference) ** 2)
    assert error_sequential < 0.85 * error_plain  # 0.71 with these seeds
    # the first layer sees unpruned inputs: its fit is the plain one
    np.testing.assert_allclose(weights["w1"], plain["w1"], atol=1e-5)
    # the second layer's inputs come through a session of only what they depend on: the same values
    tapped = refit.groups[1].input
    session, wanted = refit._tap(tapped)
    assert wanted == {i.name for i in session.get_inputs()} == {"x", "w1", "b1"}  # not w2, b2
    through_tap = np.concatenate([a for (a,) in refit._inputs(weights, [tapped])])
    full = refit.session.run([tapped], {"x": x[refit.calibration.rows], **weights})[0]
    np.testing.assert_allclose(through_tap, full, rtol=1e-6)


def test_sequential_refit_starts_a_layer_from_its_last_fit_of_the_same_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """A later candidate that moves only the layers before it refits a layer from its previous fit
    of the same mask (a few conjugate-gradient steps, not thirty from the masked original): the
    fit is the one a cold start reaches."""
    from pruner._evaluate import SplitModel
    from pruner._recover import SequentialRefit

    conjugate_gradients_only(monkeypatch)
    rng = np.random.default_rng(5)
    w1, w2 = rng.standard_normal((48, 24)).astype(np.float32), rng.standard_normal((6, 48)).astype(np.float32)
    b1, b2 = rng.standard_normal(48).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    originals = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
    x = correlated_inputs(512, 24, seed=6)
    calibration = calibrated(two_gemms(originals), x)
    mask2 = np.abs(w2) < np.quantile(np.abs(w2), 0.5)

    def refit_with(refit: SequentialRefit, share: float) -> dict[str, np.ndarray]:
        mask1 = np.abs(w1) < np.quantile(np.abs(w1), share)
        masks = {"w1": mask1, "w2": mask2}
        weights = {"w1": np.where(mask1, 0, w1), "b1": b1, "w2": np.where(mask2, 0, w2), "b2": b2}
        refit.refit(weights, masks, {"w1": round(100 * share), "w2": 50})
        return weights

    def new_refit() -> SequentialRefit:
        split = SplitModel.take(two_gemms(originals), set(originals))
        return SequentialRefit(calibration, split, pruner.EvalSet({"x": x}), batch_size=64, fixed_batch=None)

    warm = new_refit()
    refit_with(warm, 0.3)
    assert "w2" in warm._starts  # the start kept for the next candidate
    warmed = refit_with(warm, 0.4)
    cold = refit_with(new_refit(), 0.4)
    assert np.all(warmed["w2"][mask2] == 0)
    np.testing.assert_allclose(warmed["w2"], cold["w2"], rtol=0, atol=1e-3 * float(np.abs(cold["w2"]).max()))
    warm.forget()
    assert not warm._starts


@pytest.mark.parametrize("groups", [1, 4])
def test_a_gram_pair_is_the_two_gram_products(groups: int) -> None:
    from pruner._recover import _gram_pair, _grams

    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((2, 50, 12)).astype(np.float32)
    gram, cross = _gram_pair(x, groups, y)
    np.testing.assert_array_equal(gram, _grams(x, groups))
    np.testing.assert_array_equal(cross, _grams(x, groups, y))


def test_a_sequential_refit_keeps_the_unpruned_inputs_mean_between_candidates() -> None:
    """The cached unpruned inputs' mean is summed once per group: a later candidate's fits are
    exactly those of a refit that never saw another candidate."""
    from pruner._evaluate import SplitModel
    from pruner._recover import SequentialRefit

    rng = np.random.default_rng(7)
    w1, w2 = rng.standard_normal((16, 12)).astype(np.float32), rng.standard_normal((5, 16)).astype(np.float32)
    b1, b2 = rng.standard_normal(16).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    originals = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
    x = correlated_inputs(256, 12, seed=8)
    calibration = calibrated(two_gemms(originals), x)

    def new_refit() -> SequentialRefit:
        split = SplitModel.take(two_gemms(originals), set(originals))
        return SequentialRefit(calibration, split, pruner.EvalSet({"x": x}), batch_size=64, fixed_batch=None)

    def candidate(refit: SequentialRefit, share: float) -> dict[str, np.ndarray]:
        mask = np.abs(w1) < np.quantile(np.abs(w1), share)
        weights = {"w1": np.where(mask, 0, w1), "b1": b1, "w2": w2, "b2": b2}
        refit.refit(weights, {"w1": mask}, {"w1": round(100 * share), "w2": 0})
        return weights

    warm = new_refit()
    candidate(warm, 0.3)
    assert set(warm._means) == set(warm.groups)
    warm.forget()  # fits and starts dropped; the mean stays
    assert warm._means
    second, fresh = candidate(warm, 0.5), candidate(new_refit(), 0.5)
    for name in originals:
        np.testing.assert_array_equal(second[name], fresh[name])


def test_a_sequential_refit_keeps_the_unpruned_outputs_where_they_are_smaller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 1x1 conv widening 3 -> 8 channels keeps its input rows X (3 wide against 8 outputs); a
    depthwise 3x3 (72 wide, 8 outputs) and a 1x1 narrowing 8 -> 2 keep their unpruned output
    rows Y: the fits are those made from X (cache off, the unpruned model walked alongside)."""
    import pruner._recover as recovery
    from pruner._evaluate import SplitModel

    rng = np.random.default_rng(11)
    shapes = {"w1": (8, 3, 1, 1), "w2": (8, 1, 3, 3), "w3": (2, 8, 1, 1)}
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    weights |= {f"b{name[1]}": rng.standard_normal(shape[0]).astype(np.float32) for name, shape in shapes.items()}
    text = HEADER + (
        "g (float[N, 3, 6, 6] x) => (float[N, 2, 6, 6] y) {"
        " h = Conv (x, w1, b1) r = Relu (h) d = Conv <group = 8, pads = [1, 1, 1, 1]> (r, w2, b2)"
        " s = Relu (d) y = Conv (s, w3, b3) }"
    )
    x = rng.standard_normal((120, 3, 6, 6)).astype(np.float32)
    evalset = pruner.EvalSet({"x": x})
    model = parse(text, weights)
    calibration = calibrate(
        model, list(analyze(model).layers), evalset, np.arange(120), batch_size=32, fixed_batch=None, full=True
    )
    mask = np.abs(weights["w1"]) < np.quantile(np.abs(weights["w1"]), 0.5)

    def fitted(cache: int) -> tuple[dict[str, np.ndarray], recovery.SequentialRefit]:
        monkeypatch.setattr(recovery, "ORIGINAL_CACHE_BYTES", cache)
        refit = recovery.SequentialRefit(
            calibration, SplitModel.take(parse(text, weights), set(weights)), evalset, batch_size=32, fixed_batch=None
        )
        out = dict(weights, w1=np.where(mask, 0, weights["w1"]).astype(np.float32))
        refit.refit(out, {"w1": mask}, {"w1": 1})
        return out, refit

    (from_y, cached), (from_x, walked) = fitted(1 << 30), fitted(0)
    assert walked._originals == {}
    assert cached._originals is not None
    kinds = [type(cached._originals[g][0]) for g in cached.groups]
    assert kinds == [np.ndarray, tuple, tuple]
    for name in ("w2", "b2", "w3", "b3"):
        assert not np.allclose(from_y[name], weights[name])  # refit: its input drifted
        np.testing.assert_allclose(from_y[name], from_x[name], rtol=1e-4, atol=1e-5)


def branching(weights: dict[str, np.ndarray], subgraph: bool = False) -> onnx.ModelProto:
    """Gemms with a shortcut past a group, a model input read deep (with ``subgraph``, from
    inside an If's branch), and two groups computed by one node (a Split): x, m -> ... -> y."""
    scale = "t = Mul (s, m)"
    if subgraph:
        scale = (
            "k = Constant <value = bool {1}> () t = If (k) <then_branch = yes () => (float[N, 8] t1)"
            " { t1 = Mul (s, m) }, else_branch = no () => (float[N, 8] t2) { t2 = Add (s, m) }>"
        )
    text = HEADER + (
        "g (float[N, 8] x, float[N, 8] m) => (float[N, 6] y) {"
        " h = Gemm <transB = 1> (x, w1, b1) r = Relu (h)"
        " a = Gemm <transB = 1> (r, w2, b2) b = Gemm <transB = 1> (r, w3, b3) s = Add (a, b)"
        f" {scale} u = Add (t, r) p, q = Split <axis = 1> (u)"
        " c = Gemm <transB = 1> (p, w4, b4) d = Gemm <transB = 1> (q, w5, b5) y = Concat <axis = 1> (c, d) }"
    )
    return parse(text, weights)


@pytest.mark.parametrize("subgraph", [False, True])
def test_sequential_refit_walks_the_model_once_cut_by_cut(monkeypatch: pytest.MonkeyPatch, subgraph: bool) -> None:
    """Each group's input comes from running only the nodes since the cut before, the tensors
    needed later (a shortcut, a model input, also when a subgraph reads it) carried along: the
    same inputs, and the same fits, as sessions that rerun the model from its inputs for every group."""
    import pruner._recover as recovery
    from pruner._evaluate import SplitModel

    rng = np.random.default_rng(5)
    shapes = {"w1": (8, 8), "w2": (8, 8), "w3": (8, 8), "w4": (3, 4), "w5": (3, 4)}
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    weights |= {f"b{name[1]}": rng.standard_normal(shape[0]).astype(np.float32) for name, shape in shapes.items()}
    x = correlated_inputs(300, 8, seed=6)
    m = rng.uniform(0.5, 1.5, (300, 8)).astype(np.float32)
    evalset = pruner.EvalSet({"x": x, "m": m})
    model = branching(weights, subgraph)
    layers = list(analyze(model).layers)
    calibration = calibrate(model, layers, evalset, np.arange(300), batch_size=64, fixed_batch=None, full=True)

    def refit() -> recovery.SequentialRefit:
        split = SplitModel.take(branching(weights, subgraph), set(weights))
        return recovery.SequentialRefit(calibration, split, evalset, batch_size=64, fixed_batch=None)

    walking = refit()
    assert [g.input for g in walking.groups] == ["x", "r", "p", "q"]
    pruned = dict(weights)
    pruned["w1"] = np.where(np.abs(weights["w1"]) < 0.7, 0, weights["w1"]).astype(np.float32)
    cuts = [walking.segments.cut[g] for g in walking.groups]
    # all cuts kept; none (every group from the model inputs' checkpoint); only the narrower ones:
    # at r's cut r of both models and m (one array: 3 x 300 x 8 floats), at p's p and q of both
    # (4 x 300 x 4 floats)
    for limit, checkpoints in (
        (1 << 30, cuts),
        (0, [0] * 4),
        (4 * 300 * 4 * 4, [0, 0, cuts[2], cuts[2]]),
        (3 * 300 * 8 * 4, [0, *cuts[1:]]),
    ):
        monkeypatch.setattr(recovery, "STATE_BYTES", limit)
        walk = recovery._Walk(walking, pruned, pruned_at=0, cached=False)
        for group, checkpoint in zip(walking.groups, checkpoints, strict=True):
            walked = walk.inputs(group)
            assert walked is not None
            first = group.layers[0]
            now = [walking._flat(first, a) for (a,) in walking._inputs(pruned, [group.input])]
            before = [walking._flat(first, a) for (a,) in walking._inputs(weights, [group.input])]
            for (a, b), a_tap, b_tap in zip(walked, now, before, strict=True):
                np.testing.assert_allclose(a, a_tap, rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(b, b_tap, rtol=1e-6, atol=1e-6)
            assert walk.at == checkpoint
        assert not walk.broken
    monkeypatch.undo()
    # the shortcut r and the input m cross the cut before the Split; the Split's outputs the last
    assert walking.segments.live(walking.segments.cut[walking.groups[1]]) == {"m", "r"}
    assert walking.segments.live(walking.segments.cut[walking.groups[2]]) == {"p", "q"}

    def unloadable(*args: object) -> None:
        raise pruner.UnsupportedModelError("onnxruntime cannot load the model: a stretch")

    masks = {"w1": pruned["w1"] == 0}
    fits = []
    # walked; past the memory limit (from the checkpoint at the model inputs, stretch by stretch);
    # a stretch onnxruntime will not load: from the model inputs through per-group sessions
    for way in ("walked", "over the limit", "unloadable"):
        with monkeypatch.context() as patch:
            if way == "over the limit":
                patch.setattr(recovery, "STATE_BYTES", 0)
            if way == "unloadable":
                patch.setattr(recovery._Segments, "_build", unloadable)
            out, fitter = dict(pruned), refit()
            fitter.refit(out, masks, {"w1": 1})
        fits.append(out)
        assert bool(fitter._taps) is (way == "unloadable")  # per-group sessions only when the walk stops
    for name in weights:
        for fit in fits[1:]:
            np.testing.assert_allclose(fits[0][name], fit[name], rtol=1e-5, atol=1e-6)
    assert not np.allclose(fits[0]["w4"], weights["w4"])  # the dense layers after w1 were refit


def test_channel_activation_scores_are_what_consumers_draw() -> None:
    from pruner._remove import component_scores
    from pruner._structure import analyze_structure

    rng = np.random.default_rng(8)
    w1, w2 = rng.standard_normal((6, 5)).astype(np.float32), rng.standard_normal((4, 6)).astype(np.float32)
    model = two_gemms({"w1": w1, "w2": w2})
    x = correlated_inputs(64, 5, seed=9)
    calibration = calibrated(model, x, full=False)
    structure = analyze_structure(model)
    (family,) = structure.families
    scores = component_scores(model, structure, family, pruner.Criterion.ACTIVATION, calibration)
    hidden = np.maximum(x @ w1.T, 0)
    expected = (np.abs(w2) * np.sqrt((hidden.astype(np.float64) ** 2).mean(axis=0))[None, :]).sum(axis=0)
    order = structure.atoms(("w2", 1))
    np.testing.assert_allclose(scores[np.argsort(order)], expected, rtol=1e-4)
    plan = pruner.PruningPlan(pruner.Mode.REMOVE, pruner.Criterion.ACTIVATION, ())
    assert "calibration" in pruner.check_plan(plan, model)[0].reason


def test_recovered_biases_are_written(tmp_path: Path) -> None:
    options = pruner.PruneOptions(recover=pruner.Recovery.BIAS, tolerance=pruner.Tolerance(0.02))
    result = pruner.prune(FIXTURES / "mlp.onnx", FIXTURES / "mlp_eval.npz", options)
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(FIXTURES / "mlp.onnx")).graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    changed = [n for n in before if n.endswith("bias") and not np.array_equal(before[n], after[n])]
    assert changed


def as_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every initializer a Constant node instead (as paddle2onnx writes weights)."""
    nodes = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in model.graph.initializer]
    nodes.extend(model.graph.node)
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


@pytest.mark.parametrize("weights_as", ["initializers", "Constant nodes"])
def test_remove_mode_refit_only_changes_kept_columns(weights_as: str) -> None:
    # removal after the refit must equal the refit model itself: the removed columns are zero
    import onnxruntime as ort

    from pruner._phases import split_rows
    from pruner._remove import Remover
    from pruner._structure import remove_components

    model = onnx.load(str(FIXTURES / "cnn_bn.onnx"))
    if weights_as == "Constant nodes":  # the refit weights are written there too
        model = as_constants(model)
    evalset = pruner.load_eval_set(FIXTURES / "cnn_bn_eval.npz")
    options = pruner.PruneOptions(mode=pruner.Mode.REMOVE, recover=pruner.Recovery.LSQ)
    search, _ = split_rows(len(evalset), options.holdout_fraction, options.seed)
    calibration = calibrate(
        model, list(analyze(model).layers), evalset, search[:128], batch_size=64, fixed_batch=None, full=True
    )
    remover = Remover(model, options, calibration)
    removed = remover.removed(remover.space.at_level(0.4))
    refit = remover._refit(removed)
    pruned = remove_components(refit, remover.structure, list(removed))
    _, (total, before, after) = remover.summary(remover.space.at_level(0.4), pruned)
    assert total == before > after > 0  # the report counts the weights wherever they are

    def run(m: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.asarray(session.run(None, {"input": evalset.inputs["input"][:32]})[0])

    np.testing.assert_allclose(run(pruned), run(refit), atol=1e-4)
    assert not np.allclose(run(refit), run(remove_components(model, remover.structure, list(removed))), atol=1e-3)

    # sequential: removed channels may still carry a refit bias at full shape, but only into
    # masked columns, so slicing them away changes nothing either
    from pruner._evaluate import SplitModel
    from pruner._recover import SequentialRefit

    def sequential(split: SplitModel) -> SequentialRefit:
        return SequentialRefit(calibration, split, evalset, batch_size=64, fixed_batch=None)

    options = pruner.PruneOptions(mode=pruner.Mode.REMOVE, recover=pruner.Recovery.SEQUENTIAL)
    remover = Remover(model, options, calibration, sequential)
    config = remover.space.at_level(0.4)
    removed = remover.removed(config)
    full_shape = remover._refit_sequentially(removed)
    np.testing.assert_allclose(run(remover.to_proto(config)), run(full_shape), atol=1e-4)
    assert not np.allclose(run(full_shape), run(refit), atol=1e-3)


def test_a_refit_candidate_is_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The search, the held-out confirmation and the final write ask for the same removal in
    turn: its (sequential, costly) refit runs once."""
    from pruner._remove import Remover

    built = []
    to_proto = Remover.to_proto

    def counted(self: Remover, config: tuple[int, ...]) -> onnx.ModelProto:
        built.append(config)
        return to_proto(self, config)

    monkeypatch.setattr(Remover, "to_proto", counted)
    options = pruner.PruneOptions(
        mode=pruner.Mode.REMOVE,
        recover=pruner.Recovery.SEQUENTIAL,
        target_sparsity=0.3,
        tolerance=pruner.Tolerance(1.0),
    )
    report = pruner.prune(FIXTURES / "mlp.onnx", FIXTURES / "mlp_eval.npz", options).report
    assert report.status == "pruned" and report.confirmations >= 1
    assert len(built) == 1


def test_remove_mode_recovery_gets_smaller_models() -> None:
    plain = pruner.PruneOptions(mode=pruner.Mode.REMOVE, recover=pruner.Recovery.NONE)
    refit = pruner.PruneOptions(mode=pruner.Mode.REMOVE, recover=pruner.Recovery.LSQ)
    model, evals = FIXTURES / "cnn_bn.onnx", FIXTURES / "cnn_bn_eval.npz"
    without, with_refit = pruner.prune(model, evals, plain).report, pruner.prune(model, evals, refit).report
    assert with_refit.bytes_after < 0.8 * without.bytes_after
    assert with_refit.baseline.holdout - with_refit.final.holdout <= 0.01 + 1e-9  # type: ignore[operator]


def test_depthwise_conv_is_recovered_per_channel() -> None:
    rng = np.random.default_rng(0)
    channels = 6
    weight = rng.standard_normal((channels, 1, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(channels).astype(np.float32)
    text = HEADER + (
        f"g (float[N, {channels}, 4, 4] x) => (float[N, {channels}, 4, 4] y) "
        f"{{ y = Conv <group = {channels}, pads = [1, 1, 1, 1]> (x, w, b) }}"
    )
    x = rng.standard_normal((200, channels, 4, 4)).astype(np.float32)  # all 16 positions calibrate
    x = (x + np.roll(x, 1, axis=3) + np.roll(x, 1, axis=2)).astype(np.float32)  # neighbouring pixels correlate
    calibration = calibrated(parse(text, {"w": weight, "b": bias}), x)
    hessian = calibration.hessian("w")
    assert hessian is not None and hessian.shape == (channels, 9, 9)  # one 3x3 window per channel
    mask = np.abs(weight) < np.quantile(np.abs(weight), 0.6)
    masked, _ = calibration.recover("w", weight, mask, reconstruct=False)
    refit, shift = calibration.recover("w", weight, mask, reconstruct=True)
    assert np.all(refit[mask] == 0)
    # each channel's rows solved exactly on its own window's Hessian
    for channel in range(channels):
        keep = ~mask[channel].reshape(-1)
        flat = weight[channel].reshape(-1).astype(np.float64)
        exact = np.linalg.solve(hessian[channel][np.ix_(keep, keep)], (flat @ hessian[channel])[keep])
        np.testing.assert_allclose(refit[channel].reshape(-1)[keep], exact, rtol=1e-4, atol=1e-5)

    def run(w: np.ndarray, b: np.ndarray) -> np.ndarray:
        model = parse(text, {"w": w, "b": b.astype(np.float32)})
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0]

    reference = run(weight, bias)
    assert shift is not None
    error_refit = np.mean((run(refit, bias + shift) - reference) ** 2)
    assert error_refit < 0.93 * np.mean((run(masked, bias) - reference) ** 2)  # 0.89 with these seeds
    # Wanda: each weight times the norm of the one channel's pixels it reads
    scores = calibration.activation_scores(analyze(parse(text, {"w": weight, "b": bias})).layers[0], weight)
    assert scores is not None
    unfolded = _unfold(x, {"kernel": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1]})
    norms = np.sqrt((unfolded.astype(np.float64) ** 2).mean(axis=0)).reshape(channels, 9)
    np.testing.assert_allclose(scores.reshape(channels, 9), np.abs(weight).reshape(channels, 9) * norms, rtol=1e-4)


def test_auto_fits_wide_layers_by_one_obs_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    w1, w2 = rng.standard_normal((8, 6)).astype(np.float32), rng.standard_normal((40, 8)).astype(np.float32)
    model = two_gemms({"w1": w1, "w2": w2})
    x = correlated_inputs(128, 6, seed=6)
    layers = list(analyze(model).layers)
    # w1: 8 rows x 6^2 = 288 multiply-adds a solver step; w2: 40 x 8^2 = 2560
    options = {"batch_size": 64, "fixed_batch": None, "full": True}
    calibration = calibrate(model, layers, pruner.EvalSet({"x": x}), np.arange(128), max_cost=1000, **options)
    assert "w1" not in calibration.one_pass and "w2" in calibration.one_pass and not calibration.partial
    assert "2560" not in calibration.one_pass["w2"] and "lsq" in calibration.one_pass["w2"]
    exact = calibrate(model, layers, pruner.EvalSet({"x": x}), np.arange(128), **options)
    assert not exact.one_pass
    conjugate_gradients_only(monkeypatch)
    mask = np.abs(w2) < np.median(np.abs(w2))
    fast, _ = calibration.recover("w2", w2, mask, reconstruct=True)
    solved, _ = exact.recover("w2", w2, mask, reconstruct=True)
    assert np.all(fast[mask] == 0) and np.all(fast[~mask] != w2[~mask])  # refit, the mask kept
    hessian = exact.hessian("w2")
    assert hessian is not None

    def error(w: np.ndarray) -> float:
        d = (w - w2).astype(np.float64)
        return float(np.einsum("ij,jk,ik->", d, hessian[0], d))

    masked = error(np.where(mask, 0, w2))
    assert error(solved) <= error(fast) <= 1.2 * error(solved) < masked


def test_a_layer_over_the_one_pass_limit_is_bias_corrected_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pruner._recover.ONE_PASS_COST", 2000)
    rng = np.random.default_rng(5)
    w1, w2 = rng.standard_normal((8, 6)).astype(np.float32), rng.standard_normal((40, 8)).astype(np.float32)
    model = two_gemms({"w1": w1, "w2": w2})
    x = correlated_inputs(128, 6, seed=6)
    calibration = calibrate(
        model, list(analyze(model).layers), pruner.EvalSet({"x": x}), np.arange(128),
        batch_size=64, fixed_batch=None, full=True, max_cost=1000,
    )  # fmt: skip
    assert calibration.hessian("w2") is None and "auto" in calibration.partial["w2"]
    mask = np.abs(w2) < np.median(np.abs(w2))
    pruned, shift = calibration.recover("w2", w2, mask, reconstruct=True)
    np.testing.assert_array_equal(pruned, np.where(mask, 0, w2))  # masked, not refit
    assert shift is None  # no bias to correct here; with one it would be the mean shift


def test_one_obs_pass_is_exact_for_a_single_pruned_first_column() -> None:
    # removing the first column alone, OBS's update over every later column is the exact fit
    x = correlated_inputs(256, 12, seed=3).astype(np.float64)
    hessian = _damped((x.T @ x / len(x))[None])
    w0 = np.random.default_rng(4).standard_normal((5, 12))
    pruned = np.zeros_like(w0, dtype=bool)
    pruned[:, 0] = True
    factor = _inverse_factor(hessian)
    assert factor is not None
    passed = _one_pass(w0.astype(np.float32), pruned, factor[0], None)
    keep = np.arange(1, 12)
    exact = np.zeros_like(w0)
    exact[:, keep] = np.linalg.solve(hessian[0][np.ix_(keep, keep)], (w0 @ hessian[0])[:, keep].T).T
    np.testing.assert_allclose(passed, exact, rtol=1e-3, atol=1e-3)


def test_one_obs_pass_checks_the_stop_event() -> None:
    stop = threading.Event()
    stop.set()
    factor = np.eye(4, dtype=np.float32)
    with pytest.raises(pruner.CancelledError):
        _one_pass(np.ones((2, 4), dtype=np.float32), np.ones((2, 4), dtype=bool), factor, stop)


def test_the_default_fits_every_layer_and_says_how(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pruner._candidates.AUTO_LSQ_COST", 0)  # every layer is wide
    result = pruner.prune(FIXTURES / "mlp.onnx", FIXTURES / "mlp_eval.npz", pruner.PruneOptions())
    report = result.report
    assert report.status == "pruned"
    assert report.baseline.holdout is not None and report.final.holdout is not None
    assert report.baseline.holdout - report.final.holdout <= 0.01 + 1e-9
    layers = analyze(onnx.load(FIXTURES / "mlp.onnx")).layers
    one_pass = [n for n in report.notes if "by one OBS pass" in n and not n.startswith("recovery: ")]
    assert len(one_pass) == len(layers)
    summary = [n for n in report.notes if n.startswith("recovery: ")]
    assert summary == [
        f"recovery: 0 layer(s) fit by least squares to tolerance, {len(layers)} by one OBS pass and 3 steps"
    ]
    assert not any("bias-corrected only" in n for n in report.notes)


def test_remove_mode_refits_consumers_outside_the_include_patterns() -> None:
    # only the residual channels may go, but the layers reading them are refit all the same
    common = {
        "mode": pruner.Mode.REMOVE,
        "include": ("onnx::Conv_55",),
        "exclude": ("onnx::Conv_52",),
        "channel_multiple": 16,
    }
    model, evals = FIXTURES / "cnn.onnx", FIXTURES / "cnn_eval.npz"
    options = [
        pruner.PruneOptions(**common, recover=r, tolerance=pruner.Tolerance(0.3))
        for r in (pruner.Recovery.NONE, pruner.Recovery.AUTO)
    ]  # type: ignore[arg-type]
    plain, refit = (pruner.prune(model, evals, o).report for o in options)
    kept = [{la.name: la.channels_after for la in r.layers} for r in (plain, refit)]
    assert kept[0] == kept[1] and kept[0]["onnx::Conv_55"] == 16, kept
    assert "onnx::Conv_52" not in kept[0]
    assert refit.final.search > plain.final.search + 0.02


def test_a_1d_conv_is_calibrated_and_recovered_as_a_2d_one_a_row_high() -> None:
    """Audio and text models use 1-D convs: strides, uneven pads and dilations as for 2-D ones."""
    rng = np.random.default_rng(8)
    weight = rng.standard_normal((4, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    text = HEADER + (
        "g (float[N, 3, 20] x) => (float[N, 4, 10] y) "
        "{ y = Conv <pads = [1, 2], strides = [2], dilations = [2]> (x, w, b) }"
    )
    model = parse(text, {"w": weight, "b": bias})
    x = rng.standard_normal((200, 3, 20)).astype(np.float32)
    x = (x + np.roll(x, 1, axis=2) + np.roll(x, 2, axis=2) + 0.5).astype(np.float32)  # taps correlate; mean off 0
    calibration = calibrated(model, x)
    layout = calibration.layouts["w"]
    assert layout.conv == {"kernel": [1, 3], "strides": [1, 2], "pads": [0, 1, 0, 2], "dilations": [1, 2]}
    assert layout.bias == "b"

    def run(w: np.ndarray, b: np.ndarray) -> np.ndarray:
        session = ort.InferenceSession(
            parse(text, {"w": w, "b": b.astype(np.float32)}).SerializeToString(), providers=["CPUExecutionProvider"]
        )
        return np.asarray(session.run(None, {"x": x})[0])

    reference = run(weight, bias)
    rows = _unfold(x[:, :, None, :], layout.conv)  # every position: 10 a sample
    direct = (rows @ weight.reshape(4, -1).T).reshape(200, 10, 4).transpose(0, 2, 1) + bias[None, :, None]
    np.testing.assert_allclose(direct, reference, atol=1e-4)
    mask = np.abs(weight) < np.quantile(np.abs(weight), 0.6)
    masked, _ = calibration.recover("w", weight, mask, reconstruct=False)
    refit, shift = calibration.recover("w", weight, mask, reconstruct=True)
    assert shift is not None and np.all(refit[mask] == 0)
    corrected = run(refit, bias + shift)
    np.testing.assert_allclose(corrected.mean(axis=(0, 2)), reference.mean(axis=(0, 2)), atol=1e-3)
    error = np.mean((corrected - reference) ** 2)
    assert error < 0.9 * np.mean((run(masked, bias) - reference) ** 2)  # 0.86 with these seeds


def test_a_model_with_no_layer_recovery_handles_still_prunes() -> None:
    """Only a ConvTranspose with ``output_shape``: calibration has nothing to run for (it used to ask
    onnxruntime for no outputs, which returns all of them) and the layer is pruned by magnitude alone."""
    rng = np.random.default_rng(9)
    text = HEADER + (
        "g (float[N, 4, 5, 5] x) => (float[N, 3, 7, 7] y) { y = ConvTranspose <output_shape = [7, 7]> (x, w) }"
    )
    model = parse(text, {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)})
    evalset = pruner.EvalSet({"x": rng.standard_normal((40, 4, 5, 5)).astype(np.float32)}, None)
    options = pruner.PruneOptions(metric=pruner.MetricKind.COSINE, target_sparsity=0.3, tolerance=pruner.Tolerance(1.0))
    report = pruner.prune(model, evalset, options).report
    assert report.sparsity > 0.25
    assert any("ConvTranspose with output_shape" in note for note in report.notes)


def test_a_model_that_fails_on_the_eval_set_during_calibration_is_a_clear_error() -> None:
    """Calibration runs the model before the baseline does: onnxruntime's own exception types
    must come out as UnsupportedModelError there too (silero-vad's state has its batch second)."""
    text = HEADER + (
        "g (float[N, 4] x) => (float[2, 3] y) "
        "{ h = MatMul (x, w) shape = Constant <value = int64[2] {2, 3}> () y = Reshape (h, shape) }"
    )
    model = parse(text, {"w": np.ones((4, 3), np.float32)})
    evalset = pruner.EvalSet({"x": np.ones((40, 4), np.float32)}, None)
    with pytest.raises(pruner.UnsupportedModelError, match="onnxruntime failed to run the model"):
        pruner.prune(model, evalset, pruner.PruneOptions(metric=pruner.MetricKind.COSINE))


def test_one_obs_pass_fits_each_group_of_a_grouped_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    conjugate_gradients_only(monkeypatch)
    groups, width, rows = 2, 16, 6
    x = correlated_inputs(512, groups * width, seed=8).astype(np.float64)
    hessian = _damped(
        np.stack([x[:, g * width : (g + 1) * width].T @ x[:, g * width : (g + 1) * width] for g in range(groups)])
        / len(x)
    )
    layout = LayerLayout("w", "Conv", "x", False, conv={"kernel": [1, 1]}, groups=groups)
    w0 = np.random.default_rng(9).standard_normal((groups * rows, width))
    pruned = np.abs(w0) < np.median(np.abs(w0))
    linear = layout.grouped(w0) @ hessian
    factor = _inverse_factor(hessian)
    fast = _fit_rows(layout, w0.copy(), linear, pruned, hessian, factor=factor)
    exact = _fit_rows(layout, np.where(pruned, 0.0, w0), linear, pruned, hessian)
    for g in range(groups):
        block = slice(g * rows, (g + 1) * rows)

        def error(w: np.ndarray, g: int = g, block: slice = block) -> float:
            d = w[block] - w0[block]
            return float(np.einsum("ij,jk,ik->", d, hessian[g], d))

        assert not fast[pruned].any()
        assert error(exact) <= error(fast) + 1e-9 <= 1.3 * error(exact) + 1e-9
        assert error(fast) < error(np.where(pruned, 0.0, w0))


def test_calibration_batches_shrink_to_keep_layer_inputs_under_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch's layer inputs over ``CALIBRATION_BATCH_BYTES`` calibrate in smaller batches, with
    the same statistics; under the budget, the batches are as asked."""
    rng = np.random.default_rng(3)
    model = two_gemms(
        {"w1": rng.standard_normal((32, 16)).astype(np.float32), "w2": rng.standard_normal((4, 32)).astype(np.float32)}
    )
    x = correlated_inputs(200, 16)
    seen: list[int] = []
    for runner in ("run_session", "_run_views"):  # the size probe, then the batches
        original = getattr(_recover, runner)

        def counting(
            session: ort.InferenceSession, names: list[str], feeds: dict[str, np.ndarray], run: Any = original
        ) -> list[np.ndarray]:
            seen.append(len(next(iter(feeds.values()))))
            return list(run(session, names, feeds))

        monkeypatch.setattr(_recover, runner, counting)
    asked = calibrated(model, x)
    assert seen == [1, 64, 64, 64, 8]  # one sample measured (x and the Relu: 192 bytes), then as asked
    per_sample = (16 + 32) * 4
    monkeypatch.setattr(_recover, "CALIBRATION_BATCH_BYTES", 10 * per_sample)
    seen.clear()
    small = calibrated(model, x)
    assert seen == [1] + [10] * 20
    for name, stats in asked.stats.items():
        assert stats.gram is not None and small.stats[name].gram is not None
        np.testing.assert_allclose(small.stats[name].gram, stats.gram, rtol=1e-5)
        np.testing.assert_allclose(small.stats[name].total, stats.total, rtol=1e-5)


def test_a_one_pass_fit_is_made_once_per_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    # the search revisits a wide layer's masks (bisection, confirmation, the write): the pass and its
    # steps are paid once per mask, the right-hand side W0 H once per layer
    rng = np.random.default_rng(5)
    w1, w2 = rng.standard_normal((8, 6)).astype(np.float32), rng.standard_normal((40, 8)).astype(np.float32)
    model = two_gemms({"w1": w1, "w2": w2})
    x = correlated_inputs(128, 6, seed=6)
    calibration = calibrate(
        model, list(analyze(model).layers), pruner.EvalSet({"x": x}), np.arange(128),
        batch_size=64, fixed_batch=None, full=True, max_cost=1000,
    )  # fmt: skip
    assert "w2" in calibration.one_pass
    passes: list[int] = []
    real_pass = _recover._one_pass

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        passes.append(1)
        return real_pass(*args, **kwargs)

    monkeypatch.setattr("pruner._recover._one_pass", counted)
    conjugate_gradients_only(monkeypatch)
    half = np.abs(w2) < np.median(np.abs(w2))
    quarter = np.abs(w2) < np.quantile(np.abs(w2), 0.25)
    first, _ = calibration.recover("w2", w2, half, reconstruct=True)
    made = len(passes)
    assert made > 0
    again, _ = calibration.recover("w2", w2, half.copy(), reconstruct=True)
    assert len(passes) == made  # the same mask: no new pass
    np.testing.assert_array_equal(again, first)
    assert not again.flags.writeable  # shared with every caller: nobody may change it in place
    other, _ = calibration.recover("w2", w2, quarter, reconstruct=True)
    assert len(passes) > made and not np.array_equal(other, first)
    # what the cache hands out is what a fresh calibration computes
    fresh = calibrate(
        model, list(analyze(model).layers), pruner.EvalSet({"x": x}), np.arange(128),
        batch_size=64, fixed_batch=None, full=True, max_cost=1000,
    )  # fmt: skip
    np.testing.assert_array_equal(fresh.recover("w2", w2, half, reconstruct=True)[0], first)


def test_a_damped_hessian_replaces_its_gram_matrix_and_release_drops_both() -> None:
    # the statistics are held through the search and the write: one float64 matrix a layer, then none
    rng = np.random.default_rng(3)
    weight, bias = rng.standard_normal((4, 8)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    calibration = calibrated(gemm_model(weight, bias), correlated_inputs(100, 8))
    stats = calibration.stats["w"]
    gram = stats.gram
    assert gram is not None
    hessian = calibration.hessian("w")
    assert hessian is not None and stats.gram is None
    np.testing.assert_allclose(hessian, _damped(gram / stats.count))
    assert calibration.hessian("w") is hessian and calibration.factor("w") is not None
    mask = np.abs(weight) < np.median(np.abs(weight))
    refit, _ = calibration.recover("w", weight, mask, reconstruct=True)
    assert not np.array_equal(refit, np.where(mask, 0, weight))
    calibration.release()
    assert calibration.hessian("w") is None and calibration.factor("w") is None
    assert stats.total is not None and stats.squares is not None  # bias correction and scores still work


@pytest.mark.parametrize(("groups", "width"), [(40, 9), (6, 25), (3, 70)])
def test_grouped_gram_matrices_are_each_groups_own_products(groups: int, width: int) -> None:
    # every group width (depthwise, narrow, wide): one stacked product of contiguous blocks, X_g^T Y_g
    from pruner._recover import _grams

    rng = np.random.default_rng(groups)
    x, y = (rng.standard_normal((300, groups * width)).astype(np.float32) for _ in range(2))
    for other in (None, y):
        got = _grams(x, groups, other)
        right = x if other is None else other
        for g in range(groups):
            cols = slice(g * width, (g + 1) * width)
            expected = x[:, cols].astype(np.float64).T @ right[:, cols].astype(np.float64)
            np.testing.assert_allclose(got[g], expected, rtol=1e-4, atol=1e-3)
