"""The search for the smallest passing candidate.

Knows nothing of ONNX: it walks a candidate space (configs, their sizes, how
to push layers further) and asks a judge whether a config passes. Phase 1
bisects a global sparsity level; phase 2 refines per layer group, pushing the
groups a cheap label-free probe finds least sensitive and backing off from the
ones that break the metric.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["Judgement", "Phase", "SearchOutcome", "SearchSpace", "Trial", "search"]

logger = logging.getLogger(__name__)

Config = tuple[int, ...]
MAX_PROBE_GROUPS = 16
INITIAL_PUSH = 0.5
"""Share of a layer's remaining weights the first refinement round tries to prune."""


class SearchSpace(Protocol):
    """What the search needs from a candidate space."""

    @property
    def max_level(self) -> float: ...

    @property
    def n_layers(self) -> int: ...

    def empty(self) -> Config: ...

    def at_level(self, level: float) -> Config: ...

    def nonzero(self, config: Config) -> int: ...

    def sparsity(self, config: Config) -> float: ...

    def push(self, config: Config, layer_ids: Sequence[int], step: float) -> Config: ...


class Phase(enum.Enum):
    BISECT = "bisect"
    REFINE = "refine"
    CONFIRM = "confirm"


@dataclass(frozen=True)
class Judgement:
    """A judge's verdict on one config."""

    passed: bool
    value: float
    complete: bool
    samples: int
    seconds: float


@dataclass(frozen=True)
class Trial:
    """One evaluated candidate, as recorded in the trace."""

    index: int
    phase: Phase
    config: Config
    sparsity: float
    nonzero: int
    judgement: Judgement


@dataclass
class SearchOutcome:
    best: Config
    trials: list[Trial] = field(default_factory=list)
    probes: int = 0
    stopped_by: str = "converged"
    """converged, max_evaluations or max_seconds."""

    def passing(self) -> list[Trial]:
        """Passing trials, smallest model first."""
        return sorted((t for t in self.trials if t.judgement.passed), key=lambda t: (t.nonzero, t.index))


class _Budget(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _groups(n_layers: int) -> list[list[int]]:
    count = min(n_layers, MAX_PROBE_GROUPS)
    bounds = [round(i * n_layers / count) for i in range(count + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(count)]


def search(
    space: SearchSpace,
    judge: Callable[[Config], Judgement],
    probe: Callable[[Config], float] | None,
    *,
    max_evaluations: int,
    max_seconds: float | None = None,
    resolution: float = 0.01,
    on_trial: Callable[[Trial, bool], None] | None = None,
) -> SearchOutcome:
    """Find the smallest config the judge passes, within the budgets.

    The empty config (the unpruned model) is taken to pass without asking.
    ``on_trial(trial, is_new_best)`` is called after every evaluation.
    """
    start = time.monotonic()
    outcome = SearchOutcome(best=space.empty())
    seen: dict[Config, Judgement] = {}

    def evaluate(config: Config, phase: Phase) -> bool:
        if config in seen:
            return seen[config].passed
        if len(outcome.trials) >= max_evaluations:
            raise _Budget("max_evaluations")
        if max_seconds is not None and time.monotonic() - start >= max_seconds:
            raise _Budget("max_seconds")
        verdict = judge(config)
        seen[config] = verdict
        trial = Trial(len(outcome.trials) + 1, phase, config, space.sparsity(config), space.nonzero(config), verdict)
        outcome.trials.append(trial)
        better = verdict.passed and trial.nonzero < space.nonzero(outcome.best)
        if better:
            outcome.best = config
        if on_trial is not None:
            on_trial(trial, better)
        return verdict.passed

    try:
        lo, hi = _bisect(space, evaluate, resolution)
        if probe is not None:
            _refine(space, evaluate, probe, outcome, lo, hi, resolution)
    except _Budget as b:
        outcome.stopped_by = b.reason
    return outcome


def _bisect(space: SearchSpace, evaluate: Callable[[Config, Phase], bool], resolution: float) -> tuple[int, int]:
    """Largest passing level on a grid of ``resolution``: returns (passing step, failing step)."""
    top = math.floor(space.max_level / resolution + 1e-9)
    lo, hi = 0, top + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if evaluate(space.at_level(mid * resolution), Phase.BISECT):
            lo = mid
        else:
            hi = mid
    return lo, hi


def _refine(
    space: SearchSpace,
    evaluate: Callable[[Config, Phase], bool],
    probe: Callable[[Config], float],
    outcome: SearchOutcome,
    lo: int,
    hi: int,
    resolution: float,
) -> None:
    """Push the least sensitive layer groups further while the metric holds."""
    step = INITIAL_PUSH
    groups = _groups(space.n_layers)
    while step >= resolution:
        best = outcome.best
        base = probe(best)
        outcome.probes += 1
        costs = []
        for gi, group in enumerate(groups):
            pushed = space.push(best, group, step)
            gain = space.nonzero(best) - space.nonzero(pushed)
            if gain <= 0:
                continue
            deviation = probe(pushed)
            outcome.probes += 1
            costs.append((max(deviation - base, 0.0) / gain, gi))
        if not costs:
            return
        pending = [gi for _, gi in sorted(costs)]
        progressed = False
        k = (len(pending) + 1) // 2
        while pending and k >= 1:
            ids = [i for gi in pending[:k] for i in groups[gi]]
            if evaluate(space.push(outcome.best, ids, step), Phase.REFINE):
                progressed = True
                pending = pending[k:]
                k = (len(pending) + 1) // 2
            elif k == 1:
                break
            else:
                k = (k + 1) // 2 if k > 2 else 1
        if not progressed:
            step /= 2
