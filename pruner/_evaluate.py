"""Running candidates through onnxruntime, cheaply.

The model is serialized once. A candidate only swaps weight tensors, which
onnxruntime takes through ``SessionOptions.add_initializer``: no protobuf
work per candidate, and the pruned weights stay constant initializers so
onnxruntime still pre-packs and folds them like in the deployed model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from ._errors import CancelledError, UnsupportedModelError
from ._evalset import EvalSet, InputSpec
from ._metrics import Metric

__all__ = ["EvalOutcome", "Evaluator", "make_session"]

logger = logging.getLogger(__name__)


def make_session(
    source: str | bytes,
    *,
    threads: int = 0,
    overrides: Mapping[str, np.ndarray] | None = None,
) -> ort.InferenceSession:
    """An onnxruntime CPU session, with weights optionally replaced by ``overrides``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    keep = []
    for name, array in (overrides or {}).items():
        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
        keep.append(value)
        options.add_initializer(name, value)
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise UnsupportedModelError(f"onnxruntime cannot load the model: {_first_line(e)}") from e
    # the OrtValues must outlive the session that reads them
    session._pruner_keep = keep  # type: ignore[attr-defined]
    return session


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass(frozen=True)
class EvalOutcome:
    """Result of evaluating one candidate on a set of samples."""

    value: float
    """Metric over the samples seen; over all samples when ``complete``."""
    complete: bool
    """False when stopped early because the candidate could no longer pass."""
    samples: int
    seconds: float


class Evaluator:
    """Batched metric evaluation of candidates on an eval set.

    Args:
        source: the serialized model (or a path for models over 2 GB).
        specs: the model inputs, for fixed batch dimensions.
        output: the output the metric reads.
        metric: the metric.
        evalset: all samples; evaluation calls select rows by index.
        reference: the unpruned model's ``output`` for every sample, for
            label-free metrics and probes.
    """

    def __init__(
        self,
        source: str | bytes,
        specs: list[InputSpec],
        output: str,
        metric: Metric,
        evalset: EvalSet,
        *,
        batch_size: int,
        threads: int = 0,
        stop: threading.Event | None = None,
    ) -> None:
        self.source = source
        self.output = output
        self.metric = metric
        self.evalset = evalset
        self.threads = threads
        self.stop = stop
        fixed = {s.fixed_batch for s in specs if s.fixed_batch is not None}
        if len(fixed) > 1:
            raise UnsupportedModelError(f"model inputs have different fixed batch sizes {sorted(fixed)}")
        self.fixed_batch = fixed.pop() if fixed else None
        self.batch_size = self.fixed_batch or batch_size
        self.reference: np.ndarray | None = None
        self.sessions_created = 0

    def session(self, overrides: Mapping[str, np.ndarray] | None = None) -> ort.InferenceSession:
        self.sessions_created += 1
        return make_session(self.source, threads=self.threads, overrides=overrides)

    def _batches(self, indices: np.ndarray) -> list[np.ndarray]:
        return [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]

    def run(self, session: ort.InferenceSession, rows: np.ndarray) -> np.ndarray:
        """The chosen output for ``rows`` (one batch)."""
        n = len(rows)
        if self.fixed_batch is not None and n < self.fixed_batch:
            rows = np.concatenate([rows, np.repeat(rows[-1:], self.fixed_batch - n)])
        feeds = {name: array[rows] for name, array in self.evalset.inputs.items()}
        try:
            (out,) = session.run([self.output], feeds)
        except Exception as e:  # onnxruntime raises its own exception types
            raise UnsupportedModelError(f"onnxruntime failed to run the model: {_first_line(e)}") from e
        out = np.asarray(out)
        if out.ndim == 0 or out.shape[0] != len(rows):
            raise UnsupportedModelError(
                f"output {self.output!r} has shape {list(out.shape)}: its first axis is not the sample axis"
            )
        return out[:n]

    def outputs(self, session: ort.InferenceSession, indices: np.ndarray) -> np.ndarray:
        """The chosen output for all ``indices``, in order."""
        return np.concatenate([self.run(session, b) for b in self._batches(indices)])

    def evaluate(
        self,
        indices: np.ndarray,
        *,
        overrides: Mapping[str, np.ndarray] | None = None,
        session: ort.InferenceSession | None = None,
        bound: float | None = None,
    ) -> EvalOutcome:
        """Metric on ``indices``; stops early once the mean cannot reach ``bound``."""
        start = time.perf_counter()
        session = session or self.session(overrides)
        labels = self.evalset.labels
        total = len(indices)
        score_sum = 0.0
        seen = 0
        for rows in self._batches(indices):
            if self.stop is not None and self.stop.is_set():
                raise CancelledError("the run was cancelled")
            out = self.run(session, rows)
            ref = None if self.reference is None else self.reference[rows]
            scores = self.metric.per_sample(out, None if labels is None else labels[rows], ref)
            score_sum += float(scores.sum())
            seen += len(rows)
            if bound is not None and seen < total and self.metric.cannot_pass(score_sum, seen, total, bound):
                return EvalOutcome(score_sum / seen, False, seen, time.perf_counter() - start)
        return EvalOutcome(score_sum / total, True, total, time.perf_counter() - start)

    def deviation(self, indices: np.ndarray, overrides: Mapping[str, np.ndarray]) -> float:
        """Relative squared error of the output vs the unpruned model: a smooth, label-free proxy."""
        assert self.reference is not None
        out = self.outputs(self.session(overrides), indices).astype(np.float64)
        ref = self.reference[indices].astype(np.float64)
        return float(((out - ref) ** 2).sum() / max((ref**2).sum(), 1e-30))
