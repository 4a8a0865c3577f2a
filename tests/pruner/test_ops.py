"""The op declarations (``pruner/_ops.py``) against what onnxruntime computes, and the stages
that read them (analysis, channel rules, recovery, N:M) agreeing with them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pruner._analysis import PrunableWeight, analyze
from pruner._nm import reduction_axis
from pruner._ops import OPS, Unfold, WeightSlot, layout_of
from pruner._recover import layouts
from pruner._structure import RULES, analyze_structure, remove_components, zero_components


@dataclass(frozen=True)
class Case:
    """One node with one weight operand as an initializer and the other operand as the input."""

    name: str
    op_type: str
    weight_input: int
    weight_shape: tuple[int, ...]
    data_shape: tuple[int, ...]
    attrs: dict[str, int]


CASES = [
    Case("conv", "Conv", 1, (4, 3, 3, 3), (1, 3, 5, 5), {}),
    Case("conv1d", "Conv", 1, (4, 3, 3), (1, 3, 7), {}),
    Case("conv_transpose", "ConvTranspose", 1, (3, 4, 3, 3), (1, 3, 4, 4), {}),
    *(
        Case(
            f"gemm_b_transA{a}_transB{b}",
            "Gemm",
            1,
            (5, 3) if b else (3, 5),
            (3, 2) if a else (2, 3),
            {"transA": a, "transB": b},
        )
        for a in (0, 1)
        for b in (0, 1)
    ),
    *(
        Case(
            f"gemm_a_transA{a}_transB{b}",
            "Gemm",
            0,
            (3, 2) if a else (2, 3),
            (5, 3) if b else (3, 5),
            {"transA": a, "transB": b},
        )
        for a in (0, 1)
        for b in (0, 1)
    ),
    Case("matmul_b", "MatMul", 1, (3, 4), (2, 5, 3), {}),
    Case("matmul_b_3d", "MatMul", 1, (2, 3, 4), (2, 5, 3), {}),
    Case("matmul_a_3d", "MatMul", 0, (2, 4, 3), (2, 3, 5), {}),
]


def model_of(case: Case, weight: np.ndarray) -> onnx.ModelProto:
    inputs = ["", ""]
    inputs[case.weight_input] = "w"
    inputs[1 - case.weight_input] = "x"
    node = helper.make_node(case.op_type, inputs, ["y"], **case.attrs)
    graph = helper.make_graph(
        [node],
        case.name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(case.data_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["y"], {"x": x})[0])


def declared(case: Case, weight: np.ndarray) -> WeightSlot:
    node = model_of(case, weight).graph.node[0]
    layout = layout_of(node)
    assert layout is not None
    slot = layout.slot(case.weight_input)
    assert slot is not None
    return slot


def zeroed(array: np.ndarray, axis: int, k: int) -> np.ndarray:
    out = array.copy()
    np.moveaxis(out, axis, 0)[k] = 0
    return out


def operands(case: Case) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    weight = rng.uniform(0.5, 1.5, case.weight_shape).astype(np.float32)  # no zero: every output moves
    x = rng.uniform(0.5, 1.5, case.data_shape).astype(np.float32)
    return weight, x


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_zeroing_a_declared_output_channel_zeroes_exactly_that_output_slice(case: Case) -> None:
    weight, x = operands(case)
    slot = declared(case, weight)
    full = run(model_of(case, weight), x)
    for k in range(weight.shape[slot.out_axis]):
        y = run(model_of(case, zeroed(weight, slot.out_axis, k)), x)
        assert np.all(np.moveaxis(y, slot.output_axis, 0)[k] == 0)
        others = np.delete(np.moveaxis(y, slot.output_axis, 0), k, axis=0)
        np.testing.assert_allclose(others, np.delete(np.moveaxis(full, slot.output_axis, 0), k, axis=0), rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_declared_input_channel_is_the_data_slice_it_sums_over(case: Case) -> None:
    """Zeroing slice j of the weight along ``in_axis`` is zeroing slice j of the data along ``data_axis``."""
    weight, x = operands(case)
    slot = declared(case, weight)
    assert slot.data == 1 - case.weight_input
    for j in range(weight.shape[slot.in_axis]):
        without_weights = run(model_of(case, zeroed(weight, slot.in_axis, j)), x)
        without_data = run(model_of(case, weight), zeroed(x, slot.data_axis, j))
        np.testing.assert_allclose(without_weights, without_data, rtol=1e-5, atol=1e-6)


# recovery's rows for every case: tests/pruner/test_recover_ops.py


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_analysis_and_nm_read_the_declared_axes(case: Case) -> None:
    weight, _ = operands(case)
    slot = declared(case, weight)
    (layer,) = analyze(model_of(case, weight)).layers
    rank = len(case.weight_shape)
    assert layer.channel_axis == slot.out_axis % rank
    assert reduction_axis(layer) == slot.in_axis % rank


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_weight_known_by_shape_alone_gets_the_declared_reduction_axis(case: Case) -> None:
    """A plan's replay knows a weight's shape and output axis only: N:M must group it as the run did."""
    weight, _ = operands(case)
    slot = declared(case, weight)
    rank = len(case.weight_shape)
    shape_only = PrunableWeight("w", "", (), case.weight_shape, "float32", slot.out_axis % rank)
    if case.name == "matmul_a_3d":  # the one shape a 1-D ConvTranspose weight shares: see reduction_axis
        assert reduction_axis(shape_only) != slot.in_axis % rank
        return
    assert reduction_axis(shape_only) == slot.in_axis % rank


def test_every_declared_op_has_a_channel_rule() -> None:
    for op_type in OPS:
        assert op_type in RULES


def test_groups_come_from_the_group_attribute() -> None:
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=4)
    layout = layout_of(node)
    assert layout is not None and layout.groups == 4
    assert layout_of(helper.make_node("Conv", ["x", "w"], ["y"], domain="com.example")) is None
    assert layout_of(helper.make_node("Relu", ["x"], ["y"])) is None


# --- Gemm with transA: every stage reads the same axes ------------------------------------------


def gemm_after_transpose(trans_b: int) -> onnx.ModelProto:
    """x[N, 6] -> Gemm(w1) -> h[N, 4] -> Transpose -> t[4, N] -> Gemm(t, w2, transA=1) -> y[N, 3]."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((6, 4)).astype(np.float32)
    b1 = rng.standard_normal(4).astype(np.float32)
    w2 = rng.standard_normal((3, 4) if trans_b else (4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
            helper.make_node("Transpose", ["h"], ["t"], perm=[1, 0]),
            helper.make_node("Gemm", ["t", "w2"], ["y"], transA=1, transB=trans_b),
        ],
        "gemm_transA",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 3])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("trans_b", [0, 1])
