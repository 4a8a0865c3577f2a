"""Benchmark of the zero-mode search (issue 2). Prints tables; asserts nothing.

    python bench/search.py            # fixtures + allocation comparison + sweep reference
    python bench/search.py --big-mlp  # also the ~200 MB MLP peak-memory run
    python bench/search.py --ksection [--executor ray] [--widths 1,2,3] [--model M.onnx --eval E.npz]
        # the k-section (search_width): evaluations and wall for each width, nothing else

For each fixture at tolerance 0.01: sparsity reached, evaluations, wall time,
final metric on both splits, and the overhead ratio = wall time / (evaluations
x one plain onnxruntime pass of the eval set through the original model). The
reference is a plain global-magnitude sweep at 5% steps on the same split.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fixtures, plain_pass_seconds, repeated, table

import pruner
from pruner import Allocation, Criterion, PruneOptions, Tolerance
from pruner._metrics import Metric
from pruner._phases import split_rows as _split

ROOT = Path(__file__).resolve().parents[1]


def sweep(model: Path, evalset: pruner.EvalSet, tolerance: float) -> tuple[float, float, int]:
    """Plain global magnitude at 5% steps, judged like the search judges: the sparsest level that
    passes on the search split and is confirmed on the held-out split. Returns (level, holdout metric, evals)."""
    best, best_hold, evals = 0.0, float("nan"), 0
    for step in range(1, 20):
        magnitude = PruneOptions(tolerance=Tolerance(tolerance), criterion=Criterion.MAGNITUDE)
        result = _fixed_level(model, evalset, magnitude, step * 0.05)
        evals += 1
        if result is not None:
            best, best_hold = step * 0.05, result
    return best, best_hold, evals


def _fixed_level(model: Path, evalset: pruner.EvalSet, options: PruneOptions, level: float) -> float | None:
    """Holdout metric of the global-magnitude model at ``level`` if it passes on both splits, else None."""
    import onnx
    from onnx import numpy_helper

    from pruner._analysis import analyze
    from pruner._plan import LayerPlan, PruningPlan, transfer_plan
    from pruner._score import Granularity, unit_scores
    from pruner._space import ZeroSpace, build_units

    proto = onnx.load(str(model))
    units = []
    for layer in analyze(proto).layers:
        w = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == layer.name))
        s = unit_scores(options.criterion, layer, w)
        units.append(build_units(layer, w, s, Granularity.ELEMENT, Allocation.GLOBAL, options.layer_cap))
    config = ZeroSpace(units, Allocation.GLOBAL).at_level(level)
    plan = PruningPlan(
        options.mode,
        options.criterion,
        tuple(LayerPlan(u.layer.name, a, u.units) for u, a in zip(units, config, strict=True)),
    )
    pruned = transfer_plan(plan, proto)  # a hand-made plan: scored on the weights, not replayed
    search_idx, hold_idx = _split(len(evalset), options.holdout_fraction, options.seed)
    metric = Metric(options.metric)
    base = _accuracy(proto.SerializeToString(), evalset, metric)
    cand = _accuracy(pruned.SerializeToString(), evalset, metric)
    for idx in (search_idx, hold_idx):
        if base[idx].mean() - cand[idx].mean() > options.tolerance.value + 1e-9:
            return None
    return float(cand[hold_idx].mean())


def _accuracy(model_bytes: bytes, evalset: pruner.EvalSet, metric: Metric) -> np.ndarray:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    fixed = session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) else 256
    outs = []
    n = len(evalset)
    for i in range(0, n, step):
        rows = np.arange(i, min(i + step, n))
        if len(rows) < step and isinstance(fixed, int):
            rows = np.concatenate([rows, np.repeat(rows[-1:], step - len(rows))])
        outs.append(session.run(None, {k: v[rows] for k, v in evalset.inputs.items()})[0][: min(step, n - i)])
    return metric.per_sample(np.concatenate(outs), evalset.labels, None)


def run_fixtures(tolerance: float, allocations: list[Allocation]) -> None:
    rows = []
    alloc_rows = []
    for name, model, evals in fixtures():
        evalset = pruner.load_eval_set(evals)
        pass_s = plain_pass_seconds(model, evalset)
        for allocation in allocations:
            start = time.perf_counter()
            result = pruner.prune(model, evalset, PruneOptions(tolerance=Tolerance(tolerance), allocation=allocation))
            wall = time.perf_counter() - start
            r = result.report
            alloc_rows.append((name, allocation.value, f"{r.sparsity:.1%}", r.evaluations, f"{wall:.2f}"))
            if allocation is PruneOptions().allocation:
                ratio = wall / max(r.evaluations, 1) / pass_s
                rows.append(
                    (
                        name,
                        r.options["criterion"],
                        f"{r.sparsity:.1%}",
                        r.evaluations,
                        r.probes,
                        f"{wall:.2f}",
                        f"{r.baseline.search:.4f}/{r.final.search:.4f}",
                        f"{r.baseline.holdout:.4f}/{r.final.holdout:.4f}",
                        f"{pass_s * 1000:.1f}",
                        f"{ratio:.2f}",
                        _sweep_cell(model, evalset, tolerance),
                    )
                )
    defaults = PruneOptions()
    print(
        f"\nDefault settings (criterion {defaults.criterion.value}: "
        f"{' or '.join(c.value for c in defaults.criterion_choices)}, chosen by probes; "
        f"allocation {defaults.allocation.value}), tolerance {tolerance}"
    )
    print(
        table(
            [
                "fixture",
                "criterion",
                "sparsity",
                "evals",
                "probes",
                "wall s",
                "search base/final",
                "holdout base/final",
                "pass ms",
                "overhead",
                "sweep best (19 evals)",
            ],
            rows,
        )
    )
    print(
        f"\nAllocation comparison (criterion {PruneOptions().effective_criterion.value}: "
        "with an allocation given, auto has no choice to make)"
    )
    print(table(["fixture", "allocation", "sparsity", "evals", "wall s"], alloc_rows))


def run_tiled(tolerance: float, times: int = 10) -> None:
    """The overhead ratio once fixed costs (checker, session creation) are amortized: every
    fixture's eval set repeated ``times`` over (the fixtures' 720 samples run in a few ms)."""
    rows = []
    for name, model, evals in fixtures():
        evalset = repeated(evals, times)
        pass_s = plain_pass_seconds(model, evalset)
        start = time.perf_counter()
        result = pruner.prune(model, evalset, PruneOptions(tolerance=Tolerance(tolerance)))
        wall = time.perf_counter() - start
        r = result.report
        rows.append(
            (
                name,
                len(evalset),
                f"{pass_s * 1000:.1f}",
                r.evaluations,
                f"{wall:.2f}",
                f"{wall / r.evaluations / pass_s:.2f}",
            )
        )
    print(f"\nOverhead on eval sets repeated {times}x (default settings, tolerance {tolerance})")
    print(table(["fixture", "samples", "pass ms", "evals", "wall s", "overhead"], rows))


def _sweep_cell(model: Path, evalset: pruner.EvalSet, tolerance: float) -> str:
    best, hold, _ = sweep(model, evalset, tolerance)
    return f"{best:.0%} (holdout {hold:.4f})"


MAKE_BIG_MLP = r"""
import sys
import numpy as np, onnx
from onnx import helper, numpy_helper, TensorProto
dims = [1024, 4096, 4096, 4096, 2048, 10]
rng = np.random.default_rng(0)
nodes, inits, prev = [], [], "x"
for i, (a, b) in enumerate(zip(dims, dims[1:])):
    w = (rng.standard_normal((a, b), dtype=np.float32) / np.sqrt(a)).astype(np.float32)
    inits.append(numpy_helper.from_array(w, f"w{i}"))
    nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
    prev = f"m{i}"
    if i < len(dims) - 2:
        nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
        prev = f"r{i}"
