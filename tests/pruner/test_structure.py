"""Channel rules: every op rule on a tiny graph, and whole architectures.

The guard against coupling bugs: zero the weights of the channels chosen for
removal (so they are zero, and contribute zero, everywhere downstream), then
remove them; onnxruntime must give the same outputs for both models.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import pruner
from pruner._static import static_reshapes
from pruner._structure import (
    CountFixup,
    Fixup,
    GroupFixup,
    SliceFixup,
    SplitFixup,
    Structure,
    analyze_structure,
    mask_norms,
    remove_components,
    zero_components,
)
from tests.helpers import parse
from tests.models import ARCHITECTURES, INPUT_SHAPES

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def weights_for(text: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights for the initializers a graph declares as ``float[...] name`` inputs of the body."""
    model = onnx.parser.parse_model(HEADER + text)
    rng = np.random.default_rng(seed)
    out = {}
    declared = {v.name: v for v in model.graph.input}
    for name, value in declared.items():
        if name == "x":
            continue
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        elem = value.type.tensor_type.elem_type
        if elem == onnx.TensorProto.INT64:
            raise AssertionError("give int64 constants inline")
        array = rng.standard_normal(dims).astype(np.float32)
        if name.startswith("var"):
            array = np.abs(array) + 0.5
        if name.startswith("div"):
            array = np.abs(array) + 0.5
        out[name] = array
    return out


