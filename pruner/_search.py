"""The search for the smallest passing candidate.

Knows nothing of ONNX: it walks a candidate space (configs, their sizes, how
to push layers further) and asks a judge whether a config passes. Phase 1
bisects a global sparsity level; phase 2 moves sparsity between layer groups,
from those a cheap label-free probe finds sensitive to those it finds cheap.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["MAX_SEARCH_WIDTH", "Judgement", "Phase", "SearchOutcome", "SearchSpace", "Trial", "search", "section"]

logger = logging.getLogger(__name__)

Config = tuple[int, ...]
MAX_PROBE_GROUPS = 16
PROBE_PUSH = 0.25
"""Share of a group's remaining weights a probe prunes to measure its marginal cost."""
MIN_STEP = 1 / 32
"""Finest step along a refinement direction."""
SOFTNESS = (1.0, 0.5, 0.25)
"""Exponents applied to the target shares, tried in turn when a direction finds nothing."""


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

    def blend(self, config: Config, targets: Sequence[float], t: float) -> Config: ...

    def shares(self, config: Config) -> list[float]: ...


class Phase(enum.Enum):
    """The search step that proposed a candidate (``CandidateRecord.phase``); the values are the report's."""

    BISECT = "bisect"
    REFINE = "refine"
    FALLBACK = "fallback"
    """Between a held-out-passing candidate and a smaller one that missed there (see ``_confirm``)."""


@dataclass(frozen=True)
class Judgement:
    """A judge's verdict on one config."""

    passed: bool
    value: float
    complete: bool
    samples: int
    seconds: float
    cost: float | None = None
    """What the objective measures of a passing candidate when it is not its size (e.g. latency)."""


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
        """Passing trials, best first: lowest cost if the judge measures one, else smallest."""
        return sorted((t for t in self.trials if t.judgement.passed), key=_rank)


def _rank(trial: Trial) -> tuple[float, int, int]:
    cost = trial.judgement.cost
    return (cost if cost is not None else float(trial.nonzero), trial.nonzero, trial.index)


