"""Cancellation reaches every long loop: a stop set inside a phase ends it before its next step.

Each test sets the stop from inside one phase (after the k-th call of one of its steps) and
asserts that the run raises ``CancelledError`` and that no step of the phase ran once the
stop was set: a loop that ignored the stop would run its remaining steps first.
"""

from __future__ import annotations

import gc
import os
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pruner
from pruner import Allocation, Mode, PruneOptions, Recovery, Tolerance, _candidates, _evaluate, _recover, _remove

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CNN = FIXTURES / "cnn.onnx"


def cnn_data() -> pruner.EvalSet:
    return pruner.load_eval_set(FIXTURES / "cnn_eval.npz")


class FlipStop(threading.Event):
    """A stop whose ``is_set`` turns True from its ``after``-th poll on; counts the polls."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after, self.polls = after, 0

    def is_set(self) -> bool:
        self.polls += 1
        return self.polls >= self.after or super().is_set()


def watch(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, stop: threading.Event, *, set_after: int | None = None
) -> list[bool]:
    """Wrap ``owner.name`` (the real one still runs): returns, per call, whether the stop was
    already set when it was called; with ``set_after``, the stop is set when that call returns."""
    real: Callable[..., Any] = getattr(owner, name)
    calls: list[bool] = []
    lock = threading.Lock()

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with lock:  # calls may come from several threads (calibration's layers): number them as they come
            calls.append(stop.is_set())
            k = len(calls)
        out = real(*args, **kwargs)
        if k == set_after:
            stop.set()
        return out

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def cancelled(options: PruneOptions, stop: threading.Event, **kwargs: Any) -> None:
    with pytest.raises(pruner.CancelledError):
        pruner.prune(CNN, cnn_data(), options, stop=stop, **kwargs)


def test_calibration_stops_between_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    stop = threading.Event()
    calls = watch(monkeypatch, _recover.LayerStats, "add", stop, set_after=1)
    cancelled(PruneOptions(recover=Recovery.LSQ), stop)
    # the layers run on the run's threads (one a core): the others may have done other layers while
    # the first was running, and each may finish the one it checked the stop for just before it was
    # set; none goes on to a further one
    threads = min(os.cpu_count() or 1, _recover.STATS_THREADS)
    assert calls[0] is False and calls.count(True) <= threads - 1


@pytest.mark.parametrize("recover", [Recovery.LSQ, Recovery.BIAS])
def test_the_per_layer_fits_of_a_candidate_stop(monkeypatch: pytest.MonkeyPatch, recover: Recovery) -> None:
    stop = threading.Event()
    calls = watch(monkeypatch, _recover.Calibration, "recover", stop, set_after=1)
    cancelled(PruneOptions(recover=recover, target_sparsity=0.5), stop)
    # a candidate's layers are fit on the run's threads (one a core): the others may have started
    # theirs while the first was running; none starts once the stop is set
    assert calls[0] is False and True not in calls


def test_conjugate_gradients_stop_between_steps() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 32)) @ rng.standard_normal((32, 32))
    hessian = (x.T @ x / len(x) + 0.01 * np.eye(32))[None]
    rows = rng.standard_normal((1, 16, 32))
    pruned = rng.random(rows.shape) < 0.5
    linear = rows @ hessian
    rows[pruned] = 0.0  # the fit starts from the masked weights: many steps to go
    stop = FlipStop(after=3)
    with pytest.raises(pruner.CancelledError):
        _recover._least_squares(rows, linear, pruned, hessian, stop)
    assert stop.polls == 3
    assert _recover._least_squares(rows, linear, pruned, hessian).shape == rows.shape  # runs uncancelled


@pytest.mark.parametrize("solver", ["_solve_shared", "_solve_rows"])
def test_exact_solvers_stop_between_blocks(monkeypatch: pytest.MonkeyPatch, solver: str) -> None:
    monkeypatch.setattr(_recover, "ROW_BLOCK_BYTES", 1)  # one row a block
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 12))
    hessian = x.T @ x / len(x) + 0.01 * np.eye(12)
    pruned = rng.random((8, 12)) < 0.5  # rows with different masks
    linear = rng.standard_normal((8, 12))
    stop = FlipStop(after=2)
    with pytest.raises(pruner.CancelledError):
        if solver == "_solve_shared":
            monkeypatch.setattr(_recover, "DIRECT_STEPS", 10**6)
            _recover._solve_shared(linear, pruned, hessian, np.zeros((8, 12)), stop)
        else:
            _recover._solve_rows(linear[None], pruned[None], hessian[None], np.zeros((1, 8, 12)), stop)
    assert stop.polls == 2


@pytest.mark.parametrize("mode", [Mode.ZERO, Mode.REMOVE])
def test_the_sequential_refit_walk_stops_between_groups(monkeypatch: pytest.MonkeyPatch, mode: Mode) -> None:
    stop = threading.Event()
    fits = watch(monkeypatch, _recover.SequentialRefit, "_fit", stop, set_after=1)
    runs = watch(monkeypatch, _recover._Walk, "_run", stop)
    cancelled(PruneOptions(mode=mode, recover=Recovery.SEQUENTIAL, target_sparsity=0.3), stop)
    assert fits == [False]
    assert True not in runs


def test_a_stop_within_one_sequential_fit_ends_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set after the first calibration batch of a drifted group's statistics: its fit never runs."""
    stop = threading.Event()
    grams = watch(monkeypatch, _recover, "_gram_pair", stop)
    fits = watch(monkeypatch, _recover, "_fit_rows", stop)
    walk = watch(monkeypatch, _recover._Walk, "inputs", stop, set_after=1)
    options = PruneOptions(recover=Recovery.SEQUENTIAL, target_sparsity=0.3, batch_size=16)
    cancelled(options, stop)
    assert walk == [False]
    assert True not in grams and True not in fits


