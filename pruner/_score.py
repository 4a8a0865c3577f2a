"""Scoring criteria: one score per prunable unit (element or output channel).

Scorers are plug-ins: a function from a layer and its float32 weight to unit
scores. Lower scores are pruned first; ties go to the lower index (see :func:`lowest`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Protocol

import numpy as np

from ._analysis import PrunableWeight
from ._options import GRADIENT_CRITERIA, Criterion

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
    Criterion.ACTIVATION: (Granularity.ELEMENT, _magnitude),  # scaled by input norms in unit_scores
    Criterion.GRADIENT: (Granularity.ELEMENT, _magnitude),  # the gradient scores in unit_scores
    Criterion.FISHER: (Granularity.ELEMENT, _magnitude),
}


def granularity(criterion: Criterion) -> Granularity:
    return SCORERS[criterion][0]


class ActivationScores(Protocol):
    def activation_scores(self, layer: PrunableWeight, weight: np.ndarray) -> np.ndarray | None: ...


class GradientScores(Protocol):
    def gradient_scores(self, layer: PrunableWeight, weight: np.ndarray) -> np.ndarray | None: ...


def unit_scores(
    criterion: Criterion,
    layer: PrunableWeight,
    weight: np.ndarray,
    calibration: ActivationScores | None = None,
    gradients: GradientScores | None = None,
) -> np.ndarray:
    """Float32 score of every unit of ``layer`` (flattened elements or channels).

    The activation criterion needs ``calibration``, the gradient criteria ``gradients``;
    a layer they have no scores for is scored by magnitude.
    """
    scores = None
    if criterion is Criterion.ACTIVATION and calibration is not None:
        scores = calibration.activation_scores(layer, weight)
    elif criterion in GRADIENT_CRITERIA and gradients is not None:
        scores = gradients.gradient_scores(layer, weight)
    if scores is not None:
        return scores
    return SCORERS[criterion][1](layer, weight.astype(np.float32, copy=False))


def lowest(scores: np.ndarray, amount: int, hint: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Boolean mask of the ``amount`` lowest-scoring units: the prune order.

    Ties go to the lower index and NaN scores count as +inf, so the mask is
    exactly the first ``amount`` entries of a stable argsort. Computed with a
    partition (O(n), no index array kept), which is what lets the search hold
    nothing per layer beyond the weights themselves. ``hint`` (ranks, values) is
    a sample of the sorted scores (ranks ascending, the last one n - 1): with it
    only the scores between the two sample points around ``amount`` are partitioned.
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
    kth = _kth(scores, amount - 1, hint)
    np.less(scores, kth, out=mask)
    need = amount - int(np.count_nonzero(mask))
    mask[np.flatnonzero(scores == kth)[:need]] = True
    return mask


def _kth(scores: np.ndarray, k: int, hint: tuple[np.ndarray, np.ndarray] | None) -> float:
    """The k-th smallest score (0-based)."""
    if hint is None:
        return float(np.partition(scores, k)[k])
    ranks, values = hint
    j = int(np.searchsorted(ranks, k, side="right")) - 1
    if ranks[j] == k:
        return float(values[j])
    lo, hi = values[j], values[j + 1]
    below = int(np.count_nonzero(scores < lo))
    band = scores[(scores >= lo) & (scores <= hi)]
    return float(np.partition(band, k - below)[k - below])
