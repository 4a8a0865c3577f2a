"""Candidate generators: what each mode prunes, how a config becomes a model to run, and
what the written model is. ``prune()`` drives any of them through the same search.

* :class:`WeightCandidates` (zero and N:M modes): the prunable weights are split out of
  the model; a config zeroes (and, with recovery, refits) some of them, and candidates
  run with the weights fed as inputs or as built sessions, whichever is cheaper.
* :class:`ChannelCandidates` (remove mode): a config removes channel components; every
  candidate is a rebuilt, smaller model.

:func:`make_candidates` is the run's candidates phase: it builds the kind the mode asks for
and returns it with the notes and timings building it made.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from ._analysis import Inspection, SkippedWeight, analyze
from ._errors import InternalError, UnsupportedModelError, check_stop
from ._evalset import release_freed_memory
from ._evaluate import (
    Batches,
    Evaluator,
    FedWeights,
    ModelBuilder,
    PortableRunner,
    Runner,
    SplitModel,
    make_session,
    session_runner,
)
from ._gradient import GradientScores, gradient_scores
from ._model import session_source
from ._nm import NMSpace, NMUnit, nm_mask, reduction_axis
from ._options import AUTO_LSQ_COST, GRADIENT_CRITERIA, REFITTING, Allocation, Criterion, Mode, PruneOptions, Recovery
from ._plan import LayerPlan, Layout, Replay, element_mask, zero_lowest
from ._recover import ONE_PASS_STEPS, Calibration, LayerLayout, SequentialRefit, calibrate
from ._remove import Remover
from ._report import LayerReport
from ._score import granularity, lowest, unit_scores
from ._space import AUTO_CHOICES, PROFILE_LEVELS, Config, ZeroSpace, build_units, sensitivity_sketch
from ._structure import Family

__all__ = ["CandidatePool", "Candidates", "ChannelCandidates", "NoCandidates", "WeightCandidates", "make_candidates"]

logger = logging.getLogger(__name__)

FED_ALWAYS_BYTES = 64 * 2**20
"""From this much prunable weight data on, candidates always run with their weights
fed as inputs (one copy of the weights in memory) and scores are recomputed per candidate."""
STRATEGY_SAMPLES = 512
"""Samples (at least four batches) timed to choose between fed and built candidates."""
KEEP_BEST_BYTES = 256 * 2**20
"""Pruned weights of the search's best candidate kept for its confirmation and write (``WeightCandidates.keep``)."""

Probe = Callable[[Config], float]


class _Candidates:
    """What both kinds share: the plan of a config and the probed allocations."""

    options: PruneOptions
    evaluator: Evaluator
    """Measures candidates; its batches' ``stop`` cancels every long step of the candidates too."""
    notes: tuple[str, ...] = ()
    """What building the candidates found worth reporting."""
    timings: dict[str, float]
    space: ZeroSpace | NMSpace
    units: list[Any]
    calibration: Calibration | None = None
    """Calibration statistics when a criterion or a recovery needs them (``seconds``: the fits' time)."""
    static_reshapes = True
    """Remove mode: whether computed Reshape targets were made constants (see ``PruningPlan``)."""

    def runner(self, config: Config) -> Runner:
        raise NotImplementedError

    def keep(self, config: Config) -> None:
        """Told right after ``config``'s runner passed on the search split, while that runner still
        lives: a pool may keep what it built for it (the confirmation and the write run it again)."""

    def probe_runner(self, config: Config) -> Runner:
        """What the search's label-free probes run (a cheaper stand-in is fine: they only rank)."""
        return self.runner(config)

    def plan_layers(self, config: Config) -> tuple[LayerPlan, ...]:
        pairs = zip(self.units, config, strict=True)
        return tuple(LayerPlan(u.layer.name, a, u.units, u.layer.channel_axis) for u, a in pairs)

    @property
    def stop(self) -> threading.Event | None:
        return self.evaluator.batches.stop

    def with_probe(self, probe: Probe) -> tuple[dict[str, list[list[float]]], tuple[str, ...]]:
        """Finish the space with label-free probes (sensitivity profiles, or the choice of
        ``Allocation.AUTO``): the profiles and a note."""
        if not self.units or not isinstance(self.space, ZeroSpace):
            return {}, ()
        if self.options.allocation is Allocation.SENSITIVITY:
            return _sensitivity(self.space, probe, self.options.sensitivity or {}, self.stop)
        if self.options.allocation is Allocation.AUTO and self.options.mode is Mode.ZERO:
            # remove mode keeps normalized: its pilot levels lie far past what a channel cut survives,
            # where the ranking misleads (docs/search.md)
            return {}, _choose_allocation(self.space, probe, self.options.target_sparsity, self.stop)
        return {}, ()


