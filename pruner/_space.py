"""The candidate space of zero mode: per-layer amounts, and the allocations that map a
global sparsity level to them.

A config is a tuple with the number of units zeroed in each layer. Units are
pruned in a fixed order per layer (lowest score first, see ``_score.lowest``),
so a config alone determines the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ._analysis import PrunableWeight
from ._options import Allocation
from ._score import Granularity

__all__ = ["Config", "LayerUnits", "ZeroSpace"]

Config = tuple[int, ...]
SKETCH_POINTS = 4097
"""Sorted-score sample kept per layer to place a global threshold (exact below this size)."""


@dataclass
class LayerUnits:
    """What the search needs of one layer: unit counts and its score distribution."""

    layer: PrunableWeight
    units: int
    params_per_unit: int
    max_amount: int
    sketch: np.ndarray
    """Sorted allocation scores at evenly spaced ranks (ranks in ``sketch_ranks``)."""
    sketch_ranks: np.ndarray
    raw_sketch: np.ndarray
    """Sorted raw scores (NaN as +inf) at ``sketch_ranks``: finds a prune threshold fast."""
    zero_units_nnz: np.ndarray | None
    """Cumulative nonzero params of the first k units in order (channel units only)."""
    zeros: int
    """Elements that are already zero (element units)."""
    sketches: dict[Allocation, np.ndarray] = field(default_factory=dict)
    """With ``Allocation.AUTO``: the sketch of each allocation it chooses between (``ZeroSpace.use``)."""


AUTO_CHOICES = (Allocation.NORMALIZED, Allocation.LAMP, Allocation.UNIFORM)
"""What ``Allocation.AUTO`` chooses between, the first kept on a tie."""


def allocation_sketches(
    sorted_scores: np.ndarray, ranks: np.ndarray, allocation: Allocation
) -> tuple[np.ndarray, dict[Allocation, np.ndarray]]:
    """A layer's sketch for ``allocation``, and with ``AUTO`` the sketch of every choice (the sketch
    is the first choice's until ``ZeroSpace.use`` picks one)."""
    if allocation is not Allocation.AUTO:
        return allocation_scores(sorted_scores, ranks, allocation), {}
    sketches = {a: allocation_scores(sorted_scores, ranks, a) for a in AUTO_CHOICES}
    return sketches[AUTO_CHOICES[0]], sketches


