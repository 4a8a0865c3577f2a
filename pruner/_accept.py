"""The acceptance rule: a confidence interval for a candidate's metric drop from paired per-sample scores.

The drop of a candidate on a sample is ``d_i = score_original_i - score_candidate_i`` (mirrored for
lower-is-better metrics); the drop on the split is their mean. Paired differences cancel what the
two models share (the hard samples both miss), so the interval is far narrower than one from two
separate metric values. See docs/acceptance.md for the reasoning.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from ._options import AcceptanceRule
from ._report import DropInterval

__all__ = ["accepts", "drop_interval", "paired_drops", "zero_drop_half_width", "zero_drop_samples"]

ADJUSTED = "agresti-min"
"""0/1 scores: Wald interval on the discordant pairs after adding half a pair to each cell of the 2x2
table (Agresti and Min, 2005), good coverage down to a handful of samples."""
NORMAL = "normal"
"""Other scores: normal approximation of the mean paired difference (studentized)."""


def paired_drops(original: np.ndarray, candidate: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Per-sample drops ``d_i`` (positive: the candidate is worse on that sample)."""
    before = np.asarray(original, np.float64)
    after = np.asarray(candidate, np.float64)
    return before - after if higher_is_better else after - before


def _binary(original: np.ndarray, candidate: np.ndarray) -> bool:
    return bool(np.isin(original, (0.0, 1.0)).all() and np.isin(candidate, (0.0, 1.0)).all())


def _z(one_sided_alpha: float) -> float:
    return NormalDist().inv_cdf(1.0 - one_sided_alpha)


def drop_interval(
    original: np.ndarray,
    candidate: np.ndarray,
    *,
    higher_is_better: bool,
    confidence: float,
    comparisons: int = 1,
    rule: str = "",
    split: str = "holdout",
) -> DropInterval:
    """The drop of ``candidate`` against ``original`` (per-sample scores on the same samples) and its
    two-sided ``confidence`` interval, Bonferroni-corrected over ``comparisons`` candidates."""
    d = paired_drops(original, candidate, higher_is_better)
    n = len(d)
    if n == 0:
        nan = float("nan")
        return DropInterval(rule, confidence, NORMAL, split, 0, nan, nan, nan, comparisons)
    estimate = float(d.mean())
    z = _z((1.0 - confidence) / (2 * max(comparisons, 1)))
    if _binary(original, candidate):
        worse, better = int((d > 0.5).sum()), int((d < -0.5).sum())
        center, se = _adjusted(worse, better, n)
        low, high = center - z * se, center + z * se
        return DropInterval(
            rule, confidence, ADJUSTED, split, n, estimate, max(low, -1.0), min(high, 1.0), comparisons, worse, better
        )
    se = float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else float("inf")
    return DropInterval(rule, confidence, NORMAL, split, n, estimate, estimate - z * se, estimate + z * se, comparisons)


def _adjusted(worse: int, better: int, n: int) -> tuple[float, float]:
    """Agresti-Min: the center and standard error of (worse - better) / n with half a pair added to each cell."""
    worse_cell, better_cell, pairs = worse + 0.5, better + 0.5, n + 2.0
    center = (worse_cell - better_cell) / pairs
    return center, math.sqrt(max((worse_cell + better_cell) / pairs - center * center, 0.0) / pairs)


def zero_drop_half_width(n: int, confidence: float, comparisons: int = 1) -> float:
    """Upper end of the interval of a candidate that changes no sample of ``n`` (0/1 scores): the
    smallest drop ``n`` samples can ever show to be out of reach."""
    if n <= 0:
        return float("inf")
    center, se = _adjusted(0, 0, n)
    return center + _z((1.0 - confidence) / (2 * max(comparisons, 1))) * se


def zero_drop_samples(allowed: float, confidence: float) -> int | None:
    """Smallest split on which a candidate that changes no sample is shown within ``allowed``
    (0/1 scores; the half-width above is z / (n + 2)); None when ``allowed`` is 0."""
    if allowed <= 0:
        return None
    return max(math.ceil(_z((1.0 - confidence) / 2) / allowed - 2.0), 1)


def accepts(rule: AcceptanceRule, interval: DropInterval, allowed: float) -> bool:
    """Whether ``rule`` accepts a candidate with this held-out ``interval`` at ``allowed`` loss.

    ``EXACT``: the measured drop is within the tolerance. ``BOUND``: the interval's upper end is
    (with probability >= confidence, the drop is within it). ``INTERVAL``: the interval's lower end
    is, i.e. the split does not show at that confidence that the drop exceeds the tolerance (a
    candidate within it is refused with probability <= (1 - confidence) / 2, however small the split).
    """
    eps = 1e-9
    if rule is AcceptanceRule.BOUND:
        return interval.high <= allowed + eps
    if rule is AcceptanceRule.INTERVAL:
        return interval.low <= allowed + eps
    return interval.estimate <= allowed + eps
