"""The phases of a run, called one by one, and what a run with nothing to prune says."""

from __future__ import annotations

import logging
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import pruner
from pruner import Allocation, Criterion, EvalSet, MetricKind, Mode, PruneOptions, Recovery, Tolerance
from pruner._candidates import NOTHING_PRUNABLE, NoCandidates, WeightCandidates, make_candidates
from pruner._confirm import UNCONFIRMED, confirm
from pruner._evaluate import Batches, Runner
from pruner._phases import (
    FinalCheck,
    _inspect,
    load,
    measure_baseline,
    process_memory,
    release_freed_memory,
    run_search,
    write,
)
from pruner._search import Trial
from tests.helpers import tiny_mlp, tiny_mlp_evalset


def weightless() -> onnx.ModelProto:
    """x [N, 4] -> Relu -> Softmax -> y: no weight at all."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Softmax", ["h"], ["y"], axis=-1)],
        "weightless",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def weightless_data(labels: bool = False) -> EvalSet:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 4)).astype(np.float32)
    return EvalSet({"x": x}, rng.integers(0, 4, 40).astype(np.int64) if labels else None)


def mlp_data() -> EvalSet:
    arrays = tiny_mlp_evalset(40)
    return EvalSet({"x": arrays["x"]}, arrays["labels"])


@pytest.mark.parametrize(
    "options",
    [
        PruneOptions(metric=MetricKind.AGREEMENT),
        PruneOptions(metric=MetricKind.AGREEMENT, mode=Mode.REMOVE, recover=Recovery.LSQ),
        PruneOptions(metric=MetricKind.AGREEMENT, mode=Mode.NM),
        PruneOptions(metric=MetricKind.COSINE, criterion=Criterion.ACTIVATION, allocation=Allocation.SENSITIVITY),
        PruneOptions(metric=MetricKind.AGREEMENT, recover=Recovery.SEQUENTIAL, holdout_fraction=0.0),
        PruneOptions(metric=MetricKind.ACCURACY, acceptance=pruner.AcceptanceRule.BOUND),
    ],
    ids=["zero", "remove-lsq", "nm", "activation-sensitivity", "sequential-no-holdout", "accuracy-bound"],
)
def test_a_model_with_nothing_prunable_says_one_thing(options: PruneOptions) -> None:
    model = weightless()
    result = pruner.prune(model, weightless_data(labels=options.metric is MetricKind.ACCURACY), options)
    report = result.report
    assert report.notes == ["no prunable weights: the model is returned unchanged"]
    assert report.status == "unchanged" and report.evaluations == 0 and report.confirmations == 0
    assert report.probes == 0 and report.sensitivity == {}
    # nothing was calibrated or scored, so no such timing is reported
    assert set(report.timings) == {"load", "baseline", "profiles", "search", "confirm", "write", "total"}
    assert result.model.SerializeToString() == model.SerializeToString()


def test_load_returns_the_settings_and_a_model_of_its_own() -> None:
    model = tiny_mlp()
    data = mlp_data()
    loaded, owned = load(model, data, PruneOptions(), None)
    assert owned is not model
    assert [la.name for la in loaded.inspection.layers] == ["w1", "w2"]
    assert len(loaded.search_idx) + len(loaded.hold_idx) == 40 and len(loaded.hold_idx) == 8
    assert not set(loaded.search_idx.tolist()) & set(loaded.hold_idx.tolist())
    assert loaded.io_names == (["x"], ["y"]) and loaded.notes == ()  # the candidates' probes choose and say so
    assert loaded.options.criterion is Criterion.ACTIVATION  # what runs first: scoring reads no auto
    assert loaded.criteria == (Criterion.ACTIVATION, Criterion.MAGNITUDE)
    assert loaded.batches.output == "y" and loaded.metric.name == "accuracy"


def test_load_turns_recovery_off_for_inputs_not_samples_first_and_says_so() -> None:
    model = tiny_mlp()
    data = mlp_data()
    loaded, _ = load(model, data, PruneOptions(input_sample_axes={"x": 0}), None)
    assert loaded.options.recover is Recovery.AUTO and loaded.notes == ()
    with pytest.raises(pruner.InvalidConfigError, match="input_sample_axes puts the samples of 'x' on axis 2"):
        load(model, data, PruneOptions(input_sample_axes={"x": 2}), None)


def test_baseline_builds_one_complete_evaluator_the_final_check_shares() -> None:
    data = mlp_data()
    loaded, owned = load(tiny_mlp(), data, PruneOptions(metric=MetricKind.AGREEMENT), None)
    baseline = measure_baseline(owned, loaded, Tolerance(0.05), 1)
    evaluator = baseline.evaluator
    # agreement reads the argmax ids: one int8 per sample, and the whole output of the probe rows
    assert evaluator.reference.shape == (40,) and evaluator.reference.dtype == np.int8
    assert evaluator.full_reference(loaded.search_idx).shape == (len(loaded.search_idx), 4)
    assert baseline.metric.search == 1.0 and baseline.metric.holdout == 1.0  # agreement with itself
    assert baseline.allowed == pytest.approx(0.05) and baseline.bound == pytest.approx(0.95)
    check = FinalCheck(evaluator, loaded.io_names, loaded.search_idx, loaded.hold_idx, 1)
    assert check.evaluator is evaluator


def test_candidates_return_their_notes_and_timings() -> None:
    data = mlp_data()
    options = PruneOptions(recover=Recovery.LSQ)
    loaded, owned = load(tiny_mlp(), data, options, None)
    baseline = measure_baseline(owned, loaded, options.tolerance, 1)
    candidates = make_candidates(owned, loaded.inspection, loaded.search_idx, baseline.evaluator, options)
    assert isinstance(candidates.pool, WeightCandidates) and len(candidates.pool.units) == 2
    assert candidates.notes[0] == "calibrated on 32 samples of the search split"
    assert candidates.notes[-1].startswith("candidates ran ")
    assert set(candidates.timings) == {"calibration", "scoring"}


def test_nothing_prunable_builds_no_candidates_and_searches_nothing() -> None:
    data = weightless_data()
    options = PruneOptions(metric=MetricKind.AGREEMENT)
    loaded, owned = load(weightless(), data, options, None)
    baseline = measure_baseline(owned, loaded, options.tolerance, 1)
    candidates = make_candidates(owned, loaded.inspection, loaded.search_idx, baseline.evaluator, options)
    assert isinstance(candidates.pool, NoCandidates)
    assert candidates.notes == (NOTHING_PRUNABLE,) and candidates.timings == {}
    trials: list[Trial] = []
    searched = run_search(candidates.pool, loaded, baseline, lambda trial, better: trials.append(trial))
    assert searched.outcome.trials == [] and searched.notes == () and trials == []


def test_confirm_without_a_held_out_split_takes_the_best_unconfirmed() -> None:
    data = mlp_data()
    options = PruneOptions(metric=MetricKind.AGREEMENT, holdout_fraction=0.0, tolerance=Tolerance(0.2))
    loaded, owned = load(tiny_mlp(), data, options, None)
    baseline = measure_baseline(owned, loaded, options.tolerance, 1)
    pool = make_candidates(owned, loaded.inspection, loaded.search_idx, baseline.evaluator, options).pool
    searched = run_search(pool, loaded, baseline, lambda trial, better: None)
    confirmed = confirm(searched.outcome, pool.space, pool.runner, None, searched.judge, lambda t, b: None)
    assert confirmed.chosen == searched.outcome.passing()[0].config and any(confirmed.chosen)
    assert confirmed.notes == (UNCONFIRMED,) and confirmed.runs == 0 and confirmed.fallbacks == ()


def test_write_of_the_empty_config_hands_back_the_model_given() -> None:
    model = tiny_mlp()
    data = mlp_data()
    options = PruneOptions(metric=MetricKind.AGREEMENT)
    loaded, owned = load(model, data, options, None)
    baseline = measure_baseline(owned, loaded, options.tolerance, 1)
    pool = make_candidates(owned, loaded.inspection, loaded.search_idx, baseline.evaluator, options).pool
    check = FinalCheck(baseline.evaluator, loaded.io_names, loaded.search_idx, loaded.hold_idx, 1)
    written = write(model, pool, pool.space.empty(), check, None, 1, sparse=False)
    assert written.chosen == pool.space.empty() and written.notes == ()
    assert written.checked.model.SerializeToString() == model.SerializeToString()
    assert written.checked.final.search == 1.0 and written.checked.hold_scores is not None


def test_a_run_logs_its_phases_and_verdicts_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pruner")
    options = PruneOptions(metric=MetricKind.AGREEMENT, recover=Recovery.LSQ, max_evaluations=4)
    result = pruner.prune(tiny_mlp(), mlp_data(), options)
    messages: dict[str, list[str]] = {}
    for record in caplog.records:
        messages.setdefault(record.name, []).append(record.getMessage())
    assert {"pruner._phases", "pruner._candidates", "pruner._search", "pruner._confirm"} <= set(messages)
    verdicts = [m for m in messages["pruner._phases"] if m.startswith(("bisect ", "refine ", "fallback "))]
    assert len(verdicts) == result.report.evaluations
    assert any(m.startswith("baseline agreement 1 in ") for m in messages["pruner._phases"])
    assert any(m.startswith("calibrated 2 layer(s) on 32 samples") for m in messages["pruner._candidates"])
    phases = [(r.getMessage(), getattr(r, "phase", None)) for r in caplog.records if r.name == "pruner._prune"]
    assert [p for _, p in phases] == ["load", "baseline", "candidates", "search", "confirm", "write", "report"]
    for message, phase in phases:
        assert message.startswith(f"phase {phase} done: RSS ") and "MiB, peak " in message


def test_process_memory_reads_this_process_resident_and_peak_bytes() -> None:
    rss, peak = process_memory()
    block = np.ones(64 * 2**20 // 8)  # touched: 64 MiB resident
    after, peak_after = process_memory()
    assert 0 < rss <= peak and after <= peak_after
    assert after >= rss + 48 * 2**20 and peak_after >= after
    del block


def test_choosing_how_candidates_run_passes_over_its_sample_twice_not_three_times(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fed session's run that checks its outputs is also the one timed: one pass of the sample
    per way of running, each warmed up on its first batch."""
    data = EvalSet({"x": tiny_mlp_evalset(200)["x"]}, None)
    options = PruneOptions(metric=MetricKind.AGREEMENT, recover=Recovery.NONE, batch_size=16, holdout_fraction=0.0)
    loaded, owned = load(tiny_mlp(), data, options, None)
    baseline = measure_baseline(owned, loaded, options.tolerance, 1)
    runs = []
    real_run = Batches.run

    def counted(self: Batches, runner: Runner, rows: np.ndarray) -> np.ndarray:
        runs.append(len(rows))
        return real_run(self, runner, rows)

    monkeypatch.setattr(Batches, "run", counted)
    candidates = make_candidates(owned, loaded.inspection, loaded.search_idx, baseline.evaluator, options)
    assert candidates.notes[-1].startswith("candidates ran ") and "changed the outputs" not in candidates.notes[-1]
    assert sum(runs) == 2 * len(loaded.search_idx)  # 200 rows: fed once, built once


