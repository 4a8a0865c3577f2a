"""Graph helpers: what a set of outputs depends on."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pruner._graph import keep_needed


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
