"""LSTM, GRU and RNN weights: their declarations against onnxruntime, per-gate scoring, and
zero and N:M runs of ``pruner.prune`` on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import pruner
from pruner import Criterion, Mode, PruneOptions, Tolerance
from pruner._analysis import analyze
from pruner._nm import nm_mask, reduction_axis
from pruner._ops import RECURRENT_GATES, Unfold, layout_of
from pruner._options import Allocation
from pruner._recover import layouts
from pruner._score import Granularity, balance_blocks, lowest, unit_scores
from pruner._space import ZeroSpace, build_units
from pruner._structure import analyze_structure, remove_components, zero_components

HIDDEN, INPUT, SEQ, BATCH = 8, 12, 5, 3


def recurrent(op_type: str, *, directions: int = 1, seed: int = 0, head: bool = False) -> onnx.ModelProto:
    """x [SEQ, BATCH, INPUT] -> op_type (W, R, B, initial_h) -> y, the op's Y. With ``head``, a
    classifier: x [N, SEQ, INPUT] -> Transpose -> op_type (W, R, B) -> Y_h -> MatMul -> y [N, 4]."""
    gates = RECURRENT_GATES[op_type]
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((directions, gates * HIDDEN, INPUT)) * 0.4).astype(np.float32)
    r = (rng.standard_normal((directions, gates * HIDDEN, HIDDEN)) * 0.4).astype(np.float32)
    b = (rng.standard_normal((directions, 2 * gates * HIDDEN)) * 0.1).astype(np.float32)
    h0 = (rng.standard_normal((directions, BATCH, HIDDEN)) * 0.1).astype(np.float32)
    direction = "bidirectional" if directions == 2 else "forward"
    initializers = [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (r, "r"), (b, "b"))]
    if not head:
        node = helper.make_node(op_type, ["x", "w", "r", "b", "", "h0"], ["y"], hidden_size=HIDDEN, direction=direction)
        nodes = [node]
        initializers.append(numpy_helper.from_array(h0, "h0"))
        x_shape: list[int | str] = [SEQ, BATCH, INPUT]
        y_shape: list[int | str] = [SEQ, directions, BATCH, HIDDEN]
    else:
        nodes = [
            helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
            helper.make_node(
                op_type, ["xt", "w", "r", "b"], ["", "y_h"], hidden_size=HIDDEN, direction=direction, name="rnn"
            ),
            helper.make_node("Transpose", ["y_h"], ["t"], perm=[1, 0, 2]),
            helper.make_node("Reshape", ["t", "flat_shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "head"], ["y"]),
        ]
        initializers += [
            numpy_helper.from_array(np.array([-1, directions * HIDDEN], np.int64), "flat_shape"),
            numpy_helper.from_array(rng.standard_normal((directions * HIDDEN, 4)).astype(np.float32), "head"),
        ]
        x_shape, y_shape = ["N", SEQ, INPUT], ["N", 4]
    graph = helper.make_graph(
        nodes,
        op_type,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def with_weight(model: onnx.ModelProto, name: str, array: np.ndarray) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(array, name))
    return out


def weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def run(model: onnx.ModelProto, x: np.ndarray, output: str = "y") -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run([output], {"x": x})[0])


def inputs(seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((SEQ, BATCH, INPUT)).astype(np.float32)


def sigmoid(v: np.ndarray) -> np.ndarray:
    return np.asarray(1 / (1 + np.exp(-v)))


def first_step_gates(op_type: str, model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """The activated gates of the first time step, computed from the weights by the ONNX spec."""
    w, r, b, h0 = (weight(model, n)[0] for n in ("w", "r", "b", "h0"))
    gates = RECURRENT_GATES[op_type]
    wb, rb = b[: gates * HIDDEN], b[gates * HIDDEN :]
    xw = x[0] @ w.T + wb
    hr = h0 @ r.T + rb
    split = lambda v: np.split(v, gates, axis=-1)  # noqa: E731
    if op_type == "LSTM":
        (xi, xo, xf, xc), (hi, ho, hf, hc) = split(xw), split(hr)
        return {"i": sigmoid(xi + hi), "o": sigmoid(xo + ho), "f": sigmoid(xf + hf), "c": np.tanh(xc + hc)}
    if op_type == "GRU":
        (xz, xr, xh), (hz, hr_, _) = split(xw), split(hr)
        rr = sigmoid(xr + hr_)
        hh = (rr * h0) @ r[2 * HIDDEN :].T + rb[2 * HIDDEN :]  # linear_before_reset = 0
        return {"z": sigmoid(xz + hz), "r": rr, "h": np.tanh(xh + hh)}
    return {"h": np.tanh(xw + hr)}


GATE_NAMES = {"LSTM": "iofc", "GRU": "zrh", "RNN": "h"}


def first_hidden(op_type: str, model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """h_1 from the gates, as the ONNX spec writes it (linear_before_reset = 0)."""
    g = first_step_gates(op_type, model, x)
    h0 = weight(model, "h0")[0]
    if op_type == "LSTM":
        c1 = g["i"] * g["c"]  # initial_c is zero
        return np.asarray(g["o"] * np.tanh(c1))
    if op_type == "GRU":
        return np.asarray((1 - g["z"]) * g["h"] + g["z"] * h0)
    return g["h"]


# --- the declarations --------------------------------------------------------------------------


@pytest.mark.parametrize("op_type", sorted(RECURRENT_GATES))
def test_the_first_step_from_the_declared_gate_blocks_is_what_onnxruntime_computes(op_type: str) -> None:
    """The gate order the declaration's blocks stand for (LSTM i, o, f, c; GRU z, r, h) is the
    order onnxruntime reads W, R and B in."""
    model, x = recurrent(op_type), inputs()
    np.testing.assert_allclose(run(model, x)[0, 0], first_hidden(op_type, model, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op_type", sorted(RECURRENT_GATES))
@pytest.mark.parametrize("which", ["w", "r"])
def test_zeroing_an_element_of_gate_block_g_changes_gate_g_only(op_type: str, which: str) -> None:
    """Zeroing W or R at row g * hidden + k, column j changes gate g of hidden unit k (and, from
    there, unit k of the first output step only), as the declaration's blocks say."""
    model, x = recurrent(op_type), inputs()
    layout = layout_of(model.graph.node[0])
    assert layout is not None
    slot = layout.slot(1 if which == "w" else 2)
    assert slot is not None and slot.blocks == RECURRENT_GATES[op_type]
    unfold = Unfold.SEQUENCE if which == "w" else Unfold.STATE
    assert (slot.out_axis, slot.in_axis, slot.output_axis, slot.unfold) == (1, 2, -1, unfold)
    before = first_step_gates(op_type, model, x)
    y_before = run(model, x)[0, 0]
    k, j = 3, 1
    for g, gate in enumerate(GATE_NAMES[op_type]):
        changed = weight(model, which).copy()
        changed[0, g * HIDDEN + k, j] = 0
        pruned = with_weight(model, which, changed)
        after = first_step_gates(op_type, pruned, x)
        reset = op_type == "GRU" and gate == "r"  # r_k scales h0_k, which all of h reads
        for name in GATE_NAMES[op_type]:
            moved = ~np.isclose(after[name], before[name], rtol=0, atol=1e-7)
            if name == gate:
                assert moved[:, k].any() and not np.delete(moved, k, axis=1).any(), (gate, name)
            elif not (reset and name == "h"):
                assert not moved.any(), (gate, name)
        y_after = run(pruned, x)[0, 0]
        np.testing.assert_allclose(y_after, first_hidden(op_type, pruned, x), rtol=1e-4, atol=1e-5)
        moved_y = ~np.isclose(y_after, y_before, rtol=0, atol=1e-7)
        assert moved_y[:, k].any() or gate == "f"  # LSTM: f scales c_0 = 0 at the first step
        assert reset or not np.delete(moved_y, k, axis=1).any()


