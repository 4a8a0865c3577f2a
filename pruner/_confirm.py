"""The confirmation: which of the search's passing candidates the held-out split accepts.

The search ranks candidates on the search split alone; the confirmation then reads the
held-out split, which nothing before it has seen, and returns the best candidate that passes
there too. With the ``exact`` rule a held-out miss falls back and bisects towards the smallest
candidate; with the ``interval`` and ``bound`` rules the list is fixed before the held-out split is
read, so the report's interval can be corrected for exactly that many comparisons.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ._accept import accepts, drop_interval, zero_drop_half_width, zero_drop_samples
from ._errors import check_stop
from ._evaluate import Evaluator, Runner
from ._options import AcceptanceRule, Tolerance
from ._report import DropInterval
from ._search import Judgement, Phase, SearchOutcome, SearchSpace, Trial
from ._space import Config

__all__ = [
    "FALLBACK_CANDIDATES",
    "FALLBACK_STEPS",
    "FALLBACK_WIDTH",
    "MAX_COMPARISONS",
    "Confirmation",
    "HeldOut",
    "confirm",
    "confirm_in_order",
    "confirm_with_fallback",
    "small_set_warnings",
]

logger = logging.getLogger(__name__)

FALLBACK_STEPS = 6
"""Most bisection steps between the held-out fallback and the smallest search candidate."""
FALLBACK_WIDTH = 0.02
"""The fallback bisects until the sparsity between its passing and its missing end is at most this:
a line from the unpruned model to a candidate at 60% is cut 5 times, a line 8 points long twice."""
FALLBACK_CANDIDATES = 3
"""Passing candidates tried on the held-out split, best first, before bisecting the others."""
MAX_COMPARISONS = 30
"""Passing candidates, best first, the interval and bound rules try on the held-out split."""
UNCONFIRMED = "no held-out split (holdout_fraction 0): the result is not confirmed on unseen data"
NONE_PASSED = "no candidate passed the tolerance on the search split; the model is returned unchanged"


@dataclass(frozen=True)
class HeldOut:
    """The held-out split and how a candidate is judged on it."""

    evaluator: Evaluator
    rows: np.ndarray
    baseline: float
    """The unpruned model's metric on the split."""
    allowed: float
    """The loss the tolerance allows from ``baseline``."""
    original: np.ndarray
    """The unpruned model's per-sample scores on the split."""
    rule: AcceptanceRule
    confidence: float

    @classmethod
    def of(
        cls,
        evaluator: Evaluator,
        rows: np.ndarray,
        baseline: float,
        tolerance: Tolerance,
        rule: AcceptanceRule,
        confidence: float,
    ) -> HeldOut:
        original = evaluator.reference_scores(rows)
        return cls(evaluator, rows, baseline, tolerance.allowed_loss(baseline), original, rule, confidence)

    def passes(self, runner: Runner) -> bool:
        """Whether the candidate's metric on the split is within the tolerance (the exact rule)."""
        metric = self.evaluator.metric
        bound = metric.passing_bound(self.baseline, self.allowed)
        result = self.evaluator.evaluate(self.rows, runner, bound=bound)
        return result.complete and metric.loss(self.baseline, result.value) <= self.allowed + 1e-9

    def scores(self, runner: Runner) -> np.ndarray:
        """The candidate's per-sample scores on the split (its pieces through the run's executor:
        sharded over the workers of a remote one, the same batches as one local pass)."""
        batches = self.evaluator.batches
        outputs = np.concatenate(list(batches.executor.outputs(batches, runner, batches.pieces(self.rows))))
        return self.evaluator.per_sample(outputs, self.rows)

    def interval(self, scores: np.ndarray, comparisons: int) -> DropInterval:
        """The drop of a candidate with these per-sample scores, corrected for ``comparisons``."""
        return drop_interval(
            self.original,
            scores,
            higher_is_better=self.evaluator.metric.higher_is_better,
            confidence=self.confidence,
            comparisons=comparisons,
            rule=self.rule.value,
        )

    def accepts(self, scores: np.ndarray, comparisons: int) -> bool:
        """Whether the rule accepts a candidate with these per-sample scores."""
        return accepts(self.rule, self.interval(scores, comparisons), self.allowed)

    def deciding_comparisons(self, comparisons: int) -> int:
        """The comparisons the decision's own interval is corrected for: the interval rule refuses
        a candidate within the tolerance with probability <= alpha/2 per candidate; the bound rule's
        promise is about the one returned, so it is corrected for every candidate the list could
        have returned."""
        return comparisons if self.rule is AcceptanceRule.BOUND else 1


