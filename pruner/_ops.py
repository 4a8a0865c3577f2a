"""One declaration per op type that carries weights: everything a stage needs to know of it.

Analysis reads which inputs are weights and their output-channel axes; the N:M mode the
input-channel (reduction) axes; the channel rules (``_structure``) which weight axis meets
which activation axis, the groups, and which rule propagates channels through the node;
recovery how to turn the input into rows, one per output the weight computes. Axes that
depend on attributes (Gemm's ``transA``/``transB``, a conv's ``group``) are computed from
the node's typed attributes.

Adding an op is adding an entry to ``OPS`` (and, if no existing one fits, its channel rule
in ``_structure``), with its tests in ``tests/pruner/test_ops.py``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import onnx

from ._graph import ONNX_DOMAINS, Attributes

__all__ = [
    "OPS",
    "RECURRENT_GATES",
    "ChannelRule",
    "OpDeclaration",
    "OpLayout",
    "Unfold",
    "WeightSlot",
    "declaration",
    "layout_of",
]


class Unfold(enum.Enum):
    """How recovery turns a layer's input into rows, one per output the weight computes."""

    LAST_AXIS = "last_axis"
    """x[..., K] -> rows [-1, K] (MatMul, Gemm)."""
    TRANSPOSED = "transposed"
    """x[..., K, M] -> rows over the last two axes swapped (Gemm with transA, a weight that is
    the first operand of a MatMul or Gemm)."""
    IM2COL = "im2col"
    """A conv's receptive fields, in the weight's (channel, kernel...) order."""
    TRANSPOSED_CONV = "transposed_conv"
    """A transposed conv's input dilated by its strides and padded: the receptive fields of the
    equivalent conv, whose weight is the transposed conv's flipped and swapped to [out, in, k...]."""
    SEQUENCE = "sequence"
    """A recurrent op's input X: one row per (step, sequence), x_t, read by every gate of W."""
    STATE = "state"
    """A recurrent op's previous hidden state h_{t-1} (its output Y shifted by one step, with
    initial_h first; both directions), one column block per direction and gate of R: a GRU's
    hidden gate without ``linear_before_reset`` reads r_t * h_{t-1}."""


class ChannelRule(enum.Enum):
    """The rule of ``_structure.RULES`` that propagates channels through the op."""

    CONV = "conv"
    GEMM = "gemm"
    MATMUL = "matmul"
    RECURRENT = "recurrent"
    EMBEDDING = "embedding"


@dataclass(frozen=True)
class WeightSlot:
    """One weight operand of a node and how its axes meet the node's other tensors.

    Axes may be negative (counted from the end: MatMul's operands have any rank).
    """

    input: int
    """Index of the weight in ``node.input``."""
    out_axis: int
    """The weight's output-channel axis: zeroing a slice along it zeroes a slice of the output."""
    in_axis: int
    """The weight's input-channel (reduction) axis."""
    output_axis: int
    """The axis of ``node.output[0]`` that ``out_axis`` feeds."""
    data: int
    """Index in ``node.input`` of the operand the weight multiplies."""
    data_axis: int
    """The axis of that operand that ``in_axis`` sums over."""
    unfold: Unfold | None
    """How recovery unfolds the data operand into rows; None: recovery leaves this weight alone."""
    blocks: int = 0
    """Scoring blocks: 0 (most ops) ranks the weight's units all at once; n >= 1 says ``out_axis``
    stacks n equal blocks (a recurrent op's gates), and each block of each index of the axes
    before ``out_axis`` (the directions) is ranked on its own, so that every block loses the
    same share of its weights (``_score``)."""


@dataclass(frozen=True)
class OpLayout:
    """The weights of one node, given its attributes."""

    weights: tuple[WeightSlot, ...]
    groups: int = 1

    def slot(self, input_index: int) -> WeightSlot | None:
        """The declaration of ``node.input[input_index]`` if it is a weight operand."""
        return next((w for w in self.weights if w.input == input_index), None)


@dataclass(frozen=True)
class OpDeclaration:
    """What every stage knows of one op type."""

    op_type: str
    layout: Callable[[Attributes], OpLayout]
    channel_rule: ChannelRule

    def of(self, node: onnx.NodeProto) -> OpLayout:
        return self.layout(Attributes(node))


def _conv(attrs: Attributes) -> OpLayout:
    # W [C_out, C_in / group, k...]
    return OpLayout(
        (WeightSlot(1, 0, 1, output_axis=1, data=0, data_axis=1, unfold=Unfold.IM2COL),),
        groups=attrs.get_int("group", 1),
    )


