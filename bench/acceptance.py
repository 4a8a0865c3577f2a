"""Validation of the held-out acceptance rules on independent test sets. Prints tables; asserts nothing.

    python bench/acceptance.py > bench/results/acceptance.txt

For each model, seed and tolerance, the tool sees a small eval set; the returned model is then
measured by a fresh onnxruntime session of its written bytes on a separate test set the tool
never saw, drawn from the same distribution. Per rule: the nonzero share of the prunable weights
(zero mode) or the file bytes (remove mode) of the returned model, its drop on the test set, how
often that drop exceeds the tolerance and by how much (mean and worst excess over the runs that
exceed it), and the mean held-out interval the report printed.

Models:
* ``mlp`` (tests/fixtures; digits): per seed, 200 of the 720 samples are the eval
  set and the other 520 the test set.
* ``ocr-cls``: PaddleOCR's text-orientation classifier (see bench/real.py, which renders its data):
  per seed an eval set of 250 rendered lines (rendering seed 100 + seed), one test set of 1500
  lines from rendering seed 10_000.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import FIXTURES, table
from real import eval_set, fetch

import pruner
from pruner import AcceptanceRule, Mode, PruneOptions, Tolerance

RULES = {
    "exact (today)": (AcceptanceRule.EXACT, 0.9),
    "interval 0.9": (AcceptanceRule.INTERVAL, 0.9),
    "bound 0.9": (AcceptanceRule.BOUND, 0.9),
}
OCR_RULES = ("exact (today)", "interval 0.9")
"""The bound rule cannot accept anything on 50 held-out samples at these tolerances (the upper end
for a candidate that changes no sample is 1.645 / 52 = 0.032): shown on the fixtures only, to save time."""
SEEDS = (0, 1, 2, 3, 4)
MAX_EVALUATIONS = 10


def accuracy(model: bytes, data: pruner.EvalSet) -> float:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    (x,) = data.inputs.values()
    hits = 0
    for i in range(0, len(x), 256):
        out = session.run(None, {name: x[i : i + 256]})[0]
        hits += int((out.argmax(-1) == data.labels[i : i + 256]).sum())  # type: ignore[index]
    return hits / len(x)


@dataclass
class Run:
    share: float
    bytes: int
    test_drop: float
    low: float
    high: float
    held_out: float


def run(model: bytes, evalset: pruner.EvalSet, test: pruner.EvalSet, options: PruneOptions) -> Run:
    result = pruner.prune(model, evalset, options)
    report = result.report
    written = result.model_bytes or result.model.SerializeToString()
    drop = accuracy(model, test) - accuracy(written, test)
    interval = report.drop
    assert interval is not None
    share = report.nonzero_after / report.nonzero_before if report.nonzero_before else 1.0
    return Run(share, report.bytes_after, drop, interval.low, interval.high, interval.estimate)


def digits_splits(name: str, seed: int) -> tuple[pruner.EvalSet, pruner.EvalSet]:
    data = pruner.load_eval_set(FIXTURES / f"{name}_eval.npz")
    assert data.labels is not None
    order = np.random.default_rng(1000 + seed).permutation(len(data))
    pick, rest = np.sort(order[:200]), np.sort(order[200:])
    (key, x) = next(iter(data.inputs.items()))
    return (
        pruner.EvalSet({key: x[pick]}, data.labels[pick]),
        pruner.EvalSet({key: x[rest]}, data.labels[rest]),
    )


def summarize(title: str, runs: dict[str, list[Run]], tolerance: float, mode: Mode, base_bytes: int) -> None:
    rows = []
    for rule, got in runs.items():
        excess = [r.test_drop - tolerance for r in got if r.test_drop > tolerance + 1e-9]
        size = (
            f"{statistics.mean(r.share for r in got):.3f}"
            if mode is Mode.ZERO
            else f"{statistics.mean(r.bytes for r in got) / base_bytes:.3f}"
        )
        rows.append(
            (
                rule,
                size,
                " ".join(f"{(r.share if mode is Mode.ZERO else r.bytes / base_bytes):.2f}" for r in got),
                f"{statistics.mean(r.test_drop for r in got):+.4f}",
                f"{len(excess)}/{len(got)}",
                f"{statistics.mean(excess):.4f}" if excess else "-",
                f"{max(excess):.4f}" if excess else "-",
                f"{statistics.mean(r.held_out for r in got):+.4f}",
                f"[{statistics.mean(r.low for r in got):+.3f}, {statistics.mean(r.high for r in got):+.3f}]",
            )
        )
    what = "nonzero share" if mode is Mode.ZERO else "bytes share"
    print(f"\n{title}")
    print(
        table(
            [
                "rule",
                f"{what} (mean)",
                "per seed",
                "test drop (mean)",
                "test drop > tol",
                "excess mean",
                "excess worst",
                "held-out drop",
                "held-out interval (mean)",
            ],
            rows,
        )
    )


def bench(
    name: str,
    model: bytes,
    sets: list[tuple[pruner.EvalSet, pruner.EvalSet]],
    modes: tuple[tuple[Mode, float], ...],
    rules: tuple[str, ...] = tuple(RULES),
) -> None:
    for mode, tolerance in modes:
        runs: dict[str, list[Run]] = {rule: [] for rule in rules}
        start = time.perf_counter()
        for seed, (evalset, test) in zip(SEEDS, sets, strict=True):
            for rule in rules:
                acceptance, confidence = RULES[rule]
                options = PruneOptions(
                    mode=mode,
                    tolerance=Tolerance(tolerance),
                    max_evaluations=MAX_EVALUATIONS,
                    seed=seed,
                    acceptance=acceptance,
                    confidence=confidence,
                )
                runs[rule].append(run(model, evalset, test, options))
        n_eval, n_test = len(sets[0][0]), len(sets[0][1])
        title = (
            f"{name}, {mode.value} mode, tolerance {tolerance:g}: {len(SEEDS)} seeds, eval set {n_eval} "
            f"({round(n_eval * 0.2)} held out), test set {n_test} ({time.perf_counter() - start:.0f} s)"
        )
        summarize(title, runs, tolerance, mode, len(model))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fixtures only")
    args = parser.parse_args()
    print(f"machine: {platform.machine()} python {platform.python_version()} onnxruntime {ort.__version__}")
    print(f"rules: {', '.join(RULES)}; zero/remove mode, default recovery, max_evaluations {MAX_EVALUATIONS}")
    for name in ("mlp",):
        model = (FIXTURES / f"{name}.onnx").read_bytes()
        bench(name, model, [digits_splits(name, s) for s in SEEDS], ((Mode.ZERO, 0.01), (Mode.ZERO, 0.02)))
    if args.quick:
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = fetch(Path(tmp)).read_bytes()
    test = eval_set(10_000, 1500)
    sets = [(eval_set(100 + s, 250), test) for s in SEEDS]
    bench("ocr-cls", model, sets, ((Mode.ZERO, 0.01), (Mode.ZERO, 0.02), (Mode.REMOVE, 0.01)), OCR_RULES)


if __name__ == "__main__":
    main()
