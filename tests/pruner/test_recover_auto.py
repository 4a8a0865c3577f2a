"""What ``Recovery.AUTO`` runs: sequential refits where a walk per candidate fits the time budget,
independent fits otherwise, and the report says which."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pruner
from pruner import PruneOptions, Recovery, Tolerance
from pruner._candidates import auto_recovery
from pruner._options import SEQUENTIAL_BUDGET, SEQUENTIAL_WALK_FACTOR

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_auto_walks_sequentially_when_the_walk_fits_the_budget() -> None:
    # a walk costs SEQUENTIAL_WALK_FACTOR calibration passes; the budget is SEQUENTIAL_BUDGET search passes
    calibration = SEQUENTIAL_BUDGET / SEQUENTIAL_WALK_FACTOR  # a walk of exactly one budget
    chosen, note = auto_recovery(calibration, 1.0, feedable=True)
    assert chosen is Recovery.SEQUENTIAL
    assert note.startswith("recovery auto: sequential") and f"within {SEQUENTIAL_BUDGET:g}" in note


def test_auto_fits_independently_when_the_walk_is_over_the_budget() -> None:
    calibration = 1.01 * SEQUENTIAL_BUDGET / SEQUENTIAL_WALK_FACTOR
    chosen, note = auto_recovery(calibration, 1.0, feedable=True)
    assert chosen is Recovery.AUTO
    assert "layers fitted independently" in note and "too slow" in note and "--recover sequential" in note


@pytest.mark.parametrize(
    ("pass_seconds", "feedable", "why"),
    [(None, True, "no plain pass timed"), (0.0, True, "no plain pass timed"), (100.0, False, "can feed")],
)
def test_auto_fits_independently_without_a_pass_or_fed_weights(
    pass_seconds: float | None, feedable: bool, why: str
) -> None:
    chosen, note = auto_recovery(0.001, pass_seconds, feedable=feedable)
    assert chosen is Recovery.AUTO and "layers fitted independently" in note and why in note


def _compact(copies: int) -> pruner.EvalSet:
    with np.load(FIXTURES / "compact_eval.npz") as z:
        return pruner.EvalSet({"input": np.tile(z["input"], (copies, 1, 1, 1))}, np.tile(z["labels"], copies))


def test_auto_runs_sequentially_on_a_large_eval_set() -> None:
    """A large eval set: a candidate's pass over the search split (23,040 samples) dwarfs a walk of
    16 calibration samples (timed, so the case is far from the line: the walk is estimated at
    about a tenth of the budget, under load as idle)."""
    options = PruneOptions(tolerance=Tolerance(0.02), calibration_samples=16, max_evaluations=6)
    report = pruner.prune(FIXTURES / "compact.onnx", _compact(40), options).report
    assert report.options["recover"] == "auto"
    assert report.plan["recover"] == "sequential"
    chosen = [n for n in report.notes if n.startswith("recovery auto: ")]
    assert len(chosen) == 1 and chosen[0].startswith("recovery auto: sequential"), report.notes
    assert any(n.startswith("recovery: ") and "sequential least squares" in n for n in report.notes)
    assert report.status == "pruned"


def test_auto_falls_back_to_independent_fits_when_calibration_is_the_whole_search_split() -> None:
    """Calibrating on every search sample: a walk (four calibration passes) costs more than a pass
    over the search split by itself, so no budget of three passes holds it."""
    options = PruneOptions(tolerance=Tolerance(0.02), calibration_samples=10_000, max_evaluations=6)
    report = pruner.prune(FIXTURES / "compact.onnx", _compact(1), options).report
    assert report.plan["recover"] == "auto"
    chosen = [n for n in report.notes if n.startswith("recovery auto: ")]
    assert len(chosen) == 1 and "layers fitted independently" in chosen[0], report.notes
    assert not any("sequential least squares" in n for n in report.notes)


def test_an_explicit_recovery_is_never_replaced() -> None:
    for recover in (Recovery.LSQ, Recovery.SEQUENTIAL):
        options = PruneOptions(tolerance=Tolerance(0.02), recover=recover, calibration_samples=32, max_evaluations=4)
        report = pruner.prune(FIXTURES / "compact.onnx", _compact(4), options).report
        assert report.plan["recover"] == recover.value
        assert not any(n.startswith("recovery auto: ") for n in report.notes)