@dataclass(frozen=True)
class Confirmation:
    """The confirm phase's result."""

    chosen: Config
    """The config to write (the empty config: the unpruned model)."""
    runs: int
    """Candidates run on the held-out split."""
    comparisons: int
    """Candidates the held-out decision could have returned (the drop interval's correction)."""
    fallbacks: tuple[Trial, ...]
    """Search-split evaluations made by the fallback bisection, numbered after the search's."""
    notes: tuple[str, ...]
    seconds: float


def confirm(
    outcome: SearchOutcome,
    space: SearchSpace,
    runner: Callable[[Config], Runner],
    held_out: HeldOut | None,
    judge: Callable[[Config], Judgement],
    on_trial: Callable[[Trial, bool], None],
) -> Confirmation:
    """The confirm phase: the candidate of ``outcome`` to write.

    ``runner`` runs a config, ``judge`` judges one on the search split (for fallback points,
    reported to ``on_trial`` like the search's trials). Without a held-out split the search's best
    is taken unconfirmed.
    """
    start = time.perf_counter()
    if not space.n_layers:
        return Confirmation(space.empty(), 0, 1, (), (), 0.0)
    passing = outcome.passing()
    warnings = [] if held_out is None else small_set_warnings(held_out.original, held_out.allowed, held_out.confidence)
    stop = None if held_out is None else held_out.evaluator.batches.stop
    fallbacks: list[Trial] = []

    def on_search(config: Config) -> bool:
        index = len(outcome.trials) + len(fallbacks) + 1
        trial = Trial(index, Phase.FALLBACK, config, space.sparsity(config), space.nonzero(config), judge(config))
        fallbacks.append(trial)
        on_trial(trial, False)
        return trial.judgement.passed

    if held_out is None or held_out.rule is AcceptanceRule.EXACT:

        def on_holdout(config: Config) -> bool:
            assert held_out is not None
            check_stop(stop)
            return held_out.passes(runner(config))

        chosen, runs, note = confirm_with_fallback(passing, space, None if held_out is None else on_holdout, on_search)
        comparisons = max(runs, 1)
    else:
        comparisons = min(len(passing), MAX_COMPARISONS) or 1
        decide_with = held_out.deciding_comparisons(comparisons)

        def on_interval(config: Config) -> bool:
            check_stop(stop)
            return held_out.accepts(held_out.scores(runner(config)), decide_with)

        chosen, runs, note = confirm_in_order(passing, space, on_interval)
    seconds = time.perf_counter() - start
    logger.debug("confirmed sparsity %.4f after %d held-out run(s) in %.3f s", space.sparsity(chosen), runs, seconds)
    notes = (*warnings, *(() if note is None else (note,)))
    return Confirmation(chosen, runs, comparisons, tuple(fallbacks), notes, seconds)


