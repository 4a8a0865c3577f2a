"""Task metrics of the zoo that the library's built-in metrics do not cover.

``detection_f1``: a YOLOv8 detector (output ``[N, 4 + classes, anchors]``: box centre x, y, width,
height in input pixels, then one sigmoid score per class) judged by its detections, as a user of
the detector sees them. Both the candidate's and the unpruned model's outputs are decoded as
nudenet (the package that ships the zoo's YOLOv8n) decodes them: each anchor takes its best class,
anchors scoring at least the confidence threshold are kept (the ``MAX_CANDIDATES`` best), greedy
non-maximum suppression over all classes at IoU ``NMS_IOU``. An image scores the F1 of the
candidate's detections against the unpruned model's: a pair matches when the classes agree and the
boxes overlap by IoU >= ``MATCH_IOU``, each detection in at most one pair (greedy, by the
candidate's confidence). An image where neither model detects anything scores 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pruner import CustomMetric

DETECTION_CONFIDENCE = 0.25
"""A detection's least class score as nudenet reports detections (its NMS score threshold)."""
ZOO_CONFIDENCE = 0.1
"""The zoo's threshold: on its photo sets only 91 of 500 eval images (170 of 1,000 test) give the
unpruned nudenet model any detection at 0.25, 153 (309) at 0.1."""
MAX_CANDIDATES = 300
"""Most anchors that go into NMS, the best-scoring (ultralytics keeps at most 300 detections): a
broken candidate whose every anchor passes the threshold costs no more than a small NMS."""
NMS_IOU = 0.45
"""Non-maximum suppression's IoU, as nudenet and ultralytics use it."""
MATCH_IOU = 0.5
"""A candidate's detection matches a reference detection of its class at this IoU or more (AP50's)."""


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` [n, 4] with every box of ``b`` [m, 4], corners (x1, y1, x2, y2)."""
    ax1, ay1, ax2, ay2 = (a[:, i, None] for i in range(4))
    bx1, by1, bx2, by2 = b.T
    width = np.maximum(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0.0)
    height = np.maximum(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0.0)
    inter = width * height
    area_a = np.maximum(ax2 - ax1, 0.0) * np.maximum(ay2 - ay1, 0.0)
    area_b = np.maximum(bx2 - bx1, 0.0) * np.maximum(by2 - by1, 0.0)
    union = area_a + area_b - inter
    out: np.ndarray = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return out


def decode(
    head: np.ndarray, confidence: float = DETECTION_CONFIDENCE, nms_iou: float = NMS_IOU
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's detections from its YOLOv8 head [4 + classes, anchors]: corner boxes [k, 4],
    scores [k] (descending) and class ids [k], after non-maximum suppression over all classes."""
    head = np.asarray(head, np.float64)
    scores_all = head[4:]
    classes = np.argmax(scores_all, axis=0)
    scores = scores_all[classes, np.arange(head.shape[1])]
    keep = np.flatnonzero(scores >= confidence)
    keep = keep[np.argsort(-scores[keep], kind="stable")][:MAX_CANDIDATES]
    cx, cy, w, h = head[:4, keep]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    if len(keep) > 1:
        overlap = pairwise_iou(boxes, boxes) > nms_iou
        alive = np.ones(len(keep), bool)
        for i in range(len(keep)):
            if alive[i]:
                alive[i + 1 :] &= ~overlap[i, i + 1 :]
        boxes, keep = boxes[alive], keep[alive]
    return boxes, scores[keep], classes[keep]


def match_f1(
    boxes: np.ndarray, classes: np.ndarray, ref_boxes: np.ndarray, ref_classes: np.ndarray, iou: float = MATCH_IOU
) -> float:
    """F1 of detections (ordered by confidence, descending) against reference detections: greedy
    one-to-one matching of the same class at IoU >= ``iou``, each detection taking the free
    reference box it overlaps most. 1 when both sides are empty."""
    if not len(boxes) and not len(ref_boxes):
        return 1.0
    if not len(boxes) or not len(ref_boxes):
        return 0.0
    overlap = np.where(classes[:, None] == ref_classes[None, :], pairwise_iou(boxes, ref_boxes), 0.0)
    free = np.ones(len(ref_boxes), bool)
    hits = 0
    for row in overlap:
        candidates = np.where(free & (row >= iou), row, -1.0)
        j = int(np.argmax(candidates))
        if candidates[j] >= 0:
            free[j] = False
            hits += 1
    return 2.0 * hits / (len(boxes) + len(ref_boxes))


def detection_scores(
    outputs: np.ndarray, reference: np.ndarray, confidence: float = DETECTION_CONFIDENCE
) -> np.ndarray:
    """Per-image detection F1 of the candidate's YOLOv8 heads [n, 4 + classes, anchors] against
    the unpruned model's, both decoded at ``confidence``."""
    out = np.empty(len(outputs))
    for i, (head, ref) in enumerate(zip(outputs, reference, strict=True)):
        boxes, _, classes = decode(head, confidence)
        ref_boxes, _, ref_classes = decode(ref, confidence)
        out[i] = match_f1(boxes, classes, ref_boxes, ref_classes)
    return out


@dataclass(frozen=True)
class DetectionF1:
    """The scoring function of :func:`detection_f1` (a class, so the metric's threshold is visible)."""

    confidence: float

    def __call__(self, outputs: np.ndarray, labels: np.ndarray | None, reference: np.ndarray) -> np.ndarray:
        return detection_scores(outputs, reference, self.confidence)


def detection_f1(confidence: float = DETECTION_CONFIDENCE) -> CustomMetric:
    """Per-image F1 of a YOLOv8 detector's detections against the unpruned model's, at this
    confidence threshold (labels are not used: the unpruned model's detections are the target)."""
    return CustomMetric(
        name=f"detection_f1@{confidence:g}", fn=DetectionF1(confidence), higher_is_better=True, best=1.0
    )
