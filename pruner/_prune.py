"""The pruning run: load, validate, measure the baseline, search, confirm, write."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import onnx

from ._analysis import Inspection, analyze
from ._blas import one_blas_thread
from ._candidates import CandidatePool, make_candidates
from ._confirm import confirm
from ._executor import make_executor
from ._model import save_model
from ._options import Mode, PruneOptions
from ._phases import (
    EvalSource,
    FinalCheck,
    ModelSource,
    Progress,
    held_out_split,
    load,
    load_source,
    make_report,
    measure_baseline,
    process_memory,
    release_freed_memory,
    run_search,
    write,
)
from ._phases import tool_version as tool_version
from ._plan import PruningPlan, replayable
from ._report import ProgressEvent, Report
from ._space import Config

__all__ = ["PruneResult", "inspect", "prune"]

logger = logging.getLogger(__name__)


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


def inspect(source: ModelSource, *, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> Inspection:
    """The prunable layers of a model, and what is skipped and why."""
    return analyze(load_source(source), include=include, exclude=exclude)


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
    with one_blas_thread():  # the whole run: its bits the same whatever else the process runs
        return _prune(model, evalset, options, on_progress, stop)


def _prune(
    model: ModelSource,
    evalset: EvalSource,
    options: PruneOptions | None,
    on_progress: Callable[[ProgressEvent], None] | None,
    stop: threading.Event | None,
) -> PruneResult:
    start = time.perf_counter()
    options = options or PruneOptions()
    # the executor runs the evaluations, calibration and probes: here, or on a Ray cluster, whose
    # workers start while the model and the eval set load
    with make_executor(options) as executor:
        loaded, owned = load(model, evalset, options, stop)
        loaded.batches.executor = executor
        _phase_done("load")
        options = loaded.options
        progress = Progress(on_progress, loaded.metric.name, options.max_evaluations)
        baseline = measure_baseline(owned, loaded, options.tolerance, options.threads)
        _phase_done("baseline")
        progress.baseline(baseline.metric.search)
        candidates = make_candidates(
            owned, loaded.inspection, loaded.search_idx, baseline.evaluator, options, criteria=loaded.criteria
        )
        del owned  # taken apart by the candidates: its memory goes with it
        _phase_done("candidates")
        pool = candidates.pool
        searched = run_search(pool, loaded, baseline, progress.trial)
        _phase_done("search")
        held_out = held_out_split(loaded, baseline)
        confirmed = confirm(searched.outcome, pool.space, pool.runner, held_out, searched.judge, progress.trial)
        _phase_done("confirm")
        chosen = confirmed.chosen
        progress.confirmed(pool.space.sparsity(chosen), pool.space.nonzero(chosen), len(loaded.hold_idx))
        check = FinalCheck(baseline.evaluator, loaded.io_names, loaded.search_idx, loaded.hold_idx, options.threads)
        written = write(model, pool, chosen, check, held_out, confirmed.comparisons, sparse=options.sparse_initializers)
        _phase_done("write")
        plan = replayable(
            _plan(options, pool, written.chosen), model, written.checked.model, pool.written(written.chosen)
        )
        total = time.perf_counter() - start
        report = make_report(loaded, baseline, candidates, searched, held_out, confirmed, written, plan, total)
        _phase_done("report")
        progress.done(report)
        return PruneResult(written.checked.model, plan, report, written.checked.model_bytes)


def _phase_done(name: str) -> None:
    """Hand back what the phase freed, and a DEBUG line with the process's memory (``bench/memory.py``
    reads these lines to attribute the peak to a phase)."""
    release_freed_memory()
    if logger.isEnabledFor(logging.DEBUG):
        rss, peak = process_memory()
        logger.debug(
            "phase %s done: RSS %.0f MiB, peak %.0f MiB", name, rss / 2**20, peak / 2**20, extra={"phase": name}
        )


def _plan(options: PruneOptions, pool: CandidatePool, chosen: Config) -> PruningPlan:
    """The plan of the written model (every layer at amount 0 when the original is returned)."""
    return PruningPlan(
        options.mode,
        pool.options.criterion,  # the one the candidates' probes chose, where they chose
        pool.plan_layers(chosen),
        options.nm if options.mode is Mode.NM else None,
        options.recover,
        pool.static_reshapes,
    )
