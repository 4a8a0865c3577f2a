"""Benchmark of remove mode (issue 4). Prints tables; asserts nothing.

    python bench/structure.py

1. Coverage: for each architecture shape (built with random weights by
   tests/models.py) and each fixture, the share of Conv/Gemm/MatMul layers whose
   output channels the dependency graph can remove. Layers whose outputs are graph
   outputs (the classifier) cannot be, by design.
2. Remove mode on the fixtures at tolerance 0.01: bytes ratio and onnxruntime CPU
   latency ratio (batch 64, one thread, median of 200 runs) of the pruned model vs
   the original, evaluations, wall time, metric on the held-out split; with channel
   counts free (multiple 1) and the default (multiples of 8 kept where a layer had them).
"""

from __future__ import annotations

import itertools
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import FIXTURES, fixtures, table

import pruner
from pruner._evaluate import make_session
from pruner._phases import split_rows as _split
from pruner._recover import calibrate
from pruner._remove import Remover, nchwc_block
from pruner._static import static_reshapes
from pruner._structure import analyze_structure
from tests.models import ARCHITECTURES, INPUT_SHAPES


def coverage(model: onnx.ModelProto) -> tuple[int, int, int, int, list[str]]:
    """(layers, removable, of those approximately, feeding graph outputs, why the rest are not removable),
    as remove mode sees the model: computed Reshape targets made constants first."""
    structure = analyze_structure(static_reshapes(model)[0])
    in_family = {slot for family in structure.families for slot in family.param_slots}
    approximate = {slot for family in structure.families if family.approximate for slot in family.param_slots}
    constants = {t.name for t in model.graph.initializer}
    removable = inexact = output = 0
    reasons = set()
    for slot in sorted(structure.producer_slots):
        if slot[0] not in constants:
            continue
        if slot in in_family:
            removable += 1
            inexact += slot in approximate
            continue
        why = structure.frozen.get(int(structure.atoms(slot)[0]), "not analysed") if slot in structure.slot_base else ""
        if "graph output" in why:
            output += 1
        else:
            reasons.add(why.split(": ", 1)[-1] or "no rule reached it")
    return len(structure.producer_slots), removable, inexact, output, sorted(reasons)


def removal_latency(model: onnx.ModelProto, share: float, multiple: int | None, x: dict[str, np.ndarray]) -> str:
    """Latency ratio after removing ``share`` of every family's lowest-L1 channels (no accuracy search)."""
    options = pruner.PruneOptions(mode=pruner.Mode.REMOVE, channel_multiple=multiple)
    remover = Remover(model, options)
    config = remover.space.at_level(share)
    pruned = remover.to_bytes(config)
    return f"{latency(model.SerializeToString(), x) / latency(pruned, x):.2f}x ({model.ByteSize() / len(pruned):.2f}x)"


