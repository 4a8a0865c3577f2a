"""The headline benchmark: ten pretrained models from PyPI wheels through the real search.

    python bench/zoo.py                 # everything (resumable: finished runs are cached)
    python bench/zoo.py --quick         # a CI-sized subset
    python bench/zoo.py --table         # print the table from the cache, run nothing
    python bench/zoo.py --models g2p,magika --modes zero --tolerances 0.01

Models and their pinned wheels: ``bench/zoo_models.py``; eval and test sets: ``bench/zoo_data.py``
(real data that packages ship, each task's own preprocessing; real labels where the task has them,
otherwise the unpruned model's outputs). Needs ``espeak-ng`` (Debian) for the speech set, and
onnxsim 0.8.1 (``bench/requirements-compare.txt``) for its column, else that column is empty.

For each model, mode (zero, remove, N:M) and tolerance (0.5, 1 and 2 points): onnx-pruner's search
with the defaults and with ``recover=sequential``; global magnitude pruning swept at 5% steps (its
largest level that passes on the search split); onnxsim 0.8.1's best passing candidate from a
sweep of its pruning functions. Every run is one subprocess (its peak RSS is that run's) and its
result is cached as JSON in ``$ONNX_PRUNER_ZOO_CACHE/results`` (default ``~/.cache/onnx-pruner-zoo``).

Columns: nonzero share of prunable params kept, bytes ratio (pruned file / original), latency ratio
(pruned / original, one thread, medians of interleaved runs on one batch), held-out drop the tool
saw, the drop on the independent test set (never shown to the tool), evaluations, wall time, wall /
(evaluations x one plain pass over the search split), peak RSS and model + eval-set bytes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import table
from zoo_data import build, data_name, shared_rows, version
from zoo_models import CACHE, MODELS, model_path

import pruner
from pruner import Allocation, Criterion, CustomMetric, Mode, PruneOptions, Recovery, Tolerance
from pruner._metrics import Metric

TOLERANCES = (0.005, 0.01, 0.02)
MODES = (Mode.ZERO, Mode.REMOVE, Mode.NM)
SETTINGS = ("default", "sequential", "magnitude", "onnxsim")
LEVELS = [round(0.05 * i, 2) for i in range(1, 20)]
EVAL, TEST = 500, 1000
QUICK = {
    "models": ("ppocr_cls", "silero_vad", "g2p"),
    "modes": (Mode.ZERO,),
    "tolerances": (0.01,),
    "settings": ("default", "magnitude"),
    "eval": 200,
    "test": 400,
}
BATCH = 64
PEER_PYTHON = Path(os.environ.get("ONNX_PRUNER_PEER_PYTHON", "/tmp/peer/bin/python"))


def dataset(key: str, n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """A model's eval (seed 0) or test (seed 1) set, built once and cached as .npz under a name
    that carries the set's version (``zoo_data.data_name``)."""
    spec = MODELS[key]
    path = CACHE / "data" / f"{data_name(spec.data, n, seed)}.npz"
    if path.exists():
        with np.load(path) as z:
            inputs = {k[2:]: z[k] for k in z.files if k.startswith("i_")}
            return inputs, (z["labels"] if "labels" in z.files else None)
    inputs, labels = build(spec.data, n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if labels is None else {"labels": labels}
    np.savez(path, **{f"i_{k}": v for k, v in inputs.items()}, **extra)
    return inputs, labels


def outputs(model: bytes, inputs: dict[str, np.ndarray], name: str | None = None) -> np.ndarray:
    """The model's (first or named) output over a set, in the search's batch size."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    n = len(next(iter(inputs.values())))
    names = [name] if name else [session.get_outputs()[0].name]
    return np.concatenate(
        [session.run(names, {k: v[i : i + BATCH] for k, v in inputs.items()})[0] for i in range(0, n, BATCH)]
    )


def scores(
    key: str, model: bytes, inputs: dict[str, np.ndarray], labels: np.ndarray | None, reference: np.ndarray
) -> float:
    """The model's metric on a set: labels where the task has them, else the unpruned outputs."""
    spec = MODELS[key]
    metric = Metric(spec.metric)
    out = outputs(model, inputs, spec.output)
    truth = labels if spec.labels == "real" else (reference if spec.metric.needs_labels else None)
    return float(metric.per_sample(out, truth, reference).mean())


def evalset(
    key: str, inputs: dict[str, np.ndarray], labels: np.ndarray | None, reference: np.ndarray
) -> pruner.EvalSet:
    spec = MODELS[key]
    if spec.labels == "real":
        return pruner.EvalSet(inputs, labels)
    return pruner.EvalSet(inputs, reference if spec.metric.needs_labels else None)


def latency_ratio(original: bytes, pruned: bytes, feeds: dict[str, np.ndarray], rounds: int = 15) -> float:
    """Median of pruned / original, one thread each, runs interleaved A, B, A, B (load drifts hit both)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    a = ort.InferenceSession(original, options, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(pruned, options, providers=["CPUExecutionProvider"])
    for session in (a, b, a, b):
        session.run(None, feeds)
    ratios = []
    for _ in range(rounds):
        start = time.perf_counter()
        a.run(None, feeds)
        middle = time.perf_counter()
        b.run(None, feeds)
        ratios.append((time.perf_counter() - middle) / (middle - start))
    return statistics.median(ratios)


def nonzero(model: onnx.ModelProto) -> int:
    """Nonzero entries of the weight tensors the graph uses (float initializers and Constant values
    of rank >= 2 that some node reads): one count for every method, whatever it calls prunable.
    Tensors no node reads are left out: onnxsim 0.8.1 writes its pruned weights as new
    initializers and leaves the originals in the file, unused (the bytes ratio shows them)."""
    used = {name for node in model.graph.node for name in node.input}
    tensors = [t for t in model.graph.initializer if t.name in used]
    tensors += [
        a.t
        for n in model.graph.node
        if n.op_type == "Constant" and n.output[0] in used
        for a in n.attribute
        if a.name == "value"
    ]
    return sum(
        int(np.count_nonzero(onnx.numpy_helper.to_array(t)))
        for t in tensors
        if len(t.dims) >= 2 and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    )


def run_job(key: str, mode: Mode, setting: str, tolerance: float, n_eval: int, n_test: int) -> dict[str, Any]:
    """One cached result: a search (default or sequential) at one tolerance, or a sweep
    (magnitude, onnxsim) judged afterwards at every tolerance."""
    spec = MODELS[key]
    path = model_path(key)
    original = path.read_bytes()
    inputs, labels = dataset(key, n_eval, 0)
    test_inputs, test_labels = dataset(key, n_test, 1)
    repeated, repeated_test, shared = shared_rows(inputs, test_inputs)
    if repeated or repeated_test or shared:
        raise SystemExit(
            f"{key}'s sets ({spec.data}) repeat rows: {repeated} in the eval set, {repeated_test} in the "
            f"test set, {shared} test rows equal to eval rows; fix its builder in bench/zoo_data.py"
        )
    reference = outputs(original, inputs, spec.output)
    test_reference = outputs(original, test_inputs, spec.output)
    data = evalset(key, inputs, labels, reference)
    start = time.perf_counter()
    scores(key, original, inputs, labels, reference)
    pass_seconds = (time.perf_counter() - start) * (1 - PruneOptions().holdout_fraction)
    base_test = scores(key, original, test_inputs, test_labels, test_reference)
    metric = Metric(spec.metric)
    feeds = {k: v[:BATCH] for k, v in inputs.items()}
    weights = nonzero(onnx.load_from_string(original))

    def measure(model: bytes) -> dict[str, Any]:
        proto = onnx.load_from_string(model)
        return {
            "nonzero_share": nonzero(proto) / max(weights, 1),
            "bytes_ratio": len(model) / len(original),
            "latency_ratio": latency_ratio(original, model, feeds),
            "test_drop": metric.loss(base_test, scores(key, model, test_inputs, test_labels, test_reference)),
        }

    out: dict[str, Any] = {
        "model": key, "mode": mode.value, "setting": setting, "tolerance": tolerance,
        "n_eval": n_eval, "n_test": n_test, "pass_seconds": pass_seconds,
        "model_bytes": len(original), "eval_bytes": sum(v.nbytes for v in inputs.values()),
    }  # fmt: skip
    if setting in ("default", "sequential"):
        options = PruneOptions(
            mode=mode,
            metric=spec.metric,
            tolerance=Tolerance(tolerance),
            recover=Recovery.SEQUENTIAL if setting == "sequential" else Recovery.AUTO,
            batch_size=BATCH,
        )
        start = time.perf_counter()
        try:
            result = pruner.prune(original, data, options)
        except pruner.PrunerError as e:
            out["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            return out
        out["wall"] = time.perf_counter() - start
        report = result.report
        assert result.model_bytes is not None
        out["evaluations"] = report.evaluations + report.confirmations + 2  # + baseline + final check
        base, final = report.baseline.holdout, report.final.holdout
        out["holdout_drop"] = None if base is None or final is None else metric.loss(base, final)
        out["baseline"] = {"search": report.baseline.search, "holdout": report.baseline.holdout}
        out["status"] = report.status
        out["notes"] = [note[:200] for note in report.notes]
        out.update(measure(result.model_bytes))
    else:
        out["points"] = sweep(key, original, data, mode, setting, metric)
        out["wall"] = sum(p["seconds"] for p in out["points"])
        out["evaluations"] = len(out["points"]) + 1
        for t in TOLERANCES:
            passing = [p for p in out["points"] if p["search_drop"] <= t + 1e-9]
            if passing:
                best = max(passing, key=lambda p: p["level"])
                out[f"best_{t}"] = {
                    "level": best["level"],
                    "holdout_drop": best["holdout_drop"],
                    **measure(_restore(best)),
                }
        for p in out["points"]:
            p.pop("_model", None)
    return out


_MODELS_BY_POINT: dict[int, bytes] = {}


def _restore(point: dict[str, Any]) -> bytes:
    return _MODELS_BY_POINT[point["_model"]]


def sweep(
    key: str, original: bytes, data: pruner.EvalSet, mode: Mode, setting: str, metric: Metric
) -> list[dict[str, Any]]:
    """Fixed levels in 5% steps; stops after the first level whose search-split drop exceeds the largest tolerance."""
    points: list[dict[str, Any]] = []
    from pruner._phases import split_rows as _split

    search, hold = _split(len(data), PruneOptions().holdout_fraction, 0)
    spec = MODELS[key]
    reference = outputs(original, data.inputs, spec.output)

    def split_score(model: bytes, rows: np.ndarray) -> float:
        sub = {k: v[rows] for k, v in data.inputs.items()}
        out = outputs(model, sub, spec.output)
        truth = None if data.labels is None else data.labels[rows]
        return float(metric.per_sample(out, truth, reference[rows]).mean())

    base_search, base_hold = split_score(original, search), split_score(original, hold)
    for level in LEVELS:
        start = time.perf_counter()
        if setting == "magnitude":
            options = PruneOptions(
                mode=mode,
                metric=spec.metric,
                criterion=Criterion.MAGNITUDE if mode is not Mode.REMOVE else Criterion.L1,
                allocation=Allocation.GLOBAL,
                recover=Recovery.NONE,
                target_sparsity=level,
                tolerance=Tolerance(1e6),
                batch_size=BATCH,
            )
            try:
                model = pruner.prune(original, data, options).model_bytes
            except pruner.PrunerError as e:
                points.append(
                    {"level": level, "error": f"{type(e).__name__}: {str(e)[:160]}", "seconds": 0.0, "search_drop": 1e9}
                )
                break
            assert model is not None
        else:
            model = onnxsim_prune(original, mode, level)
            if isinstance(model, str):
                points.append({"level": level, "error": model, "seconds": 0.0, "search_drop": 1e9})
                break
        point = {
            "level": level,
            "search_drop": metric.loss(base_search, split_score(model, search)),
            "holdout_drop": metric.loss(base_hold, split_score(model, hold)),
            "seconds": time.perf_counter() - start,
            "_model": len(_MODELS_BY_POINT),
        }
        _MODELS_BY_POINT[point["_model"]] = model
        points.append(point)
        if point["search_drop"] > max(TOLERANCES):
            break
    return points


_SIMPLIFIED: dict[bytes, onnx.ModelProto] = {}


def onnxsim_prune(original: bytes, mode: Mode, level: float) -> bytes | str:
    """onnxsim 0.8.1's global magnitude (zero) or structured (remove) pruning; the error where it
    has no function for the mode, is not installed, or fails on the model. Structured pruning runs
    on onnxsim's simplified model (simplified once per model): it expects BatchNormalization fused
    into the Conv before it, and on an unfused export it finds no chain at all."""
    try:
        import onnxsim  # type: ignore[import-not-found]
        from onnxsim import pruning  # type: ignore[import-not-found]
    except ImportError as e:
        return f"onnxsim not importable: {e}"
    model = onnx.load_from_string(original)
    try:
        if mode is Mode.ZERO:
            pruned = pruning.apply_magnitude_pruning(model, sparsity=level, global_sparsity=True)
        elif mode is Mode.REMOVE:
            if original not in _SIMPLIFIED:
                simplified, ok = onnxsim.simplify(model)
                if not ok:
                    return "onnxsim: simplify failed its own check"
                _SIMPLIFIED[original] = simplified
            pruned = pruning.apply_structured_pruning(_SIMPLIFIED[original], sparsity=level)
        else:
            return "onnxsim has no N:M pruning"
    except Exception as e:  # the peer raises for models it cannot handle
        return f"onnxsim: {type(e).__name__}: {str(e)[:150]}"
    return bytes(pruned.SerializeToString())


def result_path(key: str, mode: Mode, setting: str, tolerance: float, n_eval: int) -> Path:
    """Where a run's result is cached; a model whose sets are past version 1 carries ``_d<N>``, so
    a result on older sets is never read as one on newer sets, and a model measured by a task
    metric of ``zoo_metrics`` carries its name (``yolov8n_..._d2_detection_f1_0.1.json``), so a
    result under a built-in metric is never read as one under it."""
    tol = f"{tolerance:g}" if setting in ("default", "sequential") else "all"
    data = version(MODELS[key].data)
    tag = f"_d{data}" if data > 1 else ""
    metric = MODELS[key].metric
    if isinstance(metric, CustomMetric):
        tag += f"_{metric.name.replace('@', '_')}"
    return CACHE / "results" / f"{key}_{mode.value}_{setting}_{tol}_{n_eval}{tag}.json"


def ensure(key: str, mode: Mode, setting: str, tolerance: float, n_eval: int, n_test: int) -> dict[str, Any] | None:
    """The cached result, or run it in its own process (its peak RSS is then this run's alone)."""
    path = result_path(key, mode, setting, tolerance, n_eval)
    if path.exists():
        return dict(json.loads(path.read_text()))
    python = sys.executable
    if setting == "onnxsim":
        if not PEER_PYTHON.exists():
            return None
        python = str(PEER_PYTHON)
    command = [python, __file__, "--job", key, mode.value, setting, str(tolerance), str(n_eval), str(n_test)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    print(f"running {key} {mode.value} {setting} {tolerance:g} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        result = {
            "model": key,
            "mode": mode.value,
            "setting": setting,
            "tolerance": tolerance,
            "error": done.stderr.strip().splitlines()[-1][:200],
        }
    else:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def job(argv: list[str]) -> None:
    key, mode, setting, tolerance, n_eval, n_test = argv
    result = run_job(key, Mode(mode), setting, float(tolerance), int(n_eval), int(n_test))
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))


@functools.cache
def prunable_share(key: str) -> float:
    """Share of all the model's parameters (every initializer and Constant) that onnx-pruner can
    prune at all (``pruner.inspect``): what no setting of the tool can go below."""
    found = pruner.inspect(str(model_path(key)))
    return found.prunable_params / max(found.total_params, 1)


def row(key: str, mode: Mode, setting: str, tolerance: float, r: dict[str, Any] | None) -> tuple[object, ...]:
    label = {
        "default": "onnx-pruner",
        "sequential": "onnx-pruner seq",
        "magnitude": "magnitude sweep",
        "onnxsim": "onnxsim 0.8.1",
    }[setting]
    head = (key, f"{prunable_share(key):.3f}", mode.value, f"{tolerance * 100:g}", label)
    if r is None:
        return (*head, "not run", *[""] * (len(HEADERS) - len(head) - 1))
    if "error" in r:
        return (*head, f"error: {r['error'][:70]}", *[""] * (len(HEADERS) - len(head) - 1))
    best = r if setting in ("default", "sequential") else r.get(f"best_{tolerance}")
    mb = 1 << 20
    cost = (
        f"{r.get('evaluations', '')}",
        f"{r.get('wall', 0):.0f}",
        f"{r['wall'] / (r['evaluations'] * r['pass_seconds']):.1f}"
        if r.get("evaluations") and r.get("pass_seconds")
        else "",
        f"{r['peak_rss'] / mb:.0f} / {(r['model_bytes'] + r['eval_bytes']) / mb:.0f}" if "peak_rss" in r else "",
    )
    share = f"{best['nonzero_share']:.3f}" if best is not None else ""
    if best is not None and r.get("status") == "unchanged":
        share += " (unchanged)"
    if best is None:
        errors = [p["error"] for p in r.get("points", []) if "error" in p]
        if errors and len(r["points"]) == 1:
            return (*head, f"error: {errors[0][:70]}", "", "", "", "", *cost)
        return (*head, "nothing passes", "", "", "", "", *cost)
    return (
        *head,
        share,
        f"{best['bytes_ratio']:.3f}",
        f"{best['latency_ratio']:.2f}",
        "" if best["holdout_drop"] is None else f"{best['holdout_drop'] * 100:+.2f}",
        f"{best['test_drop'] * 100:+.2f}{' !' if best['test_drop'] > tolerance + 1e-9 else ''}",
        *cost,
    )


def markdown(headers: list[str], rows: list[tuple[object, ...]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    return "\n".join([*lines, *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)])


HEADERS = [
    "model", "prunable", "mode", "tol pts", "method", "nonzero weights", "bytes ratio", "latency ratio",
    "held-out drop pts", "test drop pts", "evals", "wall s", "wall/(evals x pass)", "peak RSS / model+eval MiB",
]  # fmt: skip


def main() -> None:
    if sys.argv[1:2] == ["--job"]:
        job(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CI-sized subset")
    parser.add_argument("--table", action="store_true", help="print the table from the cache; run nothing")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown (for bench/results)")
    parser.add_argument("--models", help="comma-separated keys of bench/zoo_models.py")
    parser.add_argument("--modes", help="comma-separated: zero, remove, nm")
    parser.add_argument("--tolerances", help="comma-separated absolute tolerances (0.01 = 1 point)")
    parser.add_argument("--settings", help="comma-separated: default, sequential, magnitude, onnxsim")
    args = parser.parse_args()
    models = list(QUICK["models"]) if args.quick else list(MODELS)
    modes = list(QUICK["modes"]) if args.quick else list(MODES)
    tolerances = list(QUICK["tolerances"]) if args.quick else list(TOLERANCES)
    settings = list(QUICK["settings"]) if args.quick else list(SETTINGS)
    n_eval, n_test = (QUICK["eval"], QUICK["test"]) if args.quick else (EVAL, TEST)
    models = args.models.split(",") if args.models else models
    modes = [Mode(m) for m in args.modes.split(",")] if args.modes else modes
    tolerances = [float(t) for t in args.tolerances.split(",")] if args.tolerances else tolerances
    settings = args.settings.split(",") if args.settings else settings
    assert isinstance(n_eval, int) and isinstance(n_test, int)
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}, "
        f"onnxruntime {ort.__version__}, onnx {onnx.__version__}"
    )
    print(
        f"eval sets {n_eval} samples (search split {1 - PruneOptions().holdout_fraction:.0%}), "
        f"test sets {n_test} (never shown to the tool)"
    )
    rows = []
    for key in models:
        for mode in modes:
            for tolerance in tolerances:
                for setting in settings:
                    path = result_path(key, mode, setting, tolerance, n_eval)
                    if args.table:
                        r = json.loads(path.read_text()) if path.exists() else None
                    else:
                        r = ensure(key, mode, setting, tolerance, n_eval, n_test)
                    rows.append(row(key, mode, setting, tolerance, r))
    print()
    print(markdown(HEADERS, rows) if args.markdown else table(HEADERS, rows))
    print(
        "\nratios: pruned / original; drops in metric points (0.01 = 1 point; negative = better); "
        "! = test drop over the tolerance"
    )
    print("prunable: share of all parameters pruner.inspect finds prunable (the rest no method here may touch)")
    print("evals: onnxruntime passes over the search split or a part of it (sweeps: one per level + baseline)")
    print("\nmodels:")
    for key in models:
        spec = MODELS[key]
        print(
            f"  {key}: {spec.title}; {spec.wheel.requirement}; {spec.task}; "
            f"metric {Metric(spec.metric).name}, {spec.labels} labels"
        )


if __name__ == "__main__":
    main()
