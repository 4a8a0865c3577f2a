"""pruner.inspect: which weights are prunable, along which axis, and why others are skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import pruner
from pruner import Inspection, PrunableWeight, SkippedWeight
from pruner._analysis import FLOAT_DTYPES
from tests.helpers import parse, seeded, tiny_mlp

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def inspect(body: str, weights: dict[str, np.ndarray], **kwargs: tuple[str, ...]) -> Inspection:
    return pruner.inspect(parse(HEADER + body, weights), **kwargs)


def only_layer(inspection: Inspection) -> PrunableWeight:
    assert inspection.skipped == ()
    assert len(inspection.layers) == 1
    return inspection.layers[0]


def only_skipped(inspection: Inspection) -> SkippedWeight:
    assert inspection.layers == ()
    assert len(inspection.skipped) == 1
    return inspection.skipped[0]


# --- weights found, and their output-channel axis -----------------------------------------------


def test_conv_weight_axis_0() -> None:
    layer = only_layer(
        inspect("g (float[N, 3, 8, 8] x) => (float[N, 5, 6, 6] y) { y = Conv (x, w) }", {"w": seeded((5, 3, 3, 3))})
    )
    assert (layer.name, layer.op_type, layer.channel_axis) == ("w", "Conv", 0)
    assert layer.shape == (5, 3, 3, 3)
    assert layer.channels == 5
    assert layer.params == 135
    assert layer.dtype == "float32"
    assert layer.from_constant is False


def test_conv_transpose_weight_axis_1() -> None:
    layer = only_layer(
        inspect(
            "g (float[N, 3, 8, 8] x) => (float[N, 5, 10, 10] y) { y = ConvTranspose (x, w) }",
            {"w": seeded((3, 5, 3, 3))},
        )
    )
    assert (layer.op_type, layer.channel_axis, layer.channels) == ("ConvTranspose", 1, 5)


def test_gemm_trans_b_1_axis_0() -> None:
    layer = only_layer(
        inspect("g (float[N, 8] x) => (float[N, 4] y) { y = Gemm <transB = 1> (x, w) }", {"w": seeded((4, 8))})
    )
    assert (layer.op_type, layer.channel_axis, layer.channels) == ("Gemm", 0, 4)


def test_gemm_trans_b_0_axis_1() -> None:
    layer = only_layer(inspect("g (float[N, 8] x) => (float[N, 4] y) { y = Gemm (x, w) }", {"w": seeded((8, 4))}))
    assert (layer.op_type, layer.channel_axis, layer.channels) == ("Gemm", 1, 4)


def test_gemm_bias_is_not_a_weight() -> None:
    inspection = inspect(
        "g (float[N, 8] x) => (float[N, 4] y) { y = Gemm (x, w, b) }", {"w": seeded((8, 4)), "b": seeded((4,))}
    )
    assert [layer.name for layer in inspection.layers] == ["w"]
    assert inspection.skipped == (SkippedWeight("b", "Gemm", "bias of Gemm(y) (Gemm): biases are not pruned"),)
    assert inspection.total_params == inspection.float_params == 36
    assert inspection.skipped_params == {"b": 4}


def test_gemm_constant_a_with_trans_a() -> None:
    # A' = A^T is [M, K]: the M rows of the output come from axis 1 of A
    layer = only_layer(
        inspect("g (float[8, N] x) => (float[4, N] y) { y = Gemm <transA = 1> (w, x) }", {"w": seeded((8, 4))})
    )
    assert (layer.channel_axis, layer.channels) == (1, 4)


def test_matmul_constant_operand_1_axis_last() -> None:
    layer = only_layer(inspect("g (float[N, 8] x) => (float[N, 4] y) { y = MatMul (x, w) }", {"w": seeded((8, 4))}))
    assert (layer.op_type, layer.channel_axis, layer.channels) == ("MatMul", 1, 4)


def test_matmul_batched_constant_operand_1_axis_last() -> None:
    layer = only_layer(
        inspect("g (float[2, N, 8] x) => (float[2, N, 4] y) { y = MatMul (x, w) }", {"w": seeded((2, 8, 4))})
    )
    assert (layer.channel_axis, layer.channels) == (2, 4)


def test_matmul_constant_operand_0_found() -> None:
    layer = only_layer(inspect("g (float[8, N] x) => (float[4, N] y) { y = MatMul (w, x) }", {"w": seeded((4, 8))}))
    assert (layer.name, layer.op_type) == ("w", "MatMul")
    assert (layer.channel_axis, layer.channels) == (0, 4)


def test_constant_node_weight_found() -> None:
    values = ", ".join(["0.5"] * 32)
    layer = only_layer(
        inspect(
            f"g (float[N, 8] x) => (float[N, 4] y) {{ w = Constant <value = float[8, 4] {{{values}}}> ()\n"
            "y = MatMul (x, w) }",
            {},
        )
    )
    assert layer.name == "w"
    assert layer.from_constant is True
    assert (layer.shape, layer.channel_axis) == ((8, 4), 1)


def test_shared_initializer_listed_once_with_both_nodes() -> None:
    inspection = inspect(
        "g (float[N, 8] x) => (float[N, 8] y) { [first] h = MatMul (x, w)\n[second] y = MatMul (h, w) }",
        {"w": seeded((8, 8))},
    )
    layer = only_layer(inspection)
    assert layer.name == "w"
    assert layer.nodes == ("first", "second")
    assert inspection.total_params == inspection.prunable_params == 64


def test_unnamed_nodes_get_readable_names() -> None:
    layer = only_layer(inspect("g (float[N, 8] x) => (float[N, 4] y) { y = MatMul (x, w) }", {"w": seeded((8, 4))}))
    assert layer.nodes == ("MatMul(y)",)


def test_tiny_mlp_layers() -> None:
    inspection = pruner.inspect(tiny_mlp())
    assert [(la.name, la.op_type, la.channel_axis) for la in inspection.layers] == [
        ("w1", "Gemm", 0),
        ("w2", "MatMul", 1),
    ]
    assert inspection.total_params == 16 * 8 + 16 + 16 * 4
    assert inspection.prunable_params == 16 * 8 + 16 * 4


def test_inspect_from_path_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(tiny_mlp(), str(path))
    from_model = pruner.inspect(tiny_mlp())
    assert pruner.inspect(path) == from_model
    assert pruner.inspect(path.read_bytes()) == from_model


def test_inspect_bad_model_raises() -> None:
    with pytest.raises(pruner.InvalidModelError):
        pruner.inspect(b"not a model")


def test_to_dict_is_json_ready() -> None:
    data = json.loads(json.dumps(pruner.inspect(tiny_mlp()).to_dict()))
    assert [la["name"] for la in data["layers"]] == ["w1", "w2"]
    assert data["layers"][0]["params"] == 128
    assert data["layers"][0]["share"] == pytest.approx(128 / 208)
    assert data["prunable_params"] == 192


def test_inspect_does_not_modify_the_model() -> None:
    model = tiny_mlp()
    before = model.SerializeToString()
    pruner.inspect(model)
    assert model.SerializeToString() == before


# --- dtypes -------------------------------------------------------------------------------------


def test_float16_weight_found() -> None:
    layer = only_layer(
        inspect(
            "g (float16[N, 8] x) => (float16[N, 4] y) { y = MatMul (x, w) }", {"w": seeded((8, 4), dtype=np.float16)}
        )
    )
    assert layer.dtype == "float16"
    assert layer.channel_axis == 1


@pytest.mark.parametrize(
    ("onnx_type", "np_type", "name"),
    [("int32", np.int32, "int32"), ("int64", np.int64, "int64"), ("double", np.float64, "double")],
)
def test_non_float_weight_skipped(onnx_type: str, np_type: type, name: str) -> None:
    # int8 cannot feed MatMul/Gemm/Conv in a model that passes the checker; these types can
    skipped = only_skipped(
        inspect(
            f"g ({onnx_type}[N, 8] x) => ({onnx_type}[N, 4] y) {{ y = MatMul (x, w) }}",
            {"w": (seeded((8, 4)) * 10).astype(np_type)},
        )
    )
    assert skipped.name == "w"
    assert skipped.op_type == "MatMul"
    assert name in skipped.reason
    assert "dtype" in skipped.reason


def test_one_dimensional_weight_skipped() -> None:
    skipped = only_skipped(inspect("g (float[N, 8] x) => (float[N] y) { y = MatMul (x, w) }", {"w": seeded((8,))}))
    assert skipped.name == "w"
    assert "1 dimension" in skipped.reason


# --- shared with non-weight uses, graph I/O, subgraphs ------------------------------------------


def test_initializer_also_read_by_add_is_skipped() -> None:
    skipped = only_skipped(
        inspect(
            "g (float[N, 8] x) => (float[N, 8] y) { h = MatMul (x, w)\n[residual] y = Add (h, w) }",
            {"w": seeded((8, 8))},
        )
    )
    assert skipped.name == "w"
    assert "residual" in skipped.reason
    assert "Add" in skipped.reason


def test_initializer_shared_with_disagreeing_axes_is_skipped() -> None:
    # operand 1 of one MatMul (axis 1) and operand 0 of another (axis 0)
    skipped = only_skipped(
        inspect(
            "g (float[N, 8] x) => (float[8, 8] y) { h = MatMul (x, w)\ny = MatMul (w, h) }",
            {"w": seeded((8, 8))},
        )
    )
    assert "axis" in skipped.reason


def test_initializer_that_is_a_graph_input_is_skipped() -> None:
    skipped = only_skipped(
        inspect("g (float[N, 8] x, float[8, 4] w) => (float[N, 4] y) { y = MatMul (x, w) }", {"w": seeded((8, 4))})
    )
    assert "graph input" in skipped.reason


def test_initializer_that_is_a_graph_output_is_skipped() -> None:
    skipped = only_skipped(
        inspect("g (float[N, 8] x) => (float[N, 4] y, float[8, 4] w) { y = MatMul (x, w) }", {"w": seeded((8, 4))})
    )
    assert "graph output" in skipped.reason


IF_BODY = """g (float[N, 8] x, bool c) => (float[N, 4] y) {{
    h = MatMul (x, {outer})
    y = If (c) <
        then_branch = then_g () => (float[N, 4] a) {{ a = MatMul (x, w) }},
        else_branch = else_g () => (float[N, 4] b) {{ b = Identity (h) }}
    >
}}"""


def test_initializer_used_inside_if_subgraph_is_skipped() -> None:
    skipped = only_skipped(inspect(IF_BODY.format(outer="w"), {"w": seeded((8, 4))}))
    assert skipped.name == "w"
    assert "subgraph" in skipped.reason


def test_initializer_used_only_inside_if_subgraph_is_not_pruned() -> None:
    inspection = inspect(IF_BODY.format(outer="w0"), {"w": seeded((8, 4)), "w0": seeded((8, 4), 1)})
    assert [layer.name for layer in inspection.layers] == ["w0"]


# --- include / exclude --------------------------------------------------------------------------

TWO_LAYERS = "g (float[N, 8] x) => (float[N, 4] y) { [enc_fc] h = MatMul (x, w_enc)\n[dec_fc] y = MatMul (h, w_dec) }"
TWO_WEIGHTS = {"w_enc": seeded((8, 8)), "w_dec": seeded((8, 4), 1)}


def names(inspection: Inspection) -> tuple[list[str], dict[str, str]]:
    return [la.name for la in inspection.layers], {s.name: s.reason for s in inspection.skipped}


def test_exclude_by_node_name() -> None:
    layers, skipped = names(inspect(TWO_LAYERS, TWO_WEIGHTS, exclude=("dec_*",)))
    assert layers == ["w_enc"]
    assert list(skipped) == ["w_dec"]
    assert "dec_*" in skipped["w_dec"]


def test_exclude_by_initializer_name() -> None:
    layers, skipped = names(inspect(TWO_LAYERS, TWO_WEIGHTS, exclude=("w_e?c",)))
    assert layers == ["w_dec"]
    assert "w_e?c" in skipped["w_enc"]


def test_include_by_node_name() -> None:
    layers, skipped = names(inspect(TWO_LAYERS, TWO_WEIGHTS, include=("enc_*",)))
    assert layers == ["w_enc"]
    assert list(skipped) == ["w_dec"]
    assert "include" in skipped["w_dec"]


def test_include_by_initializer_name() -> None:
    layers, skipped = names(inspect(TWO_LAYERS, TWO_WEIGHTS, include=("w_dec",)))
    assert layers == ["w_dec"]
    assert "include" in skipped["w_enc"]


def test_include_miss_reason_names_the_patterns() -> None:
    # the user should see which patterns were tried, as an exclude reason names its pattern
    _, skipped = names(inspect(TWO_LAYERS, TWO_WEIGHTS, include=("enc_*", "w_x*")))
    assert "enc_*" in skipped["w_dec"]
    assert "w_x*" in skipped["w_dec"]


def test_exclude_wins_over_include() -> None:
    layers, skipped = names(inspect(TWO_LAYERS, TWO_WEIGHTS, include=("*",), exclude=("w_enc",)))
    assert layers == ["w_dec"]
    assert "w_enc" in skipped["w_enc"]


def test_globs_are_case_sensitive() -> None:
    layers, _ = names(inspect(TWO_LAYERS, TWO_WEIGHTS, exclude=("DEC_*",)))
    assert layers == ["w_enc", "w_dec"]


# --- every weight is accounted for: prunable, or skipped with a reason ---------------------------


def recurrent_model(op: str, hidden: int = 4, features: int = 5, directions: int = 2) -> onnx.ModelProto:
    """``op`` (LSTM/GRU/RNN) over [T, N, features], its last hidden state through a MatMul head."""
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    direction = "bidirectional" if directions == 2 else "forward"
    rnn = onnx.helper.make_node(
        op, ["x", "W", "R", "B"], ["", "h"], hidden_size=hidden, direction=direction, name="rnn"
    )
    head = onnx.helper.make_node("MatMul", ["h", "w_out"], ["y"], name="head")
    graph = onnx.helper.make_graph(
        [rnn, head],
        "recurrent",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["T", "N", features])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [directions, "N", 3])],
        [
            onnx.numpy_helper.from_array(seeded((directions, gates * hidden, features), 1), "W"),
            onnx.numpy_helper.from_array(seeded((directions, gates * hidden, hidden), 2), "R"),
            onnx.numpy_helper.from_array(seeded((directions, 2 * gates * hidden), 3), "B"),
            onnx.numpy_helper.from_array(seeded((hidden, 3), 4), "w_out"),
        ],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def embedding_model() -> onnx.ModelProto:
    return parse(
        HEADER + "g (int64[N, T] ids) => (float[N, T, 4] y) { e = Gather (table, ids) \n y = MatMul (e, w) }",
        {"table": seeded((10, 8)), "w": seeded((8, 4), 1)},
    )


def assert_every_weight_accounted_for(model: onnx.ModelProto, inspection: Inspection) -> None:
    """Every float initializer and Constant tensor is prunable or skipped with a reason, and their
    elements add up."""
    layers = {la.name for la in inspection.layers}
    skipped = {s.name: s for s in inspection.skipped}
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = node.attribute[0].t
    floats = 0
    for name, tensor in tensors.items():
        if tensor.data_type not in FLOAT_DTYPES:
            continue
        floats += int(np.prod(tensor.dims))
        assert (name in layers) != (name in skipped), name
        if name in skipped:
            unread = skipped[name].reason == "is not read by any node"
            assert skipped[name].reason and (skipped[name].op_type or unread), skipped[name]
    assert inspection.float_params == floats
    skipped_floats = sum(inspection.skipped_params[n] for n in skipped if tensors[n].data_type in FLOAT_DTYPES)
    assert inspection.prunable_params + skipped_floats == floats


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_recurrent_w_and_r_are_prunable_and_b_is_a_bias(op: str) -> None:
    model = recurrent_model(op)
    inspection = pruner.inspect(model)
    assert_every_weight_accounted_for(model, inspection)
    assert [la.name for la in inspection.layers] == ["W", "R", "w_out"]
    (b,) = inspection.skipped
    assert (b.name, b.op_type) == ("B", op)
    assert b.reason == f"input B of rnn ({op}): the gate biases: biases are not pruned"
    assert inspection.prunable_params / inspection.total_params > 0.5


def test_an_embedding_table_is_prunable_along_its_features() -> None:
    model = embedding_model()
    inspection = pruner.inspect(model)
    assert_every_weight_accounted_for(model, inspection)
    assert inspection.skipped == ()
    table = next(la for la in inspection.layers if la.name == "table")
    assert (table.op_type, table.channel_axis, table.input_axis) == ("Gather", 1, 0)


def test_a_gather_along_another_axis_selects_channels_and_is_no_weight() -> None:
    inspection = inspect(
        "g (int64[3] ids) => (float[10, 3] y) { y = Gather <axis = 1> (table, ids) }", {"table": seeded((10, 8))}
    )
    (s,) = inspection.skipped
    assert (s.name, s.op_type) == ("table", "Gather")
    assert s.reason == "read by Gather(y) (Gather) along axis 1: a selection of its channels, not a weight"


def test_weights_of_ops_without_a_declaration_and_unread_ones_are_listed() -> None:
    inspection = inspect(
        "g (float[N, 4, 8] x) => (float[N, 4, 8] y) {"
        ' h = Einsum <equation = "nij,jk->nik"> (x, mixer)\n y = Add (h, offset) }',
        {"mixer": seeded((8, 8)), "offset": seeded((4, 8)), "unused": seeded((4, 4), 1), "tiny": seeded((2, 2), 2)},
        # the checker accepts an unused initializer
    )
    skipped = {s.name: s for s in inspection.skipped}
    assert set(skipped) == {"mixer", "offset", "unused", "tiny"}
    assert skipped["mixer"].op_type == "Einsum"
    assert skipped["mixer"].reason.endswith("Einsum has no prunable declaration for it")
    assert skipped["offset"].reason.endswith("an elementwise operand (a positional embedding, say), not pruned")
    assert skipped["unused"].reason == skipped["tiny"].reason == "is not read by any node"


def test_a_weight_shared_by_a_prunable_op_and_another_is_listed_once() -> None:
    inspection = inspect(
        "g (float[N, 8] x) => (float[N, 8] y, float[8, 8] z) { y = MatMul (x, w) \n z = Relu (w) }",
        {"w": seeded((8, 8))},
    )
    (s,) = inspection.skipped
    assert s.name == "w" and "non-weight input" in s.reason


def test_every_float_tensor_is_named_with_what_it_is() -> None:
    """Biases, normalization parameters, shape data, scalars, unread tensors: each
    skipped with its own reason, and the elements of all of them and the layers add up."""
    model = parse(
        HEADER
        + """g (float[N, 3, 8, 8] x, int64[N, 5] ids) => (float[N, 4] y, float[N, 5, 16] e) {
            c = Conv (x, cw, cb)
            n = BatchNormalization (c, bs, bb, bm, bv)
            two = Constant <value = float {2.0}> ()
            p = Pow (n, two)
            r = Resize (p, roi, scales)
            m = Mul (r, gain)
            g = GlobalAveragePool (m)
            f = Flatten (g)
            h = Gemm <transB = 1> (f, gw, gb)
            y = Add (h, hb)
            e = Gather (table, ids)
        }""",
        {
            "cw": seeded((3, 3, 3, 3)),
            "cb": seeded((3,), 1),
            "bs": seeded((3,), 2),
            "bb": seeded((3,), 3),
            "bm": seeded((3,), 4),
            "bv": np.ones(3, np.float32),
            "roi": np.zeros(0, np.float32),
            "scales": np.array([1, 1, 2, 2], np.float32),
            "gain": seeded((3, 1, 1), 5),
            "gw": seeded((4, 3), 6),
            "gb": seeded((4,), 7),
            "hb": seeded((4,), 8),
            "table": seeded((50, 16), 9),
            "unused": seeded((3, 3), 10),
        },
    )
    inspection = pruner.inspect(model)
    assert_every_weight_accounted_for(model, inspection)
    assert [la.name for la in inspection.layers] == ["cw", "gw", "table"]
    reasons = {s.name: s.reason for s in inspection.skipped}
    assert reasons["cb"] == reasons["gb"].replace("Gemm(h) (Gemm)", "Conv(c) (Conv)")
    assert reasons["cb"] == "bias of Conv(c) (Conv): biases are not pruned"
    for name in ("bs", "bb", "bm", "bv"):
        assert "normalization parameters are not pruned" in reasons[name], name
    assert reasons["two"].endswith("too small to prune (1 element(s))")
    assert "shape, index or bound data" in reasons["scales"] and "shape, index or bound data" in reasons["roi"]
    assert reasons["hb"].endswith("a per-channel bias or scale, not pruned")
    assert reasons["gain"].endswith("a per-channel bias or scale, not pruned")  # [3, 1, 1]
    assert reasons["unused"] == "is not read by any node"
    assert inspection.skipped_params["two"] == 1
    assert inspection.to_dict()["float_params"] == inspection.float_params


FIXTURES = Path(__file__).parent.parent / "fixtures"
ZOO = Path.home() / ".cache" / "onnx-pruner-zoo" / "models"


@pytest.mark.parametrize(
    "path",
    [
        *sorted(FIXTURES.glob("*.onnx")),
        *(ZOO / f"{name}.onnx" for name in ("g2p", "silero_vad", "ppocr_cls", "magika")),
    ],
    ids=lambda p: p.stem,
)
def test_every_float_parameter_of_real_models_is_accounted_for(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is not cached (bench/zoo.py fetches it)")
    model = onnx.load(str(path))
    inspection = pruner.inspect(model)
    assert_every_weight_accounted_for(model, inspection)
    constants = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    listed = {la.name for la in inspection.layers} | {s.name for s in inspection.skipped}
    float_constants = {
        n.output[0]
        for n in model.graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
        if n.attribute[0].t.data_type in FLOAT_DTYPES
    }
    assert float_constants <= listed <= {t.name for t in model.graph.initializer} | constants
