"""Remove mode: candidates that physically drop channel components (see ``_structure``).

The search sees the same kind of space as in zero mode: a family of coupled
channels plays the part of a layer, its components the part of units. A config
removes the lowest-scoring ``amount`` components of every family.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from ._analysis import PrunableWeight, Unit
from ._errors import check_stop
from ._evaluate import Runner, SplitModel, make_session, session_runner
from ._graph import GraphIndex
from ._ops import Unfold
from ._options import REFITTING, Criterion, Objective, PruneOptions, Recovery
from ._recover import Calibration, SequentialRefit
from ._report import LayerReport
from ._score import lowest
from ._space import SKETCH_POINTS, Config, LayerUnits, ZeroSpace, allocation_sketches
from ._static import static_reshapes
from ._structure import (
    Family,
    Structure,
    analyze_structure,
    mask_norms,
    remove_components,
    set_params,
    zero_components,
)

__all__ = ["Remover", "removal_problems", "replay_removal"]


def component_scores(
    model: onnx.ModelProto,
    structure: Structure,
    family: Family,
    criterion: Criterion,
    calibration: Calibration | None = None,
) -> np.ndarray:
    """Importance of each component of ``family``, summed over its coupled weight slices.

    Only the weights of Conv/Gemm/MatMul count (output rows of producers, input
    columns of consumers); a BatchNormalization between them scales the rows by
    its per-channel gain |gamma| / sqrt(var + eps), as folding it would. The
    activation criterion (the group form of Wanda) scores a channel by what its
    consumers draw from it: sum |W_ij| * ||x_j|| over the consumers' columns of
    that channel, from calibration statistics; a family whose consumers have none
    is scored by magnitude.
    """
    arrays = _Constants(GraphIndex.build(model.graph))
    if criterion is Criterion.ACTIVATION and calibration is not None:
        drawn = _activation_scores(structure, family, calibration, arrays)
        if drawn is not None:
            return drawn
        criterion = Criterion.MAGNITUDE
    index = {int(c): i for i, c in enumerate(family.components)}
    gain = np.ones(len(family.components), dtype=np.float64)
    for scale, var, eps in structure.scales:
        if (scale, 0) in structure.slot_base and scale in arrays and var in arrays:
            factor = np.abs(arrays[scale].astype(np.float64)) / np.sqrt(arrays[var].astype(np.float64) + eps)
            for position, component in enumerate(structure.atoms((scale, 0))):
                i = index.get(int(component))
                if i is not None:
                    gain[i] *= factor[position]
    produced = np.zeros(len(family.components), dtype=np.float64)
    consumed = np.zeros(len(family.components), dtype=np.float64)
    for name, axis in family.param_slots:
        is_producer = (name, axis) in structure.producer_slots
        if not is_producer and (name, axis) not in structure.consumer_slots:
            continue
        weight = arrays[name].astype(np.float64)
        rows = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
        per_row = (rows * rows).sum(axis=1) if criterion is Criterion.L2 else np.abs(rows).sum(axis=1)
        target = produced if is_producer else consumed
        for position, component in enumerate(structure.atoms((name, axis))):
            i = index.get(int(component))
            if i is not None:
                target[i] += per_row[position]
    if criterion is Criterion.L2:
        total = np.sqrt(produced) * gain + np.sqrt(consumed)
    else:
        total = produced * gain + consumed
    return total.astype(np.float32)


def _activation_scores(
    structure: Structure, family: Family, calibration: Calibration, arrays: Mapping[str, np.ndarray]
) -> np.ndarray | None:
    index = {int(c): i for i, c in enumerate(family.components)}
    total = np.zeros(len(family.components), dtype=np.float64)
    found = False
    for name, axis in family.param_slots:
        layout, stats = calibration.layouts.get(name), calibration.stats.get(name)
        if (name, axis) not in structure.consumer_slots or layout is None or stats is None or stats.squares is None:
            continue
        if layout.groups > 1:  # a grouped Conv passes channels through: what it draws is not one row's
            continue
        found = True
        rows = np.abs(layout.rows(arrays[name].astype(np.float64)))
        drawn = (rows * stats.norms[None, :]).sum(axis=0)  # per input column
        channels = structure.slot_size[(name, axis)]
        per_channel = drawn.reshape(channels, -1).sum(axis=1)  # columns are channel-major
        for position, component in enumerate(structure.atoms((name, axis))):
            i = index.get(int(component))
            if i is not None:
                total[i] += per_channel[position]
    return total.astype(np.float32) if found else None


class _Constants(Mapping[str, np.ndarray]):
    """The initializers and Constant values of a graph as arrays, each read when first asked for."""

    def __init__(self, index: GraphIndex) -> None:
        self.index = index
        self.names = index.constant_names()
        self.read: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.read:
            value = self.index.value(name)
            if value is None:
                raise KeyError(name)
            self.read[name] = value
        return self.read[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _constants(model: onnx.ModelProto) -> Mapping[str, np.ndarray]:
    return _Constants(GraphIndex.build(model.graph))


def _sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Element counts of the initializers and Constant node values."""
    index = GraphIndex.build(model.graph)
    tensors = {name: index.tensor(name) for name in (*index.initializers, *index.constants)}
    return {name: math.prod(t.dims) for name, t in tensors.items() if t is not None}