@pytest.mark.parametrize("op_type", sorted(RECURRENT_GATES))
def test_analysis_lists_w_and_r_with_their_blocks_and_skips_b(op_type: str) -> None:
    model = recurrent(op_type, directions=2)
    inspection = analyze(model)
    found = {la.name: la for la in inspection.layers}
    assert set(found) == {"w", "r"}
    gates = RECURRENT_GATES[op_type]
    for layer in found.values():
        assert (layer.channel_axis, layer.input_axis, layer.blocks) == (1, 2, gates)
        assert layer.op_type == op_type
        assert reduction_axis(layer) == 2
    assert found["w"].shape == (2, gates * HIDDEN, INPUT)
    skipped = {s.name: s for s in inspection.skipped}
    assert "bias" in skipped["b"].reason


@pytest.mark.parametrize("op_type", sorted(RECURRENT_GATES))
def test_recovery_handles_recurrent_weights(op_type: str) -> None:
    """W is refit on the steps' inputs, R on the previous states (tests/pruner/test_recover_ops.py)."""
    model = recurrent(op_type)
    found, skipped = layouts(model, list(analyze(model).layers))
    assert not skipped and set(found) == {"w", "r"}


# --- scoring per gate block ----------------------------------------------------------------------


def test_balanced_scores_prune_every_gate_block_of_every_direction_alike() -> None:
    """A gate whose weights are 100x smaller than the others is not emptied first: at any amount,
    every (direction, gate) block loses the same number of weights, to one."""
    model = recurrent("LSTM", directions=2)
    layer = next(la for la in analyze(model).layers if la.name == "w")
    w = weight(model, "w").copy()
    w[:, HIDDEN : 2 * HIDDEN] *= 0.01  # gate o of both directions
    scores = unit_scores(Criterion.MAGNITUDE, layer, w)
    blocks = 2 * 4
    per_block = w.size // blocks
    for amount in (1, 7, per_block, 3 * per_block + 5, w.size - 3):
        counts = lowest(scores, amount).reshape(blocks, per_block).sum(axis=1)
        assert counts.sum() == amount
        assert counts.max() - counts.min() <= 1, (amount, counts)
    # unbalanced, gate o would go first
    raw = np.abs(w).reshape(-1)
    assert lowest(raw, per_block * 2).reshape(blocks, per_block)[[1, 5]].mean() > 0.9


