"""Computed Reshape targets made constants: same outputs at every size, channels unfrozen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import pruner
from pruner._analysis import analyze
from pruner._recover import layouts
from pruner._remove import Remover, removal_problems, replay_removal
from pruner._static import fold_layouts, static_reshapes
from pruner._structure import analyze_structure
from tests.helpers import parse, seeded
from tests.models import bert_exported
from tests.pruner.test_structure import check_removal

# x.view(x.size()[:-1] + (2, 3)) and back, over a dynamic batch and sequence length
HEAD_SPLIT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, L, 4] x) => (float[N, L, 4] y) {
    h = MatMul (x, w1)
    shape = Shape (h)
    zero = Constant <value = int64 {0}> ()
    one = Constant <value = int64 {1}> ()
    axes = Constant <value = int64[1] {0}> ()
    n = Gather (shape, zero)
    l = Gather (shape, one)
    n1 = Unsqueeze (n, axes)
    l1 = Unsqueeze (l, axes)
    heads = Constant <value = int64[2] {2, 3}> ()
    target = Concat <axis = 0> (n1, l1, heads)
    split = Reshape (h, target)
    width = Constant <value = int64[1] {6}> ()
    back = Concat <axis = 0> (n1, l1, width)
    merged = Reshape (split, back)
    y = MatMul (merged, w2)
}
"""


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x" if model.graph.input[0].name == "x" else "input": x})[0])


def test_computed_targets_become_constants_that_keep_every_size() -> None:
    model = parse(HEAD_SPLIT, {"w1": seeded((4, 6)), "w2": seeded((6, 4), 1)})
    static, count = static_reshapes(model)
    assert count == 2
    onnx.checker.check_model(static, full_check=True)
    assert not [n for n in static.graph.node if n.op_type in ("Shape", "Gather", "Concat")]  # dead arithmetic gone
    targets = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in static.graph.initializer}
    assert sorted(v for k, v in targets.items() if k.endswith("__static_shape")) == [[0, 0, 2, 3], [0, 0, 6]]
    for shape in [(2, 5, 4), (1, 1, 4), (7, 3, 4)]:
        x = seeded(shape, 2)
        np.testing.assert_allclose(run(static, x), run(model, x), atol=1e-6)
    assert static_reshapes(static) == (static, 0)  # nothing left to do


def test_targets_that_swap_dynamic_dims_are_left_alone() -> None:
    """[N, L, 4] -> [L, N, 4] with a computed target: two dims follow different inputs."""
    text = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, L, 4] x) => (float[L, N, 4] y) {
    shape = Shape (x)
    first = Constant <value = int64[1] {0}> ()
    second = Constant <value = int64[1] {1}> ()
    n = Slice (shape, first, second)
    three = Constant <value = int64[1] {3}> ()
    rest = Slice (shape, second, three)
    target = Concat <axis = 0> (rest, n)
    y = Reshape (x, target)
}
"""
    model = parse(text)
    assert static_reshapes(model) == (model, 0)


def test_exported_encoder_is_removable_everywhere() -> None:
    model = bert_exported()
    before = analyze_structure(model)
    assert any("no channel rule for Shape" in why for _, why in before.skipped)
    static, count = static_reshapes(model)
    assert count == 8
    after = analyze_structure(static)
    assert [why for _, why in after.skipped] == ["'gemm418' is a graph output"]
    assert len(after.families) == 5  # the stream, two layers' heads and MLP neurons
    x = seeded((3, 5, 16), 3)
    np.testing.assert_allclose(run(static, x), run(model, x), atol=1e-5)


def test_a_removal_plan_replays_on_the_exported_model() -> None:
    """Replaying (apply_plan) rewrites the targets the same way, so the plan's families exist."""
    model = bert_exported()
    options = pruner.PruneOptions(mode=pruner.Mode.REMOVE, recover=pruner.Recovery.NONE)
    remover = Remover(model, options)
    config = remover.space.at_level(0.4)
    amounts = {f.name: a for f, a in zip(remover.families, config, strict=True)}
    assert any(amounts.values())
    triples = [(f.name, a, len(f.components)) for f, a in zip(remover.families, config, strict=True)]
    assert removal_problems(model, triples) == []
    replayed = replay_removal(model, pruner.Criterion.MAGNITUDE, amounts)
    x = seeded((2, 6, 16), 4)
    np.testing.assert_allclose(run(replayed, x), run(remover.to_proto(config), x), atol=1e-6)