def confirm_with_fallback(
    passing: list[Trial],
    space: SearchSpace,
    on_holdout: Callable[[Config], bool] | None,
    on_search: Callable[[Config], bool],
) -> tuple[Config, int, str | None]:
    """The smallest search-passing config that also passes on the held-out split, and the held-out runs.

    Passing candidates are tried best first (at most ``FALLBACK_CANDIDATES``); when all
    of those miss, the smallest of the others that passes is found by bisecting their
    list (held-out losses grow with sparsity), the unpruned model when none does. When
    the smallest missed on the held-out split, the search overfitted its split a
    little: rather than stop at the fallback, bisect the line from it to that smallest
    candidate, every point passing on both splits (``on_search`` judges and records the point),
    until the two ends are at most ``FALLBACK_WIDTH`` of sparsity apart (at most ``FALLBACK_STEPS``).
    The third value is a note when the result is not the smallest search candidate, confirmed.
    """
    if not passing:
        return space.empty(), 0, NONE_PASSED
    if on_holdout is None:
        return passing[0].config, 0, UNCONFIRMED
    runs = 0
    chosen = space.empty()
    for trial in passing[:FALLBACK_CANDIDATES]:
        runs += 1
        if on_holdout(trial.config):
            chosen = trial.config
            break
    else:
        rest = passing[FALLBACK_CANDIDATES:]
        below, above = 0, len(rest)  # the smallest passing one lies in rest[below:above], if any
        while below < above:
            middle = (below + above) // 2
            runs += 1
            if on_holdout(rest[middle].config):
                chosen, above = rest[middle].config, middle
            else:
                below = middle + 1
    smallest = passing[0].config
    if chosen == smallest:
        return chosen, runs, None
    start, goal, lo, hi = chosen, space.shares(smallest), 0.0, 1.0
    length = abs(space.sparsity(smallest) - space.sparsity(start))
    for _ in range(FALLBACK_STEPS):
        if (hi - lo) * length <= FALLBACK_WIDTH + 1e-9:
            break
        mid = (lo + hi) / 2
        config = space.blend(start, goal, mid)
        if config == smallest:
            hi = mid
            continue
        if space.nonzero(config) >= space.nonzero(chosen):
            lo = mid
            continue
        passed = on_search(config)
        if passed:
            runs += 1
            passed = on_holdout(config)
        if passed:
            chosen, lo = config, mid
        else:
            hi = mid
    if not any(chosen):
        return chosen, runs, "no candidate passed on the held-out split; the model is returned unchanged"
    return (
        chosen,
        runs,
        f"the smallest search candidate (sparsity {passing[0].sparsity:.1%}) missed the tolerance on the "
        f"held-out split; fell back to sparsity {space.sparsity(chosen):.1%}, which passes both",
    )


def confirm_in_order(
    passing: list[Trial],
    space: SearchSpace,
    on_holdout: Callable[[Config], bool],
) -> tuple[Config, int, str | None]:
    """The first of the passing candidates, best first (at most ``MAX_COMPARISONS``), that the
    held-out rule accepts, the held-out runs, and a note when it is not the smallest search candidate.

    The list and its order are fixed by the search split alone before the held-out split is read,
    so the candidates the rule could return are exactly these: the report's interval is corrected
    for that many (no bisection, no new points whose choice would depend on held-out outcomes).
    """
    if not passing:
        return space.empty(), 0, NONE_PASSED
    runs = 0
    for trial in passing[:MAX_COMPARISONS]:
        runs += 1
        if on_holdout(trial.config):
            if trial is passing[0]:
                return trial.config, runs, None
            return (
                trial.config,
                runs,
                f"the smallest search candidate (sparsity {passing[0].sparsity:.1%}) failed the held-out rule; "
                f"returned sparsity {trial.sparsity:.1%}, the first of the others it accepts",
            )
    return space.empty(), runs, "no candidate passed the held-out rule; the model is returned unchanged"


def small_set_warnings(original: np.ndarray, allowed: float, confidence: float) -> list[str]:
    """Plain warnings when the held-out split is too small for the tolerance asked."""
    n = len(original)
    out = []
    binary = bool(np.isin(original, (0.0, 1.0)).all())
    if binary and 1.0 / n > allowed + 1e-12:
        out.append(
            f"warning: one held-out sample is worth {1.0 / n:.3g} of the metric, more than the allowed loss "
            f"{allowed:.3g}: the held-out split ({n} samples) is too small for this tolerance"
        )
    if binary:
        width = zero_drop_half_width(n, confidence)
        if width > allowed + 1e-12:
            needed = zero_drop_samples(allowed, confidence)
            more = f"; about {needed} held-out samples would" if needed else ""
            out.append(
                f"warning: even a candidate that changes no held-out sample has a {confidence:.0%} upper bound of "
                f"{width:.3g} on its drop, above the allowed loss {allowed:.3g}: {n} held-out samples cannot show "
                f"a drop within the tolerance{more}"
            )
    return out
