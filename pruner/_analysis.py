"""Which weights can be pruned, and why the others cannot."""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from ._graph import Attributes, GraphIndex
from ._ops import RECURRENT_GATES, layout_of

__all__ = ["Inspection", "PrunableWeight", "SkippedWeight", "Unit", "analyze"]

PRUNABLE_DTYPES: dict[int, str] = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
}


class Unit(enum.Enum):
    """What a prunable entry of the search stands for."""

    WEIGHT = "weight"
    """One weight tensor, whose elements or output channels zero and N:M modes zero."""
    CHANNELS = "channels"
    """A family of coupled channels that remove mode removes everywhere at once (``_structure``)."""


@dataclass(frozen=True)
class PrunableWeight:
    """A weight tensor the pruner may zero (or, with ``unit`` CHANNELS, a channel family).

    ``channel_axis`` is the axis of output channels (Conv filters, Gemm/MatMul
    output neurons): the l1/l2 criteria zero whole slices along it. ``input_axis``
    is the axis it sums over (input channels), as its op's declaration gives it.
    """

    name: str
    op_type: str
    nodes: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    channel_axis: int
    from_constant: bool = False
    input_axis: int | None = None
    unit: Unit = Unit.WEIGHT
    blocks: int = 0
    """Scoring blocks along ``channel_axis`` (an RNN's gates; 0: none), as the op declares them
    (``_ops.WeightSlot.blocks``)."""

    @classmethod
    def family(cls, name: str, params: int) -> PrunableWeight:
        """A channel family of ``params`` weight elements, standing in for a layer in the search."""
        return cls(name, "", (), (params,), "float32", 0, unit=Unit.CHANNELS)

    @property
    def params(self) -> int:
        return int(np.prod(self.shape))

    @property
    def channels(self) -> int:
        return self.shape[self.channel_axis]


@dataclass(frozen=True)
class SkippedWeight:
    """A weight-like tensor that is left alone, with the reason."""

    name: str
    op_type: str
    reason: str

    @classmethod
    def family(cls, name: str, reason: str) -> SkippedWeight:
        """A channel family remove mode leaves alone."""
        return cls(name, Unit.CHANNELS.value, reason)


@dataclass(frozen=True)
class Inspection:
    """The prunable layers of a model and what was skipped."""

    layers: tuple[PrunableWeight, ...]
    skipped: tuple[SkippedWeight, ...]
    total_params: int
    """Elements of all initializers and Constant tensors."""
    float_params: int = 0
    """Elements of the floating-point ones: the prunable layers' and the skipped float
    tensors' elements add up to it (every float tensor is one or the other)."""
    skipped_params: Mapping[str, int] = field(default_factory=dict)
    """Elements of each skipped tensor, by name."""

    @property
    def prunable_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        total = max(self.total_params, 1)
        return {
            "total_params": self.total_params,
            "float_params": self.float_params,
            "prunable_params": self.prunable_params,
            "layers": [
                {**_fields(layer), "params": layer.params, "share": layer.params / total} for layer in self.layers
            ],
            "skipped": [{**asdict(s), "params": self.skipped_params.get(s.name, 0)} for s in self.skipped],
        }


def _fields(layer: PrunableWeight) -> dict[str, Any]:
    """A weight's fields as JSON-ready values (an inspection lists weights only: no unit)."""
    out = asdict(layer)
    del out["unit"]
    return out


def _weight_slots(node: onnx.NodeProto) -> dict[int, tuple[int, int, int]]:
    """Input index of each weight operand of ``node`` -> its (output-channel, input-channel) axes
    (may be negative) and scoring blocks, as the op's declaration gives them."""
    layout = layout_of(node)
    if layout is None:
        return {}
    return {w.input: (w.out_axis, w.in_axis, w.blocks) for w in layout.weights}


LISTED_MIN_ELEMENTS = 16
"""Below this many elements a tensor is "too small to prune" (scalars and short constants)."""

