"""Channel groups for structured pruning, derived from per-op rules.

Every channel of every tensor that carries channels (activations along their
channel axis, weights along their in/out-channel axes, biases, normalization
parameters) is an *atom*. Each op contributes rules that tie atoms together: a
Conv ties its output channel k to row k of its weight and to its bias k; the
next Conv ties its input channel k to column k of its weight; Add ties channel
k of both inputs and of the output; Concat ties its inputs' channels to offset
positions of the output; Flatten ties a channel to its block of features; and
so on (``RULES``). Connected atoms form a *component*: one channel that can only
be removed everywhere at once. Components touching the same tensors form a
*family* (one layer's output channels, say); the search decides how many
components of each family to remove.

A few rules are *approximate*: LayerNormalization (and ReduceMean, as in a
decomposed or RMS norm) over the channel axis computes its statistics over the
channels, so removing one changes them slightly for all the others. Transformers
normalize their residual stream this way; without these rules no layer writing to
it could lose a channel. The components they touch are removable, marked with the
reason (``Family.approximate``), and what the change costs is left to the search's
evaluation and the refit.

An op without a rule, a graph input or output, or a subgraph reading a tensor
*freezes* the atoms it touches: their components are never removed, and the
report says why. Removing components slices every tensor they touch and then
fixes the attributes and shape constants that name channel counts (``group``
of depthwise convs, ``split`` sizes, Reshape targets).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._analysis import FLOAT_DTYPES
from ._graph import Attributes, GraphIndex, declared_shape
from ._ops import OPS, ChannelRule, OpDeclaration, WeightSlot

__all__ = [
    "CountFixup",
    "Family",
    "Fixup",
    "GroupFixup",
    "HiddenFixup",
    "SliceFixup",
    "SplitFixup",
    "Structure",
    "analyze_structure",
    "remove_components",
    "set_params",
    "zero_components",
]

Slot = tuple[str, int]
"""A tensor and one of its axes."""


@dataclass
class Family:
    """Components that touch the same tensors: the removable channels of one layer (or coupled layers)."""

    name: str
    components: np.ndarray
    """Component ids, in channel order of the family's first slot."""
    params_per_component: np.ndarray
    """Weight elements removed with each component."""
    slots: tuple[Slot, ...]
    param_slots: tuple[Slot, ...]
    approximate: str | None = None
    """Why removing these channels changes the outputs of the kept ones (None: it does not)."""


@dataclass(frozen=True)
class GroupFixup:
    """The ``group`` of a depthwise conv: the channel count of ``slots[0]``."""

    node: int
    slots: tuple[Slot, ...]


@dataclass(frozen=True)
class SplitFixup:
    """The sizes of a Split (its ``split`` attribute or sizes input): one count per output slot."""

    node: int
    slots: tuple[Slot, ...]


@dataclass(frozen=True)
class SliceFixup:
    """The bounds of a Slice along a channel axis: ``slots`` are (input, output); the constants
    ``starts`` and ``ends`` hold them at ``position``, the range beginning at channel ``start``."""

    node: int
    slots: tuple[Slot, ...]
    starts: str
    ends: str
    position: int
    start: int


@dataclass(frozen=True)
class CountFixup:
    """An entry of a shape-like constant (Reshape shape, Resize sizes): entry ``position`` of
    ``constant``, read as ``node.input[input_index]``, is the channel count of ``slots[0]``."""

    node: int
    slots: tuple[Slot, ...]
    constant: str
    position: int
    input_index: int


@dataclass(frozen=True)
class HiddenFixup:
    """The ``hidden_size`` of a recurrent op: the channel count of ``slots[0]`` (R's columns).
    Its zero initial states made by ConstantOfShape are dropped (an absent state is zero)."""

    node: int
    slots: tuple[Slot, ...]


Fixup = GroupFixup | SplitFixup | SliceFixup | CountFixup | HiddenFixup
"""An attribute or constant that names a channel count, and the slots whose counts it holds."""


@dataclass
class Structure:
    """The atoms of a model and how they group."""

    slot_base: dict[Slot, int]
    slot_size: dict[Slot, int]
    component: np.ndarray
    """Component id of every atom."""
    frozen: dict[int, str]
    """Frozen component -> why."""
    families: list[Family]
    skipped: list[tuple[str, str]]
    """(what, why) of every channel set that is left alone."""
    params: set[str]
    fixups: list[Fixup]
    producer_slots: set[Slot]
    consumer_slots: set[Slot]
    scales: list[tuple[str, str, float]]
    approximate: dict[Slot, str]
    """Inputs of the norms (and means) over channels that approximate rules passed, and why."""

    def atoms(self, slot: Slot) -> np.ndarray:
        base = self.slot_base[slot]
        return self.component[base : base + self.slot_size[slot]]


