"""Embedding tables read by Gather: their declaration against onnxruntime, zero-mode runs, and
remove mode taking whole features out of a table and what reads them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import pruner
from pruner import Criterion, PruneOptions, Tolerance
from pruner._analysis import analyze
from pruner._ops import layout_of
from pruner._structure import analyze_structure
from tests.pruner.test_structure import check_removal

VOCAB, DIM, LENGTH = 12, 8, 6


def embedder(seed: int = 0) -> onnx.ModelProto:
    """ids [N, LENGTH] -> Gather (table [VOCAB, DIM]) -> ReduceMean over tokens -> MatMul -> y [N, 3]."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"], name="lookup"),
            helper.make_node("ReduceMean", ["e", "tokens"], ["m"], keepdims=0),
            helper.make_node("MatMul", ["m", "head"], ["y"]),
        ],
        "embedder",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", LENGTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [
            numpy_helper.from_array(rng.uniform(0.5, 1.5, (VOCAB, DIM)).astype(np.float32), "table"),
            numpy_helper.from_array(np.array([1], np.int64), "tokens"),
            numpy_helper.from_array(rng.standard_normal((DIM, 3)).astype(np.float32), "head"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


def lookup_only(table: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"])],
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", LENGTH])],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", LENGTH, DIM])],
        [numpy_helper.from_array(table, "table")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def run(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"ids": ids})[0])


def ids(n: int = 4, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (n, LENGTH)).astype(np.int64)


def test_the_declaration_features_are_output_channels_and_tokens_the_reduction() -> None:
    """Zeroing feature f of the table zeroes feature f of every looked-up vector; zeroing the
    row of token v zeroes exactly the vectors of token v (the one-hot product's reduction)."""
    table = np.random.default_rng(0).uniform(0.5, 1.5, (VOCAB, DIM)).astype(np.float32)
    model = lookup_only(table)
    layout = layout_of(model.graph.node[0])
    assert layout is not None
    (slot,) = layout.weights
    assert (slot.input, slot.out_axis, slot.in_axis, slot.output_axis, slot.unfold) == (0, -1, 0, -1, None)
    x = ids()
    full = run(model, x)
    for f in range(DIM):
        zeroed = table.copy()
        zeroed[:, f] = 0
        y = run(lookup_only(zeroed), x)
        assert np.all(y[..., f] == 0)
        np.testing.assert_array_equal(np.delete(y, f, axis=-1), np.delete(full, f, axis=-1))
    for v in range(VOCAB):
        zeroed = table.copy()
        zeroed[v] = 0
        y = run(lookup_only(zeroed), x)
        np.testing.assert_array_equal(y[x == v], 0)
        np.testing.assert_array_equal(y[x != v], full[x != v])


def test_a_gather_along_another_axis_declares_no_weight() -> None:
    layout = layout_of(helper.make_node("Gather", ["table", "ids"], ["e"], axis=1))
    assert layout is not None and layout.weights == ()


@pytest.mark.parametrize("criterion", [Criterion.MAGNITUDE, Criterion.L2])
def test_zero_mode_zeroes_an_embedding_table(criterion: Criterion) -> None:
    """Elements (magnitude) or whole features (l2, the table's columns) of the table are zeroed;
    the outputs move only through them."""
    model = embedder()
    (table,) = (la for la in analyze(model).layers if la.name == "table")
    assert (table.op_type, table.channel_axis, table.input_axis) == ("Gather", 1, 0)
    x = np.random.default_rng(3).integers(0, VOCAB, (300, LENGTH)).astype(np.int64)
    data = pruner.EvalSet({"ids": x}, run(model, x).argmax(-1).astype(np.int64))
    options = PruneOptions(tolerance=Tolerance(0.1), criterion=criterion, recover=pruner.Recovery.NONE)
    result = pruner.prune(model, data, options)
    onnx.checker.check_model(result.model, full_check=True)
    pruned = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    zeroed = pruned["table"] == 0
    assert zeroed.any()
    np.testing.assert_array_equal(pruned["table"][~zeroed], original["table"][~zeroed])
    if criterion is Criterion.L2:  # whole columns: every token loses the same features
        assert np.all(zeroed.all(axis=0) | ~zeroed.any(axis=0))
    by_hand = onnx.ModelProto()
    by_hand.CopyFrom(model)
    for t in by_hand.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(pruned[t.name], t.name))
    np.testing.assert_array_equal(run(result.model, x[:16]), run(by_hand, x[:16]))


