"""One small index over an ONNX graph: who produces and who consumes each tensor, the value of
every constant, and a node's attributes read with their types.

Built once per model; every graph question in the library goes through it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["Attributes", "GraphIndex", "Use", "declared_shape", "keep_needed", "reads"]

ONNX_DOMAINS = ("", "ai.onnx")
"""The default domain, spelled both ways."""


class Attributes:
    """The attributes of a node, read with their types and a default for each missing one."""

    def __init__(self, node: onnx.NodeProto) -> None:
        self._by_name = {a.name: a for a in node.attribute}

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def get_int(self, name: str, default: int) -> int:
        attr = self._by_name.get(name)
        return default if attr is None else int(attr.i)

    def get_float(self, name: str, default: float) -> float:
        attr = self._by_name.get(name)
        return default if attr is None else float(attr.f)

    def get_str(self, name: str, default: str) -> str:
        attr = self._by_name.get(name)
        return default if attr is None else attr.s.decode("utf-8", errors="replace")

    def get_ints(self, name: str, default: Sequence[int] | None = None) -> list[int] | None:
        """The list, or ``default`` (None unless given) when the node has no such attribute."""
        attr = self._by_name.get(name)
        if attr is None:
            return None if default is None else list(default)
        return [int(v) for v in attr.ints]


def declared_shape(value: onnx.ValueInfoProto) -> tuple[int | None, ...]:
    """The declared shape of a tensor value, None for every dynamic dim: symbolic, unset, or a
    negative size, which some exporters (paddle2onnx) write for a dynamic batch."""
    return tuple(
        d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in value.type.tensor_type.shape.dim
    )


@dataclass(frozen=True)
class Use:
    """One consumption of a tensor: ``node.input[index]``; ``in_subgraph`` if inside If/Loop/Scan."""

    node: onnx.NodeProto
    index: int
    in_subgraph: bool = False


@dataclass
class GraphIndex:
    """Producers, consumers, initializers and Constant nodes of the main graph.

    Node positions are indices into ``graph.node`` as it was when the index was built.
    """

    graph: onnx.GraphProto
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    constants: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[Use]] = field(default_factory=lambda: defaultdict(list))
    producers: dict[str, int] = field(default_factory=dict)
    """Tensor name -> position of the node that computes it."""
    positions: dict[int, int] = field(default_factory=dict)
    """``id(node)`` -> its position in ``graph.node``."""
    graph_inputs: set[str] = field(default_factory=set)
    graph_outputs: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, graph: onnx.GraphProto) -> GraphIndex:
        index = cls(graph)
        index.initializers = {t.name: t for t in graph.initializer}
        index.graph_inputs = {v.name for v in graph.input}
        index.graph_outputs = {v.name for v in graph.output}
        for position, node in enumerate(graph.node):
            index.positions[id(node)] = position
            for out in node.output:
                if out:
                    index.producers[out] = position
            if node.op_type == "Constant" and node.domain in ONNX_DOMAINS:
                index.constants[node.output[0]] = node
            for i, name in enumerate(node.input):
                if name:
                    index.consumers[name].append(Use(node, i))
            for sub_name in _subgraph_inputs(node):
                index.consumers[sub_name].append(Use(node, -1, in_subgraph=True))
        return index

    def tensor(self, name: str) -> onnx.TensorProto | None:
        """The value of an initializer or Constant node (None for anything computed)."""
        if name in self.initializers:
            return self.initializers[name]
        node = self.constants.get(name)
        if node is not None:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    return attr.t
        return None

    def value(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node as an array (None for anything computed).

        A read-only view when numpy can give one: copy it before writing to it.
        """
        tensor = self.tensor(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or name in self.constants

    def constant_names(self) -> list[str]:
        """Initializers, then Constant node outputs, in graph order."""
        return [*self.initializers, *(n for n in self.constants if n not in self.initializers)]

    def producer(self, name: str) -> onnx.NodeProto | None:
        """The node computing ``name`` (None for graph inputs, initializers and unknown names)."""
        position = self.producers.get(name)
        return None if position is None else self.graph.node[position]

    def position(self, node: onnx.NodeProto) -> int:
        """Where ``node`` stands in ``graph.node``."""
        return self.positions[id(node)]

    def uses(self, name: str) -> list[Use]:
        return self.consumers.get(name, [])

    def node_name(self, node: onnx.NodeProto) -> str:
        return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


def keep_needed(graph: onnx.GraphProto, outputs: Iterable[str], *, inputs_too: bool = False) -> None:
    """Remove the nodes and initializers (with ``inputs_too`` the graph inputs) that ``outputs``
    do not depend on: one backward pass over the graph's topological order, counting what
    subgraphs read from the outer scope."""
    needed = set(outputs)
    dead = []
    for k in reversed(range(len(graph.node))):
        node = graph.node[k]
        if any(o in needed for o in node.output):
            needed.update(reads(node))
        else:
            dead.append(k)
    for k in dead:  # descending
        del graph.node[k]
    if not inputs_too:
        needed |= {v.name for v in graph.input}
    for field_ in (graph.initializer, graph.input) if inputs_too else (graph.initializer,):
        for k in reversed(range(len(field_))):
            if field_[k].name not in needed:
                del field_[k]


def reads(node: onnx.NodeProto) -> list[str]:
    """The names a node reads: its inputs, and what its subgraphs read from the outer scope."""
    return [name for name in node.input if name] + list(_subgraph_inputs(node))


def _subgraph_inputs(node: onnx.NodeProto) -> Iterator[str]:
    """Outer-scope names read inside the node's subgraphs."""
    for attr in node.attribute:
        subgraphs = list(attr.graphs)
        if attr.HasField("g"):
            subgraphs.append(attr.g)
        for sub in subgraphs:
            yield from _free_names(sub)


def _free_names(graph: onnx.GraphProto) -> Iterator[str]:
    local = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        for name in node.input:
            if name and name not in local:
                yield name
        yield from _subgraph_inputs(node)
        local.update(node.output)
