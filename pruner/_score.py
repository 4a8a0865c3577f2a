"""Scoring criteria: one score per prunable unit (element or output channel).

Scorers are plug-ins: a function from a layer and its float32 weight to unit
scores. Lower scores are pruned first; ties go to the lower index (see :func:`lowest`).

A weight whose op declares scoring blocks (an LSTM's or GRU's gates, ``_ops.WeightSlot.blocks``)
has its scores balanced across blocks (:func:`balance_blocks`): whatever amount the search
gives the layer, each block loses the same share of its weights, so no gate is emptied while
another stays full.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Protocol

import numpy as np

from ._analysis import PrunableWeight
from ._options import GRADIENT_CRITERIA, Criterion

__all__ = ["SCORERS", "Granularity", "balance_blocks", "granularity", "lowest", "unit_scores"]


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
    gran, scorer = SCORERS[criterion]
    scores = None
    if criterion is Criterion.ACTIVATION and calibration is not None:
        scores = calibration.activation_scores(layer, weight)
    elif criterion in GRADIENT_CRITERIA and gradients is not None:
        scores = gradients.gradient_scores(layer, weight)
    if scores is None:
        scores = scorer(layer, weight.astype(np.float32, copy=False))
    return balance_blocks(layer, scores, gran) if layer.blocks else scores


def _block_rows(layer: PrunableWeight, scores: np.ndarray, gran: Granularity) -> np.ndarray:
    """``scores`` as one row per scoring block (a view when it can be)."""
    if gran is Granularity.CHANNEL:  # a channel spans every direction: blocks of the gate axis only
        return scores.reshape(layer.blocks, -1)
    axis = layer.channel_axis % len(layer.shape)
    lead = int(np.prod(layer.shape[:axis]))
    return scores.reshape(lead * layer.blocks, -1)


def balance_blocks(layer: PrunableWeight, scores: np.ndarray, gran: Granularity) -> np.ndarray:
    """Scores that prune every scoring block of ``layer`` alike (new array; ``scores`` kept).

    A block's positive scores are replaced, in their order, by the pooled positive scores of the
    whole layer at the same quantile: the element at quantile q of its block gets the layer's
    q-quantile (blocks of equal size share the pooled scores out exactly, in turn). The lowest
    ``amount`` scores then take the same share of every block's nonzero weights (to one unit),
    within a layer and in the allocation across layers, whose score distribution is kept. Zero
    scores (weights already zero) stay zero and go first; NaN stays.
    """
    rows = _block_rows(layer, scores, gran)
    out = np.array(rows, dtype=np.float32)
    live = np.isfinite(rows) & (rows > 0)
    pooled = np.sort(rows[live], kind="stable")
    if len(pooled) == 0:
        return out.reshape(-1)
    for b in range(rows.shape[0]):
        where = np.flatnonzero(live[b])
        if len(where) == 0:
            continue
        order = where[np.argsort(rows[b, where], kind="stable")]
        # block b's r-th lowest sits at quantile (r + (b + 0.5) / blocks) / n: blocks of equal size
        # share the pooled scores out exactly, r-th lowest of block b at pooled rank r * blocks + b
        quantiles = (np.arange(len(order)) + (b + 0.5) / rows.shape[0]) / len(order)
        out[b, order] = pooled[np.minimum((quantiles * len(pooled)).astype(np.int64), len(pooled) - 1)]
    return out.reshape(-1)


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