def _conv_transpose(attrs: Attributes) -> OpLayout:
    # W [C_in, C_out / group, k...]
    return OpLayout(
        (WeightSlot(1, 1, 0, output_axis=1, data=0, data_axis=1, unfold=Unfold.TRANSPOSED_CONV),),
        groups=attrs.get_int("group", 1),
    )


def _gemm(attrs: Attributes) -> OpLayout:
    # Y[M, N] = A'[M, K] B'[K, N] (+ C): A' = A.T with transA, B' = B.T with transB
    trans_a, trans_b = bool(attrs.get_int("transA", 0)), bool(attrs.get_int("transB", 0))
    a_rows, a_depth = (1, 0) if trans_a else (0, 1)  # the M and K axes of A
    b_depth, b_columns = (1, 0) if trans_b else (0, 1)  # the K and N axes of B
    return OpLayout(
        (
            WeightSlot(
                0,
                a_rows,
                a_depth,
                output_axis=0,
                data=1,
                data_axis=b_depth,
                # one output column reads a column of B' (a row of B with transB)
                unfold=Unfold.LAST_AXIS if trans_b else Unfold.TRANSPOSED,
            ),
            WeightSlot(
                1,
                b_columns,
                b_depth,
                output_axis=1,
                data=0,
                data_axis=a_depth,
                unfold=Unfold.TRANSPOSED if trans_a else Unfold.LAST_AXIS,
            ),
        )
    )


def _matmul(attrs: Attributes) -> OpLayout:
    # Y[..., M, N] = A[..., M, K] B[..., K, N]
    return OpLayout(
        (
            WeightSlot(0, -2, -1, output_axis=-2, data=1, data_axis=-2, unfold=Unfold.TRANSPOSED),
            WeightSlot(1, -1, -2, output_axis=-1, data=0, data_axis=-1, unfold=Unfold.LAST_AXIS),
        )
    )


RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
"""Gate blocks stacked along a recurrent op's W and R (LSTM: i, o, f, c; GRU: z, r, h)."""


def _recurrent(gates: int) -> Callable[[Attributes], OpLayout]:
    def layout(attrs: Attributes) -> OpLayout:
        # W [directions, gates * hidden, input], R [directions, gates * hidden, hidden];
        # Y [seq, directions, batch, hidden] (layout=1: [batch, seq, directions, hidden]).
        # Row g * hidden + k of gate block g feeds hidden unit k (Y's last axis) through the
        # gate. R multiplies the hidden state, whose first value is initial_h (input 5).
        # Recovery refits each gate's pre-activation: W on the steps' inputs, R on the
        # previous hidden states.
        return OpLayout(
            (
                WeightSlot(1, 1, 2, output_axis=-1, data=0, data_axis=-1, unfold=Unfold.SEQUENCE, blocks=gates),
                WeightSlot(2, 1, 2, output_axis=-1, data=5, data_axis=-1, unfold=Unfold.STATE, blocks=gates),
            )
        )

    return layout


def _gather(attrs: Attributes) -> OpLayout:
    # an embedding table [vocab, ...features] read along axis 0: y[..., f] = table[ids, f], the
    # product of one-hot ids [..., vocab] by the table. Zeroing feature f zeroes y[..., f] for
    # every token, so the features are the output channels and the vocabulary the reduction
    # axis. Gather along another axis selects channels: no weight.
    if attrs.get_int("axis", 0) != 0:
        return OpLayout(())
    return OpLayout((WeightSlot(0, -1, 0, output_axis=-1, data=1, data_axis=-1, unfold=None),))


OPS: dict[str, OpDeclaration] = {
    "Conv": OpDeclaration("Conv", _conv, ChannelRule.CONV),
    "ConvTranspose": OpDeclaration("ConvTranspose", _conv_transpose, ChannelRule.CONV),
    "Gemm": OpDeclaration("Gemm", _gemm, ChannelRule.GEMM),
    "MatMul": OpDeclaration("MatMul", _matmul, ChannelRule.MATMUL),
    **{op: OpDeclaration(op, _recurrent(gates), ChannelRule.RECURRENT) for op, gates in RECURRENT_GATES.items()},
    "Gather": OpDeclaration("Gather", _gather, ChannelRule.EMBEDDING),
}


def declaration(node: onnx.NodeProto) -> OpDeclaration | None:
    """The declaration of ``node``'s op type (None for ops without weights and other domains)."""
    return OPS.get(node.op_type) if node.domain in ONNX_DOMAINS else None


def layout_of(node: onnx.NodeProto) -> OpLayout | None:
    """The weights of ``node`` as its declaration and attributes give them."""
    found = declaration(node)
    return None if found is None else found.of(node)
