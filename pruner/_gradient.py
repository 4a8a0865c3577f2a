"""Gradient criteria: first-order Taylor and Fisher importance, from torch autograd.

The ONNX model is converted to PyTorch by onnx2torch and differentiated by torch autograd
on the calibration samples (the optional ``gradient`` extra: neither is imported until a run
asks for a gradient criterion). One sample at a time (a model with a fixed batch: one batch),
with g_n = dL_n/dw for sample n:

* ``gradient`` (first-order Taylor): sum_n |w * g_n|, the loss change zeroing ``w`` alone
  makes to first order, summed over the samples;
* ``fisher`` (its squared variant, the empirical Fisher diagonal): sum_n (w * g_n)^2.

The loss L_n: cross-entropy against the labels for ``accuracy`` and ``topk`` (log-softmax of
logits, or the log of outputs that are already probabilities); squared or absolute error
against the labels for ``mse`` and ``mae``. Other metrics, and eval sets without labels,
use the squared output deviation from the unpruned model. Its gradient is zero at the
unpruned model, so the reference is moved by a random +-1 step (scaled to the output's RMS):
g_n is then a random projection of the output's Jacobian, and sum_n (w * g_n)^2 estimates
w^2 times the Gauss-Newton diagonal, the squared output change zeroing ``w`` alone makes.

onnx2torch keeps every weight's values (a Gemm weight possibly transposed) under names of
its own: module parameters named after the node, ``initializers.onnx_initializer_<k>``
buffers for the others. Weights are mapped back by their values (shape and bytes, or those
of the transpose); a weight used twice may be held twice, and its gradient is the sum. A
weight whose values are nowhere in the converted model, or are those of another weight too,
is scored by magnitude (noted).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import sys
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ._analysis import PrunableWeight
from ._errors import InvalidConfigError, UnsupportedModelError, check_stop
from ._evaluate import Evaluator
from ._options import Criterion, MetricKind

__all__ = ["EXTRA", "GradientScores", "gradient_scores", "load_torch", "map_weights"]

logger = logging.getLogger(__name__)

EXTRA = "pip install 'onnx-pruner[gradient]'"
"""How to install what the gradient criteria need."""
MAX_OUTPUT_ERROR = 1e-2
"""Largest RMS difference, relative to the output's RMS, between the converted model's output
and onnxruntime's on the first calibration samples: beyond it the conversion is not trusted."""


def load_torch(criterion: Criterion) -> tuple[Any, Any]:
    """``torch`` and ``onnx2torch``, imported on first use.

    Raises:
        InvalidConfigError: either is not installed (the message names the extra).
    """
    missing = f"criterion {criterion.value} needs torch and onnx2torch, which are not installed: {EXTRA}"
    try:
        torch = importlib.import_module("torch")
    except ImportError as e:
        raise InvalidConfigError(missing) from e
    try:
        return torch, _import_onnx2torch()
    except ImportError as e:
        raise InvalidConfigError(f"{missing} ({e})") from e


def _import_onnx2torch() -> Any:
    """onnx2torch, even where torchvision does not load.

    onnx2torch imports torchvision for two converters (NonMaxSuppression and RoiAlign) only.
    A torchvision built for another torch (e.g. the CUDA wheel beside a CPU build of torch)
    fails on import; a stand-in that fails when those two ops run is put in its place while
    onnx2torch is imported, and removed afterwards.
    """
    if "onnx2torch" in sys.modules:
        return sys.modules["onnx2torch"]
    stand_in: dict[str, types.ModuleType] = {}
    try:
        importlib.import_module("torchvision")
    except Exception as e:  # RuntimeError, OSError, ImportError: any failure
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        stand_in = _torchvision_stand_in(f"{type(e).__name__}: {e}")
        sys.modules.update(stand_in)
        logger.debug("torchvision does not load (%s): a stand-in for onnx2torch's import", e)
    try:
        onnx2torch = importlib.import_module("onnx2torch")
    finally:
        for name in stand_in:
            sys.modules.pop(name, None)
    _add_converters(importlib.import_module("torch"))
    return onnx2torch


def _add_converters(torch: Any) -> None:
    """Converters onnx2torch 1.5.15 lacks, through its own registry: GlobalMaxPool."""
    registry = importlib.import_module("onnx2torch.node_converters.registry")
    common = importlib.import_module("onnx2torch.utils.common")

    class GlobalMaxPool(torch.nn.Module):  # type: ignore[misc]
        def forward(self, x: Any) -> Any:
            return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)

    def convert(node: Any, graph: Any) -> Any:
        return common.OperationConverterResult(
            torch_module=GlobalMaxPool(), onnx_mapping=common.onnx_mapping_from_node(node)
        )

    try:
        registry.add_converter(operation_type="GlobalMaxPool", version=1)(convert)
    except ValueError:  # a later onnx2torch has its own
        pass


