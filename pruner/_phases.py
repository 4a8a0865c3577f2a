"""The phases of a pruning run, each a function that takes what it needs and returns a value.

load -> baseline -> candidates (``_candidates.make_candidates``) -> search -> confirm
(``_confirm.confirm``) -> write -> report. ``prune()`` calls them in turn and gathers the notes
and timings each returns.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ._analysis import Inspection, SkippedWeight, analyze
from ._candidates import CandidatePool, Candidates, calibration_rows
from ._confirm import Confirmation, HeldOut
from ._errors import (
    InternalError,
    InvalidConfigError,
    InvalidEvalSetError,
    InvalidModelError,
    UnsupportedModelError,
    check_stop,
)
from ._evalset import (
    EvalSet,
    InputSpec,
    load_eval_set,
    model_inputs,
    process_memory,
    release_freed_memory,
    validate_eval_set,
)
from ._evaluate import (
    Batches,
    EvalOutcome,
    Evaluator,
    ModelBuilder,
    PortableRunner,
    Rerun,
    Runner,
    SplitModel,
    make_session,
    session_runner,
)
from ._graph import declared_shape, reads
from ._metrics import Metric
from ._model import _check, load_model, session_source
from ._options import GRADIENT_CRITERIA, Criterion, MetricKind, Mode, Objective, PruneOptions, Recovery, Tolerance
from ._plan import PruningPlan
from ._report import CandidateRecord, EventKind, ProgressEvent, Report, SplitMetric
from ._search import Judgement, SearchOutcome, Trial, search
from ._space import Config
from ._sparse import to_sparse_initializers
from ._static import fold_layouts

__all__ = [
    "PROBE_SAMPLES",
    "Baseline",
    "Checked",
    "EvalSource",
    "FinalCheck",
    "Loaded",
    "ModelSource",
    "Progress",
    "SearchJudge",
    "Searched",
    "Written",
    "held_out_split",
    "load",
    "load_source",
    "make_report",
    "measure_baseline",
    "process_memory",
    "release_freed_memory",
    "run_search",
    "split_rows",
    "tool_version",
    "write",
]

logger = logging.getLogger(__name__)

PROBE_SAMPLES = 128
"""Samples the refinement probes run on (a slice of the search split)."""
LATENCY_RUNS = 15
"""Timed runs of one batch per passing candidate when the objective is latency (their median counts)."""

NO_NOTES: tuple[str, ...] = ()
ModelSource = str | os.PathLike[str] | bytes | onnx.ModelProto
EvalSource = str | os.PathLike[str] | bytes | EvalSet


def load_source(source: ModelSource) -> onnx.ModelProto:
    """The model ``source`` names, checked (a ``ModelProto`` is checked, not copied)."""
    if isinstance(source, onnx.ModelProto):
        _check(source)
        return source
    return load_model(source)


# -- load & validate ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    """The load phase's result: a checked model and eval set that fit each other, and the run's settings."""

    options: PruneOptions
    """The options as the run uses them (recovery turned off where calibration cannot run)."""
    batches: Batches
    metric: Metric
    inspection: Inspection
    search_idx: np.ndarray
    hold_idx: np.ndarray
    io_names: tuple[list[str], list[str]]
    """The model's input and output names, which the written model must keep."""
    bytes_before: int
    notes: tuple[str, ...]
    seconds: float
    criteria: tuple[Criterion, ...] = ()
    """The criteria the candidates' probes choose from (``PruneOptions.criterion_choices``); empty:
    ``options.criterion`` alone."""


