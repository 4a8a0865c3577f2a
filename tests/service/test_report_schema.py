"""protos/onnxpruner/v1/report.schema.json describes the report real runs write, every field of it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import pruner
from pruner import CandidateRecord, DropInterval, LayerReport, Report, SkippedWeight, SplitMetric

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = ROOT / "protos" / "onnxpruner" / "v1" / "report.schema.json"
FIXTURES = ROOT / "tests" / "fixtures"


def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validate(report_json: str) -> None:
    """Validates a report as a client reads it: the JSON text, not the Python object."""
    validator = jsonschema.Draft202012Validator(schema())
    validator.validate(json.loads(report_json))


def test_the_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(schema())


@pytest.mark.parametrize(
    ("model", "evalset", "options"),
    [
        ("mlp.onnx", "mlp_eval.npz", pruner.PruneOptions(max_evaluations=3)),
        (
            "cnn_bn.onnx",
            "cnn_bn_eval.npz",
            pruner.PruneOptions(mode=pruner.Mode.REMOVE, max_evaluations=2, recover=pruner.Recovery.NONE),
        ),
        ("mlp.onnx", "mlp_eval.npz", pruner.PruneOptions(max_evaluations=2, holdout_fraction=0.0)),
    ],
    ids=["zero", "remove", "no-holdout"],
)
def test_a_real_report_validates(model: str, evalset: str, options: pruner.PruneOptions) -> None:
    report = pruner.prune(FIXTURES / model, FIXTURES / evalset, options).report
    validate(report.to_json())


def test_the_schema_names_every_field_of_the_report() -> None:
    # a field added to the report without the schema (or the other way round) fails here
    definitions = schema()
    report = pruner.prune(FIXTURES / "mlp.onnx", FIXTURES / "mlp_eval.npz", pruner.PruneOptions(max_evaluations=2))
    written = report.report.to_dict()
    assert set(definitions["properties"]) == set(written) == set(definitions["required"])
    nested = {
        "split_metric": SplitMetric,
        "layer": LayerReport,
        "skipped": SkippedWeight,
        "candidate": CandidateRecord,
        "drop": DropInterval,
    }
    for name, cls in nested.items():
        fields = {f.name for f in dataclasses.fields(cls)} | ({"sparsity"} if cls is LayerReport else set())
        assert set(definitions["$defs"][name]["properties"]) == fields, name
        assert set(definitions["$defs"][name]["required"]) == fields, name
    assert {f.name for f in dataclasses.fields(Report)} | {"sparsity"} == set(definitions["properties"])


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"status": "done"}, "'done' is not one of ['pruned', 'unchanged']"),
        ({"nonzero_after": -1}, "-1 is less than the minimum of 0"),
        ({"trace": [{"index": 1}]}, "'phase' is a required property"),
    ],
)
def test_the_schema_refuses_a_report_that_breaks_it(change: dict[str, Any], problem: str) -> None:
    report = pruner.prune(FIXTURES / "mlp.onnx", FIXTURES / "mlp_eval.npz", pruner.PruneOptions(max_evaluations=2))
    broken = {**report.report.to_dict(), **change}
    with pytest.raises(jsonschema.ValidationError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        validate(json.dumps(broken))


def test_a_metric_that_is_not_finite_is_strict_json_and_reads_back() -> None:
    # an undefined correlation (NaN) or an unbounded interval (inf) once came out as bare NaN/Infinity,
    # which JSON parsers other than Python's refuse
    report = pruner.prune(
        FIXTURES / "mlp.onnx", FIXTURES / "mlp_eval.npz", pruner.PruneOptions(max_evaluations=2)
    ).report
    nan, inf = float("nan"), float("inf")
    assert report.drop is not None and report.trace
    odd = dataclasses.replace(
        report,
        baseline=SplitMetric(search=nan, holdout=inf),
        trace=[dataclasses.replace(report.trace[0], metric=-inf), *report.trace[1:]],
        drop=dataclasses.replace(report.drop, estimate=nan, low=-inf, high=inf),
        sensitivity={"w": [[0.5, inf]]},
    )

    def refuse(constant: str) -> None:
        raise AssertionError(f"bare {constant} in the report's JSON")

    text = odd.to_json()
    data = json.loads(text, parse_constant=refuse)
    assert data["baseline"] == {"search": "NaN", "holdout": "Infinity"}
    assert data["drop"]["low"] == "-Infinity"
    validate(text)
    back = Report.from_json(text)
    assert back.baseline.search != back.baseline.search and back.baseline.holdout == inf
    assert back.trace[0].metric == -inf
    assert back.drop is not None and back.drop.estimate != back.drop.estimate
    assert (back.drop.low, back.drop.high) == (-inf, inf)
    assert back.sensitivity == {"w": [[0.5, inf]]}
    assert back.final == report.final and back.layers == report.layers
