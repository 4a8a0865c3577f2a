"""What the run keeps of the unpruned model's output: the metric's summary of it, with results
identical to keeping it whole."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import pruner
from pruner import Criterion, MetricKind, PruneOptions, Tolerance
from pruner import _evaluate as evaluate_module
from pruner import _phases as phases_module
from pruner._candidates import _Agreement, _same_outputs
from pruner._evalset import model_inputs
from pruner._evaluate import Batches, Evaluator, Rerun, make_session, session_runner
from pruner._metrics import Metric
from tests.helpers import parse, seeded

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

TAGGER = """
<ir_version: 8, opset_import: ["" : 17]>
tagger (float[N, 4, 8] x) => (float[N, 4, 1000] y) {
    y = MatMul (x, w)
}
"""

TAGGER2 = """
<ir_version: 8, opset_import: ["" : 17]>
tagger2 (float[N, 4, 8] x) => (float[N, 4, 1000] y) {
    h = MatMul (x, w1)
    r = Relu (h)
    y = MatMul (r, w2)
}
"""

MASKED = """
<ir_version: 8, opset_import: ["" : 17]>
masked (float[N, 4, 8] x, float[N, 4] m) => (float[N, 4, 1000] y) {
    y = MatMul (x, w)
}
"""


def _results(report: pruner.Report) -> dict[str, Any]:
    """The report without what depends on the clock (timings, seconds, the run-strategy note)."""
    data = report.to_dict()
    for key in ("timings", "notes", "tool_version", "versions"):
        data.pop(key)
    for record in data["trace"]:
        record.pop("seconds")
        record.pop("latency")
    return data


def _prune_both(monkeypatch: pytest.MonkeyPatch, name: str, options: PruneOptions) -> tuple[Any, Any]:
    model = onnx.load(FIXTURES / f"{name}.onnx")
    compact = pruner.prune(model, FIXTURES / f"{name}_eval.npz", options)
    monkeypatch.setattr(evaluate_module, "COMPACT_REFERENCE", False)
    whole = pruner.prune(model, FIXTURES / f"{name}_eval.npz", options)
    return compact, whole


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("mlp", PruneOptions(metric=MetricKind.AGREEMENT, tolerance=Tolerance(0.02), max_evaluations=8)),
        ("mlp", PruneOptions(metric=MetricKind.ACCURACY, tolerance=Tolerance(0.02), max_evaluations=8)),
        ("recurrent", PruneOptions(metric=MetricKind.AGREEMENT, tolerance=Tolerance(0.02), max_evaluations=6)),
    ],
    ids=["mlp-agreement", "mlp-accuracy", "recurrent-agreement"],
)
def test_a_run_on_the_summary_gives_the_results_of_a_run_on_the_whole_output(
    monkeypatch: pytest.MonkeyPatch, name: str, options: PruneOptions
) -> None:
    compact, whole = _prune_both(monkeypatch, name, options)
    assert compact.report.trace, "the run evaluated no candidate"
    assert _results(compact.report) == _results(whole.report)  # every metric to the bit
    assert compact.model.SerializeToString() == whole.model.SerializeToString()


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "onnx2torch")),
    reason="needs the gradient extra: pip install -e '.[gradient]'",
)
def test_gradients_read_the_whole_output_of_their_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    options = PruneOptions(
        metric=MetricKind.AGREEMENT, criterion=Criterion.GRADIENT, tolerance=Tolerance(0.02), max_evaluations=6
    )
    compact, whole = _prune_both(monkeypatch, "mlp", options)
    assert _results(compact.report) == _results(whole.report)


def _measured(metric: Metric, n: int = 300) -> tuple[Evaluator, np.ndarray]:
    model = parse(TAGGER, {"w": seeded((8, 1000))})
    data = pruner.EvalSet({"x": seeded((n, 4, 8), seed=1)})
    batches = Batches(model_inputs(model), "y", data, batch_size=64)
    runner = session_runner(make_session(model.SerializeToString(), threads=1), "y")
    everything = np.arange(n)
    keep = np.arange(0, 256, 2)
    evaluator = Evaluator.measure(batches, metric, batches.each_output(runner, everything), keep)
    return evaluator, batches.outputs(runner, everything)


def test_an_argmax_metric_keeps_the_ids_and_the_probe_rows_whole() -> None:
    evaluator, full = _measured(Metric(MetricKind.AGREEMENT))
    ids = evaluator.reference
    assert ids.dtype == np.int16 and np.array_equal(ids, full.argmax(-1))
    assert ids.nbytes * 1000 < full.nbytes  # 8 bytes a sample against 16,000
    assert evaluator.kept is not None and len(evaluator.kept[0]) == 128
    rows = np.arange(0, 256, 2)
    assert np.array_equal(evaluator.full_reference(rows[5:9]), full[rows[5:9]])
    with pytest.raises(pruner.PrunerError, match=r"rows \[1\] was not kept"):
        evaluator.full_reference(np.array([1]))
    everything = np.arange(len(full))
    assert evaluator.reference_value(everything) == 1.0
    assert np.array_equal(evaluator.reference_scores(everything), np.ones(len(full)))


def test_rows_kept_by_running_the_model_again_are_computed_when_first_read_and_are_the_same() -> None:
    model = parse(TAGGER, {"w": seeded((8, 1000))})
    data = pruner.EvalSet({"x": seeded((300, 4, 8), seed=1)})
    batches = Batches(model_inputs(model), "y", data, batch_size=64)
    everything = np.arange(300)
    metric = Metric(MetricKind.AGREEMENT)
    keep = np.arange(0, 256, 2)
    source = model.SerializeToString()
    eager = Evaluator.measure(batches, metric, batches.each_output(_runner(source), everything), keep)
    reruns: list[np.ndarray] = []

    def outputs(rows: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        reruns.append(rows)
        pieces = [p for p in batches.pieces(everything) if np.isin(p, rows).any()]
        return [pair for piece in pieces for pair in batches.each_output(_runner(source), piece)]

    rerun = Rerun(len(source), outputs)
    assert 128 * 16_000 > rerun.nbytes  # the rows' outputs are bigger than the model: not kept
    lazy = Evaluator.measure(batches, metric, batches.each_output(_runner(source), everything), keep, rerun)
    assert lazy.kept is None and lazy.deferred is not None and not reruns
    assert eager.kept is not None and eager.scores is not None and lazy.scores is not None
    assert np.array_equal(lazy.reference, eager.reference) and np.array_equal(lazy.scores, eager.scores)
    assert np.array_equal(lazy.full_reference(keep[5:9]), eager.full_reference(keep[5:9]))
    assert len(reruns) == 1 and lazy.kept is not None and lazy.deferred is None
    assert np.array_equal(lazy.kept[0], keep) and np.array_equal(lazy.kept[1], eager.kept[1])
    lazy.full_reference(keep)
    assert len(reruns) == 1  # computed once, then kept
    larger = Rerun(128 * 16_000, outputs)  # a model bigger than the rows' outputs: they are kept
    kept = Evaluator.measure(batches, metric, batches.each_output(_runner(source), everything), keep, larger)
    assert kept.deferred is None and kept.kept is not None and np.array_equal(kept.kept[1], eager.kept[1])


def test_the_outputs_of_one_batch_are_the_runs_own_array() -> None:
    model = parse(TAGGER, {"w": seeded((8, 1000))})
    data = pruner.EvalSet({"x": seeded((300, 4, 8), seed=1)})
    batches = Batches(model_inputs(model), "y", data, batch_size=64)
    runner = _runner(model.SerializeToString())
    returned: list[np.ndarray] = []

    def run(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        returned.append(runner(feeds))
        return returned[-1]

    rows = np.arange(10, 74)
    one = batches.outputs(run, rows)
    assert len(returned) == 1 and np.shares_memory(one, returned[0])  # no copy of a batch of outputs
    assert np.array_equal(one, batches.outputs(runner, np.arange(10, 200))[:64])


def test_the_memory_a_long_run_freed_goes_back_before_the_next_run(monkeypatch: pytest.MonkeyPatch) -> None:
    model = parse(TAGGER, {"w": seeded((8, 1000))})
    data = pruner.EvalSet({"x": seeded((300, 4, 8), seed=1)})
    batches = Batches(model_inputs(model), "y", data, batch_size=64)
    runner = _runner(model.SerializeToString())
    released: list[int] = []
    monkeypatch.setattr(evaluate_module, "release_freed_memory", lambda: released.append(1))
    monkeypatch.setattr(evaluate_module, "TRIM_AFTER_SECONDS", 1.0)
    quick = batches.outputs(runner, np.arange(300))
    assert not released  # runs this short free too little to be worth it

    def slow(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        time.sleep(1.0)
        return runner(feeds)

    batches.run(slow, np.arange(64))
    assert np.array_equal(batches.outputs(runner, np.arange(300)), quick)
    assert len(released) == 1  # once, before the run after the slow one


def _runner(source: bytes) -> evaluate_module.Runner:
    return session_runner(make_session(source, threads=1), "y")


def wide_tagger() -> tuple[onnx.ModelProto, pruner.EvalSet]:
    """A model whose 128 probe rows' outputs (2 MB) are bigger than its bytes (about 260 KB), and its eval set."""
    model = parse(TAGGER2, {"w1": seeded((8, 64), seed=2), "w2": seeded((64, 1000), seed=3)})
    return model, pruner.EvalSet({"x": seeded((300, 4, 8), seed=1)})


