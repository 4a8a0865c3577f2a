"""Results of a run: the report (JSON-serialisable) and progress events."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ._analysis import SkippedWeight
from ._search import Phase

__all__ = ["CandidateRecord", "DropInterval", "EventKind", "LayerReport", "ProgressEvent", "Report", "SplitMetric"]


class EventKind(enum.Enum):
    BASELINE = "baseline"
    CANDIDATE = "candidate"
    NEW_BEST = "new_best"
    CONFIRM = "confirm"
    DONE = "done"


@dataclass(frozen=True)
class ProgressEvent:
    """Emitted to ``on_progress`` while a run goes on."""

    kind: EventKind
    message: str
    evaluation: int = 0
    max_evaluations: int = 0
    sparsity: float | None = None
    nonzero_params: int | None = None
    metric: float | None = None
    passed: bool | None = None


@dataclass(frozen=True)
class SplitMetric:
    """A metric value on the search split and on the held-out split (None when there is none)."""

    search: float
    holdout: float | None


@dataclass(frozen=True)
class DropInterval:
    """A candidate's metric drop on a split, in metric units, with its confidence interval.

    ``low``/``high`` bound the drop on new data from the eval set's distribution with probability
    ``confidence`` (two-sided, each end one-sided at ``(1 - confidence) / 2``), Bonferroni-corrected
    for the ``comparisons`` candidates the rule could have returned from this split.
    """

    rule: str
    confidence: float
    method: str
    split: str
    samples: int
    estimate: float
    low: float
    high: float
    comparisons: int = 1
    worse: int | None = None
    """0/1 scores: samples the original gets right and the candidate wrong (b)."""
    better: int | None = None
    """0/1 scores: samples the candidate gets right and the original wrong (c)."""


@dataclass(frozen=True)
class LayerReport:
    name: str
    op_type: str
    shape: tuple[int, ...]
    params: int
    nonzero_before: int
    nonzero_after: int
    channels_before: int | None = None
    """Remove mode: output channels (components) of the family before and after."""
    channels_after: int | None = None

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero_after / self.params if self.params else 0.0


@dataclass(frozen=True)
class CandidateRecord:
    """One evaluated candidate (the trace)."""

    index: int
    phase: Phase
    sparsity: float
    nonzero_params: int
    metric: float
    passed: bool
    complete: bool
    """False when evaluation stopped early because the candidate could no longer pass."""
    samples: int
    seconds: float
    latency: float | None = None
    """Objective latency: median seconds of one batch (passing candidates only)."""


@dataclass
class Report:
    """Everything a run did and measured. ``to_json()`` is the CLI's ``--report``."""

    tool_version: str
    versions: dict[str, str]
    options: dict[str, Any]
    metric: str
    higher_is_better: bool
    output: str
    samples: dict[str, int]
    baseline: SplitMetric
    final: SplitMetric
    allowed_loss: float
    status: str
    """``pruned`` or ``unchanged`` (nothing passed the tolerance, or nothing was prunable)."""
    total_params: int
    prunable_params: int
    nonzero_before: int
    nonzero_after: int
    bytes_before: int
    bytes_after: int
    layers: list[LayerReport]
    skipped: list[SkippedWeight]
    """What was left alone and why: weights (zero/N:M modes) or channel families (remove mode)."""
    trace: list[CandidateRecord]
    evaluations: int
    confirmations: int
    probes: int
    stopped_by: str
    plan: dict[str, Any]
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)
    drop: DropInterval | None = None
    """The returned model's held-out drop, its confidence interval and the acceptance rule (None: no
    held-out split, or a report from before the field existed)."""
    sensitivity: dict[str, list[list[float]]] = field(default_factory=dict)
    """Allocation "sensitivity": each layer's [[sparsity, output deviation], ...]; pass it back as
    ``PruneOptions(sensitivity=...)`` to skip measuring it again."""

    @property
    def sparsity(self) -> float:
        """Share of prunable params that are zero in the result."""
        return 1.0 - self.nonzero_after / self.prunable_params if self.prunable_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["trace"] = [{**record, "phase": record["phase"].value} for record in out["trace"]]
        out["sparsity"] = self.sparsity
        out["layers"] = [{**asdict(layer), "sparsity": layer.sparsity} for layer in self.layers]
        return out

    def to_json(self) -> str:
        """Strict JSON: a metric that is not finite (an undefined correlation, an unbounded interval)
        is the string "NaN", "Infinity" or "-Infinity", as in protobuf's JSON mapping."""
        return json.dumps(_strict(self.to_dict()), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """The report ``to_dict`` describes (e.g. one received from the gRPC service)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["baseline"] = SplitMetric(**_reals(data["baseline"], "search", "holdout"))
        values["final"] = SplitMetric(**_reals(data["final"], "search", "holdout"))
        layer_fields = {f.name for f in dataclasses.fields(LayerReport)}
        values["layers"] = [
            LayerReport(**{**{k: v for k, v in la.items() if k in layer_fields}, "shape": tuple(la["shape"])})
            for la in data["layers"]
        ]
        values["trace"] = [
            CandidateRecord(**{**_reals(t, "metric"), "phase": Phase(t["phase"])}) for t in data["trace"]
        ]
        values["skipped"] = [SkippedWeight(**s) for s in data["skipped"]]
        if data.get("drop") is not None:
            drop_fields = {f.name for f in dataclasses.fields(DropInterval)}
            drop = _reals(data["drop"], "estimate", "low", "high")
            values["drop"] = DropInterval(**{k: v for k, v in drop.items() if k in drop_fields})
        if "sensitivity" in data:
            values["sensitivity"] = {
                name: [[_real(x) for x in point] for point in points] for name, points in data["sensitivity"].items()
            }
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> Report:
        return cls.from_dict(json.loads(text))


_NOT_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _strict(value: Any) -> Any:
    """``value`` with every float that is not finite written as protobuf's JSON strings for it."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(item) for item in value]
    return value


def _real(value: Any) -> Any:
    """The float a number field of ``to_json`` holds (the inverse of ``_strict``)."""
    return _NOT_FINITE.get(value, value) if isinstance(value, str) else value


def _reals(data: dict[str, Any], *names: str) -> dict[str, Any]:
    return {**data, **{name: _real(data[name]) for name in names if name in data}}
