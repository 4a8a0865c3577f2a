"""The held-out acceptance rule: the drop's confidence interval, the rules' decisions, the
small-set warnings and the report fields."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import pruner
from pruner import AcceptanceRule, DropInterval, PruneOptions, Tolerance
from pruner._accept import accepts, drop_interval, zero_drop_half_width, zero_drop_samples
from pruner._confirm import confirm_in_order, small_set_warnings
from pruner._search import Judgement, Phase, Trial
from service.cli import _summary

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def pairs(n: int, worse: int, better: int) -> tuple[np.ndarray, np.ndarray]:
    """0/1 scores of an original and a candidate on ``n`` samples with the given discordant pairs."""
    original = np.ones(n)
    candidate = np.ones(n)
    candidate[:worse] = 0.0
    original[worse : worse + better] = 0.0
    return original, candidate


def test_interval_of_discordant_pairs_is_agresti_min() -> None:
    # b = 3, c = 1, n = 50: center (3.5 - 1.5) / 52, se sqrt((5/52 - center^2) / 52), z = 1.6449
    original, candidate = pairs(50, 3, 1)
    interval = drop_interval(original, candidate, higher_is_better=True, confidence=0.9)
    assert interval.method == "agresti-min"
    assert (interval.worse, interval.better, interval.samples) == (3, 1, 50)
    assert interval.estimate == pytest.approx(2 / 50)
    assert interval.low == pytest.approx(-0.0317231, abs=1e-6)
    assert interval.high == pytest.approx(0.1086462, abs=1e-6)


def test_bonferroni_widens_the_interval_for_the_candidates_compared() -> None:
    original, candidate = pairs(50, 3, 1)
    interval = drop_interval(original, candidate, higher_is_better=True, confidence=0.9, comparisons=5)
    # z = Phi^-1(1 - 0.1 / 10) = 2.3263
    assert interval.comparisons == 5
    assert interval.low == pytest.approx(-0.0608020, abs=1e-6)
    assert interval.high == pytest.approx(0.1377250, abs=1e-6)


def test_interval_of_continuous_scores_is_studentized_and_mirrored_for_lower_is_better() -> None:
    drops = np.array([0.1, 0.2, 0.3, 0.4])
    higher = drop_interval(np.ones(4), 1.0 - drops, higher_is_better=True, confidence=0.9)
    assert higher.method == "normal" and higher.worse is None
    assert higher.estimate == pytest.approx(0.25)
    assert (higher.low, higher.high) == (pytest.approx(0.1438252, abs=1e-6), pytest.approx(0.3561748, abs=1e-6))
    # an error metric (lower is better): the candidate's larger error is the drop
    lower = drop_interval(np.full(4, 0.5), 0.5 + drops, higher_is_better=False, confidence=0.9)
    assert (lower.estimate, lower.low, lower.high) == pytest.approx((higher.estimate, higher.low, higher.high))


def test_zero_drop_half_width_and_the_samples_it_takes() -> None:
    assert zero_drop_half_width(50, 0.9) == pytest.approx(1.6448536 / 52)
    needed = zero_drop_samples(0.01, 0.9)
    assert needed is not None
    assert zero_drop_half_width(needed, 0.9) <= 0.01 < zero_drop_half_width(needed - 1, 0.9)
    assert zero_drop_samples(0.0, 0.9) is None


@pytest.mark.parametrize(
    ("n", "worse", "better", "exact", "interval", "bound"),
    [
        (50, 0, 0, True, True, False),  # changes nothing, but 50 samples cannot show a drop <= 0.01
        (50, 1, 0, False, True, False),  # one sample is 2 points: exact refuses, interval does not
        (50, 2, 1, False, True, False),
        (50, 6, 0, False, False, False),  # 12 points: shown to be worse than 1 point at 90%
        (2000, 0, 0, True, True, True),  # a large split shows it
        (2000, 40, 20, True, True, False),  # 1 point measured, but the upper end is above it
    ],
)
def test_rules_accept_and_refuse_constructed_cases(
    n: int, worse: int, better: int, exact: bool, interval: bool, bound: bool
) -> None:
    got = drop_interval(*pairs(n, worse, better), higher_is_better=True, confidence=0.9)
    assert accepts(AcceptanceRule.EXACT, got, 0.01) is exact
    assert accepts(AcceptanceRule.INTERVAL, got, 0.01) is interval
    assert accepts(AcceptanceRule.BOUND, got, 0.01) is bound


def test_small_held_out_split_gets_plain_warnings_and_a_large_one_none() -> None:
    small = small_set_warnings(np.ones(50), 0.01, 0.9)
    assert len(small) == 2
    assert "one held-out sample is worth 0.02" in small[0] and "too small" in small[0]
    assert "cannot show a drop within the tolerance" in small[1] and "about 163 held-out samples" in small[1]
    assert small_set_warnings(np.ones(2000), 0.01, 0.9) == []
    # continuous scores have no granularity: no warning from the 0/1 arithmetic
    assert small_set_warnings(np.full(50, 0.5), 0.01, 0.9) == []


class Space:
    def empty(self) -> tuple[int, ...]:
        return (0,)


def trial(index: int, level: int) -> Trial:
    return Trial(index, Phase.BISECT, (level,), level / 100, 100 - level, Judgement(True, 1.0, True, 10, 0.0))


def test_in_order_confirmation_returns_the_first_accepted_of_the_fixed_list() -> None:
    passing = [trial(1, 60), trial(2, 50), trial(3, 40), trial(4, 30)]
    asked: list[tuple[int, ...]] = []

    def on_holdout(config: tuple[int, ...]) -> bool:
        asked.append(config)
        return config[0] <= 40

    chosen, runs, note = confirm_in_order(passing, Space(), on_holdout)  # type: ignore[arg-type]
    assert chosen == (40,) and runs == 3 and asked == [(60,), (50,), (40,)]
    assert note is not None and "returned sparsity 40.0%" in note
    nothing, runs, note = confirm_in_order(passing, Space(), lambda c: False)  # type: ignore[arg-type]
    assert nothing == (0,) and runs == 4
    assert note == "no candidate passed the held-out rule; the model is returned unchanged"


def test_confidence_out_of_range_is_refused_by_name() -> None:
    with pytest.raises(pruner.InvalidConfigError, match="confidence"):
        PruneOptions(confidence=1.0)
    with pytest.raises(pruner.InvalidConfigError, match="acceptance"):
        PruneOptions(acceptance="interval")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def mlp_interval_run() -> pruner.PruneResult:
    data = pruner.load_eval_set(FIXTURES / "mlp_eval.npz")
    options = PruneOptions(
        tolerance=Tolerance(0.02), acceptance=AcceptanceRule.INTERVAL, max_evaluations=6, holdout_fraction=0.3
    )
    return pruner.prune(FIXTURES / "mlp.onnx", data, options)


def test_prune_on_the_mlp_fixture_reports_the_held_out_interval(mlp_interval_run: pruner.PruneResult) -> None:
    report = mlp_interval_run.report
    drop = report.drop
    assert report.status == "pruned" and drop is not None
    assert (drop.rule, drop.method, drop.confidence, drop.split) == ("interval", "agresti-min", 0.9, "holdout")
    assert drop.samples == report.samples["holdout"] == 216
    assert report.baseline.holdout is not None and report.final.holdout is not None
    assert drop.estimate == pytest.approx(report.baseline.holdout - report.final.holdout)
    assert drop.low <= drop.estimate <= drop.high
    assert 1 <= drop.comparisons <= 6
    assert drop.low <= 0.02  # the rule's promise on the written model (its decision uses one comparison)
    summary = _summary(report)
    assert f"[{drop.low:.4f}, {drop.high:.4f}]" in summary and "rule interval" in summary


def test_report_json_round_trip_keeps_the_interval_and_tolerates_its_absence(
    mlp_interval_run: pruner.PruneResult,
) -> None:
    report = mlp_interval_run.report
    again = pruner.Report.from_json(report.to_json())
    assert again.drop == report.drop and isinstance(again.drop, DropInterval)
    older = json.loads(report.to_json())
    del older["drop"]
    assert pruner.Report.from_json(json.dumps(older)).drop is None
    assert "(no held-out split)" in _summary(pruner.Report.from_json(json.dumps(older)))


def test_a_tiny_eval_set_gets_the_warning_in_the_report() -> None:
    data = pruner.load_eval_set(FIXTURES / "mlp_eval.npz")
    assert data.labels is not None
    tiny = pruner.EvalSet({k: v[:60] for k, v in data.inputs.items()}, data.labels[:60])
    report = pruner.prune(
        FIXTURES / "mlp.onnx", tiny, PruneOptions(tolerance=Tolerance(0.01), target_sparsity=0.3)
    ).report
    assert any(n.startswith("warning: one held-out sample is worth") for n in report.notes)
    assert report.drop is not None and report.drop.samples == 12


def test_cli_flags_choose_the_rule_and_the_summary_prints_the_interval(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    argv = [
        "prune", str(FIXTURES / "mlp.onnx"), "--eval", str(FIXTURES / "mlp_eval.npz"), "-o", str(out),
        "--report", str(report_path), "--target-sparsity", "0.2", "--tolerance", "0.05",
        "--acceptance", "bound", "--confidence", "0.8", "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    report = pruner.Report.from_json(report_path.read_text())
    assert report.options["acceptance"] == "bound" and report.options["confidence"] == 0.8
    assert report.drop is not None and (report.drop.rule, report.drop.confidence) == ("bound", 0.8)
    assert "held-out drop" in capsys.readouterr().out
    assert main([*argv[:-5], "--confidence", "1.5", "--quiet"]) == 2
    assert "confidence" in capsys.readouterr().err
