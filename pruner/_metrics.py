"""Metrics: per-sample scores whose mean is the metric, with exact early-stop bounds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._errors import InvalidEvalSetError
from ._options import MetricKind

__all__ = ["Metric"]


@dataclass(frozen=True)
class Metric:
    """A metric over one model output.

    ``per_sample`` turns a batch of outputs into one score per sample; the
    metric is their mean. Every score is bounded (``best`` is the best one a
    sample can get), which makes early abandonment exact.
    """

    kind: MetricKind
    top_k: int = 5

    @property
    def higher_is_better(self) -> bool:
        return self.kind.higher_is_better

    @property
    def best(self) -> float:
        """Best possible per-sample score."""
        return 0.0 if not self.higher_is_better else 1.0

    def check_labels(self, labels: np.ndarray | None, output_shape: tuple[int | None, ...]) -> None:
        """Raise InvalidEvalSetError when labels do not fit this metric and output."""
        if not self.kind.needs_labels:
            return
        if labels is None:
            raise InvalidEvalSetError(
                f"metric {self.kind.value!r} needs an array named 'labels' in the eval set; "
                "without labels use 'agreement' or 'cosine'"
            )
        if self.kind in (MetricKind.ACCURACY, MetricKind.TOPK):
            if labels.dtype.kind not in "iu":
                raise InvalidEvalSetError(
                    f"metric {self.kind.value!r} needs integer class labels, got dtype {labels.dtype}"
                )
            if len(output_shape) >= 1 and labels.ndim != max(len(output_shape) - 1, 1):
                raise InvalidEvalSetError(
                    f"labels have shape {list(labels.shape)}; for an output of rank {len(output_shape)} "
                    f"{self.kind.value!r} needs labels of rank {max(len(output_shape) - 1, 1)} (class ids)"
                )
            classes = output_shape[-1] if output_shape else None
            if labels.size and (labels.min() < 0 or (classes is not None and labels.max() >= classes)):
                raise InvalidEvalSetError(
                    f"labels must be class ids in [0, {classes}), found values in [{labels.min()}, {labels.max()}]"
                )
        elif len(output_shape) and labels.ndim != len(output_shape):
            raise InvalidEvalSetError(
                f"labels have shape {list(labels.shape)}; {self.kind.value!r} compares them with an "
                f"output of rank {len(output_shape)}"
            )

    def per_sample(self, outputs: np.ndarray, labels: np.ndarray | None, reference: np.ndarray | None) -> np.ndarray:
        """Score of each sample of a batch (``outputs`` has the sample axis first)."""
        out = outputs.astype(np.float32, copy=False)
        n = out.shape[0]
        kind = self.kind
        if kind in (MetricKind.ACCURACY, MetricKind.AGREEMENT):
            target = labels if kind is MetricKind.ACCURACY else np.argmax(reference, axis=-1)  # type: ignore[arg-type]
            hits = np.argmax(out, axis=-1) == target
            return hits.reshape(n, -1).mean(axis=1)
        if kind is MetricKind.TOPK:
            assert labels is not None
            k = min(self.top_k, out.shape[-1])
            label_scores = np.take_along_axis(out, labels[..., None].astype(np.int64), axis=-1)
            # rank = number of classes scoring strictly higher than the label
            rank = (out > label_scores).sum(axis=-1)
            return (rank < k).reshape(n, -1).mean(axis=1)
        if kind in (MetricKind.MSE, MetricKind.MAE):
            assert labels is not None
            diff = out - labels.astype(np.float32).reshape(out.shape)
            err = diff * diff if kind is MetricKind.MSE else np.abs(diff)
            return err.reshape(n, -1).mean(axis=1)
        assert reference is not None
        a = out.reshape(n, -1).astype(np.float64)
        b = reference.reshape(n, -1).astype(np.float64)
        na = np.linalg.norm(a, axis=1)
        nb = np.linalg.norm(b, axis=1)
        dot = (a * b).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where((na == 0) & (nb == 0), 1.0, dot / (na * nb))
        return np.nan_to_num(np.clip(cos, -1.0, 1.0), nan=0.0)

    def loss(self, baseline: float, value: float) -> float:
        """How much worse ``value`` is than ``baseline`` (negative when better)."""
        return baseline - value if self.higher_is_better else value - baseline

    def passing_bound(self, baseline: float, allowed_loss: float) -> float:
        """The worst metric value that still passes."""
        return baseline - allowed_loss if self.higher_is_better else baseline + allowed_loss

    def cannot_pass(self, score_sum: float, seen: int, total: int, bound: float) -> bool:
        """True when, even if every unseen sample scored ``best``, the mean misses ``bound``."""
        optimistic = (score_sum + (total - seen) * self.best) / total
        eps = 1e-9
        return optimistic < bound - eps if self.higher_is_better else optimistic > bound + eps
