"""``to_sparse_initializers``: zeroed weights stored as COO ``sparse_initializer`` where that is smaller.

The models it makes pass the ONNX checker and run in onnxruntime with the same outputs; they do not
pass its strict shape inference (``full_check``), which ``prune`` requires of what it returns (see
the last test).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from pruner._sparse import INDEX_BYTES, to_sparse_initializers
from tests.helpers import parse, seeded

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g ({dtype}[N, 10] x) => ({dtype}[N, 10] y) {{
    h = MatMul (x, w1)
    r = Add (h, b)
    y = MatMul (r, w2)
}}
"""


def with_zeros(shape: tuple[int, ...], nonzero: int, seed: int, dtype: type = np.float32) -> np.ndarray:
    """Seeded nonzero values at ``nonzero`` seeded positions, zeros elsewhere."""
    flat = np.zeros(int(np.prod(shape)), dtype)
    positions = np.random.default_rng(seed).choice(flat.size, nonzero, replace=False)
    values = seeded((nonzero,), seed, dtype)
    values[values == 0] = 1  # every chosen position is nonzero
    flat[positions] = values
    return flat.reshape(shape)


def model_with(w1: np.ndarray, w2: np.ndarray, dtype: str = "float") -> onnx.ModelProto:
    return parse(TEXT.format(dtype=dtype), {"w1": w1, "b": seeded((10,), 9, w1.dtype), "w2": w2})


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {"x": x})[0]
    return out


def dense_of(sparse: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices)
    dense = np.zeros(int(np.prod(sparse.dims)), values.dtype)
    dense[indices] = values
    return dense.reshape(tuple(sparse.dims))


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def test_a_mostly_zero_weight_moves_to_sparse_initializer_and_the_model_computes_the_same() -> None:
    w1, w2 = with_zeros((10, 10), 10, seed=1), seeded((10, 10), 2)
    model = model_with(w1, w2)
    sparse = copy(model)
    assert to_sparse_initializers(sparse, ["w1"]) == ["w1"]
    assert [t.name for t in sparse.graph.initializer] == ["b", "w2"]  # the rest stay, in their order
    (stored,) = sparse.graph.sparse_initializer
    assert stored.values.name == "w1" and list(stored.dims) == [10, 10]
    # COO with linear indices: int64, ascending, one per nonzero value
    indices = numpy_helper.to_array(stored.indices)
    assert indices.dtype == np.int64 and indices.shape == (10,) and (np.diff(indices) > 0).all()
    np.testing.assert_array_equal(dense_of(stored), w1)
    onnx.checker.check_model(sparse)
    x = seeded((3, 10), 4)
    np.testing.assert_array_equal(run(sparse, x), run(model, x))
    assert sparse.ByteSize() < model.ByteSize()


def test_only_the_named_initializers_are_considered() -> None:
    w1, w2 = with_zeros((10, 10), 5, seed=1), with_zeros((10, 10), 5, seed=2)
    model = model_with(w1, w2)
    assert to_sparse_initializers(model, ["w2", "not-a-tensor"]) == ["w2"]
    assert [t.name for t in model.graph.initializer] == ["w1", "b"]
    assert [s.values.name for s in model.graph.sparse_initializer] == ["w2"]
    onnx.checker.check_model(model)


# float32: a nonzero costs 4 + 8 bytes stored sparse; a weight goes sparse below 90% of its dense size,
# so 100 float32s go with 29 nonzeros (348 < 360 bytes) and stay with 30 (360); float16 (2 + 8 bytes): 17 and 18
BOUNDARY = [(np.float32, "float", 29, True), (np.float32, "float", 30, False)]
BOUNDARY += [(np.float16, "float16", 17, True), (np.float16, "float16", 18, False)]


@pytest.mark.parametrize(("dtype", "onnx_type", "nonzero", "converted"), BOUNDARY)
def test_a_weight_goes_sparse_only_when_that_saves_a_tenth(
    dtype: type, onnx_type: str, nonzero: int, converted: bool
) -> None:
    w1 = with_zeros((10, 10), nonzero, seed=3, dtype=dtype)
    assert (nonzero * (w1.itemsize + INDEX_BYTES) < 0.9 * w1.nbytes) is converted  # the rule, spelled out
    model = model_with(w1, seeded((10, 10), 2, dtype), onnx_type)
    before = model.SerializeToString()
    assert to_sparse_initializers(model, ["w1"]) == (["w1"] if converted else [])
    if converted:
        (stored,) = model.graph.sparse_initializer
        np.testing.assert_array_equal(dense_of(stored), w1)
        assert numpy_helper.to_array(stored.values).dtype == dtype
        onnx.checker.check_model(model)
        x = seeded((2, 10), 5, dtype)
        np.testing.assert_array_equal(run(model, x), run(onnx.ModelProto.FromString(before), x))
    else:
        assert model.SerializeToString() == before  # nothing converted: the model is untouched


def test_an_all_zero_weight_is_stored_with_no_values() -> None:
    model = model_with(np.zeros((10, 10), np.float32), seeded((10, 10), 2))
    assert to_sparse_initializers(model, ["w1"]) == ["w1"]
    (stored,) = model.graph.sparse_initializer
    assert list(stored.values.dims) == [0] and list(stored.indices.dims) == [0]
    onnx.checker.check_model(model)
    np.testing.assert_allclose(
        run(model, seeded((2, 10), 5)), np.tile(seeded((10,), 9) @ seeded((10, 10), 2), (2, 1)), rtol=1e-5
    )


def test_strict_shape_inference_rejects_a_sparse_weight_of_matmul() -> None:
    """Why ``prune(..., sparse_initializers=True)`` keeps its models dense: onnx types a sparse
    initializer as a sparse tensor, which MatMul (like Gemm and Conv) does not take. When this
    test fails, onnx accepts them and the option can take effect."""
    model = model_with(with_zeros((10, 10), 10, seed=1), seeded((10, 10), 2))
    assert to_sparse_initializers(model, ["w1"]) == ["w1"]
    with pytest.raises(onnx.shape_inference.InferenceError, match="MatMul"):
        onnx.checker.check_model(model, full_check=True)