def test_channels_pass_into_a_gemm_with_trans_a(trans_b: int) -> None:
    """The hidden channels of the first Gemm are the K axis of the second one's transposed A:
    removable, and removing them gives what zeroing them does."""
    model = gemm_after_transpose(trans_b)
    structure = analyze_structure(model)
    family = next(f for f in structure.families if f.name == "w1")
    assert ("w2", 1 if trans_b else 0) in family.param_slots
    assert not any("w1" == name for name, _ in structure.skipped)
    removed = [int(family.components[0]), int(family.components[2])]
    x = np.random.default_rng(2).standard_normal((5, 6)).astype(np.float32)
    smaller = remove_components(model, structure, removed)
    onnx.checker.check_model(smaller, full_check=True)
    np.testing.assert_allclose(
        run(smaller, x), run(zero_components(model, structure, removed), x), rtol=1e-5, atol=1e-5
    )
    shapes = {t.name: tuple(t.dims) for t in smaller.graph.initializer}
    assert shapes["w1"] == (6, 2) and shapes["w2"] == ((3, 2) if trans_b else (2, 3))


def test_recovery_handles_a_gemm_with_trans_a() -> None:
    model = gemm_after_transpose(0)
    found, skipped = layouts(model, list(analyze(model).layers))
    assert "w2" in found and "w2" not in skipped
    assert found["w2"].unfold is Unfold.TRANSPOSED and found["w2"].input == "t"
