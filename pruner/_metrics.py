"""Metrics: per-sample scores whose mean is the metric, with exact early-stop bounds.

Every built-in metric but ``rank_correlation`` gives one score per sample and the metric is
their mean. A score that cannot beat ``best`` makes early abandonment exact: once even a
``best`` score for every unseen sample cannot bring the mean within the bound, the candidate
fails. ``rank_correlation`` compares the order of all samples, so it is computed over the
whole split and never stops early; so does a custom metric without a declared ``best``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

from ._errors import InvalidConfigError, InvalidEvalSetError, PrunerError
from ._options import SEQUENCE_METRICS, CustomMetric, MetricKind, PruneOptions

__all__ = ["PLUGIN_GROUP", "Metric", "load_metric", "metric_plugins", "plugin_metric"]

PLUGIN_GROUP = "onnx_pruner.metrics"
"""Entry-point group of installed metrics (the server offers these, by name)."""

_PROBABILITY_SLACK = 1e-3
"""How far a reference row's sum may be from 1 and still be read as probabilities (``kl``)."""
_LOG_FLOOR = 1e-12
"""Smallest probability ``kl`` takes the log of: a class the candidate gives no mass costs ~27.6 nats."""


@dataclass(frozen=True)
class Metric:
    """A metric over one model output (sample axis first).

    ``per_sample`` turns a batch of outputs into one score per sample; the metric is
    their mean (``value``), except for whole-set metrics (``whole_set``).
    """

    kind: MetricKind | CustomMetric
    top_k: int = 5
    threshold: float = 0.5
    column: int | None = None
    pad_id: int | None = None
    ctc_blank: int | None = None
    sequence_mask: str | None = None

    @classmethod
    def from_options(cls, options: PruneOptions) -> Metric:
        return cls(
            options.metric,
            top_k=options.top_k,
            threshold=options.threshold,
            column=options.column,
            pad_id=options.pad_id,
            ctc_blank=options.ctc_blank,
            sequence_mask=options.sequence_mask,
        )

    @property
    def name(self) -> str:
        return self.kind.value if isinstance(self.kind, MetricKind) else self.kind.name

    @property
    def higher_is_better(self) -> bool:
        return self.kind.higher_is_better

    @property
    def needs_labels(self) -> bool:
        return self.kind.needs_labels

    @property
    def whole_set(self) -> bool:
        """True when the metric is not a mean of per-sample scores (no early stopping)."""
        return self.kind is MetricKind.RANK_CORRELATION

    @property
    def best(self) -> float | None:
        """Best possible per-sample score; None when there is none (no early stopping)."""
        if isinstance(self.kind, CustomMetric):
            return self.kind.best
        return 1.0 if self.higher_is_better else 0.0

    @property
    def uses_labels(self) -> bool:
        """Whether labels, when the eval set has them, are the target (else the unpruned model is)."""
        if isinstance(self.kind, CustomMetric):
            return True
        return self.needs_labels or self.kind in (MetricKind.DICE, MetricKind.IOU, MetricKind.RANK_CORRELATION)

    def check_labels(self, labels: np.ndarray | None, output_shape: tuple[int | None, ...]) -> None:
        """Raise InvalidEvalSetError when labels do not fit this metric and output (sample axis first)."""
        kind = self.kind
        if self.column is not None and output_shape:
            classes = output_shape[-1]
            if classes is not None and not -classes <= self.column < classes:
                raise InvalidConfigError(
                    f"column {self.column} is out of range: output's last axis has {classes} entries"
                )
        if self.needs_labels and labels is None:
            hint = "" if isinstance(kind, CustomMetric) else "; without labels use 'agreement' or 'cosine'"
            raise InvalidEvalSetError(f"metric {self.name!r} needs an array named 'labels' in the eval set{hint}")
        if labels is None or isinstance(kind, CustomMetric) or not self.uses_labels:
            return
        if kind in (MetricKind.ACCURACY, MetricKind.TOPK):
            if labels.dtype.kind not in "iu":
                raise InvalidEvalSetError(f"metric {self.name!r} needs integer class labels, got dtype {labels.dtype}")
            if len(output_shape) >= 1 and labels.ndim != max(len(output_shape) - 1, 1):
                raise InvalidEvalSetError(
                    f"labels have shape {list(labels.shape)}; for an output of rank {len(output_shape)} "
                    f"{self.name!r} needs labels of rank {max(len(output_shape) - 1, 1)} (class ids)"
                )
            classes = output_shape[-1] if output_shape else None
            valid = labels if self.pad_id is None else labels[labels != self.pad_id]
            if valid.size and (valid.min() < 0 or (classes is not None and valid.max() >= classes)):
                raise InvalidEvalSetError(
                    f"labels must be class ids in [0, {classes}), found values in [{valid.min()}, {valid.max()}]"
                )
            return
        rank = len(output_shape) - (self.column is not None)
        if kind is MetricKind.RANK_CORRELATION:
            if labels.ndim != 1 and labels.reshape(labels.shape[0], -1).shape[1] != 1:
                raise InvalidEvalSetError(
                    f"labels have shape {list(labels.shape)}; 'rank_correlation' needs one score per sample"
                )
        elif len(output_shape) and labels.ndim != rank:
            what = "output[..., column]" if self.column is not None else "an output"
            raise InvalidEvalSetError(
                f"labels have shape {list(labels.shape)}; {self.name!r} compares them with {what} of rank {rank}"
            )

    def check_mask(self, mask: np.ndarray | None) -> None:
        """Raise InvalidEvalSetError when the ``sequence_mask`` array is missing."""
        if self.sequence_mask is not None and mask is None:
            raise InvalidEvalSetError(
                f"sequence_mask {self.sequence_mask!r} is not an array of the eval set; name one of its inputs"
            )

    def reference_summary(self, reference: np.ndarray, *, labels: bool) -> np.ndarray | None:
        """What ``per_sample`` reads of the unpruned model's output (a batch, sample axis first)
        when that is much less than the output, else None (it reads the output whole).

        ``labels``: the eval set's labels are the target (``uses_labels`` and the eval set has
        them). ``agreement`` and the sequence metrics read the argmax ids (as the smallest
        integer type that holds them); a metric scored against labels reads nothing of it (an
        array of no columns). ``per_sample`` takes the summary in place of the output.
        """
        kind = self.kind
        if isinstance(kind, CustomMetric) or self.whole_set:
            return None
        n = reference.shape[0]
        if labels and (kind.needs_labels or kind in (MetricKind.DICE, MetricKind.IOU)):
            return np.zeros((n, 0), np.int8)
        if kind is MetricKind.AGREEMENT and reference.ndim >= 2:
            return _narrow(np.argmax(reference, axis=-1), reference.shape[-1], self.pad_id)
        if kind in SEQUENCE_METRICS and reference.dtype.kind not in "iub":
            return _narrow(self._ids(reference), reference.shape[-1], self.pad_id, self.ctc_blank)
        return None

    def value(
        self,
        outputs: np.ndarray,
        labels: np.ndarray | None,
        reference: np.ndarray | None,
        mask: np.ndarray | None = None,
    ) -> float:
        """The metric over these samples."""
        if not len(outputs):
            return float("nan")
        if self.whole_set:
            return self.correlate(self.scores(outputs), labels, reference)
        return float(self.per_sample(outputs, labels, reference, mask).mean())

    def correlate(self, scores: np.ndarray, labels: np.ndarray | None, reference: np.ndarray | None) -> float:
        """``rank_correlation`` of the candidate's ``scores`` with the labels, else the unpruned model's scores."""
        if labels is not None:
            return spearman(scores, self.scores(labels.astype(np.float64), what="labels"))
        assert reference is not None
        return spearman(scores, self.scores(reference))

    def scores(self, values: np.ndarray, *, what: str | None = None) -> np.ndarray:
        """One score per sample: ``values[..., column]`` (float64), for ``rank_correlation``."""
        n = values.shape[0]
        picked = self._column(values.astype(np.float64, copy=False)) if what is None else values
        flat = picked.reshape(n, -1)
        if flat.shape[1] != 1:
            source = what or ("output[..., column]" if self.column is not None else "the output")
            hint = "" if what or self.column is not None else "; choose one with the column option"
            raise InvalidConfigError(
                f"metric {self.name!r} needs one score per sample; {source} has shape {list(picked.shape)}{hint}"
            )
        return flat[:, 0]

    def per_sample(
        self,
        outputs: np.ndarray,
        labels: np.ndarray | None,
        reference: np.ndarray | None,
        mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """Score of each sample of a batch (``outputs`` has the sample axis first).

        ``mask`` holds the rows of the ``sequence_mask`` array, when the metric has one.
        ``reference`` is the unpruned model's output for the same samples, or its
        ``reference_summary``.
        """
        kind = self.kind
        if isinstance(kind, CustomMetric):
            assert reference is not None
            return _custom_scores(kind, outputs, labels, reference)
        if kind in SEQUENCE_METRICS:
            assert reference is not None
            return self._sequences(outputs, reference, mask)
        out = outputs.astype(np.float32, copy=False)
        n = out.shape[0]
        if kind in (MetricKind.ACCURACY, MetricKind.AGREEMENT):
            if kind is MetricKind.ACCURACY:
                target = labels
            else:
                assert reference is not None
                # the summary holds the argmax ids already: one axis fewer than the output
                target = reference if reference.ndim == out.ndim - 1 else np.argmax(reference, axis=-1)
            assert target is not None
            hits = np.argmax(out, axis=-1) == target
            valid = self._valid(target, mask)
            if valid is None:
                return hits.reshape(n, -1).mean(axis=1)
            return _share(hits.reshape(n, -1), valid.reshape(n, -1))
        if kind is MetricKind.TOPK:
            assert labels is not None
            k = min(self.top_k, out.shape[-1])
            label_scores = np.take_along_axis(out, labels[..., None].astype(np.int64), axis=-1)
            # rank = number of classes scoring strictly higher than the label
            rank = (out > label_scores).sum(axis=-1)
            return (rank < k).reshape(n, -1).mean(axis=1)
        if kind in (MetricKind.MSE, MetricKind.MAE):
            assert labels is not None
            picked = self._column(out)
            diff = picked - labels.astype(np.float32).reshape(picked.shape)
            err = diff * diff if kind is MetricKind.MSE else np.abs(diff)
            return err.reshape(n, -1).mean(axis=1)
        if kind is MetricKind.COLUMN_MAE:
            assert reference is not None
            gap = self._column(out).astype(np.float64) - self._column(reference).astype(np.float64)
            return np.abs(gap).reshape(n, -1).mean(axis=1)
        if kind in (MetricKind.DICE, MetricKind.IOU):
            return self._overlap(out, labels, reference)
        if kind is MetricKind.KL:
            assert reference is not None
            return _kl(out, reference)
        if kind is MetricKind.RANK_CORRELATION:
            raise TypeError("rank_correlation is a whole-set metric: use value()")
        assert reference is not None
        a = out.reshape(n, -1).astype(np.float64)
        b = reference.reshape(n, -1).astype(np.float64)
        na = np.linalg.norm(a, axis=1)
        nb = np.linalg.norm(b, axis=1)
        dot = (a * b).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where((na == 0) & (nb == 0), 1.0, dot / (na * nb))
        return np.nan_to_num(np.clip(cos, -1.0, 1.0), nan=0.0)

    def _column(self, values: np.ndarray) -> np.ndarray:
        return values if self.column is None else values[..., self.column]

    def _valid(self, target: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
        """Positions that count (None: all of them)."""
        valid = None if self.pad_id is None else target != self.pad_id
        if mask is not None:
            if mask.shape != target.shape:
                raise InvalidEvalSetError(
                    f"sequence_mask {self.sequence_mask!r} has shape {list(mask.shape)} per batch; the output's "
                    f"positions have shape {list(target.shape)} (samples first, the class axis last)"
                )
            valid = (mask != 0) if valid is None else valid & (mask != 0)
        return valid

    def _overlap(self, out: np.ndarray, labels: np.ndarray | None, reference: np.ndarray | None) -> np.ndarray:
        n = out.shape[0]
        pred = (self._column(out) > self.threshold).reshape(n, -1)
        if labels is not None:
            target = labels.reshape(pred.shape) != 0
        else:
            assert reference is not None
            target = (self._column(reference) > self.threshold).reshape(n, -1)
        inter = (pred & target).sum(axis=1).astype(np.float64)
        sizes = pred.sum(axis=1) + target.sum(axis=1)
        if self.kind is MetricKind.DICE:
            num, den = 2 * inter, sizes
        else:
            num, den = inter, sizes - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den == 0, 1.0, num / np.maximum(den, 1))

    def _ids(self, values: np.ndarray) -> np.ndarray:
        """Token ids [samples, positions]: integer outputs as they are, scores by argmax of the last axis."""
        if values.dtype.kind in "iub":
            ids = values.astype(np.int64).reshape(values.shape[0], -1)
            return ids
        if values.ndim != 3:
            raise InvalidConfigError(
                f"metric {self.name!r} reads outputs of shape [samples, positions, classes] (or integer ids "
                f"[samples, positions]); the output has shape {list(values.shape)}"
            )
        return np.argmax(values, axis=-1)

    def _decode(self, ids: np.ndarray, valid: np.ndarray | None) -> list[np.ndarray]:
        out = []
        for i, row in enumerate(ids):
            seq = row if valid is None else row[valid[i]]
            if self.ctc_blank is not None:
                keep = np.ones(len(seq), bool)
                keep[1:] = seq[1:] != seq[:-1]
                seq = seq[keep]
                seq = seq[seq != self.ctc_blank]
            if self.pad_id is not None:
                seq = seq[seq != self.pad_id]
            out.append(seq)
        return out

    def _sequences(self, outputs: np.ndarray, reference: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        ids, ref_ids = self._ids(outputs), self._ids(reference)
        valid = None
        if mask is not None:
            if mask.reshape(mask.shape[0], -1).shape != ids.shape:
                raise InvalidEvalSetError(
                    f"sequence_mask {self.sequence_mask!r} has shape {list(mask.shape)} per batch; the output's "
                    f"positions have shape {list(ids.shape)}"
                )
            valid = mask.reshape(ids.shape) != 0
        got, want = self._decode(ids, valid), self._decode(ref_ids, valid)
        if self.kind is MetricKind.SEQUENCE_MATCH:
            return np.array([np.array_equal(a, b) for a, b in zip(got, want, strict=True)], np.float64)
        return np.array(
            [1.0 - edit_distance(a, b) / max(len(a), len(b), 1) for a, b in zip(got, want, strict=True)], np.float64
        )

    def loss(self, baseline: float, value: float) -> float:
        """How much worse ``value`` is than ``baseline`` (negative when better)."""
        return baseline - value if self.higher_is_better else value - baseline

    def passing_bound(self, baseline: float, allowed_loss: float) -> float:
        """The worst metric value that still passes."""
        return baseline - allowed_loss if self.higher_is_better else baseline + allowed_loss

    def cannot_pass(self, score_sum: float, seen: int, total: int, bound: float) -> bool:
        """True when, even if every unseen sample scored ``best``, the mean misses ``bound``.

        Always False for a metric without a per-sample bound or that is not a mean.
        """
        best = self.best
        if best is None or self.whole_set:
            return False
        optimistic = (score_sum + (total - seen) * best) / total
        eps = 1e-9
        return optimistic < bound - eps if self.higher_is_better else optimistic > bound + eps


def _narrow(ids: np.ndarray, classes: int, *others: int | None) -> np.ndarray:
    """``ids`` (in ``[0, classes)``) as the smallest signed integer type that also holds ``others``
    (the ids it is compared with, as ``pad_id``)."""
    values = [classes, *(abs(v) + 1 for v in others if v is not None)]
    for dtype in (np.int8, np.int16, np.int32):
        if max(values) <= np.iinfo(dtype).max:
            return ids.astype(dtype)
    return ids.astype(np.int64)


def _share(hits: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per row, the share of valid positions that hit; 1.0 for a row without valid positions."""
    count = valid.sum(axis=1)
    agree = (hits & valid).sum(axis=1)
    return np.where(count == 0, 1.0, agree / np.maximum(count, 1))


def edit_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Levenshtein distance of two id sequences (a row at a time, vectorized along ``b``)."""
    if not len(a) or not len(b):
        return max(len(a), len(b))
    steps = np.arange(len(b) + 1)
    row = steps.copy()
    for token in a:
        # substitution or deletion from the row above; insertions by a running minimum along the row
        diag = row[:-1] + (b != token)
        new = np.empty_like(row)
        new[0] = row[0] + 1
        new[1:] = np.minimum(row[1:] + 1, diag)
        row = np.minimum.accumulate(new - steps) + steps
    return int(row[-1])


def _kl(out: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """KL(reference || candidate) per sample, over the last axis, averaged over other positions.

    A reference row that is a distribution (non-negative, summing to 1) is read as
    probabilities, and so is the candidate's row; any other row as logits (softmax). One
    column is a Bernoulli probability (sigmoid of a logit when outside [0, 1]).
    """
    n = out.shape[0]
    classes = out.shape[-1] if out.ndim > 1 else 1
    p = reference.astype(np.float64).reshape(n, -1, classes)
    q = out.astype(np.float64).reshape(n, -1, classes)
    if classes == 1:
        is_prob = np.asarray(((p >= 0) & (p <= 1)).all(axis=(1, 2)))[:, None, None]
        p = np.where(is_prob, p, _sigmoid(p))
        q = np.where(is_prob, q, _sigmoid(q))
        p, q = np.concatenate([1 - p, p], axis=-1), np.concatenate([1 - q, q], axis=-1)
    else:
        sums = p.sum(axis=-1)
        is_prob = ((p >= 0).all(axis=(1, 2)) & (np.abs(sums - 1) <= _PROBABILITY_SLACK).all(axis=1))[:, None, None]
        p = np.where(is_prob, p, _softmax(p))
        q = np.where(is_prob, q, _softmax(q))
    p = np.clip(p, 0.0, 1.0)
    q = np.clip(q, _LOG_FLOOR, 1.0)
    p = p / np.maximum(p.sum(axis=-1, keepdims=True), _LOG_FLOOR)
    q = q / q.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(np.maximum(p, _LOG_FLOOR)) - np.log(q)), 0.0)
    kl = np.maximum(terms.sum(axis=-1), 0.0).mean(axis=1)
    # a candidate whose output is not finite is as far as it gets
    return np.where(np.isfinite(kl), kl, np.inf)


def _softmax(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        shifted = x - x.max(axis=-1, keepdims=True)
        e = np.exp(shifted)
        return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    ordered = x[order]
    first = np.r_[True, ordered[1:] != ordered[:-1]]
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = ((starts + ends - 1) / 2)[np.cumsum(first) - 1]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two score vectors (average ranks for ties).

    Both constant: 1.0 (same order); one constant: 0.0; a non-finite score: -1.0, the worst.
    """
    if not len(a):
        return float("nan")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return -1.0
    ra, rb = _ranks(a) - (len(a) - 1) / 2, _ranks(b) - (len(b) - 1) / 2
    sa, sb = (ra * ra).sum(), (rb * rb).sum()
    if sa == 0 or sb == 0:
        return 1.0 if sa == sb else 0.0
    # one square root of the product: identical orders give exactly 1
    return float(np.clip((ra * rb).sum() / np.sqrt(sa * sb), -1.0, 1.0))


def _custom_scores(
    metric: CustomMetric, outputs: np.ndarray, labels: np.ndarray | None, reference: np.ndarray
) -> np.ndarray:
    n = outputs.shape[0]
    try:
        raw = metric.fn(outputs, labels, reference)
    except PrunerError:
        raise
    except Exception as e:
        raise InvalidConfigError(f"custom metric {metric.name!r} raised {type(e).__name__}: {e}") from e
    try:
        scores = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InvalidConfigError(
            f"custom metric {metric.name!r} returned {type(raw).__name__}, not an array of {n} scores"
        ) from e
    if scores.shape != (n,):
        raise InvalidConfigError(
            f"custom metric {metric.name!r} returned shape {list(scores.shape)}; it must return one score "
            f"per sample, shape [{n}]"
        )
    finite = np.isfinite(scores)
    if not finite.all():
        if np.issubdtype(outputs.dtype, np.floating) and np.isfinite(outputs).all():
            raise InvalidConfigError(
                f"custom metric {metric.name!r} returned NaN or Inf for finite outputs "
                f"({int((~finite).sum())} of {n} scores); its scores must be finite numbers"
            )
        # the candidate's own output is not finite: it scores the worst there is
        scores = np.where(finite, scores, -np.inf if metric.higher_is_better else np.inf)
    if metric.best is not None:
        beyond = scores > metric.best if metric.higher_is_better else scores < metric.best
        if beyond.any():
            bad = float(scores[beyond][0])
            raise InvalidConfigError(
                f"custom metric {metric.name!r} returned {bad:g}, better than its declared best {metric.best:g}; "
                "fix best (early stopping relies on it) or the scores"
            )
    return scores


def _as_metric(obj: Any, name: str, where: str) -> CustomMetric:
    """A ``CustomMetric``, a factory of one (callable without arguments), or a scoring function."""
    if isinstance(obj, CustomMetric):
        return obj
    if not callable(obj):
        raise InvalidConfigError(f"{where} is a {type(obj).__name__}, not a CustomMetric or a function")
    try:
        required = sum(
            1
            for p in inspect.signature(obj).parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        )
    except (TypeError, ValueError):
        required = 3  # a builtin without a signature: take it as a scoring function
    if not required:
        try:
            made = obj()
        except PrunerError:
            raise
        except Exception as e:
            raise InvalidConfigError(f"metric factory {where} raised {type(e).__name__}: {e}") from e
        if not isinstance(made, CustomMetric):
            raise InvalidConfigError(f"metric factory {where} returned a {type(made).__name__}, not a CustomMetric")
        return made
    best = getattr(obj, "best", None)
    return CustomMetric(
        name=name,
        fn=obj,
        higher_is_better=getattr(obj, "higher_is_better", True),
        best=None if best is None else float(best),
        needs_labels=getattr(obj, "needs_labels", False),
    )


def load_metric(spec: str) -> CustomMetric:
    """Import a metric of your own from ``"module:attribute"`` (the CLI's ``--metric module:function``).

    The attribute is a :class:`CustomMetric`, a function returning one (called without
    arguments), or a scoring function ``fn(outputs, labels, reference) -> scores`` (named
    ``spec``; its attributes ``higher_is_better``, ``best`` and ``needs_labels`` are read
    when present). This imports and runs the module: use it for your own code only.

    Raises:
        InvalidConfigError: ``spec`` is malformed, cannot be imported, or names something else.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name.strip() or not attribute.strip():
        raise InvalidConfigError(f"metric {spec!r} is neither a built-in metric nor 'module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:
        raise InvalidConfigError(f"cannot import module {module_name!r} of metric {spec!r}: {e}") from e
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise InvalidConfigError(f"metric {spec!r}: module {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    return _as_metric(obj, spec, repr(spec))


def _entry_points() -> dict[str, metadata.EntryPoint]:
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=PLUGIN_GROUP):
        found.setdefault(ep.name, ep)
    return found


def metric_plugins() -> dict[str, str]:
    """Installed metrics: entry-point name -> ``"module:attribute"``, in the
    ``onnx_pruner.metrics`` group (nothing is imported)."""
    return {name: ep.value for name, ep in sorted(_entry_points().items())}


def plugin_metric(name: str) -> CustomMetric:
    """The installed metric ``name`` (an entry point of the ``onnx_pruner.metrics`` group),
    named ``name`` in the report. Only installed code runs: what a server offers.

    Raises:
        InvalidConfigError: no such plugin, or it fails to load or is not a metric.
    """
    entry = _entry_points().get(name)
    if entry is None:
        installed = ", ".join(sorted(_entry_points())) or "none"
        raise InvalidConfigError(f"no metric plugin {name!r} is installed (installed: {installed})")
    try:
        obj = entry.load()
    except Exception as e:
        raise InvalidConfigError(f"metric plugin {name!r} ({entry.value}) failed to load: {e}") from e
    metric = _as_metric(obj, name, f"metric plugin {name!r} ({entry.value})")
    return metric if metric.name == name else dataclasses.replace(metric, name=name)
