"""Candidate models: the split, the hand-encoded weight fragments, fed vs built sessions."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pruner._evaluate import FedWeights, ModelBuilder, SplitModel, make_session, session_runner
from tests.helpers import parse, seeded, tiny_mlp

WITH_CONSTANT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8] x) => (float[N, 4] y) {
    w2 = Constant <value = float[8, 4] {%s}> ()
    h = MatMul (x, w1)
    r = Relu (h)
    y = MatMul (r, w2)
}
"""


def constant_model() -> onnx.ModelProto:
    values = ", ".join(f"{v:.3f}" for v in seeded((32,), 7))
    return parse(WITH_CONSTANT % values, {"w1": seeded((8, 8), 3)})


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5), (1, 1), (4, 2, 3, 3), (300, 7)])
def test_fragments_decode_to_the_same_tensor(dtype: type, shape: tuple[int, ...]) -> None:
    array = seeded(shape).astype(dtype)
    model = tiny_mlp()
    split = SplitModel.take(model, {"w1"})
    split.weights["w1"] = array
    split.data_types["w1"] = numpy_helper.from_array(array).data_type
    decoded = onnx.ModelProto.FromString(ModelBuilder(split).to_bytes(split.weights))
    (tensor,) = [t for t in decoded.graph.initializer if t.name == "w1"]
    assert tensor.data_type == split.data_types["w1"]
    out = numpy_helper.to_array(tensor)
    assert out.shape == shape
    np.testing.assert_array_equal(out.view(np.uint8), array.view(np.uint8))


def test_split_takes_initializers_and_constants_and_rebuilds_the_model() -> None:
    model = constant_model()
    reference = make_session(model.SerializeToString())
    split = SplitModel.take(onnx.ModelProto.FromString(model.SerializeToString()), {"w1", "w2"})
    assert set(split.weights) == {"w1", "w2"}
    assert not split.rest.graph.initializer
    assert all(n.op_type != "Constant" for n in split.rest.graph.node)
    rebuilt = ModelBuilder(split).to_bytes(split.weights)
    onnx.checker.check_model(rebuilt, full_check=True)
    x = seeded((5, 8), 1)
    expected = reference.run(["y"], {"x": x})[0]
    np.testing.assert_array_equal(session_runner(make_session(rebuilt), "y")({"x": x}), expected)
    fed = FedWeights(split, "y").runner(split.weights)
    np.testing.assert_allclose(fed({"x": x}), expected, rtol=1e-6, atol=1e-6)


def test_fed_weights_take_candidate_values() -> None:
    split = SplitModel.take(tiny_mlp(), {"w1", "w2"})
    fed = FedWeights(split, "y")
    zeroed = {name: np.zeros_like(w) for name, w in split.weights.items()}
    x = seeded((3, 8), 2)
    np.testing.assert_array_equal(fed.runner(zeroed)({"x": x}), np.zeros((3, 4), np.float32))
    assert np.abs(fed.runner(split.weights)({"x": x})).sum() > 0


def test_bfloat16_weights_cannot_be_fed() -> None:
    split = SplitModel.take(tiny_mlp(), {"w1"})
    split.data_types["w1"] = onnx.TensorProto.BFLOAT16
    assert not FedWeights.possible(split)


def test_the_squared_sum_is_the_float64_sum_whatever_the_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    from pruner import _evaluate

    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 5, 3)).astype(np.float32)
    b = rng.normal(size=(7, 5, 3)).astype(np.float32)
    exact = float(np.square(a.astype(np.float64) - b.astype(np.float64)).sum())
    energy = float(np.square(a.astype(np.float64)).sum())
    for elements in (1, 4, 17, 1 << 21):
        monkeypatch.setattr(_evaluate, "SQUARED_SUM_ELEMENTS", elements)
        assert _evaluate._squared_sum(a, b) == pytest.approx(exact, rel=1e-12)
        assert _evaluate._squared_sum(a, None) == pytest.approx(energy, rel=1e-12)
