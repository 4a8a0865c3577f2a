"""Conversions between the gRPC messages and the library's types, both directions."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

import pruner
from pruner import (
    AcceptanceRule,
    Allocation,
    Criterion,
    CustomMetric,
    EventKind,
    MetricKind,
    Mode,
    Objective,
    PruneOptions,
    Recovery,
    Tolerance,
)
from service._gen.onnxpruner.v1 import pruner_pb2 as pb

__all__ = [
    "BUILTIN_METRICS",
    "CHUNK_BYTES",
    "MAX_MESSAGE_BYTES",
    "MESSAGE_OVERHEAD",
    "EvalTensors",
    "event_from_proto",
    "event_to_proto",
    "inspection_to_proto",
    "metrics_to_proto",
    "options_from_proto",
    "options_to_proto",
    "server_metric",
]

CHUNK_BYTES = 1 << 20
"""Largest chunk either side sends (the proto's documented limit); the server refuses bigger ones."""
MESSAGE_OVERHEAD = 4096
"""What a message may add to its largest chunk (framing, an EvalTensor header's fields)."""
MAX_MESSAGE_BYTES = CHUNK_BYTES + MESSAGE_OVERHEAD
"""The server's gRPC receive limit: one message of the client's stream, serialized."""

# library enum <-> proto enum value; UNSPECIFIED (0) means the library's default
_MODES = {Mode.ZERO: pb.MODE_ZERO, Mode.REMOVE: pb.MODE_REMOVE, Mode.NM: pb.MODE_NM}
_CRITERIA = {
    Criterion.AUTO: pb.CRITERION_AUTO,
    Criterion.MAGNITUDE: pb.CRITERION_MAGNITUDE,
    Criterion.L1: pb.CRITERION_L1,
    Criterion.L2: pb.CRITERION_L2,
    Criterion.ACTIVATION: pb.CRITERION_ACTIVATION,
    Criterion.GRADIENT: pb.CRITERION_GRADIENT,
    Criterion.FISHER: pb.CRITERION_FISHER,
}
_RECOVERIES = {
    Recovery.NONE: pb.RECOVERY_NONE,
    Recovery.BIAS: pb.RECOVERY_BIAS,
    Recovery.LSQ: pb.RECOVERY_LSQ,
    Recovery.AUTO: pb.RECOVERY_AUTO,
    Recovery.SEQUENTIAL: pb.RECOVERY_SEQUENTIAL,
}
_ALLOCATIONS = {
    Allocation.GLOBAL: pb.ALLOCATION_GLOBAL,
    Allocation.NORMALIZED: pb.ALLOCATION_NORMALIZED,
    Allocation.LAMP: pb.ALLOCATION_LAMP,
    Allocation.UNIFORM: pb.ALLOCATION_UNIFORM,
    Allocation.SENSITIVITY: pb.ALLOCATION_SENSITIVITY,
    Allocation.AUTO: pb.ALLOCATION_AUTO,
}
_METRICS = {
    MetricKind.ACCURACY: pb.METRIC_ACCURACY,
    MetricKind.TOPK: pb.METRIC_TOPK,
    MetricKind.MSE: pb.METRIC_MSE,
    MetricKind.MAE: pb.METRIC_MAE,
    MetricKind.AGREEMENT: pb.METRIC_AGREEMENT,
    MetricKind.COSINE: pb.METRIC_COSINE,
    MetricKind.DICE: pb.METRIC_DICE,
    MetricKind.IOU: pb.METRIC_IOU,
    MetricKind.SEQUENCE_MATCH: pb.METRIC_SEQUENCE_MATCH,
    MetricKind.SEQUENCE_SIMILARITY: pb.METRIC_SEQUENCE_SIMILARITY,
    MetricKind.KL: pb.METRIC_KL,
    MetricKind.COLUMN_MAE: pb.METRIC_COLUMN_MAE,
    MetricKind.RANK_CORRELATION: pb.METRIC_RANK_CORRELATION,
}
BUILTIN_METRICS: dict[MetricKind, str] = {
    MetricKind.ACCURACY: "top-1 accuracy against class-id labels, per position for sequences "
    "(labels; reads pad_id, sequence_mask)",
    MetricKind.TOPK: "top-k accuracy against class-id labels (labels; reads top_k)",
    MetricKind.MSE: "mean squared error against labels (labels; reads column)",
    MetricKind.MAE: "mean absolute error against labels (labels; reads column)",
    MetricKind.AGREEMENT: "top-1 agreement with the unpruned model, per position for sequences "
    "(reads pad_id, sequence_mask)",
    MetricKind.COSINE: "cosine similarity to the unpruned model's output",
    MetricKind.DICE: "Dice overlap of the output above threshold with the labels' nonzero entries, "
    "or with the unpruned model's map (reads threshold, column)",
    MetricKind.IOU: "intersection over union, maps as dice (reads threshold, column)",
    MetricKind.SEQUENCE_MATCH: "share of samples whose decoded sequence is the unpruned model's "
    "(reads pad_id, sequence_mask, ctc_blank)",
    MetricKind.SEQUENCE_SIMILARITY: "1 - edit distance / length of the decoded sequences, against "
    "the unpruned model's (reads pad_id, sequence_mask, ctc_blank)",
    MetricKind.KL: "KL divergence from the unpruned model's class distribution in nats",
    MetricKind.COLUMN_MAE: "mean |output[..., column] - the unpruned model's| (reads column)",
    MetricKind.RANK_CORRELATION: "Spearman correlation of output[..., column] with the labels, or with "
    "the unpruned model's, over the whole split (reads column)",
}
"""One line per built-in metric: what it measures and the options it reads (``onnx-prune metrics``)."""
_OBJECTIVES = {
    Objective.PARAMS: pb.OBJECTIVE_PARAMS,
    Objective.BYTES: pb.OBJECTIVE_BYTES,
    Objective.LATENCY: pb.OBJECTIVE_LATENCY,
}
_ACCEPTANCES = {
    AcceptanceRule.EXACT: pb.ACCEPTANCE_EXACT,
    AcceptanceRule.INTERVAL: pb.ACCEPTANCE_INTERVAL,
    AcceptanceRule.BOUND: pb.ACCEPTANCE_BOUND,
}
_EVENTS = {
    EventKind.BASELINE: pb.EVENT_KIND_BASELINE,
    EventKind.CANDIDATE: pb.EVENT_KIND_CANDIDATE,
    EventKind.NEW_BEST: pb.EVENT_KIND_NEW_BEST,
    EventKind.CONFIRM: pb.EVENT_KIND_CONFIRM,
    EventKind.DONE: pb.EVENT_KIND_DONE,
}
# (proto field, library field) of the optional scalars, copied when set
_SCALARS = [
    ("top_k", "top_k"),
    ("max_evaluations", "max_evaluations"),
    ("max_seconds", "max_seconds"),
    ("seed", "seed"),
    ("holdout_fraction", "holdout_fraction"),
    ("batch_size", "batch_size"),
    ("layer_cap", "layer_cap"),
    ("channel_multiple", "channel_multiple"),
    ("calibration_samples", "calibration_samples"),
    ("target_sparsity", "target_sparsity"),
    ("threshold", "threshold"),
    ("column", "column"),
    ("pad_id", "pad_id"),
    ("ctc_blank", "ctc_blank"),
    ("output_sample_axis", "output_sample_axis"),
    ("confidence", "confidence"),
    ("search_width", "search_width"),
]


def _from_enum(table: Mapping[Any, Any], value: int, field: str) -> Any:
    for member, number in table.items():
        if number == value:
            return member
    raise pruner.InvalidConfigError(f"{field} has an unknown value {value}")


def options_from_proto(config: pb.PruneConfig, *, threads: int = 0) -> PruneOptions:
    """The library options a config asks for; unset fields keep the library's defaults.

    Raises:
        pruner.InvalidConfigError: an unknown enum value or an option out of range.
    """
    kwargs: dict[str, Any] = {"threads": threads}
    for name, table in (
        ("mode", _MODES),
        ("criterion", _CRITERIA),
        ("allocation", _ALLOCATIONS),
        ("metric", _METRICS),
        ("objective", _OBJECTIVES),
        ("recover", _RECOVERIES),
        ("acceptance", _ACCEPTANCES),
    ):
        value = getattr(config, name)
        if value:
            kwargs[name] = _from_enum(table, value, name)
    for field, option in _SCALARS:
        if config.HasField(field):
            kwargs[option] = getattr(config, field)
    if config.output_name:
        kwargs["output"] = config.output_name
    if config.HasField("tolerance"):
        kwargs["tolerance"] = Tolerance(config.tolerance.value, relative=config.tolerance.relative)
    if config.include:
        kwargs["include"] = tuple(config.include)
    if config.exclude:
        kwargs["exclude"] = tuple(config.exclude)
    kwargs["sparse_initializers"] = config.sparse_initializers
    if config.sensitivity_json:
        try:
            kwargs["sensitivity"] = json.loads(config.sensitivity_json)
        except ValueError as e:
            raise pruner.InvalidConfigError(f"sensitivity_json is not JSON: {e}") from e
    if config.sequence_mask:
        kwargs["sequence_mask"] = config.sequence_mask
    if config.input_sample_axes:
        kwargs["input_sample_axes"] = dict(config.input_sample_axes)
    if config.metric_plugin:
        if config.metric:
            raise _config_error("set metric or metric_plugin, not both", "metric_plugin")
        try:
            # an installed entry point only: the server never runs code a client sends
            kwargs["metric"] = pruner.plugin_metric(config.metric_plugin)
        except pruner.InvalidConfigError as e:
            raise _config_error(str(e), "metric_plugin") from e
    if config.HasField("nm_n") or config.HasField("nm_m"):
        default_n, default_m = PruneOptions().nm
        kwargs["nm"] = (
            config.nm_n if config.HasField("nm_n") else default_n,
            config.nm_m if config.HasField("nm_m") else default_m,
        )
    return PruneOptions(**kwargs)


def options_to_proto(options: PruneOptions) -> pb.PruneConfig:
    """The config that asks a server for ``options`` (``threads`` is the server's choice).

    A custom metric is sent by name when it is a metric plugin: one from
    :func:`server_metric`, or ``pruner.plugin_metric(name)`` of a plugin installed here too.

    Raises:
        pruner.InvalidConfigError: a custom metric that is not a plugin (code of your own
            runs locally only).
    """
    metric = options.metric
    config = pb.PruneConfig(
        mode=_MODES[options.mode],
        criterion=_CRITERIA[options.criterion],
        allocation=_ALLOCATIONS[options.allocation],
        metric=_METRICS[metric] if isinstance(metric, MetricKind) else pb.METRIC_UNSPECIFIED,
        metric_plugin="" if isinstance(metric, MetricKind) else _plugin_name(metric),
        sequence_mask=options.sequence_mask or "",
        input_sample_axes=options.input_sample_axes or {},
        objective=_OBJECTIVES[options.objective] if options.objective else pb.OBJECTIVE_UNSPECIFIED,
        output_name=options.output or "",
        tolerance=pb.Tolerance(value=options.tolerance.value, relative=options.tolerance.relative),
        include=list(options.include),
        exclude=list(options.exclude),
        sparse_initializers=options.sparse_initializers,
        recover=_RECOVERIES[options.recover],
        acceptance=_ACCEPTANCES[options.acceptance],
        nm_n=options.nm[0],
        nm_m=options.nm[1],
        sensitivity_json=json.dumps(options.sensitivity) if options.sensitivity else "",
    )
    for field, option in _SCALARS:
        value = getattr(options, option)
        if value is not None:
            setattr(config, field, value)
    return config


@dataclass(frozen=True)
class _ServerPlugin:
    """The scoring function of :func:`server_metric`: it only names the server's plugin."""

    name: str

    def __call__(self, outputs: Any, labels: Any, reference: Any) -> Any:
        raise pruner.InvalidConfigError(
            f"metric plugin {self.name!r} was chosen for a server and cannot run here; "
            f"use pruner.plugin_metric({self.name!r}) where it is installed"
        )


def server_metric(name: str) -> CustomMetric:
    """A metric that asks the server for its installed plugin ``name`` (see ``ListMetrics``).

    Use it in the options of ``Connection.prune`` when the plugin is installed on the
    server only; it cannot run locally. ``pruner.plugin_metric(name)`` does as well where
    the plugin is installed on both sides.
    """
    return CustomMetric(name=name, fn=_ServerPlugin(name))


def _plugin_name(metric: CustomMetric) -> str:
    """The plugin name to send for ``metric``; refuses any other custom metric."""
    if isinstance(metric.fn, _ServerPlugin):
        return metric.fn.name
    if metric.name in pruner.metric_plugins():
        try:
            installed: CustomMetric | None = pruner.plugin_metric(metric.name)
        except pruner.InvalidConfigError:
            installed = None
        if installed == metric:
            return metric.name
    raise pruner.InvalidConfigError(
        f"metric {metric.name!r} is your own code and runs locally only: a server never runs code a client "
        "sends. Install it on the server as a metric plugin (an entry point in the 'onnx_pruner.metrics' "
        "group) and choose it by name (--metric-plugin NAME, or service.convert.server_metric(NAME))"
    )


def metrics_to_proto() -> pb.ListMetricsResponse:
    """The built-in metrics and the metric plugins installed here (each loaded, to describe it)."""
    builtin = [
        pb.MetricInfo(
            name=kind.value,
            description=BUILTIN_METRICS[kind],
            higher_is_better=kind.higher_is_better,
            needs_labels=kind.needs_labels,
        )
        for kind in MetricKind
    ]
    plugins = []
    for name, source in pruner.metric_plugins().items():
        info = pb.MetricInfo(name=name, source=source)
        try:
            metric = pruner.plugin_metric(name)
        except pruner.InvalidConfigError as e:
            info.error = str(e)
        else:
            doc = (getattr(metric.fn, "__doc__", None) or "").strip()
            info.description = doc.splitlines()[0] if doc else ""
            info.higher_is_better = metric.higher_is_better
            info.needs_labels = metric.needs_labels
        plugins.append(info)
    return pb.ListMetricsResponse(builtin=builtin, plugins=plugins)


def _config_error(message: str, field: str) -> pruner.InvalidConfigError:
    """An error naming the config field at fault (the server's BadRequest detail)."""
    error = pruner.InvalidConfigError(message)
    error.field = f"config.{field}"  # type: ignore[attr-defined]
    return error


def event_to_proto(event: pruner.ProgressEvent) -> pb.ProgressEvent:
    out = pb.ProgressEvent(
        kind=_EVENTS[event.kind],
        message=event.message,
        evaluation=event.evaluation,
        max_evaluations=event.max_evaluations,
    )
    for name in ("sparsity", "nonzero_params", "metric", "passed"):
        value = getattr(event, name)
        if value is not None:
            setattr(out, name, value)
    return out


def event_from_proto(event: pb.ProgressEvent) -> pruner.ProgressEvent:
    def optional(name: str) -> Any:
        return getattr(event, name) if event.HasField(name) else None

    return pruner.ProgressEvent(
        kind=_from_enum(_EVENTS, event.kind, "event kind"),
        message=event.message,
        evaluation=event.evaluation,
        max_evaluations=event.max_evaluations,
        sparsity=optional("sparsity"),
        nonzero_params=optional("nonzero_params"),
        metric=optional("metric"),
        passed=optional("passed"),
    )


def inspection_to_proto(inspection: pruner.Inspection) -> pb.InspectResponse:
    data = inspection.to_dict()
    return pb.InspectResponse(
        layers=[
            pb.PrunableLayer(
                name=la["name"],
                op_type=la["op_type"],
                nodes=list(la["nodes"]),
                shape=list(la["shape"]),
                params=la["params"],
                share=la["share"],
            )
            for la in data["layers"]
        ],
        skipped=[pb.SkippedLayer(name=s["name"], op_type=s["op_type"], reason=s["reason"]) for s in data["skipped"]],
        total_params=data["total_params"],
        prunable_params=data["prunable_params"],
        json=json.dumps(data, indent=2),
    )


class EvalTensors:
    """Collects an eval set sent as ``EvalTensor`` headers and ``eval_tensor_data`` chunks.

    Args:
        max_bytes: the most bytes the decoded arrays may take (the server's
            ``max_eval_bytes``); each header is counted, by its dims and by what
            its inline fields decode to, before anything is allocated.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self._done: dict[str, np.ndarray] = {}
        self._header: onnx.TensorProto | None = None
        self._chunks: list[bytes] = []
        self._max_bytes = max_bytes
        self.decoded_bytes = 0
        """Bytes the arrays received so far decode to."""

    def start(self, message: pb.EvalTensor) -> None:
        self._finish()
        tensor = onnx.TensorProto()
        try:
            tensor.ParseFromString(message.tensor_proto)
        except DecodeError as e:
            raise _invalid(f"an eval_tensor is not a serialized onnx.TensorProto ({e})", "eval_tensor") from e
        if not tensor.name:
            raise _invalid("an eval_tensor has no name; name it after a model input or 'labels'", "eval_tensor.name")
        if tensor.name in self._done:
            raise _invalid(f"eval tensor {tensor.name!r} was sent twice", "eval_tensor.name")
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise _invalid(f"eval tensor {tensor.name!r} refers to external data; send its bytes", "eval_tensor")
        self._count(tensor)
        self._header = tensor
        self._chunks = []

    def _count(self, tensor: onnx.TensorProto) -> None:
        """Counts what ``tensor`` decodes to toward ``max_bytes``, refusing dims that overflow."""
        name = tensor.name
        dtype = _dtype_of(tensor)
        dims = [int(d) for d in tensor.dims]
        if any(d < 0 for d in dims):
            raise _invalid(f"eval tensor {name!r} has negative dims {dims}", "eval_tensor.dims")
        declared = math.prod(dims) * dtype.itemsize  # Python ints: no overflow
        if declared > _MAX_ARRAY_BYTES:
            raise _invalid(
                f"eval tensor {name!r} has dims {dims}: {declared} bytes of {dtype} cannot be an array",
                "eval_tensor.dims",
            )
        # typed fields expand when parsed (a one-byte varint of int64_data becomes 8 bytes)
        inline = len(tensor.raw_data) + sum(len(getattr(tensor, f)) * size for f, size in _TYPED_FIELDS.items())
        self.decoded_bytes += max(declared, inline)
        if self._max_bytes is not None and self.decoded_bytes > self._max_bytes:
            error = pruner.ResourceLimitError(
                f"the eval set decodes to more than the server's limit of {self._max_bytes} bytes "
                f"(max_eval_bytes; eval tensor {name!r} has dims {dims} of {dtype})",
                subject="max_eval_bytes",
            )
            raise error

    def add(self, data: bytes) -> None:
        if self._header is None:
            raise _invalid("eval_tensor_data arrived before any eval_tensor header", "eval_tensor_data")
        self._chunks.append(data)

    def _finish(self) -> None:
        tensor, chunks = self._header, self._chunks
        if tensor is None:
            return
        self._header, self._chunks = None, []
        name = tensor.name
        dtype = _dtype_of(tensor)
        dims = tuple(int(d) for d in tensor.dims)
        if chunks:
            if tensor.raw_data or _has_typed_data(tensor):
                raise _invalid(f"eval tensor {name!r} has inline data and data chunks", "eval_tensor_data")
            raw = b"".join(chunks)
            expected = math.prod(dims) * dtype.itemsize
            if len(raw) != expected:
                raise _invalid(
                    f"eval tensor {name!r}: {len(raw)} data bytes, dims {list(dims)} of {dtype} need {expected}",
                    "eval_tensor_data",
                )
            array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(dims)
        else:
            try:
                array = numpy_helper.to_array(tensor)
            except Exception as e:  # onnx raises several types for inconsistent tensors
                raise _invalid(f"eval tensor {name!r} cannot be read: {e}", "eval_tensor") from e
        self._done[name] = array

    def evalset(self) -> pruner.EvalSet:
        self._finish()
        if not self._done:
            raise pruner.InvalidEvalSetError("no eval set was sent")
        arrays = dict(self._done)
        labels = arrays.pop("labels", None)
        return pruner.EvalSet(arrays, labels)

    def __bool__(self) -> bool:
        return bool(self._done) or self._header is not None


_TYPED_FIELDS = {"float_data": 4, "int32_data": 4, "int64_data": 8, "double_data": 8, "uint64_data": 8}
"""The typed fields of a TensorProto and the bytes one parsed element takes."""
_MAX_ARRAY_BYTES = 1 << 62
"""More than any array can hold: dims beyond it are a bad request, not a size limit."""


def _has_typed_data(tensor: onnx.TensorProto) -> bool:
    return any(len(getattr(tensor, f)) for f in (*_TYPED_FIELDS, "string_data"))


def _invalid(message: str, field: str) -> pruner.InvalidEvalSetError:
    """An error naming the request field at fault (the server's BadRequest detail)."""
    error = pruner.InvalidEvalSetError(message)
    error.field = field  # type: ignore[attr-defined]
    return error


def _dtype_of(tensor: onnx.TensorProto) -> np.dtype[Any]:
    name = tensor.name
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        raise _invalid(f"eval tensor {name!r} has data type {tensor.data_type}; send numbers", "eval_tensor.data_type")
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, ValueError, TypeError) as e:
        raise _invalid(
            f"eval tensor {name!r} has an unknown data type {tensor.data_type}", "eval_tensor.data_type"
        ) from e