def load(
    source: ModelSource, evalset: EvalSource, options: PruneOptions, stop: threading.Event | None
) -> tuple[Loaded, onnx.ModelProto]:
    """The load & validate phase: the run's settings, and a model of its own for the next phases
    (never the caller's ``ModelProto``: the candidates take it apart).

    Raises:
        InvalidModelError, InvalidEvalSetError, InvalidConfigError, UnsupportedModelError: the
            model, the eval set and the options do not fit together; the message says why.
    """
    start = time.perf_counter()
    original = load_source(source)
    check_stop(stop)
    data = evalset if isinstance(evalset, EvalSet) else load_eval_set(evalset)
    check_stop(stop)
    specs = model_inputs(original)
    if not specs:
        raise UnsupportedModelError(
            "the model has no inputs (every graph input is an initializer): its outputs are constants, "
            "so no eval set can measure what pruning does"
        )
    specs, options, axis_notes = _sample_axes(specs, options)
    criteria = options.criterion_choices
    criterion_notes: tuple[str, ...] = ()
    if options.criterion is Criterion.AUTO:
        options = replace(options, criterion=criteria[0])
        # where auto has a choice to make; with several, the candidates' probes make it and say so
        if options.mode is not Mode.NM and len(criteria) == 1:
            criterion_notes = (f"criterion auto: {options.criterion.value}",)
    validate_eval_set(data, specs)
    outputs = [o.name for o in original.graph.output]
    output = options.output or outputs[0]
    if output not in outputs:
        raise InvalidConfigError(f"output {output!r} is not a model output; outputs: {', '.join(outputs)}")
    _check_measured_output(original, output, chosen=options.output is not None)
    metric = Metric.from_options(options)
    metric.check_labels(data.labels, _samples_first(_output_shape(original, output), options.output_sample_axis))
    metric.check_mask(None if options.sequence_mask is None else data.inputs.get(options.sequence_mask))
    label_notes = []
    if data.labels is not None and metric.kind in (MetricKind.DICE, MetricKind.IOU, MetricKind.RANK_CORRELATION):
        label_notes.append(
            f"{metric.name} compares the candidates with the eval set's labels, not with the original's output"
        )
    search_idx, hold_idx = split_rows(len(data), options.holdout_fraction, options.seed)
    inspection, constant_notes = _inspect(original, options.include, options.exclude)
    # how candidates would be calibrated or measured is moot when there are none
    notes = (*criterion_notes, *axis_notes, *label_notes) if inspection.layers else ()
    io_names = ([i.name for i in original.graph.input], list(outputs))
    bytes_before = original.ByteSize()
    # after the analysis: the same layers, but a conv bias written as Reshape(b) -> Add is found
    owned = fold_layouts(original)
    if owned is source:
        owned = _copy(owned)
    del original
    check_stop(stop)
    batches = Batches(
        specs,
        output,
        data,
        batch_size=options.batch_size,
        stop=stop,
        input_axes=options.input_sample_axes,
        output_axis=options.output_sample_axis,
    )
    seconds = time.perf_counter() - start
    logger.debug("loaded: %d prunable layer(s), %d samples, in %.3f s", len(inspection.layers), len(data), seconds)
    loaded = Loaded(
        options,
        batches,
        metric,
        inspection,
        search_idx,
        hold_idx,
        io_names,
        bytes_before,
        (*notes, *constant_notes),
        seconds,
        criteria,
    )
    return loaded, owned


