"""Running candidates through onnxruntime, cheaply.

A model is split once into its prunable weights (numpy arrays, the source of
truth from then on) and the rest, serialized once. Candidates then run one of
two ways, whichever the run measures to be cheaper (always the first for
large weights, where it is also the one that holds no second copy of them):

* **fed**: one session of the rest, with the prunable weights turned into graph
  inputs that every run feeds. No session per candidate, no serialization.
* **built**: a session per candidate from the rest's bytes followed by the
  weights, each hand-encoded as a one-tensor ``ModelProto`` fragment: protobuf
  merges concatenated messages, so onnxruntime sees an ordinary model whose
  weights are real initializers (folded and pre-packed as in deployment).
  (``SessionOptions.add_initializer`` would be cheaper still, but onnxruntime
  ignores it where an optimizer folded the original tensor, e.g. float16
  weights behind an inserted Cast, so it cannot be trusted.)

The written model is always built the second way.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ._errors import InternalError, PrunerError, UnsupportedModelError, check_stop
from ._evalset import EvalSet, InputSpec, release_freed_memory
from ._executor import Executor, LocalExecutor
from ._metrics import Metric
from ._model import PROTOBUF_LIMIT, session_source

__all__ = [
    "COMPACT_REFERENCE",
    "Batches",
    "EvalOutcome",
    "Evaluator",
    "FedWeights",
    "ModelBuilder",
    "PortableRunner",
    "Rerun",
    "Runner",
    "SplitModel",
    "make_session",
    "run_session",
]

logger = logging.getLogger(__name__)

Runner = Callable[[Mapping[str, np.ndarray]], np.ndarray]
"""Runs one batch of model inputs and returns the output the metric reads."""

METRIC_CHUNK = 64
"""Samples per metric update (and early-abort test) at least."""

TRIM_AFTER_SECONDS = 0.01
"""A run at least this long is followed, before the next run, by handing freed memory back to the
system (``release_freed_memory``: about 0.1 ms when there is little to hand back)."""

FEEDABLE = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
"""Weight types onnxruntime's Python API accepts as numpy inputs."""