class WeightCandidates(_Candidates):
    """Zero and N:M modes. Takes ownership of ``model`` (pass a copy to keep it)."""

    def __init__(
        self,
        model: onnx.ModelProto,
        inspection: Inspection,
        search_idx: np.ndarray,
        evaluator: Evaluator,
        options: PruneOptions,
        alternatives: Sequence[Criterion] = (),
    ) -> None:
        """``alternatives``: criteria the probes weigh against ``options.criterion`` (zero mode)."""
        batches = evaluator.batches
        self.options = options
        self.evaluator = evaluator
        notes: list[str] = []
        self.timings = timings = {}
        start = time.perf_counter()
        if options.criterion is Criterion.ACTIVATION or options.recover is not Recovery.NONE:
            rows = calibration_rows(search_idx, options.calibration_samples, options.seed)
            self.calibration, calibrated = _calibrate(
                model, inspection, rows, batches, options.recover, options.threads
            )
            notes += calibrated
            timings["calibration"] = time.perf_counter() - start
            release_freed_memory()  # the batches' layer inputs: not to stay on glibc's heap for the search
        self.gradients: GradientScores | None = None
        if options.criterion in GRADIENT_CRITERIA:
            start = time.perf_counter()
            rows = calibration_rows(search_idx, options.calibration_samples, options.seed)
            self.gradients, computed = gradient_scores(
                model, inspection.layers, evaluator, rows, options.criterion, seed=options.seed, threads=options.threads
            )
            notes += computed
            timings["gradients"] = time.perf_counter() - start
        biases = set()
        if self.calibration is not None and options.recover is not Recovery.NONE:
            biases = {la.bias for la in self.calibration.layouts.values() if la.bias is not None}
        self.split = SplitModel.take(model, {la.name for la in inspection.layers} | biases)
        del model
        self.builder = ModelBuilder(self.split)
        self.sequential: SequentialRefit | None = None
        if options.recover is Recovery.SEQUENTIAL and self.calibration is not None:
            if FedWeights.possible(self.split):
                self.sequential = SequentialRefit(
                    self.calibration,
                    self.split,
                    batches.evalset,
                    batch_size=batches.batch_size,
                    fixed_batch=batches.fixed_batch,
                    threads=options.threads,
                )
            else:
                notes.append("sequential recovery needs weights onnxruntime can feed; refit as lsq instead")
        start = time.perf_counter()
        self.make_runner, strategy = _choose_strategy(self.builder, evaluator, search_idx, options.threads)
        logger.debug("%s", strategy)
        notes.append(strategy)
        self.granularity = granularity(options.criterion)
        self.scores: dict[str, np.ndarray] = {}
        self.keep_scores = self.split.weight_bytes < FED_ALWAYS_BYTES
        self.recovered: dict[tuple[str, int], Fit] = {}
        """Recovered weights by (layer, amount): candidates of a search share most layers' amounts."""
        self.fit_threads = options.threads or os.cpu_count() or 1
        """Layers fit at once (``_Fitter``)."""
        self._last: tuple[Config, dict[str, weakref.ref[np.ndarray]], dict[str, np.ndarray | None]] | None = None
        """Large weights: the arrays of the last config ``weights`` made, as long as its runner holds them,
        and the bias shifts of the layers it recovered."""
        self._best: tuple[Config, dict[str, np.ndarray]] | None = None
        """Large weights: the weights of the sparsest passing candidate yet (``keep``)."""
        self._best_fits: dict[tuple[str, int], Fit] = {}
        """Large weights: the fits of ``_best``'s recovered layers by (layer, amount), its own arrays: a
        candidate near it (a refinement probe pushes one group of layers) refits only what it moves."""
        self.nm_masks: dict[str, np.ndarray] = {}
        self.alternatives: dict[Criterion, _Scored] = {}
        """Zero mode: the space, units and kept scores of each criterion the probes weigh against
        ``options.criterion`` (``_choose_criterion``; dropped once it has chosen)."""
        self._fits_by: dict[Criterion, dict[tuple[str, int], Fit]] = {}
        """While the probes choose: the fits (``recovered``) of the criteria not being probed."""
        self.space: ZeroSpace | NMSpace
        self.units: list[Any]
        if options.mode is Mode.NM:
            self.space, self.units, dense = self._nm_space(inspection)
            notes += dense
        else:
            self.space, self.units, self.scores = self._zero_space(inspection, options.criterion)
            for criterion in alternatives:
                self.alternatives[criterion] = self._zero_space(inspection, criterion)
        timings["scoring"] = time.perf_counter() - start
        self.notes = tuple(notes)

    def _zero_space(self, inspection: Inspection, criterion: Criterion) -> _Scored:
        """Every layer's units under ``criterion``, their space, and their scores where kept."""
        assert granularity(criterion) is self.granularity  # the choices share the unit (a weight)
        units, scores = [], {}
        options = self.options
        for layer in inspection.layers:
            check_stop(self.stop)
            weight = self.split.weights[layer.name]
            layer_scores = unit_scores(criterion, layer, weight, self.calibration, self.gradients)
            units.append(
                build_units(layer, weight, layer_scores, self.granularity, options.allocation, options.layer_cap)
            )
            if self.keep_scores:
                scores[layer.name] = layer_scores
        return ZeroSpace(units, options.allocation), units, scores

    def _choose_criterion(self, probe: Probe) -> tuple[str, ...]:
        """Probe the allocations under ``options.criterion`` and each alternative, and keep the
        criterion and allocation with the lowest output deviation, the first criterion unless
        another is lower by ``CRITERION_MARGIN``: a note of each choice."""
        assert isinstance(self.space, ZeroSpace)
        first = self.options.criterion
        scored = {first: (self.space, self.units, self.scores), **self.alternatives}
        measured: dict[Criterion, dict[Allocation, float]] = {}
        for criterion in scored:
            self._score_by(criterion, scored[criterion])
            measured[criterion] = _allocation_deviations(self.space, probe, self.options.target_sparsity, self.stop)
        lowest = {c: min(m.values()) for c, m in measured.items()}
        chosen = min(scored, key=lambda c: lowest[c] + (0.0 if c is first else math.log(1 / CRITERION_MARGIN)))
        self._score_by(chosen, scored[chosen])
        self.alternatives, self._fits_by = {}, {}
        probes = sum(len(m) for m in measured.values()) * len(_pilot_levels(self.space, self.options.target_sparsity))
        said = ", ".join(f"{c.value} {math.exp(lowest[c]):.3g}" for c in scored)
        return (
            f"criterion auto: {chosen.value} (lowest output deviation: {said}; {first.value} unless another "
            f"is below {CRITERION_MARGIN:g}x; {probes} probes)",
            _allocation_note(self.space, measured[chosen], self.options.target_sparsity),
        )

    def _score_by(self, criterion: Criterion, scored: _Scored) -> None:
        """Make ``criterion`` the one candidates are pruned by: its units, scores, space and fits (a
        fit is cached by layer and amount, and each criterion masks its own way)."""
        self._fits_by[self.options.criterion] = self.recovered
        self.space, self.units, self.scores = scored
        self.options = replace(self.options, criterion=criterion)
        self.recovered = self._fits_by.pop(criterion, {})
        self._last = None

    @property
    def refinable(self) -> bool:
        """Whether the search's per-layer refinement applies (an N:M layer is all or nothing)."""
        return not isinstance(self.space, NMSpace)

    def runner(self, config: Config) -> Runner:
        return self.make_runner(self.weights(config))

    def probe_runner(self, config: Config) -> Runner:
        # a sequential refit walks the model and refits every later layer: probes rank with the plain fit
        return self.make_runner(self.weights(config, sequential=False))

    def with_probe(self, probe: Probe) -> tuple[dict[str, list[list[float]]], tuple[str, ...]]:
        """Finish the space with label-free probes: N:M ranking or sensitivity profiles."""
        if isinstance(self.space, NMSpace):
            space = self.space
            space.rank(lambda i: probe(space.one(i)))
            return {}, (f"N:M layers ranked by one label-free probe each ({space.n_layers} probes)",)
        if self.alternatives and self.options.allocation is Allocation.AUTO:
            return {}, self._choose_criterion(probe)
        return super().with_probe(probe)

    def weights(self, config: Config, *, in_place: bool = False, sequential: bool = True) -> dict[str, np.ndarray]:
        """The weights a config describes (the originals where nothing is pruned), recovered if asked
        (``sequential=False``: a sequential refit done plainly)."""
        options, calibration = self.options, self.calibration
        if self._best is not None and self._best[0] == config:
            return dict(self._best[1])
        sequential_fit = self.sequential if sequential else None
        out = dict(self.split.weights)
        masks: dict[str, np.ndarray] = {}
        # the layers' fits are independent: they run on the fit threads while the next masks are
        # chosen and go in in layer order; every decision (a fit's start, what stays in ``recovered``)
        # is made here, in layer order, as when the fits ran one after another
        fits: dict[tuple[str, int], Future[Fit]] = {}
        recovered: list[tuple[str, Future[Fit] | Fit, LayerLayout]] = []
        with _Fitter(calibration, self.fit_threads) as fitter:
            try:
                for u, amount in zip(self.units, config, strict=True):
                    if not amount:
                        continue
                    check_stop(self.stop)
                    name = u.layer.name
                    layout = None if calibration is None else calibration.layouts.get(name)
                    recover = options.recover is not Recovery.NONE and layout is not None and calibration is not None
                    if recover and sequential_fit is None and layout is not None and layout.bias is None:
                        # nothing to recover without a fit or a bias: plain masking, no extra copies
                        recover = calibration is not None and calibration.hessian(name) is not None
                    if isinstance(self.space, NMSpace):
                        mask = self.nm_masks[name]
                        if not recover:
                            out[name] = np.where(mask, 0, out[name]).astype(out[name].dtype)
                            continue
                    else:
                        scores = self.scores[name] if self.keep_scores else None
                        if scores is None:
                            scores = unit_scores(options.criterion, u.layer, out[name], calibration, self.gradients)
                        hint = (u.sketch_ranks, u.raw_sketch)
                        if not recover:
                            weight = out[name] if in_place else out[name].copy()
                            out[name] = zero_lowest(
                                weight, scores, amount, self.granularity, u.layer.channel_axis, hint
                            )
                            continue
                        mask = element_mask(
                            out[name].shape, lowest(scores, amount, hint), self.granularity, u.layer.channel_axis
                        )
                    assert calibration is not None and layout is not None
                    if sequential_fit is None and (name, amount) in self._best_fits:
                        recovered.append((name, self._best_fits[name, amount], layout))
                        continue
                    if sequential_fit is not None:  # masked here, refit below in graph order
                        masks[name] = mask
                        out[name] = np.where(mask, 0, out[name]).astype(out[name].dtype)
                        continue
                    key = (name, amount)
                    if key in self.recovered:
                        recovered.append((name, self.recovered[key], layout))
                        continue
                    reconstruct = options.recover in REFITTING
                    # the fit at the nearest amount already made is a close start
                    near = min(
                        (k for k in self.recovered if k[0] == name), key=lambda k: abs(k[1] - amount), default=None
                    )
                    start = None if near is None else self.recovered[near][0]
                    fits[key] = fitter.fit(name, out[name], mask, reconstruct=reconstruct, start=start)
                    recovered.append((name, fits[key], layout))
                    if not self.keep_scores:  # large layers: recompute rather than hold copies
                        self.recovered.clear()
                    self.recovered[key] = _PENDING  # each layer once a config: no later layer reads it
                fitter.wait()
            except BaseException:
                for key in fits:
                    self.recovered.pop(key, None)
                raise
        for key, fit in fits.items():
            if key in self.recovered:
                self.recovered[key] = fit.result()
        shifts: dict[str, np.ndarray | None] = {}
        for name, result, layout in recovered:
            out[name], shifts[name] = result.result() if isinstance(result, Future) else result
            _shift_bias(out, layout, shifts[name])
        if sequential_fit is not None and any(config):
            sequential_fit.refit(out, masks, {u.layer.name: a for u, a in zip(self.units, config, strict=True)})
        elif not self.keep_scores and self.sequential is None:
            self._last = (config, {name: weakref.ref(array) for name, array in out.items()}, shifts)
        return out

    def keep(self, config: Config) -> None:
        """Large weights (whose fits ``recovered`` does not keep): keep the weights of ``config``, a
        passing candidate sparser than the one kept, up to ``KEEP_BEST_BYTES`` of pruned weights,
        for the confirmation and the write, which ask for the search's best again (each refit
        every pruned layer: on all-MiniLM-L6-v2, a quarter of the run's fitting). The arrays are
        those its runner holds: ``weights`` gives the very arrays the search evaluated."""
        if self._last is None or self._last[0] != config:
            return
        if self._best is not None and self.space.nonzero(self._best[0]) <= self.space.nonzero(config):
            return
        arrays = {name: ref() for name, ref in self._last[1].items()}
        kept = {name: a for name, a in arrays.items() if a is not None}
        if len(kept) < len(arrays):
            return
        extra = sum(a.nbytes for name, a in kept.items() if a is not self.split.weights.get(name))
        if extra <= KEEP_BEST_BYTES:
            self._best = (config, kept)
            amounts = {u.layer.name: a for u, a in zip(self.units, config, strict=True)}
            self._best_fits = {(name, amounts[name]): (kept[name], shift) for name, shift in self._last[2].items()}

    def build(self, config: Config) -> onnx.ModelProto | bytes:
        """The model to write (bytes, or a ModelProto over 2 GB). The candidates are spent afterwards."""
        # large weights are pruned in place: the originals are not needed once the winner is known
        weights = self.weights(config, in_place=not self.keep_scores)
        self.scores.clear()
        built = self.builder.to_proto(weights) if self.builder.large else self.builder.to_bytes(weights)
        del weights
        self.release()
        return built

    def written(self, config: Config) -> Replay:
        """How :meth:`build` writes the model (the plan reads the values off it)."""
        return Replay(Layout.WEIGHTS, tuple(self.split.data_types))

    def release(self) -> None:
        """Drop the weights: from here on a fallback reloads the original."""
        self.split.weights.clear()
        self.scores.clear()
        self.recovered.clear()
        self._last = self._best = None
        self._best_fits = {}
        if self.calibration is not None:
            self.calibration.release()
        if self.sequential is not None:
            self.sequential.release()

    def sparse_names(self, config: Config) -> list[str]:
        return [u.layer.name for u, a in zip(self.units, config, strict=True) if a]

    def summary(
        self, config: Config, pruned: onnx.ModelProto
    ) -> tuple[list[LayerReport], tuple[int, int, int], list[SkippedWeight] | None]:
        """Per-layer reports, (prunable, before, after) params, and skipped items (None: the inspection's)."""
        space = self.space
        reports = [
            LayerReport(
                u.layer.name,
                u.layer.op_type,
                u.layer.shape,
                u.layer.params,
                space.layer_nonzero(i, 0),
                space.layer_nonzero(i, amount),
            )
            for i, (u, amount) in enumerate(zip(self.units, config, strict=True))
        ]
        return reports, (space.total_params, space.nonzero(space.empty()), space.nonzero(config)), None

    def _nm_space(self, inspection: Inspection) -> tuple[NMSpace, list[NMUnit], list[str]]:
        """N:M masks of every layer (by the criterion's element scores), the space over them, and
        a note for each layer left dense."""
        n, m = self.options.nm
        nonzero, zeroed = [], []
        notes = []
        for layer in inspection.layers:
            check_stop(self.stop)
            weight = self.split.weights[layer.name]
            scores = unit_scores(self.options.criterion, layer, weight, self.calibration, self.gradients)
            mask = nm_mask(layer, scores, n, m)
            if mask is None:
                size = layer.shape[reduction_axis(layer)]
                notes.append(f"{layer.name}: left dense, its reduction axis of {size} is not a multiple of {m}")
                mask = np.zeros(weight.shape, dtype=bool)
            self.nm_masks[layer.name] = mask
            nonzero.append(int(np.count_nonzero(weight)))
            zeroed.append(int(np.count_nonzero(weight[mask])))
        return NMSpace(inspection.layers, nonzero, zeroed), [NMUnit(layer) for layer in inspection.layers], notes


