"""Running candidates through onnxruntime, cheaply.

The model is serialized once, without the prunable weights. A candidate's
bytes are that prefix followed by its weights, each serialized as a one-tensor
``ModelProto`` fragment: protobuf merges concatenated messages, so onnxruntime
sees an ordinary model whose pruned weights are real initializers (folded and
pre-packed as in deployment) and the rest of the model is never re-serialized.
(``SessionOptions.add_initializer`` would avoid even that, but onnxruntime
ignores it where an optimizer folded the original tensor, e.g. float16 weights
behind an inserted Cast, so it cannot be trusted here.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from ._errors import CancelledError, UnsupportedModelError
from ._evalset import EvalSet, InputSpec
from ._metrics import Metric
from ._model import PROTOBUF_LIMIT, session_source

__all__ = ["EvalOutcome", "Evaluator", "make_session"]

logger = logging.getLogger(__name__)


def make_session(source: str | bytes, *, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime CPU session."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise UnsupportedModelError(f"onnxruntime cannot load the model: {_first_line(e)}") from e


def _fragment(tensor: onnx.TensorProto) -> bytes:
    """A serialized ModelProto holding only ``tensor`` as an initializer (to append to a model)."""
    holder = onnx.ModelProto()
    holder.graph.initializer.append(tensor)
    return holder.SerializeToString()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class CandidateModels:
    """Builds onnxruntime sessions of a model with some initializers replaced."""

    def __init__(self, model: onnx.ModelProto, swappable: set[str], *, threads: int = 0) -> None:
        self.threads = threads
        self.created = 0
        self._model = model
        self._large = model.ByteSize() >= PROTOBUF_LIMIT
        self._defaults: dict[str, bytes] = {}
        self._dtypes = {t.name: t.data_type for t in model.graph.initializer if t.name in swappable}
        if self._large:
            self._base = b""
            return
        base = onnx.ModelProto()
        base.CopyFrom(model)
        kept = []
        for tensor in base.graph.initializer:
            if tensor.name in swappable:
                self._defaults[tensor.name] = _fragment(tensor)
            else:
                kept.append(tensor)
        del base.graph.initializer[:]
        base.graph.initializer.extend(kept)
        self._base = base.SerializeToString()

    def session(self, overrides: Mapping[str, np.ndarray] | None = None) -> ort.InferenceSession:
        self.created += 1
        overrides = overrides or {}
        if self._large:
            return self._large_session(overrides)
        parts = [self._base]
        for name, default in self._defaults.items():
            array = overrides.get(name)
            parts.append(default if array is None else _fragment(numpy_helper.from_array(array, name)))
        return make_session(b"".join(parts), threads=self.threads)

    def _large_session(self, overrides: Mapping[str, np.ndarray]) -> ort.InferenceSession:
        copy = onnx.ModelProto()
        copy.CopyFrom(self._model)
        for tensor in copy.graph.initializer:
            if tensor.name in overrides:
                tensor.CopyFrom(numpy_helper.from_array(overrides[tensor.name], tensor.name))
        with session_source(copy) as source:
            return make_session(source, threads=self.threads)


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
        models: builds the sessions of candidates.
        specs: the model inputs, for fixed batch dimensions.
        output: the output the metric reads.
        metric: the metric.
        evalset: all samples; evaluation calls select rows by index.
        reference: the unpruned model's ``output`` for every sample, for
            label-free metrics and probes.
    """

    def __init__(
        self,
        models: CandidateModels | None,
        specs: list[InputSpec],
        output: str,
        metric: Metric,
        evalset: EvalSet,
        *,
        batch_size: int,
        stop: threading.Event | None = None,
    ) -> None:
        self.models = models
        self.output = output
        self.metric = metric
        self.evalset = evalset
        self.stop = stop
        fixed = {s.fixed_batch for s in specs if s.fixed_batch is not None}
        if len(fixed) > 1:
            raise UnsupportedModelError(f"model inputs have different fixed batch sizes {sorted(fixed)}")
        self.fixed_batch = fixed.pop() if fixed else None
        self.batch_size = self.fixed_batch or batch_size
        self.reference: np.ndarray | None = None

    def session(self, overrides: Mapping[str, np.ndarray] | None = None) -> ort.InferenceSession:
        if self.models is None:
            raise TypeError("this evaluator has no candidate models; pass a session")
        return self.models.session(overrides)

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