def test_balanced_scores_keep_the_order_within_a_block_and_the_layer_distribution() -> None:
    model = recurrent("GRU")
    layer = next(la for la in analyze(model).layers if la.name == "r")
    w = weight(model, "r")
    raw = np.abs(w).reshape(-1)
    balanced = balance_blocks(layer, raw, Granularity.ELEMENT)
    assert balanced.dtype == np.float32 and balanced.shape == raw.shape
    for block_raw, block in zip(raw.reshape(3, -1), balanced.reshape(3, -1), strict=True):
        order = np.argsort(block_raw, kind="stable")
        assert np.all(np.diff(block[order]) >= 0)
    # equal blocks: exactly the layer's own scores, redistributed
    np.testing.assert_array_equal(np.sort(balanced), np.sort(raw))


def test_zeros_stay_first_and_blocks_balance_on_what_is_left() -> None:
    model = recurrent("GRU")
    layer = next(la for la in analyze(model).layers if la.name == "w")
    w = weight(model, "w").copy()
    w[0, :HIDDEN] = 0  # gate z already empty
    scores = unit_scores(Criterion.MAGNITUDE, layer, w)
    zeros = HIDDEN * INPUT
    mask = lowest(scores, zeros)
    assert mask.reshape(3, -1)[0].all()  # the zeros go first: ZeroSpace counts them so
    counts = lowest(scores, zeros + 20).reshape(3, -1).sum(axis=1)
    assert list(counts) == [zeros, 10, 10]


def test_channel_criteria_balance_rows_per_gate_block() -> None:
    model = recurrent("LSTM")
    layer = next(la for la in analyze(model).layers if la.name == "w")
    w = weight(model, "w").copy()
    w[0, 2 * HIDDEN : 3 * HIDDEN] *= 0.01  # gate f
    scores = unit_scores(Criterion.L2, layer, w)
    assert scores.shape == (4 * HIDDEN,)
    counts = lowest(scores, 8).reshape(4, HIDDEN).sum(axis=1)
    assert list(counts) == [2, 2, 2, 2]


def test_the_space_places_a_global_level_over_balanced_blocks() -> None:
    model = recurrent("LSTM", head=True)
    layers = [la for la in analyze(model).layers if la.name in ("w", "r")]
    units = []
    for layer in layers:
        w = weight(model, layer.name)
        scores = unit_scores(Criterion.MAGNITUDE, layer, w)
        units.append(build_units(layer, w, scores, Granularity.ELEMENT, Allocation.GLOBAL, 0.95))
    space = ZeroSpace(units, Allocation.GLOBAL)
    config = space.at_level(0.5)
    assert abs(space.sparsity(config) - 0.5) < 0.01
    for layer, amount in zip(layers, config, strict=True):
        scores = unit_scores(Criterion.MAGNITUDE, layer, weight(model, layer.name))
        counts = lowest(scores, amount).reshape(4, -1).sum(axis=1)
        assert counts.max() - counts.min() <= 1


