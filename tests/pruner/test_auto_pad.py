"""Convs with auto_pad (SAME_UPPER, SAME_LOWER, VALID: TF "same" padding, as tf2onnx and
EfficientNet-Lite write it): recovery unfolds their inputs as onnxruntime pads them, fits them,
and remove and N:M modes keep them valid and equivalent."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import pruner
from pruner._analysis import analyze
from pruner._recover import _layer_rows, _positions, _unfold, layouts
from tests.pruner.test_ops import Case, model_of, operands, run
from tests.pruner.test_recover_ops import correlated, grouped_product, initializers, refit_errors
from tests.pruner.test_structure import check_removal

CASES = [
    Case("same_upper_s1_odd", "Conv", 1, (4, 3, 3, 3), (2, 3, 7, 7), {"auto_pad": "SAME_UPPER"}),
    Case("same_upper_s2_even", "Conv", 1, (4, 3, 3, 3), (2, 3, 8, 6), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    Case("same_upper_s2_odd", "Conv", 1, (4, 3, 3, 3), (2, 3, 7, 9), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    Case("same_upper_k4", "Conv", 1, (4, 3, 4, 2), (2, 3, 6, 5), {"auto_pad": "SAME_UPPER", "strides": [1, 2]}),
    Case("same_lower_s2_even", "Conv", 1, (4, 3, 3, 3), (2, 3, 8, 8), {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    Case("same_lower_k4", "Conv", 1, (4, 3, 4, 4), (2, 3, 7, 6), {"auto_pad": "SAME_LOWER", "strides": [2, 1]}),
    # (no dilated SAME case: onnxruntime refuses dilations with SAME_UPPER and SAME_LOWER)
    Case("valid_s2", "Conv", 1, (4, 3, 3, 3), (2, 3, 8, 7), {"auto_pad": "VALID", "strides": [2, 2]}),
    Case(
        "depthwise_same_upper_s2",
        "Conv",
        1,
        (6, 1, 5, 5),
        (2, 6, 10, 9),
        {"auto_pad": "SAME_UPPER", "strides": [2, 2], "group": 6},
    ),
    Case("depthwise_same_lower", "Conv", 1, (6, 1, 3, 3), (2, 6, 8, 8), {"auto_pad": "SAME_LOWER", "group": 6}),
    Case("conv1d_same_upper_s2", "Conv", 1, (4, 3, 4), (2, 3, 9), {"auto_pad": "SAME_UPPER", "strides": [2]}),
    Case("conv1d_same_lower", "Conv", 1, (4, 3, 4), (2, 3, 9), {"auto_pad": "SAME_LOWER"}),
    Case(
        "conv3d_same_upper",
        "Conv",
        1,
        (4, 2, 3, 2, 3),
        (2, 2, 5, 4, 5),
        {"auto_pad": "SAME_UPPER", "strides": [2, 1, 2]},
    ),
    Case(
        "transpose_same_upper_s2",
        "ConvTranspose",
        1,
        (3, 4, 3, 3),
        (2, 3, 4, 5),
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    ),
    Case(
        "transpose_same_lower_s2",
        "ConvTranspose",
        1,
        (3, 4, 4, 3),
        (2, 3, 4, 5),
        {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
    ),
    Case(
        "transpose_same_upper_grouped",
        "ConvTranspose",
        1,
        (4, 2, 3, 2),
        (2, 4, 3, 4),
        {"auto_pad": "SAME_UPPER", "strides": [3, 2], "output_padding": [1, 0], "group": 2},
    ),
    Case("transpose_valid", "ConvTranspose", 1, (3, 4, 3, 3), (2, 3, 4, 4), {"auto_pad": "VALID", "strides": [2, 1]}),
]


def expected_rows(case: Case, x: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recovery's rows times the weight rows, and the node's output by onnxruntime, as [positions, out]."""
    model = model_of(case, weight)
    found, skipped = layouts(model, list(analyze(model).layers))
    assert "w" in found, skipped
    layout = found["w"]
    rows = _layer_rows(layout, x, samples=1).astype(np.float64)
    outputs = grouped_product(rows, layout.rows(weight.astype(np.float64)), layout.groups)
    y = run(model, x)
    return outputs, np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_rows_of_an_auto_pad_conv_times_its_weight_are_its_output(case: Case) -> None:
    weight, x = operands(case)
    outputs, expected = expected_rows(case, x, weight)
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-5)


def test_the_pads_follow_the_size_of_each_input() -> None:
    """One layout serves inputs of any size: a strided SAME conv pads an odd and an even map differently."""
    case = CASES[1]  # SAME_UPPER, stride 2
    weight, _ = operands(case)
    rng = np.random.default_rng(1)
    for size in ((8, 6), (7, 9), (5, 4)):
        wide = Case(case.name, case.op_type, 1, case.weight_shape, (2, 3, *size), case.attrs)
        x = rng.uniform(0.5, 1.5, wide.data_shape).astype(np.float32)
        outputs, expected = expected_rows(wide, x, weight)
        np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["same_upper_s2_odd", "same_lower_k4", "depthwise_same_upper_s2"])