def split_rows(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The search and held-out rows of an eval set of ``n`` samples (seeded, each sorted)."""
    holdout = round(n * fraction)
    if fraction > 0 and holdout == 0 and n >= 2:
        holdout = 1
    if n - holdout < 1:
        raise InvalidEvalSetError(f"eval set has {n} sample(s): too few to keep a held-out split of {fraction:g}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[holdout:]), np.sort(perm[:holdout])


def _inspect(
    model: onnx.ModelProto, include: tuple[str, ...], exclude: tuple[str, ...]
) -> tuple[Inspection, tuple[str, ...]]:
    """The prunable layers, and a note when Constant-node weights are left out (IR version < 4)."""
    inspection = analyze(model, include=include, exclude=exclude)
    if model.ir_version >= 4 or not any(la.from_constant for la in inspection.layers):
        return inspection, ()
    reason = "a Constant node's weight: left alone in models of IR version < 4"
    left = [la for la in inspection.layers if la.from_constant]
    return (
        replace(
            inspection,
            layers=tuple(la for la in inspection.layers if not la.from_constant),
            skipped=(*inspection.skipped, *(SkippedWeight(la.name, la.op_type, reason) for la in left)),
            skipped_params={**inspection.skipped_params, **{la.name: la.params for la in left}},
        ),
        ("Constant-node weights are left alone in models of IR version < 4",),
    )


def _output_shape(model: onnx.ModelProto, name: str) -> tuple[int | None, ...]:
    for value in model.graph.output:
        if value.name == name:
            return declared_shape(value)
    return ()


def _samples_first(shape: tuple[int | None, ...], axis: int) -> tuple[int | None, ...]:
    if not axis or len(shape) <= axis:
        return shape
    return (shape[axis], *shape[:axis], *shape[axis + 1 :])


def _sample_axes(
    specs: list[InputSpec], options: PruneOptions
) -> tuple[list[InputSpec], PruneOptions, tuple[str, ...]]:
    """The inputs as the eval set stores them (samples first), the options a run with inputs
    whose sample axis is not the first can use, and a note when they differ from those asked.

    Calibration feeds the eval set's rows as they are stored, so such inputs run without it:
    the default recovery is turned off (noted); asking for recovery or the activation criterion is an error.
    """
    axes = {k: v for k, v in (options.input_sample_axes or {}).items() if v}
    unknown = sorted(set(options.input_sample_axes or {}) - {s.name for s in specs})
    if unknown:
        raise InvalidConfigError(
            f"input_sample_axes names {', '.join(map(repr, unknown))}, not model input(s); "
            f"inputs: {', '.join(s.name for s in specs)}"
        )
    if not axes:
        return specs, options, ()
    for spec in specs:
        axis = axes.get(spec.name, 0)
        if axis and axis >= len(spec.shape):
            raise InvalidConfigError(
                f"input_sample_axes puts the samples of {spec.name!r} on axis {axis}; it has rank {len(spec.shape)}"
            )
    moved = [replace(s, shape=_samples_first(s.shape, axes.get(s.name, 0))) for s in specs]
    if options.criterion is Criterion.ACTIVATION or options.recover not in (Recovery.AUTO, Recovery.NONE):
        raise InvalidConfigError(
            "input_sample_axes cannot be combined with calibration (criterion activation or recover "
            f"{options.recover.value}): calibration feeds the eval set samples first; use recover none"
        )
    if options.recover is Recovery.AUTO:
        note = "no recovery: calibration does not support inputs whose sample axis is not the first"
        return moved, replace(options, recover=Recovery.NONE), (note,)
    return moved, options, ()


def _check_measured_output(model: onnx.ModelProto, output: str, *, chosen: bool) -> None:
    """Refuse an output the metric could not see pruning in: a graph input passed through, or a
    value that depends on no model input (an initializer, a constant subgraph).

    Raises:
        InvalidConfigError: ``output`` was chosen in the options.
        UnsupportedModelError: it is the model's first output, the default.
    """
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = {v.name for v in graph.input if v.name not in initializers}
    if output in inputs:
        why = "is a model input passed through unchanged"
    else:
        producers = {name: node for node in graph.node for name in node.output if name}
        seen: set[str] = set()
        todo = [output]
        reached = False
        while todo and not reached:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in inputs:
                reached = True
            elif name in producers:
                todo.extend(reads(producers[name]))
        if reached:
            return
        kind = "an initializer" if output in initializers else "computed from constants only"
        why = f"is {kind}: it does not depend on any model input"
    others = [o.name for o in graph.output if o.name != output]
    hint = f"; choose another output ({', '.join(map(repr, others))})" if others else ""
    message = f"output {output!r} {why}, so the metric cannot see what pruning does{hint}"
    if chosen:
        raise InvalidConfigError(message)
    raise UnsupportedModelError(message + " with the output option" if others else message)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


# -- baseline -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """The baseline phase's result: the unpruned model's metric and the evaluator that compares
    every candidate with it."""

    evaluator: Evaluator
    metric: SplitMetric
    allowed: float
    """The loss the tolerance allows on the search split."""
    bound: float
    """The metric value a candidate must reach on the search split."""
    seconds: float


def probe_rows(search_idx: np.ndarray) -> np.ndarray:
    """The rows the label-free probes compare outputs on (whose whole output the baseline keeps)."""
    return search_idx[:PROBE_SAMPLES]


def measure_baseline(model: onnx.ModelProto, loaded: Loaded, tolerance: Tolerance, threads: int) -> Baseline:
    """The baseline phase: run the unpruned ``model`` once over the eval set.

    Raises:
        UnsupportedModelError: onnxruntime cannot run it, or its metric is not finite.
    """
    start = time.perf_counter()
    batches, metric = loaded.batches, loaded.metric
    everything = np.arange(len(batches.evalset))
    # the rows whose whole output the probes (and gradients) compare with, where the metric keeps less
    keep = probe_rows(loaded.search_idx)
    if loaded.options.criterion in GRADIENT_CRITERIA:
        options = loaded.options
        keep = np.union1d(keep, calibration_rows(loaded.search_idx, options.calibration_samples, options.seed))
    with session_source(model) as source:
        # the probe rows' outputs again from the model's bytes, if those are smaller (never the
        # gradients' rows: they are read right after, and are most of the search split)
        rerun = None
        if isinstance(source, bytes) and loaded.options.criterion not in GRADIENT_CRITERIA:
            rerun = _rerun(batches, source, everything, threads)
        if batches.executor.remote and isinstance(source, bytes):
            sent = source
            runner = PortableRunner(batches.output, model=lambda: sent)
            pieces = batches.pieces(everything)
            outputs = zip(pieces, batches.executor.outputs(batches, runner, pieces), strict=True)
            evaluator = Evaluator.measure(batches, metric, outputs, keep, rerun)
        else:
            session = make_session(source, threads=threads)
            evaluator = Evaluator.measure(
                batches, metric, batches.each_output(session_runner(session, batches.output), everything), keep, rerun
            )
            del session
    search_value = evaluator.reference_value(loaded.search_idx)
    hold_value = evaluator.reference_value(loaded.hold_idx) if len(loaded.hold_idx) else None
    for name, value in (("search", search_value), ("holdout", hold_value)):
        if value is not None and not np.isfinite(value):
            raise UnsupportedModelError(f"the unpruned model's metric on the {name} split is not finite")
    allowed = tolerance.allowed_loss(search_value)
    seconds = time.perf_counter() - start
    logger.debug("baseline %s %.6g in %.3f s", metric.name, search_value, seconds)
    return Baseline(
        evaluator,
        SplitMetric(search_value, hold_value),
        allowed,
        metric.passing_bound(search_value, allowed),
        seconds,
    )


def _rerun(batches: Batches, model: bytes, everything: np.ndarray, threads: int) -> Rerun:
    """The baseline's run of ``model`` again, over the pieces of ``everything`` that hold given rows:
    the same batches, sessions made alike (here, or on the executor's workers), so the same bits."""

    def outputs(rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        pieces = [p for p in batches.pieces(everything) if np.isin(p, rows).any()]
        if batches.executor.remote:
            runner = PortableRunner(batches.output, model=lambda: model)
            yield from zip(pieces, batches.executor.outputs(batches, runner, pieces), strict=True)
            return
        run = session_runner(make_session(model, threads=threads), batches.output)
        for piece in pieces:
            yield from batches.each_output(run, piece)

    return Rerun(len(model), outputs)


def held_out_split(loaded: Loaded, baseline: Baseline) -> HeldOut | None:
    """How candidates are judged on the held-out split (None: there is none)."""
    if baseline.metric.holdout is None:
        return None
    options = loaded.options
    return HeldOut.of(
        baseline.evaluator,
        loaded.hold_idx,
        baseline.metric.holdout,
        options.tolerance,
        options.acceptance,
        options.confidence,
    )


# -- progress -------------------------------------------------------------------------------------


class Progress:
    """Turns what the phases did into ``ProgressEvent``s for ``on_progress``."""

    def __init__(self, on_progress: Callable[[ProgressEvent], None] | None, metric: str, max_evaluations: int) -> None:
        self.emit = on_progress or (lambda event: None)
        self.metric = metric
        self.max_evaluations = max_evaluations

    def baseline(self, value: float) -> None:
        self.emit(ProgressEvent(EventKind.BASELINE, f"baseline {self.metric} {value:.4f}", metric=value))

    def trial(self, trial: Trial, better: bool) -> None:
        verdict = trial.judgement
        logger.debug(
            "%s %d sparsity %.4f: %s %.6g%s %s",
            trial.phase.value,
            trial.index,
            trial.sparsity,
            self.metric,
            verdict.value,
            "" if verdict.complete else " (stopped early)",
            "pass" if verdict.passed else "fail",
        )
        message = (
            f"{trial.phase.value} sparsity {trial.sparsity:.1%}: {self.metric} "
            f"{verdict.value:.4f}{'' if verdict.complete else ' (stopped early)'} "
            f"{'pass' if verdict.passed else 'fail'}"
        )
        self.emit(self._event(EventKind.CANDIDATE, message, trial, verdict.passed))
        if better:
            self.emit(self._event(EventKind.NEW_BEST, f"new best: sparsity {trial.sparsity:.1%}", trial, True))

    def _event(self, kind: EventKind, message: str, trial: Trial, passed: bool) -> ProgressEvent:
        return ProgressEvent(
            kind,
            message,
            evaluation=trial.index,
            max_evaluations=self.max_evaluations,
            sparsity=trial.sparsity,
            nonzero_params=trial.nonzero,
            metric=trial.judgement.value,
            passed=passed,
        )

    def confirmed(self, sparsity: float, nonzero: int, held_out: int) -> None:
        self.emit(
            ProgressEvent(
                EventKind.CONFIRM,
                f"confirmed sparsity {sparsity:.1%} on {held_out} held-out samples",
                sparsity=sparsity,
                nonzero_params=nonzero,
            )
        )

    def done(self, report: Report) -> None:
        self.emit(
            ProgressEvent(
                EventKind.DONE,
                f"done: sparsity {report.sparsity:.1%}, {self.metric} {report.final.search:.4f}",
                evaluation=report.evaluations,
                max_evaluations=self.max_evaluations,
                sparsity=report.sparsity,
                nonzero_params=report.nonzero_after,
                metric=report.final.search,
                passed=True,
            )
        )


# -- search ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchJudge:
    """Judges a config on the search split against the baseline (and times it for a latency objective)."""

    pool: CandidatePool
    evaluator: Evaluator
    rows: np.ndarray
    baseline: float
    allowed: float
    bound: float
    timed: bool
    """Measure the latency of passing candidates (the latency objective)."""

    def __call__(self, config: Config) -> Judgement:
        check_stop(self.evaluator.batches.stop)
        runner = self.pool.runner(config)
        verdict = self._verdict(self.evaluator.evaluate(self.rows, runner, bound=self.bound), runner)
        if verdict.passed:
            self.pool.keep(config)
        return verdict

    def many(self, configs: Sequence[Config]) -> list[Judgement]:
        """Each config's verdict, as :meth:`__call__` gives it, the evaluations run together where
        the executor can (a k-section round)."""
        check_stop(self.evaluator.batches.stop)
        timed: dict[int, Runner] = {}  # kept for the latency only: else one candidate's weights at a time

        def maker(i: int, config: Config) -> Callable[[], Runner]:
            def make() -> Runner:
                runner = self.pool.runner(config)
                if self.timed:
                    timed[i] = runner
                return runner

            return make

        results = self.evaluator.evaluate_many(
            self.rows, [maker(i, c) for i, c in enumerate(configs)], bound=self.bound
        )
        return [self._verdict(result, timed.get(i)) for i, result in enumerate(results)]

    def _verdict(self, result: EvalOutcome, runner: Runner | None) -> Judgement:
        metric = self.evaluator.metric
        passed = result.complete and metric.loss(self.baseline, result.value) <= self.allowed + 1e-9
        cost = None
        if passed and self.timed and runner is not None:
            cost = _latency(self.evaluator.batches, runner, self.rows)
        return Judgement(passed, result.value, result.complete, result.samples, result.seconds, cost)


def _latency(batches: Batches, runner: Runner, rows: np.ndarray) -> float:
    """Median seconds of one batch of ``rows`` through ``runner`` (after one warm-up run)."""
    batch = rows[: batches.batch_size]
    batches.run(runner, batch)
    times = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        batches.run(runner, batch)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


@dataclass(frozen=True)
class Searched:
    """The search phase's result."""

    outcome: SearchOutcome
    judge: SearchJudge
    """What judged the search's candidates (the confirmation's fallback points are judged alike)."""
    sensitivity: dict[str, list[list[float]]]
    notes: tuple[str, ...]
    timings: Mapping[str, float]


def run_search(
    pool: CandidatePool, loaded: Loaded, baseline: Baseline, on_trial: Callable[[Trial, bool], None]
) -> Searched:
    """The search phase: the label-free probes that finish the space, then the search for the
    smallest candidate within the tolerance on the search split."""
    options, evaluator, rows = loaded.options, baseline.evaluator, loaded.search_idx
    judge = SearchJudge(
        pool,
        evaluator,
        rows,
        baseline.metric.search,
        baseline.allowed,
        baseline.bound,
        options.effective_objective is Objective.LATENCY,
    )
    probed = probe_rows(rows)

    def probe(config: Config) -> float:
        check_stop(evaluator.batches.stop)
        return evaluator.deviation(probed, pool.probe_runner(config))

    start = time.perf_counter()
    sensitivity, notes = pool.with_probe(probe)
    timings = {"profiles": time.perf_counter() - start}
    start = time.perf_counter()
    if pool.units:
        outcome = search(
            pool.space,
            judge,
            probe if pool.refinable else None,
            max_evaluations=options.max_evaluations,
            max_seconds=options.max_seconds,
            resolution=options.resolution,
            on_trial=on_trial,
            target=options.target_sparsity,
            search_width=options.search_width,
            judge_many=judge.many,
        )
    else:
        outcome = SearchOutcome(best=pool.space.empty())
    timings["search"] = time.perf_counter() - start
    logger.debug("search phase: profiles %.3f s, search %.3f s", timings["profiles"], timings["search"])
    return Searched(outcome, judge, sensitivity, notes, timings)


# -- write ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checked:
    """A model we return, checked and measured."""

    model: onnx.ModelProto
    model_bytes: bytes | None
    """Its serialized form (None for models over 2 GB)."""
    final: SplitMetric
    hold_scores: np.ndarray | None
    """Its per-sample scores on the held-out split (None: there is none)."""
    notes: tuple[str, ...] = ()


class FinalCheck:
    """Validates the model we return and measures it with a fresh session from its serialized form."""

    def __init__(
        self,
        evaluator: Evaluator,
        io_names: tuple[list[str], list[str]],
        search_idx: np.ndarray,
        hold_idx: np.ndarray,
        threads: int,
    ) -> None:
        self.evaluator = evaluator
        self.io_names = io_names
        self.search_idx, self.hold_idx = search_idx, hold_idx
        self.threads = threads

    @property
    def stop(self) -> threading.Event | None:
        return self.evaluator.batches.stop

    def __call__(self, built: onnx.ModelProto | bytes, sparse: Sequence[str]) -> Checked:
        """Check and measure ``built`` (bytes, or a ModelProto when over 2 GB), stored with
        ``sparse`` weights as sparse initializers where that helps. Peak memory: about three
        copies of the model."""
        if isinstance(built, onnx.ModelProto):
            with session_source(built) as path:
                assert isinstance(path, str)
                self._validate(built, Path(path))
                session = make_session(path, threads=self.threads)
                final, hold_scores = self._measure(session_runner(session, self.evaluator.batches.output))
            return Checked(built, None, final, hold_scores)
        data, notes = built, NO_NOTES
        if sparse:
            data, notes = _with_sparse_initializers(data, sparse)
            check_stop(self.stop)
        fresh = self._fresh(data)
        # a cluster's workers load the bytes while the checker runs here; nothing runs rows before it passes
        self.evaluator.batches.executor.prepare(self.evaluator.batches, fresh)
        try:
            onnx.checker.check_model(data, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise InternalError(f"the pruned model fails the checker ({e})") from e
        check_stop(self.stop)
        final, hold_scores = self._measure(fresh)
        model = onnx.ModelProto.FromString(data)
        self._validate(model, None)
        return Checked(model, data, final, hold_scores, notes)

    def _validate(self, model: onnx.ModelProto, path: Path | None) -> None:
        if path is not None:
            try:
                _check(model, path)
            except InvalidModelError as e:  # a bug of ours; never hand such a model out
                raise InternalError(f"the pruned model fails the checker ({e})") from e
        names = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
        if names != self.io_names:
            raise InternalError("the pruned model's inputs or outputs changed")

    def _fresh(self, data: bytes) -> Runner:
        """A fresh session of ``data``, made where its rows run: here on the first of them, or on each
        worker of a remote executor (the bytes go to its object store once, the rows are sharded like
        any evaluation's)."""
        return PortableRunner(self.evaluator.batches.output, model=lambda: data, threads=self.threads)

    def _measure(self, runner: Runner) -> tuple[SplitMetric, np.ndarray | None]:
        evaluator, batches = self.evaluator, self.evaluator.batches
        search_value = evaluator.evaluate(self.search_idx, runner).value
        if not len(self.hold_idx):
            return SplitMetric(search_value, None), None
        # piece by piece through the executor: the same batches as one local pass over the rows
        outputs = np.concatenate(list(batches.executor.outputs(batches, runner, batches.pieces(self.hold_idx))))
        scores = evaluator.per_sample(outputs, self.hold_idx)
        return SplitMetric(search_value, float(scores.mean())), scores


def _with_sparse_initializers(data: bytes, names: Sequence[str]) -> tuple[bytes, tuple[str, ...]]:
    """The model with zeroed weights as sparse_initializer if it still passes the full checker, and a note."""
    candidate = onnx.ModelProto.FromString(data)
    converted = to_sparse_initializers(candidate, list(names))
    if not converted:
        return data, ("sparse_initializer not used: no pruned weight is sparse enough to get smaller",)
    try:
        _check(candidate)
    except InvalidModelError:
        return data, (
            "sparse_initializer not used: the ONNX checker's strict shape inference rejects sparse "
            "tensors as inputs of the pruned ops, and every model we return must pass it",
        )
    note = f"{len(converted)} weight(s) stored as sparse_initializer; onnxruntime densifies them at load"
    return candidate.SerializeToString(), (note,)


@dataclass(frozen=True)
class Written:
    """The write phase's result: the model we return, checked and measured."""

    checked: Checked
    chosen: Config
    """The config written (the empty config when the original is returned)."""
    notes: tuple[str, ...]
    seconds: float


def write(
    source: ModelSource,
    pool: CandidatePool,
    chosen: Config,
    check: FinalCheck,
    held_out: HeldOut | None,
    comparisons: int,
    *,
    sparse: bool,
) -> Written:
    """The write phase: build ``chosen`` (the original ``source`` when it is empty), check and
    measure it. A built model that misses the held-out rule is replaced by the original."""
    start = time.perf_counter()
    notes: tuple[str, ...] = ()

    def unchanged() -> Checked:
        # the split reordered the model's tensors; hand back the very model we were given
        check_stop(check.stop)
        model_again = _copy(source) if isinstance(source, onnx.ModelProto) else load_source(source)
        again = ModelBuilder(SplitModel.take(model_again, set()))
        return check(again.to_proto({}) if again.large else again.to_bytes({}), ())

    if any(chosen):
        names = pool.sparse_names(chosen) if sparse else []
        check_stop(check.stop)
        built = pool.build(chosen)
        checked = check(built, names)
        del built
        notes = checked.notes
        decide_with = 1 if held_out is None else held_out.deciding_comparisons(comparisons)
        if (
            held_out is not None
            and checked.hold_scores is not None
            and not held_out.accepts(checked.hold_scores, decide_with)
        ):
            # the written model runs its weights as initializers, the search may have fed them as
            # inputs: at the edge of the tolerance a rounding can differ; never hand out a model that misses
            rule = held_out.rule.value
            notes += (f"the written model fails the {rule} rule on the held-out split; returning the original",)
            chosen = pool.space.empty()
            del checked
            checked = unchanged()
    else:
        pool.release()
        checked = unchanged()
    seconds = time.perf_counter() - start
    logger.debug("wrote sparsity %.4f in %.3f s", pool.space.sparsity(chosen), seconds)
    return Written(checked, chosen, notes, seconds)


# -- report ---------------------------------------------------------------------------------------


def tool_version() -> str:
    try:
        return metadata.version("onnx-pruner")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }


def make_report(
    loaded: Loaded,
    baseline: Baseline,
    candidates: Candidates,
    searched: Searched,
    held_out: HeldOut | None,
    confirmed: Confirmation,
    written: Written,
    plan: PruningPlan,
    total_seconds: float,
) -> Report:
    """The report phase: what the run did and measured, its notes in the order the phases made them."""
    pool, checked = candidates.pool, written.checked
    layer_reports, params, skipped_channels = pool.summary(written.chosen, checked.model)
    drop, drop_notes = None, NO_NOTES
    if held_out is not None and checked.hold_scores is not None:
        drop = held_out.interval(checked.hold_scores, confirmed.comparisons)
        if drop.high > held_out.allowed + 1e-9 and any(written.chosen):
            drop_notes = (
                f"the held-out drop is {drop.estimate:.4g}, but with {drop.confidence:.0%} confidence only "
                f"at most {drop.high:.4g}, above the allowed loss {held_out.allowed:.4g}: the eval set cannot show "
                "the result is within the tolerance",
            )
    timings = {
        "load": loaded.seconds,
        "baseline": baseline.seconds,
        **candidates.timings,
        **searched.timings,
        "confirm": confirmed.seconds,
        "write": written.seconds,
    }
    if pool.calibration is not None:
        timings["recovery"] = pool.calibration.seconds
    timings["total"] = total_seconds
    trials = [*searched.outcome.trials, *confirmed.fallbacks]
    metric = loaded.metric
    return Report(
        tool_version=tool_version(),
        versions=_versions(),
        options=replace(loaded.options, criterion=pool.options.criterion).to_dict(),  # the one the probes chose
        metric=metric.name,
        higher_is_better=metric.higher_is_better,
        output=loaded.batches.output,
        samples={"search": len(loaded.search_idx), "holdout": len(loaded.hold_idx)},
        baseline=baseline.metric,
        final=checked.final,
        allowed_loss=baseline.allowed,
        status="pruned" if any(written.chosen) else "unchanged",
        total_params=loaded.inspection.total_params,
        prunable_params=params[0],
        nonzero_before=params[1],
        nonzero_after=params[2],
        bytes_before=loaded.bytes_before,
        bytes_after=checked.model.ByteSize() if checked.model_bytes is None else len(checked.model_bytes),
        layers=layer_reports,
        skipped=skipped_channels or list(loaded.inspection.skipped),
        trace=[_record(t) for t in trials],
        evaluations=len(trials),
        confirmations=confirmed.runs,
        probes=searched.outcome.probes,
        stopped_by=searched.outcome.stopped_by,
        plan=plan.to_dict(),
        timings=timings,
        sensitivity=searched.sensitivity,
        drop=drop,
        notes=[
            *loaded.notes,
            *candidates.notes,
            *searched.notes,
            *confirmed.notes,
            *written.notes,
            *drop_notes,
        ],
    )


def _record(trial: Trial) -> CandidateRecord:
    verdict = trial.judgement
    return CandidateRecord(
        trial.index,
        trial.phase,
        trial.sparsity,
        trial.nonzero,
        verdict.value,
        verdict.passed,
        verdict.complete,
        verdict.samples,
        verdict.seconds,
        verdict.cost,
    )
