"""Every new metric drives a real ``pruner.prune`` run and is what the report records."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import pruner
from pruner import CustomMetric, EvalSet, MetricKind, PruneOptions
from pruner._metrics import Metric
from tests.helpers import parse, seeded, tiny_mlp, tiny_mlp_evalset

SEGMENTER = """
<ir_version: 8, opset_import: ["" : 17]>
segmenter (float[N, 1, 8, 8] x) => (float[N, 1, 8, 8] y) {
    h = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r = Relu (h)
    z = Conv (r, w2, b2)
    y = Sigmoid (z)
}
"""

TAGGER = """
<ir_version: 8, opset_import: ["" : 17]>
tagger (float[N, 6, 4] x, float[N, 6] m) => (float[N, 6, 5] y) {
    h = MatMul (x, w1)
    r = Relu (h)
    logits = MatMul (r, w2)
    axes = Constant <value = int64[1] {2}> ()
    m3 = Unsqueeze (m, axes)
    y = Mul (logits, m3)
}
"""

TIME_MAJOR = """
<ir_version: 8, opset_import: ["" : 17]>
time_major (float[6, N, 4] x, float[1, N, 3] h0) => (float[6, N, 5] y) {
    h = MatMul (x, w1)
    r = Relu (h)
    logits = MatMul (r, w2)
    state = MatMul (h0, wh)
    mixed = Add (logits, state)
    context = ReduceMean <axes = [0], keepdims = 1> (mixed)
    y = Add (mixed, context)
}
"""

SCORER = """
<ir_version: 8, opset_import: ["" : 17]>
scorer (float[N, 8] x) => (float[N, 2] y) {
    h = Gemm <transB = 1> (x, w1, b1)
    r = Relu (h)
    z = Gemm <transB = 1> (r, w2, b2)
    y = Softmax <axis = -1> (z)
}
"""

FAST = {"max_evaluations": 3, "holdout_fraction": 0.0}
"""Everything is the search split, so the report's final value is over every sample."""


def segmenter() -> onnx.ModelProto:
    return parse(
        SEGMENTER,
        {
            "w1": seeded((16, 1, 3, 3), 1),
            "b1": np.zeros(16, np.float32),
            "w2": seeded((1, 16, 1, 1), 2) * 0.3,
            "b2": np.zeros(1, np.float32),
        },
    )


def tagger() -> onnx.ModelProto:
    return parse(TAGGER, {"w1": seeded((4, 32), 3), "w2": seeded((32, 5), 4)})


def time_major() -> onnx.ModelProto:
    return parse(
        TIME_MAJOR,
        {
            "w1": seeded((4, 32), 5),
            "w2": seeded((32, 5), 6),
            "wh": seeded((3, 5), 7),
        },
    )


def scorer() -> onnx.ModelProto:
    return parse(
        SCORER,
        {
            "w1": seeded((32, 8), 8),
            "b1": np.zeros(32, np.float32),
            "w2": seeded((2, 32), 9) * 0.5,
            "b2": np.array([2.0, 0.0], np.float32),  # a minority class, as in scoring models
        },
    )


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feeds)[0])


def assert_report_measures(result: pruner.PruneResult, metric: Metric, value: float) -> None:
    report = result.report
    assert report.metric == metric.name
    assert report.higher_is_better == metric.higher_is_better
    assert report.options["metric"] == metric.name
    assert report.final.search == pytest.approx(value, abs=1e-9)
    onnx.checker.check_model(result.model, full_check=True)


@pytest.mark.parametrize("kind", [MetricKind.DICE, MetricKind.IOU])
def test_dice_and_iou_judge_a_segmenter(kind: MetricKind) -> None:
    model = segmenter()
    x = np.random.default_rng(0).random((40, 1, 8, 8), np.float32)
    result = pruner.prune(model, EvalSet({"x": x}), PruneOptions(metric=kind, **FAST))  # type: ignore[arg-type]
    metric = Metric(kind)
    assert result.report.baseline.search == 1.0  # the original against itself
    assert all(0.0 <= t.metric <= 1.0 for t in result.report.trace)
    expected = metric.value(run(result.model, {"x": x}), None, run(model, {"x": x}))
    assert_report_measures(result, metric, expected)
    assert result.report.final.search >= 0.99