class ChannelCandidates(_Candidates):
    """Remove mode: every candidate is the model without some channel components."""

    refinable = True

    def __init__(
        self,
        model: onnx.ModelProto,
        inspection: Inspection,
        search_idx: np.ndarray,
        evaluator: Evaluator,
        options: PruneOptions,
    ) -> None:
        batches = evaluator.batches
        self.options = options
        self.evaluator = evaluator
        notes: list[str] = []
        calibrated: list[str] = []
        self.timings = timings = {}
        start = time.perf_counter()
        calibration = None
        if options.recover is not Recovery.NONE or options.criterion is Criterion.ACTIVATION:
            # every layer, not only the included ones: a consumer of removed channels is refit
            # (and scores them) whether or not its own channels may go
            everything = analyze(model) if options.include or options.exclude else inspection
            rows = calibration_rows(search_idx, options.calibration_samples, options.seed)
            calibration, calibrated = _calibrate(model, everything, rows, batches, options.recover, options.threads)
            timings["calibration"] = time.perf_counter() - start
            release_freed_memory()
        sequential = None
        if options.recover is Recovery.SEQUENTIAL and calibration is not None:
            refit = calibration

            def sequential(split: SplitModel) -> SequentialRefit:
                return SequentialRefit(
                    refit,
                    split,
                    batches.evalset,
                    batch_size=batches.batch_size,
                    fixed_batch=batches.fixed_batch,
                    threads=options.threads,
                )

        self.calibration = calibration
        start = time.perf_counter()
        stop = self.stop
        self.remover = Remover(model, options, calibration, sequential, stop=stop)
        if self.remover.static_targets:
            why = self._static_mismatch(model, search_idx)
            if why:
                notes.append(
                    f"Reshape targets computed at run time were left as they are: as constants {why}, "
                    "so the channels their Shape nodes read stay"
                )
                self.remover = Remover(model, options, calibration, sequential, static=False, stop=stop)
                self.static_reshapes = False
            else:
                notes.append(
                    f"{self.remover.static_targets} Reshape target(s) computed at run time were made constants "
                    "(the same shapes at every input size tried, and on the eval set), so their channels can "
                    "be removed"
                )
        frozen = self._check_removals(search_idx)
        if frozen:
            static = self.static_reshapes
            self.remover = Remover(model, options, calibration, sequential, static=static, frozen=frozen, stop=stop)
        for family in self.remover.families:
            if family.approximate:
                notes.append(
                    f"{family.name}: removing its channels is approximate ({family.approximate}, so the rest "
                    "are normalized differently); the search measures what it costs"
                )
        self.space: ZeroSpace = self.remover.space
        self.units: list[Any] = self.remover.space.layers
        timings["scoring"] = time.perf_counter() - start
        if self.units:
            self.notes = (*calibrated, *notes, "candidates ran as sessions of the pruned models")
        else:  # how candidates were calibrated and would have run is moot; why there are none is not
            self.notes = tuple(notes)

    def _check_removals(self, search_idx: np.ndarray) -> dict[int, str]:
        """Families whose removal does not give the model with their channels zeroed (on a batch
        of the eval set), by first component, with why: a channel rule that does not fit this
        graph. One trial removes a channel of every family; only when it fails are the families
        bisected. Their channels stay, and the report says so, instead of every candidate failing."""
        remover, batches = self.remover, self.evaluator.batches
        sample = search_idx[: batches.batch_size]
        families = [f for f in remover.families if len(f.components) > 1]

        def outputs(model: bytes) -> np.ndarray:
            check_stop(batches.stop)
            return batches.outputs(session_runner(make_session(model, threads=1), batches.output), sample)

        def broken(group: list[Family]) -> str | None:
            check_stop(batches.stop)
            removed, zeroed = remover.trial(group)
            try:
                out = outputs(removed)
            except UnsupportedModelError as e:
                return f"removing its channels broke the model ({e})"
            if not np.isfinite(out).all():
                return "removing its channels made the outputs non-finite"
            exact = [f for f in group if not f.approximate]
            if exact and len(exact) == len(group):
                if not _same_outputs(out, outputs(zeroed)):
                    return "removing its channels changed the outputs (zeroing them does not)"
            return None

        found: dict[int, str] = {}

        def bisect(group: list[Family]) -> None:
            why = broken(group)
            if why is None:
                return
            if len(group) == 1:
                found[int(group[0].components[0])] = why
                return
            bisect(group[: len(group) // 2])
            bisect(group[len(group) // 2 :])

        if families:
            bisect(families)
        return found

    def _static_mismatch(self, model: onnx.ModelProto, search_idx: np.ndarray) -> str | None:
        """Why the model with its computed Reshape targets made constants is not ``model`` (the
        unpruned one) on a batch of the eval set (probed at synthetic sizes, a computed dim can
        look constant)."""
        batches = self.evaluator.batches
        sample = search_idx[: batches.batch_size]
        try:
            out = batches.outputs(self.remover.runner(self.remover.space.empty(), batches.output, 1), sample)
        except UnsupportedModelError:
            return "the model did not run on the eval set"
        with session_source(model) as source:
            original = batches.outputs(session_runner(make_session(source, threads=1), batches.output), sample)
        if not _same_outputs(out, original):
            return "they changed the outputs on the eval set"
        return None

    def runner(self, config: Config) -> Runner:
        remover, output, threads = self.remover, self.evaluator.batches.output, self.options.threads
        return PortableRunner(output, model=lambda: remover.to_bytes(config), threads=threads)

    def build(self, config: Config) -> bytes:
        return self.remover.to_bytes(config)

    def written(self, config: Config) -> Replay:
        """How :meth:`build` writes the model: the channel positions it removes per family."""
        removed = self.remover.removed(config)
        positions = ((f.name, np.flatnonzero(np.isin(f.components, removed))) for f in self.remover.families)
        return Replay(Layout.CHANNELS, removed=tuple((name, tuple(map(int, p))) for name, p in positions if len(p)))

    def release(self) -> None:
        pass

    def sparse_names(self, config: Config) -> list[str]:
        return []  # removed channels leave nothing sparse behind

    def summary(
        self, config: Config, pruned: onnx.ModelProto
    ) -> tuple[list[LayerReport], tuple[int, int, int], list[SkippedWeight] | None]:
        reports, params = self.remover.summary(config, pruned)
        skipped = [SkippedWeight.family(name, why) for name, why in self.remover.skipped]
        return reports, params, skipped


class NoCandidates(_Candidates):
    """A model with no prunable layer: an empty space, nothing calibrated or run."""

    refinable = False

    def __init__(self, evaluator: Evaluator, options: PruneOptions) -> None:
        self.options = options
        self.evaluator = evaluator
        self.timings = {}
        self.space: ZeroSpace = ZeroSpace([], options.allocation)
        self.units: list[Any] = []

    def runner(self, config: Config) -> Runner:
        raise InternalError("a model with nothing to prune has no candidates to run")

    def build(self, config: Config) -> bytes:
        raise InternalError("a model with nothing to prune has no candidate to build")

    def release(self) -> None:
        pass

    def sparse_names(self, config: Config) -> list[str]:
        return []

    def written(self, config: Config) -> Replay:
        return Replay(Layout.UNCHANGED)

    def summary(
        self, config: Config, pruned: onnx.ModelProto
    ) -> tuple[list[LayerReport], tuple[int, int, int], list[SkippedWeight] | None]:
        return [], (0, 0, 0), None


CandidatePool = WeightCandidates | ChannelCandidates | NoCandidates

NOTHING_PRUNABLE = "no prunable weights: the model is returned unchanged"
NOTHING_REMOVABLE = "no channel can be removed: the model is returned unchanged"


@dataclass(frozen=True)
class Candidates:
    """The candidates phase's result: the candidates, and what building them noted and took."""

    pool: CandidatePool
    notes: tuple[str, ...]
    timings: Mapping[str, float] = field(default_factory=dict)


def make_candidates(
    model: onnx.ModelProto,
    inspection: Inspection,
    search_idx: np.ndarray,
    evaluator: Evaluator,
    options: PruneOptions,
    *,
    criteria: Sequence[Criterion] = (),
) -> Candidates:
    """The candidates phase: the kind of candidates ``options.mode`` asks for, built from ``model``
    (taken apart: pass a copy to keep it). Nothing is calibrated or timed when nothing is prunable,
    and then the only note says so. ``criteria``: those the probes choose from (``Loaded.criteria``)."""
    if not inspection.layers:
        logger.debug("no prunable layer: no candidates")
        return Candidates(NoCandidates(evaluator, options), (NOTHING_PRUNABLE,))
    options = replace(options, criterion=options.effective_criterion)  # callers other than ``load``
    pool: CandidatePool
    if options.mode is Mode.REMOVE:
        pool = ChannelCandidates(model, inspection, search_idx, evaluator, options)
    else:
        alternatives = [c for c in criteria if c is not options.criterion]
        pool = WeightCandidates(model, inspection, search_idx, evaluator, options, alternatives)
    logger.debug("%d candidate layer(s) built in %s", len(pool.units), _seconds(pool.timings))
    if not pool.units:
        return Candidates(pool, (*pool.notes, NOTHING_REMOVABLE), pool.timings)
    return Candidates(pool, pool.notes, pool.timings)


def _seconds(timings: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.3f} s" for name, seconds in timings.items()) or "no time"


def _sensitivity(
    space: ZeroSpace, probe: Probe, cached: Mapping[str, list[list[float]]], stop: threading.Event | None
) -> tuple[dict[str, list[list[float]]], tuple[str, ...]]:
    """Measure (or reuse from ``cached``) every layer's sensitivity profile and make it the space's
    allocation: the profiles, and a note of the probes run."""
    profiles: dict[str, list[list[float]]] = {}
    measured = 0
    for i, u in enumerate(space.layers):
        profile = cached.get(u.layer.name)
        if profile is None or len(profile) != len(PROFILE_LEVELS):
            profile = []
            for level in PROFILE_LEVELS:
                check_stop(stop)
                config = list(space.empty())
                config[i] = min(round(level * u.units), u.max_amount)
                profile.append([level, probe(tuple(config))])
                measured += 1
        profiles[u.layer.name] = profile
        u.sketch = sensitivity_sketch(u, profile)
    reused = len(space.layers) - measured // len(PROFILE_LEVELS)
    return profiles, (f"sensitivity profiles: {measured} probes" + (f", {reused} layer(s) reused" if reused else ""),)


PILOT_LEVELS = (0.25, 0.5)
"""Shares of the largest reachable level at which ``Allocation.AUTO`` compares its choices."""


CRITERION_MARGIN = 0.8
"""``Criterion.AUTO`` leaves ``activation`` for another criterion only where that one's lowest
output deviation is below this share of activation's (docs/criteria.md)."""

_Scored = tuple[ZeroSpace, list[Any], dict[str, np.ndarray]]
"""A criterion's space, units, and kept scores by layer (``WeightCandidates._zero_space``)."""


def _pilot_levels(space: ZeroSpace, target: float | None) -> tuple[float, ...]:
    return (target,) if target is not None else tuple(p * space.max_level for p in PILOT_LEVELS)


def _allocation_deviations(
    space: ZeroSpace, probe: Probe, target: float | None, stop: threading.Event | None
) -> dict[Allocation, float]:
    """Make the choice of ``AUTO_CHOICES`` with the lowest output deviation (the geometric mean
    over the pilot levels, or at ``target`` alone) the space's allocation: each choice's log deviation."""
    levels = _pilot_levels(space, target)
    measured: dict[Allocation, float] = {}
    for allocation in AUTO_CHOICES:
        check_stop(stop)
        space.use(allocation)
        deviations = [probe(space.at_level(level)) for level in levels]
        measured[allocation] = float(np.mean(np.log(np.maximum(deviations, 1e-30))))
    space.use(min(AUTO_CHOICES, key=lambda a: measured[a]))  # the first on a tie
    return measured


def _allocation_note(space: ZeroSpace, measured: Mapping[Allocation, float], target: float | None) -> str:
    levels = _pilot_levels(space, target)
    at = ", ".join(f"{level:.0%}" for level in levels)
    said = ", ".join(f"{a.value} {math.exp(measured[a]):.3g}" for a in AUTO_CHOICES)
    probes = len(levels) * len(AUTO_CHOICES)
    return f"allocation auto: {space.allocation.value} (output deviation at {at}: {said}; {probes} probes)"


def _choose_allocation(
    space: ZeroSpace, probe: Probe, target: float | None, stop: threading.Event | None
) -> tuple[str, ...]:
    """Make the choice of ``AUTO_CHOICES`` with the lowest output deviation the space's allocation
    (``_allocation_deviations``): a note of the choice."""
    return (_allocation_note(space, _allocation_deviations(space, probe, target, stop), target),)


Fit = tuple[np.ndarray, np.ndarray | None]
"""A layer's recovered weight and the shift its bias needs (``Calibration.recover``)."""
_PENDING: Fit = (np.zeros(0, dtype=np.float32), None)
"""``WeightCandidates.recovered``'s entry for a fit still running."""


class _Fitter:
    """Runs the layer fits of a config (``Calibration.recover``), ``threads`` at once; with one thread,
    each when it is asked for. A fit reads only its own layer's statistics, and every product runs on
    one BLAS thread whichever thread calls it (``one_blas_thread``, held by the whole run), so the
    weights are the same to the bit at any thread count; the fits' numpy work (products, element-wise
    passes) releases the GIL, so two cores fit two layers at once."""

    def __init__(self, calibration: Calibration | None, threads: int) -> None:
        self.calibration = calibration
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="fit") if threads > 1 else None
        self.futures: list[Future[Fit]] = []

    def __enter__(self) -> _Fitter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:  # after a failure: what has not started never starts
            self.pool.shutdown(wait=True, cancel_futures=True)

    def fit(
        self, name: str, original: np.ndarray, mask: np.ndarray, *, reconstruct: bool, start: np.ndarray | None
    ) -> Future[Fit]:
        """The fit of layer ``name`` (its arguments as ``Calibration.recover``'s), running or made."""
        assert self.calibration is not None
        recover = functools.partial(
            self.calibration.recover, name, original, mask, reconstruct=reconstruct, start=start
        )
        if self.pool is None:
            done: Future[Fit] = Future()
            done.set_result(recover())
            return done
        future = self.pool.submit(self._unless_stopped, recover)
        self.futures.append(future)
        return future

    def _unless_stopped(self, recover: Callable[[], Fit]) -> Fit:
        """A queued fit starts only if the run goes on (a cancelled run's queue empties at once)."""
        assert self.calibration is not None
        check_stop(self.calibration.stop)
        return recover()

    def wait(self) -> None:
        """Wait for every fit; the first failure (a cancellation) is raised, the rest given up."""
        if not self.futures:
            return
        assert self.calibration is not None
        with self.calibration.timed():  # the fits' wall time, as when they ran here
            done, _ = wait(self.futures, return_when=FIRST_EXCEPTION)
        # the fits' temporaries were freed into the fit threads' own malloc arenas: given back now,
        # not to stay under the candidate's evaluation (glibc keeps freed blocks for reuse)
        release_freed_memory()
        for future in done:
            if future.exception() is not None:
                future.result()


def _shift_bias(weights: dict[str, np.ndarray], layout: LayerLayout, shift: np.ndarray | None) -> None:
    """Move the layer's bias in ``weights`` by a recovered output shift."""
    bias = layout.bias
    if shift is None or bias is None or bias not in weights:
        return
    weights[bias] = layout.shifted(weights[bias], shift)


def _calibrate(
    model: onnx.ModelProto,
    inspection: Inspection,
    rows: np.ndarray,
    batches: Batches,
    recover: Recovery,
    threads: int,
) -> tuple[Calibration, list[str]]:
    """Layer input statistics on ``rows`` (of the search split, never the held-out one), and the
    notes that say how it went."""
    count = len(rows)
    calibration = calibrate(
        model,
        list(inspection.layers),
        batches.evalset,
        rows,
        batch_size=batches.batch_size,
        fixed_batch=batches.fixed_batch,
        full=recover in REFITTING,
        max_cost=AUTO_LSQ_COST if recover is Recovery.AUTO else None,
        threads=threads,
        stop=batches.stop,
        runs_on=batches,
    )
    logger.debug("calibrated %d layer(s) on %d samples", len(inspection.layers), count)
    notes = [f"calibrated on {count} samples of the search split"]
    for name, why in calibration.skipped.items():
        notes.append(f"{name}: no calibration ({why}); scored by magnitude, not recovered")
    for name, why in calibration.partial.items():
        notes.append(f"{name}: no least-squares fit ({why}); bias-corrected only")
    for name, why in calibration.one_pass.items():
        notes.append(f"{name}: least squares by one OBS pass and {ONE_PASS_STEPS} conjugate-gradient steps ({why})")
    if recover in REFITTING:
        notes.append(_fit_summary(calibration, recover))
    return calibration, notes


def _fit_summary(calibration: Calibration, recover: Recovery) -> str:
    """Which recovery each calibrated layer gets, counted."""
    fitted = [n for n in calibration.layouts if n not in calibration.partial]
    exact = len(fitted) - len(calibration.one_pass)
    how = "sequential least squares" if recover is Recovery.SEQUENTIAL else "least squares"
    parts = [f"{exact} layer(s) fit by {how} to tolerance"]
    if calibration.one_pass:
        parts.append(f"{len(calibration.one_pass)} by one OBS pass and {ONE_PASS_STEPS} steps")
    if calibration.partial:
        parts.append(f"{len(calibration.partial)} bias-corrected only")
    if calibration.skipped:
        parts.append(f"{len(calibration.skipped)} not recovered")
    return "recovery: " + ", ".join(parts)


def calibration_rows(search_idx: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """A seeded sample of at most ``samples`` rows of the search split, sorted."""
    count = min(samples, len(search_idx))
    return np.sort(np.random.default_rng(seed).choice(search_idx, count, replace=False))


def _same_outputs(out: np.ndarray, ref: np.ndarray) -> bool:
    """Whether two runs of what should be one model agree up to float reordering (``_Agreement``
    of one batch)."""
    agreement = _Agreement()
    agreement.add(out, ref)
    return agreement.same


class _Agreement:
    """Whether two runs of what should be one model agree up to float reordering, a batch at a
    time: as ``np.allclose`` of all the batches at once, relative 1e-3 and absolute 1e-4 of the
    largest reference value of them all (non-finite values must be equal)."""

    def __init__(self) -> None:
        self.shapes = True
        self.equal_nonfinite = True
        self.excess = 0.0
        """The largest |out - ref| - 1e-3 |ref| of the finite values."""
        self.scale = 0.0

    def add(self, out: np.ndarray, ref: np.ndarray) -> None:
        if out.shape != ref.shape:
            self.shapes = False
            return
        if not ref.size:
            return
        finite = np.isfinite(out) & np.isfinite(ref)
        if not finite.all():  # rare: the slow path, with copies of the finite values
            self.equal_nonfinite &= bool((out[~finite] == ref[~finite]).all())
            self.scale = max(self.scale, float(np.abs(ref).max()))
            out, ref = out[finite], ref[finite]
        del finite
        # in place, in the outputs' float type as np.allclose computes: a batch of an OCR
        # recognizer's logits is 68 MB, and every float64 temporary of it twice that
        dtype = out.dtype if out.dtype.kind == "f" and out.dtype == ref.dtype else np.dtype(np.float64)
        gap = np.subtract(out, ref, dtype=dtype)
        np.abs(gap, out=gap)
        scaled = np.abs(ref).astype(dtype, copy=False)
        if scaled.size:
            self.scale = max(self.scale, float(scaled.max()))
            scaled *= 1e-3
            gap -= scaled
            self.excess = max(self.excess, float(gap.max()))

    @property
    def same(self) -> bool:
        return self.shapes and self.equal_nonfinite and self.excess <= 1e-4 * max(self.scale, 1.0)


def _timed_runs(
    batches: Batches, first: Runner, second: Runner, warm: np.ndarray, rows: np.ndarray
) -> tuple[float, float, bool]:
    """Seconds ``first`` and ``second`` take over ``rows`` (their runs only, a batch of each in
    turn, after one warm-up run of each on ``warm``), and whether their outputs agree (on
    ``warm`` too). Compared a batch at a time: no output is kept (a whole sample of an OCR
    recognizer's logits, held three ways, took 2 GiB)."""
    agreement = _Agreement()
    agreement.add(batches.run(first, warm), batches.run(second, warm))
    seconds = [0.0, 0.0]
    size = batches.batch_size
    for i in range(0, len(rows), size):
        batch = rows[i : i + size]
        outs = []
        for j, runner in enumerate((first, second)):
            start = time.perf_counter()
            outs.append(batches.run(runner, batch))
            seconds[j] += time.perf_counter() - start
        agreement.add(*outs)
    return seconds[0], seconds[1], agreement.same


def _choose_strategy(
    builder: ModelBuilder, evaluator: Evaluator, search_idx: np.ndarray, threads: int
) -> tuple[Callable[[Mapping[str, np.ndarray]], Runner], str]:
    """How candidates run, and a note that says so.

    Feeding the weights as inputs saves a session per candidate but runs
    without constant folding and pre-packing; which is cheaper depends on the
    model, so it is timed on a few batches of the search split.
    """
    split, batches = builder.split, evaluator.batches
    output = batches.output
    fed: FedWeights | None = None
    why = ""
    if FedWeights.possible(split):
        try:
            fed = FedWeights(split, output, threads=threads)
        except UnsupportedModelError as e:
            why = f" (onnxruntime cannot run the weights as inputs: {e})"
    else:
        why = " (bfloat16 weights cannot be fed as inputs)"

    def built_now(weights: Mapping[str, np.ndarray]) -> Runner:
        return session_runner(builder.session(weights, threads=threads), output)

    def built(weights: Mapping[str, np.ndarray]) -> Runner:
        # its session is made on its first local run: an executor that runs it elsewhere sends bytes
        model = None if builder.large else lambda: builder.to_bytes(weights)
        return PortableRunner(output, model=model, local=lambda: built_now(weights), threads=threads)

    if fed is not None and split.weight_bytes >= FED_ALWAYS_BYTES:
        # one set of weights in memory, not one more per session
        return fed.runner, "candidates ran with their weights fed as inputs of one session (large weights)"
    if fed is None:
        return built, "candidates ran as sessions of the built model" + why
    sample = search_idx[: max(STRATEGY_SAMPLES, 4 * batches.batch_size)]
    start = time.perf_counter()
    base = built_now(split.weights)
    created = time.perf_counter() - start
    # each session is warmed up on the first batch and timed on the others, a batch of each in
    # turn; the runs that time them also check that the fed run gives the built model's outputs
    warm, rest = sample[: batches.batch_size], sample[batches.batch_size :]
    if not len(rest):
        rest = warm
    fed_seconds, built_seconds, same = _timed_runs(batches, fed.runner(split.weights), base, warm, rest)
    if not same:
        return built, "candidates ran as sessions of the built model (fed weights changed the outputs)"
    timed = {"fed": fed_seconds, "built": built_seconds}
    timed = {name: seconds * len(search_idx) / len(rest) for name, seconds in timed.items()}
    logger.debug("per search pass: fed %.3f s, built %.3f s + %.3f s a session", timed["fed"], timed["built"], created)
    if timed["fed"] <= created + timed["built"]:
        return fed.runner, "candidates ran with their weights fed as inputs of one session (measured faster)"
    return built, "candidates ran as sessions of the built model (measured faster)"
