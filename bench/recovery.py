"""Benchmark of recovery (issue 5, zero mode). Prints tables; asserts nothing.

    python bench/recovery.py

For every fixture at tolerance 0.01: the sparsity each method reaches, its
nonzero prunable params relative to magnitude-only, and the time it adds over
magnitude-only in units of one candidate evaluation; then, at a fixed 90%
sparsity (no search), the metric of each method on the held-out split and the
share of magnitude-only's accuracy loss it wins back.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fixtures, table

import pruner
from pruner import Criterion, PruneOptions, Recovery, Tolerance

METHODS = {
    "magnitude": (Criterion.MAGNITUDE, Recovery.NONE),
    "activation": (Criterion.ACTIVATION, Recovery.NONE),
    "magnitude+bias": (Criterion.MAGNITUDE, Recovery.BIAS),
    "magnitude+lsq": (Criterion.MAGNITUDE, Recovery.LSQ),
    "activation+lsq": (Criterion.ACTIVATION, Recovery.LSQ),
}
FIXED = 0.9


def main() -> None:
    print(f"machine: {platform.machine()} python {platform.python_version()} onnxruntime {ort.__version__}")
    search_rows, fixed_rows = [], []
    for name, model, evals in fixtures():
        evalset = pruner.load_eval_set(evals)
        base_nonzero = base_wall = eval_seconds = 0.0
        base_loss = 0.0
        for method, (criterion, recover) in METHODS.items():
            options = PruneOptions(criterion=criterion, recover=recover, tolerance=Tolerance(0.01))
            start = time.perf_counter()
            report = pruner.prune(model, evalset, options).report
            wall = time.perf_counter() - start
            if method == "magnitude":
                base_nonzero, base_wall = report.nonzero_after, wall
                eval_seconds = sum(t.seconds for t in report.trace) / max(len(report.trace), 1)
            search_rows.append(
                (
                    name,
                    method,
                    f"{report.sparsity:.1%}",
                    f"{report.nonzero_after / base_nonzero:.2f}",
                    f"{report.final.holdout:.4f}",
                    f"{wall:.2f}",
                    f"{(wall - base_wall) / eval_seconds:.0f}" if method != "magnitude" else "-",
                )
            )
            fixed = PruneOptions(criterion=criterion, recover=recover, target_sparsity=FIXED, tolerance=Tolerance(1.0))
            result = pruner.prune(model, evalset, fixed).report
            assert result.baseline.holdout is not None and result.final.holdout is not None
            loss = result.baseline.holdout - result.final.holdout
            if method == "magnitude":
                base_loss = loss
            won = "-" if method == "magnitude" or base_loss <= 0 else f"{1 - loss / base_loss:.0%}"
            fixed_rows.append((name, method, f"{result.baseline.holdout:.4f}", f"{result.final.holdout:.4f}", won))
    print("\nZero mode, tolerance 0.01")
    headers = ["fixture", "method", "sparsity", "nonzero vs magnitude", "holdout", "wall s", "added (evals)"]
    print(table(headers, search_rows))
    print(f"\nFixed {FIXED:.0%} sparsity (no search), held-out split")
    print(table(["fixture", "method", "baseline", "pruned", "loss won back"], fixed_rows))


if __name__ == "__main__":
    main()
