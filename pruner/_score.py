"""Scoring criteria: one score per prunable unit (element or output channel).

Scorers are plug-ins: a function from a layer and its float32 weight to unit
scores. Lower scores are pruned first; ties go to the lower index.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import numpy as np

from ._analysis import PrunableWeight
from ._options import Criterion

__all__ = ["SCORERS", "Granularity", "granularity", "unit_scores"]


class Granularity(enum.Enum):
    """What one prunable unit is."""

    ELEMENT = "element"
    CHANNEL = "channel"


Scorer = Callable[[PrunableWeight, np.ndarray], np.ndarray]


def _magnitude(layer: PrunableWeight, weight: np.ndarray) -> np.ndarray:
    return np.abs(weight).reshape(-1)


def _channel_norm(order: int) -> Scorer:
    def score(layer: PrunableWeight, weight: np.ndarray) -> np.ndarray:
        rows = np.moveaxis(weight, layer.channel_axis, 0).reshape(layer.channels, -1)
        return np.linalg.norm(rows, ord=order, axis=1).astype(np.float32)

    return score


SCORERS: dict[Criterion, tuple[Granularity, Scorer]] = {
    Criterion.MAGNITUDE: (Granularity.ELEMENT, _magnitude),
    Criterion.L1: (Granularity.CHANNEL, _channel_norm(1)),
    Criterion.L2: (Granularity.CHANNEL, _channel_norm(2)),
}


def granularity(criterion: Criterion) -> Granularity:
    return SCORERS[criterion][0]


def unit_scores(criterion: Criterion, layer: PrunableWeight, weight: np.ndarray) -> np.ndarray:
    """Float32 score of every unit of ``layer`` (flattened elements or channels)."""
    return SCORERS[criterion][1](layer, weight.astype(np.float32, copy=False))


def prune_order(scores: np.ndarray) -> np.ndarray:
    """Unit indices from the first to prune to the last (stable: ties by index)."""
    order = np.argsort(scores, kind="stable")
    return order.astype(np.int32) if len(order) < 2**31 else order
