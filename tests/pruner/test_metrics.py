"""Metrics and their exact early-stop bounds."""

from __future__ import annotations

import numpy as np
import pytest

from pruner._metrics import Metric
from pruner._options import MetricKind

LOGITS = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.4, 0.35, 0.25]], np.float32)
LABELS = np.array([1, 0, 0, 1])


def test_accuracy_and_topk() -> None:
    assert Metric(MetricKind.ACCURACY).per_sample(LOGITS, LABELS, None).tolist() == [1, 1, 0, 0]
    assert Metric(MetricKind.TOPK, top_k=2).per_sample(LOGITS, LABELS, None).tolist() == [1, 1, 0, 1]


def test_agreement_needs_no_labels() -> None:
    ref = np.array([[0, 1, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]], np.float32)
    assert Metric(MetricKind.AGREEMENT).per_sample(LOGITS, None, ref).tolist() == [1, 1, 0, 1]


def test_mse_mae_against_labels() -> None:
    out = np.array([[1.0, 2.0], [0.0, 0.0]], np.float32)
    target = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)
    assert Metric(MetricKind.MSE).per_sample(out, target, None).tolist() == [2.0, 1.0]
    assert Metric(MetricKind.MAE).per_sample(out, target, None).tolist() == [1.0, 1.0]
    assert not Metric(MetricKind.MSE).higher_is_better


def test_cosine_handles_zero_vectors() -> None:
    out = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]], np.float32)
    ref = np.array([[2.0, 0.0], [0.0, 0.0], [1.0, 0.0], [-1.0, -1.0]], np.float32)
    assert Metric(MetricKind.COSINE).per_sample(out, None, ref) == pytest.approx([1.0, 1.0, 0.0, -1.0])


@pytest.mark.parametrize("kind", [MetricKind.ACCURACY, MetricKind.MSE])
def test_cannot_pass_is_exact(kind: MetricKind) -> None:
    """The bound never abandons a candidate that could still pass."""
    rng = np.random.default_rng(0)
    metric = Metric(kind)
    for _ in range(200):
        scores = rng.integers(0, 2, 20).astype(float) if kind is MetricKind.ACCURACY else rng.random(20)
        bound = float(rng.random())
        final = scores.mean()
        passes = final >= bound if metric.higher_is_better else final <= bound
        for seen in range(1, 20):
            if metric.cannot_pass(float(scores[:seen].sum()), seen, 20, bound):
                assert not passes
