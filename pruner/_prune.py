"""The pruning run: load, validate, measure the baseline, search, confirm, write."""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from ._analysis import Inspection, analyze
from ._errors import InvalidConfigError, InvalidEvalSetError, InvalidModelError, UnsupportedModelError
from ._evalset import EvalSet, load_eval_set, model_inputs, validate_eval_set
from ._evaluate import CandidateModels, Evaluator, make_session
from ._graph import GraphIndex
from ._metrics import Metric
from ._model import _check, load_model, save_model, session_source
from ._options import PruneOptions
from ._plan import LayerPlan, PruningPlan, apply_plan, zeroed_copy
from ._report import CandidateRecord, EventKind, LayerReport, ProgressEvent, Report, SplitMetric
from ._score import granularity, prune_order, unit_scores
from ._search import Judgement, Trial, search
from ._space import Config, LayerUnits, ZeroSpace, build_units
from ._sparse import to_sparse_initializers

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

    def save(self, path: str | os.PathLike[str], report_path: str | os.PathLike[str] | None = None) -> None:
        """Write the model (with external data when over 2 GB) and optionally the JSON report.

        All or nothing: if any file cannot be written, none is.
        """
        companions = [] if report_path is None else [(report_path, self.report.to_json().encode())]
        save_model(self.model, path, companions=companions)


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