def build(text: str, seed: int = 0) -> onnx.ModelProto:
    """The graph with its weight inputs turned into initializers."""
    weights = weights_for(text, seed)
    model = parse(HEADER + text, check=False)
    inputs = [v for v in model.graph.input if v.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    for name, array in weights.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    onnx.checker.check_model(model, full_check=True)
    return model


def check_removal(
    model: onnx.ModelProto,
    x: np.ndarray,
    share: float = 0.3,
    seed: int = 0,
    approximate: bool = False,
    more: tuple[np.ndarray, ...] = (),
) -> onnx.ModelProto:
    """Removes ``share`` of every family's channels; asserts the invariant (on ``x`` and every
    input in ``more``) and returns the pruned model. Computed Reshape targets are made
    constants first, as remove mode does.

    Approximate families (normalized channels) break the invariant by design: they are left
    alone, or with ``approximate`` removed too and the invariant not checked.
    """
    model, _ = static_reshapes(model)
    structure = analyze_structure(model)
    assert structure.families, structure.skipped
    rng = np.random.default_rng(seed)
    removed: list[int] = []
    for family in structure.families:
        if family.approximate and not approximate:
            continue
        count = max(1, int(share * len(family.components))) if len(family.components) > 1 else 0
        removed += [int(c) for c in rng.choice(family.components, count, replace=False)]
    assert removed
    zeroed = zero_components(model, structure, removed)
    pruned = remove_components(model, structure, removed)
    onnx.checker.check_model(pruned, full_check=True)
    assert [i.name for i in pruned.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in pruned.graph.output] == [o.name for o in model.graph.output]
    assert pruned.ByteSize() < model.ByteSize()
    for data in (x, *more):
        if approximate:
            assert np.isfinite(run(pruned, data)).all()
        else:
            np.testing.assert_allclose(run(pruned, data), run(zeroed, data), atol=1e-5, rtol=1e-5)
    return pruned


IMAGE = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
TOKENS = np.random.default_rng(6).standard_normal((2, 5, 6)).astype(np.float32)

# (id, graph body, input); weights are the float[...] inputs other than x
RULES = {
    "conv-relu-conv": """
g (float[N, 3, 8, 8] x, float[8, 3, 3, 3] w1, float[8] b1, float[4, 8, 1, 1] w2) => (float[N, 4, 8, 8] y) {
    h = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r = Relu (h)
    y = Conv (r, w2)
}""",
    "batchnorm": """
g (float[N, 3, 8, 8] x, float[8, 3, 3, 3] w1, float[8] sc, float[8] bi, float[8] mean, float[8] var,
   float[4, 8, 3, 3] w2) => (float[N, 4, 8, 8] y) {
    h = Conv <pads = [1, 1, 1, 1]> (x, w1)
    n = BatchNormalization (h, sc, bi, mean, var)
    r = Relu (n)
    y = Conv <pads = [1, 1, 1, 1]> (r, w2)
}""",
    "depthwise": """
g (float[N, 3, 8, 8] x, float[8, 3, 1, 1] w1, float[8, 1, 3, 3] dw, float[8] db, float[4, 8, 1, 1] w2)
  => (float[N, 4, 8, 8] y) {
    h = Conv (x, w1)
    d = Conv <group = 8, pads = [1, 1, 1, 1]> (h, dw, db)
    c = Clip (d)
    y = Conv (c, w2)
}""",
    "residual-add": """
g (float[N, 3, 8, 8] x, float[8, 3, 3, 3] w1, float[8, 8, 3, 3] w2, float[8, 3, 1, 1] ws, float[4, 8, 1, 1] w3)
  => (float[N, 4, 8, 8] y) {
    h = Conv <pads = [1, 1, 1, 1]> (x, w1)
    r = Relu (h)
    a = Conv <pads = [1, 1, 1, 1]> (r, w2)
    s = Conv (x, ws)
    t = Add (a, s)
    u = Relu (t)
    y = Conv (u, w3)
}""",
    "concat": """
g (float[N, 3, 8, 8] x, float[6, 3, 3, 3] w1, float[5, 3, 1, 1] w2, float[4, 11, 1, 1] w3) => (float[N, 4, 8, 8] y) {
    a = Conv <pads = [1, 1, 1, 1]> (x, w1)
    b = Conv (x, w2)
    c = Concat <axis = 1> (a, b)
    y = Conv (c, w3)
}""",
    "split": """
g (float[N, 3, 8, 8] x, float[8, 3, 3, 3] w1, float[4, 4, 1, 1] wa, float[4, 4, 1, 1] wb) => (float[N, 4, 8, 8] y) {
    h = Conv <pads = [1, 1, 1, 1]> (x, w1)
    sizes = Constant <value = int64[2] {4, 4}> ()
    a, b = Split <axis = 1> (h, sizes)
    ya = Conv (a, wa)
    yb = Conv (b, wb)
    y = Add (ya, yb)
}""",
    # two C2f-like blocks whose Splits share one sizes constant (as YOLOv8's exporter writes them)
    "shared-split-sizes": """
g (float[N, 3, 8, 8] x, float[8, 3, 3, 3] w1, float[8, 8, 1, 1] w2, float[4, 8, 1, 1] w3) => (float[N, 4, 8, 8] y) {
    h = Conv <pads = [1, 1, 1, 1]> (x, w1)
    sizes = Constant <value = int64[2] {4, 4}> ()
    a, b = Split <axis = 1> (h, sizes)
    c = Concat <axis = 1> (b, a)
    g = Conv (c, w2)
    d, e = Split <axis = 1> (g, sizes)
    f = Concat <axis = 1> (e, d)
    y = Conv (f, w3)
}""",
    "flatten-gemm": """
g (float[N, 3, 8, 8] x, float[6, 3, 3, 3] w1, float[10, 24] g1, float[10] gb, float[3, 10] g2) => (float[N, 3] y) {
    h = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (x, w1)
    p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (h)
    f = Flatten <axis = 1> (p)
    z = Gemm <transB = 1> (f, g1, gb)
    r = Relu (z)
    y = Gemm <transB = 1> (r, g2)
}""",
    "reshape-gemm": """
g (float[N, 3, 8, 8] x, float[6, 3, 3, 3] w1, float[24, 3] g1) => (float[N, 3] y) {
    h = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (x, w1)
    p = AveragePool <kernel_shape = [2, 2], strides = [2, 2]> (h)
    shape = Constant <value = int64[2] {-1, 24}> ()
    f = Reshape (p, shape)
    y = MatMul (f, g1)
}""",
    "per-channel-constants": """
g (float[N, 3, 8, 8] x, float[8, 3, 3, 3] w1, float[1, 8, 1, 1] m, float[8, 1, 1] a, float[1, 8, 1, 1] div,
   float[8, 1, 1] slope, float[4, 8, 1, 1] w2) => (float[N, 4, 8, 8] y) {
    h = Conv <pads = [1, 1, 1, 1]> (x, w1)
    s = Mul (h, m)
    t = Add (a, s)
    u = Div (t, div)
    v = PRelu (u, slope)
    y = Conv (v, w2)
}""",
    "pool-resize-pad": """
g (float[N, 3, 8, 8] x, float[8, 3, 3, 3] w1, float[4, 8, 3, 3] w2) => (float[N, 4, 8, 8] y) {
    h = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (x, w1)
    r = Sigmoid (h)
    scales = Constant <value = float[4] {1.0, 1.0, 2.0, 2.0}> ()
    u = Resize <mode = "nearest"> (r, , scales)
    pads = Constant <value = int64[8] {0, 0, 1, 1, 0, 0, 1, 1}> ()
    p = Pad (u, pads)
    y = Conv (p, w2)
}""",
    "resize-sizes": """
g (float[N, 3, 8, 8] x, float[6, 3, 3, 3] w1, float[4, 6, 1, 1] w2) => (float[N, 4, 16, 16] y) {
    h = Conv <pads = [1, 1, 1, 1]> (x, w1)
    sizes = Constant <value = int64[4] {2, 6, 16, 16}> ()
    u = Resize <mode = "nearest"> (h, , , sizes)
    y = Conv (u, w2)
}""",
    "slice-channels": """
g (float[N, 3, 8, 8] x, float[8, 3, 3, 3] w1, float[4, 5, 1, 1] w2, float[4, 3, 1, 1] w3) => (float[N, 4, 8, 8] y) {
    h = Conv <pads = [1, 1, 1, 1]> (x, w1)
    s0 = Constant <value = int64[1] {0}> ()
    e0 = Constant <value = int64[1] {5}> ()
    s1 = Constant <value = int64[1] {5}> ()
    e1 = Constant <value = int64[1] {100}> ()
    ax = Constant <value = int64[1] {1}> ()
    a = Slice (h, s0, e0, ax)
    b = Slice (h, s1, e1, ax)
    ya = Conv (a, w2)
    yb = Conv (b, w3)
    y = Add (ya, yb)
}""",
    "squeeze-excite": """
g (float[N, 3, 8, 8] x, float[8, 3, 3, 3] w1, float[2, 8, 1, 1] wr, float[8, 2, 1, 1] we, float[4, 8, 1, 1] w2)
  => (float[N, 4, 8, 8] y) {
    h = Conv <pads = [1, 1, 1, 1]> (x, w1)
    s = GlobalAveragePool (h)
    r = Conv (s, wr)
    a = Relu (r)
    e = Conv (a, we)
    g = HardSigmoid (e)
    m = Mul (h, g)
    y = Conv (m, w2)
}""",
    "instance-norm-convtranspose": """
g (float[N, 3, 8, 8] x, float[3, 6, 2, 2] wt, float[6] bt, float[6] sc, float[6] bi, float[4, 6, 1, 1] w2)
  => (float[N, 4, 16, 16] y) {
    t = ConvTranspose <strides = [2, 2]> (x, wt, bt)
    n = InstanceNormalization (t, sc, bi)
    y = Conv (n, w2)
}""",
    "gap-squeeze-gemm": """
g (float[N, 3, 8, 8] x, float[8, 3, 3, 3] w1, float[8, 3] m) => (float[N, 3] y) {
    h = Conv <pads = [1, 1, 1, 1]> (x, w1)
    p = GlobalMaxPool (h)
    axes = Constant <value = int64[2] {2, 3}> ()
    s = Squeeze (p, axes)
    y = MatMul (s, m)
}""",
    "transformer-mlp": """
g (float[N, 5, 6] x, float[6, 12] up, float[12] ub, float[12, 6] down) => (float[N, 5, 6] y) {
    h = MatMul (x, up)
    b = Add (ub, h)
    t = Transpose <perm = [0, 2, 1]> (b)
    k = Transpose <perm = [0, 2, 1]> (t)
    two = Constant <value = float {1.4142135}> ()
    d = Div (k, two)
    e = Erf (d)
    one = Constant <value = float {1.0}> ()
    f = Add (e, one)
    g = Mul (k, f)
    y = MatMul (g, down)
}""",
    "attention-query-key": """
g (float[N, 5, 6] x, float[6, 8] wq, float[6, 8] wk, float[6, 8] wv, float[8, 6] wo) => (float[N, 5, 6] y) {
    q = MatMul (x, wq)
    k = MatMul (x, wk)
    v = MatMul (x, wv)
    kt = Transpose <perm = [0, 2, 1]> (k)
    s = MatMul (q, kt)
    p = Softmax <axis = -1> (s)
    c = MatMul (p, v)
    y = MatMul (c, wo)
}""",
    "attention-heads": """
g (float[N, 5, 6] x, float[6, 8] wq, float[6, 8] wk, float[6, 8] wv, float[8, 6] wo) => (float[N, 5, 6] y) {
    split = Constant <value = int64[4] {0, 0, 4, 2}> ()
    merge = Constant <value = int64[3] {0, 0, 8}> ()
    q0 = MatMul (x, wq)
    k0 = MatMul (x, wk)
    v0 = MatMul (x, wv)
    q1 = Reshape (q0, split)
    k1 = Reshape (k0, split)
    v1 = Reshape (v0, split)
    q = Transpose <perm = [0, 2, 1, 3]> (q1)
    k = Transpose <perm = [0, 2, 3, 1]> (k1)
    v = Transpose <perm = [0, 2, 1, 3]> (v1)
    s = MatMul (q, k)
    p = Softmax <axis = -1> (s)
    c = MatMul (p, v)
    ct = Transpose <perm = [0, 2, 1, 3]> (c)
    m = Reshape (ct, merge)
    y = MatMul (m, wo)
}""",
    "gather-token": """
g (float[N, 5, 6] x, float[6, 8] w1, float[8, 3] w2) => (float[N, 3] y) {
    h = MatMul (x, w1)
    r = Relu (h)
    first = Constant <value = int64 {0}> ()
    t = Gather <axis = 1> (r, first)
    y = MatMul (t, w2)
}""",
    # x.view(x.size(0), -1) as exported: a computed target, made a constant first
    "view-flatten": """
g (float[N, 3, 8, 8] x, float[8, 3, 3, 3] w1, float[4, 512] w2) => (float[N, 4] y) {
    h = Conv <pads = [1, 1, 1, 1]> (x, w1)
    r = Relu (h)
    shape = Shape (r)
    zero = Constant <value = int64 {0}> ()
    n = Gather (shape, zero)
    axes = Constant <value = int64[1] {0}> ()
    n1 = Unsqueeze (n, axes)
    rest = Constant <value = int64[1] {-1}> ()
    target = Concat <axis = 0> (n1, rest)
    f = Reshape (r, target)
    y = Gemm <transB = 1> (f, w2)
}""",
    "regroup-rows": """
g (float[N, 5, 6] x, float[6, 8] w1, float[8, 3] w2) => (float[M, 3] y) {
    h = MatMul (x, w1)
    rows = Constant <value = int64[2] {-1, 8}> ()
    r = Reshape (h, rows)
    y = MatMul (r, w2)
}""",
}
INPUTS = {
    "transformer-mlp": TOKENS,
    "attention-query-key": TOKENS,
    "attention-heads": TOKENS,
    "gather-token": TOKENS,
    "regroup-rows": TOKENS,
}


@pytest.mark.parametrize("name", list(RULES))
def test_rule_removal_equals_zeroing(name: str) -> None:
    model = build(RULES[name])
    pruned = check_removal(model, INPUTS.get(name, IMAGE))
    assert pruned.graph.node


def test_depthwise_group_follows_the_channels() -> None:
    pruned = check_removal(build(RULES["depthwise"]), IMAGE, share=0.5)
    (depthwise,) = [n for n in pruned.graph.node if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    group = next(a.i for a in depthwise.attribute if a.name == "group")
    weight = next(t for t in pruned.graph.initializer if t.name == "dw")
    assert group == weight.dims[0] == 4


def test_split_sizes_and_head_counts_are_updated() -> None:
    pruned = check_removal(build(RULES["split"]), IMAGE, share=0.5)
    sizes = next(n for n in pruned.graph.node if n.op_type == "Split").input[1]
    assert constants(pruned)[sizes].sum() < 8
    heads = check_removal(build(RULES["attention-heads"]), TOKENS, share=0.5)
    reshapes = [n for n in heads.graph.node if n.op_type == "Reshape"]
    values = constants(heads)
    assert sorted(int(values[n.input[1]][2]) for n in reshapes) == [2, 2, 2, 4]  # 2 of 4 heads, width 4


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            out[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return out


def test_grouped_conv_and_unknown_ops_freeze_their_channels() -> None:
    model = build("""
g (float[N, 3, 8, 8] x, float[8, 3, 3, 3] w1, float[8, 4, 3, 3] wg, float[8, 3, 1, 1] w3, float[4, 8, 1, 1] w4)
  => (float[N, 4, 8, 8] y, float[N, 8, 8, 8] z) {
    h = Conv <pads = [1, 1, 1, 1]> (x, w1)
    g = Conv <group = 2, pads = [1, 1, 1, 1]> (h, wg)
    t = Conv (x, w3)
    z = LpNormalization <axis = 1> (t)
    y = Conv (g, w4)
}""")
    structure = analyze_structure(model)
    reasons = dict(structure.skipped)
    assert "grouped convolution" in reasons["w1"]
    assert "no channel rule for LpNormalization" in reasons["w3"]
    assert [f.name for f in structure.families] == []


def test_graph_outputs_are_never_shrunk() -> None:
    model = build(RULES["conv-relu-conv"])
    reasons = dict(analyze_structure(model).skipped)
    assert "graph output" in reasons["w2"]


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architectures_prune_30_percent_of_channels(name: str) -> None:
    model = ARCHITECTURES[name]()
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, *INPUT_SHAPES[name])).astype(np.float32)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    # a dynamic sequence length stays dynamic: check another one too
    other = (rng.standard_normal((3, 5, *INPUT_SHAPES[name][1:])).astype(np.float32),) if dims[1].dim_param else ()
    pruned = check_removal(model, x, share=0.3, more=other)
    assert pruned.ByteSize() < 0.9 * model.ByteSize()
    if any(f.approximate for f in analyze_structure(static_reshapes(model)[0]).families):
        smaller = check_removal(model, x, share=0.3, approximate=True, more=other)
        assert smaller.ByteSize() < pruned.ByteSize()


NORMALIZED_STREAM = {
    "layer-norm": """
g (float[N, 5, 6] x, float[6, 8] w1, float[8, 8] w2, float[8] s, float[8] b, float[8, 3] w3) => (float[N, 5, 3] y) {
    h = MatMul (x, w1)
    f = MatMul (h, w2)
    r = Add (h, f)
    n = LayerNormalization <axis = -1, epsilon = 0.001> (r, s, b)
    y = MatMul (n, w3)
}""",
    # as exported below opset 17: mean and variance by ReduceMean, over the channel axis
    "decomposed-layer-norm": """
g (float[N, 5, 6] x, float[6, 8] w1, float[8, 8] w2, float[8] s, float[8] b, float[8, 3] w3) => (float[N, 5, 3] y) {
    h = MatMul (x, w1)
    f = MatMul (h, w2)
    r = Add (h, f)
    m = ReduceMean <axes = [-1]> (r)
    c = Sub (r, m)
    two = Constant <value = float {2.0}> ()
    p = Pow (c, two)
    v = ReduceMean <axes = [-1]> (p)
    eps = Constant <value = float {0.001}> ()
    ve = Add (v, eps)
    sd = Sqrt (ve)
    z = Div (c, sd)
    sz = Mul (z, s)
    n = Add (sz, b)
    y = MatMul (n, w3)
}""",
}


@pytest.mark.parametrize("name", list(NORMALIZED_STREAM))
def test_normalized_channels_are_removed_approximately(name: str) -> None:
    """Removing channels of a normalized residual stream is the model without them: the norm's
    statistics are taken over the channels that are left (so zeroing them is not the same)."""
    model = build(NORMALIZED_STREAM[name])
    structure = analyze_structure(model)
    (stream,) = [f for f in structure.families if f.approximate]
    assert "normalizes" in stream.approximate or "averages" in stream.approximate  # type: ignore[operator]
    removed = [int(c) for c in stream.components[[1, 4, 6]]]
    pruned = remove_components(model, structure, removed)
    onnx.checker.check_model(pruned, full_check=True)
    w = weights_for(NORMALIZED_STREAM[name])
    kept = np.setdiff1d(np.arange(8), [1, 4, 6])
    h = TOKENS @ w["w1"][:, kept]
    r = h + h @ w["w2"][np.ix_(kept, kept)]
    z = (r - r.mean(-1, keepdims=True)) / np.sqrt(r.var(-1, keepdims=True) + 1e-3)
    expected = (z * w["s"][kept] + w["b"][kept]) @ w["w3"][kept]
    np.testing.assert_allclose(run(pruned, TOKENS), expected, atol=1e-4, rtol=1e-4)
    zeroed = zero_components(model, structure, removed)
    assert not np.allclose(run(zeroed, TOKENS), expected, atol=1e-3)
    check_masked(model, structure, removed, expected)


def check_masked(model: onnx.ModelProto, structure: Structure, removed: list[int], expected: np.ndarray) -> int:
    """With the norms masked to the kept channels, zeroing is removing again (what a refit fits
    on): the masked model is the model while every mask is one, and gives ``expected`` with the
    removed channels zeroed and masked out. Returns the number of masks."""
    masked, masks = mask_norms(model, structure)
    onnx.checker.check_model(masked, full_check=True)
    np.testing.assert_allclose(run(masked, TOKENS), run(model, TOKENS), atol=1e-5)
    zeroed = zero_components(masked, structure, removed)
    for tensor in zeroed.graph.initializer:
        if tensor.name in masks:
            keep = ~np.isin(structure.atoms(masks[tensor.name]), removed)
            tensor.CopyFrom(onnx.numpy_helper.from_array(keep.astype(np.float32), tensor.name))
    np.testing.assert_allclose(run(zeroed, TOKENS), expected, atol=1e-4, rtol=1e-4)
    return len(masks)


# as jax2tf writes a LayerNorm (magika): sums over the channels (keepdims 0) times 1 / C,
# E[x^2] - E[x]^2, broadcast back by Unsqueeze
SUMMED_NORM = """
g (float[N, 5, 6] x, float[6, 8] w1, float[8] s, float[8] b, float[8, 3] w3) => (float[N, 5, 3] y) {
    h = MatMul (x, w1)
    last = Constant <value = int64[1] {-1}> ()
    total = ReduceSum <keepdims = 0> (h, last)
    sq = Mul (h, h)
    total_sq = ReduceSum <keepdims = 0> (sq, last)
    inv = Constant <value = float {0.125}> ()
    m = Mul (total, inv)
    m2 = Mul (total_sq, inv)
    mm = Mul (m, m)
    v = Sub (m2, mm)
    eps = Constant <value = float {0.001}> ()
    ve = Add (v, eps)
    sd = Sqrt (ve)
    mu = Unsqueeze (m, last)
    sdu = Unsqueeze (sd, last)
    c = Sub (h, mu)
    z = Div (c, sdu)
    sz = Mul (z, s)
    n = Add (sz, b)
    y = MatMul (n, w3)
}"""


def test_a_norm_written_as_sums_is_removed_approximately() -> None:
    """A LayerNorm of channel sums (jax2tf's) makes its channels an approximate family: a removal
    sums over the channels left, its 1 / C constant unchanged; with the sums masked, zeroing the
    removed channels gives what removing them does."""
    model = build(SUMMED_NORM)
    structure = analyze_structure(model)
    (stream,) = structure.families
    assert stream.approximate is not None and "sums over these channels" in stream.approximate
    removed = [int(c) for c in stream.components[[1, 4, 6]]]
    pruned = remove_components(model, structure, removed)
    onnx.checker.check_model(pruned, full_check=True)
    w = weights_for(SUMMED_NORM)
    kept = np.setdiff1d(np.arange(8), [1, 4, 6])
    h = TOKENS @ w["w1"][:, kept]
    mean = h.sum(-1, keepdims=True) / 8
    var = (h * h).sum(-1, keepdims=True) / 8 - mean * mean
    expected = ((h - mean) / np.sqrt(var + 1e-3) * w["s"][kept] + w["b"][kept]) @ w["w3"][kept]
    np.testing.assert_allclose(run(pruned, TOKENS), expected, atol=1e-4, rtol=1e-4)
    assert check_masked(model, structure, removed, expected) == 2  # one per summed tensor: h and h * h


def test_resnet_coverage_is_every_conv_but_the_classifier() -> None:
    model = ARCHITECTURES["resnet18"]()
    structure = analyze_structure(model)
    covered = {name for family in structure.families for name, _ in family.param_slots}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert all(n.input[1] in covered for n in convs)


def test_default_channel_multiple_follows_the_objective() -> None:
    from pruner import Mode, Objective, PruneOptions
    from pruner._remove import channel_multiple, nchwc_block

    by_bytes = PruneOptions(mode=Mode.REMOVE)
    by_latency = PruneOptions(mode=Mode.REMOVE, objective=Objective.LATENCY)
    assert nchwc_block() in (8, 16)
    assert [channel_multiple(c, by_bytes) for c in (32, 24, 10)] == [8, 8, 1]
    # latency: the kernels' block where the count allows it (16 on AVX-512), else as for bytes
    assert channel_multiple(32, by_latency) == nchwc_block()
    assert [channel_multiple(c, by_latency) for c in (24, 10)] == [8, 1]
    assert channel_multiple(32, PruneOptions(mode=Mode.REMOVE, objective=Objective.LATENCY, channel_multiple=4)) == 4


def test_splits_sharing_their_sizes_get_their_own() -> None:
    """Different removals behind two Splits that read one sizes constant: each gets its own
    counts (with one shared tensor, the last written broke the other Split)."""
    model = build(RULES["shared-split-sizes"])
    structure = analyze_structure(model)
    halves = structure.families  # a family per Split output, named after its channels
    assert [(f.name, len(f.components)) for f in halves] == [
        ("w1[0:4]", 4),
        ("w1[4:8]", 4),
        ("w2[0:4]", 4),
        ("w2[4:8]", 4),
    ]
    removed = [int(c) for c in halves[0].components[:2]]  # two of h's first half: 2 + 4 after
    removed.append(int(halves[3].components[3]))  # one of g's second half: 4 + 3 after
    pruned = remove_components(model, structure, removed)
    onnx.checker.check_model(pruned, full_check=True)
    sizes = sorted(constants(pruned)[n.input[1]].tolist() for n in pruned.graph.node if n.op_type == "Split")
    assert sizes == [[2, 4], [4, 3]]
    np.testing.assert_allclose(
        run(pruned, IMAGE), run(zero_components(model, structure, removed), IMAGE), atol=1e-5, rtol=1e-5
    )


def test_a_plan_with_split_families_replays_to_the_same_model() -> None:
    """Each half of a Split is a family of the same weight: with one name for both, a plan's
    replay gave the second half's amount to the first (nudenet's YOLOv8n replayed wrongly)."""
    model = build(RULES["shared-split-sizes"])
    x = np.random.default_rng(11).standard_normal((64, 3, 8, 8)).astype(np.float32)
    evalset = pruner.EvalSet({"x": x}, None)
    options = pruner.PruneOptions(
        mode=pruner.Mode.REMOVE,
        metric=pruner.MetricKind.COSINE,
        recover=pruner.Recovery.NONE,
        channel_multiple=1,
        target_sparsity=0.4,
        tolerance=pruner.Tolerance(1.0),
    )
    result = pruner.prune(model, evalset, options)
    amounts = {layer.tensor: layer.amount for layer in result.plan.layers}
    assert sorted(amounts) == ["w1[0:4]", "w1[4:8]", "w2[0:4]", "w2[4:8]"]
    assert len(set(amounts.values())) > 1  # the halves go by different amounts
    replayed = pruner.apply_plan(result.plan, model)
    np.testing.assert_allclose(run(replayed, x), run(result.model, x), atol=1e-6)


def test_fixups_are_typed_by_what_they_fix() -> None:
    """Each attribute or constant naming a channel count is recorded as its own kind of fixup,
    with the fields the removal needs (no untyped detail tuple)."""

    def fixups(name: str) -> tuple[onnx.ModelProto, list[Fixup]]:
        model = build(RULES[name])
        return model, analyze_structure(model).fixups

    model, found = fixups("depthwise")
    (group,) = [f for f in found if isinstance(f, GroupFixup)]
    assert model.graph.node[group.node].op_type == "Conv"
    model, found = fixups("split")
    (split,) = [f for f in found if isinstance(f, SplitFixup)]
    assert len(split.slots) == len(model.graph.node[split.node].output)
    model, found = fixups("slice-channels")
    slices = [f for f in found if isinstance(f, SliceFixup)]
    assert slices
    for fix in slices:
        node = model.graph.node[fix.node]
        assert (fix.starts, fix.ends) == (node.input[1], node.input[2]) and fix.start >= 0
    model, found = fixups("attention-heads")
    counts = [f for f in found if isinstance(f, CountFixup)]
    assert counts
    for fix in counts:
        assert model.graph.node[fix.node].input[fix.input_index] == fix.constant