FLOAT_DTYPES = frozenset(
    {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    | {getattr(TensorProto, n) for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")}
)
"""Tensors of these types are parameters ``inspect`` accounts for, every one of them."""
_QUANTIZED_DTYPES = frozenset({TensorProto.INT8, TensorProto.UINT8})
"""Integer tensors listed too when they look like weights (2+ dimensions, not tiny): quantized weights."""

_RECURRENT_INPUTS = {3: "B", 4: "sequence_lens", 5: "initial_h", 6: "initial_c", 7: "P"}
_BIAS_INPUTS = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}
_NORMALIZATIONS = frozenset(
    {
        "BatchNormalization",
        "InstanceNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "SkipLayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "RMSNormalization",
        "LpNormalization",
    }
)
_DATA_INPUTS = {
    "Reshape": {1},
    "Expand": {1},
    "Tile": {1},
    "Slice": {1, 2, 3, 4},
    "Resize": {1, 2, 3},
    "Upsample": {1},
    "Pad": {1, 2, 3},
    "ConstantOfShape": {0},
    "Range": {0, 1, 2},
    "TopK": {1},
    "Clip": {1, 2},
    "Squeeze": {1},
    "Unsqueeze": {1},
    "ReduceMean": {1},
    "ReduceSum": {1},
    "Split": {1},
    "OneHot": {1, 2},
    "Where": {0},
}
"""Inputs that are shape, index or bound data rather than learned weights."""
_ELEMENTWISE = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu", "Where", "Equal", "Less", "Greater"}
)


def _why_unread(index: GraphIndex, name: str, tensor: TensorProto) -> tuple[str, str]:
    """(op type, reason) of a parameter tensor that no prunable declaration reads."""
    uses = index.uses(name)
    if not uses:
        return "", "is not read by any node"
    if any(u.in_subgraph for u in uses):
        return uses[0].node.op_type, "is read inside a subgraph (If/Loop/Scan)"
    use = next((u for u in uses if u.node.op_type in RECURRENT_GATES), uses[0])
    node, op = use.node, use.node.op_type
    where = f"{index.node_name(node)} ({op})"
    elements = int(np.prod(tensor.dims))
    if op in RECURRENT_GATES:
        slot = _RECURRENT_INPUTS.get(use.index, f"input {use.index}")
        what = {
            "B": "the gate biases: biases are not pruned",
            "initial_h": "an initial state, not a weight",
            "initial_c": "an initial state, not a weight",
            "P": "the peephole weights: not pruned",
        }.get(slot, "not a weight")
        return op, f"input {slot} of {where}: {what}"
    if op == "Gather" and use.index == 0:
        axis = Attributes(node).get_int("axis", 0)
        return op, f"read by {where} along axis {axis}: a selection of its channels, not a weight"
    if op in _NORMALIZATIONS and use.index > 0:
        return op, f"input {use.index} of {where}: normalization parameters are not pruned"
    if _BIAS_INPUTS.get(op) == use.index:
        return op, f"bias of {where}: biases are not pruned"
    if use.index in _DATA_INPUTS.get(op, ()) or tensor.data_type not in FLOAT_DTYPES:
        return op, f"input {use.index} of {where}: shape, index or bound data, not a weight"
    if len({(u.node.op_type, u.index) for u in uses}) > 1:
        ops = ", ".join(sorted({u.node.op_type for u in uses}))
        return op, f"is shared by several nodes ({ops}), none of which reads it as a prunable weight"
    if op in _ELEMENTWISE and elements > 1 and sum(int(d) != 1 for d in tensor.dims) <= 1:
        return op, f"input {use.index} of {where}: a per-channel bias or scale, not pruned"
    if elements < LISTED_MIN_ELEMENTS:
        return op, f"input {use.index} of {where}: too small to prune ({elements} element(s))"
    if op in _ELEMENTWISE:
        return op, f"input {use.index} of {where}: an elementwise operand (a positional embedding, say), not pruned"
    if len(tensor.dims) < 2:
        return op, f"input {use.index} of {where}: has {len(tensor.dims)} dimension(s); only weights of 2+ are pruned"
    return op, f"input {use.index} of {where}: {op} has no prunable declaration for it"


def _matches(patterns: tuple[str, ...], names: list[str]) -> str | None:
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(n, pattern) for n in names):
            return pattern
    return None