@pytest.mark.parametrize("mode", [Mode.ZERO, Mode.NM])
def test_label_free_probes_stop_before_the_next_candidate_is_built(monkeypatch: pytest.MonkeyPatch, mode: Mode) -> None:
    """Sensitivity profiles (zero mode) and the N:M ranking: one probe each per layer."""
    stop = threading.Event()
    watch(monkeypatch, _evaluate.Evaluator, "deviation", stop, set_after=1)
    built = watch(monkeypatch, _candidates.WeightCandidates, "weights", stop)
    allocation = Allocation.SENSITIVITY if mode is Mode.ZERO else Allocation.NORMALIZED
    cancelled(PruneOptions(mode=mode, allocation=allocation, recover=Recovery.LSQ), stop)
    assert True not in built


def test_the_removal_self_check_stops_before_its_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    stop = threading.Event()
    watch(monkeypatch, _remove.Remover, "trial", stop, set_after=1)
    sessions = watch(monkeypatch, _candidates, "make_session", stop)
    cancelled(PruneOptions(mode=Mode.REMOVE, recover=Recovery.NONE), stop)
    assert True not in sessions


def test_removal_candidates_stop_between_refit_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    stop = threading.Event()
    calls = watch(monkeypatch, _recover.Calibration, "recover", stop, set_after=1)
    cancelled(PruneOptions(mode=Mode.REMOVE, recover=Recovery.LSQ, target_sparsity=0.5), stop)
    assert calls == [False]


def test_a_stop_during_confirmation_ends_the_run_before_the_final_model(monkeypatch: pytest.MonkeyPatch) -> None:
    stop = threading.Event()
    built = watch(monkeypatch, _candidates.WeightCandidates, "build", stop)

    def on_progress(event: pruner.ProgressEvent) -> None:
        if event.kind is pruner.EventKind.CONFIRM:
            stop.set()

    cancelled(PruneOptions(tolerance=Tolerance(0.05), max_evaluations=4), stop, on_progress=on_progress)
    assert built == []


def test_a_stop_inside_the_final_check_ends_it(monkeypatch: pytest.MonkeyPatch) -> None:
    stop = threading.Event()
    watch(monkeypatch, _candidates.WeightCandidates, "build", stop, set_after=1)
    cancelled(PruneOptions(tolerance=Tolerance(0.05), max_evaluations=4), stop)


def test_nothing_keeps_the_run_alive_after_a_cancel() -> None:
    """No module-level cache holds the eval set (or the arrays derived from it) once the error is gone."""
    data = cnn_data()
    alive = [weakref.ref(data), weakref.ref(data.inputs["input"])]
    stop = threading.Event()

    def on_progress(event: pruner.ProgressEvent) -> None:
        if event.kind is pruner.EventKind.CANDIDATE:
            stop.set()

    options = PruneOptions(recover=Recovery.SEQUENTIAL, max_evaluations=6)
    with pytest.raises(pruner.CancelledError):
        pruner.prune(CNN, data, options, on_progress=on_progress, stop=stop)
    del data, on_progress
    gc.collect()
    assert [ref() for ref in alive] == [None, None]
