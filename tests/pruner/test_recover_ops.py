"""Recovery of every prunable op kind: the rows it unfolds reproduce the node's output, and a
refit after zeroing part of a weight brings the layer's output (by onnxruntime) closer to the
original than masking alone, while an unpruned weight refits to itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import pruner
from pruner._analysis import analyze
from pruner._ops import Unfold
from pruner._recover import MIN_POSITIONS, Recurrent, _layer_rows, _recurrent_rows, _use_rows, calibrate, layouts
from tests.pruner.test_ops import CASES, Case, declared, model_of, operands, run

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

RECOVERY_CASES = [
    *CASES,
    Case("conv3d", "Conv", 1, (4, 3, 2, 3, 3), (1, 3, 4, 5, 5), {"pads": [1, 0, 1, 0, 1, 1], "strides": [1, 2, 1]}),
    Case("conv_grouped", "Conv", 1, (6, 2, 3, 3), (1, 4, 6, 6), {"group": 2, "pads": [1, 1, 1, 1]}),
    Case("conv_depthwise", "Conv", 1, (4, 1, 3, 3), (1, 4, 6, 6), {"group": 4, "dilations": [2, 1]}),
    Case("conv_transpose_strided", "ConvTranspose", 1, (3, 4, 2, 2), (1, 3, 4, 5), {"strides": [2, 2]}),
    Case(
        "conv_transpose_padded",
        "ConvTranspose",
        1,
        (4, 2, 3, 3),
        (1, 4, 4, 5),
        {"strides": [2, 3], "pads": [1, 0, 2, 1], "output_padding": [1, 0], "group": 2, "dilations": [1, 2]},
    ),
    Case("conv_transpose_1d", "ConvTranspose", 1, (3, 2, 3), (1, 3, 6), {"strides": [2], "pads": [1, 1]}),
    Case("conv_transpose_3d", "ConvTranspose", 1, (2, 3, 2, 2, 2), (1, 2, 3, 3, 2), {"strides": [2, 1, 2]}),
    Case("matmul_a", "MatMul", 0, (4, 3), (2, 3, 5), {}),
    Case("matmul_b_4d", "MatMul", 1, (2, 3, 3, 4), (2, 3, 5, 3), {}),
    Case("matmul_b_3d_broadcast", "MatMul", 1, (2, 3, 4), (5, 3), {}),
    Case("matmul_b_3d_broadcast_batch", "MatMul", 1, (2, 3, 4), (4, 1, 5, 3), {}),
]


def grouped_product(rows: np.ndarray, weight_rows: np.ndarray, groups: int) -> np.ndarray:
    """rows [n, groups * in] times weight rows [groups * out, in], group by group: [n, groups * out]."""
    split_rows = rows.reshape(len(rows), groups, -1).transpose(1, 0, 2)
    split_weight = weight_rows.reshape(groups, -1, weight_rows.shape[1])
    return (split_rows @ split_weight.transpose(0, 2, 1)).transpose(1, 0, 2).reshape(len(rows), -1)


@pytest.mark.parametrize("case", RECOVERY_CASES, ids=lambda c: c.name)
def test_recovery_rows_times_weight_rows_are_the_output(case: Case) -> None:
    """What recovery unfolds the input into, times the weight as [out, in] rows, is the node's output."""
    weight, x = operands(case)
    model = model_of(case, weight)
    slot = declared(case, weight)
    found, skipped = layouts(model, list(analyze(model).layers))
    if case.name == "matmul_a_3d":  # a batched weight as the first operand: not fitted
        assert "3-D MatMul weight" in skipped["w"]
        return
    assert "w" in found, skipped
    layout = found["w"]
    assert layout.unfold is slot.unfold
    rows = _layer_rows(layout, x, samples=1).astype(np.float64)
    outputs = grouped_product(rows, layout.rows(weight.astype(np.float64)), layout.groups)
    y = run(model, x)
    if layout.conv is not None:  # conv rows are (sample, position)-major
        expected = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    elif layout.groups > 1:  # a batched MatMul: [..., groups..., M, N] -> [(..., M), (groups, N)]
        expected = y.reshape(-1, layout.groups, *y.shape[-2:]).transpose(0, 2, 1, 3).reshape(-1, outputs.shape[1])
    else:
        expected = np.moveaxis(y, slot.output_axis, -1).reshape(-1, outputs.shape[1])
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-5)
    # and back: the rows are the weight, element for element
    np.testing.assert_array_equal(layout.unrows(layout.rows(weight), weight.shape), weight)