def _constants_to_initializers(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy where the Constant nodes producing ``names`` are initializers (so they can be swapped)."""
    if not names:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = []
    for node in out.graph.node:
        if node.op_type == "Constant" and node.output[0] in names:
            tensor = next(a.t for a in node.attribute if a.name == "value")
            tensor.name = node.output[0]
            out.graph.initializer.append(tensor)
        else:
            keep.append(node)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return out


def _output_shape(model: onnx.ModelProto, name: str) -> tuple[int | None, ...]:
    for value in model.graph.output:
        if value.name == name:
            dims = value.type.tensor_type.shape.dim
            return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return ()


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
        evalset: an ``.npz`` path or bytes, or an :class:`EvalSet`.
        options: the run's options; defaults when None.
        on_progress: called with a :class:`ProgressEvent` as the run goes on.
        stop: set it to cancel; the run raises :class:`CancelledError` within one batch.

    Returns:
        The pruned model (the original, unchanged, when nothing passes), its plan and report.

    Raises:
        InvalidModelError, InvalidEvalSetError, InvalidConfigError: bad input.
        UnsupportedModelError: onnxruntime cannot run the model.
        CancelledError: ``stop`` was set.
    """
    options = options or PruneOptions()
    emit = on_progress or (lambda event: None)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    original = _load(model)
    data = evalset if isinstance(evalset, EvalSet) else load_eval_set(evalset)
    specs = model_inputs(original)
    validate_eval_set(data, specs)
    outputs = [o.name for o in original.graph.output]
    output = options.output or outputs[0]
    if output not in outputs:
        raise InvalidConfigError(f"output {output!r} is not a model output; outputs: {', '.join(outputs)}")
    metric = Metric(options.metric, options.top_k)
    metric.check_labels(data.labels, _output_shape(original, output))
    search_idx, hold_idx = _split(len(data), options.holdout_fraction, options.seed)
    inspection = analyze(original, include=options.include, exclude=options.exclude)
    notes: list[str] = []
    if original.ir_version < 4:
        constant_layers = {la.name for la in inspection.layers if la.from_constant}
        if constant_layers:
            notes.append("Constant-node weights are left alone in models of IR version < 4")
            inspection = Inspection(
                tuple(la for la in inspection.layers if not la.from_constant),
                inspection.skipped,
                inspection.total_params,
            )
    working = _constants_to_initializers(original, {la.name for la in inspection.layers if la.from_constant})
    timings["load"] = time.perf_counter() - t_start

    models = CandidateModels(working, {la.name for la in inspection.layers}, threads=options.threads)
    evaluator = Evaluator(models, specs, output, metric, data, batch_size=options.batch_size, stop=stop)
    t0 = time.perf_counter()
    reference = evaluator.outputs(evaluator.session(), np.arange(len(data)))
    evaluator.reference = reference

    def measure(idx: np.ndarray, out: np.ndarray) -> float:
        labels = None if data.labels is None else data.labels[idx]
        return float(metric.per_sample(out[idx], labels, reference[idx]).mean()) if len(idx) else float("nan")

    baseline = SplitMetric(measure(search_idx, reference), measure(hold_idx, reference) if len(hold_idx) else None)
    timings["baseline"] = time.perf_counter() - t0
    for name, value in (("search", baseline.search), ("holdout", baseline.holdout)):
        if value is not None and not np.isfinite(value):
            raise UnsupportedModelError(f"the unpruned model's metric on the {name} split is not finite")
    allowed = options.tolerance.allowed_loss(baseline.search)
    bound = metric.passing_bound(baseline.search, allowed)
    emit(
        ProgressEvent(EventKind.BASELINE, f"baseline {metric.kind.value} {baseline.search:.4f}", metric=baseline.search)
    )

    t0 = time.perf_counter()
    index = GraphIndex.build(working.graph)
    gran = granularity(options.criterion)
    weights: dict[str, np.ndarray] = {}
    units: list[LayerUnits] = []
    for layer in inspection.layers:
        tensor = index.initializers[layer.name]
        weight = numpy_helper.to_array(tensor)
        weights[layer.name] = weight
        scores = unit_scores(options.criterion, layer, weight)
        order = prune_order(scores)
        units.append(build_units(layer, weight, scores, order, gran, options.allocation, options.layer_cap))
    space = ZeroSpace(units, options.allocation)
    timings["scoring"] = time.perf_counter() - t0

    def overrides(config: Config) -> dict[str, np.ndarray]:
        return {
            u.layer.name: zeroed_copy(weights[u.layer.name], u.order, amount, gran, u.layer.channel_axis)
            for u, amount in zip(units, config, strict=True)
            if amount
        }

    def judge(config: Config) -> Judgement:
        result = evaluator.evaluate(search_idx, overrides=overrides(config), bound=bound)
        passed = result.complete and metric.loss(baseline.search, result.value) <= allowed + 1e-9
        return Judgement(passed, result.value, result.complete, result.samples, result.seconds)

    probe_idx = search_idx[:PROBE_SAMPLES]

    def probe(config: Config) -> float:
        return evaluator.deviation(probe_idx, overrides(config))

    def on_trial(trial: Trial, better: bool) -> None:
        j = trial.judgement
        emit(
            ProgressEvent(
                EventKind.CANDIDATE,
                f"{trial.phase.value} sparsity {trial.sparsity:.1%}: {metric.kind.value} "
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
            probe,
            max_evaluations=options.max_evaluations,
            max_seconds=options.max_seconds,
            resolution=options.resolution,
            on_trial=on_trial,
        )
    else:
        notes.append("no prunable weights: the model is returned unchanged")
        outcome = search(space, judge, None, max_evaluations=0)
    timings["search"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    chosen, confirmations = _confirm(
        outcome.passing(), space, evaluator, hold_idx, baseline, metric, options, overrides, notes
    )
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
        tuple(
            LayerPlan(u.layer.name, amount, u.units, u.layer.channel_axis)
            for u, amount in zip(units, chosen, strict=True)
        ),
    )
    pruned = apply_plan(plan, working, orders={u.layer.name: u.order for u in units}) if any(chosen) else working
    if options.sparse_initializers and any(chosen):
        pruned = _with_sparse_initializers(
            pruned, [u.layer.name for u, a in zip(units, chosen, strict=True) if a], notes
        )
    final = _final_metric(pruned, original, specs, output, metric, data, reference, search_idx, hold_idx, options)
    if (
        final.holdout is not None
        and metric.loss(baseline.holdout or 0.0, final.holdout)
        > options.tolerance.allowed_loss(baseline.holdout or 0.0) + 1e-9
        and any(chosen)
    ):
        # cannot happen unless onnxruntime is nondeterministic; never hand out a model that misses
        notes.append("the written model missed the tolerance on the held-out split; returning the original")
        chosen = space.empty()
        plan = PruningPlan(
            options.mode, options.criterion, tuple(LayerPlan(p.tensor, 0, p.units, p.channel_axis) for p in plan.layers)
        )
        pruned = working
        final = _final_metric(pruned, original, specs, output, metric, data, reference, search_idx, hold_idx, options)
    timings["write"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    layer_reports = [
        LayerReport(
            u.layer.name,
            u.layer.op_type,
            u.layer.shape,
            u.layer.params,
            space.layer_nonzero(i, 0),
            space.layer_nonzero(i, amount),
        )
        for i, (u, amount) in enumerate(zip(units, chosen, strict=True))
    ]
    report = Report(
        tool_version=tool_version(),
        versions=_versions(),
        options=options.to_dict(),
        metric=metric.kind.value,
        higher_is_better=metric.higher_is_better,
        output=output,
        samples={"search": len(search_idx), "holdout": len(hold_idx)},
        baseline=baseline,
        final=final,
        allowed_loss=allowed,
        status="pruned" if any(chosen) else "unchanged",
        total_params=inspection.total_params,
        prunable_params=space.total_params,
        nonzero_before=space.nonzero(space.empty()),
        nonzero_after=space.nonzero(chosen),
        bytes_before=original.ByteSize(),
        bytes_after=pruned.ByteSize(),
        layers=layer_reports,
        skipped=[{"name": s.name, "op_type": s.op_type, "reason": s.reason} for s in inspection.skipped],
        trace=[
            CandidateRecord(
                t.index,
                t.phase.value,
                t.sparsity,
                t.nonzero,
                t.judgement.value,
                t.judgement.passed,
                t.judgement.complete,
                t.judgement.samples,
                t.judgement.seconds,
            )
            for t in outcome.trials
        ],
        evaluations=len(outcome.trials),
        confirmations=confirmations,
        probes=outcome.probes,
        stopped_by=outcome.stopped_by,
        plan=plan.to_dict(),
        timings=timings,
        notes=notes,
    )
    emit(
        ProgressEvent(
            EventKind.DONE,
            f"done: sparsity {report.sparsity:.1%}, {metric.kind.value} {final.search:.4f}",
            evaluation=len(outcome.trials),
            max_evaluations=options.max_evaluations,
            sparsity=report.sparsity,
            nonzero_params=report.nonzero_after,
            metric=final.search,
            passed=True,
        )
    )
    return PruneResult(pruned, plan, report)


def _with_sparse_initializers(model: onnx.ModelProto, names: list[str], notes: list[str]) -> onnx.ModelProto:
    """The model with zeroed weights as sparse_initializer, if it still passes the full checker."""
    candidate = onnx.ModelProto()
    candidate.CopyFrom(model)
    converted = to_sparse_initializers(candidate, names)
    if not converted:
        notes.append("sparse_initializer not used: no pruned weight is sparse enough to get smaller")
        return model
    try:
        _check(candidate)
    except InvalidModelError:
        notes.append(
            "sparse_initializer not used: the ONNX checker's strict shape inference rejects sparse "
            "tensors as inputs of the pruned ops, and every model we return must pass it"
        )
        return model
    notes.append(f"{len(converted)} weight(s) stored as sparse_initializer; onnxruntime densifies them at load")
    return candidate


def _confirm(
    passing: list[Trial],
    space: ZeroSpace,
    evaluator: Evaluator,
    hold_idx: np.ndarray,
    baseline: SplitMetric,
    metric: Metric,
    options: PruneOptions,
    overrides: Callable[[Config], dict[str, np.ndarray]],
    notes: list[str],
) -> tuple[Config, int]:
    """The smallest search-passing config that also passes on the held-out split."""
    if not passing:
        notes.append("no candidate passed the tolerance on the search split; the model is returned unchanged")
        return space.empty(), 0
    if baseline.holdout is None:
        notes.append("no held-out split (holdout_fraction 0): the result is not confirmed on unseen data")
        return passing[0].config, 0
    allowed = options.tolerance.allowed_loss(baseline.holdout)
    bound = metric.passing_bound(baseline.holdout, allowed)
    for count, trial in enumerate(passing, start=1):
        result = evaluator.evaluate(hold_idx, overrides=overrides(trial.config), bound=bound)
        if result.complete and metric.loss(baseline.holdout, result.value) <= allowed + 1e-9:
            if count > 1:
                notes.append(
                    f"the smallest search candidate (sparsity {passing[0].sparsity:.1%}) missed the tolerance on "
                    f"the held-out split; fell back to sparsity {trial.sparsity:.1%}, which passes both"
                )
            return trial.config, count
    notes.append("no search candidate passed on the held-out split; the model is returned unchanged")
    return space.empty(), len(passing)


def _final_metric(
    pruned: onnx.ModelProto,
    original: onnx.ModelProto,
    specs: list,  # type: ignore[type-arg]
    output: str,
    metric: Metric,
    data: EvalSet,
    reference: np.ndarray,
    search_idx: np.ndarray,
    hold_idx: np.ndarray,
    options: PruneOptions,
) -> SplitMetric:
    """Validate the written model and measure it with a fresh session from its serialized form."""
    try:
        _check(pruned)
    except InvalidModelError as e:  # a bug of ours; never hand such a model out
        raise UnsupportedModelError(f"internal error: the pruned model fails the checker ({e})") from e
    if [i.name for i in pruned.graph.input] != [i.name for i in original.graph.input] or [
        o.name for o in pruned.graph.output
    ] != [o.name for o in original.graph.output]:
        raise UnsupportedModelError("internal error: the pruned model's inputs or outputs changed")
    with session_source(pruned) as source:
        session = make_session(source, threads=options.threads)
    evaluator = Evaluator(None, specs, output, metric, data, batch_size=options.batch_size)
    evaluator.reference = reference
    search_value = evaluator.evaluate(search_idx, session=session).value
    hold_value = evaluator.evaluate(hold_idx, session=session).value if len(hold_idx) else None
    return SplitMetric(search_value, hold_value)