class _Builder:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.index = GraphIndex.build(model.graph)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        self.shapes: dict[str, tuple[int | None, ...]] = {}
        for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
                self.shapes[value.name] = declared_shape(value)
        for name, tensor in self.index.initializers.items():
            self.shapes[name] = tuple(tensor.dims)
        for name in self.index.constants:
            value = self.index.tensor(name)
            if value is not None:
                self.shapes[name] = tuple(value.dims)
        self.slot_base: dict[Slot, int] = {}
        self.slot_size: dict[Slot, int] = {}
        self.parent: list[int] = []
        self.frozen: dict[int, str] = {}
        self.todo: list[Slot] = []
        self.done: set[tuple[int, Slot]] = set()
        self.fixups: list[Fixup] = []
        self.params: set[str] = set()
        self.producer_slots: set[Slot] = set()
        """Output-channel axes of seed weights: what families are named after."""
        self.consumer_slots: set[Slot] = set()
        """Input-channel axes of seed weights."""
        self.scales: list[tuple[str, str, float]] = []
        """(scale, variance, epsilon) of every BatchNormalization: its per-channel gain."""
        self.approximate: dict[Slot, str] = {}
        """Slots an approximate rule reads statistics over, and why."""

    # --- atoms --------------------------------------------------------------------------------

    def is_constant(self, name: str) -> bool:
        return self.index.is_constant(name)

    def constant(self, name: str) -> np.ndarray | None:
        return self.index.value(name)

    def dim(self, name: str, axis: int) -> int | None:
        shape = self.shapes.get(name)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        return shape[axis]

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def slot(self, name: str, axis: int, size: int) -> int:
        """The first atom of ``name`` along ``axis``; registers (and schedules) the slot if new."""
        rank = self.rank(name)
        if rank is not None and axis < 0:
            axis += rank
        key = (name, axis)
        if key in self.slot_base:
            if self.slot_size[key] != size:
                raise _Conflict(f"{name} axis {axis} has {self.slot_size[key]} channels, a rule says {size}")
            return self.slot_base[key]
        base = len(self.parent)
        self.parent.extend(range(base, base + size))
        self.slot_base[key] = base
        self.slot_size[key] = size
        if self.is_constant(name):
            self.params.add(name)
        else:
            self.todo.append(key)
        return base

    def add_fixup(self, fixup: Fixup) -> None:
        """Record a fixup once (a rule runs once per slot that triggers it)."""
        if fixup not in self.fixups:
            self.fixups.append(fixup)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, first: int, second: int) -> None:
        roots = self.find(first), self.find(second)
        if roots[0] != roots[1]:
            low, high = min(roots), max(roots)
            self.parent[high] = low
            for root in roots:
                if root in self.frozen and low not in self.frozen:
                    self.frozen[low] = self.frozen[root]

    def link(self, a: str, axis_a: int, b: str, axis_b: int, size: int) -> None:
        """Channel k of ``a`` along ``axis_a`` is channel k of ``b`` along ``axis_b``."""
        base_a, base_b = self.slot(a, axis_a, size), self.slot(b, axis_b, size)
        for k in range(size):
            self.union(base_a + k, base_b + k)

    def link_map(self, a: str, axis_a: int, size_a: int, b: str, axis_b: int, size_b: int, to_b: np.ndarray) -> None:
        """Channel ``k`` of ``a`` is every position ``to_b[k]`` (an array per k) of ``b``."""
        base_a, base_b = self.slot(a, axis_a, size_a), self.slot(b, axis_b, size_b)
        for k in range(size_a):
            for position in np.atleast_1d(to_b[k]):
                self.union(base_a + k, base_b + int(position))

    def freeze(self, name: str, axis: int, size: int, reason: str) -> None:
        base = self.slot(name, axis, size)
        for k in range(size):
            root = self.find(base + k)
            self.frozen.setdefault(root, reason)

    # --- propagation ----------------------------------------------------------------------------

    def run(self) -> None:
        for node_index, node in enumerate(self.model.graph.node):
            if node.op_type in OPS and node.domain in ("", "ai.onnx"):
                self.apply(node_index, None)
        while self.todo:
            name, axis = self.todo.pop()
            size = self.slot_size[(name, axis)]
            if name in self.index.graph_outputs:
                self.freeze(name, axis, size, f"{name!r} is a graph output")
            if name in self.index.graph_inputs:
                self.freeze(name, axis, size, f"{name!r} is a graph input")
            touching = []
            if name in self.index.producers:
                touching.append(self.index.producers[name])
            for use in self.index.uses(name):
                if use.in_subgraph:
                    self.freeze(name, axis, size, f"{name!r} is read inside a subgraph")
                    continue
                touching.append(self.index.position(use.node))
            for node_index in touching:
                self.apply(node_index, (name, axis))

    def apply(self, node_index: int, trigger: Slot | None) -> None:
        key = (node_index, trigger or ("", -1))
        if key in self.done:
            return
        self.done.add(key)
        node = self.model.graph.node[node_index]
        rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        try:
            if rule is None:
                raise _Stop(f"no channel rule for {node.op_type}")
            rule(self, node_index, node, trigger)
        except (_Stop, _Conflict) as stop:
            if trigger is not None:
                name, axis = trigger
                what = node.name or node.op_type
                self.freeze(name, axis, self.slot_size[trigger], f"{what} ({node.op_type}): {stop}")

    def finish(self) -> Structure:
        n = len(self.parent)
        roots = np.array([self.find(i) for i in range(n)], dtype=np.int64)
        _, component = np.unique(roots, return_inverse=True)
        frozen: dict[int, str] = {}
        for root, reason in self.frozen.items():
            frozen.setdefault(int(component[root]), reason)
        families, skipped = self._families(component, frozen)
        return Structure(
            dict(self.slot_base),
            dict(self.slot_size),
            component,
            frozen,
            families,
            skipped,
            self.params,
            self.fixups,
            self.producer_slots,
            self.consumer_slots,
            self.scales,
            dict(self.approximate),
        )

    def atoms(self, component: np.ndarray, slot: Slot) -> np.ndarray:
        base = self.slot_base[slot]
        return component[base : base + self.slot_size[slot]]

    def _name(self, signature: tuple[Slot, ...]) -> str:
        """A family is named after the weight whose output channels it is (else any of its weights)."""
        producers = [name for name, axis in signature if (name, axis) in self.producer_slots]
        params = [name for name, _ in signature if name in self.params]
        return (producers or params or [signature[0][0]])[0]

    def _families(self, component: np.ndarray, frozen: dict[int, str]) -> tuple[list[Family], list[tuple[str, str]]]:
        touched: dict[int, set[Slot]] = defaultdict(set)
        params: dict[int, int] = defaultdict(int)
        for slot, base in self.slot_base.items():
            size = self.slot_size[slot]
            name, axis = slot
            per_channel = 1
            if name in self.params:
                dims = [d or 0 for d in self.shapes[name]]
                per_channel = math.prod(dims) // dims[axis] if dims[axis] else 0
            for k in range(size):
                c = int(component[base + k])
                touched[c].add(slot)
                if name in self.params:
                    params[c] += per_channel
        approximate: dict[int, str] = {}
        for slot, why in self.approximate.items():
            for c in self.atoms(component, slot):
                approximate.setdefault(int(c), why)
        by_signature: dict[tuple[Slot, ...], list[int]] = defaultdict(list)
        skipped: dict[str, str] = {}
        for c, slots in touched.items():
            signature = tuple(sorted(slots))
            if c in frozen:
                skipped.setdefault(self._name(signature), frozen[c])
                continue
            if not any(s[0] in self.params for s in signature):
                continue
            by_signature[signature].append(c)
        families = []
        for signature, comps in by_signature.items():
            first = signature[0]
            base = self.slot_base[first]
            order = {int(component[base + k]): k for k in range(self.slot_size[first])}
            comps.sort(key=lambda c: order.get(c, 0))
            families.append(
                Family(
                    name=self._name(signature),
                    components=np.array(comps, dtype=np.int64),
                    params_per_component=np.array([params[c] for c in comps], dtype=np.int64),
                    slots=signature,
                    param_slots=tuple(s for s in signature if s[0] in self.params),
                    approximate=next((approximate[c] for c in comps if c in approximate), None),
                )
            )
        self._distinct_names(families, component)
        families.sort(key=lambda f: f.name)
        return families, sorted(skipped.items())

    def _distinct_names(self, families: list[Family], component: np.ndarray) -> None:
        """Families of one weight (the halves a Split makes of a conv's channels) are named after
        their channel range in it, ``w[0:16]``, ``w[16:32]``: a plan names each on its own."""
        by_name: dict[str, list[int]] = defaultdict(list)
        for k, family in enumerate(families):
            by_name[family.name].append(k)
        for name, members in by_name.items():
            if len(members) < 2:
                continue
            labels = []
            for k in members:
                slot = next(s for s in families[k].slots if s[0] == name)
                base, size = self.slot_base[slot], self.slot_size[slot]
                mine = set(families[k].components.tolist())
                at = [j for j in range(size) if int(component[base + j]) in mine]
                labels.append(f"{name}[{min(at)}:{max(at) + 1}]" if at else f"{name}#{k}")
            if len(set(labels)) < len(labels):  # interleaved channels: numbered instead
                labels = [f"{name}#{j}" for j in range(len(members))]
            for k, label in zip(members, labels, strict=True):
                families[k] = dataclasses.replace(families[k], name=label)


class _Stop(Exception):
    """A rule cannot relate these channels: freeze them."""


class _Conflict(Exception):
    """Two rules disagree on a tensor's channel count."""


def analyze_structure(model: onnx.ModelProto) -> Structure:
    """Atoms, components and families of ``model`` (not changed)."""
    builder = _Builder(model)
    builder.run()
    return builder.finish()


# --- the rules ------------------------------------------------------------------------------------
# A rule gets the node and the slot that triggered it (None for a seed) and links every
# slot the node relates to it. It raises _Stop when it cannot.

