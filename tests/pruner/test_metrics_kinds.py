"""The metrics for masks, sequences, scores and custom code, on hand-made arrays with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pruner import CustomMetric, InvalidConfigError, InvalidEvalSetError, MetricKind, PruneOptions
from pruner._metrics import Metric, edit_distance, spearman

# --- dice and iou ----------------------------------------------------------------------------


MAPS = np.array(
    [
        [[0.9, 0.9], [0.1, 0.1]],  # 2 foreground pixels
        [[0.1, 0.1], [0.1, 0.1]],  # empty
        [[0.9, 0.1], [0.1, 0.1]],  # 1
        [[0.1, 0.1], [0.1, 0.1]],  # empty
    ],
    np.float32,
)
REF_MAPS = np.array(
    [
        [[0.9, 0.1], [0.1, 0.1]],  # 1, inside the candidate's 2
        [[0.1, 0.1], [0.1, 0.1]],  # empty vs empty
        [[0.1, 0.9], [0.1, 0.1]],  # disjoint
        [[0.9, 0.1], [0.1, 0.1]],  # candidate empty, reference not
    ],
    np.float32,
)


def test_dice_and_iou_against_the_reference_map() -> None:
    dice = Metric(MetricKind.DICE).per_sample(MAPS, None, REF_MAPS)
    iou = Metric(MetricKind.IOU).per_sample(MAPS, None, REF_MAPS)
    # dice = 2|A&B| / (|A| + |B|), iou = |A&B| / |A|B|; two empty maps agree perfectly
    assert dice.tolist() == pytest.approx([2 * 1 / 3, 1.0, 0.0, 0.0])
    assert iou.tolist() == pytest.approx([1 / 2, 1.0, 0.0, 0.0])


def test_dice_reads_labels_nonzero_as_foreground_and_the_threshold() -> None:
    labels = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 1]], [[0, 0], [0, 0]]], np.int64)
    assert Metric(MetricKind.DICE).per_sample(MAPS, labels, None).tolist() == pytest.approx([1.0, 1.0, 0.0, 1.0])
    # logits thresholded at 0: the same maps shifted by -0.5
    logits = MAPS - 0.5
    assert Metric(MetricKind.DICE, threshold=0.0).per_sample(logits, labels, None).tolist() == pytest.approx(
        [1.0, 1.0, 0.0, 1.0]
    )


def test_dice_of_one_channel_with_column() -> None:
    out = np.stack([MAPS, 1 - MAPS], axis=-1)  # [n, h, w, 2]
    ref = np.stack([REF_MAPS, 1 - REF_MAPS], axis=-1)
    assert Metric(MetricKind.DICE, column=0).per_sample(out, None, ref).tolist() == pytest.approx(
        [2 / 3, 1.0, 0.0, 0.0]
    )


# --- sequences ---------------------------------------------------------------------------------


def one_hot(ids: list[list[int]], classes: int = 5) -> np.ndarray:
    return np.eye(classes, dtype=np.float32)[np.array(ids)]


def test_agreement_ignores_pad_positions_of_the_reference() -> None:
    ref = one_hot([[1, 2, 0, 0], [3, 3, 3, 0]])
    out = one_hot([[1, 4, 2, 2], [3, 3, 1, 4]])
    # without pad_id every position counts
    assert Metric(MetricKind.AGREEMENT).per_sample(out, None, ref).tolist() == pytest.approx([0.25, 0.5])
    assert Metric(MetricKind.AGREEMENT, pad_id=0).per_sample(out, None, ref).tolist() == pytest.approx([0.5, 2 / 3])


def test_accuracy_ignores_pad_labels_and_masked_positions() -> None:
    out = one_hot([[1, 4, 2, 2], [3, 3, 1, 4]])
    labels = np.array([[1, 2, 0, 0], [3, 3, 3, 0]])
    mask = np.array([[1, 1, 1, 1], [1, 0, 1, 1]])
    metric = Metric(MetricKind.ACCURACY, pad_id=0, sequence_mask="attention_mask")
    assert metric.per_sample(out, labels, None, mask).tolist() == pytest.approx([0.5, 0.5])
    everything_masked = np.zeros_like(mask)
    assert metric.per_sample(out, labels, None, everything_masked).tolist() == [1.0, 1.0]


def test_sequence_match_is_whole_sequence_identity() -> None:
    ref = one_hot([[1, 2, 3, 0], [1, 2, 3, 0], [4, 4, 0, 0]])
    out = one_hot([[1, 2, 3, 0], [1, 2, 4, 0], [4, 4, 0, 3]])
    metric = Metric(MetricKind.SEQUENCE_MATCH)
    assert metric.per_sample(out, None, ref).tolist() == [1.0, 0.0, 0.0]
    # per-position agreement of the same outputs is 1, 0.75, 0.75: sequence match is stricter
    assert Metric(MetricKind.AGREEMENT).per_sample(out, None, ref).tolist() == pytest.approx([1.0, 0.75, 0.75])
    # a pad id dropped from both decoded sequences: [4, 4] vs [4, 4, 3] still differ
    assert Metric(MetricKind.SEQUENCE_MATCH, pad_id=0).per_sample(out, None, ref).tolist() == [1.0, 0.0, 0.0]
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
    masked = Metric(MetricKind.SEQUENCE_MATCH, sequence_mask="m").per_sample(out, None, ref, mask)
    assert masked.tolist() == [1.0, 0.0, 1.0]


def test_sequence_match_collapses_ctc_repeats_and_blanks() -> None:
    # frames "a a _ b" and "a _ b b" both decode to "ab" (blank 0); "a _ a b" decodes to "aab"
    ref = one_hot([[1, 1, 0, 2], [1, 1, 0, 2]])
    out = one_hot([[1, 0, 2, 2], [1, 0, 1, 2]])
    assert Metric(MetricKind.SEQUENCE_MATCH).per_sample(out, None, ref).tolist() == [0.0, 0.0]
    ctc = Metric(MetricKind.SEQUENCE_MATCH, ctc_blank=0)
    assert ctc.per_sample(out, None, ref).tolist() == [1.0, 0.0]
    similarity = Metric(MetricKind.SEQUENCE_SIMILARITY, ctc_blank=0).per_sample(out, None, ref)
    assert similarity.tolist() == pytest.approx([1.0, 1 - 1 / 3])  # "aab" vs "ab": one insertion in 3


def test_sequence_metrics_take_integer_ids_and_refuse_other_shapes() -> None:
    ids = np.array([[1, 2, 3], [1, 2, 3]], np.int64)
    ref = np.array([[1, 2, 3], [3, 2, 1]], np.int64)
    assert Metric(MetricKind.SEQUENCE_MATCH).per_sample(ids, None, ref).tolist() == [1.0, 0.0]
    with pytest.raises(InvalidConfigError, match=r"sequence_match.*\[samples, positions, classes\].*\[2, 3, 4, 5\]"):
        Metric(MetricKind.SEQUENCE_MATCH).per_sample(np.zeros((2, 3, 4, 5), np.float32), None, np.zeros((2, 3, 4, 5)))


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("abc", "abc", 0), ("ab", "ba", 2)],
)
def test_edit_distance(a: str, b: str, distance: int) -> None:
    assert edit_distance(np.array([ord(c) for c in a]), np.array([ord(c) for c in b])) == distance


# --- probabilities and scores -------------------------------------------------------------------


def test_kl_of_probabilities_and_of_logits() -> None:
    ref = np.array([[0.9, 0.1], [0.5, 0.5]], np.float32)
    out = np.array([[0.8, 0.2], [0.5, 0.5]], np.float32)
    expected = 0.9 * math.log(0.9 / 0.8) + 0.1 * math.log(0.1 / 0.2)
    kl = Metric(MetricKind.KL)
    assert kl.per_sample(out, None, ref).tolist() == pytest.approx([expected, 0.0], abs=1e-6)
    # the same distributions as logits: softmax is applied to both
    assert kl.per_sample(np.log(out), None, np.log(ref)).tolist() == pytest.approx([expected, 0.0], abs=1e-6)
    assert not kl.higher_is_better and kl.best == 0.0


def test_kl_sees_the_minority_score_that_cosine_misses() -> None:
    ref = np.array([[0.98, 0.02]], np.float32)
    out = np.array([[0.999, 0.001]], np.float32)  # the minority score fell 20-fold
    assert Metric(MetricKind.COSINE).per_sample(out, None, ref)[0] > 0.999
    assert Metric(MetricKind.KL).per_sample(out, None, ref)[0] > 0.03


def test_kl_of_a_single_sigmoid_column() -> None:
    ref = np.array([[0.9], [0.2]], np.float32)
    out = np.array([[0.8], [0.2]], np.float32)
    expected = 0.9 * math.log(0.9 / 0.8) + 0.1 * math.log(0.1 / 0.2)
    assert Metric(MetricKind.KL).per_sample(out, None, ref).tolist() == pytest.approx([expected, 0.0], abs=1e-6)


def test_column_mae_reads_one_column() -> None:
    out = np.array([[5.0, 0.2], [5.0, 0.9]], np.float32)
    ref = np.array([[0.0, 0.1], [0.0, 0.5]], np.float32)
    assert Metric(MetricKind.COLUMN_MAE, column=1).per_sample(out, None, ref).tolist() == pytest.approx([0.1, 0.4])
    assert Metric(MetricKind.COLUMN_MAE, column=-1).per_sample(out, None, ref).tolist() == pytest.approx([0.1, 0.4])


def brute_ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks by counting: how many are smaller, plus half the other equal ones."""
    return np.array([(x < v).sum() + ((x == v).sum() - 1) / 2 for v in x])