def count_reruns(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows of every ``Evaluator._rerun`` from here on, in order."""
    reruns: list[int] = []
    rerun = Evaluator._rerun

    def counted(self: Evaluator, keep: np.ndarray, how: Rerun) -> tuple[np.ndarray, np.ndarray]:
        reruns.append(len(keep))
        return rerun(self, keep, how)

    monkeypatch.setattr(Evaluator, "_rerun", counted)
    return reruns


def test_a_run_whose_probe_rows_are_computed_again_gives_the_results_of_one_that_keeps_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, data = wide_tagger()
    options = PruneOptions(metric=MetricKind.AGREEMENT, tolerance=Tolerance(0.05), max_evaluations=12)
    reruns = count_reruns(monkeypatch)
    lazy = pruner.prune(model, data, options)
    assert lazy.report.probes > 0, "the run made no probe"
    assert reruns == [128]  # the probe rows, computed again on the first probe
    monkeypatch.setattr(phases_module, "_rerun", lambda *args: None)  # the probe rows kept from the baseline
    kept = pruner.prune(model, data, options)
    assert _results(lazy.report) == _results(kept.report)  # every metric and probe to the bit
    assert lazy.model.SerializeToString() == kept.model.SerializeToString()


@pytest.mark.parametrize("kind", [MetricKind.SEQUENCE_MATCH, MetricKind.SEQUENCE_SIMILARITY, MetricKind.AGREEMENT])
def test_scores_against_the_summary_are_those_against_the_whole_output(kind: MetricKind) -> None:
    metric = Metric(kind)
    evaluator, full = _measured(metric)
    candidate = full + seeded(full.shape, seed=3) * 0.3  # some argmaxes move
    rows = np.arange(40, 140)
    against_whole = metric.per_sample(candidate[rows], None, full[rows])
    assert 0 < against_whole.mean() < 1
    assert np.array_equal(evaluator.per_sample(candidate[rows], rows), against_whole)


def test_a_metric_that_reads_the_whole_output_keeps_it() -> None:
    evaluator, full = _measured(Metric(MetricKind.COSINE))
    assert evaluator.kept is None and evaluator.scores is None
    assert np.array_equal(evaluator.reference, full)


def test_held_out_scores_read_the_sequence_mask_as_the_metric_does() -> None:
    n = 200
    model = parse(MASKED, {"w": seeded((8, 1000))})
    mask = (np.arange(4)[None, :] < np.arange(n)[:, None] % 5).astype(np.float32)  # 0-4 positions count
    labels = np.random.default_rng(2).integers(0, 1000, (n, 4))
    data = pruner.EvalSet({"x": seeded((n, 4, 8), seed=1), "m": mask}, labels)
    batches = Batches(model_inputs(model), "y", data, batch_size=64)
    runner = session_runner(make_session(model.SerializeToString(), threads=1), "y")
    everything = np.arange(n)
    out = batches.outputs(runner, everything)
    metric = Metric(MetricKind.ACCURACY, sequence_mask="m")
    evaluator = Evaluator.measure(batches, metric, batches.each_output(runner, everything), everything[:128])
    scores = evaluator.per_sample(out, everything)
    assert np.array_equal(scores, metric.per_sample(out, labels, None, mask))
    assert np.array_equal(scores[::5], np.ones(n // 5))  # no position counts: 1.0, as evaluate scores them
    assert evaluator.evaluate(everything, runner).value == pytest.approx(float(scores.mean()), abs=1e-12)
    assert evaluator.reference_value(everything) == float(scores.mean())
    assert np.array_equal(evaluator.reference_scores(everything), scores)


def one_comparison(out: np.ndarray, ref: np.ndarray) -> bool:
    """The check as one ``np.allclose`` of all the outputs at once."""
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    atol = 1e-4 * max(scale, 1.0)
    if not np.isfinite(atol):  # an infinite reference value: every finite gap is within it
        return out.shape == ref.shape and bool(np.array_equal(out[~np.isfinite(ref)], ref[~np.isfinite(ref)]))
    return out.shape == ref.shape and bool(np.allclose(out, ref, rtol=1e-3, atol=atol))


@pytest.mark.parametrize("noise", [1e-7, 1e-5, 1e-3, 1e-1])
def test_the_strategy_check_a_batch_at_a_time_decides_as_one_comparison_of_all(noise: float) -> None:
    ref = seeded((64, 40, 50), seed=4) * 30
    out = ref + seeded(ref.shape, seed=5) * noise
    agreement = _Agreement()
    for i in range(0, 64, 16):
        agreement.add(out[i : i + 16], ref[i : i + 16])
    assert agreement.same == one_comparison(out, ref) == _same_outputs(out, ref)
    ref[3, 2, 1] = out[3, 2, 1] = np.inf
    agreement.add(out[:16], ref[:16])
    assert agreement.same == one_comparison(out, ref) == _same_outputs(out, ref)
    out[0, 0, 0] = np.nan
    agreement.add(out[:16], ref[:16])
    assert not agreement.same