def _torchvision_stand_in(why: str) -> dict[str, types.ModuleType]:
    def unavailable(*args: object, **kwargs: object) -> None:
        raise UnsupportedModelError(
            f"torchvision does not load here ({why}): models with NonMaxSuppression or RoiAlign cannot be "
            "converted for the gradient criteria"
        )

    package, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    for name in ("nms", "roi_align", "box_convert"):
        setattr(ops, name, unavailable)
    package.ops = ops  # type: ignore[attr-defined]
    return {"torchvision": package, "torchvision.ops": ops}


@dataclass(frozen=True)
class GradientScores:
    """Gradient scores of the weights they were computed for (flattened, float32)."""

    criterion: Criterion
    scores: Mapping[str, np.ndarray]

    def gradient_scores(self, layer: PrunableWeight, weight: np.ndarray) -> np.ndarray | None:
        """The scores of ``layer``; None when it has none (it is then scored by magnitude)."""
        scores = self.scores.get(layer.name)
        return scores if scores is not None and scores.size == weight.size else None


def _digest(array: np.ndarray) -> bytes:
    data = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.blake2b(repr(data.shape).encode() + data.tobytes(), digest_size=16).digest()


def map_weights(
    torch_model: Any, weights: Mapping[str, np.ndarray]
) -> tuple[dict[str, list[tuple[str, bool]]], dict[str, str]]:
    """Where each ONNX weight lives in the converted model: (parameter or buffer name, whether
    it holds the transpose) for every copy, and why a weight has none."""
    owners: dict[bytes, list[str]] = {}
    for name, weight in weights.items():
        owners.setdefault(_digest(weight), []).append(name)
    found: dict[str, list[tuple[str, bool]]] = {name: [] for name in weights}
    named = [*torch_model.named_parameters(), *torch_model.named_buffers()]
    for torch_name, tensor in named:
        if not tensor.is_floating_point():
            continue
        array = tensor.detach().float().cpu().numpy()
        views = [(False, array)] + ([(True, array.T)] if array.ndim == 2 else [])
        for transposed, view in views:
            names = owners.get(_digest(view), [])
            if len(names) == 1:
                found[names[0]].append((torch_name, transposed))
                break  # a symmetric matrix is one copy, not two
    why: dict[str, str] = {}
    for name in weights:
        if found[name]:
            continue
        shared = len(owners[_digest(weights[name])]) > 1
        why[name] = (
            "its values are those of another weight too, so its copy in the converted model is ambiguous"
            if shared
            else "the converted model holds its values nowhere (onnx2torch folded or reshaped it)"
        )
    return {name: uses for name, uses in found.items() if uses}, why