def latency(model: bytes, x: dict[str, np.ndarray], runs: int = 200) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    for _ in range(5):
        session.run(None, x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def batch_of(evalset: pruner.EvalSet, model: onnx.ModelProto, size: int = 64) -> dict[str, np.ndarray]:
    fixed = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value
    n = fixed or size
    return {k: v[:n] for k, v in evalset.inputs.items()}


def main() -> None:
    print(f"machine: {platform.machine()} python {platform.python_version()} onnxruntime {ort.__version__}")
    rows = []
    models = [(name, build()) for name, build in ARCHITECTURES.items()]
    models += [(path.stem, onnx.load(str(path))) for path in sorted(FIXTURES.glob("*.onnx"))]
    for name, model in models:
        layers, covered, inexact, at_output, reasons = coverage(model)
        share = f"{covered / max(layers - at_output, 1):.0%}"
        rewritten = static_reshapes(model)[1]
        rows.append((name, layers, covered, inexact, at_output, share, rewritten, "; ".join(reasons)))
    print("\nCoverage: layers whose output channels can be removed")
    print("(approximately: the channels are normalized by a LayerNorm, whose statistics a removal changes)")
    headers = ["model", "layers", "removable", "of those approximately", "feed outputs", "removable / others"]
    print(table([*headers, "computed Reshape targets made constant", "why others are not"], rows))

    rows = []
    rng = np.random.default_rng(0)
    for name, build in ARCHITECTURES.items():
        model = build()
        shape = INPUT_SHAPES[name]
        x = {"input": rng.standard_normal((16, *shape)).astype(np.float32)}
        rows.append(
            (
                name,
                removal_latency(model, 0.3, 1, x),
                removal_latency(model, 0.3, None, x),
                removal_latency(model, 0.5, 1, x),
                removal_latency(model, 0.5, None, x),
            )
        )
    print("\nSpeed-up (and size reduction) of the architectures after removing a share of channels")
    print("(batch 16, 1 thread; 'auto' keeps multiples of 8 where a layer had them)")
    print(table(["model", "30%, any count", "30%, auto", "50%, any count", "50%, auto"], rows))

    rows = []
    bytes_, speed = pruner.Objective.BYTES, pruner.Objective.LATENCY
    settings = [
        (1, pruner.Recovery.NONE, bytes_, 0.01),
        (None, pruner.Recovery.NONE, bytes_, 0.01),
        (1, pruner.Recovery.LSQ, bytes_, 0.01),
        (None, pruner.Recovery.LSQ, bytes_, 0.01),
        (None, pruner.Recovery.LSQ, speed, 0.01),
        (None, pruner.Recovery.LSQ, speed, 0.02),
        (None, pruner.Recovery.SEQUENTIAL, bytes_, 0.01),
        (None, pruner.Recovery.SEQUENTIAL, speed, 0.01),
    ]
    for (name, model_path, eval_path), (multiple, recover, objective, tolerance) in itertools.product(
        fixtures(), settings
    ):
        evalset = pruner.load_eval_set(eval_path)
        start = time.perf_counter()
        options = pruner.PruneOptions(
            mode=pruner.Mode.REMOVE,
            channel_multiple=multiple,
            recover=recover,
            objective=objective,
            tolerance=pruner.Tolerance(tolerance),
        )
        result = pruner.prune(model_path, evalset, options)
        wall = time.perf_counter() - start
        r = result.report
        original = model_path.read_bytes()
        assert result.model_bytes is not None
        x = batch_of(evalset, onnx.load(str(model_path)))
        ratio = latency(original, x) / latency(result.model_bytes, x)
        rows.append(
            (
                name,
                tolerance,
                objective.value,
                multiple or "auto",
                recover.value,
                f"{r.bytes_before / r.bytes_after:.2f}x",
                f"{ratio:.2f}x",
                r.evaluations,
                f"{wall:.2f}",
                f"{r.baseline.holdout:.4f}/{r.final.holdout:.4f}",
                ", ".join(f"{la.channels_before}->{la.channels_after}" for la in r.layers),
            )
        )
    print(f"\nRemove mode (latency: batch 64, 1 thread, median of 200; NCHWc block here: {nchwc_block()})")
    headers = [
        "fixture",
        "tol",
        "objective",
        "multiple",
        "recover",
        "smaller",
        "faster",
        "evals",
        "wall s",
        "holdout base/final",
        "channels per layer",
    ]
    print(table(headers, rows))
    residual_sweep()


def residual_sweep() -> None:
    """Why the CNN fixture's speed-up stops where it does: its residual channels at each count."""
    model_path = FIXTURES / "cnn.onnx"
    evalset = pruner.load_eval_set(FIXTURES / "cnn_eval.npz")
    model = onnx.load(str(model_path))
    search, hold = _split(len(evalset), 0.2, 0)
    layers = list(pruner.inspect(model).layers)
    calibration = calibrate(model, layers, evalset, search[:256], batch_size=64, fixed_batch=None, full=True)
    x = batch_of(evalset, model)
    base = latency(model.SerializeToString(), x)
    rows = []
    for kept in (32, 24, 20, 16, 8):
        remover = Remover(model, pruner.PruneOptions(mode=pruner.Mode.REMOVE, channel_multiple=1), calibration)
        config = tuple(32 - kept if f.name == RESIDUAL else 0 for f in remover.families)
        data = remover.to_bytes(config)
        rows.append(
            (
                kept,
                f"{base / latency(data, x):.2f}x",
                f"{accuracy(data, evalset, search):.4f}",
                f"{accuracy(data, evalset, hold):.4f}",
            )
        )
    print(f"\nCNN fixture: only the residual channels ({RESIDUAL}) removed, consumers refit (lsq)")
    print(table(["channels kept", "faster", "search accuracy", "held-out accuracy"], rows))


RESIDUAL = "onnx::Conv_55"


def accuracy(model: bytes, evalset: pruner.EvalSet, rows: np.ndarray) -> float:
    session = make_session(model)
    (out,) = session.run(None, {k: v[rows] for k, v in evalset.inputs.items()})
    assert evalset.labels is not None
    return float((out.argmax(axis=1) == evalset.labels[rows]).mean())


if __name__ == "__main__":
    main()