def session_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(y) for y in session.run(None, feeds)]


def with_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name].astype(np.float32), init.name))
    return out


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def refit_errors(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], name: str, share: float = 0.5
) -> tuple[float, float, np.ndarray]:
    """Squared output error (every graph output, by onnxruntime, on the calibration data) after
    zeroing the ``share`` of ``name``'s weights smallest in magnitude: masked, and refit (with the
    bias shift); and the unpruned weight's refit."""
    layers = list(analyze(model).layers)
    evalset = pruner.EvalSet(feeds)
    count = len(next(iter(feeds.values())))
    calibration = calibrate(model, layers, evalset, np.arange(count), batch_size=16, fixed_batch=None, full=True)
    assert name in calibration.layouts, calibration.skipped
    assert name not in calibration.skipped and name not in calibration.partial
    layout = calibration.layouts[name]
    weights = initializers(model)
    weight = weights[name]
    mask = np.abs(weight) <= np.quantile(np.abs(weight), share)
    reference = session_outputs(model, feeds)

    def error(new: dict[str, np.ndarray]) -> float:
        outputs = session_outputs(with_weights(model, new), feeds)
        return sum(float(np.mean((o - r) ** 2)) for o, r in zip(outputs, reference, strict=True))

    masked = error({name: np.where(mask, 0, weight)})
    fitted, shift = calibration.recover(name, weight, mask, reconstruct=True)
    assert np.all(fitted[mask] == 0)
    new = {name: fitted}
    if shift is not None and layout.bias is not None:
        new[layout.bias] = layout.shifted(weights[layout.bias], shift)
    same, _ = calibration.recover(name, weight, np.zeros_like(mask), reconstruct=True)
    return error(new), masked, same


def conv_transpose_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[1, 0, 0, 1], group=2)
    weights = {"w": rng.standard_normal((4, 3, 3, 3)), "b": rng.standard_normal(6)}
    return graph_model([node], {"x": [None, 4, 6, 6]}, weights), {"x": correlated((96, 4, 6, 6), 4, rng)}


def correlated(shape: tuple[int, ...], channels: int, rng: np.random.Generator, axis: int = 1) -> np.ndarray:
    """Inputs whose ``channels`` along ``axis`` are mixed (correlated), with a mean: what a refit exploits."""
    x = rng.standard_normal(shape)
    mix = rng.standard_normal((channels, channels)) + 2 * np.eye(channels)
    return (np.moveaxis(np.moveaxis(x, axis, -1) @ mix, -1, axis) + 0.3).astype(np.float32)


def graph_model(
    nodes: list[onnx.NodeProto], inputs: dict[str, list[int | None]], weights: dict[str, np.ndarray]
) -> onnx.ModelProto:
    outputs = [n.output[-1] for n in nodes if n.output[-1] and not any(n.output[-1] in m.input for m in nodes)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def conv3d_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(4)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1, 1, 1])
    weights = {"w": rng.standard_normal((5, 3, 3, 3, 3)), "b": rng.standard_normal(5)}
    return graph_model([node], {"x": [None, 3, 4, 5, 5]}, weights), {"x": correlated((64, 3, 4, 5, 5), 3, rng)}


def gemm_first_operand_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The weight is Gemm's A (transposed), the data B' = x (transB): y[M, N] = A^T x^T, per sample N."""
    rng = np.random.default_rng(5)
    node = helper.make_node("Gemm", ["w", "x", "c"], ["y"], transA=1, transB=1)
    weights = {"w": rng.standard_normal((10, 6)), "c": rng.standard_normal((6, 1))}
    return graph_model([node], {"x": [None, 10]}, weights), {"x": correlated((200, 10), 10, rng)}


def batched_matmul_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A weight of one matrix per head [heads, in, out], as attention exporters write."""
    rng = np.random.default_rng(6)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    weights = {"w": rng.standard_normal((3, 8, 5))}
    x = np.stack([correlated((100, 4, 8), 8, rng, axis=2)[:, 0] for _ in range(3)], axis=1)
    return graph_model([node], {"x": [None, 3, 1, 8]}, weights), {"x": np.ascontiguousarray(x.reshape(100, 3, 1, 8))}


