"""The public API is what ``pruner.__all__`` says, and nothing drifts silently."""

from __future__ import annotations

import inspect

import pruner

EXPECTED = {
    "AcceptanceRule", "Allocation", "CancelledError", "CandidateRecord", "Criterion", "CustomMetric", "DropInterval",
    "EvalSet", "EventKind", "Executor", "Inspection", "InternalError",
    "InvalidConfigError", "InvalidEvalSetError", "InvalidInputError", "InvalidModelError", "LayerPlan",
    "LayerReport", "MetricKind", "Mode", "Objective", "Phase", "PlanIssue", "PlanMismatchError", "ProgressEvent",
    "PrunableWeight",
    "PruneOptions", "PruneResult", "PrunerError", "PruningPlan", "Recovery", "Report", "ResourceLimitError",
    "SkippedWeight", "SplitMetric", "Tolerance", "UnsupportedModelError", "apply_plan", "check_output_path",
    "check_plan", "inspect", "load_eval_set", "load_metric", "load_model", "metric_plugins", "model_sha256",
    "plugin_metric", "prune", "save_model", "transfer_plan", "verify_eval_set",
}  # fmt: skip


def test_all_is_the_expected_api() -> None:
    # adding or removing a public name is a decision: update EXPECTED and the README with it
    assert set(pruner.__all__) == EXPECTED
    assert len(pruner.__all__) == len(set(pruner.__all__))


def test_every_exported_member_exists_and_is_documented() -> None:
    for name in pruner.__all__:
        member = getattr(pruner, name)
        assert inspect.getdoc(member), f"pruner.{name} has no docstring"


def test_public_names_not_in_all_are_modules_or_private() -> None:
    public = {n for n in dir(pruner) if not n.startswith("_")}
    assert public - set(pruner.__all__) <= {"annotations"}