class _Loss:
    """The loss of one micro-batch of samples, and what it is, for the notes."""

    def __init__(self, evaluator: Evaluator, rows: np.ndarray, seed: int) -> None:
        metric = evaluator.metric
        labels = evaluator.batches.evalset.labels
        reference = evaluator.full_reference(rows)
        self.kind = "deviation"
        self.rng = np.random.default_rng(seed)
        self.scale = float(np.sqrt(np.mean(np.square(reference, dtype=np.float64)))) or 1.0
        self.column = metric.column
        self.pad_id = metric.pad_id
        self.mask = evaluator.mask
        self.probabilities = False
        kind = metric.kind
        if labels is not None and isinstance(kind, MetricKind):
            label_shape, out_shape = labels.shape[1:], reference.shape[1:]
            integer = np.issubdtype(labels.dtype, np.integer)
            if kind in (MetricKind.ACCURACY, MetricKind.TOPK) and integer and out_shape[:-1] == label_shape:
                self.kind = "cross-entropy"
                self.probabilities = bool(
                    reference.size
                    and (reference >= 0).all()
                    and np.allclose(reference.sum(axis=-1, dtype=np.float64), 1.0, atol=1e-3)
                )
            elif kind in (MetricKind.MSE, MetricKind.MAE):
                picked = out_shape[:-1] if self.column is not None else out_shape
                if picked == label_shape:
                    self.kind = "squared error" if kind is MetricKind.MSE else "absolute error"

    @property
    def description(self) -> str:
        if self.kind == "cross-entropy":
            of = "the outputs (probabilities)" if self.probabilities else "the softmax of the logits"
            return f"cross-entropy of {of} against the labels"
        if self.kind == "deviation":
            return "squared output deviation from the unpruned model (reference moved by random +-1 probes)"
        return f"{self.kind} against the labels"

    def __call__(self, torch: Any, out: Any, rows: np.ndarray, evaluator: Evaluator) -> Any:
        if self.kind == "cross-entropy":
            labels = torch.from_numpy(np.asarray(evaluator.batches.evalset.labels)[rows].astype(np.int64))
            logp = torch.log(out.clamp_min(1e-12)) if self.probabilities else torch.log_softmax(out, dim=-1)
            nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            keep = torch.ones_like(nll, dtype=torch.bool)
            if self.pad_id is not None:
                keep &= labels != self.pad_id
            if self.mask is not None and self.mask[rows].shape == tuple(nll.shape):
                keep &= torch.from_numpy(self.mask[rows] != 0)
            return (nll * keep).sum()
        if self.kind in ("squared error", "absolute error"):
            labels = np.asarray(evaluator.batches.evalset.labels)[rows]
            pred = out[..., self.column] if self.column is not None else out
            diff = pred - torch.from_numpy(labels.astype(np.float32))
            return (diff * diff).sum() if self.kind == "squared error" else diff.abs().sum()
        reference = evaluator.full_reference(rows).astype(np.float32)
        probe = self.rng.choice(np.array([-self.scale, self.scale], dtype=np.float32), size=reference.shape)
        diff = out - torch.from_numpy(reference + probe)
        return 0.5 * (diff * diff).sum()


def gradient_scores(
    model: onnx.ModelProto,
    layers: Sequence[PrunableWeight],
    evaluator: Evaluator,
    rows: np.ndarray,
    criterion: Criterion,
    *,
    seed: int = 0,
    threads: int = 0,
) -> tuple[GradientScores, list[str]]:
    """Gradient scores of ``layers`` under ``criterion`` on ``rows`` (calibration samples of the
    search split), and the notes that say how they were computed. torch runs on ``threads``
    threads (0: one).

    Raises:
        InvalidConfigError: torch or onnx2torch is not installed.
        UnsupportedModelError: onnx2torch cannot convert or run the model, or its outputs are
            not onnxruntime's.
    """
    torch, onnx2torch = load_torch(criterion)
    batches = evaluator.batches
    stop = batches.stop
    start = time.perf_counter()
    try:
        converted = onnx2torch.convert(_constants_as_initializers(model))
    except Exception as e:  # onnx2torch raises NotImplementedError, KeyError, ...
        raise UnsupportedModelError(
            f"onnx2torch cannot convert the model for criterion {criterion.value} ({type(e).__name__}: "
            f"{_first_line(e)}); use criterion magnitude or activation"
        ) from e
    converted = converted.float().eval()
    weights = _weights(model, layers)
    where, unmapped = map_weights(converted, weights)
    tensors = dict([*converted.named_parameters(), *converted.named_buffers()])
    for tensor in tensors.values():
        tensor.requires_grad_(False)
    for uses in where.values():
        for name, _ in uses:
            tensors[name].requires_grad_(True)
    inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    outputs = [o.name for o in model.graph.output]
    position = outputs.index(batches.output)
    loss = _Loss(evaluator, rows, seed)
    step = batches.fixed_batch or 1
    totals = {name: torch.zeros(weights[name].shape, dtype=torch.float64) for name in where}
    values = {name: torch.from_numpy(weights[name].astype(np.float64)) for name in where}
    checked = False
    previous = torch.get_num_threads()
    # one sample's pass is small: more threads than asked for only contend with onnxruntime's
    torch.set_num_threads(threads or 1)
    try:
        for i in range(0, len(rows) if where else 0, step):  # nothing mapped: nothing to differentiate
            check_stop(stop)
            chunk = rows[i : i + step]
            out = _forward(torch, converted, inputs, position, batches, chunk, criterion)
            if not checked:
                _check_output(out.detach().numpy(), evaluator.full_reference(chunk), criterion)
                checked = True
            for tensor in tensors.values():
                tensor.grad = None
            value = loss(torch, out, chunk, evaluator)
            if not value.requires_grad:  # no mapped weight reaches the measured output
                break
            value.backward()
            for name, uses in where.items():
                grads = [(tensors[t].grad, transposed) for t, transposed in uses]
                parts = [g.T if transposed else g for g, transposed in grads if g is not None]
                if not parts:  # no copy of it took part in this output
                    continue
                grad = sum(parts[1:], parts[0])
                term = values[name] * grad.to(torch.float64)
                totals[name] += term.abs() if criterion is Criterion.GRADIENT else term * term
    finally:
        torch.set_num_threads(previous)
    scores = {
        name: np.nan_to_num(total.numpy().reshape(-1), nan=np.inf).astype(np.float32) for name, total in totals.items()
    }
    seconds = time.perf_counter() - start
    logger.debug("gradient scores of %d layer(s) on %d samples in %.3f s", len(scores), len(rows), seconds)
    what = "first-order Taylor |w * dL/dw|" if criterion is Criterion.GRADIENT else "Fisher (w * dL/dw)^2"
    notes = [
        f"criterion {criterion.value}: {what} summed over {len(rows)} samples of the search split, L the "
        f"{loss.description}; torch {torch.__version__} autograd on the model converted by onnx2torch "
        f"({seconds:.1f} s)"
    ]
    notes += [f"{name}: no gradient ({why}); scored by magnitude" for name, why in unmapped.items()]
    return GradientScores(criterion, scores), notes


