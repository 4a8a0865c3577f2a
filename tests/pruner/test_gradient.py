"""The gradient criteria: torch autograd on the model converted by onnx2torch.

Most tests need the ``gradient`` extra (torch and onnx2torch) and are skipped without it;
CI installs it and runs this file on its own. The tests of a run without the extra need
neither: they block the imports in a subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import pruner
from pruner import Criterion, InvalidConfigError, MetricKind, Mode, PruneOptions
from pruner._analysis import analyze
from pruner._evalset import model_inputs
from pruner._evaluate import Batches, Evaluator
from pruner._metrics import Metric

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
HAVE_EXTRA = all(importlib.util.find_spec(m) is not None for m in ("torch", "onnx2torch"))
needs_extra = pytest.mark.skipif(not HAVE_EXTRA, reason="needs the gradient extra: pip install -e '.[gradient]'")

TINY = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 6] x) => (float[N, 4] y) {
    h = Gemm <transB = 1> (x, w1, b1)
    r = Tanh (h)
    y = MatMul (r, w2)
}
"""


def tiny(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    model = onnx.parser.parse_model(TINY)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(rng.standard_normal((5, 6)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b1"),
            numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "w2"),
        ]
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def evaluator(model: onnx.ModelProto, data: pruner.EvalSet, metric: MetricKind, output: str) -> Evaluator:
    batches = Batches(model_inputs(model), output, data, batch_size=16)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = next(iter(data.inputs))
    reference = session.run([output], {name: data.inputs[name]})[0]
    return Evaluator(batches, Metric(metric), reference)


def fixture(name: str) -> tuple[onnx.ModelProto, pruner.EvalSet]:
    model = onnx.load(FIXTURES / f"{name}.onnx")
    with np.load(FIXTURES / f"{name.removesuffix('_b1')}_eval.npz") as z:
        return model, pruner.EvalSet({"input": z["input"]}, z["labels"])


def cross_entropy(model: onnx.ModelProto, weights: dict[str, np.ndarray], x: np.ndarray, label: int) -> float:
    """The loss of one sample through onnxruntime, with ``weights`` in place of the initializers."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    for tensor in changed.graph.initializer:
        if tensor.name in weights:
            tensor.CopyFrom(numpy_helper.from_array(weights[tensor.name], tensor.name))
    session = ort.InferenceSession(changed.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"x": x})[0][0].astype(np.float64)
    return float(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[label])


@needs_extra
def test_taylor_scores_are_w_times_a_finite_difference_gradient() -> None:
    from pruner._gradient import gradient_scores

    model = tiny()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 6)).astype(np.float32)
    data = pruner.EvalSet({"x": x}, rng.integers(0, 4, 8))
    ev = evaluator(model, data, MetricKind.ACCURACY, "y")
    layers = analyze(model).layers
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    row = 3
    scores, notes = gradient_scores(model, layers, ev, np.array([row]), Criterion.GRADIENT)
    fisher, _ = gradient_scores(model, layers, ev, np.array([row]), Criterion.FISHER)
    assert "cross-entropy" in notes[0]
    label = int(data.labels[row])  # type: ignore[index]
    step = 1e-2
    for layer in layers:
        w = weights[layer.name]
        expected = np.empty(w.size)
        for j in range(w.size):
            plus, minus = w.copy().reshape(-1), w.copy().reshape(-1)
            plus[j] += step
            minus[j] -= step
            up = cross_entropy(model, {layer.name: plus.reshape(w.shape).astype(np.float32)}, x[row : row + 1], label)
            down = cross_entropy(
                model, {layer.name: minus.reshape(w.shape).astype(np.float32)}, x[row : row + 1], label
            )
            expected[j] = abs(w.reshape(-1)[j] * (up - down) / (2 * step))
        got = scores.scores[layer.name]
        np.testing.assert_allclose(got, expected, rtol=2e-2, atol=1e-4 * expected.max())
        # one sample: the squared variant is the square
        np.testing.assert_allclose(fisher.scores[layer.name], got.astype(np.float64) ** 2, rtol=1e-4, atol=1e-12)


@needs_extra
def test_label_free_fisher_of_a_linear_layer_is_squared_wanda() -> None:
    """y = x W: the probe gradient of w_ij is x_i v_j with v_j = +-s, so the Fisher score is
    s^2 w_ij^2 sum_n x_ni^2, the activation (Wanda) score squared times one constant."""
    from pruner._gradient import gradient_scores
    from pruner._recover import calibrate

    model = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\ng (float[N, 6] x) => (float[N, 3] y) { y = MatMul (x, w) }'
    )
    rng = np.random.default_rng(2)
    model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((6, 3)).astype(np.float32), "w"))
    data = pruner.EvalSet({"x": rng.standard_normal((40, 6)).astype(np.float32) * np.arange(1, 7, dtype=np.float32)})
    ev = evaluator(model, data, MetricKind.COSINE, "y")
    layers = analyze(model).layers
    rows = np.arange(40)
    fisher, notes = gradient_scores(model, layers, ev, rows, Criterion.FISHER)
    assert "deviation" in notes[0]
    calibration = calibrate(model, list(layers), data, rows, batch_size=16, fixed_batch=None, full=False)
    weight = numpy_helper.to_array(model.graph.initializer[0])
    wanda = calibration.activation_scores(layers[0], weight)
    assert wanda is not None
    ratio = fisher.scores["w"].astype(np.float64) / (wanda.astype(np.float64) ** 2 * len(rows))
    np.testing.assert_allclose(ratio, ratio.mean(), rtol=1e-3)


@needs_extra
@pytest.mark.parametrize(
    "name", ["mlp", "cnn", "cnn_bn", "attention", "mlp_b1", "compact", "encoder_exported", "torch_encoder_exported"]
)
def test_every_prunable_weight_of_the_fixtures_maps_to_its_torch_copy(name: str) -> None:
    from pruner._gradient import _constants_as_initializers, _weights, load_torch, map_weights

    _, onnx2torch = load_torch(Criterion.GRADIENT)
    model = onnx.load(FIXTURES / f"{name}.onnx")
    layers = analyze(model).layers
    wanted = _weights(model, layers)
    assert len(wanted) == len(layers)
    converted = onnx2torch.convert(_constants_as_initializers(model))
    where, unmapped = map_weights(converted, wanted)
    assert unmapped == {}
    assert set(where) == set(wanted)
    tensors = dict([*converted.named_parameters(), *converted.named_buffers()])
    for name_, uses in where.items():
        for torch_name, transposed in uses:
            value = tensors[torch_name].detach().numpy()
            np.testing.assert_array_equal(value.T if transposed else value, wanted[name_])
    if name == "mlp":  # Gemm weights become torch Linear parameters named after their node
        assert where["net.0.weight"] == [("net/net/0/Gemm.weight", False)]
    if name == "attention":  # MatMul weights stay buffers of onnx2torch's initializer container
        assert all(
            t.startswith("initializers.onnx_initializer_") for uses in where.values() for t, _ in uses if "/" not in t
        )


@needs_extra
def test_a_weight_whose_copy_is_ambiguous_is_scored_by_magnitude_with_a_note() -> None:
    from pruner._gradient import gradient_scores

    model = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "g (float[N, 4] x) => (float[N, 4] y) { h = MatMul (x, a)\n r = Relu (h)\n y = MatMul (r, b) }"
    )
    same = np.random.default_rng(3).standard_normal((4, 4)).astype(np.float32)
    model.graph.initializer.extend([numpy_helper.from_array(same, "a"), numpy_helper.from_array(same, "b")])
    data = pruner.EvalSet({"x": np.random.default_rng(4).standard_normal((20, 4)).astype(np.float32)})
    ev = evaluator(model, data, MetricKind.COSINE, "y")
    scores, notes = gradient_scores(model, analyze(model).layers, ev, np.arange(20), Criterion.GRADIENT)
    assert scores.scores == {}
    assert any(n.startswith("a: no gradient") and "scored by magnitude" in n for n in notes)
    layer = analyze(model).layers[0]
    got = pruner._score.unit_scores(Criterion.GRADIENT, layer, same, None, scores)
    np.testing.assert_array_equal(got, np.abs(same).reshape(-1))


@needs_extra
@pytest.mark.parametrize(
    ("name", "criterion", "mode"),
    [
        ("mlp", Criterion.GRADIENT, Mode.ZERO),
        ("cnn", Criterion.FISHER, Mode.ZERO),
        ("mlp_b1", Criterion.FISHER, Mode.NM),
    ],
)
def test_a_gradient_scored_prune_is_checker_valid(name: str, criterion: Criterion, mode: Mode) -> None:
    model, data = fixture(name)
    result = pruner.prune(
        model, data, PruneOptions(mode=mode, criterion=criterion, max_evaluations=6, calibration_samples=64)
    )
    onnx.checker.check_model(result.model, full_check=True)
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": data.inputs["input"][:1]})[0].shape[0] == 1
    assert any(n.startswith(f"criterion {criterion.value}:") and "64 samples" in n for n in result.report.notes)
    assert "gradients" in result.report.timings
    assert result.report.nonzero_after < result.report.nonzero_before
    schema = json.loads((ROOT / "protos" / "onnxpruner" / "v1" / "report.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(json.loads(result.report.to_json()))


def test_remove_mode_refuses_the_gradient_criteria() -> None:
    for criterion in (Criterion.GRADIENT, Criterion.FISHER):
        with pytest.raises(InvalidConfigError, match=f"criterion {criterion.value} scores single weights"):
            PruneOptions(mode=Mode.REMOVE, criterion=criterion)


BLOCKER = """
import importlib.abc, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx2torch"):
            raise ImportError(f"No module named {name!r} (blocked)")
        return None

sys.meta_path.insert(0, Blocker())
"""


def blocked(script: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = BLOCKER + textwrap.dedent(script)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_without_the_extra_a_gradient_run_names_the_extra() -> None:
    proc = blocked(
        f"""
        import numpy as np, onnx, pruner
        model = onnx.load({str(FIXTURES / "mlp.onnx")!r})
        with np.load({str(FIXTURES / "mlp_eval.npz")!r}) as z:
            data = pruner.EvalSet({{"input": z["input"]}}, z["labels"])
        import sys
        assert "torch" not in sys.modules
        try:
            pruner.prune(model, data, pruner.PruneOptions(criterion=pruner.Criterion.GRADIENT, max_evaluations=2))
        except pruner.InvalidConfigError as e:
            print("ERROR", e)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "ERROR criterion gradient needs torch and onnx2torch" in proc.stdout
    assert "pip install 'onnx-pruner[gradient]'" in proc.stdout


def test_without_the_extra_the_cli_exits_2_naming_the_extra(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    proc = blocked(
        f"""
        import sys
        from service.cli import main
        model, data = {str(FIXTURES / "mlp.onnx")!r}, {str(FIXTURES / "mlp_eval.npz")!r}
        args = ["prune", model, "--eval", data, "-o", {str(out)!r}, "--criterion", "fisher", "--max-evaluations", "2"]
        sys.exit(main(args))
        """
    )
    assert proc.returncode == 2, proc.stderr
    assert "onnx-pruner[gradient]" in proc.stderr
    assert not out.exists()


@needs_extra
def test_a_conv_weight_stored_as_a_constant_node_gets_gradient_scores() -> None:
    """PaddlePaddle exports weights as Constant nodes; onnx2torch's Conv converter reads initializers only."""
    from pruner._gradient import gradient_scores

    rng = np.random.default_rng(5)
    weight = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    model = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "g (float[N, 2, 6, 6] x) => (float[N, 3] y) { h = Conv <pads = [1, 1, 1, 1]> (x, w)\n"
        " p = GlobalMaxPool (h)\n y = Flatten (p) }"
    )
    constant = onnx.helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight, "w"))
    model.graph.node.insert(0, constant)
    onnx.checker.check_model(model, full_check=True)
    data = pruner.EvalSet({"x": rng.standard_normal((12, 2, 6, 6)).astype(np.float32)}, rng.integers(0, 3, 12))
    ev = evaluator(model, data, MetricKind.ACCURACY, "y")
    layers = analyze(model).layers
    assert [layer.name for layer in layers] == ["w"]
    scores, notes = gradient_scores(model, layers, ev, np.arange(12), Criterion.GRADIENT)
    assert scores.scores["w"].shape == (weight.size,)
    assert (scores.scores["w"] > 0).any()
    assert not any("no gradient" in n for n in notes)


def test_the_gradient_criteria_survive_the_round_trip_through_the_proto() -> None:
    from service import convert
    from service._gen.onnxpruner.v1 import pruner_pb2 as pb

    for criterion, value in ((Criterion.GRADIENT, pb.CRITERION_GRADIENT), (Criterion.FISHER, pb.CRITERION_FISHER)):
        options = PruneOptions(criterion=criterion, mode=Mode.NM)
        config = convert.options_to_proto(options)
        assert config.criterion == value
        assert convert.options_from_proto(config) == options