def make_session(source: str | bytes, *, threads: int = 0, arena: bool = False) -> ort.InferenceSession:
    """An onnxruntime CPU session (``arena``: with onnxruntime's memory arena, for a short-lived
    session whose runs return many large tensors, as calibration's probe)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # without the arena, memory goes back after each run instead of staying reserved for the
    # largest intermediate seen: fed weights are re-packed per run and would keep a copy here
    # (calibration's probe returns every layer input of a batch, 100+ MiB: unpooled, each run
    # page-faults all of it afresh, 2.4x the run's time on ppocr_cls; the session is dropped after)
    options.enable_cpu_mem_arena = arena
    # idle worker threads stop spinning when a run ends: numpy's fits and statistics run between
    # runs and a spinning thread takes one of their cores (sequential recovery ran 2-4x slower)
    options.add_session_config_entry("session.force_spinning_stop", "1")
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise UnsupportedModelError(f"onnxruntime cannot load the model: {_first_line(e)}") from e


def run_session(session: ort.InferenceSession, names: list[str], feeds: Mapping[str, np.ndarray]) -> list[Any]:
    """``session.run`` whose failures are ``UnsupportedModelError``s (onnxruntime raises its own types)."""
    try:
        return list(session.run(names, dict(feeds)))
    except Exception as e:
        raise UnsupportedModelError(f"onnxruntime failed to run the model: {_first_line(e)}") from e


def session_runner(session: ort.InferenceSession, output: str) -> Runner:
    def run(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.asarray(session.run([output], dict(feeds))[0])

    return run


class PortableRunner:
    """A runner that can also run elsewhere: on a worker that has only bytes and arrays.

    It is either a serialized model (``model()``, computed once) or the split model with
    its weights as inputs (``fed``, the same bytes for every candidate) and the candidate's
    ``weights``. Its own session is made on its first local run (an executor that runs it
    elsewhere never makes one here).
    """

    def __init__(
        self,
        output: str,
        *,
        model: Callable[[], bytes] | None = None,
        fed: FedWeights | None = None,
        weights: Mapping[str, np.ndarray] | None = None,
        local: Callable[[], Runner] | None = None,
        threads: int = 0,
    ) -> None:
        self.output = output
        self.fed = fed
        self.weights = weights
        self.threads = threads
        self._model = model
        self._bytes: bytes | None = None
        self._local = local
        self._run: Runner | None = None

    @property
    def portable(self) -> bool:
        return self.fed is not None or self._model is not None

    def model_bytes(self) -> bytes:
        if self._bytes is None:
            assert self._model is not None
            self._bytes = self._model()
        return self._bytes

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        if self._run is None:
            if self._local is not None:
                self._run = self._local()
            else:
                self._run = session_runner(make_session(self.model_bytes(), threads=self.threads), self.output)
        return self._run(feeds)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass
class SplitModel:
    """A model split into its prunable weights and everything else."""

    rest: onnx.ModelProto
    """The model without the prunable initializers and the Constant nodes that made weights."""
    weights: dict[str, np.ndarray]
    """The prunable weights in their original dtype, in the order they are written back."""
    data_types: dict[str, int]

    @classmethod
    def take(cls, model: onnx.ModelProto, names: set[str]) -> SplitModel:
        """Move the tensors ``names`` (initializers or Constant outputs) out of ``model``.

        ``model`` is emptied of them (pass a copy to keep the original) and should be
        dropped by the caller: its memory is released only with it.
        """
        weights: dict[str, np.ndarray] = {}
        data_types: dict[str, int] = {}

        def take_tensor(tensor: onnx.TensorProto, name: str) -> None:
            array = np.ascontiguousarray(numpy_helper.to_array(tensor))
            # raw data comes back as a read-only view of a bytes copy; the final model is pruned in place
            weights[name] = array if array.flags.writeable else array.copy()
            data_types[name] = tensor.data_type

        graph = model.graph
        taken = [i for i, t in enumerate(graph.initializer) if t.name in names]
        for i in taken:
            take_tensor(graph.initializer[i], graph.initializer[i].name)
        for i in reversed(taken):
            del graph.initializer[i]
        constants = [i for i, n in enumerate(graph.node) if n.op_type == "Constant" and n.output[0] in names]
        for i in constants:
            node = graph.node[i]
            take_tensor(next(a.t for a in node.attribute if a.name == "value"), node.output[0])
        for i in reversed(constants):
            del graph.node[i]
        # protobuf frees a message's memory only with the whole message: keep a fresh, small copy
        rest = onnx.ModelProto()
        rest.CopyFrom(model)
        return cls(rest, weights, data_types)

    @property
    def weight_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights.values())

    def fed(self, exposed: Sequence[str] = ()) -> onnx.ModelProto:
        """The rest of the model with the weights as graph inputs (and ``exposed`` tensors as outputs)."""
        fed = onnx.ModelProto()
        fed.CopyFrom(self.rest)
        existing = {i.name for i in fed.graph.input}
        for name, array in self.weights.items():
            if name not in existing:
                fed.graph.input.append(helper.make_tensor_value_info(name, self.data_types[name], list(array.shape)))
        outputs = {o.name for o in fed.graph.output}
        fed.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in exposed if n not in outputs)
        return fed


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload_size: int) -> bytes:
    """The key and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(payload_size)


def _fragment(name: str, data_type: int, array: np.ndarray) -> list[bytes | memoryview]:
    """The parts of a serialized ``ModelProto`` whose graph holds only this initializer.

    Hand-encoded so the weight's bytes are copied once, into the joined model,
    instead of into a TensorProto, its serialization and then the join.
    """
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    raw = np.ascontiguousarray(little).reshape(-1).view(np.uint8).data
    encoded_name = name.encode()
    head = b"".join(
        [
            *(_varint(1 << 3) + _varint(d) for d in array.shape),  # TensorProto.dims = 1
            _varint(2 << 3) + _varint(data_type),  # data_type = 2
            _field(8, len(encoded_name)) + encoded_name,  # name = 8
            _field(9, raw.nbytes),  # raw_data = 9
        ]
    )
    tensor_size = len(head) + raw.nbytes
    initializer = _field(5, tensor_size)  # GraphProto.initializer = 5
    graph = _field(7, len(initializer) + tensor_size)  # ModelProto.graph = 7
    return [graph, initializer, head, raw]