def test_nm_groups_run_along_the_input_axis() -> None:
    model = recurrent("LSTM")
    layer = next(la for la in analyze(model).layers if la.name == "w")
    w = weight(model, "w")
    mask = nm_mask(layer, unit_scores(Criterion.MAGNITUDE, layer, w), 2, 4)
    assert mask is not None
    groups = mask.reshape(1, 4 * HIDDEN, INPUT // 4, 4)
    assert np.all(groups.sum(axis=-1) == 2)


# --- pruning runs -----------------------------------------------------------------------------------


def classifier(op_type: str, n: int = 300) -> tuple[onnx.ModelProto, pruner.EvalSet]:
    """A recurrent classifier and an eval set labelled by its own predictions."""
    model = recurrent(op_type, head=True, directions=2 if op_type == "GRU" else 1)
    x = np.random.default_rng(7).standard_normal((n, SEQ, INPUT)).astype(np.float32)
    return model, pruner.EvalSet({"x": x}, run(model, x).argmax(-1).astype(np.int64))


def changed_only_in(original: onnx.ModelProto, pruned: onnx.ModelProto, names: set[str]) -> dict[str, np.ndarray]:
    """The zeroed mask of every weight in ``names``; every other initializer and the graph unchanged."""
    before = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert set(before) == set(after)
    assert [n.op_type for n in original.graph.node] == [n.op_type for n in pruned.graph.node]
    masks = {}
    for name, array in before.items():
        if name in names:
            kept = after[name] != 0
            np.testing.assert_array_equal(after[name][kept], array[kept])
            masks[name] = ~kept & (array != 0)
        else:
            np.testing.assert_array_equal(after[name], array)
    return masks


@pytest.mark.parametrize("op_type", sorted(RECURRENT_GATES))
def test_zero_mode_prunes_w_and_r_per_gate_block(op_type: str) -> None:
    model, data = classifier(op_type)
    options = PruneOptions(tolerance=Tolerance(0.05), allocation=Allocation.UNIFORM, recover=pruner.Recovery.NONE)
    result = pruner.prune(model, data, options)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report.status == "pruned"
    masks = changed_only_in(model, result.model, {"w", "r", "head"})
    assert masks["w"].any() and masks["r"].any()
    gates = RECURRENT_GATES[op_type]
    for name in ("w", "r"):
        per_block = masks[name].reshape(-1, gates, HIDDEN * masks[name].shape[-1]).sum(axis=-1)  # [dir, gate]
        assert per_block.max() - per_block.min() <= 1, (name, per_block)
    # the outputs move only through the zeroed weights: zeroing them by hand gives the same model
    by_hand = model
    for name, mask in masks.items():
        by_hand = with_weight(by_hand, name, np.where(mask, 0, weight(model, name)).astype(np.float32))
    x = data.inputs["x"][:16]
    np.testing.assert_array_equal(run(result.model, x), run(by_hand, x))
    layer_names = {la.name for la in result.report.layers}
    assert {"w", "r"} <= layer_names


@pytest.mark.parametrize("op_type", ["LSTM", "GRU"])
def test_nm_mode_keeps_two_of_every_four_along_the_input_axis(op_type: str) -> None:
    model, data = classifier(op_type)
    options = PruneOptions(tolerance=Tolerance(1.0), mode=Mode.NM, recover=pruner.Recovery.NONE)
    result = pruner.prune(model, data, options)
    onnx.checker.check_model(result.model, full_check=True)
    masks = changed_only_in(model, result.model, {"w", "r", "head"})
    for name in ("w", "r"):
        kept = weight(result.model, name) != 0
        groups = kept.reshape(*kept.shape[:-1], -1, 4).sum(axis=-1)
        assert np.all(groups == 2), name  # no weight was zero before: exactly 2 of 4 kept
        assert masks[name].sum() == weight(model, name).size // 2
    run(result.model, data.inputs["x"][:4])


def test_a_plan_transferred_to_retrained_weights_scores_per_gate_block() -> None:
    model, data = classifier("LSTM")
    options = PruneOptions(tolerance=Tolerance(0.05), allocation=Allocation.UNIFORM, recover=pruner.Recovery.NONE)
    result = pruner.prune(model, data, options)
    retrained = recurrent("LSTM", head=True, seed=11)
    moved = pruner.transfer_plan(result.plan, retrained)
    layers = {la.tensor: la for la in result.plan.layers}
    for name in ("w", "r"):
        zeroed = weight(moved, name) == 0
        assert zeroed.sum() == layers[name].amount
        per_gate = zeroed.reshape(4, -1).sum(axis=1)
        assert per_gate.max() - per_gate.min() <= 1


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_a_pytorch_exported_lstm_and_gru_are_pruned_per_gate_block() -> None:
    """tools/make_recurrent_fixture.py: a bidirectional LSTM, a GRU and a Linear head, as the
    TorchScript exporter writes them (initial states computed from Shape, gates reordered)."""
    model = onnx.load(str(FIXTURES / "recurrent.onnx"))
    data = pruner.load_eval_set(FIXTURES / "recurrent_eval.npz")
    inspection = pruner.inspect(model)
    recurrent_layers = {la.name: la for la in inspection.layers if la.op_type in ("LSTM", "GRU")}
    assert len(recurrent_layers) == 4
    assert inspection.prunable_params / inspection.float_params > 0.9  # all but the biases
    options = PruneOptions(tolerance=Tolerance(0.02), allocation=Allocation.UNIFORM, recover=pruner.Recovery.NONE)
    result = pruner.prune(model, data, options)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report.status == "pruned"
    masks = changed_only_in(model, result.model, {*recurrent_layers, "head.weight"})
    for name, layer in recurrent_layers.items():
        assert masks[name].any(), name
        per_block = masks[name].reshape(layer.shape[0], layer.blocks, -1).sum(axis=-1)
        assert per_block.max() - per_block.min() <= 1, (name, per_block)
    by_hand = model
    for name, mask in masks.items():
        by_hand = with_weight(by_hand, name, np.where(mask, 0, weight(model, name)).astype(np.float32))
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = ort.InferenceSession(by_hand.SerializeToString(), providers=["CPUExecutionProvider"])
    x = {"input": data.inputs["input"][:32]}
    np.testing.assert_array_equal(session.run(None, x)[0], expected.run(None, x)[0])


# --- remove mode: hidden units ------------------------------------------------------------------------


def stacked(first: str, *, state: str = "none", layout: int = 0, seed: int = 0) -> onnx.ModelProto:
    """x [N, 5, 6] -> MatMul (8 features) -> ``first`` (hidden 6) -> Y -> GRU (hidden 5) -> Y_h
    -> MatMul -> y [N, 4]. ``state``: the first op's initial state: none, a constant, or zeros
    made by ConstantOfShape from the batch size (as exporters write it)."""
    rng = np.random.default_rng(seed)
    g1 = RECURRENT_GATES[first]

    def array(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    weights = {
        "wi": array(6, 8),
        "W1": array(1, g1 * 6, 8),
        "R1": array(1, g1 * 6, 6),
        "B1": array(1, 2 * g1 * 6),
        "W2": array(1, 15, 6),
        "R2": array(1, 15, 5),
        "B2": array(1, 30),
        "wo": array(5, 4),
    }
    if first == "LSTM":
        weights["P1"] = array(1, 18)
    nodes = [helper.make_node("MatMul", ["x", "wi"], ["p"])]
    if layout == 0:
        nodes.append(helper.make_node("Transpose", ["p"], ["p_t"], perm=[1, 0, 2]))
    first_in = "p_t" if layout == 0 else "p"
    inputs = [first_in, "W1", "R1", "B1", "", "", "", ""]
    if state == "constant":
        weights["h0"] = array(1, BATCH, 6) if layout == 0 else array(BATCH, 1, 6)
        inputs[5] = "h0"
        if first == "LSTM":
            weights["c0"] = array(1, BATCH, 6) if layout == 0 else array(BATCH, 1, 6)
            inputs[6] = "c0"
    elif state == "zeros":
        weights["batch_axis"] = np.array([0], np.int64)
        weights["one"] = np.array([1], np.int64)
        weights["units"] = np.array([6], np.int64)
        dims = ["one", "n", "units"] if layout == 0 else ["n", "one", "units"]
        nodes += [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Gather", ["shape", "batch_axis"], ["n"]),
            helper.make_node("Concat", dims, ["state_shape"], axis=0),
            helper.make_node(
                "ConstantOfShape", ["state_shape"], ["zeros"], value=numpy_helper.from_array(np.zeros(1, np.float32))
            ),
        ]
        inputs[5] = "zeros"
        if first == "LSTM":
            inputs[6] = "zeros"
    if first == "LSTM":
        inputs[7] = "P1"
    while inputs and not inputs[-1]:
        inputs.pop()
    squeeze_axis = 1 if layout == 0 else 2
    weights["axis_seq"] = np.array([squeeze_axis], np.int64)
    weights["axis_dir"] = np.array([0 if layout == 0 else 1], np.int64)
    nodes += [
        helper.make_node(first, inputs, ["seq"], hidden_size=6, layout=layout, name="first"),
        helper.make_node("Squeeze", ["seq", "axis_seq"], ["s"]),
        helper.make_node("GRU", ["s", "W2", "R2", "B2"], ["", "last"], hidden_size=5, layout=layout, name="second"),
        helper.make_node("Squeeze", ["last", "axis_dir"], ["f"]),
        helper.make_node("MatMul", ["f", "wo"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "stacked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SEQ, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(a, n) for n, a in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def run_any(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


@pytest.mark.parametrize("first", sorted(RECURRENT_GATES))
@pytest.mark.parametrize("state", ["none", "constant", "zeros"])
def test_removing_hidden_units_gives_what_zeroing_them_does(first: str, state: str) -> None:
    """(onnxruntime runs layout 0 only: batch-first recurrent ops are not supported.)"""
    model = stacked(first, state=state)
    structure = analyze_structure(model)
    families = {f.name: f for f in structure.families}
    assert {"wi", "W1", "W2"} <= set(families), structure.skipped
    assert len(families["W1"].components) == 6 and len(families["W2"].components) == 5
    gates = RECURRENT_GATES[first]
    # a unit's weights: its rows of every gate block of W, R, B (and P), its column of R
    per_unit = gates * 8 + gates * 6 + 6 * gates + 2 * gates + (3 if first == "LSTM" else 0)
    per_unit += 15  # its column of the GRU's W, which reads it
    if state == "constant":  # its entries of the initial states
        per_unit += BATCH * (2 if first == "LSTM" else 1)
    assert set(families["W1"].params_per_component.tolist()) == {per_unit}
    removed = [int(families["W1"].components[k]) for k in (1, 4)]
    removed += [int(families["W2"].components[2]), int(families["wi"].components[0])]
    x = np.random.default_rng(4).standard_normal((BATCH, SEQ, 6)).astype(np.float32)
    zeroed = zero_components(model, structure, removed)
    pruned = remove_components(model, structure, removed)
    onnx.checker.check_model(pruned, full_check=True)
    np.testing.assert_allclose(run_any(pruned, x), run_any(zeroed, x), rtol=1e-5, atol=1e-5)
    shapes = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    assert shapes["W1"] == (1, gates * 4, 7) and shapes["R1"] == (1, gates * 4, 4) and shapes["B1"] == (1, 8 * gates)
    assert shapes["W2"] == (1, 12, 4) and shapes["R2"] == (1, 12, 4)
    nodes = {n.name: n for n in pruned.graph.node}
    assert helper.get_attribute_value(next(a for a in nodes["first"].attribute if a.name == "hidden_size")) == 4
    if state == "zeros":
        assert len(nodes["first"].input) <= 5 or not nodes["first"].input[5]
    # a unit that still works is kept: the pruned model differs from the original
    assert not np.allclose(run_any(pruned, x), run_any(model, x))


def test_remove_mode_shrinks_the_exported_gru() -> None:
    """The exported GRU's hidden units are removable; the bidirectional LSTM's are not yet: the
    exporter merges its two directions with a Reshape, which no rule splits (named as the reason)."""
    model = onnx.load(str(FIXTURES / "recurrent.onnx"))
    structure = analyze_structure(model)
    gru = next(f for f in structure.families if f.name == "onnx::GRU_299")
    assert len(gru.components) == 16
    assert "only whole heads can shrink" in dict(structure.skipped)["onnx::LSTM_278"]
    data = pruner.load_eval_set(FIXTURES / "recurrent_eval.npz")
    options = PruneOptions(
        mode=Mode.REMOVE,
        target_sparsity=0.3,
        tolerance=Tolerance(1.0),
        recover=pruner.Recovery.NONE,
        channel_multiple=1,
    )
    result = pruner.prune(model, data, options)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report.status == "pruned"
    assert result.report.bytes_after < result.report.bytes_before
    assert not any("changed the outputs" in s.reason for s in result.report.skipped)
    shapes = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    hidden = shapes["onnx::GRU_300"][2]
    assert hidden < 16 and shapes["onnx::GRU_299"] == (1, 3 * hidden, 32) and shapes["head.weight"] == (10, hidden)
