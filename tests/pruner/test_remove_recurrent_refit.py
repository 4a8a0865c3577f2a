"""Recovery in remove mode for LSTM/GRU hidden units: the node's own R loses the removed units'
columns (their h_{t-1}) and is refit on the remaining ones; a recurrent node after it loses
input features (W's columns) and is refit like any consumer."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import pruner
from pruner import Mode, PruneOptions, Recovery
from pruner._analysis import analyze
from pruner._evaluate import SplitModel
from pruner._ops import RECURRENT_GATES
from pruner._recover import SequentialRefit, calibrate
from pruner._remove import Remover
from pruner._structure import remove_components
from tests.pruner.test_recurrent import SEQ, stacked

HIDDEN = 6
"""The first recurrent node's hidden size in ``stacked``."""
REMOVED = (1, 4)


def inputs(n: int = 256, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, SEQ, 6)).astype(np.float32)


def run(model: onnx.ModelProto, x: np.ndarray, outputs: tuple[str, ...] = ("y",)) -> list[np.ndarray]:
    """``outputs`` of ``model`` on ``x`` (intermediate tensors exposed as extra outputs)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in outputs if n not in have)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(a) for a in session.run(list(outputs), {"x": x})]


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}


def setup(model: onnx.ModelProto, recover: Recovery) -> tuple[Remover, np.ndarray]:
    """A remover of ``model`` calibrated on 256 samples, and the components of units ``REMOVED``
    of the first recurrent node (family W1)."""
    x = inputs()
    evalset = pruner.EvalSet({"x": x}, run(model, x)[0].argmax(-1))
    layers = list(analyze(model).layers)
    calibration = calibrate(model, layers, evalset, np.arange(len(x)), batch_size=64, fixed_batch=None, full=True)
    options = PruneOptions(mode=Mode.REMOVE, recover=recover, channel_multiple=1)

    def sequential(split: SplitModel) -> SequentialRefit:
        return SequentialRefit(calibration, split, evalset, batch_size=64, fixed_batch=None)

    remover = Remover(model, options, calibration, sequential if recover is Recovery.SEQUENTIAL else None)
    family = next(f for f in remover.families if f.name == "W1")
    assert len(family.components) == HIDDEN
    return remover, np.array([int(family.components[k]) for k in REMOVED])


def full_shape(remover: Remover, removed: np.ndarray) -> onnx.ModelProto:
    """The refit model before the removed units are sliced away."""
    if remover.sequential is not None:
        return remover._refit_sequentially(removed)
    return remover._refit(removed)


def kept_states(model: onnx.ModelProto, x: np.ndarray, kept: np.ndarray | None = None) -> np.ndarray:
    """The first recurrent node's Y (seq) of the kept units."""
    (y,) = run(model, x, ("seq",))
    return y if kept is None else y[..., kept]


@pytest.mark.parametrize("recover", [Recovery.LSQ, Recovery.SEQUENTIAL])
@pytest.mark.parametrize("op_type", ["LSTM", "GRU"])
def test_the_node_losing_units_refits_r_on_the_remaining_states(op_type: str, recover: Recovery) -> None:
    model = stacked(op_type)
    remover, removed = setup(model, recover)
    refit = full_shape(remover, removed)
    before, after = weights(model), weights(refit)
    kept = np.setdiff1d(np.arange(HIDDEN), REMOVED)
    gates = RECURRENT_GATES[op_type]
    kept_rows = (kept[None, :] + HIDDEN * np.arange(gates)[:, None]).reshape(-1)
    r0, r1 = before["R1"][0][np.ix_(kept_rows, kept)], after["R1"][0][np.ix_(kept_rows, kept)]
    assert not np.allclose(r0, r1), "R's kept rows on the kept states are not refit"
    b0, b1 = before["B1"][0], after["B1"][0]
    rb = gates * HIDDEN + kept_rows  # Rb: the removed columns' mean contribution moved there
    assert not np.allclose(b0[rb], b1[rb])
    if recover is Recovery.LSQ:  # W loses no input column: untouched, and so is Wb
        np.testing.assert_array_equal(before["W1"], after["W1"])
        np.testing.assert_array_equal(b0[: gates * HIDDEN], b1[: gates * HIDDEN])

    pruned = remove_components(refit, remover.structure, list(removed), copy=False)
    plain = remove_components(model, remover.structure, list(removed))
    for candidate in (pruned, plain):
        onnx.checker.check_model(candidate, full_check=True)
    x = inputs(128, seed=9)  # not the calibration samples
    original = kept_states(model, x, kept)
    err_refit = float(np.mean((kept_states(pruned, x) - original) ** 2))
    err_plain = float(np.mean((kept_states(plain, x) - original) ** 2))
    assert err_refit < 0.9 * err_plain, (err_refit, err_plain)
    out_refit = float(np.mean((run(pruned, x)[0] - run(model, x)[0]) ** 2))
    out_plain = float(np.mean((run(plain, x)[0] - run(model, x)[0]) ** 2))
    assert out_refit < out_plain


@pytest.mark.parametrize("op_type", ["LSTM", "GRU"])
def test_a_recurrent_node_losing_input_features_refits_w(op_type: str) -> None:
    """The second node (a GRU) reads the first one's Y: its W loses the removed units' columns
    and its kept columns are refit on its calibrated x_t, the lost mean going into Wb."""
    model = stacked(op_type)
    remover, removed = setup(model, Recovery.LSQ)
    refit = remover._refit(removed)
    before, after = weights(model), weights(refit)
    kept = np.setdiff1d(np.arange(HIDDEN), REMOVED)
    assert not np.allclose(before["W2"][..., kept], after["W2"][..., kept])
    assert not np.allclose(before["B2"][0, :15], after["B2"][0, :15])  # Wb
    np.testing.assert_array_equal(before["R2"], after["R2"])  # the second node keeps its units
    np.testing.assert_array_equal(before["B2"][0, 15:], after["B2"][0, 15:])  # Rb