def test_rank_correlation_is_spearman_over_the_set() -> None:
    rng = np.random.default_rng(0)
    ref = rng.random((50, 2))
    out = ref + rng.normal(0, 0.2, (50, 2))
    out[:5, 1] = out[5:10, 1]  # ties
    metric = Metric(MetricKind.RANK_CORRELATION, column=1)
    assert metric.whole_set
    expected = np.corrcoef(brute_ranks(out[:, 1]), brute_ranks(ref[:, 1]))[0, 1]
    assert metric.value(out, None, ref) == pytest.approx(expected, abs=1e-12)
    assert metric.value(ref, None, ref) == 1.0
    with pytest.raises(TypeError, match="whole-set"):
        metric.per_sample(out, None, ref)


def test_rank_correlation_needs_one_score_per_sample() -> None:
    with pytest.raises(InvalidConfigError, match=r"rank_correlation.*one score per sample.*\[4, 3\].*column"):
        Metric(MetricKind.RANK_CORRELATION).value(np.zeros((4, 3)), None, np.zeros((4, 3)))


def test_spearman_edge_cases() -> None:
    assert spearman(np.ones(4), np.ones(4)) == 1.0
    assert spearman(np.array([1.0, 2.0, 3.0]), np.ones(3)) == 0.0
    assert spearman(np.array([1.0, np.nan, 3.0]), np.array([1.0, 2.0, 3.0])) == -1.0
    assert spearman(np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(-1.0)


# --- early-stop bounds -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metric",
    [
        Metric(MetricKind.DICE),
        Metric(MetricKind.SEQUENCE_MATCH),
        Metric(MetricKind.KL),
        Metric(MetricKind.COLUMN_MAE, column=0),
    ],
    ids=lambda m: m.name,
)
def test_bounded_metrics_stop_early_only_when_they_cannot_pass(metric: Metric) -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        scores = rng.random(20) * (1.0 if metric.higher_is_better else 3.0)
        bound = float(rng.random())
        final = scores.mean()
        passes = final >= bound if metric.higher_is_better else final <= bound
        for seen in range(1, 20):
            if metric.cannot_pass(float(scores[:seen].sum()), seen, 20, bound):
                assert not passes


