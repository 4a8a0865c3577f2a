"""Recovery of every prunable op kind: the rows it unfolds reproduce the node's output, and a
refit after zeroing part of a weight brings the layer's output (by onnxruntime) closer to the
original than masking alone, while an unpruned weight refits to itself."""

from __future__ import annotations

import numpy as np
import pytest

from pruner._analysis import analyze
from pruner._recover import _layer_rows, layouts
from tests.pruner.test_ops import CASES, Case, declared, model_of, operands, run

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
