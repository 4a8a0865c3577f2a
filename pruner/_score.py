"""Scoring criteria: one score per prunable unit (element or output channel).

Scorers are plug-ins: a function from a layer and its float32 weight to unit
scores. Lower scores are pruned first; ties go to the lower index (see :func:`lowest`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import numpy as np

from ._analysis import PrunableWeight
from ._options import Criterion

__all__ = ["SCORERS", "Granularity", "granularity", "lowest", "unit_scores"]


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


def lowest(scores: np.ndarray, amount: int) -> np.ndarray:
    """Boolean mask of the ``amount`` lowest-scoring units: the prune order.

    Ties go to the lower index and NaN scores count as +inf, so the mask is
    exactly the first ``amount`` entries of a stable argsort. Computed with a
    partition (O(n), no index array kept), which is what lets the search hold
    nothing per layer beyond the weights themselves.
    """
    n = len(scores)
    mask = np.zeros(n, dtype=bool)
    if amount <= 0:
        return mask
    if amount >= n:
        mask[:] = True
        return mask
    if np.isnan(scores).any():
        scores = np.where(np.isnan(scores), np.inf, scores)
    kth = np.partition(scores, amount - 1)[amount - 1]
    np.less(scores, kth, out=mask)
    need = amount - int(np.count_nonzero(mask))
    mask[np.flatnonzero(scores == kth)[:need]] = True
    return mask
