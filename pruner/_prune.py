"""The pruning run: load, validate, measure the baseline, search, confirm, write."""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ._accept import accepts, drop_interval, zero_drop_half_width, zero_drop_samples
from ._analysis import Inspection, analyze
from ._candidates import ChannelCandidates, RunContext, WeightCandidates, about_running
from ._errors import (
    InternalError,
    InvalidConfigError,
    InvalidEvalSetError,
    InvalidModelError,
    UnsupportedModelError,
    check_stop,
)
from ._evalset import EvalSet, InputSpec, load_eval_set, model_inputs, validate_eval_set
from ._evaluate import Evaluator, ModelBuilder, Runner, SplitModel, make_session, session_runner
from ._graph import declared_shape, reads
from ._metrics import Metric
from ._model import _check, load_model, save_model, session_source
from ._nm import NMSpace
from ._options import AcceptanceRule, Criterion, MetricKind, Mode, Objective, PruneOptions, Recovery
from ._plan import LayerPlan, PruningPlan, replayable
from ._report import CandidateRecord, DropInterval, EventKind, ProgressEvent, Report, SplitMetric
from ._search import Judgement, Phase, Trial, search
from ._space import Config, ZeroSpace
from ._sparse import to_sparse_initializers
from ._static import fold_layouts

__all__ = ["PruneResult", "inspect", "prune"]

logger = logging.getLogger(__name__)

PROBE_SAMPLES = 128
"""Samples the refinement probes run on (a slice of the search split)."""
ModelSource = str | os.PathLike[str] | bytes | onnx.ModelProto
EvalSource = str | os.PathLike[str] | bytes | EvalSet


@dataclass
class PruneResult:
    """The pruned model, its plan and the report."""

    model: onnx.ModelProto
    plan: PruningPlan
    report: Report
    model_bytes: bytes | None = field(default=None, repr=False)
    """The serialized model as checked and measured (None for models over 2 GB)."""

    def save(
        self,
        path: str | os.PathLike[str],
        report_path: str | os.PathLike[str] | None = None,
        *,
        extra: Sequence[tuple[str | os.PathLike[str], bytes]] = (),
    ) -> None:
        """Write the model (with external data when over 2 GB), optionally the JSON report and
        ``extra`` files (e.g. a plot). All or nothing: if any file cannot be written, none is.
        """
        companions = [] if report_path is None else [(report_path, self.report.to_json().encode())]
        model = self.model if self.model_bytes is None else self.model_bytes
        save_model(model, path, companions=[*companions, *extra])


def _load(source: ModelSource) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        _check(source)
        return source
    return load_model(source)


def inspect(source: ModelSource, *, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> Inspection:
    """The prunable layers of a model, and what is skipped and why."""
    return analyze(_load(source), include=include, exclude=exclude)


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }


def tool_version() -> str:
    try:
        return metadata.version("onnx-pruner")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    holdout = round(n * fraction)
    if fraction > 0 and holdout == 0 and n >= 2:
        holdout = 1
    if n - holdout < 1:
        raise InvalidEvalSetError(f"eval set has {n} sample(s): too few to keep a held-out split of {fraction:g}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[holdout:]), np.sort(perm[:holdout])


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
    specs: list[InputSpec], options: PruneOptions, notes: list[str]
) -> tuple[list[InputSpec], PruneOptions]:
    """The inputs as the eval set stores them (samples first), and the options a run with inputs
    whose sample axis is not the first can use.

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
        return specs, options
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
        notes.append("no recovery: calibration does not support inputs whose sample axis is not the first")
        options = replace(options, recover=Recovery.NONE)
    return moved, options


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


def prune(
    model: ModelSource,
    evalset: EvalSource,
    options: PruneOptions | None = None,
    *,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    stop: threading.Event | None = None,
) -> PruneResult:
    """Prune ``model`` to the smallest candidate whose metric stays within tolerance.

    Args:
        model: a path, serialized bytes, or a ``ModelProto`` (never modified).
        evalset: an ``.npz`` path or bytes (read with :func:`load_eval_set`: no more decoded
            data than the machine has free memory for), or an :class:`EvalSet`.
        options: the run's options; defaults when None.
        on_progress: called with a :class:`ProgressEvent` as the run goes on.
        stop: set it to cancel; the run raises :class:`CancelledError` within one step of
            whatever it is doing (a batch, a solver step, a layer's statistics).

    Returns:
        The pruned model (the original, unchanged, when nothing passes), its plan and report.

    Raises:
        InvalidModelError, InvalidEvalSetError, InvalidConfigError: bad input.
        UnsupportedModelError: onnxruntime cannot run the model.
        ResourceLimitError: the eval set's arrays would not fit in memory.
        CancelledError: ``stop`` was set.
    """
    options = options or PruneOptions()
    emit = on_progress or (lambda event: None)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    original = _load(model)
    check_stop(stop)
    data = evalset if isinstance(evalset, EvalSet) else load_eval_set(evalset)
    check_stop(stop)
    specs = model_inputs(original)
    if not specs:
        raise UnsupportedModelError(
            "the model has no inputs (every graph input is an initializer): its outputs are constants, "
            "so no eval set can measure what pruning does"
        )
    notes: list[str] = []
    specs, options = _sample_axes(specs, options, notes)
    validate_eval_set(data, specs)
    outputs = [o.name for o in original.graph.output]
    output = options.output or outputs[0]
    if output not in outputs:
        raise InvalidConfigError(f"output {output!r} is not a model output; outputs: {', '.join(outputs)}")
    _check_measured_output(original, output, chosen=options.output is not None)
    metric = Metric.from_options(options)
    metric.check_labels(data.labels, _samples_first(_output_shape(original, output), options.output_sample_axis))
    metric.check_mask(None if options.sequence_mask is None else data.inputs.get(options.sequence_mask))
    if data.labels is not None and metric.kind in (MetricKind.DICE, MetricKind.IOU, MetricKind.RANK_CORRELATION):
        notes.append(
            f"{metric.name} compares the candidates with the eval set's labels, not with the original's output"
        )
    search_idx, hold_idx = _split(len(data), options.holdout_fraction, options.seed)
    inspection = analyze(original, include=options.include, exclude=options.exclude)
    if original.ir_version < 4:
        constant_layers = {la.name for la in inspection.layers if la.from_constant}
        if constant_layers:
            notes.append("Constant-node weights are left alone in models of IR version < 4")
            inspection = Inspection(
                tuple(la for la in inspection.layers if not la.from_constant),
                inspection.skipped,
                inspection.total_params,
            )
    io_names = ([i.name for i in original.graph.input], list(outputs))
    bytes_before = original.ByteSize()
    # after the analysis: the same layers, but a conv bias written as Reshape(b) -> Add is found
    original = fold_layouts(original)
    check_stop(stop)
    timings["load"] = time.perf_counter() - t_start
    evaluator = Evaluator(
        None,
        specs,
        output,
        metric,
        data,
        batch_size=options.batch_size,
        stop=stop,
        input_axes=options.input_sample_axes,
        output_axis=options.output_sample_axis,
    )
    kind = ChannelCandidates if options.mode is Mode.REMOVE else WeightCandidates
    # candidates take the model they are given apart: never the caller's
    owned = _copy(original) if original is model else original
    del original
    before_candidates = len(notes)
    candidates = kind(owned, RunContext(inspection, data, search_idx, evaluator, options, notes, timings))
    del owned
    space, units = candidates.space, candidates.units
    if not units:
        # how candidates would have been calibrated and run is moot when there are none
        notes[before_candidates:] = [n for n in notes[before_candidates:] if not about_running(n)]
    reference = evaluator.reference
    assert reference is not None

    mask = evaluator.mask

    def measure(idx: np.ndarray, out: np.ndarray) -> float:
        labels = None if data.labels is None or not metric.uses_labels else data.labels[idx]
        return metric.value(out[idx], labels, reference[idx], None if mask is None else mask[idx])

    baseline = SplitMetric(measure(search_idx, reference), measure(hold_idx, reference) if len(hold_idx) else None)
    for name, value in (("search", baseline.search), ("holdout", baseline.holdout)):
        if value is not None and not np.isfinite(value):
            raise UnsupportedModelError(f"the unpruned model's metric on the {name} split is not finite")
    allowed = options.tolerance.allowed_loss(baseline.search)
    bound = metric.passing_bound(baseline.search, allowed)
    emit(ProgressEvent(EventKind.BASELINE, f"baseline {metric.name} {baseline.search:.4f}", metric=baseline.search))

    timing_rows = search_idx[: evaluator.batch_size]

    def judge(config: Config) -> Judgement:
        check_stop(stop)
        runner = candidates.runner(config)
        result = evaluator.evaluate(search_idx, runner=runner, bound=bound)
        passed = result.complete and metric.loss(baseline.search, result.value) <= allowed + 1e-9
        cost = None
        if passed and options.effective_objective is Objective.LATENCY:
            cost = _latency(evaluator, runner, timing_rows)
        return Judgement(passed, result.value, result.complete, result.samples, result.seconds, cost)

    probe_idx = search_idx[:PROBE_SAMPLES]

    def probe(config: Config) -> float:
        check_stop(stop)
        return evaluator.deviation(probe_idx, candidates.probe_runner(config))

    t0 = time.perf_counter()
    sensitivity = candidates.with_probe(probe)
    timings["profiles"] = time.perf_counter() - t0

    def on_trial(trial: Trial, better: bool) -> None:
        j = trial.judgement
        emit(
            ProgressEvent(
                EventKind.CANDIDATE,
                f"{trial.phase.value} sparsity {trial.sparsity:.1%}: {metric.name} "
                f"{j.value:.4f}{'' if j.complete else ' (stopped early)'} {'pass' if j.passed else 'fail'}",
                evaluation=trial.index,
                max_evaluations=options.max_evaluations,
                sparsity=trial.sparsity,
                nonzero_params=trial.nonzero,
                metric=j.value,
                passed=j.passed,
            )
        )
        if better:
            emit(
                ProgressEvent(
                    EventKind.NEW_BEST,
                    f"new best: sparsity {trial.sparsity:.1%}",
                    evaluation=trial.index,
                    max_evaluations=options.max_evaluations,
                    sparsity=trial.sparsity,
                    nonzero_params=trial.nonzero,
                    metric=j.value,
                    passed=True,
                )
            )

    t0 = time.perf_counter()
    if units:
        outcome = search(
            space,
            judge,
            probe if candidates.refinable else None,
            max_evaluations=options.max_evaluations,
            max_seconds=options.max_seconds,
            resolution=options.resolution,
            on_trial=on_trial,
            target=options.target_sparsity,
        )
    else:
        notes.append("no prunable weights: the model is returned unchanged")
        outcome = search(space, judge, None, max_evaluations=0)
    timings["search"] = time.perf_counter() - t0

    t0 = time.perf_counter()

    rule = options.acceptance
    labels_h = None if data.labels is None else data.labels[hold_idx]
    original_h = metric.per_sample(reference[hold_idx], labels_h, reference[hold_idx]) if len(hold_idx) else None
    hold_allowed = options.tolerance.allowed_loss(baseline.holdout or 0.0)
    if original_h is not None and units:
        notes.extend(_small_set_warnings(original_h, hold_allowed, options.confidence))

    def hold_scores(runner: Runner) -> np.ndarray:
        return metric.per_sample(evaluator.outputs(runner, hold_idx), labels_h, reference[hold_idx])

    def interval_of(scores: np.ndarray, comparisons: int) -> DropInterval:
        assert original_h is not None
        return drop_interval(
            original_h,
            scores,
            higher_is_better=metric.higher_is_better,
            confidence=options.confidence,
            comparisons=comparisons,
            rule=rule.value,
        )

    def on_holdout(config: Config) -> bool:
        assert baseline.holdout is not None
        check_stop(stop)
        allowed = options.tolerance.allowed_loss(baseline.holdout)
        result = evaluator.evaluate(
            hold_idx, runner=candidates.runner(config), bound=metric.passing_bound(baseline.holdout, allowed)
        )
        return result.complete and metric.loss(baseline.holdout, result.value) <= allowed + 1e-9

    def fallback(config: Config) -> bool:
        trial = Trial(
            len(outcome.trials) + 1,
            Phase.FALLBACK,
            config,
            space.sparsity(config),
            space.nonzero(config),
            judge(config),
        )
        outcome.trials.append(trial)
        on_trial(trial, False)
        return trial.judgement.passed

    if not units:
        chosen, confirmations, comparisons = space.empty(), 0, 1
    elif rule is AcceptanceRule.EXACT or baseline.holdout is None:
        chosen, confirmations = _confirm(
            outcome.passing(), space, on_holdout if baseline.holdout is not None else None, fallback, notes
        )
        comparisons = max(confirmations, 1)
    else:
        comparisons = min(len(outcome.passing()), MAX_COMPARISONS) or 1
        # the decision's own interval: INTERVAL refuses a candidate within the tolerance with
        # probability <= alpha/2 per candidate; BOUND's promise is about the one returned, so it
        # is corrected for every candidate the list could have returned
        decide_with = comparisons if rule is AcceptanceRule.BOUND else 1

        def on_interval(config: Config) -> bool:
            check_stop(stop)
            return accepts(rule, interval_of(hold_scores(candidates.runner(config)), decide_with), hold_allowed)

        chosen, confirmations = _confirm_in_order(outcome.passing(), space, on_interval, notes)
    emit(
        ProgressEvent(
            EventKind.CONFIRM,
            f"confirmed sparsity {space.sparsity(chosen):.1%} on {len(hold_idx)} held-out samples",
            sparsity=space.sparsity(chosen),
            nonzero_params=space.nonzero(chosen),
        )
    )
    timings["confirm"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    plan = PruningPlan(
        options.mode,
        options.criterion,
        candidates.plan_layers(chosen),
        options.nm if options.mode is Mode.NM else None,
        options.recover,
        candidates.static_reshapes,
    )
    final_check = _FinalCheck(io_names, specs, output, metric, data, reference, search_idx, hold_idx, options, stop)
    evaluator.candidates = None

    def unchanged() -> tuple[onnx.ModelProto, bytes | None, SplitMetric]:
        # the split reordered the model's tensors; hand back the very model we were given
        check_stop(stop)
        model_again = _copy(model) if isinstance(model, onnx.ModelProto) else _load(model)
        again = ModelBuilder(SplitModel.take(model_again, set()))
        return final_check(again.to_proto({}) if again.large else again.to_bytes({}), [], notes)

    if any(chosen):
        sparse = candidates.sparse_names(chosen) if options.sparse_initializers else []
        check_stop(stop)
        built = candidates.build(chosen)
        pruned, pruned_bytes, final = final_check(built, sparse, notes)
        del built
        if final_check.hold_scores is not None and not accepts(
            rule,
            interval_of(final_check.hold_scores, comparisons if rule is AcceptanceRule.BOUND else 1),
            hold_allowed,
        ):
            # the written model runs its weights as initializers, the search may have fed them as
            # inputs: at the edge of the tolerance a rounding can differ; never hand out a model that misses
            notes.append(f"the written model fails the {rule.value} rule on the held-out split; returning the original")
            chosen = space.empty()
            plan = PruningPlan(
                options.mode,
                options.criterion,
                tuple(LayerPlan(p.tensor, 0, p.units, p.channel_axis) for p in plan.layers),
                plan.nm,
                plan.recover,
                plan.static_reshapes,
            )
            del pruned, pruned_bytes
            pruned, pruned_bytes, final = unchanged()
    else:
        candidates.release()
        pruned, pruned_bytes, final = unchanged()
    timings["write"] = time.perf_counter() - t0
    if candidates.calibration is not None:
        timings["recovery"] = candidates.calibration.seconds
    timings["total"] = time.perf_counter() - t_start

    plan = replayable(plan, model, pruned, candidates.written(chosen))
    layer_reports, params, skipped_channels = candidates.summary(chosen, pruned)
    skipped = skipped_channels or list(inspection.skipped)
    drop = None
    if final_check.hold_scores is not None:
        drop = interval_of(final_check.hold_scores, comparisons)
        if drop.high > hold_allowed + 1e-9 and any(chosen):
            notes.append(
                f"the held-out drop is {drop.estimate:.4g}, but with {drop.confidence:.0%} confidence only "
                f"at most {drop.high:.4g}, above the allowed loss {hold_allowed:.4g}: the eval set cannot show "
                "the result is within the tolerance"
            )
    report = Report(
        tool_version=tool_version(),
        versions=_versions(),
        options=options.to_dict(),
        metric=metric.name,
        higher_is_better=metric.higher_is_better,
        output=output,
        samples={"search": len(search_idx), "holdout": len(hold_idx)},
        baseline=baseline,
        final=final,
        allowed_loss=allowed,
        status="pruned" if any(chosen) else "unchanged",
        total_params=inspection.total_params,
        prunable_params=params[0],
        nonzero_before=params[1],
        nonzero_after=params[2],
        bytes_before=bytes_before,
        bytes_after=pruned.ByteSize() if pruned_bytes is None else len(pruned_bytes),
        layers=layer_reports,
        skipped=skipped,
        trace=[
            CandidateRecord(
                t.index,
                t.phase,
                t.sparsity,
                t.nonzero,
                t.judgement.value,
                t.judgement.passed,
                t.judgement.complete,
                t.judgement.samples,
                t.judgement.seconds,
                t.judgement.cost,
            )
            for t in outcome.trials
        ],
        evaluations=len(outcome.trials),
        confirmations=confirmations,
        probes=outcome.probes,
        stopped_by=outcome.stopped_by,
        plan=plan.to_dict(),
        timings=timings,
        sensitivity=sensitivity,
        drop=drop,
        notes=notes,
    )
    emit(
        ProgressEvent(
            EventKind.DONE,
            f"done: sparsity {report.sparsity:.1%}, {metric.name} {final.search:.4f}",
            evaluation=len(outcome.trials),
            max_evaluations=options.max_evaluations,
            sparsity=report.sparsity,
            nonzero_params=report.nonzero_after,
            metric=final.search,
            passed=True,
        )
    )
    return PruneResult(pruned, plan, report, pruned_bytes)


def _with_sparse_initializers(data: bytes, names: list[str], notes: list[str]) -> bytes:
    """The model with zeroed weights as sparse_initializer, if it still passes the full checker."""
    candidate = onnx.ModelProto.FromString(data)
    converted = to_sparse_initializers(candidate, names)
    if not converted:
        notes.append("sparse_initializer not used: no pruned weight is sparse enough to get smaller")
        return data
    try:
        _check(candidate)
    except InvalidModelError:
        notes.append(
            "sparse_initializer not used: the ONNX checker's strict shape inference rejects sparse "
            "tensors as inputs of the pruned ops, and every model we return must pass it"
        )
        return data
    notes.append(f"{len(converted)} weight(s) stored as sparse_initializer; onnxruntime densifies them at load")
    return candidate.SerializeToString()


def _confirm(
    passing: list[Trial],
    space: ZeroSpace | NMSpace,
    on_holdout: Callable[[Config], bool] | None,
    on_search: Callable[[Config], bool],
    notes: list[str],
) -> tuple[Config, int]:
    """The smallest search-passing config that also passes on the held-out split, and the held-out runs.

    Passing candidates are tried best first (at most ``FALLBACK_CANDIDATES``); when all
    of those miss, the smallest of the others that passes is found by bisecting their
    list (held-out losses grow with sparsity), the unpruned model when none does. When
    the smallest missed on the held-out split, the search overfitted its split a
    little: rather than stop at the fallback, bisect the line from it to that smallest
    candidate, every point passing on both splits (``on_search`` judges and records the point).
    """
    if not passing:
        notes.append("no candidate passed the tolerance on the search split; the model is returned unchanged")
        return space.empty(), 0
    if on_holdout is None:
        notes.append("no held-out split (holdout_fraction 0): the result is not confirmed on unseen data")
        return passing[0].config, 0
    runs = 0
    chosen = space.empty()
    for trial in passing[:FALLBACK_CANDIDATES]:
        runs += 1
        if on_holdout(trial.config):
            chosen = trial.config
            break
    else:
        rest = passing[FALLBACK_CANDIDATES:]
        below, above = 0, len(rest)  # the smallest passing one lies in rest[below:above], if any
        while below < above:
            middle = (below + above) // 2
            runs += 1
            if on_holdout(rest[middle].config):
                chosen, above = rest[middle].config, middle
            else:
                below = middle + 1
    smallest = passing[0].config
    if chosen == smallest:
        return chosen, runs
    start, goal, lo, hi = chosen, space.shares(smallest), 0.0, 1.0
    for _ in range(FALLBACK_STEPS):
        mid = (lo + hi) / 2
        config = space.blend(start, goal, mid)
        if config == smallest:
            hi = mid
            continue
        if space.nonzero(config) >= space.nonzero(chosen):
            lo = mid
            continue
        passed = on_search(config)
        if passed:
            runs += 1
            passed = on_holdout(config)
        if passed:
            chosen, lo = config, mid
        else:
            hi = mid
    if any(chosen):
        notes.append(
            f"the smallest search candidate (sparsity {passing[0].sparsity:.1%}) missed the tolerance on the "
            f"held-out split; fell back to sparsity {space.sparsity(chosen):.1%}, which passes both"
        )
    else:
        notes.append("no candidate passed on the held-out split; the model is returned unchanged")
    return chosen, runs


def _confirm_in_order(
    passing: list[Trial],
    space: ZeroSpace | NMSpace,
    on_holdout: Callable[[Config], bool],
    notes: list[str],
) -> tuple[Config, int]:
    """The first of the passing candidates, best first (at most ``MAX_COMPARISONS``), that the
    held-out rule accepts, and the held-out runs.

    The list and its order are fixed by the search split alone before the held-out split is read,
    so the candidates the rule could return are exactly these: the report's interval is corrected
    for that many (no bisection, no new points whose choice would depend on held-out outcomes).
    """
    if not passing:
        notes.append("no candidate passed the tolerance on the search split; the model is returned unchanged")
        return space.empty(), 0
    runs = 0
    for trial in passing[:MAX_COMPARISONS]:
        runs += 1
        if on_holdout(trial.config):
            if trial is not passing[0]:
                notes.append(
                    f"the smallest search candidate (sparsity {passing[0].sparsity:.1%}) failed the held-out rule; "
                    f"returned sparsity {trial.sparsity:.1%}, the first of the others it accepts"
                )
            return trial.config, runs
    notes.append("no candidate passed the held-out rule; the model is returned unchanged")
    return space.empty(), runs


MAX_COMPARISONS = 30
"""Passing candidates, best first, the interval and bound rules try on the held-out split."""


def _small_set_warnings(original: np.ndarray, allowed: float, confidence: float) -> list[str]:
    """Plain warnings when the held-out split is too small for the tolerance asked."""
    n = len(original)
    out = []
    binary = bool(np.isin(original, (0.0, 1.0)).all())
    if binary and 1.0 / n > allowed + 1e-12:
        out.append(
            f"warning: one held-out sample is worth {1.0 / n:.3g} of the metric, more than the allowed loss "
            f"{allowed:.3g}: the held-out split ({n} samples) is too small for this tolerance"
        )
    if binary:
        width = zero_drop_half_width(n, confidence)
        if width > allowed + 1e-12:
            needed = zero_drop_samples(allowed, confidence)
            more = f"; about {needed} held-out samples would" if needed else ""
            out.append(
                f"warning: even a candidate that changes no held-out sample has a {confidence:.0%} upper bound of "
                f"{width:.3g} on its drop, above the allowed loss {allowed:.3g}: {n} held-out samples cannot show "
                f"a drop within the tolerance{more}"
            )
    return out


FALLBACK_STEPS = 3
"""Bisection steps between the held-out fallback and the smallest search candidate."""
FALLBACK_CANDIDATES = 3
"""Passing candidates tried on the held-out split, best first, before bisecting the others."""


LATENCY_RUNS = 15


def _latency(evaluator: Evaluator, runner: Runner, rows: np.ndarray) -> float:
    """Median seconds of one batch through ``runner`` (after one warm-up run)."""
    evaluator.run(runner, rows)
    times = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        evaluator.run(runner, rows)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


class _FinalCheck:
    """Validates the model we return and measures it with a fresh session from its serialized form."""

    def __init__(
        self,
        io_names: tuple[list[str], list[str]],
        specs: list[InputSpec],
        output: str,
        metric: Metric,
        data: EvalSet,
        reference: np.ndarray,
        search_idx: np.ndarray,
        hold_idx: np.ndarray,
        options: PruneOptions,
        stop: threading.Event | None = None,
    ) -> None:
        self.io_names = io_names
        self.stop = stop
        self.evaluator = Evaluator(
            None,
            specs,
            output,
            metric,
            data,
            batch_size=options.batch_size,
            stop=stop,
            input_axes=options.input_sample_axes,
            output_axis=options.output_sample_axis,
        )
        self.evaluator.reference = reference
        self.search_idx, self.hold_idx = search_idx, hold_idx
        self.threads = options.threads
        self.hold_scores: np.ndarray | None = None
        """Per-sample scores of the last measured model on the held-out split."""

    def __call__(
        self, built: onnx.ModelProto | bytes, sparse: list[str], notes: list[str]
    ) -> tuple[onnx.ModelProto, bytes | None, SplitMetric]:
        """Check and measure ``built`` (bytes, or a ModelProto when over 2 GB); returns
        the model, its bytes and its metric. Peak memory: about three copies of the model."""
        if isinstance(built, onnx.ModelProto):
            with session_source(built) as path:
                assert isinstance(path, str)
                self._validate(built, Path(path))
                final = self._measure(make_session(path, threads=self.threads))
            return built, None, final
        data = built
        if sparse:
            data = _with_sparse_initializers(data, sparse, notes)
            check_stop(self.stop)
        try:
            onnx.checker.check_model(data, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise InternalError(f"the pruned model fails the checker ({e})") from e
        check_stop(self.stop)
        final = self._measure(make_session(data, threads=self.threads))
        model = onnx.ModelProto.FromString(data)
        self._validate(model, None)
        return model, data, final

    def _validate(self, model: onnx.ModelProto, path: Path | None) -> None:
        if path is not None:
            try:
                _check(model, path)
            except InvalidModelError as e:  # a bug of ours; never hand such a model out
                raise InternalError(f"the pruned model fails the checker ({e})") from e
        names = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
        if names != self.io_names:
            raise InternalError("the pruned model's inputs or outputs changed")

    def _measure(self, session: ort.InferenceSession) -> SplitMetric:
        runner = session_runner(session, self.evaluator.output)
        search_value = self.evaluator.evaluate(self.search_idx, runner=runner).value
        if not len(self.hold_idx):
            return SplitMetric(search_value, None)
        evaluator, idx = self.evaluator, self.hold_idx
        labels = None if evaluator.evalset.labels is None else evaluator.evalset.labels[idx]
        assert evaluator.reference is not None
        self.hold_scores = evaluator.metric.per_sample(evaluator.outputs(runner, idx), labels, evaluator.reference[idx])
        return SplitMetric(search_value, float(self.hold_scores.mean()))