def test_remove_mode_with_no_removable_channel_says_why_and_nothing_about_running() -> None:
    from tests.pruner.test_static import strided_heads

    x = np.random.default_rng(4).standard_normal((64, 4, 2, 320)).astype(np.float32)
    options = PruneOptions(mode=Mode.REMOVE, metric=MetricKind.COSINE, recover=Recovery.LSQ, tolerance=Tolerance(1.0))
    report = pruner.prune(strided_heads(128), EvalSet({"x": x}), options).report
    assert len(report.notes) == 3 and report.notes[0] == "criterion auto: activation"
    assert report.notes[1].startswith("Reshape targets computed at run time were left")
    assert report.notes[2] == "no channel can be removed: the model is returned unchanged"
    assert report.status == "unchanged" and report.evaluations == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_memory_goes_back_to_the_system_at_a_phase_end() -> None:
    warm = np.ones(2**20)  # freed: glibc's mmap threshold rises past 8 MiB, so the blocks below sit on its heap
    del warm
    blocks = [np.ones(2**17) for _ in range(100)]  # 100 MiB
    top = np.ones(2**17)  # above them: the heap cannot shrink from its end
    del blocks
    before = process_memory()[0]
    release_freed_memory()
    assert process_memory()[0] <= before - 50 * 2**20
    del top


def test_constant_weights_left_alone_below_ir_version_4_are_counted_as_skipped() -> None:
    """Every float tensor is prunable or skipped with a reason, also when the load phase leaves
    Constant-node weights out (IR version < 4)."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", TensorProto.FLOAT, (8, 4), rng.normal(size=32).astype(np.float32).ravel())
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=weight), helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    inspection, notes = _inspect(model, (), ())
    assert not inspection.layers
    assert [(s.name, s.op_type) for s in inspection.skipped] == [("w", "MatMul")]
    assert "IR version < 4" in inspection.skipped[0].reason
    assert inspection.float_params == inspection.prunable_params + sum(inspection.skipped_params.values()) == 32
    assert notes == ("Constant-node weights are left alone in models of IR version < 4",)