def test_whole_set_and_unbounded_metrics_never_stop_early() -> None:
    assert not Metric(MetricKind.RANK_CORRELATION).cannot_pass(-100.0, 10, 20, 0.99)
    unbounded = CustomMetric(name="margin", fn=lambda o, labels, r: np.zeros(len(o)))
    assert Metric(unbounded).best is None
    assert not Metric(unbounded).cannot_pass(-100.0, 10, 20, 0.99)
    bounded = CustomMetric(name="share", fn=lambda o, labels, r: np.zeros(len(o)), best=1.0)
    assert Metric(bounded).cannot_pass(0.0, 10, 20, 0.99)


# --- custom metrics ------------------------------------------------------------------------------------


def test_custom_metric_gets_outputs_labels_and_reference() -> None:
    seen: dict[str, object] = {}

    def fn(outputs: np.ndarray, labels: np.ndarray | None, reference: np.ndarray) -> np.ndarray:
        seen.update(outputs=outputs, labels=labels, reference=reference)
        return np.abs(outputs - reference).max(axis=1)

    metric = Metric(CustomMetric(name="max_gap", fn=fn, higher_is_better=False, best=0.0))
    out, ref, labels = np.array([[1.0, 2.0]]), np.array([[1.5, 2.0]]), np.array([3])
    assert metric.per_sample(out, labels, ref).tolist() == [0.5]
    assert seen["outputs"] is out and seen["labels"] is labels and seen["reference"] is ref
    assert metric.name == "max_gap" and not metric.higher_is_better


