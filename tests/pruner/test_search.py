"""The search logic, on a fake candidate space and judge (no onnxruntime)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from pruner._confirm import FALLBACK_STEPS, confirm_with_fallback
from pruner._search import Judgement, Phase, Trial, _bisect_direction, search

Config = tuple[int, ...]


class FakeSpace:
    """Layers of 100 units each; a config is the amount zeroed per layer."""

    def __init__(self, n_layers: int = 4, units: int = 100) -> None:
        self.units = units
        self.n = n_layers

    @property
    def n_layers(self) -> int:
        return self.n

    @property
    def max_level(self) -> float:
        return 0.98

    def empty(self) -> Config:
        return (0,) * self.n

    def at_level(self, level: float) -> Config:
        return (round(level * self.units),) * self.n

    def nonzero(self, config: Config) -> int:
        return self.n * self.units - sum(config)

    def sparsity(self, config: Config) -> float:
        return sum(config) / (self.n * self.units)

    def push(self, config: Config, layer_ids: Sequence[int], step: float) -> Config:
        out = list(config)
        for i in layer_ids:
            room = 98 - out[i]
            out[i] += min(room, max(1, round(step * room))) if room > 0 else 0
        return tuple(out)

    def blend(self, config: Config, targets: Sequence[float], t: float) -> Config:
        return tuple(round(a + t * (min(g * self.units, 98) - a)) for a, g in zip(config, targets, strict=True))

    def shares(self, config: Config) -> list[float]:
        return [a / self.units for a in config]


def judge_by(limit: Sequence[int]):  # type: ignore[no-untyped-def]
    """A judge passing configs whose every layer is at most its limit."""

    def judge(config: Config) -> Judgement:
        ok = all(a <= cap for a, cap in zip(config, limit, strict=True))
        return Judgement(ok, 1.0 if ok else 0.0, True, 10, 0.0)

    return judge


def test_bisection_finds_the_boundary_at_resolution() -> None:
    space = FakeSpace()
    outcome = search(space, judge_by([37] * 4), None, max_evaluations=20, resolution=0.01)
    assert space.sparsity(outcome.best) == pytest.approx(0.37)
    assert all(t.phase is Phase.BISECT for t in outcome.trials)
    assert len(outcome.trials) <= 7


def test_max_evaluations_is_respected_and_best_so_far_returned() -> None:
    space = FakeSpace()
    outcome = search(space, judge_by([90] * 4), None, max_evaluations=3, resolution=0.01)
    assert len(outcome.trials) == 3
    assert outcome.stopped_by == "max_evaluations"
    assert space.sparsity(outcome.best) > 0


def test_max_seconds_zero_budget_evaluates_nothing() -> None:
    space = FakeSpace()
    judged: list[Config] = []
    probed: list[Config] = []
    passing = judge_by([90] * 4)

    def judge(config: Config) -> Judgement:
        judged.append(config)  # judging builds and runs a candidate: none may be
        return passing(config)

    def probe(config: Config) -> float:
        probed.append(config)
        return float(sum(config))

    outcome = search(space, judge, probe, max_evaluations=20, max_seconds=1e-9)
    assert judged == [] and probed == []
    assert outcome.trials == []
    assert outcome.stopped_by == "max_seconds"
    assert outcome.best == space.empty()


def test_refinement_pushes_insensitive_layers_beyond_the_global_level() -> None:
    space = FakeSpace()
    limits = [20, 90, 90, 20]

    def probe(config: Config) -> float:
        # layers 0 and 3 are sensitive: deviation grows fast with their amount
        return sum(a * (10.0 if i in (0, 3) else 0.01) for i, a in enumerate(config))

    outcome = search(space, judge_by(limits), probe, max_evaluations=16, resolution=0.01)
    best = outcome.best
    assert best[0] <= 20 and best[3] <= 20
    assert best[1] > 40 and best[2] > 40, best
    assert any(t.phase is Phase.REFINE and t.judgement.passed for t in outcome.trials)
    assert outcome.probes > 0


def test_everything_fails_returns_the_unpruned_config() -> None:
    space = FakeSpace()
    outcome = search(space, judge_by([0] * 4), lambda c: float(sum(c)), max_evaluations=12)
    assert outcome.best == space.empty()
    assert outcome.passing() == []


def test_passing_is_sorted_smallest_first() -> None:
    space = FakeSpace()
    outcome = search(space, judge_by([60] * 4), None, max_evaluations=12)
    sizes = [t.nonzero for t in outcome.passing()]
    assert sizes == sorted(sizes)
    assert outcome.passing()[0].config == outcome.best


def test_a_measured_cost_ranks_passing_candidates() -> None:
    # latency objective: among passing configs the cheapest wins, not the smallest
    space = FakeSpace()

    def judge(config: Config) -> Judgement:
        ok = all(a <= 60 for a in config)
        cost = abs(config[0] - 30) + 1.0 if ok else None  # fastest near 30, not at the largest passing level
        return Judgement(ok, 1.0, True, 10, 0.0, cost)

    outcome = search(space, judge, None, max_evaluations=12, resolution=0.01)
    costs = [t.judgement.cost for t in outcome.passing()]
    assert costs == sorted(costs)
    assert outcome.passing()[0].config == outcome.best
    assert outcome.best[0] != 60


def trial_at(space: FakeSpace, amount: int) -> Trial:
    config = (amount,) * space.n
    return Trial(0, Phase.BISECT, config, space.sparsity(config), space.nonzero(config), Judgement(True, 1, True, 1, 0))


@pytest.mark.parametrize(
    ("passing", "holdout_limit", "expected", "runs"),
    [
        # next passing candidate 20, then on 20 -> 60: 40 passes, 50 misses, 45 passes, 48 and 46 miss
        ([60, 20], 45, 45, 2 + 5),
        # none passes held-out: from the unpruned model 30 passes, 45, 38, 34 and 32 miss (2 points apart)
        ([60], 30, 30, 1 + 5),
        ([60, 20], 70, 60, 1),  # the smallest passes: nothing else runs
        # three tried, then the rest: 20 passes; 40 and 30 miss, 25 passes, 28 and 26 miss
        ([60, 50, 40, 20], 25, 25, 3 + 1 + 5),
        # three tried, then the rest bisected (35 passes, 45 and 40 miss); 35 -> 60: 48, 41, 38 miss, 37 passes
        ([60, 58, 55, 50, 45, 40, 35, 30, 20], 37, 37, 3 + 3 + 4),
        # none passes: from the unpruned model 30 and 15 miss, 8 passes, 11 misses, 9 passes
        ([60, 58, 55, 50], 10, 9, 3 + 1 + 5),
        # a long line is cut until its ends are 2 points apart: 30, 45, 38, then 41 passes and 43 misses
        # (three steps would stop at 38)
        ([60], 42, 41, 1 + 5),
        ([44, 36], 38, 38, 2 + 2),  # a short line: 40 misses, 38 passes, 2 points apart after two steps
    ],
)
def test_a_held_out_miss_bisects_towards_the_smallest_candidate(
    passing: list[int], holdout_limit: int, expected: int, runs: int
) -> None:
    space = FakeSpace()
    searched: list[Config] = []

    def on_search(config: Config) -> bool:
        searched.append(config)
        return max(config) <= 60

    chosen, confirmations, note = confirm_with_fallback(
        [trial_at(space, a) for a in passing],
        space,
        lambda c: max(c) <= holdout_limit,
        on_search,
    )
    assert chosen == (expected,) * space.n
    assert len(searched) <= FALLBACK_STEPS
    assert confirmations == runs  # held-out runs: the passing candidates tried, then each point passing search
    assert (note is not None and "fell back" in note) == (expected != passing[0])


def test_a_direction_that_passes_to_its_end_is_taken_in_two_steps() -> None:
    space = FakeSpace()
    tried: list[Config] = []

    def evaluate(config: Config, phase: Phase) -> bool:
        tried.append(config)
        return True

    assert _bisect_direction(
        space,
        evaluate,
        (20,) * 4,
        [0.9, 0.9, 0.2, 0.2],
    )
    assert tried == [(55, 55, 20, 20), (90, 90, 20, 20)]  # half way, then the end