Rule = Callable[[_Builder, int, onnx.NodeProto, Slot | None], None]


def _axis(builder: _Builder, trigger: Slot | None, name: str) -> int | None:
    if trigger is None or trigger[0] != name:
        return None
    rank = builder.rank(name)
    return trigger[1] % rank if rank else trigger[1]


def _need(value: int | None, what: str) -> int:
    if value is None:
        raise _Stop(f"{what} is not known statically")
    return value


def _weight(node: onnx.NodeProto, input_index: int) -> tuple[WeightSlot, int]:
    """The declaration (``_ops``) of weight operand ``input_index`` of ``node``, and its groups."""
    layout = OPS[node.op_type].of(node)
    slot = layout.slot(input_index)
    assert slot is not None, f"{node.op_type} declares no weight at input {input_index}"
    return slot, layout.groups


def _conv(builder: _Builder, i: int, node: onnx.NodeProto, trigger: Slot | None) -> None:
    weight, group = _weight(node, 1)
    x, w, y = node.input[weight.data], node.input[weight.input], node.output[0]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if not builder.is_constant(w) or (bias and not builder.is_constant(bias)):
        raise _Stop("weight or bias is not a constant")
    if trigger is not None and trigger[1] % (builder.rank(trigger[0]) or 1) != weight.output_axis:
        raise _Stop(f"only the channel axis ({weight.output_axis}) of a conv can shrink")
    shape = builder.shapes[w]
    c_in = _need(builder.dim(x, weight.data_axis), "input channels")
    c_out = _need(builder.dim(y, weight.output_axis), "output channels")
    out_axis, in_axis = weight.out_axis, weight.in_axis
    builder.producer_slots.add((w, out_axis))
    if group == 1:
        if trigger is None or trigger[0] == y:
            builder.link(y, weight.output_axis, w, out_axis, c_out)
            if bias:
                builder.link(y, weight.output_axis, bias, 0, c_out)
        if trigger is not None and trigger[0] == x:
            builder.link(x, weight.data_axis, w, in_axis, c_in)
            builder.consumer_slots.add((w, in_axis))
        return
    # depthwise: one input channel per filter, output channel k reads input channel k only
    if out_axis == 0 and group == c_in == c_out and shape[in_axis] == 1:
        builder.link(x, weight.data_axis, y, weight.output_axis, c_out)
        builder.link(y, weight.output_axis, w, out_axis, c_out)
        if bias:
            builder.link(y, weight.output_axis, bias, 0, c_out)
        builder.add_fixup(GroupFixup(i, ((y, weight.output_axis),)))
        return
    raise _Stop(f"grouped convolution (group={group}) is not pruned")


def _gemm(builder: _Builder, i: int, node: onnx.NodeProto, trigger: Slot | None) -> None:
    weight, _ = _weight(node, 1)
    a, w, y = node.input[weight.data], node.input[weight.input], node.output[0]
    if not builder.is_constant(w):
        raise _Stop("only Gemm with a constant B")
    n_out = _need(builder.dim(y, weight.output_axis), "Gemm output width")
    builder.producer_slots.add((w, weight.out_axis))
    if trigger is None or trigger[0] == y:
        if trigger is not None and trigger[1] % 2 != weight.output_axis:
            raise _Stop("the batch axis of a Gemm output cannot shrink")
        builder.link(y, weight.output_axis, w, weight.out_axis, n_out)
        if len(node.input) > 2 and node.input[2]:
            c = node.input[2]
            c_shape = builder.shapes.get(c)
            if not builder.is_constant(c) or c_shape is None:
                raise _Stop("Gemm C is not a constant")
            if c_shape and c_shape[-1] == n_out and n_out > 1:
                builder.link(y, weight.output_axis, c, len(c_shape) - 1, n_out)
                if len(c_shape) == 2 and c_shape[0] != 1:
                    raise _Stop("Gemm C is a full matrix")
    if trigger is not None and trigger[0] == a:
        if trigger[1] % 2 != weight.data_axis:
            raise _Stop("the batch axis of a Gemm input cannot shrink")
        depth = _need(builder.dim(a, weight.data_axis), "Gemm input width")
        builder.link(a, weight.data_axis, w, weight.in_axis, depth)
        builder.consumer_slots.add((w, weight.in_axis))


def _matmul(builder: _Builder, i: int, node: onnx.NodeProto, trigger: Slot | None) -> None:
    weight, _ = _weight(node, 1)
    a, w, y = node.input[weight.data], node.input[weight.input], node.output[0]
    if trigger is not None and not builder.is_constant(a) and not builder.is_constant(w):
        _batched_matmul(builder, node, trigger)
        return
    if not builder.is_constant(w) or builder.is_constant(a) or len(builder.shapes.get(w, ())) != 2:
        raise _Stop("only MatMul of an activation by a constant 2-D weight")
    rank_y = _need(builder.rank(y), "MatMul output rank")
    rank_w = 2
    out_axis, in_axis = weight.out_axis % rank_w, weight.in_axis % rank_w
    output_axis = weight.output_axis % rank_y
    builder.producer_slots.add((w, out_axis))
    if trigger is None or trigger[0] == y:
        if trigger is not None and trigger[1] % rank_y != output_axis:
            raise _Stop("only the last axis of a MatMul output can shrink")
        builder.link(y, output_axis, w, out_axis, _need(builder.dim(w, out_axis), "MatMul width"))
    if trigger is not None and trigger[0] == a:
        rank_a = _need(builder.rank(a), "MatMul input rank")
        if trigger[1] % rank_a != weight.data_axis % rank_a:
            raise _Stop("only the last axis of a MatMul input can shrink")
        builder.link(a, weight.data_axis % rank_a, w, in_axis, _need(builder.dim(w, in_axis), "MatMul depth"))
        builder.consumer_slots.add((w, in_axis))


def _batched_matmul(builder: _Builder, node: onnx.NodeProto, trigger: Slot) -> None:
    """MatMul of two activations (attention): Y[..., m, n] = sum_k A[..., m, k] B[..., k, n].

    Batch axes (heads) pass through; A's rows are Y's rows, B's columns Y's
    columns; A's k and B's k are one channel (dropping it from both drops one
    term of the sum, as pruning query-key dimensions does).
    """
    a, w, y = node.input[0], node.input[1], node.output[0]
    ranks = {name: _need(builder.rank(name), "MatMul rank") for name in (a, w, y)}
    if min(ranks.values()) < 2:
        raise _Stop("MatMul of vectors")
    name, axis = trigger
    size = builder.slot_size[trigger]
    from_end = axis - ranks[name]  # -1 last axis, -2 the one before, lower: batch axes
    if from_end <= -3:
        for operand in (a, w, y):
            in_axis = ranks[operand] + from_end
            if in_axis >= 0 and builder.dim(operand, in_axis) != 1:
                builder.link(name, axis, operand, in_axis, size)
        return
    pairs = {(a, -1): (w, -2), (w, -2): (a, -1), (a, -2): (y, -2), (y, -2): (a, -2), (w, -1): (y, -1), (y, -1): (w, -1)}
    other, other_from_end = pairs[(name, from_end)]
    builder.link(name, axis, other, ranks[other] + other_from_end, size)