def _constants_as_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its top-level Constant tensors as initializers (onnx2torch's Conv and Gemm
    converters read weights from initializers only); ``model`` itself is not changed."""
    constants = [n for n in model.graph.node if n.op_type == "Constant" and [a.name for a in n.attribute] == ["value"]]
    if not constants:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [n for n in out.graph.node if not (n.op_type == "Constant" and [a.name for a in n.attribute] == ["value"])]
    for node in constants:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(node.attribute[0].t)
        tensor.name = node.output[0]
        out.graph.initializer.append(tensor)
    del out.graph.node[:]
    out.graph.node.extend(kept)
    return out


def _weights(model: onnx.ModelProto, layers: Sequence[PrunableWeight]) -> dict[str, np.ndarray]:
    """The layers' weights as float32, from initializers or Constant nodes."""
    wanted = {layer.name for layer in layers}
    found: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        if tensor.name in wanted:
            found[tensor.name] = numpy_helper.to_array(tensor).astype(np.float32)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in wanted:
            for attribute in node.attribute:
                if attribute.name == "value":
                    found[node.output[0]] = numpy_helper.to_array(attribute.t).astype(np.float32)
    return found


def _forward(
    torch: Any,
    converted: Any,
    inputs: list[str],
    position: int,
    batches: Any,
    rows: np.ndarray,
    criterion: Criterion,
) -> Any:
    """The measured output for ``rows`` (samples first), padded to a fixed batch and cut back."""
    n = len(rows)
    padded = rows
    if batches.fixed_batch is not None and n < batches.fixed_batch:
        padded = np.concatenate([rows, np.repeat(rows[-1:], batches.fixed_batch - n)])
    feeds = []
    for name in inputs:
        array = batches.evalset.inputs[name][padded]
        if np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32)
        axis = batches.input_axes.get(name, 0)
        feeds.append(torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, 0, axis) if axis else array)))
    try:
        result = converted(*feeds)
    except Exception as e:  # whatever the converted model raises
        raise UnsupportedModelError(
            f"the model converted by onnx2torch does not run for criterion {criterion.value} "
            f"({type(e).__name__}: {_first_line(e)}); use criterion magnitude or activation"
        ) from e
    out = result[position] if isinstance(result, (tuple, list)) else result
    if batches.output_axis:
        out = out.movedim(batches.output_axis, 0)
    return out[:n]


def _check_output(out: np.ndarray, reference: np.ndarray, criterion: Criterion) -> None:
    """Raise UnsupportedModelError when the converted model's output is not onnxruntime's."""
    ref = reference.astype(np.float64)
    scale = float(np.sqrt(np.mean(ref * ref))) if ref.size else 0.0
    error = float(np.sqrt(np.mean((out.astype(np.float64) - ref) ** 2))) if ref.size else 0.0
    if out.shape != reference.shape or not error <= MAX_OUTPUT_ERROR * max(scale, 1e-6):
        raise UnsupportedModelError(
            f"the model converted by onnx2torch computes another output than onnxruntime (relative RMS "
            f"error {error / max(scale, 1e-12):.3g}, shape {list(out.shape)} vs {list(reference.shape)}); "
            f"criterion {criterion.value} cannot be trusted on it: use criterion magnitude or activation"
        )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