def test_dice_against_labels_is_noted() -> None:
    model = segmenter()
    x = np.random.default_rng(1).random((40, 1, 8, 8), np.float32)
    labels = (run(model, {"x": x}) > 0.5).astype(np.int64)
    labels[:, :, 0, 0] = 1  # the model misses these: the baseline is below 1
    result = pruner.prune(model, EvalSet({"x": x}, labels), PruneOptions(metric=MetricKind.DICE, **FAST))  # type: ignore[arg-type]
    metric = Metric(MetricKind.DICE)
    assert result.report.baseline.search == pytest.approx(metric.value(run(model, {"x": x}), labels, None))
    assert result.report.baseline.search < 1.0
    assert any("dice compares the candidates with the eval set's labels" in n for n in result.report.notes)


def tagger_data(n: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    lengths = rng.integers(2, 7, n)
    mask = (np.arange(6)[None, :] < lengths[:, None]).astype(np.float32)
    return {"x": rng.standard_normal((n, 6, 4)).astype(np.float32), "m": mask}


@pytest.mark.parametrize(
    "options",
    [
        {"metric": MetricKind.SEQUENCE_MATCH, "sequence_mask": "m"},
        {"metric": MetricKind.SEQUENCE_SIMILARITY, "ctc_blank": 0},
        {"metric": MetricKind.AGREEMENT, "pad_id": 0, "sequence_mask": "m"},
    ],
    ids=["sequence_match", "ctc_similarity", "masked_agreement"],
)
def test_sequence_metrics_judge_a_tagger(options: dict[str, object]) -> None:
    model, data = tagger(), tagger_data()
    opts = PruneOptions(**options, **FAST)  # type: ignore[arg-type]
    result = pruner.prune(model, EvalSet(data), opts)
    metric = Metric.from_options(opts)
    expected = metric.value(run(result.model, data), None, run(model, data), data["m"])
    assert result.report.baseline.search == 1.0
    assert_report_measures(result, metric, expected)


def test_a_missing_sequence_mask_is_named() -> None:
    with pytest.raises(pruner.InvalidEvalSetError, match="sequence_mask 'attention' is not an array of the eval set"):
        pruner.prune(
            tagger(), EvalSet(tagger_data()), PruneOptions(metric=MetricKind.SEQUENCE_MATCH, sequence_mask="attention")
        )


def time_major_data(n: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "x": rng.standard_normal((n, 6, 4)).astype(np.float32),  # stored samples first
        "h0": rng.standard_normal((n, 1, 3)).astype(np.float32),
    }


def test_time_major_outputs_and_batch_second_inputs() -> None:
    model, data = time_major(), time_major_data()
    options = PruneOptions(
        metric=MetricKind.SEQUENCE_MATCH,
        input_sample_axes={"x": 1, "h0": 1},
        output_sample_axis=1,
        batch_size=16,
        **FAST,  # type: ignore[arg-type]
    )
    result = pruner.prune(model, EvalSet(data), options)
    model_layout = {k: np.moveaxis(v, 0, 1) for k, v in data.items()}
    original = np.moveaxis(run(model, model_layout), 1, 0)
    pruned = np.moveaxis(run(result.model, model_layout), 1, 0)
    metric = Metric(MetricKind.SEQUENCE_MATCH)
    assert result.report.baseline.search == 1.0
    assert_report_measures(result, metric, metric.value(pruned, None, original))
    # calibration feeds samples first: the default recovery is off, and says so
    assert result.report.options["recover"] == "none"
    assert any("sample axis is not the first" in n for n in result.report.notes)
    assert result.report.options["input_sample_axes"] == {"x": 1, "h0": 1}


def test_time_major_model_without_the_axis_options_is_refused_by_name() -> None:
    # x is [6, N, 4], h0 [1, N, 3]: read samples first, they disagree on a fixed batch size
    with pytest.raises(pruner.UnsupportedModelError, match=r"fixed batch sizes \[1, 6\].*set input_sample_axes"):
        pruner.prune(time_major(), EvalSet(time_major_data()), PruneOptions(metric=MetricKind.AGREEMENT, **FAST))  # type: ignore[arg-type]


def test_sample_axis_options_name_their_mistakes() -> None:
    data = EvalSet(time_major_data())
    with pytest.raises(pruner.InvalidConfigError, match=r"input_sample_axes names 'h1', not model input"):
        pruner.prune(time_major(), data, PruneOptions(input_sample_axes={"h1": 1}))
    with pytest.raises(pruner.InvalidConfigError, match=r"cannot be combined with calibration .*recover lsq"):
        pruner.prune(time_major(), data, PruneOptions(input_sample_axes={"x": 1, "h0": 1}, recover=pruner.Recovery.LSQ))
    only_inputs = PruneOptions(metric=MetricKind.AGREEMENT, input_sample_axes={"x": 1, "h0": 1}, **FAST)  # type: ignore[arg-type]
    with pytest.raises(
        pruner.UnsupportedModelError, match=r"its first axis is not the sample axis \(set output_sample_axis"
    ):
        pruner.prune(time_major(), data, only_inputs)


def scorer_data(n: int = 60) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(4).standard_normal((n, 8)).astype(np.float32)}


