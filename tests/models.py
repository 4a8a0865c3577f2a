"""Models of the shapes of well-known architectures, built directly in ONNX with random weights.

Widths and resolutions are reduced so tests stay fast; the graph structure
(residuals, depthwise convs, inverted residuals, Concat skips, attention, MLP,
LayerNorm) is what matters to the channel rules. Used by tests and by
``bench/structure.py``.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Graph:
    """A tiny builder: every method adds nodes and returns the output tensor's name."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, array: np.ndarray, prefix: str = "c") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs: object) -> str:
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(f"{op_type}_"), **attrs))
        return outs[0] if n_out == 1 else ",".join(outs)

    def weight(self, shape: tuple[int, ...], fan_in: int) -> str:
        return self.const((self.rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32), "w")

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1, bias: bool = True) -> str:
        w = self.weight((cout, cin // group, k, k), cin // group * k * k)
        inputs = [x, w]
        if bias:
            inputs.append(self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "b"))
        pad = k // 2
        return self.op("Conv", inputs, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        params = [
            (1 + 0.2 * r.standard_normal(c)).astype(np.float32),
            (0.1 * r.standard_normal(c)).astype(np.float32),
            (0.1 * r.standard_normal(c)).astype(np.float32),
            (1 + 0.2 * r.random(c)).astype(np.float32),
        ]
        return self.op("BatchNormalization", [x, *(self.const(p, "bn") for p in params)], epsilon=1e-5)

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])

    def relu6(self, x: str) -> str:
        return self.op("Clip", [x, self.const(np.float32(0)), self.const(np.float32(6))])

    def gemm(self, x: str, fin: int, fout: int) -> str:
        w = self.weight((fout, fin), fin)
        b = self.const((self.rng.standard_normal(fout) * 0.1).astype(np.float32), "b")
        return self.op("Gemm", [x, w, b], transB=1)

    def linear(self, x: str, fin: int, fout: int) -> str:
        """MatMul by an [in, out] weight, then Add(bias, .) as PyTorch exports it."""
        y = self.op("MatMul", [x, self.weight((fin, fout), fin)])
        return self.op("Add", [self.const((self.rng.standard_normal(fout) * 0.1).astype(np.float32), "b"), y])

    def layernorm(self, x: str, h: int) -> str:
        scale = self.const(np.ones(h, np.float32), "ln")
        bias = self.const(np.zeros(h, np.float32), "ln")
        return self.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=1e-5)

    def gelu(self, x: str) -> str:
        half = self.op("Div", [x, self.const(np.float32(math.sqrt(2)))])
        erf = self.op("Erf", [half])
        one = self.op("Add", [erf, self.const(np.float32(1))])
        return self.op("Mul", [self.op("Mul", [x, one]), self.const(np.float32(0.5))])

    def model(self, inputs: list[tuple[str, list[object]]], output: str, out_shape: list[object]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        onnx.checker.check_model(model, full_check=True)
        return model


def resnet18(width: int = 16, size: int = 32, classes: int = 10) -> onnx.ModelProto:
    """ResNet-18 (BasicBlocks 2-2-2-2, BatchNorm unfused) at a quarter of the width."""
    g = Graph(1)
    x = g.relu(g.bn(g.conv("input", 3, width, k=7, stride=2, bias=False), width))
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = width
    for stage, cout in enumerate([width, width * 2, width * 4, width * 8]):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            h = g.relu(g.bn(g.conv(x, cin, cout, stride=stride, bias=False), cout))
            h = g.bn(g.conv(h, cout, cout, bias=False), cout)
            shortcut = x
            if stride != 1 or cin != cout:
                shortcut = g.bn(g.conv(x, cin, cout, k=1, stride=stride, bias=False), cout)
            x = g.relu(g.op("Add", [h, shortcut]))
            cin = cout
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    out = g.gemm(x, cin, classes)
    return g.model([("input", ["N", 3, size, size])], out, ["N", classes])


def mobilenet_v2(size: int = 32, classes: int = 10) -> onnx.ModelProto:
    """MobileNetV2: inverted residuals with depthwise convs and ReLU6, narrow and short."""
    g = Graph(2)
    x = g.relu6(g.bn(g.conv("input", 3, 8, stride=2, bias=False), 8))
    cin = 8
    for t, c, n, s in [(1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2), (6, 24, 1, 1)]:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            h = x
            if t != 1:
                h = g.relu6(g.bn(g.conv(h, cin, hidden, k=1, bias=False), hidden))
            h = g.relu6(g.bn(g.conv(h, hidden, hidden, stride=stride, group=hidden, bias=False), hidden))
            h = g.bn(g.conv(h, hidden, c, k=1, bias=False), c)
            x = g.op("Add", [x, h]) if stride == 1 and cin == c else h
            cin = c
    x = g.relu6(g.bn(g.conv(x, cin, 64, k=1, bias=False), 64))
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    out = g.gemm(x, 64, classes)
    return g.model([("input", ["N", 3, size, size])], out, ["N", classes])


def unet(size: int = 32, classes: int = 2) -> onnx.ModelProto:
    """A two-level U-Net: Concat skips, MaxPool down, Resize and ConvTranspose up."""
    g = Graph(3)

    def double(x: str, cin: int, cout: int) -> str:
        x = g.relu(g.bn(g.conv(x, cin, cout, bias=False), cout))
        return g.relu(g.bn(g.conv(x, cout, cout, bias=False), cout))

    e1 = double("input", 3, 8)
    e2 = double(g.op("MaxPool", [e1], kernel_shape=[2, 2], strides=[2, 2]), 8, 16)
    mid = double(g.op("MaxPool", [e2], kernel_shape=[2, 2], strides=[2, 2]), 16, 32)
    scales = g.const(np.array([1, 1, 2, 2], np.float32))
    up2 = g.op("Resize", [mid, "", scales], mode="nearest")
    d2 = double(g.op("Concat", [up2, e2], axis=1), 48, 16)
    w = g.weight((16, 8, 2, 2), 16 * 4)
    up1 = g.op("ConvTranspose", [d2, w, g.const(np.zeros(8, np.float32))], kernel_shape=[2, 2], strides=[2, 2])
    d1 = double(g.op("Concat", [e1, up1], axis=1), 16, 8)
    out = g.conv(d1, 8, classes, k=1)
    return g.model([("input", ["N", 3, size, size])], out, ["N", classes, size, size])


def bert(layers: int = 2, hidden: int = 32, heads: int = 4, ffn: int = 64, seq: int = 8, features: int = 16,
         classes: int = 3) -> onnx.ModelProto:  # fmt: skip
    """A small BERT-like encoder on float features: attention, MLP, LayerNorm, residuals."""
    g = Graph(4)
    head_dim = hidden // heads
    x = g.layernorm(g.linear("input", features, hidden), hidden)
    split_heads = g.const(np.array([0, 0, heads, head_dim], np.int64))
    merge_heads = g.const(np.array([0, 0, hidden], np.int64))
    for _ in range(layers):
        q, k, v = (g.linear(x, hidden, hidden) for _ in range(3))
        q, k, v = (g.op("Transpose", [g.op("Reshape", [t, split_heads])], perm=[0, 2, 1, 3]) for t in (q, k, v))
        scores = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
        scores = g.op("Div", [scores, g.const(np.float32(math.sqrt(head_dim)))])
        context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        context = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), merge_heads])
        x = g.layernorm(g.op("Add", [x, g.linear(context, hidden, hidden)]), hidden)
        mlp = g.linear(g.gelu(g.linear(x, hidden, ffn)), ffn, hidden)
        x = g.layernorm(g.op("Add", [x, mlp]), hidden)
    pooled = g.op("ReduceMean", [x], axes=[1], keepdims=0)
    out = g.gemm(pooled, hidden, classes)
    return g.model([("input", ["N", seq, features])], out, ["N", classes])