def test_a_subset_of_positions_is_the_same_rows_as_the_whole_map(name: str) -> None:
    """Large maps keep a subset of positions: those rows are the whole unfolding's at those positions."""
    case = next(c for c in CASES if c.name == name)
    weight, x = operands(case)
    model = model_of(case, weight)
    found, _ = layouts(model, list(analyze(model).layers))
    conv = found["w"].conv
    assert conv is not None
    full = _unfold(x, conv)
    total = len(full) // len(x)
    some = _unfold(x, conv, positions=5)
    picked = _positions(len(x), total, 5)
    np.testing.assert_array_equal(
        some, full.reshape(len(x), total, -1)[np.arange(len(x))[:, None], picked].reshape(len(some), -1)
    )


def auto_pad_cnn(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x [N, 4, 9, 9] -> Conv SAME_UPPER s2 -> Relu -> depthwise SAME_LOWER s2 -> Relu -> Conv VALID
    -> GlobalAveragePool -> Flatten -> Gemm: the three auto_pad values, strided, odd maps."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "dw", "db"], ["c2"], strides=[2, 2], group=12, auto_pad="SAME_LOWER"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], auto_pad="VALID"),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], transB=1),
    ]
    weights = {
        "w1": rng.standard_normal((12, 4, 3, 3)) * 0.4,
        "b1": rng.standard_normal(12) * 0.1,
        "dw": rng.standard_normal((12, 1, 3, 3)) * 0.5,
        "db": rng.standard_normal(12) * 0.1,
        "w3": rng.standard_normal((10, 12, 2, 2)) * 0.3,
        "b3": rng.standard_normal(10) * 0.1,
        "fc": rng.standard_normal((5, 10)),
        "fb": rng.standard_normal(5) * 0.1,
    }
    graph = helper.make_graph(
        nodes,
        "auto_pad_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 5])],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model, {"x": correlated((192, 4, 9, 9), 4, rng)}


@pytest.mark.parametrize("name", ["w1", "dw", "w3"])
def test_each_auto_pad_conv_is_refit_closer_to_the_original_than_masking(name: str) -> None:
    model, feeds = auto_pad_cnn()
    refit, masked, same = refit_errors(model, feeds, name)
    assert refit < 0.9 * masked
    np.testing.assert_allclose(same, initializers(model)[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recover", [pruner.Recovery.LSQ, pruner.Recovery.SEQUENTIAL])
def test_an_auto_pad_cnn_is_recovered_end_to_end(recover: pruner.Recovery) -> None:
    """At 50% sparsity every conv is fit (no note names auto_pad) and the output is closer to the
    original's than with no recovery; the activation criterion scores them too."""
    model, feeds = auto_pad_cnn()
    data = pruner.EvalSet(feeds)
    reference = run(model, feeds["x"])
    errors = {}
    for method in (pruner.Recovery.NONE, recover):
        options = pruner.PruneOptions(
            metric=pruner.MetricKind.AGREEMENT, tolerance=pruner.Tolerance(1.0), target_sparsity=0.5, recover=method
        )
        result = pruner.prune(model, data, options)
        onnx.checker.check_model(result.model, full_check=True)
        errors[method] = float(np.mean((run(result.model, feeds["x"]) - reference) ** 2))
        if method is recover:
            assert not [n for n in result.report.notes if "auto_pad" in n or "no calibration" in n], result.report.notes
    assert errors[recover] < 0.8 * errors[pruner.Recovery.NONE]
    options = pruner.PruneOptions(
        metric=pruner.MetricKind.AGREEMENT,
        tolerance=pruner.Tolerance(1.0),
        target_sparsity=0.5,
        criterion=pruner.Criterion.ACTIVATION,
    )
    report = pruner.prune(model, data, options).report
    assert not [n for n in report.notes if "auto_pad" in n or "no calibration" in n], report.notes


def test_removing_channels_of_auto_pad_convs_equals_zeroing_them() -> None:
    model, feeds = auto_pad_cnn()
    pruned = check_removal(model, feeds["x"][:4], share=0.4)
    depthwise = next(n for n in pruned.graph.node if n.input[1:2] == ["dw"])
    attrs = {a.name: helper.get_attribute_value(a) for a in depthwise.attribute}
    assert attrs["auto_pad"] == b"SAME_LOWER"
    assert attrs["group"] == next(t.dims[0] for t in pruned.graph.initializer if t.name == "dw") < 12


@pytest.mark.parametrize("mode", [pruner.Mode.REMOVE, pruner.Mode.NM])
def test_remove_and_nm_modes_prune_an_auto_pad_cnn(mode: pruner.Mode) -> None:
    model, feeds = auto_pad_cnn()
    options = pruner.PruneOptions(
        mode=mode, metric=pruner.MetricKind.AGREEMENT, tolerance=pruner.Tolerance(1.0), target_sparsity=0.3
    )
    result = pruner.prune(model, pruner.EvalSet(feeds), options)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.model.ByteSize() < model.ByteSize() if mode is pruner.Mode.REMOVE else True
    y = run(result.model, feeds["x"])
    assert y.shape == (192, 5) and np.isfinite(y).all()
    assert not [n for n in result.report.notes if "auto_pad" in n], result.report.notes
