"""The zoo's detection metric (bench/zoo_metrics.py) on YOLOv8 heads written by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from zoo_metrics import MAX_CANDIDATES, decode, detection_f1, match_f1

from pruner._metrics import Metric

CLASSES, ANCHORS = 3, 50


def head(*detections: tuple[float, float, float, float, int, float]) -> np.ndarray:
    """A YOLOv8 head [4 + classes, anchors]: each (cx, cy, w, h, class, score) on its own anchor,
    the other anchors a small box scoring 0.01 in every class."""
    out = np.zeros((4 + CLASSES, ANCHORS), np.float32)
    out[:4] = np.array([[10.0], [10.0], [4.0], [4.0]])
    out[4:] = 0.01
    for i, (cx, cy, w, h, cls, score) in enumerate(detections):
        out[:4, i] = cx, cy, w, h
        out[4 + cls, i] = score
    return out


def batch(*heads: np.ndarray) -> np.ndarray:
    return np.stack(heads)


PERSON = (100.0, 100.0, 40.0, 80.0, 0, 0.9)
FOOT = (200.0, 250.0, 30.0, 20.0, 2, 0.6)


def scores(outputs: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return Metric(detection_f1(0.25)).per_sample(outputs, None, reference)


def test_identical_outputs_score_one() -> None:
    ref = batch(head(PERSON, FOOT), head(FOOT))
    assert scores(ref, ref).tolist() == [1.0, 1.0]


def test_no_detections_on_either_side_scores_one() -> None:
    empty = batch(head(), head((50.0, 50.0, 10.0, 10.0, 1, 0.2)))  # 0.2: under the threshold
    assert scores(empty, empty[::-1].copy()).tolist() == [1.0, 1.0]


def test_a_box_shifted_past_the_match_iou_scores_lower() -> None:
    ref = batch(head(PERSON, FOOT))
    slightly = batch(head((104.0, 100.0, 40.0, 80.0, 0, 0.9), FOOT))  # IoU 0.82
    far = batch(head((130.0, 100.0, 40.0, 80.0, 0, 0.9), FOOT))  # IoU 0.14
    assert scores(slightly, ref)[0] == 1.0
    assert scores(far, ref)[0] == pytest.approx(0.5)  # 1 match of 2 + 2 detections


def test_a_lost_or_added_detection_scores_lower() -> None:
    ref = batch(head(PERSON, FOOT), head())
    lost = batch(head(PERSON, (200.0, 250.0, 30.0, 20.0, 2, 0.1)), head((60.0, 60.0, 20.0, 20.0, 1, 0.5)))
    assert scores(lost, ref).tolist() == pytest.approx([2 / 3, 0.0])


def test_a_changed_class_does_not_match() -> None:
    ref = batch(head(PERSON))
    other = batch(head((100.0, 100.0, 40.0, 80.0, 1, 0.9)))
    assert scores(other, ref).tolist() == [0.0]


def test_overlapping_boxes_are_suppressed_across_classes() -> None:
    boxes, found, classes = decode(head(PERSON, (102.0, 100.0, 40.0, 80.0, 1, 0.5), FOOT), 0.25)
    assert classes.tolist() == [0, 2]
    assert found.tolist() == pytest.approx([0.9, 0.6])
    assert boxes[0].tolist() == pytest.approx([80.0, 60.0, 120.0, 140.0])


def test_the_threshold_decides_what_counts() -> None:
    ref = batch(head(PERSON))
    weak = batch(head(PERSON, (200.0, 250.0, 30.0, 20.0, 2, 0.15)))
    metric = Metric(detection_f1(0.1))
    assert metric.name == "detection_f1@0.1"
    assert metric.per_sample(weak, None, ref).tolist() == pytest.approx([2 / 3])
    assert scores(weak, ref).tolist() == [1.0]


def test_matching_is_one_to_one() -> None:
    box = np.array([[0.0, 0.0, 10.0, 10.0]])
    two = np.array([[0.0, 0.0, 10.0, 10.0], [0.5, 0.0, 10.5, 10.0]])
    assert match_f1(two, np.array([0, 0]), box, np.array([0])) == pytest.approx(2 / 3)


def test_a_candidate_whose_every_anchor_fires_is_bounded() -> None:
    wide = np.zeros((4 + CLASSES, 4 * MAX_CANDIDATES), np.float32)
    wide[:2] = np.arange(4 * MAX_CANDIDATES) * 50.0  # far apart: NMS keeps them all
    wide[2:4] = 10.0
    wide[4] = 0.5
    boxes, _, _ = decode(wide, 0.25)
    assert len(boxes) == MAX_CANDIDATES