class ModelBuilder:
    """Serialized models of the split model with given weights."""

    def __init__(self, split: SplitModel) -> None:
        self.split = split
        self._prefix = split.rest.SerializeToString()
        self.large = len(self._prefix) + split.weight_bytes >= PROTOBUF_LIMIT

    def to_bytes(self, weights: Mapping[str, np.ndarray]) -> bytes:
        """The model with ``weights`` (all prunable tensors) as initializers."""
        parts: list[bytes | memoryview] = [self._prefix]
        for name, data_type in self.split.data_types.items():
            parts += _fragment(name, data_type, weights[name])
        return b"".join(parts)

    def to_proto(self, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
        model = onnx.ModelProto()
        if self.large:
            model.CopyFrom(self.split.rest)
            for name, data_type in self.split.data_types.items():
                tensor = numpy_helper.from_array(weights[name], name)
                assert tensor.data_type == data_type
                model.graph.initializer.append(tensor)
        else:
            model.ParseFromString(self.to_bytes(weights))
        return model

    @contextlib.contextmanager
    def source(self, weights: Mapping[str, np.ndarray]) -> Iterator[str | bytes]:
        """What onnxruntime should load: bytes, or a temporary path for models over 2 GB."""
        if not self.large:
            yield self.to_bytes(weights)
            return
        with session_source(self.to_proto(weights)) as source:
            yield source

    def session(self, weights: Mapping[str, np.ndarray], *, threads: int = 0) -> ort.InferenceSession:
        with self.source(weights) as source:
            return make_session(source, threads=threads)


class FedWeights:
    """One session of the split model with its prunable weights as graph inputs."""

    def __init__(self, split: SplitModel, output: str, *, threads: int = 0) -> None:
        self.output = output
        self.model = split.fed().SerializeToString()
        """What a worker elsewhere loads (the weights are its inputs: small, and the same for every candidate)."""
        self.session = make_session(self.model, threads=threads)

    @staticmethod
    def possible(split: SplitModel) -> bool:
        return all(t in FEEDABLE for t in split.data_types.values())

    def runner(self, weights: Mapping[str, np.ndarray]) -> PortableRunner:
        session, output, fixed = self.session, self.output, dict(weights)

        def run(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
            return np.asarray(session.run([output], {**feeds, **fixed})[0])

        return PortableRunner(output, fed=self, weights=fixed, local=lambda: run)


@dataclass(frozen=True)
class EvalOutcome:
    """Result of evaluating one candidate on a set of samples."""

    value: float
    """Metric over the samples seen; over all samples when ``complete``."""
    complete: bool
    """False when stopped early because the candidate could no longer pass."""
    samples: int
    seconds: float


class Batches:
    """Runs a model over rows of the eval set, batch by batch.

    Args:
        specs: the model inputs, for fixed batch dimensions.
        output: the output the metric reads.
        evalset: all samples; calls select rows by index.
        batch_size: rows per run (a fixed batch dimension of the model wins).
        stop: cancels a run (checked before every batch).
        input_axes: model inputs whose sample axis is not the first, and that axis: their
            batches are moved there before a run (the eval set stores samples first).
        output_axis: the output's sample axis; outputs are moved to samples first after a run.
    """

    def __init__(
        self,
        specs: Sequence[InputSpec],
        output: str,
        evalset: EvalSet,
        *,
        batch_size: int,
        stop: threading.Event | None = None,
        input_axes: Mapping[str, int] | None = None,
        output_axis: int = 0,
    ) -> None:
        self.input_axes = {k: v for k, v in (input_axes or {}).items() if v}
        self.output_axis = output_axis
        self.output = output
        self.evalset = evalset
        self.stop = stop
        fixed = {s.fixed_batch for s in specs if s.fixed_batch is not None}
        if len(fixed) > 1:
            raise UnsupportedModelError(
                f"model inputs have different fixed batch sizes {sorted(fixed)} on their first axis "
                "(set input_sample_axes for inputs whose sample axis is not the first)"
            )
        self.fixed_batch = fixed.pop() if fixed else None
        self.batch_size = self.fixed_batch or batch_size
        self.executor: Executor = LocalExecutor()
        """Where runs over many rows go (``prune`` sets the run's)."""
        self._release = False
        """Whether the last run was long enough that the memory it freed goes back before the next."""

    def shippable(self) -> Batches:
        """A copy to send to a worker: no stop event (the driver checks it) and a local executor."""
        copy = Batches.__new__(Batches)
        copy.__dict__.update(self.__dict__)
        copy.stop = None
        copy.executor = LocalExecutor()
        return copy

    def pieces(self, indices: np.ndarray) -> list[np.ndarray]:
        """``indices`` in pieces of whole batches (at least ``METRIC_CHUNK`` rows each): the unit
        of the metric's early-abort test, and of the work an executor hands out."""
        chunk = self.batch_size * max(1, METRIC_CHUNK // self.batch_size)
        return [indices[i : i + chunk] for i in range(0, len(indices), chunk)]

    def _batches(self, indices: np.ndarray) -> list[np.ndarray]:
        return [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]

    def run(self, runner: Runner, rows: np.ndarray) -> np.ndarray:
        """The chosen output for ``rows`` (one batch)."""
        check_stop(self.stop)
        n = len(rows)
        if self.fixed_batch is not None and n < self.fixed_batch:
            rows = np.concatenate([rows, np.repeat(rows[-1:], self.fixed_batch - n)])
        feeds = {name: array[rows] for name, array in self.evalset.inputs.items()}
        for name, axis in self.input_axes.items():
            feeds[name] = np.moveaxis(feeds[name], 0, axis)
        if self._release:
            # glibc keeps what the last run freed (its activations, a candidate's refit) in per-thread
            # arenas that this run's threads do not all reuse: held, a batch of 64 lines of ppocr_rec
            # peaked 430-510 MiB above its session, released first 232 MiB
            release_freed_memory()
        start = time.perf_counter()
        try:
            out = runner(feeds)
        except PrunerError:  # a portable runner builds its model on its first run: cancelled, or not runnable
            raise
        except Exception as e:  # onnxruntime raises its own exception types
            raise UnsupportedModelError(f"onnxruntime failed to run the model: {_first_line(e)}") from e
        self._release = time.perf_counter() - start >= TRIM_AFTER_SECONDS
        axis = self.output_axis
        if out.ndim <= axis or out.shape[axis] != len(rows):
            where = "first axis" if axis == 0 else f"axis {axis}"
            raise UnsupportedModelError(
                f"output {self.output!r} has shape {list(out.shape)} for a batch of {len(rows)}: its {where} is "
                "not the sample axis (set output_sample_axis, and input_sample_axes for inputs whose batch "
                "axis is not the first)"
            )
        return np.moveaxis(out, axis, 0)[:n] if axis else out[:n]

    def outputs(self, runner: Runner, indices: np.ndarray) -> np.ndarray:
        """The chosen output for all ``indices``, in order, written batch by batch into one array
        (a list of batches joined at the end would hold the outputs twice: 530 MB more on a
        500-line OCR recognizer's [40, 6625] logits). Rows that make one batch (a piece of an
        evaluation, usually) get the run's own array: a copy would be one more batch of
        outputs at the search's peak (68 MB of those logits)."""
        batches = self._batches(indices)
        if len(batches) == 1:
            return self.run(runner, batches[0])
        out: np.ndarray | None = None
        start = 0
        for batch in batches:
            got = self.run(runner, batch)
            if out is None:
                out = np.empty((len(indices), *got.shape[1:]), got.dtype)
            out[start : start + len(got)] = got
            start += len(got)
        assert out is not None, "outputs of no rows"
        return out

    def each_output(self, runner: Runner, indices: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows, the chosen output for them) a batch at a time: nothing of a batch is kept."""
        for batch in self._batches(indices):
            yield batch, self.run(runner, batch)


COMPACT_REFERENCE = True
"""Whether the evaluator keeps only the metric's ``reference_summary`` of the unpruned model's
output where the metric has one (False: the whole output, for every metric)."""


@dataclass(frozen=True)
class Rerun:
    """How to run the unpruned model again over rows of the eval set, in the very batches the
    baseline ran them in (so with the same bits): what the evaluator holds instead of the whole
    output of the rows it keeps, when that is the smaller of the two."""

    nbytes: int
    """What it holds (the serialized model)."""
    outputs: Callable[[np.ndarray], Iterable[tuple[np.ndarray, np.ndarray]]]
    """(rows, the unpruned model's output for them) over the baseline's batches that hold any of the given rows."""


def _store_kept(kept: np.ndarray, keep: np.ndarray, rows: np.ndarray, out: np.ndarray) -> int:
    """Write the outputs ``out`` of ``rows`` that are rows ``keep`` into ``kept`` (``keep``'s order);
    how many there were."""
    hit = np.isin(rows, keep)
    kept[np.searchsorted(keep, rows[hit])] = out[hit]
    return int(hit.sum())


SQUARED_SUM_ELEMENTS = 1 << 21
"""Elements ``_squared_sum`` casts to float64 at a time (16 MiB)."""


def _squared_sum(a: np.ndarray, b: np.ndarray | None) -> float:
    """The sum of (a - b)^2 (of a^2 without ``b``) in float64, a slice of the flattened arrays at a time."""
    a = a.reshape(-1)
    b = None if b is None else b.reshape(-1)
    total = 0.0
    for i in range(0, len(a), SQUARED_SUM_ELEMENTS):
        d = a[i : i + SQUARED_SUM_ELEMENTS].astype(np.float64)
        if b is not None:
            np.subtract(d, b[i : i + SQUARED_SUM_ELEMENTS], out=d)
        total += float(np.dot(d, d))
    return total


class Evaluator:
    """Batched metric evaluation of candidates against the unpruned model.

    Args:
        batches: runs models over the eval set.
        metric: the metric.
        reference: what the metric reads of the unpruned model's output for every sample of the
            eval set: the output itself, or its ``Metric.reference_summary``.
        scores: the unpruned model's per-sample scores on every sample (None: computed from
            ``reference``, which is then the whole output).
        kept: rows of the eval set (sorted) and the unpruned model's whole output for them: the
            rows the probes and gradients compare outputs on, when ``reference`` is a summary.
        deferred: rows of the eval set (sorted) whose whole output is computed on the first
            ``full_reference`` (then kept), and how: instead of ``kept``, when the rows' outputs are
            bigger than the model (an OCR recognizer's 128 probe rows are 136 MB, the model 11 MB,
            and a run whose evaluations end the search makes no probe).
    """

    def __init__(
        self,
        batches: Batches,
        metric: Metric,
        reference: np.ndarray,
        *,
        scores: np.ndarray | None = None,
        kept: tuple[np.ndarray, np.ndarray] | None = None,
        deferred: tuple[np.ndarray, Rerun] | None = None,
    ) -> None:
        self.batches = batches
        self.metric = metric
        self.reference = reference
        self.scores = scores
        self.kept = kept
        self.deferred = deferred
        self._energies: dict[bytes, float] = {}
        """The unpruned model's squared output summed over rows, by the rows' bytes (``deviation``)."""

    @classmethod
    def measure(
        cls,
        batches: Batches,
        metric: Metric,
        outputs: Iterable[tuple[np.ndarray, np.ndarray]],
        keep: np.ndarray,
        rerun: Rerun | None = None,
    ) -> Evaluator:
        """The evaluator of the unpruned model whose ``outputs`` are (rows, their output) over
        the whole eval set, a batch or piece at a time.

        Where the metric reads a summary of the output (``Metric.reference_summary``), only the
        summary of every row is kept, with the unpruned model's per-sample scores, and the whole
        output of the rows ``keep`` (an OCR recognizer's [40, 6625] logits are 1 MB a sample,
        their argmax ids 80 bytes), or ``rerun`` to compute it when first read if that holds
        less; else the whole output of every row.
        """
        metric_labels = batches.evalset.labels if metric.uses_labels else None
        mask_name = metric.sequence_mask
        mask = None if mask_name is None else batches.evalset.inputs.get(mask_name)
        count = len(batches.evalset)
        keep = np.unique(keep)
        reference: np.ndarray | None = None
        scores: np.ndarray | None = None
        kept: np.ndarray | None = None
        defer = False
        compact: bool | None = None
        for rows, out in outputs:
            summary = None
            if compact is not False and COMPACT_REFERENCE:
                summary = metric.reference_summary(out, labels=metric_labels is not None)
            if compact is None:
                compact = summary is not None
                held = out if summary is None else summary
                reference = np.empty((count, *held.shape[1:]), held.dtype)
                if compact:
                    scores = np.empty(count, np.float64)
                    row_bytes = out[:1].nbytes
                    defer = rerun is not None and len(keep) * row_bytes > rerun.nbytes
                    if not defer:
                        kept = np.empty((len(keep), *out.shape[1:]), out.dtype)
            assert reference is not None
            if summary is None:
                reference[rows] = out
                continue
            reference[rows] = summary
            assert scores is not None
            labels = None if metric_labels is None else metric_labels[rows]
            scores[rows] = metric.per_sample(out, labels, summary, None if mask is None else mask[rows])
            if kept is not None:
                _store_kept(kept, keep, rows, out)
        assert reference is not None, "outputs of no rows"
        return cls(
            batches,
            metric,
            reference,
            scores=scores,
            kept=None if kept is None else (keep, kept),
            deferred=(keep, rerun) if defer and rerun is not None else None,
        )

    @property
    def mask(self) -> np.ndarray | None:
        """The metric's ``sequence_mask`` array of the eval set (all samples), if any."""
        name = self.metric.sequence_mask
        return None if name is None else self.batches.evalset.inputs.get(name)

    def _labels(self, indices: np.ndarray) -> np.ndarray | None:
        labels = self.batches.evalset.labels
        return None if labels is None else labels[indices]

    def reference_value(self, indices: np.ndarray) -> float:
        """The unpruned model's metric on ``indices``."""
        if self.scores is not None:
            return float(self.scores[indices].mean()) if len(indices) else float("nan")
        mask = self.mask
        labels = self._labels(indices) if self.metric.uses_labels else None
        reference = self.reference[indices]
        return self.metric.value(reference, labels, reference, None if mask is None else mask[indices])

    def reference_scores(self, indices: np.ndarray) -> np.ndarray:
        """The unpruned model's per-sample scores on ``indices``."""
        if self.scores is not None:
            return self.scores[indices]
        return self.per_sample(self.reference[indices], indices)

    def full_reference(self, indices: np.ndarray) -> np.ndarray:
        """The unpruned model's whole output for ``indices`` (all of them kept rows, when the
        evaluator holds a summary). Read it, do not write it: all the kept rows in order are the
        kept array itself."""
        if self.deferred is not None:
            self.kept, self.deferred = self._rerun(*self.deferred), None
        if self.kept is None:
            return self.reference[indices]
        rows, values = self.kept
        if np.array_equal(rows, indices):
            return values
        at = np.minimum(np.searchsorted(rows, indices), len(rows) - 1)
        if not len(rows) or not np.array_equal(rows[at], indices):
            missing = np.setdiff1d(indices, rows)
            raise InternalError(f"the unpruned model's output of rows {missing[:5].tolist()} was not kept")
        return values[at]

    def _rerun(self, keep: np.ndarray, rerun: Rerun) -> tuple[np.ndarray, np.ndarray]:
        """The kept rows and their whole output, computed again as the baseline computed them."""
        start = time.perf_counter()
        kept: np.ndarray | None = None
        filled = 0
        for rows, out in rerun.outputs(keep):
            if kept is None:
                kept = np.empty((len(keep), *out.shape[1:]), out.dtype)
            filled += _store_kept(kept, keep, rows, out)
        if kept is None or filled != len(keep):
            raise InternalError(f"running the unpruned model again gave {filled} of {len(keep)} rows")
        seconds = time.perf_counter() - start
        logger.debug("the unpruned model's whole output of %d row(s), again, in %.3f s", len(keep), seconds)
        return keep, kept

    def per_sample(self, outputs: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """Per-sample scores of ``outputs`` (the outputs of ``indices``), for the held-out rules:
        the scores whose mean ``evaluate`` gives (the same labels and ``sequence_mask``)."""
        mask = self.mask
        labels = self._labels(indices) if self.metric.uses_labels else None
        return self.metric.per_sample(outputs, labels, self.reference[indices], None if mask is None else mask[indices])

    def evaluate(self, indices: np.ndarray, runner: Runner, *, bound: float | None = None) -> EvalOutcome:
        """Metric on ``indices``; stops early once the mean cannot reach ``bound``."""
        start = time.perf_counter()
        batches = self.batches
        # the metric and the early-abort test run per chunk of batches: per batch of one,
        # their Python overhead would cost more than the model
        pieces = batches.pieces(indices)
        return self._score(indices, pieces, batches.executor.outputs(batches, runner, pieces), bound, start)

    def evaluate_many(
        self, indices: np.ndarray, runners: Sequence[Callable[[], Runner]], *, bound: float | None = None
    ) -> list[EvalOutcome]:
        """:meth:`evaluate` of each runner (made when the executor needs it), run together where
        the executor can (``Executor.outputs_many``); each stops early on its own."""
        batches = self.batches
        pieces = batches.pieces(indices)
        streams = batches.executor.outputs_many(batches, [(make, pieces) for make in runners])
        try:
            return [self._score(indices, pieces, stream, bound, time.perf_counter()) for stream in streams]
        finally:
            for stream in streams:  # after an error: abandon the ones not consumed
                stream.close()

    def _score(
        self,
        indices: np.ndarray,
        pieces: list[np.ndarray],
        outputs: Generator[np.ndarray, None, None],
        bound: float | None,
        start: float,
    ) -> EvalOutcome:
        """The metric of ``outputs``, the outputs of ``pieces`` of ``indices`` in order."""
        metric, batches = self.metric, self.batches
        labels = batches.evalset.labels if metric.uses_labels else None
        mask = self.mask
        total = len(indices)
        score_sum = 0.0
        seen = 0
        if metric.whole_set:  # a correlation: every sample's score first, never an early stop
            parts = [metric.scores(out) for out in outputs]
            scores = np.concatenate(parts) if parts else np.zeros(0)
            value = metric.correlate(scores, None if labels is None else labels[indices], self.reference[indices])
            return EvalOutcome(value, True, total, time.perf_counter() - start)
        with contextlib.closing(outputs):  # an early stop abandons the pieces still out
            for rows, out in zip(pieces, outputs, strict=False):
                scores = metric.per_sample(
                    out,
                    None if labels is None else labels[rows],
                    self.reference[rows],
                    None if mask is None else mask[rows],
                )
                score_sum += float(scores.sum())
                seen += len(rows)
                if bound is not None and seen < total and metric.cannot_pass(score_sum, seen, total, bound):
                    logger.debug(
                        "stopped after %d of %d samples: the mean can no longer reach %.6g", seen, total, bound
                    )
                    return EvalOutcome(score_sum / seen, False, seen, time.perf_counter() - start)
        return EvalOutcome(score_sum / total, True, total, time.perf_counter() - start)

    def deviation(self, indices: np.ndarray, runner: Runner) -> float:
        """Relative squared error of the output vs the unpruned model: a smooth, label-free proxy."""
        batches = self.batches
        ref = self.full_reference(indices)
        # summed a slice at a time in float64: an OCR recognizer's 128 probe rows are 136 MB, and a
        # whole float64 copy of them (or of the outputs) twice that
        error = 0.0
        start = 0
        for part in batches.executor.outputs(batches, runner, batches.pieces(indices)):
            if part.shape[1:] != ref.shape[1:]:
                raise UnsupportedModelError(
                    f"output {batches.output!r} has shape {list(part.shape[1:])} per sample on the probe rows, "
                    f"not the unpruned model's {list(ref.shape[1:])}"
                )
            error += _squared_sum(part, ref[start : start + len(part)])
            start += len(part)
        key = indices.tobytes()
        if key not in self._energies:
            self._energies[key] = _squared_sum(ref, None)
        return error / max(self._energies[key], 1e-30)
