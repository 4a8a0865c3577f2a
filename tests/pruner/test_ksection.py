"""The k-section of the global-level search (``search_width``): its logic on a fake space, the
executor's concurrent evaluation against evaluations in turn, and a real run on a fixture."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import pruner
from pruner import InvalidConfigError, PruneOptions
from pruner._evalset import load_eval_set, model_inputs
from pruner._evaluate import Batches, EvalOutcome, Evaluator, PortableRunner, Runner
from pruner._executor import LocalExecutor
from pruner._metrics import Metric
from pruner._options import MetricKind
from pruner._search import MAX_SEARCH_WIDTH, Judgement, Phase, _ksect, _Rounds, search, section

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
Config = tuple[int, ...]
RESOLUTION = 0.01
TOP = 98
"""The grid's last step: the fake's max level is 0.98."""


class LevelSpace:
    """One layer of 100 units: a config is (units pruned,), so a grid step is its config."""

    max_level = 0.98
    n_layers = 1

    def empty(self) -> Config:
        return (0,)

    def at_level(self, level: float) -> Config:
        return (round(level * 100),)

    def nonzero(self, config: Config) -> int:
        return 100 - config[0]

    def sparsity(self, config: Config) -> float:
        return config[0] / 100

    def push(self, config: Config, layer_ids: Sequence[int], step: float) -> Config:
        return config

    def blend(self, config: Config, targets: Sequence[float], t: float) -> Config:
        return config

    def shares(self, config: Config) -> list[float]:
        return [config[0] / 100]


def verdict(passed: bool) -> Judgement:
    return Judgement(passed, 1.0 if passed else 0.0, True, 10, 0.0)


class Judge:
    """Passes the steps ``passes`` says; records every config asked, and the rounds of ``many``."""

    def __init__(self, passes: Sequence[bool]) -> None:
        self.passes = passes
        self.asked: list[int] = []
        self.rounds: list[list[int]] = []

    def __call__(self, config: Config) -> Judgement:
        self.asked.append(config[0])
        return verdict(self.passes[config[0]])

    def many(self, configs: Sequence[Config]) -> list[Judgement]:
        self.rounds.append([c[0] for c in configs])
        return [self(c) for c in configs]

    def round(self, configs: Sequence[Config], phase: Phase) -> list[bool]:
        return [v.passed for v in self.many(configs)]


def monotone(limit: int) -> list[bool]:
    """Steps up to ``limit`` pass, the others fail."""
    return [step <= limit for step in range(TOP + 1)]


def run(passes: Sequence[bool], width: int, budget: int = 100, concurrent: bool = True) -> tuple[Judge, list[int]]:
    judge = Judge(passes)
    outcome = search(
        LevelSpace(),
        judge,
        None,
        max_evaluations=budget,
        resolution=RESOLUTION,
        search_width=width,
        judge_many=judge.many if concurrent else None,
    )
    assert [t.config[0] for t in outcome.trials] == judge.asked  # every judged config is a trial, in order
    assert all(t.phase is Phase.BISECT for t in outcome.trials)
    return judge, [outcome.best[0], len(outcome.trials), outcome.stopped_by == "converged"]


def test_section_cuts_the_interval_into_equal_parts() -> None:
    assert section(0, 99, 1) == [49]  # the bisection's first point
    assert section(0, 99, 2) == [33, 66]
    assert section(0, 99, 3) == [24, 49, 74]
    assert section(10, 14, 3) == [11, 12, 13]  # no more steps than the width: all of them
    assert section(10, 13, 5) == [11, 12]
    assert section(10, 11, 3) == []
    for lo, hi, width in [(0, 99, 16), (5, 40, 7), (3, 21, 2)]:
        steps = section(lo, hi, width)
        assert steps == sorted(set(steps)) and len(steps) == width and lo < steps[0] and steps[-1] < hi


@pytest.mark.parametrize("width", [2, 3, 5, MAX_SEARCH_WIDTH])
def test_ksection_finds_the_bisections_boundary(width: int) -> None:
    for limit in [-1, 0, 1, 7, 33, 49, 50, 66, 97, 98]:
        passes = monotone(limit)
        _, (best_k, count_k, converged_k) = run(passes, width)
        _, (best_1, count_1, converged_1) = run(passes, 1)
        assert best_k == best_1 == max(limit, 0), (width, limit)
        assert converged_k and converged_1
        # k per round, the interval shrinking k + 1 fold: never fewer rounds than log_(k+1) 99
        assert count_k >= count_1 or width >= 3


@pytest.mark.parametrize("width", [2, 3, 4])
def test_ksection_keeps_the_bisections_guarantee_on_any_verdicts(width: int) -> None:
    # no monotonicity: whatever the verdicts, the returned step passed (or is the unpruned model)
    # and the step above it was judged and failed (or is beyond the grid)
    rng = random.Random(width)
    for _ in range(200):
        passes = [rng.random() < 0.6 for _ in range(TOP + 1)]
        judge = Judge(passes)
        rounds = _Rounds(judge.round, len, lambda: 1000)
        lo, hi = _ksect(LevelSpace(), rounds, RESOLUTION, width)
        assert hi == lo + 1
        assert lo == 0 or (lo in judge.asked and passes[lo])
        assert hi == TOP + 1 or (hi in judge.asked and not passes[hi])


def test_rounds_judge_k_levels_at_once_with_the_results_of_one_after_the_other() -> None:
    passes = monotone(61)
    together, result_together = run(passes, 3)
    in_turn, result_in_turn = run(passes, 3, concurrent=False)
    assert result_together == result_in_turn
    assert together.asked == in_turn.asked
    assert together.rounds[0] == [24, 49, 74]
    assert together.rounds[1] == [55, 61, 67]  # between 49 (passed) and 74 (failed)
    assert all(len(r) > 1 for r in together.rounds)  # a round of one goes to the plain judge
    assert in_turn.rounds == []


def test_width_one_is_todays_bisection() -> None:
    for limit in [-1, 0, 12, 49, 61, 98]:
        judge, (best, _, _) = run(monotone(limit), 1)
        assert judge.rounds == []  # never the concurrent path
        lo, hi, expected = 0, TOP + 1, []
        while hi - lo > 1:  # the bisection as it was written before the k-section
            mid = (lo + hi) // 2
            expected.append(mid)
            lo, hi = (mid, hi) if mid <= limit else (lo, mid)
        assert judge.asked == expected and best == lo


@pytest.mark.parametrize(("width", "budget"), [(3, 4), (3, 5), (4, 2), (16, 10), (2, 1)])
def test_the_budget_counts_every_candidate_of_a_round(width: int, budget: int) -> None:
    judge, (best, count, converged) = run(monotone(70), width, budget=budget)
    assert count == len(judge.asked) <= budget
    assert not converged  # stopped by the budget: these budgets cannot finish 99 steps
    assert all(len(r) <= width for r in judge.rounds)
    assert best == 0 or judge.passes[best]
    # a round never starts more than the budget has left: it judges fewer, evenly spread, levels
    if budget < width:
        assert judge.asked == section(0, TOP + 1, budget)


def test_the_time_budget_stops_between_rounds() -> None:
    judge = Judge(monotone(50))
    outcome = search(
        LevelSpace(), judge, None, max_evaluations=100, max_seconds=1e-9, search_width=3, judge_many=judge.many
    )
    assert outcome.stopped_by == "max_seconds" and outcome.trials == []


def test_search_refuses_a_width_out_of_range() -> None:
    with pytest.raises(ValueError, match="search_width"):
        search(LevelSpace(), Judge(monotone(1)), None, max_evaluations=3, search_width=0)


# -- the executor: several candidates at once -------------------------------------------------------


def _mlp_evaluator() -> tuple[Evaluator, bytes, np.ndarray]:
    model = (FIXTURES / "mlp.onnx").read_bytes()
    proto = onnx.load_from_string(model)
    data = load_eval_set(FIXTURES / "mlp_eval.npz")
    output = proto.graph.output[0].name
    batches = Batches(model_inputs(proto), output, data, batch_size=32)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    reference = session.run([output], {"input": data.inputs["input"]})[0]
    return Evaluator(batches, Metric(MetricKind.ACCURACY), reference), model, np.arange(len(data))


def _pruned(model: bytes, share: float) -> bytes:
    """``model`` with the smallest ``share`` of every weight matrix zeroed."""
    proto = onnx.load_from_string(model)
    for i, tensor in enumerate(proto.graph.initializer):
        array = numpy_helper.to_array(tensor).copy()
        if array.ndim == 2:
            array[np.abs(array) <= np.quantile(np.abs(array), share)] = 0
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, tensor.name))
    return proto.SerializeToString()


def _same(a: EvalOutcome, b: EvalOutcome) -> bool:
    return (a.value, a.complete, a.samples) == (b.value, b.complete, b.samples)


def test_evaluate_many_gives_each_candidates_evaluation_in_turn_early_stops_included() -> None:
    evaluator, model, rows = _mlp_evaluator()
    output = evaluator.batches.output
    variants = [_pruned(model, s) for s in (0.3, 0.97, 0.6)]  # the middle one fails fast
    bound = evaluator.reference_value(rows) - 0.05
    made: list[int] = []

    def maker(i: int) -> Runner:
        made.append(i)
        return PortableRunner(output, model=lambda: variants[i])

    alone = [evaluator.evaluate(rows, PortableRunner(output, model=lambda v=v: v), bound=bound) for v in variants]
    assert [r.complete for r in alone] == [True, False, True]  # the premise: one stops early
    together = evaluator.evaluate_many(rows, [lambda i=i: maker(i) for i in range(3)], bound=bound)
    assert all(_same(a, b) for a, b in zip(alone, together, strict=True))
    assert made == [0, 1, 2]  # here: each runner made when its turn comes, one at a time


def test_local_outputs_many_are_outputs_in_turn_and_a_closed_one_leaves_the_others() -> None:
    evaluator, model, rows = _mlp_evaluator()
    batches, output = evaluator.batches, evaluator.batches.output
    pieces = batches.pieces(rows)
    variants = [model, _pruned(model, 0.5)]
    streams = LocalExecutor().outputs_many(
        batches, [(lambda v=v: PortableRunner(output, model=lambda: v), pieces) for v in variants]
    )
    first = next(streams[0])
    streams[0].close()  # an early stop of the first candidate
    second = np.concatenate(list(streams[1]))
    assert np.array_equal(first, batches.outputs(PortableRunner(output, model=lambda: model), pieces[0]))
    assert np.array_equal(second, batches.outputs(PortableRunner(output, model=lambda: variants[1]), rows))


# -- a real run ------------------------------------------------------------------------------------


def test_a_run_with_search_width_3_returns_a_checked_model_and_reports_the_option() -> None:
    options = PruneOptions(search_width=3, max_evaluations=9)
    result = pruner.prune(FIXTURES / "mlp.onnx", FIXTURES / "mlp_eval.npz", options)
    report = result.report
    assert report.options["search_width"] == 3
    assert report.status == "pruned" and report.evaluations <= 9 + 3  # a held-out miss adds at most 3
    bisect = [t for t in report.trace if t.phase is Phase.BISECT]
    # the first round's three levels (a level's sparsity is rounded to whole weights per layer)
    assert [t.index for t in bisect[:3]] == [1, 2, 3]
    assert [t.sparsity for t in bisect[:3]] == pytest.approx([0.24, 0.49, 0.74], abs=0.015)
    onnx.checker.check_model(result.model, full_check=True)
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    data = load_eval_set(FIXTURES / "mlp_eval.npz")
    (logits,) = session.run(None, {"input": data.inputs["input"][:16]})
    assert logits.shape == (16, 10) and np.isfinite(logits).all()


@pytest.mark.parametrize("value", [0, 17, -1, 2.0, True, "3"])
def test_search_width_is_checked(value: object) -> None:
    with pytest.raises(InvalidConfigError, match=r"search_width must be an integer in \[1, 16\]"):
        PruneOptions(search_width=value)  # type: ignore[arg-type]