@pytest.mark.parametrize(
    "options",
    [
        {"metric": MetricKind.KL},
        {"metric": MetricKind.COLUMN_MAE, "column": 1},
        {"metric": MetricKind.RANK_CORRELATION, "column": 1},
    ],
    ids=["kl", "column_mae", "rank_correlation"],
)
def test_score_metrics_judge_a_scorer(options: dict[str, object]) -> None:
    model, data = scorer(), scorer_data()
    opts = PruneOptions(**options, **FAST)  # type: ignore[arg-type]
    result = pruner.prune(model, EvalSet(data), opts)
    metric = Metric.from_options(opts)
    expected = metric.value(run(result.model, data), None, run(model, data))
    assert result.report.baseline.search == (1.0 if metric.higher_is_better else 0.0)
    assert_report_measures(result, metric, expected)
    if metric.whole_set:  # a correlation is never abandoned part way
        assert all(t.complete and t.samples == len(data["x"]) for t in result.report.trace)


def test_rank_correlation_against_labels() -> None:
    model, data = scorer(), scorer_data()
    labels = run(model, data)[:, 1] + np.random.default_rng(5).normal(0, 0.05, 60).astype(np.float32)
    opts = PruneOptions(metric=MetricKind.RANK_CORRELATION, column=1, **FAST)  # type: ignore[arg-type]
    result = pruner.prune(model, EvalSet(data, labels), opts)
    metric = Metric.from_options(opts)
    assert result.report.baseline.search == pytest.approx(metric.value(run(model, data), labels, None))
    assert 0.5 < result.report.baseline.search < 1.0


def test_rank_correlation_of_two_columns_asks_for_a_column() -> None:
    with pytest.raises(pruner.InvalidConfigError, match=r"'rank_correlation' needs one score per sample.*column"):
        pruner.prune(scorer(), EvalSet(scorer_data()), PruneOptions(metric=MetricKind.RANK_CORRELATION))
    with pytest.raises(pruner.InvalidConfigError, match="column 2 is out of range: output's last axis has 2"):
        pruner.prune(scorer(), EvalSet(scorer_data()), PruneOptions(metric=MetricKind.COLUMN_MAE, column=2))


def test_a_custom_metric_runs_end_to_end_and_is_reported() -> None:
    calls: list[int] = []

    def top1_kept(outputs: np.ndarray, labels: np.ndarray | None, reference: np.ndarray) -> np.ndarray:
        calls.append(len(outputs))
        return (outputs.argmax(axis=1) == reference.argmax(axis=1)).astype(float)

    custom = CustomMetric(name="top1_kept", fn=top1_kept, best=1.0)
    arrays = tiny_mlp_evalset(64)
    result = pruner.prune(tiny_mlp(), EvalSet({"x": arrays["x"]}), PruneOptions(metric=custom, **FAST))  # type: ignore[arg-type]
    assert calls, "the custom metric was never called"
    assert result.report.metric == "top1_kept"
    assert result.report.options["metric"] == "top1_kept"
    assert result.report.baseline.search == 1.0
    expected = top1_kept(run(result.model, {"x": arrays["x"]}), None, run(tiny_mlp(), {"x": arrays["x"]})).mean()
    assert result.report.final.search == pytest.approx(expected)


def test_a_custom_metric_that_raises_inside_prune_is_named() -> None:
    def wrong(outputs: np.ndarray, labels: np.ndarray | None, reference: np.ndarray) -> np.ndarray:
        return outputs[:, 7]

    arrays = tiny_mlp_evalset(16)
    with pytest.raises(pruner.InvalidConfigError, match="custom metric 'wrong' raised IndexError"):
        pruner.prune(tiny_mlp(), EvalSet({"x": arrays["x"]}), PruneOptions(metric=CustomMetric(name="wrong", fn=wrong)))
