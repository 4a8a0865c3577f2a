"""N:M semi-structured zeroing: in every group of M consecutive weights along a layer's
reduction axis (the input channels), keep the N that score highest.

Runtimes with sparse tensor cores (2:4 on NVIDIA Ampere and later) run such layers
faster; onnxruntime's CPU kernels do not. A layer is either N:M or dense, so the
search chooses which layers to convert: they are ranked by a label-free probe of
the output deviation each causes alone, per weight it zeroes, and the search
bisects how far down that ranking to go.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ._analysis import PrunableWeight

__all__ = ["NMSpace", "NMUnit", "nm_mask", "reduction_axis"]


def reduction_axis(layer: PrunableWeight) -> int:
    """The axis the layer sums over: its op declaration's input-channel axis (``_ops``).

    A weight known by its shape and output axis alone (a plan's replay) is taken as a matrix's
    (the other axis), a batched MatMul weight's (output on the last axis: the one before it) or
    a conv's (the input channels). A 3-D constant first operand of a MatMul cannot be told from
    a 1-D ConvTranspose's weight that way and is taken as the latter.
    """
    rank = len(layer.shape)
    if layer.input_axis is not None:
        return layer.input_axis % rank
    out = layer.channel_axis % rank
    if rank == 2:
        return 1 - out
    if out == rank - 1:
        return rank - 2
    return 1 if out == 0 else 0


def nm_mask(layer: PrunableWeight, scores: np.ndarray, n: int, m: int) -> np.ndarray | None:
    """Per-element mask (True = pruned) keeping the ``n`` best of every ``m`` along the reduction
    axis; None when that axis is not a multiple of ``m``."""
    axis = reduction_axis(layer)
    if layer.shape[axis] % m:
        return None
    moved = np.moveaxis(scores.reshape(layer.shape), axis, -1)
    groups = moved.reshape(-1, m)
    order = np.argsort(groups, axis=1, kind="stable")
    mask = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(mask, order[:, : m - n], True, axis=1)
    return np.ascontiguousarray(np.moveaxis(mask.reshape(moved.shape), -1, axis))


class NMSpace:
    """Configs are 0/1 per layer (dense or N:M); levels convert the cheapest layers first."""

    def __init__(self, layers: Sequence[PrunableWeight], nonzero: Sequence[int], zeroed: Sequence[int]) -> None:
        self.layer_list = list(layers)
        self.nonzero_before = list(nonzero)
        self.zeroed = list(zeroed)
        self.total_params = sum(layer.params for layer in layers)
        self.order = list(range(len(layers)))

    def rank(self, cost: Callable[[int], float]) -> None:
        """Order layers by ``cost(i)`` per weight zeroed, cheapest first (layers that zero nothing last)."""
        self.order = sorted(
            range(self.n_layers), key=lambda i: (cost(i) / self.zeroed[i] if self.zeroed[i] else np.inf, i)
        )

    @property
    def n_layers(self) -> int:
        return len(self.layer_list)

    @property
    def max_level(self) -> float:
        return sum(self.zeroed) / self.total_params if self.total_params else 0.0

    def empty(self) -> tuple[int, ...]:
        return (0,) * self.n_layers

    def one(self, i: int) -> tuple[int, ...]:
        return tuple(int(j == i) for j in range(self.n_layers))

    def at_level(self, level: float) -> tuple[int, ...]:
        config = [0] * self.n_layers
        target = level * self.total_params
        placed = 0
        for i in self.order:
            if placed >= target - 1e-9 or not self.zeroed[i]:
                break
            config[i] = 1
            placed += self.zeroed[i]
        return tuple(config)

    def layer_nonzero(self, i: int, amount: int) -> int:
        return self.nonzero_before[i] - (self.zeroed[i] if amount else 0)

    def nonzero(self, config: tuple[int, ...]) -> int:
        return sum(self.layer_nonzero(i, a) for i, a in enumerate(config))

    def sparsity(self, config: tuple[int, ...]) -> float:
        zeroed = sum(self.zeroed[i] for i, a in enumerate(config) if a)
        return zeroed / self.total_params if self.total_params else 0.0

    def push(self, config: tuple[int, ...], layer_ids: Sequence[int], step: float) -> tuple[int, ...]:
        return tuple(1 if i in layer_ids and self.zeroed[i] else a for i, a in enumerate(config))

    def blend(self, config: tuple[int, ...], targets: Sequence[float], t: float) -> tuple[int, ...]:
        pairs = enumerate(zip(config, targets, strict=True))
        return tuple(round(a + t * (goal - a)) if self.zeroed[i] else 0 for i, (a, goal) in pairs)

    def shares(self, config: tuple[int, ...]) -> list[float]:
        return [float(a) for a in config]


@dataclass(frozen=True)
class NMUnit:
    """A layer of an N:M space as the report sees it: one unit, converted or not."""

    layer: PrunableWeight
    units: int = 1
