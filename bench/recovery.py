"""Benchmark of recovery (issue 5). Prints tables; asserts nothing.

    python bench/recovery.py > bench/results/recovery.txt

For every fixture, zero mode then remove mode, at tolerance 0.01: the sparsity
(zero) or size reduction (remove) each method reaches, its nonzero prunable
params (zero) or bytes (remove) relative to magnitude-only, and the time recovery
itself takes (calibration pass and fits, from the report's timings) in units of one
candidate evaluation (a pass over the search split); then, at a fixed 90%
sparsity (zero) or 50% of the prunable params removed (remove), no search, the
metric of each method on the held-out split and the share of magnitude-only's
accuracy loss it wins back. Remove mode runs twice: at the default channel counts
(multiples of 8 where a layer has them) and at any count, each against magnitude-only
at the same setting. Then how far the compact fixture goes at all, at fixed 50-90% zeroed.
Last, the recovery time of the default (auto) and of sequential
on every fixture's eval set repeated 10x: calibration takes a fixed number of samples
and the fits do not depend on the eval set, so their cost in evaluations shrinks as
eval sets grow (the fixtures' 576 search samples of 8x8 inputs run in a few ms). And the
same on a model of real size: ResNet-18 (random weights, 48x48 inputs) on 1,000
unlabelled samples, metric agreement with the unpruned model's top-1 (the default only).
Last, the fits of wide layers alone (``--fits`` prints only that table): the factorisation made
once per layer, the default's fit (one OBS pass and a few steps) and the exact one (``lsq``), and
their errors ||(W' - W) X||^2 relative to the exact fit's.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from common import fixtures, plain_pass_seconds, repeated, table

import pruner
from pruner import Allocation, Criterion, MetricKind, Mode, PruneOptions, Recovery, Tolerance
from tests.models import resnet18

NORMALIZED, SENSITIVITY = Allocation.NORMALIZED, Allocation.SENSITIVITY
METHODS = {
    "magnitude": (Criterion.MAGNITUDE, Recovery.NONE, NORMALIZED),
    "activation": (Criterion.ACTIVATION, Recovery.NONE, NORMALIZED),
    "magnitude+bias": (Criterion.MAGNITUDE, Recovery.BIAS, NORMALIZED),
    "magnitude+lsq": (Criterion.MAGNITUDE, Recovery.LSQ, NORMALIZED),
    "activation+lsq": (Criterion.ACTIVATION, Recovery.LSQ, NORMALIZED),
    "magnitude+sequential": (Criterion.MAGNITUDE, Recovery.SEQUENTIAL, NORMALIZED),
    "activation+sequential": (Criterion.ACTIVATION, Recovery.SEQUENTIAL, NORMALIZED),
    "activation+sequential, sensitivity": (Criterion.ACTIVATION, Recovery.SEQUENTIAL, SENSITIVITY),
}
REMOVE_METHODS = ("magnitude", "activation", "magnitude+lsq", "activation+lsq", "magnitude+sequential")
FIXED = {Mode.ZERO: 0.9, Mode.REMOVE: 0.5}
TILED = 10


def recovery_evals(report: pruner.Report, pass_seconds: float) -> str:
    """Calibration plus fits, in passes over the search split."""
    seconds = report.timings.get("calibration", 0.0) + report.timings.get("recovery", 0.0)
    return f"{seconds / pass_seconds:.1f}" if seconds else "-"


def search_pass_seconds(model: Path, evalset: pruner.EvalSet) -> float:
    """One candidate evaluation: a pass over the search split (the default share of the eval set)."""
    return plain_pass_seconds(model, evalset) * (1 - PruneOptions().holdout_fraction)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fits", action="store_true", help="only the timing of wide layers' fits")
    args = parser.parse_args()
    print(f"machine: {platform.machine()} python {platform.python_version()} onnxruntime {ort.__version__}")
    if args.fits:
        wide_fits()
        return
    for mode in (Mode.ZERO, Mode.REMOVE):
        methods = {k: v for k, v in METHODS.items() if mode is Mode.ZERO or k in REMOVE_METHODS}
        search_rows, fixed_rows = [], []
        # remove mode: at the default channel counts (multiples of 8 where a layer has them) and free
        counts = [(None, "")] if mode is Mode.ZERO else [(None, ""), (1, ", any count")]
        for (name, model, evals), (multiple, suffix) in itertools.product(fixtures(), counts):
            evalset = pruner.load_eval_set(evals)
            pass_seconds = search_pass_seconds(model, evalset)
            base_size = 0.0
            base_loss = 0.0
            for method_name, (criterion, recover, allocation) in methods.items():
                method = method_name + suffix
                common = {"mode": mode, "criterion": criterion, "recover": recover, "allocation": allocation}
                if multiple is not None:
                    common["channel_multiple"] = multiple
                options = PruneOptions(**common, tolerance=Tolerance(0.01))  # type: ignore[arg-type]
                report = pruner.prune(model, evalset, options).report
                size = report.nonzero_after if mode is Mode.ZERO else report.bytes_after
                if method_name == "magnitude":
                    base_size = size
                reached = f"{report.sparsity:.1%}" if mode is Mode.ZERO else f"{report.bytes_before / size:.2f}x"
                search_rows.append(
                    (
                        name,
                        method,
                        reached,
                        f"{size / base_size:.2f}",
                        f"{report.final.holdout:.4f}",
                        f"{report.timings['total']:.2f}",
                        recovery_evals(report, pass_seconds),
                    )
                )
                fixed = PruneOptions(**common, target_sparsity=FIXED[mode], tolerance=Tolerance(1.0))  # type: ignore[arg-type]
                result = pruner.prune(model, evalset, fixed).report
                assert result.baseline.holdout is not None and result.final.holdout is not None
                loss = result.baseline.holdout - result.final.holdout
                if method_name == "magnitude":
                    base_loss = loss
                won = "-" if method_name == "magnitude" or base_loss <= 0 else f"{1 - loss / base_loss:.0%}"
                fixed_rows.append((name, method, f"{result.baseline.holdout:.4f}", f"{result.final.holdout:.4f}", won))
        what = "sparsity" if mode is Mode.ZERO else "smaller"
        size_label = "nonzero vs magnitude" if mode is Mode.ZERO else "bytes vs magnitude"
        print(f"\n{mode.value.capitalize()} mode, tolerance 0.01")
        headers = ["fixture", "method", what, size_label, "holdout", "wall s", "recovery (evals)"]
        print(table(headers, search_rows))
        print(f"\n{mode.value.capitalize()} mode, fixed {FIXED[mode]:.0%} (no search), held-out split")
        print(table(["fixture", "method", "baseline", "pruned", "loss won back"], fixed_rows))
    compact_sweep()
    time_rows = []
    for name, model, evals in fixtures():
        evalset = repeated(evals, TILED)
        time_rows += timed(name, model, evalset, {"tolerance": Tolerance(0.01)}, (Recovery.AUTO, Recovery.SEQUENTIAL))
    print(f"\nRecovery time on eval sets repeated {TILED}x, tolerance 0.01, in evaluations (search-split passes)")
    print(table(TIME_HEADERS, time_rows))
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "resnet18.onnx"
        onnx.save(resnet18(width=64, size=48), str(model))
        images = np.random.default_rng(0).standard_normal((1000, 3, 48, 48)).astype(np.float32)
        options = {"metric": MetricKind.AGREEMENT, "tolerance": Tolerance(0.01), "max_evaluations": 8}
        # sequential is left out: per candidate it refits every layer after the first pruned one,
        # 512 x 4608 convs included
        rows = timed("resnet18", model, pruner.EvalSet({"input": images}, None), options, (Recovery.AUTO,))
    print("\nThe default (auto) on ResNet-18 (random weights) at 48x48, 1,000 unlabelled samples, agreement,")
    print("at most 8 evaluations")
    print(table(TIME_HEADERS, rows))
    wide_fits()


def _error(w: np.ndarray, w0: np.ndarray, hessian: np.ndarray) -> float:
    d = w - w0
    return float(np.einsum("ij,jk,ik->", d, hessian, d))


WIDE = ((384, 1536), (1536, 384), (1280, 1000))
"""(inputs, outputs): MiniLM's MLP in and out, EfficientNet-Lite0's classifier."""


def wide_fits() -> None:
    """Seconds of one wide layer's fits, on inputs with correlated, unevenly scaled columns, pruned by
    Wanda scores; the error of each fit relative to the exact one."""
    from pruner._ops import Unfold
    from pruner._recover import LayerLayout, _damped, _fit_rows, _inverse_factor

    rng = np.random.default_rng(0)
    layout = LayerLayout("w", "MatMul", "x", False, unfold=Unfold.LAST_AXIS)
    rows = []
    for width, out in WIDE:
        mix = rng.standard_normal((width // 4, width)).astype(np.float32)
        x = rng.standard_normal((4096, width // 4)).astype(np.float32) @ mix * 0.3
        x += rng.standard_normal((4096, width)).astype(np.float32)
        x *= np.exp(rng.standard_normal(width)).astype(np.float32)
        hessian = _damped((x.T @ x).astype(np.float64)[None] / len(x))
        start = time.perf_counter()
        factor = _inverse_factor(hessian)
        factor_seconds = time.perf_counter() - start
        w0 = rng.standard_normal((out, width))
        order = np.argsort(np.abs(w0) * np.sqrt(np.diag(hessian[0])), axis=1)
        for sparsity in (0.5, 0.7):
            pruned = np.zeros(w0.shape, dtype=bool)
            np.put_along_axis(pruned, order[:, : int(sparsity * width)], True, axis=1)
            linear = w0[None] @ hessian
            start = time.perf_counter()
            fast = _fit_rows(layout, w0.copy(), linear, pruned, hessian, factor=factor)
            fast_seconds = time.perf_counter() - start
            start = time.perf_counter()
            exact = _fit_rows(layout, np.where(pruned, 0.0, w0), linear, pruned, hessian)
            exact_seconds = time.perf_counter() - start
            error = functools.partial(_error, w0=w0, hessian=hessian[0])

            rows.append(
                (
                    f"{width}x{out}",
                    f"{sparsity:.0%}",
                    f"{factor_seconds:.2f}",
                    f"{fast_seconds:.2f}",
                    f"{exact_seconds:.2f}",
                    f"{error(fast) / error(exact):.3f}",
                    f"{error(np.where(pruned, 0.0, w0)) / error(exact):.2f}",
                )
            )
    print(f"\nWide layers' fits, seconds (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    headers = ["in x out", "pruned", "factor (once)", "one pass + 3 steps", "exact (lsq)", "error vs exact", "masked"]
    print(table(headers, rows))


SWEPT = ("magnitude", "magnitude+sequential", "activation+sequential, sensitivity")


def compact_sweep() -> None:
    """How far the compact fixture (1,040 weights) goes at all: held-out accuracy at fixed levels."""
    model, evals = next((m, e) for n, m, e in fixtures() if n == "compact")
    evalset = pruner.load_eval_set(evals)
    levels = (0.5, 0.6, 0.7, 0.8, 0.9)
    rows = []
    for method in SWEPT:
        criterion, recover, allocation = METHODS[method]
        cells = []
        for level in levels:
            options = PruneOptions(
                criterion=criterion,
                recover=recover,
                allocation=allocation,
                target_sparsity=level,
                tolerance=Tolerance(1.0),
            )
            cells.append(f"{pruner.prune(model, evalset, options).report.final.holdout:.4f}")
        rows.append((method, *cells))
    print("\nCompact fixture, zero mode at fixed sparsity (no search), held-out accuracy (chance: 0.10)")
    print(table(["method", *(f"{level:.0%}" for level in levels)], rows))


TIME_HEADERS = ["fixture", "mode", "recover", "pass ms", "evaluations", "calibration", "fits", "recovery (evals)"]


def timed(
    name: str, model: Path, evalset: pruner.EvalSet, settings: dict[str, Any], recoveries: tuple[Recovery, ...]
) -> list[tuple[object, ...]]:
    """Recovery time of each of ``recoveries``, in both modes, in evaluations."""
    rows = []
    pass_seconds = search_pass_seconds(model, evalset)
    for mode, recover in itertools.product((Mode.ZERO, Mode.REMOVE), recoveries):
        options = PruneOptions(mode=mode, recover=recover, **settings)
        report = pruner.prune(model, evalset, options).report
        calibration, fits = report.timings.get("calibration", 0.0), report.timings.get("recovery", 0.0)
        rows.append(
            (
                name,
                mode.value,
                recover.value,
                f"{pass_seconds * 1000:.1f}",
                report.evaluations,
                f"{calibration / pass_seconds:.1f}",
                f"{fits / pass_seconds:.1f}",
                recovery_evals(report, pass_seconds),
            )
        )
    return rows


if __name__ == "__main__":
    main()