nodes[-1].output[0] = "y"
g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dims[0]])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dims[-1]])], inits)
onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), sys.argv[1])
np.savez(sys.argv[2], x=rng.standard_normal((256, dims[0]), dtype=np.float32))
"""

PRUNE_BIG_MLP = r"""
import resource, sys, time
import pruner
start = time.perf_counter()
options = pruner.PruneOptions(metric=pruner.MetricKind.AGREEMENT, tolerance=pruner.Tolerance(0.02))
r = pruner.prune(sys.argv[1], sys.argv[2], options)
r.save(sys.argv[3])
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(f"{peak} {r.report.sparsity} {r.report.evaluations} {wall}")
print("; ".join(r.report.notes), file=sys.stderr)
"""


def _python(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"benchmark step failed:\n{done.stderr}")
    if done.stderr.strip():
        print(f"  ({done.stderr.strip()})")
    return done.stdout


def run_big_mlp() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model, evals, out = (str(Path(tmp) / n) for n in ("big.onnx", "big.npz", "out.onnx"))
        _python(MAKE_BIG_MLP, model, evals)
        size = Path(model).stat().st_size
        imports = _python(
            "import resource, onnxruntime, onnx, numpy, pruner; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
        )
        peak, sparsity, evaluations, wall = _python(PRUNE_BIG_MLP, model, evals, out).split()
    size_mb, peak_mb, base_mb = size / 2**20, int(peak) / 2**20, int(imports) / 2**20
    print("\nGenerated MLP (MatMul 1024-4096-4096-4096-2048-10), agreement metric, tolerance 0.02, 256 samples")
    print(
        table(
            [
                "model MB",
                "peak RSS MB",
                "imports MB",
                "peak / model",
                "(peak - imports) / model",
                "sparsity",
                "evals",
                "wall s",
            ],
            [
                (
                    f"{size_mb:.0f}",
                    f"{peak_mb:.0f}",
                    f"{base_mb:.0f}",
                    f"{peak_mb / size_mb:.2f}",
                    f"{(peak_mb - base_mb) / size_mb:.2f}",
                    f"{float(sparsity):.1%}",
                    evaluations,
                    f"{float(wall):.1f}",
                )
            ],
        )
    )


def run_ksection(model: Path, evals: Path, widths: list[int], executor: str, batch_size: int, repeats: int) -> None:
    """One run per search width (``repeats`` times, alternating), on the local executor or on a Ray
    cluster of two one-CPU nodes (``ray_scaling.start_nodes``, 2 workers): evaluations (of the
    bisection, and all), the search phase's and the whole run's wall time,
    the sparsity reached, and the model's sha256 (each width is a different search: its own model)."""
    import hashlib

    from ray_scaling import start_nodes, stop_node, uptime

    from pruner import Executor, Phase

    nodes: list[subprocess.Popen[bytes]] = []
    if executor == "ray":
        import os

        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        nodes, address = start_nodes()
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        while ray.cluster_resources().get("CPU", 0) < 2:
            time.sleep(0.5)
    evalset = pruner.load_eval_set(evals)
    rows = []
    try:
        for repeat in range(repeats):
            for width in widths:
                kind = Executor.RAY if executor == "ray" else Executor.LOCAL
                options = PruneOptions(
                    search_width=width,
                    batch_size=batch_size,
                    executor=kind,
                    executor_workers=2 if kind is Executor.RAY else 0,
                )
                load = uptime().split("load average:")[-1].strip()
                start = time.perf_counter()
                result = pruner.prune(model, evalset, options)
                wall = time.perf_counter() - start
                r = result.report
                bisect = [t for t in r.trace if t.phase is Phase.BISECT]
                sha = hashlib.sha256(result.model_bytes or result.model.SerializeToString()).hexdigest()[:12]
                rows.append(
                    (
                        repeat,
                        width,
                        len(bisect),
                        r.evaluations,
                        f"{r.timings.get('search', float('nan')):.2f}",
                        f"{wall:.2f}",
                        f"{r.sparsity:.1%}",
                        sha,
                        load,
                    )
                )
                print(f"repeat {repeat} width {width}: {wall:.2f} s; load {load}", flush=True)
    finally:
        if nodes:
            import ray

            ray.shutdown()
            for node in reversed(nodes):
                stop_node(node)
    print(
        f"\nk-section: {model.name}, {len(evalset)} samples, batch {batch_size}, executor {executor}"
        + (" (2 one-CPU nodes, 2 workers of 1 thread)" if executor == "ray" else "")
    )
    headers = ["repeat", "width", "bisect evals", "evals", "search s", "wall s"]
    print(table([*headers, "sparsity", "sha256", "load before (1/5/15 min)"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--big-mlp", action="store_true", help="also run the ~200 MB MLP memory benchmark")
    parser.add_argument("--big-only", action="store_true")
    parser.add_argument("--ksection", action="store_true", help="only the k-section (search_width) comparison")
    parser.add_argument("--widths", default="1,2,3", help="--ksection: the search widths, comma-separated")
    parser.add_argument("--executor", choices=("local", "ray"), default="local", help="--ksection: where")
    parser.add_argument("--model", type=Path, default=ROOT / "tests" / "fixtures" / "mlp.onnx", help="--ksection")
    parser.add_argument("--eval", type=Path, default=ROOT / "tests" / "fixtures" / "mlp_eval.npz", help="--ksection")
    parser.add_argument("--batch-size", type=int, default=64, help="--ksection")
    parser.add_argument("--repeats", type=int, default=1, help="--ksection")
    args = parser.parse_args()
    if args.ksection:
        widths = [int(w) for w in args.widths.split(",")]
        run_ksection(args.model, args.eval, widths, args.executor, args.batch_size, args.repeats)
        return
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} cores={__import__('os').cpu_count()} "
        f"python {platform.python_version()} onnxruntime {ort.__version__}"
    )
    if not args.big_only:
        run_fixtures(args.tolerance, list(Allocation))
        run_tiled(args.tolerance)
    if args.big_mlp or args.big_only:
        run_big_mlp()


if __name__ == "__main__":
    main()
