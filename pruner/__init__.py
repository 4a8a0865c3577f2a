"""onnx-pruner: prune an ONNX model to the smallest one that stays within an accuracy tolerance.

Example::

    import pruner

    result = pruner.prune("model.onnx", "eval.npz", pruner.PruneOptions(tolerance=pruner.Tolerance(0.01)))
    result.save("pruned.onnx")
    print(result.report.sparsity, result.report.final)
"""

from __future__ import annotations

from ._analysis import Inspection, PrunableWeight, SkippedWeight
from ._errors import (
    CancelledError,
    InternalError,
    InvalidConfigError,
    InvalidEvalSetError,
    InvalidInputError,
    InvalidModelError,
    PlanMismatchError,
    PrunerError,
    ResourceLimitError,
    UnsupportedModelError,
)
from ._evalset import EvalSet, load_eval_set, verify_eval_set
from ._metrics import load_metric, metric_plugins, plugin_metric
from ._model import check_output_path, load_model, save_model
from ._options import (
    AcceptanceRule,
    Allocation,
    Criterion,
    CustomMetric,
    Executor,
    MetricKind,
    Mode,
    Objective,
    PruneOptions,
    Recovery,
    Tolerance,
)
from ._plan import LayerPlan, PlanIssue, PruningPlan, apply_plan, check_plan, model_sha256, transfer_plan
from ._prune import PruneResult, inspect, prune
from ._report import CandidateRecord, DropInterval, EventKind, LayerReport, ProgressEvent, Report, SplitMetric
from ._search import Phase

__all__ = [
    "AcceptanceRule",
    "Allocation",
    "CancelledError",
    "CandidateRecord",
    "Criterion",
    "CustomMetric",
    "DropInterval",
    "EvalSet",
    "EventKind",
    "Executor",
    "Inspection",
    "InternalError",
    "InvalidConfigError",
    "InvalidEvalSetError",
    "InvalidInputError",
    "InvalidModelError",
    "LayerPlan",
    "LayerReport",
    "MetricKind",
    "Mode",
    "Objective",
    "Phase",
    "PlanIssue",
    "PlanMismatchError",
    "ProgressEvent",
    "PrunableWeight",
    "PruneOptions",
    "PruneResult",
    "PrunerError",
    "PruningPlan",
    "Recovery",
    "Report",
    "ResourceLimitError",
    "SkippedWeight",
    "SplitMetric",
    "Tolerance",
    "UnsupportedModelError",
    "apply_plan",
    "check_output_path",
    "check_plan",
    "inspect",
    "load_eval_set",
    "load_metric",
    "load_model",
    "metric_plugins",
    "model_sha256",
    "plugin_metric",
    "prune",
    "save_model",
    "transfer_plan",
    "verify_eval_set",
]
