"""Does re-estimating unfused BatchNormalization statistics after pruning help? (issue 18, section 1)

For one zoo model at one fixed sparsity (no search, ``target_sparsity``): each ``--recover`` method's
test-set drop, then the same model with the running mean and variance of every inference-mode
BatchNormalization recomputed from 200 eval-set samples flowing through the pruned model:
replaced outright, or (``--relative``) moved by what pruning changed on those samples (mean +
(pruned - unpruned), variance x pruned / unpruned), which leaves the unpruned model as it is. ::

    python bench/norm_reestimate.py ppocr_cls 0.3 none,auto [--relative]

Figures: bench/results/norm_reestimate.txt. It does not help on PP-OCR's classifier, so the
library does not do it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo import BATCH, dataset, evalset, outputs, scores
from zoo_models import MODELS, model_path

import pruner
from pruner import PruneOptions, Recovery, Tolerance
from pruner._evalset import EvalSet
from pruner._evaluate import make_session, run_session
from pruner._graph import GraphIndex
from pruner._metrics import Metric
from pruner._recover import _batches


def reestimated_norms(
    model: onnx.ModelProto,
    evalset: EvalSet,
    rows: np.ndarray,
    *,
    batch_size: int,
    original: onnx.ModelProto | None = None,
    skip: Iterable[str] = (),
    threads: int = 0,
) -> dict[str, np.ndarray]:
    """New running means and variances of the inference-mode BatchNormalizations of ``model`` (a
    pruned candidate) from ``rows`` of ``evalset`` flowing through it: {mean name: mean, variance
    name: variance}. Only statistics that are constants read by that node alone are given;
    ``skip``: BatchNormalizations (by input name) to leave as they are.

    With ``original`` (the unpruned model), the stored statistics are moved by what pruning changed
    on these rows (mean + (pruned - unpruned mean), variance x pruned / unpruned variance) rather
    than replaced: a few hundred samples of an eval set rarely have the training data's statistics
    (PP-OCR's classifier loses 80 points when its own are replaced by them, unpruned)."""
    index = GraphIndex.build(model.graph)
    norms: dict[str, tuple[str, str]] = {}
    excluded = set(skip)
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or len(node.input) < 5 or len(node.output) != 1:
            continue
        if any(a.name == "training_mode" and a.i for a in node.attribute) or node.input[0] in excluded:
            continue
        mean, var = node.input[3], node.input[4]
        if all(index.is_constant(n) and len(index.uses(n)) == 1 for n in (mean, var)):
            norms[node.input[0]] = (mean, var)
    if not norms:
        return {}
    now = _channel_moments(model, sorted(norms), evalset, rows, batch_size, threads)
    before = None if original is None else _channel_moments(original, sorted(norms), evalset, rows, batch_size, threads)
    out: dict[str, np.ndarray] = {}
    for name, (mean_name, var_name) in norms.items():
        old_mean, old_var = (np.asarray(index.value(n)) for n in (mean_name, var_name))
        mean, var = now[name]
        if before is not None:
            mean_before, var_before = before[name]
            mean = old_mean + (mean - mean_before)
            var = old_var * np.divide(var, var_before, out=np.ones_like(var), where=var_before > 0)
        if mean.shape != old_mean.shape or not (np.isfinite(mean).all() and np.isfinite(var).all()):
            continue
        out[mean_name], out[var_name] = mean.astype(old_mean.dtype), var.astype(old_var.dtype)
    return out


def _channel_moments(
    model: onnx.ModelProto, names: list[str], evalset: EvalSet, rows: np.ndarray, batch_size: int, threads: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per channel (axis 1) mean and variance of the tensors ``names`` over ``rows``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in existing)
    session = make_session(probe.SerializeToString(), threads=threads)
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch, real in _batches(rows, batch_size, None):
        feeds = {k: v[batch] for k, v in evalset.inputs.items()}
        for name, value in zip(names, run_session(session, names, feeds), strict=True):
            x = np.asarray(value, dtype=np.float64)[:real]
            x = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
            sums[name] = sums.get(name, 0) + x.sum(axis=1)
            squares[name] = squares.get(name, 0) + (x * x).sum(axis=1)
            counts[name] = counts.get(name, 0) + x.shape[1]
    out = {}
    for name in names:
        mean = sums[name] / max(counts[name], 1)
        out[name] = (mean, np.maximum(squares[name] / max(counts[name], 1) - mean * mean, 0.0))
    return out


def with_norms(model_bytes: bytes, data: EvalSet, original: bytes | None) -> tuple[bytes, int]:
    """``model_bytes`` with its BatchNormalization statistics re-estimated on 200 samples of ``data``
    (relative to the unpruned ``original`` if given), and how many were."""
    model = onnx.load_from_string(model_bytes)
    reference = None if original is None else onnx.load_from_string(original)
    new = reestimated_norms(model, data, np.arange(200), batch_size=BATCH, original=reference)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in new:
            for attr in node.attribute:
                if attr.name == "value":
                    attr.t.CopyFrom(numpy_helper.from_array(new[node.output[0]], attr.t.name))
    for init in model.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(new[init.name], init.name))
    return model.SerializeToString(), len(new) // 2


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--relative"]
    relative = "--relative" in sys.argv
    key, sparsity = args[0], float(args[1])
    spec = MODELS[key]
    original = model_path(key).read_bytes()
    inputs, labels = dataset(key, 200, 0)
    test_inputs, test_labels = dataset(key, 400, 1)
    reference = outputs(original, inputs, spec.output)
    test_reference = outputs(original, test_inputs, spec.output)
    data = evalset(key, inputs, labels, reference)
    metric = Metric(spec.metric)
    base = scores(key, original, test_inputs, test_labels, test_reference)
    print(f"{key}: load {os.getloadavg()[0]:.1f}, test metric {base:.4f}, {'relative' if relative else 'replaced'}")

    def drop(model: bytes) -> float:
        return metric.loss(base, scores(key, model, test_inputs, test_labels, test_reference))

    renormed, count = with_norms(original, data, original if relative else None)
    print(f"  unpruned, {count} BatchNormalizations re-estimated: drop {drop(renormed):+.4f}")
    for method in args[2].split(","):
        options = PruneOptions(
            metric=spec.metric,
            tolerance=Tolerance(1e9),
            target_sparsity=sparsity,
            recover=Recovery(method),
            batch_size=BATCH,
        )
        result = pruner.prune(original, data, options)
        assert result.model_bytes is not None
        renormed, count = with_norms(result.model_bytes, data, original if relative else None)
        print(
            f"  --recover {method} at {result.report.sparsity:.3f}: drop {drop(result.model_bytes):+.4f}, "
            f"re-estimated: {drop(renormed):+.4f}"
        )


if __name__ == "__main__":
    main()
