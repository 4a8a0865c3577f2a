"""Pruning plans: what to zero, separate from deciding (search) and doing (apply).

A plan names, per weight tensor, how many of its lowest-scoring units to zero
under a criterion. Scores are a pure function of the weights, so a plan is
small, JSON-serialisable and replays to the same model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ._analysis import PrunableWeight, tensor_proto
from ._graph import GraphIndex
from ._options import Criterion, Mode
from ._score import Granularity, granularity, prune_order, unit_scores

__all__ = ["LayerPlan", "PlanIssue", "PruningPlan", "apply_plan", "check_plan", "zeroed_copy"]


@dataclass(frozen=True)
class LayerPlan:
    """Zero the ``amount`` lowest-scoring of ``units`` units of ``tensor``."""

    tensor: str
    amount: int
    units: int
    channel_axis: int = 0


@dataclass(frozen=True)
class PruningPlan:
    """A replayable description of a pruned model."""

    mode: Mode
    criterion: Criterion
    layers: tuple[LayerPlan, ...]

    @property
    def granularity(self) -> Granularity:
        return granularity(self.criterion)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "criterion": self.criterion.value,
            "layers": [vars(layer).copy() for layer in self.layers],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruningPlan:
        return cls(
            Mode(data["mode"]),
            Criterion(data["criterion"]),
            tuple(LayerPlan(**layer) for layer in data["layers"]),
        )

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class PlanIssue:
    """Why (part of) a plan cannot be applied to a model."""

    tensor: str
    reason: str


def check_plan(plan: PruningPlan, model: onnx.ModelProto) -> list[PlanIssue]:
    """Reasons the plan does not fit the model; empty when it can be applied."""
    index = GraphIndex.build(model.graph)
    issues = []
    for layer in plan.layers:
        tensor = tensor_proto(index, layer.tensor)
        if tensor is None:
            issues.append(PlanIssue(layer.tensor, "no initializer or Constant of this name"))
            continue
        dims = tuple(tensor.dims)
        if plan.granularity is Granularity.CHANNEL:
            if not -len(dims) <= layer.channel_axis < len(dims):
                issues.append(PlanIssue(layer.tensor, f"channel axis {layer.channel_axis} out of range"))
                continue
            units = dims[layer.channel_axis]
        else:
            units = int(np.prod(dims))
        if units != layer.units:
            issues.append(PlanIssue(layer.tensor, f"has {units} units, the plan expects {layer.units}"))
        elif not 0 <= layer.amount <= layer.units:
            issues.append(PlanIssue(layer.tensor, f"amount {layer.amount} outside [0, {layer.units}]"))
    return issues


def zeroed_copy(weight: np.ndarray, order: np.ndarray, amount: int, gran: Granularity, channel_axis: int) -> np.ndarray:
    """``weight`` with its first ``amount`` units in ``order`` set to zero (a new array)."""
    out = weight.copy()
    if amount:
        if gran is Granularity.ELEMENT:
            out.reshape(-1)[order[:amount]] = 0
        else:
            np.moveaxis(out, channel_axis, 0)[order[:amount]] = 0
    return out


def apply_plan(
    plan: PruningPlan,
    model: onnx.ModelProto,
    *,
    orders: Mapping[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A pruned copy of ``model``; the caller's model is never changed.

    ``orders`` may supply precomputed prune orders (from the search) to skip rescoring.

    Raises:
        ValueError: the plan does not fit the model (see :func:`check_plan`).
    """
    issues = check_plan(plan, model)
    if issues:
        raise ValueError("plan does not fit the model: " + "; ".join(f"{i.tensor}: {i.reason}" for i in issues))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = GraphIndex.build(out.graph)
    gran = plan.granularity
    for layer in plan.layers:
        if layer.amount == 0:
            continue
        tensor = tensor_proto(index, layer.tensor)
        assert tensor is not None
        weight = numpy_helper.to_array(tensor)
        order = (orders or {}).get(layer.tensor)
        if order is None:
            info = PrunableWeight(layer.tensor, "", (), tuple(weight.shape), "", layer.channel_axis)
            order = prune_order(unit_scores(plan.criterion, info, weight))
        pruned = zeroed_copy(weight, order, layer.amount, gran, layer.channel_axis)
        tensor.CopyFrom(numpy_helper.from_array(pruned, tensor.name))
    return out