def analyze(
    model: onnx.ModelProto,
    *,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    index: GraphIndex | None = None,
) -> Inspection:
    """Find the prunable weights of ``model``; pure, never modifies it."""
    index = index or GraphIndex.build(model.graph)
    candidates: dict[str, list[tuple[onnx.NodeProto, tuple[int, int, int]]]] = {}
    for node in model.graph.node:
        for slot, slot_axes in _weight_slots(node).items():
            if slot < len(node.input) and node.input[slot] and index.tensor(node.input[slot]) is not None:
                candidates.setdefault(node.input[slot], []).append((node, slot_axes))

    layers: list[PrunableWeight] = []
    skipped: list[SkippedWeight] = []
    for name, slots in candidates.items():
        tensor = index.tensor(name)
        assert tensor is not None
        op_type = slots[0][0].op_type
        node_names = [index.node_name(n) for n, _ in slots]

        def skip(reason: str, *, _name: str = name, _op: str = op_type) -> None:
            skipped.append(SkippedWeight(_name, _op, reason))

        shape = tuple(int(d) for d in tensor.dims)
        if tensor.data_type not in FLOAT_DTYPES and (len(shape) < 2 or int(np.prod(shape)) < LISTED_MIN_ELEMENTS):
            continue  # index or shape data (a Gather of a shape, say): not a parameter
        if tensor.data_type not in PRUNABLE_DTYPES:
            skip(f"dtype {TensorProto.DataType.Name(tensor.data_type).lower()} is not float32/float16/bfloat16")
            continue
        if len(shape) < 2:
            skip(f"has {len(shape)} dimension(s); only weights of 2+ dimensions are pruned")
            continue
        if int(np.prod(shape)) == 0:
            skip("is empty")
            continue
        if name in index.graph_inputs:
            skip("is also a graph input, so callers may override it at run time")
            continue
        weight_uses = {(id(n), i) for n, _ in slots for i, inp in enumerate(n.input) if inp == name}
        others = [u for u in index.uses(name) if (id(u.node), u.index) not in weight_uses]
        if any(u.in_subgraph for u in index.uses(name)):
            skip("is read inside a subgraph (If/Loop/Scan)")
            continue
        if others:
            u = others[0]
            skip(f"is also read by {index.node_name(u.node)} ({u.node.op_type}) as a non-weight input")
            continue
        if name in index.graph_outputs:
            skip("is a graph output")
            continue
        axes = {(axis % len(shape), blocks) for _, (axis, _, blocks) in slots}
        if len(axes) > 1:
            skip("is shared by nodes that disagree on its output-channel axis")
            continue
        input_axes = {axis % len(shape) for _, (_, axis, _) in slots}
        pattern = _matches(exclude, [name, *node_names])
        if pattern is not None:
            skip(f"excluded by pattern {pattern!r}")
            continue
        if include and _matches(include, [name, *node_names]) is None:
            skip(f"not matched by any include pattern ({', '.join(include)})")
            continue
        channel_axis, blocks = axes.pop()
        if blocks and shape[channel_axis] % blocks:
            skip(f"its {shape[channel_axis]} rows do not split into {blocks} gate blocks")
            continue
        layers.append(
            PrunableWeight(
                name=name,
                op_type=op_type,
                nodes=tuple(node_names),
                shape=shape,
                dtype=PRUNABLE_DTYPES[tensor.data_type],
                channel_axis=channel_axis,
                from_constant=name not in index.initializers,
                input_axis=input_axes.pop() if len(input_axes) == 1 else None,
                blocks=blocks,
            )
        )

    # every other parameter is accounted for: a model whose big tensors go unmentioned (an
    # LSTM's B, an embedding table, a norm's scale) would look more covered than it is
    for name in [*index.initializers, *index.constants]:
        if name in candidates:
            continue
        tensor = index.tensor(name)
        if tensor is None:
            continue
        weight_like = len(tensor.dims) >= 2 and int(np.prod(tensor.dims)) >= LISTED_MIN_ELEMENTS
        if tensor.data_type in FLOAT_DTYPES or (tensor.data_type in _QUANTIZED_DTYPES and weight_like):
            op_type, reason = _why_unread(index, name, tensor)
            skipped.append(SkippedWeight(name, op_type, reason))

    # by the index's names: a Constant's value tensor has none of its own
    tensors = {n: t for n in [*index.initializers, *index.constants] if (t := index.tensor(n)) is not None}
    total = sum(int(np.prod(t.dims)) for t in tensors.values())
    floats = sum(int(np.prod(t.dims)) for t in tensors.values() if t.data_type in FLOAT_DTYPES)
    sizes = {s.name: int(np.prod(tensors[s.name].dims)) if s.name in tensors else 0 for s in skipped}
    return Inspection(tuple(layers), tuple(skipped), total, floats, sizes)


def tensor_proto(model_index: GraphIndex, name: str) -> TensorProto | None:
    return model_index.tensor(name)
