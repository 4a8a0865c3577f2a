"""Remove mode: candidates that physically drop channel components (see ``_structure``).

The search sees the same kind of space as in zero mode: a family of coupled
channels plays the part of a layer, its components the part of units. A config
removes the lowest-scoring ``amount`` components of every family.
"""

from __future__ import annotations

import fnmatch
import math

import numpy as np
import onnx
from onnx import numpy_helper

from ._analysis import PrunableWeight
from ._evaluate import Runner, make_session, session_runner
from ._options import Criterion, PruneOptions
from ._report import LayerReport
from ._score import lowest
from ._space import SKETCH_POINTS, Config, LayerUnits, ZeroSpace, allocation_scores
from ._structure import Family, Structure, analyze_structure, remove_components

__all__ = ["Remover"]


def component_scores(model: onnx.ModelProto, structure: Structure, family: Family, criterion: Criterion) -> np.ndarray:
    """Importance of each component of ``family``: its weight slices' norms, summed over the coupled slices."""
    params = {t.name: t for t in model.graph.initializer}
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    index = {int(c): i for i, c in enumerate(family.components)}
    total = np.zeros(len(family.components), dtype=np.float64)
    for name, axis in family.param_slots:
        tensor = params.get(name)
        if tensor is None:
            tensor = next(a.t for a in constants[name].attribute if a.name == "value")
        weight = numpy_helper.to_array(tensor).astype(np.float64)
        rows = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
        if criterion is Criterion.L2:
            per_row = (rows * rows).sum(axis=1)
        else:  # magnitude and l1: summed |w| of the slice
            per_row = np.abs(rows).sum(axis=1)
        atoms = structure.atoms((name, axis))
        for position, component in enumerate(atoms):
            i = index.get(int(component))
            if i is not None:
                total[i] += per_row[position]
    if criterion is Criterion.L2:
        total = np.sqrt(total)
    return total.astype(np.float32)


def _family_units(family: Family, scores: np.ndarray, options: PruneOptions) -> LayerUnits:
    units = len(family.components)
    order = np.argsort(scores, kind="stable")
    params = family.params_per_component
    total = int(params.sum())
    layer = PrunableWeight(family.name, "channels", (), (total,), "float32", 0)
    sorted_scores = scores[order]
    if units <= SKETCH_POINTS:
        ranks = np.arange(units)
    else:
        ranks = np.unique(np.linspace(0, units - 1, SKETCH_POINTS).astype(np.int64))
    multiple = options.channel_multiple
    keep_at_least = max(1, multiple) if units >= multiple else 1
    cap = min(math.floor(options.layer_cap * units + 1e-9), units - keep_at_least)
    return LayerUnits(
        layer=layer,
        units=units,
        params_per_unit=max(1, total // max(units, 1)),
        max_amount=max(cap, 0),
        sketch=allocation_scores(sorted_scores, ranks, options.allocation),
        sketch_ranks=ranks,
        raw_sketch=sorted_scores[ranks].copy(),
        zero_units_nnz=np.concatenate([[0], np.cumsum(params[order])]),
        zeros=0,
    )


class RemoveSpace(ZeroSpace):
    """ZeroSpace whose amounts keep every family's remaining channels a multiple of N."""

    def __init__(self, layers: list[LayerUnits], options: PruneOptions) -> None:
        super().__init__(layers, options.allocation)
        self.multiple = options.channel_multiple

    def _snap(self, config: Config) -> Config:
        if self.multiple <= 1:
            return config
        out = []
        for amount, u in zip(config, self.layers, strict=True):
            if u.units <= self.multiple:
                out.append(0)
                continue
            remaining = u.units - amount
            remaining = math.ceil(remaining / self.multiple) * self.multiple
            out.append(max(0, u.units - remaining))
        return tuple(out)

    def at_level(self, level: float) -> Config:
        return self._snap(super().at_level(level))

    def push(self, config: Config, layer_ids: list[int], step: float) -> Config:  # type: ignore[override]
        pushed = super().push(config, layer_ids, step)
        if self.multiple <= 1:
            return pushed
        # a push must move by at least one multiple where it moves at all
        bumped = tuple(
            min(a + self.multiple - 1, u.max_amount) if a > c else a
            for a, c, u in zip(pushed, config, self.layers, strict=True)
        )
        return self._snap(bumped)

    def blend(self, config: Config, targets: list[float], t: float) -> Config:  # type: ignore[override]
        return self._snap(super().blend(config, targets, t))


class Remover:
    """Families, scores and the search space of remove mode, and the models a config describes."""

    def __init__(self, model: onnx.ModelProto, options: PruneOptions) -> None:
        self.model = model
        self.options = options
        self.structure = analyze_structure(model)
        self.skipped = [(what, why) for what, why in self.structure.skipped]
        self.families = []
        for family in self.structure.families:
            names = [family.name, *(name for name, _ in family.param_slots)]
            if options.include and not any(fnmatch.fnmatchcase(n, p) for n in names for p in options.include):
                self.skipped.append((family.name, f"not matched by any include pattern ({', '.join(options.include)})"))
                continue
            excluded = [p for p in options.exclude if any(fnmatch.fnmatchcase(n, p) for n in names)]
            if excluded:
                self.skipped.append((family.name, f"excluded by {excluded[0]!r}"))
                continue
            self.families.append(family)
        self.scores = [component_scores(model, self.structure, f, options.criterion) for f in self.families]
        units = [_family_units(f, s, options) for f, s in zip(self.families, self.scores, strict=True)]
        self.space = RemoveSpace(units, options)

    def removed(self, config: Config) -> np.ndarray:
        """Component ids a config removes."""
        parts = [
            family.components[lowest(scores, amount)]
            for family, scores, amount in zip(self.families, self.scores, config, strict=True)
            if amount
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def to_proto(self, config: Config) -> onnx.ModelProto:
        return remove_components(self.model, self.structure, list(self.removed(config)))

    def to_bytes(self, config: Config) -> bytes:
        return self.to_proto(config).SerializeToString()

    def runner(self, config: Config, output: str, threads: int) -> Runner:
        return session_runner(make_session(self.to_bytes(config), threads=threads), output)

    def layer_reports(self, config: Config) -> list[LayerReport]:
        out = []
        for i, (family, amount) in enumerate(zip(self.families, config, strict=True)):
            before = self.space.layer_nonzero(i, 0)
            out.append(
                LayerReport(
                    family.name,
                    "channels",
                    (len(family.components),),
                    before,
                    before,
                    self.space.layer_nonzero(i, amount),
                    channels_before=len(family.components),
                    channels_after=len(family.components) - amount,
                )
            )
        return out
