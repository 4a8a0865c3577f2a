"""Graph helpers: the index (producers, uses, constants, attributes) and what a set of outputs depends on."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pruner._graph import Attributes, GraphIndex, keep_needed


def branched() -> onnx.ModelProto:
    """x -> a = x * w -> b = Relu(a); c = If(flag) { a + k } else { a }; y = b + c, with an input
    and an initializer only the If's branch reads from the outer scope."""
    k = numpy_helper.from_array(np.full(3, 2.0, np.float32), "k")
    w = numpy_helper.from_array(np.full(3, 3.0, np.float32), "w")
    then = helper.make_graph(
        [helper.make_node("Add", ["a", "k"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [None, 3])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["e"])],
        "other",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [None, 3])],
    )
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("If", ["flag"], ["c"], then_branch=then, else_branch=other),
        helper.make_node("Add", ["b", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [k, w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_keep_needed_keeps_the_ancestors_only() -> None:
    model = branched()
    del model.graph.output[:]
    model.graph.output.append(helper.make_empty_tensor_value_info("b"))
    keep_needed(model.graph, ["b"], inputs_too=True)
    assert [n.op_type for n in model.graph.node] == ["Mul", "Relu"]
    assert [t.name for t in model.graph.initializer] == ["w"]  # k was only the branch's
    assert [v.name for v in model.graph.input] == ["x"]  # flag only fed the If
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    (b,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(b, np.maximum(3 * x, 0))


def test_keep_needed_counts_what_subgraphs_read() -> None:
    model = branched()
    before = model.SerializeToString()
    keep_needed(model.graph, ["y"])
    assert model.SerializeToString() == before  # everything feeds y, the If through its branch's k
    model.graph.node.append(helper.make_node("Neg", ["x"], ["unused"]))
    keep_needed(model.graph, ["y"])
    assert model.SerializeToString() == before


# --- GraphIndex -----------------------------------------------------------------------------------


def indexed() -> onnx.ModelProto:
    """x -> Mul(w) -> a; c = Constant; y = Add(a, c); r = LeakyRelu(a); s = Transpose(a): three
    uses of a, an initializer and a Constant node."""
    return onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 3] y, float[2, 3] r)
        <float[3] w = {1.0, 2.0, 3.0}>
        {
            a = Mul(x, w)
            c = Constant<value = float[3] {4.0, 5.0, 6.0}>()
            y = Add(a, c)
            r = LeakyRelu<alpha = 0.5>(a)
            s = Transpose<perm = [1, 0]>(a)
        }
        """
    )


def test_index_producers_and_positions() -> None:
    model = indexed()
    index = GraphIndex.build(model.graph)
    assert index.producers == {"a": 0, "c": 1, "y": 2, "r": 3, "s": 4}
    producer = index.producer("y")
    assert producer is not None and producer.op_type == "Add"
    assert index.producer("x") is None  # a graph input
    assert index.producer("w") is None  # an initializer
    assert index.producer("nowhere") is None
    assert [index.position(node) for node in model.graph.node] == [0, 1, 2, 3, 4]


def test_index_uses_name_each_consumption_and_subgraph_reads() -> None:
    index = GraphIndex.build(indexed().graph)
    assert [(u.node.op_type, u.index) for u in index.uses("a")] == [("Add", 0), ("LeakyRelu", 0), ("Transpose", 0)]
    assert [(u.node.op_type, u.index) for u in index.uses("w")] == [("Mul", 1)]
    assert index.uses("y") == [] and index.uses("nowhere") == []
    branch = GraphIndex.build(branched().graph)
    (use,) = branch.uses("k")  # read only inside the If's then-branch
    assert use.in_subgraph and use.node.op_type == "If" and use.index == -1


def test_index_reads_initializers_and_constant_nodes_as_arrays() -> None:
    index = GraphIndex.build(indexed().graph)
    np.testing.assert_array_equal(index.value("w"), np.array([1, 2, 3], np.float32))
    np.testing.assert_array_equal(index.value("c"), np.array([4, 5, 6], np.float32))
    assert index.value("a") is None  # computed
    assert index.value("x") is None  # a graph input
    assert index.value("nowhere") is None
    assert index.is_constant("w") and index.is_constant("c") and not index.is_constant("a")
    assert index.constant_names() == ["w", "c"]
    tensor = index.tensor("c")
    assert tensor is not None and list(tensor.dims) == [3]


def test_index_constant_without_a_tensor_value_has_none() -> None:
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value_float=2.0), helper.make_node("Identity", ["k"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    index = GraphIndex.build(graph)
    assert "k" in index.constants and index.value("k") is None


def test_attributes_are_read_with_their_types_and_defaults() -> None:
    model = indexed()
    relu, transpose = model.graph.node[3], model.graph.node[4]
    attrs = Attributes(relu)
    assert attrs.get_float("alpha", 0.01) == 0.5
    assert attrs.get_float("beta", 0.25) == 0.25  # missing: the default
    assert "alpha" in attrs and "beta" not in attrs
    assert Attributes(transpose).get_ints("perm") == [1, 0]
    assert Attributes(transpose).get_ints("axes") is None
    assert Attributes(transpose).get_ints("axes", [0]) == [0]
    conv = helper.make_node("Conv", ["x", "w"], ["y"], group=2, auto_pad="SAME_UPPER")
    assert Attributes(conv).get_int("group", 1) == 2
    assert Attributes(conv).get_int("missing", 7) == 7
    assert Attributes(conv).get_str("auto_pad", "NOTSET") == "SAME_UPPER"
    assert Attributes(transpose).get_str("auto_pad", "NOTSET") == "NOTSET"


def test_node_name_falls_back_to_op_and_output() -> None:
    model = indexed()
    index = GraphIndex.build(model.graph)
    assert index.node_name(model.graph.node[0]) == "Mul(a)"
    model.graph.node[0].name = "scale"
    assert index.node_name(model.graph.node[0]) == "scale"