def bert_exported(layers: int = 2, hidden: int = 32, heads: int = 4, ffn: int = 64, features: int = 16,
                  classes: int = 3) -> onnx.ModelProto:  # fmt: skip
    """The BERT-like encoder as PyTorch writes a Hugging Face-style one below opset 17: a
    dynamic sequence length, head split/merge targets computed from Shape nodes
    (``x.view(x.size()[:-1] + (heads, head_dim))``), LayerNorm decomposed into ReduceMean
    arithmetic, and the first token's output classified (``x[:, 0]``)."""
    g = Graph(5)
    head_dim = hidden // heads

    def layernorm(x: str) -> str:
        mean = g.op("ReduceMean", [x], axes=[-1])
        centred = g.op("Sub", [x, mean])
        var = g.op("ReduceMean", [g.op("Pow", [centred, g.const(np.float32(2))])], axes=[-1])
        std = g.op("Sqrt", [g.op("Add", [var, g.const(np.float32(1e-5))])])
        scale = g.const((1 + 0.1 * g.rng.standard_normal(hidden)).astype(np.float32), "ln")
        bias = g.const((0.1 * g.rng.standard_normal(hidden)).astype(np.float32), "ln")
        return g.op("Add", [g.op("Mul", [g.op("Div", [centred, std]), scale]), bias])

    def leading(x: str) -> list[str]:
        """[N, L] of ``x`` as two 1-element tensors, the way the exporter computes them."""
        shape = g.op("Shape", [x])
        dims = [g.op("Gather", [shape, g.const(np.int64(k))]) for k in (0, 1)]
        return [g.op("Unsqueeze", [d, g.const(np.array([0]))]) for d in dims]

    def split_heads(x: str) -> str:
        target = g.op("Concat", [*leading(x), g.const(np.array([heads, head_dim]))], axis=0)
        return g.op("Transpose", [g.op("Reshape", [x, target])], perm=[0, 2, 1, 3])

    x = layernorm(g.linear("input", features, hidden))
    for _ in range(layers):
        q, k, v = (split_heads(g.linear(x, hidden, hidden)) for _ in range(3))
        scores = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
        scores = g.op("Div", [scores, g.const(np.float32(math.sqrt(head_dim)))])
        context = g.op("Transpose", [g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])], perm=[0, 2, 1, 3])
        merged = g.op("Reshape", [context, g.op("Concat", [*leading(context), g.const(np.array([hidden]))], axis=0)])
        x = layernorm(g.op("Add", [x, g.linear(merged, hidden, hidden)]))
        x = layernorm(g.op("Add", [x, g.linear(g.gelu(g.linear(x, hidden, ffn)), ffn, hidden)]))
    first = g.op("Gather", [x, g.const(np.int64(0))], axis=1)
    return g.model([("input", ["N", "L", features])], g.gemm(first, hidden, classes), ["N", classes])


ARCHITECTURES = {
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
    "unet": unet,
    "bert": bert,
    "bert_exported": bert_exported,
}
INPUT_SHAPES = {
    "resnet18": (3, 32, 32),
    "mobilenet_v2": (3, 32, 32),
    "unet": (3, 32, 32),
    "bert": (8, 16),
    "bert_exported": (8, 16),
}