def shared_matmul_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One weight read by two MatMuls (an unrolled decoder's): one fit over both uses."""
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("MatMul", ["x1", "w"], ["y1"]), helper.make_node("MatMul", ["x2", "w"], ["y2"])]
    weights = {"w": rng.standard_normal((9, 4))}
    feeds = {"x1": correlated((150, 9), 9, rng), "x2": correlated((150, 9), 9, rng) * 2}
    return graph_model(nodes, {"x1": [None, 9], "x2": [None, 9]}, weights), feeds


FIT_CASES = {
    "conv_transpose": conv_transpose_model,
    "conv3d": conv3d_model,
    "gemm_first_operand": gemm_first_operand_model,
    "batched_matmul": batched_matmul_model,
    "shared_matmul": shared_matmul_model,
}


@pytest.mark.parametrize("case", FIT_CASES)
def test_each_kind_is_refit_closer_to_the_original_than_masking(case: str) -> None:
    model, feeds = FIT_CASES[case]()
    refit, masked, same = refit_errors(model, feeds, "w")
    assert refit < 0.9 * masked  # 0.56-0.87 with these seeds
    np.testing.assert_allclose(same, initializers(model)["w"], rtol=1e-4, atol=1e-5)


def recurrent_model(
    op: str, *, direction: str = "forward", reset: int | None = None, lengths: bool = False, hidden: int = 16
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x [N, T, 5] and h [N, D, hidden] (batch first, as calibration needs) transposed into one
    recurrent node with initial_h (and sequence_lens); its Y and Y_h are the outputs."""
    rng = np.random.default_rng(11)
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    d = 2 if direction == "bidirectional" else 1
    n, steps, width = 96, 7, 12
    attrs: dict[str, object] = {"hidden_size": hidden, "direction": direction}
    if reset is not None:
        attrs["linear_before_reset"] = reset
    inputs = ["xt", "W", "R", "B", "lens" if lengths else "", "h0"]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
        helper.make_node("Transpose", ["h"], ["h0"], perm=[1, 0, 2]),
        helper.make_node(op, inputs, ["Y", "Y_h"], **attrs),
    ]
    weights = {
        "W": rng.standard_normal((d, gates * hidden, width)) * 0.6,
        "R": rng.standard_normal((d, gates * hidden, hidden)) * 0.5,
        "B": rng.standard_normal((d, 2 * gates * hidden)) * 0.3,
    }
    graph_inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, steps, width]),
        helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, d, hidden]),
    ]
    feeds = {
        "x": correlated((n, steps, width), width, rng, axis=2),
        "h": (rng.standard_normal((n, d, hidden)) * 0.5).astype(np.float32),
    }
    if lengths:
        graph_inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [None]))
        feeds["lens"] = rng.integers(1, steps + 1, n).astype(np.int32)
    graph = helper.make_graph(
        nodes,
        "g",
        graph_inputs,
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("Y", "Y_h")],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), feeds


RECURRENT_CASES = {
    "lstm_bidirectional": {"op": "LSTM", "direction": "bidirectional"},
    "gru_reset_after": {"op": "GRU", "reset": 1, "lengths": True},
    "gru_reset_before": {"op": "GRU", "direction": "bidirectional", "reset": 0, "lengths": True},
    "rnn_reverse": {"op": "RNN", "direction": "reverse", "lengths": True},
}


@pytest.mark.parametrize("case", RECURRENT_CASES)
@pytest.mark.parametrize("name", ["W", "R"])
def test_recurrent_gates_are_refit_closer_to_the_original_than_masking(case: str, name: str) -> None:
    model, feeds = recurrent_model(**RECURRENT_CASES[case])  # type: ignore[arg-type]
    refit, masked, same = refit_errors(model, feeds, name)
    # the fit is per step, on the unpruned states: what it wins back shrinks through time and the
    # gates' nonlinearity (W: 0.56-0.71 with these seeds, R: 0.64-0.93)
    assert refit < 0.95 * masked
    np.testing.assert_allclose(same, initializers(model)[name], rtol=1e-4, atol=1e-5)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize(("op", "reset"), [("RNN", 0), ("GRU", 0), ("GRU", 1)])  # linear_before_reset: GRU only
def test_recurrent_rows_are_the_gates_inputs(op: str, reset: int) -> None:
    """x_t and h_{t-1} as recovery gathers them (both directions, initial states, sequence lengths)
    give back the node's Y through its gate equations: each row's previous state is the right one."""
    model, feeds = recurrent_model(op, direction="bidirectional", reset=reset if op == "GRU" else None, lengths=True)
    found, skipped = layouts(model, list(analyze(model).layers))
    assert not skipped and {found["W"].unfold, found["R"].unfold} == {Unfold.SEQUENCE, Unfold.STATE}
    y, _, xt, h0 = session_outputs(expose(model, ["xt", "h0"]), feeds)
    values = {"Y": y, "xt": xt, "h0": h0, "lens": feeds["lens"]} | initializers(model)
    count = len(feeds["x"])
    (use_w,), (use_r,) = found["W"].all_uses, found["R"].all_uses
    x_rows = _use_rows(found["W"], use_w, values, count, count).astype(np.float64)
    h_rows = _use_rows(found["R"], use_r, values, count, count).astype(np.float64)
    w, r, b = (values[k].astype(np.float64) for k in ("W", "R", "B"))
    hidden, gates, d = r.shape[2], r.shape[1] // r.shape[2], 2
    # every valid (step, sequence), in the rows' order, and what Y holds there
    valid = np.arange(values["xt"].shape[0])[:, None] < feeds["lens"][None, :]
    y = values["Y"].transpose(0, 2, 1, 3)[valid].astype(np.float64)  # [rows, directions, hidden]
    for k in range(d):
        inputs = x_rows @ w[k].T + b[k, : gates * hidden]  # [rows, gates * hidden]
        states = h_rows[:, k * gates * hidden : (k + 1) * gates * hidden]
        recurrent = (
            np.stack(
                [
                    states[:, g * hidden : (g + 1) * hidden] @ r[k, g * hidden : (g + 1) * hidden].T
                    for g in range(gates)
                ],
                axis=1,
            ).reshape(len(states), -1)
            + b[k, gates * hidden :]
        )
        if op == "RNN":
            np.testing.assert_allclose(np.tanh(inputs + recurrent), y[:, k], atol=1e-5)
            continue
        previous = states[:, :hidden]
        z = sigmoid(inputs[:, :hidden] + recurrent[:, :hidden])
        rg = sigmoid(inputs[:, hidden : 2 * hidden] + recurrent[:, hidden : 2 * hidden])
        hidden_pre = inputs[:, 2 * hidden :]
        if reset:  # h rows are h_{t-1}: r scales R_h h + Rb_h
            hidden_pre = hidden_pre + rg * recurrent[:, 2 * hidden :]
        else:  # h rows are r_t * h_{t-1} already
            hidden_pre = hidden_pre + recurrent[:, 2 * hidden :]
        np.testing.assert_allclose((1 - z) * np.tanh(hidden_pre) + z * previous, y[:, k], atol=1e-5)


def expose(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return out


def unrolled_decoder() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Two GRU steps sharing W, R and B, the second starting from the first's Y_h, neither naming
    its Y (how the g2p model's unrolled decoder is written)."""
    rng = np.random.default_rng(12)
    hidden, width, n = 16, 12, 128
    nodes = [
        helper.make_node("Transpose", ["x1"], ["x1t"], perm=[1, 0, 2]),
        helper.make_node("Transpose", ["x2"], ["x2t"], perm=[1, 0, 2]),
        helper.make_node("GRU", ["x1t", "W", "R", "B"], ["", "h1"], hidden_size=hidden, linear_before_reset=1),
        helper.make_node(
            "GRU", ["x2t", "W", "R", "B", "", "h1"], ["", "h2"], hidden_size=hidden, linear_before_reset=1
        ),
    ]
    weights = {
        "W": rng.standard_normal((1, 3 * hidden, width)) * 0.6,
        "R": rng.standard_normal((1, 3 * hidden, hidden)) * 0.5,
        "B": rng.standard_normal((1, 6 * hidden)) * 0.3,
    }
    feeds = {k: correlated((n, 3, width), width, rng, axis=2) for k in ("x1", "x2")}
    return graph_model(nodes, {"x1": [None, 3, width], "x2": [None, 3, width]}, weights), feeds


@pytest.mark.parametrize("name", ["W", "R"])
def test_a_weight_shared_by_unrolled_recurrent_steps_is_fit_once_over_all_of_them(name: str) -> None:
    model, feeds = unrolled_decoder()
    found, skipped = layouts(model, list(analyze(model).layers))
    assert not skipped
    assert [use.input for use in found[name].all_uses] == ["x1t", "x2t"]
    assert found[name].bias == "B"  # both steps add the same B: the shift moves it once for both
    refit, masked, same = refit_errors(model, feeds, name)
    assert refit < 0.95 * masked
    np.testing.assert_allclose(same, initializers(model)[name], rtol=1e-4, atol=1e-5)


def test_a_shared_weight_fit_weighs_every_use() -> None:
    """The fit over both uses leaves less error on both outputs together than a fit on the first
    use's rows alone (what a fit of one node would do)."""
    model, feeds = shared_matmul_model()
    only_first = onnx.ModelProto()
    only_first.CopyFrom(model)
    only_first.graph.node[1].input[1] = "w_copy"  # the second node reads a copy: w has one use
    weight = initializers(model)["w"]
    only_first.graph.initializer.append(numpy_helper.from_array(weight, "w_copy"))
    mask = np.abs(weight) <= np.quantile(np.abs(weight), 0.5)
    fits = []
    for graph in (model, only_first):
        calibration = calibrate(
            graph,
            list(analyze(graph).layers),
            pruner.EvalSet(feeds),
            np.arange(150),
            batch_size=16,
            fixed_batch=None,
            full=True,
        )
        assert len(calibration.layouts["w"].all_uses) == (2 if graph is model else 1)
        fits.append(calibration.recover("w", weight, mask, reconstruct=True)[0])
    reference = session_outputs(model, feeds)

    def both_errors(w: np.ndarray) -> float:
        outputs = session_outputs(with_weights(model, {"w": w}), feeds)
        return sum(float(np.mean((o - r) ** 2)) for o, r in zip(outputs, reference, strict=True))

    assert both_errors(fits[0]) < both_errors(fits[1])


@pytest.mark.parametrize("recover", [pruner.Recovery.AUTO, pruner.Recovery.SEQUENTIAL])
def test_a_pytorch_lstm_and_gru_are_recovered_end_to_end(recover: pruner.Recovery) -> None:
    """tests/fixtures/recurrent.onnx (tools/make_recurrent_fixture.py: a bidirectional LSTM, a GRU and a
    Linear head) at 60% sparsity: every weight is fit, none named as not recovered, and the held-out
    accuracy is far above masking's (0.47 masked; auto 0.77, sequential 0.86, where with the LSTM and
    GRU not fitted they were 0.53 and 0.78)."""
    model = onnx.load(str(FIXTURES / "recurrent.onnx"))
    data = pruner.load_eval_set(FIXTURES / "recurrent_eval.npz")
    results = {}
    for method in (pruner.Recovery.NONE, recover):
        options = pruner.PruneOptions(tolerance=pruner.Tolerance(1.0), target_sparsity=0.6, recover=method)
        results[method] = pruner.prune(model, data, options).report
    report = results[recover]
    assert report.sparsity == pytest.approx(0.6, abs=0.01)
    assert not [n for n in report.notes if "not recovered" in n or "no calibration" in n]
    assert any(n.startswith("recovery: 5 layer(s) fit") for n in report.notes)
    assert report.final.holdout is not None and results[pruner.Recovery.NONE].final.holdout is not None
    assert report.final.holdout > results[pruner.Recovery.NONE].final.holdout + 0.15


def test_long_sequences_keep_a_subset_of_their_steps() -> None:
    """As large feature maps keep a subset of positions: a long sequence keeps at least
    ``MIN_POSITIONS`` steps per sequence, rows of its own, and W's and R's rows stay bounded."""
    rng = np.random.default_rng(13)
    steps, batch, width, hidden = 300, 2, 3, 4
    values = {
        "x": rng.standard_normal((steps, batch, width)).astype(np.float32),
        "Y": rng.standard_normal((steps, 1, batch, hidden)).astype(np.float32),
    }
    rec = Recurrent(hidden=hidden, directions=1, gates=3, batch_major=False, state="Y")
    x_rows = _recurrent_rows(Unfold.SEQUENCE, "x", rec, values, batch, samples=1000)
    h_rows = _recurrent_rows(Unfold.STATE, "x", rec, values, batch, samples=1000)
    assert len(x_rows) == len(h_rows) == MIN_POSITIONS * batch
    every = values["x"].reshape(-1, width)
    assert all((every == row).all(axis=1).any() for row in x_rows)
    shifted = np.concatenate([np.zeros((1, batch, hidden)), values["Y"][:-1, 0]]).reshape(-1, hidden)
    assert all((shifted == row[:hidden]).all(axis=1).any() for row in h_rows)
    np.testing.assert_array_equal(h_rows[:, :hidden], h_rows[:, hidden : 2 * hidden])  # every gate reads h_{t-1}
    full = _recurrent_rows(Unfold.SEQUENCE, "x", rec, values, batch, samples=1)
    assert len(full) == steps * batch