def recurrent_embedder(seed: int = 0) -> onnx.ModelProto:
    """ids [N, LENGTH] -> Gather (table [VOCAB, DIM]) -> Transpose -> GRU (hidden 5) -> Y_h -> MatMul
    -> y [N, 3]: a table whose features only a recurrent layer's input columns read (a seq2seq
    encoder's). Half the table's features are faint (x 0.01): they can go."""
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal((VOCAB, DIM)) * 0.5).astype(np.float32)
    table[:, ::2] *= 0.01

    def array(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"], name="lookup"),
            helper.make_node("Transpose", ["e"], ["e_t"], perm=[1, 0, 2]),
            helper.make_node("GRU", ["e_t", "W", "R", "B"], ["", "last"], hidden_size=5, name="encoder"),
            helper.make_node("Squeeze", ["last", "direction"], ["h"]),
            helper.make_node("MatMul", ["h", "head"], ["y"]),
        ],
        "recurrent_embedder",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", LENGTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(array(1, 15, DIM), "W"),
            numpy_helper.from_array(array(1, 15, 5), "R"),
            numpy_helper.from_array(array(1, 30), "B"),
            numpy_helper.from_array(np.array([0], np.int64), "direction"),
            numpy_helper.from_array(array(5, 3), "head"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("make", [embedder, recurrent_embedder])
def test_a_tables_features_are_a_family_whose_removal_equals_zeroing(make: object) -> None:
    """The table's columns are a family of their own with what reads them (the MatMul's rows, the
    GRU's W columns); removing some gives, on every input, what zeroing them does."""
    assert callable(make)
    model = make()
    structure = analyze_structure(model)
    table = next(f for f in structure.families if f.name == "table")
    assert len(table.components) == DIM
    readers = {name for name, _ in table.param_slots}
    assert readers == ({"table", "head"} if make is embedder else {"table", "W"})
    pruned = check_removal(model, ids(16), share=0.4)
    shapes = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    kept = DIM - int(0.4 * DIM)
    assert shapes["table"] == (VOCAB, kept)
    assert shapes["head" if make is embedder else "W"][-1 if make is recurrent_embedder else 0] == kept


def test_a_constant_lookup_seeds_nothing() -> None:
    """A Gather whose indices are constants (shape arithmetic, a fixed token) is no embedding."""
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "fixed"], ["e"]),
            helper.make_node("MatMul", ["e", "head"], ["y"]),
        ],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [
            numpy_helper.from_array(np.ones((VOCAB, DIM), np.float32), "table"),
            numpy_helper.from_array(np.array([0, 3], np.int64), "fixed"),
            numpy_helper.from_array(np.ones((DIM, 3), np.float32), "head"),
        ],
    )
    structure = analyze_structure(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert all(f.name != "table" for f in structure.families)


def test_remove_mode_takes_features_out_of_a_table() -> None:
    """A remove-mode run shrinks the table and the GRU's input columns together; the result is a
    valid model with the original inputs and outputs, within the tolerance on held-out data."""
    model = recurrent_embedder()
    x = np.random.default_rng(3).integers(0, VOCAB, (400, LENGTH)).astype(np.int64)
    data = pruner.EvalSet({"ids": x}, None)
    options = PruneOptions(
        mode=pruner.Mode.REMOVE, metric=pruner.MetricKind.COSINE, tolerance=Tolerance(0.05), channel_multiple=1
    )
    result = pruner.prune(model, data, options)
    onnx.checker.check_model(result.model, full_check=True)
    shapes = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert shapes["table"][1] == shapes["W"][2] <= DIM // 2
    assert [i.name for i in result.model.graph.input] == ["ids"]
    assert run(result.model, x[:8]).shape == (8, 3)