def broken(kind: str) -> CustomMetric:
    def fn(outputs: np.ndarray, labels: np.ndarray | None, reference: np.ndarray) -> object:
        if kind == "raises":
            raise ZeroDivisionError("boom")
        if kind == "shape":
            return np.zeros((len(outputs), 2))
        if kind == "nan":
            return np.full(len(outputs), np.nan)
        if kind == "text":
            return "good"
        return np.full(len(outputs), 2.0)  # above its best

    return CustomMetric(name=f"bad_{kind}", fn=fn, best=1.0)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("raises", r"'bad_raises' raised ZeroDivisionError: boom"),
        ("shape", r"'bad_shape' returned shape \[3, 2\]; .*one score per sample, shape \[3\]"),
        ("nan", r"'bad_nan' returned NaN or Inf for finite outputs"),
        ("text", r"'bad_text' returned str, not an array of 3 scores"),
        ("best", r"'bad_best' returned 2, better than its declared best 1"),
    ],
)
def test_a_misbehaving_custom_metric_is_named(kind: str, message: str) -> None:
    out = np.zeros((3, 2), np.float32)
    with pytest.raises(InvalidConfigError, match=message):
        Metric(broken(kind)).per_sample(out, None, out)


def test_custom_metric_on_non_finite_candidate_outputs_scores_worst() -> None:
    higher = Metric(CustomMetric(name="sum", fn=lambda o, labels, r: o.sum(axis=1)))
    out = np.array([[np.nan, 0.0], [1.0, 1.0]], np.float32)
    assert higher.per_sample(out, None, out).tolist() == [-np.inf, 2.0]
    lower = Metric(CustomMetric(name="gap", fn=lambda o, labels, r: o.sum(axis=1), higher_is_better=False))
    assert lower.per_sample(out, None, out).tolist() == [np.inf, 2.0]


def test_custom_metric_definition_is_checked() -> None:
    with pytest.raises(InvalidConfigError, match="'accuracy' is a built-in metric"):
        CustomMetric(name="accuracy", fn=lambda o, labels, r: o)
    with pytest.raises(InvalidConfigError, match="'x': fn must be callable"):
        CustomMetric(name="x", fn=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="'x': best must be a finite number"):
        CustomMetric(name="x", fn=lambda o, labels, r: o, best=math.inf)


def test_custom_metric_that_needs_labels_refuses_an_eval_set_without() -> None:
    metric = Metric(CustomMetric(name="mine", fn=lambda o, labels, r: o[:, 0], needs_labels=True))
    with pytest.raises(InvalidEvalSetError, match="'mine' needs an array named 'labels'"):
        metric.check_labels(None, (None, 4))


# --- options --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metric": "dice"}, "metric must be one of: .*dice.*CustomMetric"),
        ({"metric": MetricKind.DICE, "threshold": math.nan}, "threshold must be a finite number"),
        ({"metric": MetricKind.COLUMN_MAE, "column": 1.5}, "column must be an integer"),
        ({"metric": MetricKind.ACCURACY, "column": 1}, "column is read by the metrics .*'accuracy' ignores it"),
        ({"metric": MetricKind.COSINE, "pad_id": 0}, "pad_id is read by .*'cosine' ignores it"),
        ({"metric": MetricKind.AGREEMENT, "ctc_blank": 0}, "ctc_blank is read by .*'agreement' ignores it"),
        ({"metric": MetricKind.SEQUENCE_MATCH, "pad_id": -1}, r"pad_id must be an integer in \[0"),
        ({"output_sample_axis": -1}, r"output_sample_axis must be an integer in \[0, 16\]"),
        ({"input_sample_axes": {"h0": "1"}}, r"input_sample_axes\['h0'\] must be an integer"),
        ({"input_sample_axes": [("h0", 1)]}, "input_sample_axes must map model input names to axes"),
    ],
)
def test_metric_options_are_validated(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidConfigError, match=message):
        PruneOptions(**kwargs)  # type: ignore[arg-type]


def test_options_to_dict_names_a_custom_metric() -> None:
    custom = CustomMetric(name="mine", fn=lambda o, labels, r: o[:, 0])
    view = PruneOptions(metric=custom, input_sample_axes={"h0": 1}).to_dict()
    assert view["metric"] == "mine"
    assert view["input_sample_axes"] == {"h0": 1}
    assert PruneOptions(metric=MetricKind.KL).to_dict()["metric"] == "kl"