def test_targets_that_depend_on_input_values_are_left_alone() -> None:
    text = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 6] x, int64[1] k) => (float[M, K] y) {
    rows = Constant <value = int64[1] {-1}> ()
    target = Concat <axis = 0> (rows, k)
    y = Reshape (x, target)
}
"""
    model = parse(text)
    assert static_reshapes(model) == (model, 0)


def test_pytorch_transformer_encoder_export() -> None:
    """nn.TransformerEncoder as exported: the stream and MLP neurons go, its packed heads stay (with why)."""
    model = onnx.load(str(Path(__file__).resolve().parents[1] / "fixtures" / "torch_encoder_exported.onnx"))
    static, count = static_reshapes(model)
    assert count == 18
    structure = analyze_structure(static)
    assert sorted((len(f.components), bool(f.approximate)) for f in structure.families) == [
        (32, True),
        (64, False),
        (64, False),
    ]
    reasons = [why for _, why in structure.skipped]
    assert sum("selects along the channel axis" in why for why in reasons) == 2  # packed Q/K/V
    x, other = seeded((2, 8, 8), 5), seeded((5, 8, 8), 6)
    check_removal(model, x, share=0.3, more=(other,))
    check_removal(model, x, share=0.3, approximate=True, more=(other,))


# a squeeze-and-excitation block as paddle2onnx writes it: every bias Reshaped to [1, C, 1, 1]
SE_BLOCK = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 3, 8, 8] x) => (float[N, 4] y) {
    shape = Constant <value = int64[4] {1, -1, 1, 1}> ()
    h = Conv <pads = [1, 1, 1, 1]> (x, w1)
    bias1 = Reshape (b1, shape)
    a = Add (h, bias1)
    r = Relu (a)
    pooled = GlobalAveragePool (r)
    s1 = Conv (pooled, se1)
    se_bias = Reshape (sb1, shape)
    s2 = Add (s1, se_bias)
    s3 = Relu (s2)
    s4 = Conv (s3, se2)
    gate = HardSigmoid (s4)
    scaled = Mul (r, gate)
    p = GlobalAveragePool (scaled)
    axes = Constant <value = int64[2] {2, 3}> ()
    flat = Squeeze (p, axes)
    y = Gemm <transB = 1> (flat, fc)
}
"""


def se_block() -> onnx.ModelProto:
    return parse(
        SE_BLOCK,
        {
            "w1": seeded((16, 3, 3, 3)),
            "b1": seeded((16,), 1),
            "se1": seeded((4, 16, 1, 1), 2),
            "sb1": seeded((4,), 3),
            "se2": seeded((16, 4, 1, 1), 4),
            "fc": seeded((4, 16), 5),
        },
    )


def test_layouts_of_constants_are_folded_so_their_channels_can_go() -> None:
    """Without the fold, the Reshaped biases freeze both the conv's and the squeeze's channels."""
    model = se_block()
    assert not analyze_structure(model).families
    folded = fold_layouts(model)
    assert {n.op_type for n in folded.graph.node} >= {"Squeeze"}  # a computed tensor's layout stays
    assert "Reshape" not in {n.op_type for n in folded.graph.node}
    assert {"bias1", "se_bias"} <= {t.name for t in folded.graph.initializer}
    assert not {"b1", "sb1", "shape"} & {t.name for t in folded.graph.initializer}  # nothing else reads them
    x = seeded((2, 3, 8, 8), 6)
    np.testing.assert_allclose(run(folded, x), run(model, x), atol=1e-6)
    assert sorted(len(f.components) for f in analyze_structure(folded).families) == [4, 16]
    check_removal(model, x)  # removal (which folds first) keeps the invariant
    assert fold_layouts(folded) is folded  # nothing left to fold: the same model


def test_remove_mode_prunes_a_block_with_reshaped_biases() -> None:
    model = se_block()
    x = seeded((64, 3, 8, 8), 7)
    evalset = pruner.EvalSet({"x": x}, run(model, x).argmax(axis=1))
    options = pruner.PruneOptions(mode=pruner.Mode.REMOVE, target_sparsity=0.5, tolerance=pruner.Tolerance(1.0))
    report = pruner.prune(model, evalset, options).report
    assert [s["name"] for s in report.to_dict()["skipped"]] == ["fc"]  # its outputs are the model's
    assert report.bytes_after < report.bytes_before