def allocation_scores(sorted_scores: np.ndarray, ranks: np.ndarray, allocation: Allocation) -> np.ndarray:
    """A monotone per-layer transform of ascending scores that makes layers comparable,
    evaluated at ``ranks`` only (sums over the whole layer in float64, without float64
    copies of it: a layer may hold hundreds of millions of scores)."""
    s = sorted_scores
    at = s[ranks].astype(np.float64)
    if allocation in (Allocation.NORMALIZED, Allocation.LAMP):
        # sums of squares of the segments between sketch ranks (the first rank is 0)
        segments = np.add.reduceat(np.square(s, dtype=np.float32), ranks, dtype=np.float64)
        if allocation is Allocation.NORMALIZED:
            rms = math.sqrt(float(segments.sum()) / max(len(s), 1)) or 1.0
            return at / rms
        tail = np.cumsum(segments[::-1])[::-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            lamp = np.where(tail > 0, at * at / tail, 0.0)
        # LAMP is monotone in |w| in exact arithmetic; keep it so after rounding
        return np.maximum.accumulate(lamp)
    return at


def build_units(
    layer: PrunableWeight,
    weight: np.ndarray,
    scores: np.ndarray,
    granularity: Granularity,
    allocation: Allocation,
    cap: float,
) -> LayerUnits:
    units = len(scores)
    params_per_unit = layer.params // units
    finite = np.where(np.isnan(scores), np.inf, scores) if np.isnan(scores).any() else scores
    sorted_scores = np.sort(finite)
    if units <= SKETCH_POINTS:
        ranks = np.arange(units)
    else:
        ranks = np.unique(np.linspace(0, units - 1, SKETCH_POINTS).astype(np.int64))
    sketch, sketches = allocation_sketches(sorted_scores, ranks, allocation)
    raw_sketch = sorted_scores[ranks].copy()
    del sorted_scores
    nnz_cum = None
    zeros = 0
    if granularity is Granularity.CHANNEL:
        rows = np.moveaxis(weight, layer.channel_axis, 0).reshape(units, -1)
        nnz = np.count_nonzero(rows, axis=1)[np.argsort(finite, kind="stable")]
        nnz_cum = np.concatenate([[0], np.cumsum(nnz)])
    else:
        zeros = int(layer.params - np.count_nonzero(weight))
    return LayerUnits(
        layer=layer,
        units=units,
        params_per_unit=params_per_unit,
        max_amount=math.floor(cap * units + 1e-9),
        sketch=sketch,
        sketch_ranks=ranks,
        raw_sketch=raw_sketch,
        zero_units_nnz=nnz_cum,
        zeros=zeros,
        sketches=sketches,
    )


class ZeroSpace:
    """Maps global sparsity levels and per-layer pushes to configs, and configs to sizes."""

    def __init__(self, layers: Sequence[LayerUnits], allocation: Allocation) -> None:
        self.layers = list(layers)
        self.allocation = allocation
        self.total_params = sum(u.layer.params for u in self.layers)
        self.max_params = sum(u.max_amount * u.params_per_unit for u in self.layers)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def use(self, allocation: Allocation) -> None:
        """Make ``allocation``, one of ``AUTO_CHOICES``, the one that maps levels to configs (the
        layers were built with ``Allocation.AUTO``)."""
        for u in self.layers:
            if allocation is not Allocation.UNIFORM:
                u.sketch = u.sketches[allocation]
        self.allocation = allocation

    @property
    def max_level(self) -> float:
        """Largest reachable share of zeroed prunable params."""
        return self.max_params / self.total_params if self.total_params else 0.0

    def empty(self) -> Config:
        return tuple(0 for _ in self.layers)

    def zeroed(self, config: Config) -> int:
        return sum(a * u.params_per_unit for a, u in zip(config, self.layers, strict=True))

    def sparsity(self, config: Config) -> float:
        return self.zeroed(config) / self.total_params if self.total_params else 0.0

    def layer_nonzero(self, i: int, amount: int) -> int:
        u = self.layers[i]
        if u.zero_units_nnz is not None:
            return int(u.zero_units_nnz[-1] - u.zero_units_nnz[amount])
        return int(u.layer.params - max(u.zeros, amount))

    def nonzero(self, config: Config) -> int:
        """Nonzero prunable params of the model a config describes (the objective)."""
        return sum(self.layer_nonzero(i, a) for i, a in enumerate(config))

    def at_level(self, level: float) -> Config:
        """Config zeroing ``level`` of all prunable params (exact up to one unit per layer)."""
        level = min(max(level, 0.0), self.max_level)
        target = level * self.total_params
        if self.allocation is Allocation.UNIFORM:
            share = min(level, 1.0)
            real = [min(share * u.units, u.max_amount) for u in self.layers]
            # the caps may leave part of the target unplaced; spread it over the rest
            real = self._spread(real, target)
        else:
            real = self._threshold_amounts(target)
        return self._round(real, target)

    def _spread(self, real: list[float], target: float) -> list[float]:
        for _ in range(len(real)):
            placed = sum(r * u.params_per_unit for r, u in zip(real, self.layers, strict=True))
            room = [(u.max_amount - r) * u.params_per_unit for r, u in zip(real, self.layers, strict=True)]
            free = sum(room)
            if target - placed <= 1e-9 or free <= 0:
                break
            share = min(1.0, (target - placed) / free)
            real = [r + share * rm / u.params_per_unit for r, rm, u in zip(real, room, self.layers, strict=True)]
        return real

    def _count_below(self, u: LayerUnits, t: float) -> float:
        """Units whose allocation score is below ``t``, interpolated between sketch points."""
        pos = np.searchsorted(u.sketch, t, side="left")
        if pos <= 0:
            return 0.0
        if pos >= len(u.sketch):
            return float(u.units)
        lo_s, hi_s = u.sketch[pos - 1], u.sketch[pos]
        lo_r, hi_r = u.sketch_ranks[pos - 1], u.sketch_ranks[pos]
        frac = 0.0 if hi_s <= lo_s else (t - lo_s) / (hi_s - lo_s)
        return float(lo_r + 1 + frac * (hi_r - lo_r - 1))

    def _threshold_amounts(self, target: float) -> list[float]:
        def amounts(t: float) -> list[float]:
            return [min(self._count_below(u, t), float(u.max_amount)) for u in self.layers]

        def placed(t: float) -> float:
            return sum(a * u.params_per_unit for a, u in zip(amounts(t), self.layers, strict=True))

        lo = min((float(u.sketch[0]) for u in self.layers), default=0.0)
        hi = max((float(u.sketch[-1]) for u in self.layers), default=0.0)
        hi = np.nextafter(hi, np.inf)
        for _ in range(100):
            mid = (lo + hi) / 2
            if placed(mid) < target:
                lo = mid
            else:
                hi = mid
        return amounts(hi)

    def _round(self, real: list[float], target: float) -> Config:
        """Integer amounts near ``real`` whose params are as close to ``target`` as units allow."""
        out = [min(math.floor(r + 1e-9), u.max_amount) for r, u in zip(real, self.layers, strict=True)]
        need = round(target) - sum(a * u.params_per_unit for a, u in zip(out, self.layers, strict=True))
        by_fraction = sorted(range(len(out)), key=lambda i: (-(real[i] - math.floor(real[i] + 1e-9)), i))
        for i in by_fraction * max(1, len(out)):
            u = self.layers[i]
            if need <= 0:
                break
            if out[i] < u.max_amount and need * 2 >= u.params_per_unit:
                out[i] += 1
                need -= u.params_per_unit
        # a threshold on tied or discrete scores can overshoot: give back the last units
        for i in reversed(by_fraction * max(1, len(out))):
            u = self.layers[i]
            if need >= 0:
                break
            if out[i] > 0 and -need * 2 >= u.params_per_unit:
                out[i] -= 1
                need += u.params_per_unit
        return tuple(out)

    def push(self, config: Config, layer_ids: Sequence[int], step: float) -> Config:
        """Prune ``step`` of the remaining (below cap) units further in each listed layer."""
        out = list(config)
        for i in layer_ids:
            u = self.layers[i]
            room = u.max_amount - out[i]
            out[i] += min(room, max(1, round(step * room))) if room > 0 else 0
        return tuple(out)

    def blend(self, config: Config, targets: Sequence[float], t: float) -> Config:
        """Step ``t`` of the way from ``config`` to ``targets`` (per layer, a share of its units; capped)."""
        out = []
        for amount, target, u in zip(config, targets, self.layers, strict=True):
            goal = min(target * u.units, u.max_amount)
            out.append(min(max(round(amount + t * (goal - amount)), 0), u.max_amount))
        return tuple(out)

    def shares(self, config: Config) -> list[float]:
        """Each layer's amount as a share of its units: ``blend(a, shares(b), t)`` walks from a to b."""
        return [amount / u.units for amount, u in zip(config, self.layers, strict=True)]


PROFILE_LEVELS = (0.25, 0.5, 0.75)
"""Sparsities at which a layer's sensitivity is measured."""


def sensitivity_sketch(u: LayerUnits, profile: list[list[float]]) -> np.ndarray:
    """Allocation scores from a sensitivity profile: the marginal deviation per weight pruned,
    interpolated along the layer's prune order and kept increasing, at the sketch ranks.

    A global threshold on it gives each layer the sparsity where pruning one more weight
    costs the same everywhere.
    """
    levels = np.array([0.0, *(p[0] for p in profile)])
    deviations = np.maximum.accumulate(np.array([0.0, *(p[1] for p in profile)]))
    slopes = np.diff(deviations) / np.maximum(np.diff(levels), 1e-9)
    middles = (levels[:-1] + levels[1:]) / 2
    share = (u.sketch_ranks + 1) / max(u.units, 1)
    marginal = np.interp(share, middles, slopes) / max(u.layer.params, 1)
    # ties (flat profiles) are broken by the layer's own prune order
    return np.maximum.accumulate(marginal + 1e-15 * share)