def _family_units(family: Family, scores: np.ndarray, options: PruneOptions) -> LayerUnits:
    units = len(family.components)
    order = np.argsort(scores, kind="stable")
    params = family.params_per_component
    total = int(params.sum())
    layer = PrunableWeight.family(family.name, total)
    sorted_scores = scores[order]
    if units <= SKETCH_POINTS:
        ranks = np.arange(units)
    else:
        ranks = np.unique(np.linspace(0, units - 1, SKETCH_POINTS).astype(np.int64))
    multiple = channel_multiple(units, options)
    keep_at_least = max(1, multiple) if units >= multiple else 1
    cap = min(math.floor(options.layer_cap * units + 1e-9), units - keep_at_least)
    sketch, sketches = allocation_sketches(sorted_scores, ranks, options.allocation)
    return LayerUnits(
        layer=layer,
        units=units,
        params_per_unit=max(1, total // max(units, 1)),
        max_amount=max(cap, 0),
        sketch=sketch,
        sketches=sketches,
        sketch_ranks=ranks,
        raw_sketch=sorted_scores[ranks].copy(),
        zero_units_nnz=np.concatenate([[0], np.cumsum(params[order])]),
        zeros=0,
    )


def channel_multiple(channels: int, options: PruneOptions) -> int:
    """The multiple a family of ``channels`` keeps its count at.

    Unset: 8 where the count is a multiple of 8 (onnxruntime's blocked conv kernels; odd counts
    fall back to slower ones). With the latency objective, the block size of this CPU's kernels
    where the count is a multiple of it: on AVX-512 a block holds 16 channels, so 24 channels run
    as slowly as 32 and only 16 is faster.
    """
    if options.channel_multiple is not None:
        return options.channel_multiple
    if options.effective_objective is Objective.LATENCY and channels % nchwc_block() == 0:
        return nchwc_block()
    return AUTO_MULTIPLE if channels % AUTO_MULTIPLE == 0 else 1


AUTO_MULTIPLE = 8
STATE_COLUMNS = 2
"""The axis of a recurrent R [directions, gates * hidden, hidden] that is h_{t-1}, the units' own
states read back (remove mode refits the kept columns when units go)."""
BUILT_CACHE_ENTRIES = 4
BUILT_CACHE_BYTES = 256 << 20
"""Serialized candidates kept (the most recent one always, however large)."""


@functools.cache
def nchwc_block() -> int:
    """Channels per block of onnxruntime's NCHWc conv kernels on this CPU (16 with AVX-512F)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return AUTO_MULTIPLE
    return 16 if "avx512f" in flags.split() else AUTO_MULTIPLE


class RemoveSpace(ZeroSpace):
    """ZeroSpace whose amounts keep every family's remaining channels a multiple of its N."""

    def __init__(self, layers: list[LayerUnits], options: PruneOptions) -> None:
        super().__init__(layers, options.allocation)
        self.multiples = [channel_multiple(u.units, options) for u in layers]

    def _snap(self, config: Config) -> Config:
        out = []
        for amount, u, multiple in zip(config, self.layers, self.multiples, strict=True):
            if multiple <= 1:
                out.append(amount)
            elif u.units <= multiple:
                out.append(0)
            else:
                remaining = math.ceil((u.units - amount) / multiple) * multiple
                out.append(max(0, u.units - remaining))
        return tuple(out)

    def at_level(self, level: float) -> Config:
        return self._snap(super().at_level(level))

    def push(self, config: Config, layer_ids: Sequence[int], step: float) -> Config:
        pushed = super().push(config, layer_ids, step)
        # a push must move by at least one multiple where it moves at all
        bumped = tuple(
            min(a + multiple - 1, u.max_amount) if a > c else a
            for a, c, u, multiple in zip(pushed, config, self.layers, self.multiples, strict=True)
        )
        return self._snap(bumped)

    def blend(self, config: Config, targets: Sequence[float], t: float) -> Config:
        return self._snap(super().blend(config, targets, t))


class Remover:
    """Families, scores and the search space of remove mode, and the models a config describes."""

    def __init__(
        self,
        model: onnx.ModelProto,
        options: PruneOptions,
        calibration: Calibration | None = None,
        sequential: Callable[[SplitModel], SequentialRefit] | None = None,
        *,
        static: bool = True,
        frozen: Mapping[int, str] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.stop = stop
        # computed Reshape targets would freeze every channel their Shape nodes read
        model, self.static_targets = static_reshapes(model) if static else (model, 0)
        check_stop(stop)
        self.model = model
        self.options = options
        self.calibration = calibration
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
            if frozen and int(family.components[0]) in frozen:
                self.skipped.append((family.name, frozen[int(family.components[0])]))
                continue
            self.families.append(family)
        self.scores = []
        for family in self.families:
            check_stop(stop)
            self.scores.append(component_scores(model, self.structure, family, options.criterion, calibration))
        units = [_family_units(f, s, options) for f, s in zip(self.families, self.scores, strict=True)]
        self.space = RemoveSpace(units, options)
        self.sequential: SequentialRefit | None = None
        self._built: dict[Config, bytes] = {}
        self.norm_masks: dict[str, tuple[str, int]] = {}
        if sequential is not None and calibration is not None:
            # every tensor a removal zeroes is fed, so one session serves every candidate
            fed = set(_constants(model)) & ({name for name, _ in self.structure.slot_base} | set(calibration.layouts))
            fed |= {la.bias for la in calibration.layouts.values() if la.bias is not None}
            # approximate norms see only the kept channels, as in the model that gets written
            copy, self.norm_masks = mask_norms(model, self.structure)
            self.sequential = sequential(SplitModel.take(copy, fed | set(self.norm_masks)))

    def trial(self, families: list[Family]) -> tuple[bytes, bytes]:
        """The model without the first channel of each of ``families``, and with it zeroed
        instead: the two must give the same outputs (``ChannelCandidates._check_removals`` runs both)."""
        removed = [int(f.components[0]) for f in families]
        return (
            remove_components(self.model, self.structure, removed).SerializeToString(),
            zero_components(self.model, self.structure, removed).SerializeToString(),
        )

    def removed(self, config: Config) -> np.ndarray:
        """Component ids a config removes."""
        parts = [
            family.components[lowest(scores, amount)]
            for family, scores, amount in zip(self.families, self.scores, config, strict=True)
            if amount
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def to_proto(self, config: Config) -> onnx.ModelProto:
        check_stop(self.stop)
        removed = self.removed(config)
        refit = self.calibration is not None and self.options.recover is not Recovery.NONE and len(removed)
        if refit and self.sequential is not None:
            return remove_components(self._refit_sequentially(removed), self.structure, list(removed), copy=False)
        if refit:  # the refit model is a copy already: slice it in place
            return remove_components(self._refit(removed), self.structure, list(removed), copy=False)
        return remove_components(self.model, self.structure, list(removed))

    def _refit_sequentially(self, removed: np.ndarray) -> onnx.ModelProto:
        """The model with ``removed`` zeroed and every layer after them refit in graph order on
        the inputs the pruned model produces (``Recovery.SEQUENTIAL``), still at full shapes.

        The removed rows and columns stay masked: whatever a removed channel still carries
        (a refit bias) only reaches masked columns, and the channel is sliced away after.
        """
        sequential = self.sequential
        assert sequential is not None and self.calibration is not None
        zeroed = zero_components(self.model, self.structure, list(removed))
        arrays = _constants(zeroed)
        weights = {name: arrays[name] for name in sequential.original if name not in self.norm_masks}
        masks: dict[str, np.ndarray] = {}
        for name, axis in self.structure.slot_base:
            if name not in self.calibration.layouts:
                continue
            positions = np.flatnonzero(np.isin(self.structure.atoms((name, axis)), removed))
            if len(positions):
                mask = masks.setdefault(name, np.zeros(weights[name].shape, dtype=bool))
                np.moveaxis(mask, axis, 0)[positions] = True
        for name, slot in self.norm_masks.items():
            keep = ~np.isin(self.structure.atoms(slot), removed)
            weights[name] = keep.astype(sequential.original[name].dtype)
        sequential.forget()  # results depend on the whole removal: nothing carries over
        sequential.refit(weights, masks, {name: int(name in masks) for name in self.calibration.layouts})
        set_params(zeroed, weights)
        return zeroed

    def _refit(self, removed: np.ndarray) -> onnx.ModelProto:
        """A copy whose consumers of removed channels are refit to do without them.

        Removing input channels of a layer is masking whole input columns: the same
        least-squares fit (and bias correction) as zero mode recovers the kept columns,
        and the columns, zero now, are then sliced away with the channels. A recurrent
        node's R consumes its own hidden units (column k is h_k(t-1) read by every unit):
        when units go, the kept units' rows of R are refit per (direction, gate) on the
        remaining h_{t-1} columns, the lost columns' mean contribution going into Rb; a
        recurrent node that loses input features is a consumer like any other (W's columns).
        """
        calibration = self.calibration
        assert calibration is not None
        out = onnx.ModelProto()
        out.CopyFrom(self.model)
        arrays = _constants(out)
        changed: dict[str, np.ndarray] = {}
        states = {(n, STATE_COLUMNS) for n, la in calibration.layouts.items() if la.unfold is Unfold.STATE}
        for name, axis in sorted(self.structure.consumer_slots | states):
            if name not in calibration.layouts or (name, axis) not in self.structure.slot_base:
                continue
            # removing a grouped conv's channels removes whole groups; R's groups are its
            # (direction, gate) blocks, each reading every hidden unit
            if calibration.layouts[name].groups > 1 and (name, axis) not in states:
                continue
            positions = np.flatnonzero(np.isin(self.structure.atoms((name, axis)), removed))
            if not len(positions):
                continue
            check_stop(self.stop)
            weight = changed.get(name, arrays[name])
            mask = np.zeros(weight.shape, dtype=bool)
            np.moveaxis(mask, axis, 0)[positions] = True
            reconstruct = self.options.recover in REFITTING
            changed[name], shift = calibration.recover(name, weight, mask, reconstruct=reconstruct)
            layout = calibration.layouts[name]
            if shift is not None and layout.bias is not None:
                changed[layout.bias] = layout.shifted(changed.get(layout.bias, arrays[layout.bias]), shift)
        set_params(out, changed)
        return out

    def to_bytes(self, config: Config) -> bytes:
        """The serialized candidate; the last few are kept, as a refit is costly and the search,
        the held-out confirmation and the final write ask for the same config in turn."""
        cached = self._built.pop(config, None)
        if cached is None:
            cached = self.to_proto(config).SerializeToString()
        self._built[config] = cached  # most recent last
        while len(self._built) > 1 and (
            len(self._built) > BUILT_CACHE_ENTRIES or sum(map(len, self._built.values())) > BUILT_CACHE_BYTES
        ):
            self._built.pop(next(iter(self._built)))
        return cached

    def runner(self, config: Config, output: str, threads: int) -> Runner:
        return session_runner(make_session(self.to_bytes(config), threads=threads), output)

    def summary(self, config: Config, pruned: onnx.ModelProto) -> tuple[list[LayerReport], tuple[int, int, int]]:
        """Per-family reports and (prunable, before, after) weight counts, read off the two models.

        A family's params are those of the weights whose output channels it is;
        they also shrink when the family before them loses channels.
        """
        before, after = _sizes(self.model), _sizes(pruned)
        reports = []
        for family, amount in zip(self.families, config, strict=True):
            names = sorted({name for name, axis in family.param_slots if (name, axis) in self.structure.producer_slots})
            names = names or sorted({name for name, _ in family.param_slots})
            size_before = sum(before.get(n, 0) for n in names)
            size_after = sum(after.get(n, 0) for n in names)
            channels = len(family.components)
            reports.append(
                LayerReport(
                    family.name,
                    Unit.CHANNELS.value,
                    (channels,),
                    size_before,
                    size_before,
                    size_after,
                    channels_before=channels,
                    channels_after=channels - amount,
                )
            )
        touched = {name for family in self.structure.families for name, _ in family.param_slots}
        total = sum(before.get(n, 0) for n in touched)
        return reports, (total, total, sum(after.get(n, 0) for n in touched))


def removal_problems(
    model: onnx.ModelProto, layers: list[tuple[str, int, int]], static: bool = True
) -> list[tuple[str, str]]:
    """(family, why) for every (family, amount, units) of a removal plan that does not fit ``model``
    (``static``: with its computed Reshape targets made constants, as the run did)."""
    families = {f.name: f for f in analyze_structure(static_reshapes(model)[0] if static else model).families}
    problems: list[tuple[str, str]] = []
    for name, amount, units in layers:
        family = families.get(name)
        if family is None:
            problems.append((name, "no removable channel family of this name"))
        elif len(family.components) != units:
            problems.append((name, f"has {len(family.components)} channels, the plan expects {units}"))
        elif not 0 <= amount < units:
            problems.append((name, f"amount {amount} outside [0, {units})"))
    return problems


def replay_removal(
    model: onnx.ModelProto, criterion: Criterion, amounts: dict[str, int], static: bool = True
) -> onnx.ModelProto:
    """``model`` without the lowest-scoring ``amounts[family]`` channels of each family (a plan's
    replay; ``static``: with computed Reshape targets made constants first, as the run did)."""
    if static:
        model, _ = static_reshapes(model)
    structure = analyze_structure(model)
    removed = [
        family.components[lowest(component_scores(model, structure, family, criterion), amounts[family.name])]
        for family in structure.families
        if amounts.get(family.name)
    ]
    return remove_components(model, structure, list(np.concatenate(removed)) if removed else [])
