"""The report's types, and its JSON staying readable and byte-identical across versions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import pruner
from pruner import CandidateRecord, Report, SkippedWeight
from pruner._search import Phase

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# written by the code before `skipped` and `phase` had types of their own (dicts and strings)
OLD_REPORT = FIXTURES / "report_v0_dict_skipped.json"


def test_an_old_report_reads_into_typed_fields_and_writes_back_byte_for_byte() -> None:
    text = OLD_REPORT.read_text().rstrip("\n")
    report = Report.from_json(text)
    assert report.skipped == [SkippedWeight("w2", "MatMul", "excluded by pattern 'w2'")]
    assert report.trace and all(t.phase is Phase.BISECT for t in report.trace)
    assert report.to_json() == text


def test_skipped_and_phase_are_typed_and_frozen() -> None:
    record = CandidateRecord(1, Phase.REFINE, 0.5, 10, 0.9, True, True, 20, 0.1)
    assert record.phase is Phase.REFINE
    skipped = SkippedWeight("w", "LSTM", "recurrent weights are not prunable yet")
    with pytest.raises(dataclasses.FrozenInstanceError):
        skipped.reason = "changed"  # type: ignore[misc]
    assert [p.value for p in Phase] == ["bisect", "refine", "fallback"]
    assert pruner.Phase is Phase