def test_zero_mode_corrects_the_reshaped_biases_of_convs() -> None:
    """A conv without a bias input, then Add(Reshape(b, [1, C, 1, 1])): once folded, the Add's
    constant is the conv's bias, and bias correction moves it in the written model."""
    model = se_block()
    folded = fold_layouts(model)
    found, _ = layouts(folded, list(analyze(folded).layers))
    assert {name: layout.bias for name, layout in found.items()} == {
        "w1": "bias1",
        "se1": "se_bias",
        "se2": None,  # HardSigmoid reads it
        "fc": None,
    }
    x = seeded((64, 3, 8, 8), 7)
    evalset = pruner.EvalSet({"x": x}, run(model, x).argmax(axis=1))
    options = pruner.PruneOptions(recover=pruner.Recovery.BIAS, target_sparsity=0.5, tolerance=pruner.Tolerance(1.0))
    pruned = pruner.prune(model, evalset, options).model
    onnx.checker.check_model(pruned, full_check=True)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    before = {t.name: onnx.numpy_helper.to_array(t) for t in folded.graph.initializer}
    for bias in ("bias1", "se_bias"):
        assert values[bias].shape == before[bias].shape
        assert not np.allclose(values[bias], before[bias])  # shifted


def test_a_layout_of_constants_that_is_a_model_output_stays() -> None:
    text = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 2] x) => (float[N, 2] y, float[1, 2] c) {
    shape = Constant <value = int64[2] {1, 2}> ()
    c = Reshape (b, shape)
    y = Add (x, c)
}
"""
    model = parse(text, {"b": seeded((2,))})
    assert fold_layouts(model) is model


def strided_heads(stride: int) -> onnx.ModelProto:
    """An image's width downsampled by ``stride`` into a sequence, whose length a computed
    Reshape target copies (x.view(n, x.size(1), heads, d)), as PaddleOCR's recognizer does."""
    text = f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4, 2, W] x) => (float[N, L, 4] y) {{
    pooled = MaxPool <kernel_shape = [2, 1], strides = [2, {stride}]> (x)
    axis = Constant <value = int64[1] {{2}}> ()
    squeezed = Squeeze (pooled, axis)
    seq = Transpose <perm = [0, 2, 1]> (squeezed)
    h = MatMul (seq, w1)
    shape = Shape (h)
    one = Constant <value = int64[1] {{1}}> ()
    two = Constant <value = int64[1] {{2}}> ()
    length = Slice (shape, one, two)
    zero = Constant <value = int64[1] {{0}}> ()
    heads = Constant <value = int64[2] {{2, 3}}> ()
    target = Concat <axis = 0> (zero, length, heads)
    split = Reshape (h, target)
    back = Constant <value = int64[3] {{0, 0, 6}}> ()
    merged = Reshape (split, back)
    y = MatMul (merged, w2)
}}
"""
    return parse(text, {"w1": seeded((4, 6), 1), "w2": seeded((6, 4), 2)})


def test_a_length_downsampled_from_an_image_side_is_copied_not_fixed() -> None:
    """At widths 2 and 3 the stride-8 sequence is one long in every run: only the wide runs show
    that the target's second dim is the input's."""
    model = strided_heads(8)
    static, count = static_reshapes(model)
    assert count == 1
    targets = [onnx.numpy_helper.to_array(t).tolist() for t in static.graph.initializer if "__static" in t.name]
    assert targets == [[0, 0, 2, 3]]
    x = seeded((3, 4, 2, 320), 3)  # 40 positions
    np.testing.assert_allclose(run(static, x), run(model, x), atol=1e-6)


def test_constant_targets_that_do_not_fit_the_eval_set_are_left_as_they_were() -> None:
    """A stride of 128 keeps the sequence one long at every size tried, but the eval set's
    320-wide inputs make it 3: the search runs on the model as it was, the plan says so and
    replays to the same model."""
    model = strided_heads(128)
    assert static_reshapes(model)[1] == 1  # the probes believe the length is constant
    x = seeded((64, 4, 2, 320), 4)
    evalset = pruner.EvalSet({"x": x}, None)
    options = pruner.PruneOptions(
        mode=pruner.Mode.REMOVE,
        metric=pruner.MetricKind.COSINE,
        recover=pruner.Recovery.NONE,
        target_sparsity=0.3,
        tolerance=pruner.Tolerance(1.0),
    )
    result = pruner.prune(model, evalset, options)
    assert any("left as they are: as constants the model did not run on the eval set" in n for n in result.report.notes)
    assert not result.plan.static_reshapes
    assert pruner.PruningPlan.from_json(result.plan.to_json()).static_reshapes is False
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)
    assert run(pruned, x).shape == (64, 3, 4)
    replayed = pruner.apply_plan(result.plan, model)
    np.testing.assert_array_equal(run(replayed, x), run(pruned, x))


def test_models_of_ir_version_3_are_not_folded() -> None:
    """Before IR version 4 every initializer is also a graph input: a folded result is not one."""
    model = se_block()
    model.ir_version = 3
    assert fold_layouts(model) is model
