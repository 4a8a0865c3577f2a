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
from ._nm import nm_mask
from ._options import Criterion, Mode, Recovery
from ._remove import removal_problems, replay_removal
from ._score import Granularity, granularity, lowest, unit_scores

__all__ = [
    "LayerPlan",
    "PlanIssue",
    "PruningPlan",
    "apply_plan",
    "check_plan",
    "element_mask",
    "pruned_weight",
    "zero_lowest",
]


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
    nm: tuple[int, int] | None = None
    """N:M mode: the N and M every converted layer keeps."""
    recover: Recovery = Recovery.NONE
    """How the run refit the weights it kept. A plan replays which weights or channels were
    pruned; refit values need the run's calibration data, so ``apply_plan`` of a recovered
    plan gives the pruning pattern with the original values (the run's model has the refit)."""
    static_reshapes: bool = True
    """Remove mode: whether the run made computed Reshape targets constants before finding the
    channels (not when the constants changed the model's outputs on the eval set)."""

    @property
    def granularity(self) -> Granularity:
        return granularity(self.criterion)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode.value,
            "criterion": self.criterion.value,
            "layers": [vars(layer).copy() for layer in self.layers],
        }
        if self.nm is not None:
            out["nm"] = list(self.nm)
        out["recover"] = self.recover.value
        if self.mode is Mode.REMOVE:
            out["static_reshapes"] = self.static_reshapes
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruningPlan:
        nm = data.get("nm")
        return cls(
            Mode(data["mode"]),
            Criterion(data["criterion"]),
            tuple(LayerPlan(**layer) for layer in data["layers"]),
            None if nm is None else (int(nm[0]), int(nm[1])),
            Recovery(data.get("recover", Recovery.NONE.value)),
            bool(data.get("static_reshapes", True)),
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
    if plan.mode is Mode.REMOVE:
        if plan.criterion is Criterion.ACTIVATION:
            return [PlanIssue("", "an activation-scored removal needs the run's calibration data to replay")]
        triples = [(layer.tensor, layer.amount, layer.units) for layer in plan.layers]
        return [PlanIssue(name, why) for name, why in removal_problems(model, triples, plan.static_reshapes)]
    index = GraphIndex.build(model.graph)
    if plan.mode is Mode.NM:
        missing = [layer.tensor for layer in plan.layers if tensor_proto(index, layer.tensor) is None]
        issues = [PlanIssue(name, "no initializer or Constant of this name") for name in missing]
        issues += [PlanIssue(la.tensor, "N:M amount must be 0 or 1") for la in plan.layers if la.amount not in (0, 1)]
        if plan.nm is None:
            issues.append(PlanIssue("", "an N:M plan needs its N and M"))
        return issues
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


def zero_lowest(
    weight: np.ndarray,
    scores: np.ndarray,
    amount: int,
    gran: Granularity,
    channel_axis: int,
    hint: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Zero, in place, the ``amount`` lowest-scoring units of ``weight``; returns ``weight``."""
    if amount:
        mask = lowest(scores, amount, hint)
        if gran is Granularity.ELEMENT:
            weight[mask.reshape(weight.shape)] = 0
        else:
            np.moveaxis(weight, channel_axis, 0)[mask] = 0
    return weight


def element_mask(shape: tuple[int, ...], units: np.ndarray, gran: Granularity, channel_axis: int) -> np.ndarray:
    """Per-element mask (True = pruned) of a unit mask from :func:`lowest`."""
    if gran is Granularity.ELEMENT:
        return units.reshape(shape)
    mask = np.zeros(shape, dtype=bool)
    np.moveaxis(mask, channel_axis, 0)[units] = True
    return mask


def pruned_weight(plan: PruningPlan, layer: LayerPlan, weight: np.ndarray) -> np.ndarray:
    """``weight`` (any float dtype) pruned as ``layer`` of ``plan`` says, in place."""
    if layer.amount == 0:
        return weight
    info = PrunableWeight(layer.tensor, "", (), tuple(weight.shape), "", layer.channel_axis)
    scores = unit_scores(plan.criterion, info, weight)
    if plan.mode is Mode.NM:
        assert plan.nm is not None
        mask = nm_mask(info, scores, *plan.nm)
        if mask is not None:
            weight[mask] = 0
        return weight
    return zero_lowest(weight, scores, layer.amount, plan.granularity, layer.channel_axis)


def apply_plan(plan: PruningPlan, model: onnx.ModelProto) -> onnx.ModelProto:
    """A pruned copy of ``model``; the caller's model is never changed.

    Raises:
        ValueError: the plan does not fit the model (see :func:`check_plan`).
    """
    issues = check_plan(plan, model)
    if issues:
        raise ValueError("plan does not fit the model: " + "; ".join(f"{i.tensor}: {i.reason}" for i in issues))
    if plan.mode is Mode.REMOVE:
        amounts = {layer.tensor: layer.amount for layer in plan.layers}
        return replay_removal(model, plan.criterion, amounts, plan.static_reshapes)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = GraphIndex.build(out.graph)
    for layer in plan.layers:
        if layer.amount == 0:
            continue
        tensor = tensor_proto(index, layer.tensor)
        assert tensor is not None
        weight = pruned_weight(plan, layer, numpy_helper.to_array(tensor).copy())
        tensor.CopyFrom(numpy_helper.from_array(weight, tensor.name))
    return out