@pytest.mark.parametrize("recover", [Recovery.LSQ, Recovery.SEQUENTIAL])
@pytest.mark.parametrize("op_type", ["LSTM", "GRU"])
def test_removing_units_whose_weights_are_zero_stays_exact(op_type: str, recover: Recovery) -> None:
    """A unit with zero rows in W, R, B (and P) keeps h = 0: removing it changes nothing, and
    the refit, whose dropped columns were all zero, must not change anything either."""
    model = stacked(op_type)
    arrays = weights(model)
    gates = RECURRENT_GATES[op_type]
    rows = np.array(REMOVED)[None, :] + HIDDEN * np.arange(gates)[:, None]
    for name in ("W1", "R1"):
        arrays[name][:, rows.reshape(-1)] = 0.0
    arrays["B1"][:, np.concatenate([rows, rows + gates * HIDDEN]).reshape(-1)] = 0.0
    if op_type == "LSTM":
        arrays["P1"][:, (np.array(REMOVED)[None, :] + HIDDEN * np.arange(3)[:, None]).reshape(-1)] = 0.0
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(arrays[t.name], t.name))
    onnx.checker.check_model(model, full_check=True)
    remover, removed = setup(model, recover)
    x = inputs(128, seed=9)
    np.testing.assert_array_equal(kept_states(model, x)[..., list(REMOVED)], 0.0)
    pruned = remove_components(full_shape(remover, removed), remover.structure, list(removed), copy=False)
    onnx.checker.check_model(pruned, full_check=True)
    kept = np.setdiff1d(np.arange(HIDDEN), REMOVED)
    np.testing.assert_allclose(kept_states(pruned, x), kept_states(model, x, kept), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run(pruned, x)[0], run(model, x)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op_type", ["LSTM", "GRU"])
def test_a_remove_run_with_recurrent_refits_replays_byte_for_byte(op_type: str) -> None:
    model = stacked(op_type)
    x = inputs(300, seed=5)
    data = pruner.EvalSet({"x": x}, run(model, x)[0].argmax(-1).astype(np.int64))
    options = PruneOptions(
        mode=Mode.REMOVE,
        target_sparsity=0.3,
        tolerance=pruner.Tolerance(100.0),
        recover=Recovery.LSQ,
        channel_multiple=1,
        include=("W1",),
    )
    result = pruner.prune(model, data, options)
    assert result.report.status == "pruned", result.report.notes
    onnx.checker.check_model(result.model, full_check=True)
    shapes = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    hidden = shapes["R1"][2]
    assert hidden < HIDDEN
    run(result.model, x[:8])
    replay = result.plan.replay
    assert replay is not None
    assert any(e.tensor == "R1" and e.refit for e in replay.edits)
    assert pruner.apply_plan(result.plan, model).SerializeToString() == result.model.SerializeToString()


def bidirectional(op_type: str) -> onnx.ModelProto:
    """x [N, SEQ, 5] -> Transpose -> bidirectional op_type (hidden 6) -> Y_h [2, N, 6] -> ReduceSum
    over the directions -> MatMul -> y [N, 4]."""
    gates = RECURRENT_GATES[op_type]
    rng = np.random.default_rng(2)

    def array(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    arrays = {
        "W": array(2, gates * HIDDEN, 5),
        "R": array(2, gates * HIDDEN, HIDDEN),
        "B": array(2, 2 * gates * HIDDEN),
        "head": array(HIDDEN, 4),
        "axes": np.array([0], np.int64),
    }
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
        helper.make_node(op_type, ["xt", "W", "R", "B"], ["", "yh"], hidden_size=HIDDEN, direction="bidirectional"),
        helper.make_node("ReduceSum", ["yh", "axes"], ["s"], keepdims=0),
        helper.make_node("MatMul", ["s", "head"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bidirectional",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", SEQ, 5])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("op_type", ["LSTM", "GRU"])
def test_both_directions_refit_their_r_blocks(op_type: str) -> None:
    model = bidirectional(op_type)
    x = np.random.default_rng(1).standard_normal((256, SEQ, 5)).astype(np.float32)
    evalset = pruner.EvalSet({"x": x}, run(model, x)[0].argmax(-1))
    layers = list(analyze(model).layers)
    calibration = calibrate(model, layers, evalset, np.arange(len(x)), batch_size=64, fixed_batch=None, full=True)
    remover = Remover(model, PruneOptions(mode=Mode.REMOVE, recover=Recovery.LSQ, channel_multiple=1), calibration)
    (family,) = remover.families
    removed = np.array([int(family.components[k]) for k in REMOVED])
    refit = remover._refit(removed)
    before, after = weights(model), weights(refit)
    kept = np.setdiff1d(np.arange(HIDDEN), REMOVED)
    for direction in range(2):
        assert not np.allclose(before["R"][direction][:, kept], after["R"][direction][:, kept])
    np.testing.assert_array_equal(before["W"], after["W"])
    pruned = remove_components(refit, remover.structure, list(removed), copy=False)
    plain = remove_components(model, remover.structure, list(removed))
    onnx.checker.check_model(pruned, full_check=True)
    test = np.random.default_rng(9).standard_normal((128, SEQ, 5)).astype(np.float32)
    (original,) = run(model, test, ("yh",))
    errors = [float(np.mean((run(m, test, ("yh",))[0] - original[..., kept]) ** 2)) for m in (pruned, plain)]
    assert errors[0] < 0.9 * errors[1], errors