def _same_shape(builder: _Builder, i: int, node: onnx.NodeProto, trigger: Slot | None) -> None:
    """Unary ops, activations, casts: channel k in is channel k out."""
    assert trigger is not None
    x, y = node.input[0], node.output[0]
    if trigger[0] not in (x, y):
        raise _Stop("a side input of a unary op carries channels")
    axis = trigger[1]
    builder.link(x, axis, y, axis, builder.slot_size[trigger])
    for extra in node.output[1:]:
        if extra and builder.index.uses(extra):
            raise _Stop(f"its second output {extra!r} is used")


def _channel_only(builder: _Builder, i: int, node: onnx.NodeProto, trigger: Slot | None) -> None:
    """Pooling, Resize, Pad: spatial ops that keep the channel axis (1)."""
    assert trigger is not None
    if trigger[1] != 1:
        raise _Stop("only the channel axis passes through")
    x, y = node.input[0], node.output[0]
    if node.op_type == "Resize":
        if len(node.input) > 3 and node.input[3]:
            sizes = builder.constant(node.input[3])
            if sizes is None or "axes" in Attributes(node) or sizes.size < 2:
                raise _Stop("Resize sizes must be a constant over all axes")
            # sizes name the channel count: it follows the channels (a per-node copy, as for Reshape)
            builder.add_fixup(CountFixup(i, ((y, 1),), node.input[3], position=1, input_index=3))
        else:
            scales = builder.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if scales is None or scales.size < 2 or scales[1] != 1:
                raise _Stop("Resize scales of the channel axis must be a constant 1")
    if node.op_type == "Pad":
        listed = np.array(Attributes(node).get_ints("pads", []))
        pads = builder.constant(node.input[1]) if len(node.input) > 1 else listed
        axes = builder.constant(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        if pads is None or axes is not None:
            raise _Stop("Pad without constant pads over all axes")
        rank = pads.size // 2
        if pads[1] or pads[rank + 1]:
            raise _Stop("Pad pads the channel axis")
    builder.link(x, 1, y, 1, builder.slot_size[trigger])
    for extra in node.output[1:]:
        if extra and builder.index.uses(extra):
            raise _Stop(f"its second output {extra!r} is used")


def _normalization(builder: _Builder, i: int, node: onnx.NodeProto, trigger: Slot | None) -> None:
    """BatchNormalization, InstanceNormalization: per-channel parameters follow the channels."""
    assert trigger is not None
    if trigger[1] != 1:
        raise _Stop("only the channel axis passes through")
    x, y = node.input[0], node.output[0]
    size = builder.slot_size[trigger]
    builder.link(x, 1, y, 1, size)
    for param in node.input[1:]:
        if not builder.is_constant(param):
            raise _Stop("normalization parameters are not constants")
        builder.link(y, 1, param, 0, size)
    if any(out and builder.index.uses(out) for out in node.output[1:]):
        raise _Stop("training outputs are used")
    if node.op_type == "BatchNormalization":
        builder.scales.append((node.input[1], node.input[4], Attributes(node).get_float("epsilon", 1e-5)))


def _elementwise(builder: _Builder, i: int, node: onnx.NodeProto, trigger: Slot | None) -> None:
    """Add, Mul, ...: inputs broadcast against the output; a full-size axis shares its channels."""
    assert trigger is not None
    y = node.output[0]
    rank_y = _need(builder.rank(y), "output rank")
    name, axis = trigger
    size = builder.slot_size[trigger]
    if name == y:
        out_axis = axis
    else:
        rank_in = _need(builder.rank(name), "input rank")
        out_axis = axis + rank_y - rank_in
    builder.slot(y, out_axis, size)
    for operand in node.input:
        if not operand:
            continue
        rank_in = _need(builder.rank(operand), "input rank")
        in_axis = out_axis - (rank_y - rank_in)
        if in_axis < 0:
            continue
        dim = builder.dim(operand, in_axis)
        if dim == 1 and size != 1:
            continue  # broadcast: the same value for every channel
        if dim != size:
            raise _Stop(f"input {operand!r} has {dim} along the channel axis, not {size}")
        builder.link(y, out_axis, operand, in_axis, size)


def _concat(builder: _Builder, i: int, node: onnx.NodeProto, trigger: Slot | None) -> None:
    assert trigger is not None
    y = node.output[0]
    rank = _need(builder.rank(y), "Concat rank")
    cat = Attributes(node).get_int("axis", 0) % rank
    axis = trigger[1]
    if axis != cat:
        for x in node.input:
            builder.link(x, axis, y, axis, builder.slot_size[trigger])
        return
    total = _need(builder.dim(y, cat), "Concat output size")
    offset = 0
    for x in node.input:
        size = _need(builder.dim(x, cat), "Concat input size")
        builder.link_map(x, cat, size, y, cat, total, offset + np.arange(size))
        offset += size


def _split(builder: _Builder, i: int, node: onnx.NodeProto, trigger: Slot | None) -> None:
    assert trigger is not None
    x = node.input[0]
    rank = _need(builder.rank(x), "Split rank")
    split_axis = Attributes(node).get_int("axis", 0) % rank
    axis = trigger[1]
    if axis != split_axis:
        for y in node.output:
            builder.link(x, axis, y, axis, builder.slot_size[trigger])
        return
    total = _need(builder.dim(x, axis), "Split input size")
    offset = 0
    slots = []
    for y in node.output:
        size = _need(builder.dim(y, axis), "Split output size")
        builder.link_map(y, axis, size, x, axis, total, offset + np.arange(size))
        slots.append((y, axis))
        offset += size
    if len(node.input) > 1 and node.input[1] and not builder.is_constant(node.input[1]):
        raise _Stop("Split sizes are not a constant")
    builder.add_fixup(SplitFixup(i, tuple(slots)))


def _slice(builder: _Builder, i: int, node: onnx.NodeProto, trigger: Slot | None) -> None:
    """Slice with constant starts/ends/axes and step 1: a channel range of the input is the output."""
    assert trigger is not None
    x, y = node.input[0], node.output[0]
    rank = _need(builder.rank(x), "Slice rank")

    def constant(k: int) -> np.ndarray | None:
        return builder.constant(node.input[k]) if len(node.input) > k and node.input[k] else None

    starts, ends, axes, steps = constant(1), constant(2), constant(3), constant(4)
    if starts is None or ends is None or (len(node.input) > 3 and node.input[3] and axes is None):
        raise _Stop("Slice bounds are not constants")
    if steps is not None and np.any(steps != 1):
        raise _Stop("Slice with steps other than 1")
    if axes is None:
        axes = np.arange(len(starts))
    sliced = [int(a) % rank for a in axes]
    axis = trigger[1]
    if axis not in sliced:
        builder.link(x, axis, y, axis, builder.slot_size[trigger])
        return
    size = _need(builder.dim(x, axis), "Slice input size")
    k = sliced.index(axis)
    start = int(np.clip(starts[k] + size if starts[k] < 0 else starts[k], 0, size))
    end = int(np.clip(ends[k] + size if ends[k] < 0 else ends[k], start, size))
    builder.link_map(y, axis, end - start, x, axis, size, start + np.arange(end - start))
    builder.add_fixup(SliceFixup(i, ((x, axis), (y, axis)), node.input[1], node.input[2], position=k, start=start))


def _transpose(builder: _Builder, i: int, node: onnx.NodeProto, trigger: Slot | None) -> None:
    assert trigger is not None
    x, y = node.input[0], node.output[0]
    rank = _need(builder.rank(x), "Transpose rank")
    perm = Attributes(node).get_ints("perm", list(reversed(range(rank))))
    assert perm is not None
    size = builder.slot_size[trigger]
    if trigger[0] == x:
        builder.link(x, trigger[1], y, perm.index(trigger[1]), size)
    else:
        builder.link(x, perm[trigger[1]], y, trigger[1], size)


def _flatten_like(builder: _Builder, x: str, y: str, start: int, trigger: Slot) -> int:
    """Channel c of ``x`` (axis >= start) is a block of features of ``y``'s axis 1; returns the axis."""
    shape = builder.shapes.get(x)
    if shape is None:
        raise _Stop("input shape unknown")
    axis = trigger[1] if trigger[0] == x else start
    if axis < start:
        raise _Stop("only an axis that is flattened into the features can shrink")
    dims = [d for d in shape[start:] if d is not None]
    if len(dims) != len(shape) - start:
        raise _Stop("flattened dims are not static")
    size = dims[axis - start]
    inner = math.prod(dims[axis - start + 1 :])
    outer = math.prod(dims[: axis - start])
    features = math.prod(dims)
    blocks = np.arange(outer)[:, None] * (size * inner) + np.arange(inner)[None, :]
    to_y = np.stack([(blocks + c * inner).reshape(-1) for c in range(size)])
    builder.link_map(x, axis, size, y, 1, features, to_y)
    return axis


def _flatten(builder: _Builder, i: int, node: onnx.NodeProto, trigger: Slot | None) -> None:
    assert trigger is not None
    x, y = node.input[0], node.output[0]
    rank = _need(builder.rank(x), "Flatten rank")
    start = Attributes(node).get_int("axis", 1) % rank
    if start != 1:
        raise _Stop("only Flatten(axis=1)")
    if trigger[0] == y and trigger[1] != 1:
        raise _Stop("the batch axis of a Flatten output cannot shrink")
    _flatten_like(builder, x, y, start, trigger)


def _heads(builder: _Builder, i: int, node: onnx.NodeProto, trigger: Slot) -> bool:
    """Reshape [..., H] <-> [..., heads, H / heads] (attention): channel c belongs to head c // head_dim.

    Whole heads go together; the shape constant's head count (or width) is updated.
    Returns False when the node is not such a reshape.
    """
    x, shape_name, y = node.input[0], node.input[1], node.output[0]
    in_shape, out_shape, target = builder.shapes.get(x), builder.shapes.get(y), builder.constant(shape_name)
    if in_shape is None or out_shape is None or target is None:
        return False
    split = len(out_shape) == len(in_shape) + 1 and in_shape[1:-1] == out_shape[1:-2]
    merge = len(in_shape) == len(out_shape) + 1 and out_shape[1:-1] == in_shape[1:-2]
    if not (split or merge):
        return False
    # a dynamic dim (a sequence length) between batch and channels must be copied as it is
    middle = (in_shape if split else out_shape)[1:-1]
    if any(d is None and int(target[k]) != 0 for k, d in enumerate(middle, start=1)):
        return False
    wide, narrow = (x, y) if split else (y, x)  # [..., H] and [..., heads, head_dim]
    rank_wide = len(builder.shapes[wide])
    heads, head_dim = builder.shapes[narrow][-2], builder.shapes[narrow][-1]
    width = builder.shapes[wide][-1]
    if heads is None or head_dim is None or width != heads * head_dim:
        return False
    if trigger not in ((wide, rank_wide - 1), (narrow, rank_wide - 1)):
        raise _Stop("only whole heads can shrink through a head reshape")
    builder.link_map(wide, rank_wide - 1, width, narrow, rank_wide - 1, heads, np.arange(width) // head_dim)
    index = rank_wide - 1
    if int(target[index]) > 0:
        builder.add_fixup(CountFixup(i, ((y, index),), shape_name, position=index, input_index=1))
    return True


def _reshape(builder: _Builder, i: int, node: onnx.NodeProto, trigger: Slot | None) -> None:
    """The flattening Reshape [N, C, ...] -> [N, C*...], the attention head split/merge, and
    regrouping the axes before the last one."""
    assert trigger is not None
    x, shape_name, y = node.input[0], node.input[1], node.output[0]
    if _heads(builder, i, node, trigger):
        return
    target = builder.constant(shape_name)
    in_shape, out_shape = builder.shapes.get(x), builder.shapes.get(y)
    if target is not None and in_shape and out_shape and in_shape[-1] is not None and in_shape[-1] == out_shape[-1]:
        # only the leading axes are regrouped ([L * N, H] <-> [L, N, H]): each row stays a row
        if trigger[1] != len(builder.shapes[trigger[0]]) - 1:
            raise _Stop("only the last axis passes through a Reshape that keeps it")
        builder.link(x, len(in_shape) - 1, y, len(out_shape) - 1, builder.slot_size[trigger])
        if int(target[-1]) > 0:
            last = len(out_shape) - 1
            builder.add_fixup(CountFixup(i, ((y, last),), shape_name, position=last, input_index=1))
        return
    if target is None or in_shape is None or out_shape is None or len(out_shape) != 2 or len(in_shape) < 2:
        raise _Stop("only a Reshape that flattens [N, C, ...] to [N, features] with a constant shape")
    if out_shape[0] is not None and in_shape[0] is not None and out_shape[0] != in_shape[0]:
        raise _Stop("the Reshape mixes the batch axis into the features")
    if trigger[0] == y and trigger[1] != 1:
        raise _Stop("the batch axis cannot shrink")
    _flatten_like(builder, x, y, 1, trigger)
    if int(target[1]) > 0:
        builder.add_fixup(CountFixup(i, ((y, 1),), shape_name, position=1, input_index=1))


def _squeeze(builder: _Builder, i: int, node: onnx.NodeProto, trigger: Slot | None) -> None:
    assert trigger is not None
    x, y = node.input[0], node.output[0]
    rank_x, rank_y = _need(builder.rank(x), "rank"), _need(builder.rank(y), "rank")
    listed = Attributes(node).get_ints("axes")
    axes_value = builder.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else listed
    if axes_value is None:
        raise _Stop("axes are not constant")
    unsqueeze = node.op_type == "Unsqueeze"
    axes = sorted(int(a) % (rank_y if unsqueeze else rank_x) for a in np.atleast_1d(np.asarray(axes_value)))
    short, long = (x, y) if unsqueeze else (y, x)
    kept = [a for a in range(max(rank_x, rank_y)) if a not in axes]  # long-axis index of each short axis
    size = builder.slot_size[trigger]
    if trigger[0] == short:
        builder.link(short, trigger[1], long, kept[trigger[1]], size)
    else:
        if trigger[1] in axes:
            raise _Stop("a squeezed axis cannot carry channels")
        builder.link(short, kept.index(trigger[1]), long, trigger[1], size)


def _gather(builder: _Builder, i: int, node: onnx.NodeProto, trigger: Slot | None) -> None:
    """Gather along another axis (a token picked, an embedding looked up): channels pass."""
    assert trigger is not None
    x, indices, y = node.input[0], node.input[1], node.output[0]
    if trigger[0] == indices:
        raise _Stop("the indices carry channels")
    rank = _need(builder.rank(x), "rank")
    picked = _need(builder.rank(indices), "indices rank")
    axis = Attributes(node).get_int("axis", 0) % rank
    if trigger[0] == x:
        if trigger[1] == axis:
            raise _Stop("it selects along the channel axis")
        x_axis = trigger[1]
    elif trigger[1] < axis:
        x_axis = trigger[1]
    elif trigger[1] >= axis + picked:
        x_axis = trigger[1] - picked + 1
    else:
        raise _Stop("the indices' axes cannot shrink")
    y_axis = x_axis if x_axis < axis else x_axis + picked - 1
    builder.link(x, x_axis, y, y_axis, builder.slot_size[trigger])


def _reduce(builder: _Builder, i: int, node: onnx.NodeProto, trigger: Slot | None) -> None:
    """Reductions and Softmax/LayerNormalization over other axes keep the channels; over the
    channel axis only LayerNormalization and ReduceMean have a rule, an approximate one."""
    assert trigger is not None
    x, y = node.input[0], node.output[0]
    rank = _need(builder.rank(x), "rank")
    attrs = Attributes(node)
    dropped = False
    if node.op_type in ("Softmax", "LogSoftmax", "Hardmax"):
        reduced = {attrs.get_int("axis", -1) % rank}
    elif node.op_type == "LayerNormalization":
        start = attrs.get_int("axis", -1) % rank
        reduced = set(range(start, rank))
    else:
        dropped = not attrs.get_int("keepdims", 1)
        axes = _axes(node, builder.index, rank)
        if axes is None:
            raise _Stop("reduction over all axes, or over axes computed at run time")
        reduced = axes
    # axis k of y is axis kept[k] of x
    kept = [a for a in range(rank) if a not in reduced] if dropped else list(range(rank))
    axis = kept[trigger[1]] if trigger[0] == y else trigger[1]
    if axis not in reduced:
        builder.link(x, axis, y, kept.index(axis), builder.slot_size[trigger])
    elif node.op_type == "LayerNormalization":
        _layer_norm(builder, node, axis)
    elif node.op_type == "ReduceMean" and trigger[0] == x and not dropped:
        # a statistic over the channels (decomposed LayerNorm, RMS norm): it is taken over fewer
        # channels after a removal, and its output has none to remove
        why = f"{node.name or node.op_type} (ReduceMean) averages over these channels"
        builder.approximate.setdefault(trigger, why)
    elif node.op_type == "ReduceSum" and trigger[0] == x and reduced == {rank - 1}:
        # the same statistic as a sum (jax2tf's LayerNorm: sums times a constant 1 / C): it sums
        # over the channels left, its constant stays that of the full count
        why = f"{node.name or node.op_type} (ReduceSum) sums over these channels"
        builder.approximate.setdefault(trigger, why)
    else:
        raise _Stop(f"{node.op_type} mixes the channels")


def _layer_norm(builder: _Builder, node: onnx.NodeProto, axis: int) -> None:
    """LayerNormalization over the channel axis: approximate (see the module docstring).

    The output keeps the input's channels; scale and bias are sliced with them.
    """
    x, y = node.input[0], node.output[0]
    rank = _need(builder.rank(x), "rank")
    size = builder.dim(x, axis)
    if size is None:
        raise _Stop("the normalized size is not known statically")
    if any(out and builder.index.uses(out) for out in node.output[1:]):
        raise _Stop("its mean or inverse standard deviation output is used")
    builder.link(x, axis, y, axis, size)
    for param in node.input[1:]:
        if not param:
            continue
        if not builder.is_constant(param):
            raise _Stop("scale or bias is not a constant")
        param_axis = axis - rank + _need(builder.rank(param), "parameter rank")
        dim = builder.dim(param, param_axis) if param_axis >= 0 else 1
        if dim == size:
            builder.link(x, axis, param, param_axis, size)
        elif dim != 1:
            raise _Stop(f"parameter {param!r} has {dim} along the normalized axis, not {size}")
    what = node.name or node.op_type
    builder.approximate.setdefault((x, axis), f"{what} (LayerNormalization) normalizes over these channels")


_RECURRENT_PARAMS = {3: 2, 7: 3}
"""Input index of B and P -> how many blocks of ``hidden`` they stack (times the gates for B)."""


def _zero_state(builder: _Builder, name: str) -> bool:
    """Whether ``name`` is zeros made by ConstantOfShape: the state a recurrent op starts from
    when the input is left out (exporters write it out, its shape computed from the batch)."""
    producer = builder.index.producer(name)
    if producer is None or producer.op_type != "ConstantOfShape":
        return False
    value = next((a.t for a in producer.attribute if a.name == "value"), None)
    return value is None or not np.any(numpy_helper.to_array(value))


def _recurrent(builder: _Builder, i: int, node: onnx.NodeProto, trigger: Slot | None) -> None:
    """LSTM, GRU, RNN: hidden unit k is row g * hidden + k of every gate block g of W, R, B (and
    P), column k of R, entry k of the initial states and channel k of Y, Y_h, Y_c (their last
    axis in either layout). Input feature j of X is column j of W.

    Removing a unit whose weights are zero changes nothing: its pre-activations are zero, so
    its state stays zero (an LSTM's c = 0.5 c + 0.5 tanh(0), a GRU's h = 0.5 h from h_0 = 0,
    a vanilla RNN's tanh(0)) and its column of R adds nothing to the others. Zero initial
    states made by ConstantOfShape are dropped (an absent state is zero) instead of resized.
    """
    weight, _ = _weight(node, 1)
    gates = OPS[node.op_type].of(node).weights[0].blocks
    inputs = list(node.input) + [""] * (8 - len(node.input))
    x, w, r = inputs[0], inputs[1], inputs[2]
    if not builder.is_constant(w) or not builder.is_constant(r):
        raise _Stop("W or R is not a constant")
    hidden = Attributes(node).get_int("hidden_size", 0) or _need(builder.dim(r, 2), "hidden size")
    if trigger is not None and trigger[0] == x:
        if trigger[1] != _need(builder.rank(x), "input rank") - 1:
            raise _Stop("only the feature axis of a recurrent op's input can shrink")
        features = _need(builder.dim(w, weight.in_axis), "input size")
        builder.link(x, trigger[1], w, weight.in_axis, features)
        builder.consumer_slots.add((w, weight.in_axis))
        return
    for out in node.output:
        if trigger is not None and trigger[0] == out and trigger[1] != _need(builder.rank(out), "rank") - 1:
            raise _Stop("only the hidden axis of a recurrent op's output can shrink")
    units = np.arange(hidden)
    blocks = units[:, None] + hidden * np.arange(gates)[None, :]  # unit k -> its row of each gate
    builder.producer_slots.add((w, weight.out_axis))
    builder.link_map(r, 2, hidden, w, weight.out_axis, gates * hidden, blocks)
    builder.link_map(r, 2, hidden, r, 1, gates * hidden, blocks)
    for index, per_gate in _RECURRENT_PARAMS.items():
        param = inputs[index]
        if not param:
            continue
        if not builder.is_constant(param):
            raise _Stop(f"input {index} is not a constant")
        count = per_gate * (gates if index == 3 else 1)
        rows = units[:, None] + hidden * np.arange(count)[None, :]
        builder.link_map(r, 2, hidden, param, 1, count * hidden, rows)
    for state in (inputs[5], inputs[6] if node.op_type == "LSTM" else ""):
        if state and not _zero_state(builder, state):
            builder.link(r, 2, state, _need(builder.rank(state), "state rank") - 1, hidden)
    for out in node.output:
        if out and (builder.index.uses(out) or out in builder.index.graph_outputs):
            builder.link(r, 2, out, _need(builder.rank(out), "output rank") - 1, hidden)
    builder.add_fixup(HiddenFixup(i, ((r, 2),)))


def _embedding(builder: _Builder, i: int, node: onnx.NodeProto, trigger: Slot | None) -> None:
    """Gather from an embedding table [vocab, features] along axis 0: as a seed, feature k is
    column k of the table and the last axis's entry k of every looked-up vector (what reads
    them decides whether they can go); triggered, the Gather rule's (channels pass)."""
    if trigger is not None:
        _gather(builder, i, node, trigger)
        return
    table, indices, y = node.input[0], node.input[1], node.output[0]
    tensor = builder.index.tensor(table)
    if builder.is_constant(indices) or tensor is None or len(tensor.dims) < 2 or tensor.data_type not in FLOAT_DTYPES:
        return  # a constant lookup (shape arithmetic) or no table of weights: nothing to seed
    if Attributes(node).get_int("axis", 0) != 0:
        return
    rank_t = _need(builder.rank(table), "table rank")
    features = _need(builder.dim(table, rank_t - 1), "table features")
    rank_y = _need(builder.rank(y), "lookup rank")
    builder.producer_slots.add((table, rank_t - 1))
    builder.link(y, rank_y - 1, table, rank_t - 1, features)


_SEED_RULES: dict[ChannelRule, Rule] = {
    ChannelRule.CONV: _conv,
    ChannelRule.GEMM: _gemm,
    ChannelRule.MATMUL: _matmul,
    ChannelRule.RECURRENT: _recurrent,
    ChannelRule.EMBEDDING: _embedding,
}
"""The rule each op declaration (``_ops.OPS``) names: how channels pass through its weights."""


def _seed_rule(declaration: OpDeclaration) -> Rule:
    return _SEED_RULES[declaration.channel_rule]


_UNARY = """Relu LeakyRelu PRelu Sigmoid Tanh Clip HardSigmoid HardSwish Elu Selu Celu Softplus Softsign Erf Gelu
Mish Exp Log Abs Neg Sqrt Reciprocal Identity Dropout Cast Floor Ceil Round Sign ThresholdedRelu Sin Cos""".split()
RULES: dict[str, Rule] = {
    **{op_type: _seed_rule(declaration) for op_type, declaration in OPS.items()},
    **{op: _same_shape for op in _UNARY if op != "PRelu"},
    **{op: _channel_only for op in "MaxPool AveragePool GlobalAveragePool GlobalMaxPool LpPool Resize Pad".split()},
    "BatchNormalization": _normalization,
    "InstanceNormalization": _normalization,
    **{op: _elementwise for op in "Add Sub Mul Div Max Min Sum Mean Pow PRelu Where".split()},
    "Concat": _concat,
    "Split": _split,
    "Transpose": _transpose,
    "Slice": _slice,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Squeeze": _squeeze,
    "Unsqueeze": _squeeze,
    **{
        op: _reduce
        for op in "ReduceMean ReduceSum ReduceMax ReduceMin Softmax LogSoftmax Hardmax LayerNormalization".split()
    },
}


# --- applying ---------------------------------------------------------------------------------------


def _remaining(structure: Structure, removed: np.ndarray, slot: Slot) -> np.ndarray:
    """Positions of ``slot`` that stay."""
    return np.flatnonzero(~np.isin(structure.atoms(slot), removed))


NEUTRAL = {"Div": 1.0, "Pow": 1.0}
"""Value that makes a per-channel operand of these ops harmless when zeroing (x / 1)."""


def zero_components(model: onnx.ModelProto, structure: Structure, removed: Sequence[int]) -> onnx.ModelProto:
    """A copy of ``model`` whose weights for ``removed`` components are zero (shapes kept).

    Removing those components from this copy must not change its outputs: the
    invariant the op-rule tests check.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    removed_array = np.asarray(removed, dtype=np.int64)
    neutral_params = _neutral_params(out)
    for name, array in _param_arrays(out).items():
        changed = False
        for tensor, axis in structure.slot_base:
            if tensor != name:
                continue
            positions = np.flatnonzero(np.isin(structure.atoms((tensor, axis)), removed_array))
            if len(positions):
                np.moveaxis(array, axis, 0)[positions] = neutral_params.get(name, 0.0)
                changed = True
        if changed:
            _set_param(out, name, array)
    return out


def mask_norms(model: onnx.ModelProto, structure: Structure) -> tuple[onnx.ModelProto, dict[str, Slot]]:
    """A copy of ``model`` whose approximate norms take their statistics over the channels a
    keep-mask marks, and the mask initializers (all ones here) with the slot each masks.

    With the masks zero at removed channels, zeroing the removed components of this model gives
    what removing them does (the invariant the approximate rules lack): the full-shape model a
    refit is fitted on then behaves like the model that gets written. LayerNormalization over
    the last axis, ReduceMean over it (keepdims) and ReduceSum over it are rewritten; any other
    is left alone.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 0)
    index = GraphIndex.build(graph)
    masks: dict[str, Slot] = {}
    nodes: list[onnx.NodeProto] = []
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types = {
        v.name: v.type.tensor_type
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        if v.type.tensor_type.HasField("shape")
    }
    for node in graph.node:
        x = node.input[0] if node.input else ""
        slot = next(((name, a) for (name, a) in structure.approximate if name == x), None)
        rank = len(types[x].shape.dim) if x in types else 0
        last = rank - 1
        attrs = Attributes(node)
        norm = node.op_type == "LayerNormalization" and attrs.get_int("axis", -1) % max(rank, 1) == last
        keepdims = bool(attrs.get_int("keepdims", 1))
        mean = node.op_type == "ReduceMean" and keepdims and _axes(node, index, rank) == {last}
        total = node.op_type == "ReduceSum" and _axes(node, index, rank) == {last}
        if slot is None or slot[1] != last or node.domain not in ("", "ai.onnx") or not (norm or mean or total):
            nodes.append(node)
            continue
        dtype = helper.tensor_dtype_to_np_dtype(types[x].elem_type)
        mask = f"{x}__keep"
        if mask not in masks:
            graph.initializer.append(numpy_helper.from_array(np.ones(structure.slot_size[slot], dtype), mask))
            masks[mask] = slot
        if total:  # a sum over the kept channels is the sum of the masked input
            masked = f"{node.output[0]}__masked{len(nodes)}"
            nodes.append(helper.make_node("Mul", [x, mask], [masked]))
            summed = onnx.NodeProto()
            summed.CopyFrom(node)
            summed.input[0] = masked
            nodes.append(summed)
            continue
        nodes.extend(_masked(node, mask, last, opset, len(nodes), dtype))
    del graph.node[:]
    graph.node.extend(nodes)
    return out, masks


def _axes(node: onnx.NodeProto, index: GraphIndex, rank: int) -> set[int] | None:
    """The axes a reduction names (attribute or constant input), None if it names none statically."""
    listed = Attributes(node).get_ints("axes")
    value = None if listed is None else np.array(listed)
    if value is None and len(node.input) > 1 and node.input[1]:
        value = index.value(node.input[1])
    return None if value is None else {int(a) % rank for a in np.atleast_1d(value)}


_AttributeValue = onnx.TensorProto | int | list[int]


def _masked(node: onnx.NodeProto, mask: str, axis: int, opset: int, tag: int, dtype: np.dtype) -> list[onnx.NodeProto]:
    """``node`` (LayerNormalization or ReduceMean over ``axis``) as statistics over the channels ``mask`` keeps."""
    prefix = f"{node.output[0]}__masked{tag}"
    made: list[onnx.NodeProto] = []

    def op(op_type: str, inputs: list[str], output: str | None = None, **attrs: _AttributeValue) -> str:
        name = output or f"{prefix}_{len(made)}"
        new = helper.make_node(op_type, inputs, [name])
        new.attribute.extend(helper.make_attribute(key, value) for key, value in attrs.items())
        made.append(new)
        return name

    def channel_sum(x: str) -> str:  # ReduceSum over ``axis``, keepdims
        if opset >= 13:
            axes = op("Constant", [], value=numpy_helper.from_array(np.array([axis], np.int64)))
            return op("ReduceSum", [x, axes], keepdims=1)
        return op("ReduceSum", [x], axes=[axis], keepdims=1)

    kept = op("ReduceSum", [mask], keepdims=1) if opset >= 13 else op("ReduceSum", [mask], axes=[0], keepdims=1)
    x = node.input[0]
    if node.op_type == "ReduceMean":
        op("Div", [channel_sum(op("Mul", [x, mask])), kept], node.output[0])
        return made
    eps = Attributes(node).get_float("epsilon", 1e-5)
    mean = op("Div", [channel_sum(op("Mul", [x, mask])), kept])
    centred = op("Mul", [op("Sub", [x, mean]), mask])
    var = op("Div", [channel_sum(op("Mul", [centred, centred])), kept])
    eps_name = op("Constant", [], value=numpy_helper.from_array(np.array(eps, dtype)))
    normed = op("Div", [centred, op("Sqrt", [op("Add", [var, eps_name])])])
    scaled = op("Mul", [normed, node.input[1]])
    if len(node.input) > 2 and node.input[2]:
        op("Add", [scaled, node.input[2]], node.output[0])
    else:
        op("Identity", [scaled], node.output[0])
    return made


def remove_components(
    model: onnx.ModelProto, structure: Structure, removed: Sequence[int], *, copy: bool = True
) -> onnx.ModelProto:
    """A copy of ``model`` without the ``removed`` components: tensors sliced, counts fixed, shapes
    refreshed. ``copy=False`` changes ``model`` itself (for a copy the caller made anyway)."""
    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    else:
        out = model
    removed_array = np.asarray(removed, dtype=np.int64)
    for name, array in _param_arrays(out).items():
        sliced = array
        for (tensor, axis), _ in structure.slot_base.items():
            if tensor == name:
                sliced = np.take(sliced, _remaining(structure, removed_array, (tensor, axis)), axis=axis)
        if sliced.shape != array.shape:
            _set_param(out, name, sliced)
    graph = out.graph
    shape_values: dict[int, np.ndarray] = {}
    replaced: set[str] = set()
    for fix in structure.fixups:
        node = graph.node[fix.node]
        counts = [len(_remaining(structure, removed_array, slot)) for slot in fix.slots]
        if isinstance(fix, GroupFixup):
            for attr in node.attribute:
                if attr.name == "group":
                    attr.i = counts[0]
        elif isinstance(fix, HiddenFixup):
            for attr in node.attribute:
                if attr.name == "hidden_size":
                    attr.i = counts[0]
            for k in (5, 6):
                if k < len(node.input) and node.input[k] and _made_zeros(graph, node.input[k]):
                    node.input[k] = ""
        elif isinstance(fix, SliceFixup):
            kept_in = _remaining(structure, removed_array, fix.slots[0])
            new_start = int(np.count_nonzero(kept_in < fix.start))
            bounds = {fix.starts: new_start, fix.ends: new_start + counts[1]}
            for index, (name, value) in enumerate(bounds.items(), start=1):
                values = _param_arrays(model, {name})[name].copy()
                values[fix.position] = value
                own = f"{name}__{node.name or fix.node}"
                graph.initializer.append(numpy_helper.from_array(values, own))
                node.input[index] = own
                replaced.add(name)
        elif isinstance(fix, SplitFixup):
            if len(node.input) > 1 and node.input[1]:
                # the exporter shares equal sizes between Splits (YOLOv8's C2f blocks): give this node its own
                sizes_name = node.input[1]
                own = f"{sizes_name}__{node.name or fix.node}"
                graph.initializer.append(numpy_helper.from_array(np.array(counts, dtype=np.int64), own))
                node.input[1] = own
                replaced.add(sizes_name)
            else:
                for attr in node.attribute:
                    if attr.name == "split":
                        del attr.ints[:]
                        attr.ints.extend(counts)
        else:  # an entry of a shape-like constant (Reshape shape, Resize sizes)
            # shape constants are often shared (every head split of a model): give this node its own
            shape_name = fix.constant
            target = shape_values.setdefault(fix.node, _param_arrays(model, {shape_name})[shape_name].copy())
            target[fix.position] = counts[0]
            own = f"{shape_name}__{node.name or fix.node}"
            if own not in {t.name for t in graph.initializer}:
                graph.initializer.append(numpy_helper.from_array(target, own))
            else:
                _set_param(out, own, target)
            node.input[fix.input_index] = own
            replaced.add(shape_name)
    used = {name for node in graph.node for name in node.input} | {v.name for v in graph.output}
    for k in reversed(range(len(graph.initializer))):
        if graph.initializer[k].name in replaced and graph.initializer[k].name not in used:
            del graph.initializer[k]
    for k in reversed(range(len(graph.node))):
        node = graph.node[k]
        if node.op_type == "Constant" and node.output[0] in replaced and node.output[0] not in used:
            del graph.node[k]
    del graph.value_info[:]
    return out


def _made_zeros(graph: onnx.GraphProto, name: str) -> bool:
    """Whether ``name`` is the output of a ConstantOfShape filling zeros."""
    producer = next((n for n in graph.node if name in n.output), None)
    if producer is None or producer.op_type != "ConstantOfShape":
        return False
    value = next((a.t for a in producer.attribute if a.name == "value"), None)
    return value is None or not np.any(numpy_helper.to_array(value))


def _param_arrays(model: onnx.ModelProto, names: set[str] | None = None) -> dict[str, np.ndarray]:
    """Writable copies of the initializers and Constant values (``names`` only, if given)."""
    index = GraphIndex.build(model.graph)
    out = {}
    for name in index.constant_names() if names is None else names:
        value = index.value(name)
        if value is not None:
            out[name] = value.copy()
    return out


def set_params(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray]) -> int:
    """Write ``arrays`` over the initializers or Constant nodes of those names (one pass); how many
    were written."""
    written = 0
    for tensor in model.graph.initializer:
        if tensor.name in arrays:
            tensor.CopyFrom(numpy_helper.from_array(arrays[tensor.name], tensor.name))
            written += 1
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in arrays:
            for attr in node.attribute:
                if attr.name == "value":
                    attr.t.CopyFrom(numpy_helper.from_array(arrays[node.output[0]], node.output[0]))
                    written += 1
    return written


def _set_param(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    if not set_params(model, {name: array}):
        raise KeyError(name)


def _neutral_params(model: onnx.ModelProto) -> dict[str, float]:
    out = {}
    for node in model.graph.node:
        value = NEUTRAL.get(node.op_type)
        if value is not None:
            for name in node.input[1:]:
                out[name] = value
    return out