class _Budget(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _groups(n_layers: int) -> list[list[int]]:
    count = min(n_layers, MAX_PROBE_GROUPS)
    bounds = [round(i * n_layers / count) for i in range(count + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(count)]


MAX_SEARCH_WIDTH = 16
"""Most candidates of one bisection round (``PruneOptions.search_width``)."""


def search(
    space: SearchSpace,
    judge: Callable[[Config], Judgement],
    probe: Callable[[Config], float] | None,
    *,
    max_evaluations: int,
    max_seconds: float | None = None,
    resolution: float = 0.01,
    on_trial: Callable[[Trial, bool], None] | None = None,
    target: float | None = None,
    search_width: int = 1,
    judge_many: Callable[[Sequence[Config]], Sequence[Judgement]] | None = None,
) -> SearchOutcome:
    """Find the smallest config the judge passes, within the budgets.

    The empty config (the unpruned model) is taken to pass without asking. With
    ``target``, only the config at that level is evaluated.
    ``on_trial(trial, is_new_best)`` is called after every evaluation.
    With ``search_width`` k > 1 every round of the global-level bisection judges k levels
    (a k-section of the interval), all at once through ``judge_many`` when given (its
    verdicts must be ``judge``'s, in order), else one after the other.
    """
    if not 1 <= search_width <= MAX_SEARCH_WIDTH:
        raise ValueError(f"search_width must be in [1, {MAX_SEARCH_WIDTH}], got {search_width}")
    start = time.monotonic()
    outcome = SearchOutcome(best=space.empty())
    seen: dict[Config, Judgement] = {}
    seen_trials: dict[Config, Trial] = {}

    def check_budget() -> None:
        if len(outcome.trials) >= max_evaluations:
            raise _Budget("max_evaluations")
        if max_seconds is not None and time.monotonic() - start >= max_seconds:
            raise _Budget("max_seconds")

    def record(config: Config, phase: Phase, verdict: Judgement) -> None:
        seen[config] = verdict
        trial = Trial(len(outcome.trials) + 1, phase, config, space.sparsity(config), space.nonzero(config), verdict)
        outcome.trials.append(trial)
        best = seen_trials.get(outcome.best)
        if best is None:  # the unpruned model, never evaluated: anything smaller that passes beats it
            better = verdict.passed and trial.nonzero < space.nonzero(outcome.best)
        else:
            better = verdict.passed and _rank(trial) < _rank(best)
        seen_trials[config] = trial
        if better:
            outcome.best = config
        if on_trial is not None:
            on_trial(trial, better)

    def evaluate(config: Config, phase: Phase) -> bool:
        if config in seen:
            return seen[config].passed
        check_budget()
        record(config, phase, judge(config))
        return seen[config].passed

    def fresh(configs: Sequence[Config]) -> list[Config]:
        return [c for c in dict.fromkeys(configs) if c not in seen]

    def evaluate_round(configs: Sequence[Config], phase: Phase) -> list[bool]:
        new = fresh(configs)
        if len(new) == 1 or judge_many is None:
            for config in new:
                evaluate(config, phase)
        elif new:
            check_budget()
            if len(outcome.trials) + len(new) > max_evaluations:
                raise _Budget("max_evaluations")
            for config, verdict in zip(new, judge_many(new), strict=True):
                record(config, phase, verdict)
        return [seen[c].passed for c in configs]

    rounds = _Rounds(evaluate_round, lambda configs: len(fresh(configs)), lambda: max_evaluations - len(outcome.trials))
    try:
        if target is not None:
            evaluate(space.at_level(target), Phase.BISECT)
            return outcome
        if search_width == 1:
            _bisect(space, evaluate, resolution)
        else:
            _ksect(space, rounds, resolution, search_width)
        if probe is not None:
            _refine(space, evaluate, probe, outcome)
    except _Budget as spent:
        outcome.stopped_by = spent.reason
    logger.debug(
        "search: %d evaluation(s), %d probe(s), stopped by %s; best sparsity %.4f",
        len(outcome.trials),
        outcome.probes,
        outcome.stopped_by,
        space.sparsity(outcome.best),
    )
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
    logger.debug("bisection: level %.4f passes, %.4f fails", lo * resolution, hi * resolution)
    return lo, hi


@dataclass(frozen=True)
class _Rounds:
    """How :func:`_ksect` evaluates: a round of configs at once, and what is left of the budget."""

    evaluate: Callable[[Sequence[Config], Phase], list[bool]]
    """Each config's verdict, in order (configs judged before are not judged again)."""
    fresh: Callable[[Sequence[Config]], int]
    """How many of the configs a round would judge (distinct and not judged before)."""
    left: Callable[[], int]
    """Evaluations left in the budget."""


def section(lo: int, hi: int, width: int) -> list[int]:
    """The ``width`` grid steps that cut ``(lo, hi)`` into ``width + 1`` (near) equal parts: every
    step strictly between them when there are no more than ``width``."""
    if hi - lo - 1 <= width:
        return list(range(lo + 1, hi))
    return [lo + j * (hi - lo) // (width + 1) for j in range(1, width + 1)]


def _ksect(space: SearchSpace, rounds: _Rounds, resolution: float, width: int) -> tuple[int, int]:
    """:func:`_bisect` with ``width`` levels a round: the largest passing level on a grid of
    ``resolution``, returned as (passing step, failing step).

    After every round ``lo`` is the largest judged step that passed (0: the unpruned model)
    and ``hi`` the smallest judged step above it that failed (``top + 1``: beyond the grid),
    the bisection's invariant, so what it returns keeps the bisection's guarantee. A round
    judges fewer levels (an even cut of the interval) when the evaluation budget has fewer left.
    """
    top = math.floor(space.max_level / resolution + 1e-9)
    lo, hi = 0, top + 1
    while hi - lo > 1:
        for w in range(width, 0, -1):  # as many levels as the budget still pays for (at least one)
            steps = section(lo, hi, w)
            configs = [space.at_level(s * resolution) for s in steps]
            if rounds.fresh(configs) <= max(rounds.left(), 1):
                break
        passed = rounds.evaluate(configs, Phase.BISECT)
        lo = max((s for s, ok in zip(steps, passed, strict=True) if ok), default=lo)
        hi = min((s for s, ok in zip(steps, passed, strict=True) if not ok and s > lo), default=hi)
    logger.debug("k-section (%d a round): level %.4f passes, %.4f fails", width, lo * resolution, hi * resolution)
    return lo, hi


def _refine(
    space: SearchSpace,
    evaluate: Callable[[Config, Phase], bool],
    probe: Callable[[Config], float],
    outcome: SearchOutcome,
) -> None:
    """Move sparsity from sensitive layer groups to insensitive ones while the metric holds.

    The bisection leaves every layer on one global threshold. A label-free probe
    measures each group's marginal cost (output deviation per weight pruned);
    each group's target share of its units is the cheapest cost over its own
    (the cheapest go to the layer cap, one ten times as costly to a tenth). The search then bisects the
    step along the line from the best config towards that target (trying the end right after the
    first passing step): the cheap
    groups get pruned further while the sensitive ones are given weights back,
    the revert loop of accuracy-aware quantization applied to pruning.
    If no step passes, the shares are softened (raised to a power below one,
    so fewer weights are given back) and the step bisected again. Repeated
    from each new best until a round finds nothing or the budget runs out.
    """
    groups = _groups(space.n_layers)
    while True:
        best = outcome.best
        base = probe(best)
        outcome.probes += 1
        costs: list[tuple[float, int]] = []
        for gi, group in enumerate(groups):
            pushed = space.push(best, group, PROBE_PUSH)
            gain = space.nonzero(best) - space.nonzero(pushed)
            if gain <= 0:
                continue
            outcome.probes += 1
            costs.append((max(probe(pushed) - base, 0.0) / gain, gi))
        if not costs:
            logger.debug("refinement: no group can be pushed further")
            return
        shares = [1.0] * space.n_layers  # groups at their cap stay there
        cheapest = min((c for c, _ in costs if c > 0), default=0.0)
        for cost, gi in costs:
            for i in groups[gi]:
                shares[i] = cheapest / cost if cost > 0 else 1.0
        # milder and milder: the full reallocation may give back more than it prunes
        for softness in SOFTNESS:
            targets = [share**softness for share in shares]
            if _bisect_direction(space, evaluate, best, targets) and outcome.best != best:
                logger.debug("refinement: softness %g found sparsity %.4f", softness, space.sparsity(outcome.best))
                break
        else:
            logger.debug("refinement: no direction passed")
            return


def _bisect_direction(
    space: SearchSpace, evaluate: Callable[[Config, Phase], bool], best: Config, targets: Sequence[float]
) -> bool:
    """Largest passing step towards ``targets`` that makes the model smaller; True if one passed."""
    lo, hi = 0.0, 1.0
    found = tried_end = False
    while hi - lo > MIN_STEP:
        # after the first passing step, try the whole way: a direction that passes to its end
        # would otherwise spend every remaining step creeping towards it
        mid = 1.0 if found and not tried_end else (lo + hi) / 2
        tried_end = tried_end or mid == 1.0
        config = space.blend(best, targets, mid)
        if space.nonzero(config) >= space.nonzero(best):
            lo = mid  # not smaller yet: only further along can help
            continue
        if evaluate(config, Phase.REFINE):
            lo, found = mid, True
        else:
            hi = mid
    return found
