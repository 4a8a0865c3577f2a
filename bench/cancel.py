"""Benchmark of cancellation (issue 15): how long a run goes on after its stop event is set.

    python bench/cancel.py > bench/results/cancel.txt

For the slowest fixtures (cnn_bn: zero mode with sequential recovery is the longest run of
the committed fixtures; the exported encoder in remove mode), in zero and remove mode, with
sequential and with the default recovery: one uncancelled run gives the wall time T, then
runs are cancelled by a timer at 10%, 20%, ..., 90% of T. The latency is the time from
``stop.set()`` to the ``CancelledError`` reaching the caller; the phase is where the run was
(the last progress event before the cancel). Timings are wall-clock on a shared machine:
the load average is printed before and after. Asserts nothing.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import FIXTURES

import pruner
from pruner import Mode, PruneOptions, Recovery

CASES = [
    ("cnn_bn", "cnn_bn", Mode.ZERO, Recovery.SEQUENTIAL),
    ("cnn_bn", "cnn_bn", Mode.ZERO, Recovery.AUTO),
    ("cnn_bn", "cnn_bn", Mode.REMOVE, Recovery.SEQUENTIAL),
    ("cnn_bn", "cnn_bn", Mode.REMOVE, Recovery.AUTO),
    ("encoder_exported", "attention", Mode.REMOVE, Recovery.SEQUENTIAL),
]
FRACTIONS = [i / 10 for i in range(1, 10)]


def run(model: Path, evalset: pruner.EvalSet, options: PruneOptions, after: float | None) -> tuple[float, str, bool]:
    """(latency or total seconds, phase at the cancel, whether it was cancelled)."""
    stop = threading.Event()
    phase = ["setup"]
    fired: list[float] = []
    seen: list[str] = []

    def on_progress(event: pruner.ProgressEvent) -> None:
        seen.append(event.kind.value)

    def fire() -> None:
        phase[0] = seen[-1] if seen else "setup"
        fired.append(time.perf_counter())
        stop.set()

    timer = threading.Timer(after, fire) if after is not None else None
    start = time.perf_counter()
    if timer is not None:
        timer.start()
    try:
        pruner.prune(model, evalset, options, on_progress=on_progress, stop=stop)
    except pruner.CancelledError:
        return time.perf_counter() - fired[0], phase[0], True
    finally:
        if timer is not None:
            timer.cancel()
    return time.perf_counter() - start, "finished", False


def main() -> None:
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} cores, shared)")
    print()
    header = f"{'fixture':<17} {'mode':<6} {'recovery':<10} {'T (s)':>6}  {'cancel at':>9} {'latency (ms)':>12}  phase"
    summary = []
    for name, evals, mode, recover in CASES:
        model = FIXTURES / f"{name}.onnx"
        evalset = pruner.load_eval_set(FIXTURES / f"{evals}_eval.npz")
        options = PruneOptions(mode=mode, recover=recover)
        total, _, _ = run(model, evalset, options, None)
        print(header)
        latencies = []
        for fraction in FRACTIONS:
            seconds, phase, cancelled = run(model, evalset, options, fraction * total)
            if cancelled:
                latencies.append(seconds)
            shown = f"{seconds * 1000:12.0f}" if cancelled else f"{'(done)':>12}"
            at = fraction * total
            print(f"{name:<17} {mode.value:<6} {recover.value:<10} {total:6.1f}  {at:8.2f}s {shown}  {phase}")
        print()
        if latencies:
            summary.append((name, mode.value, recover.value, total, max(latencies), statistics.median(latencies)))
    print(f"{'fixture':<17} {'mode':<6} {'recovery':<10} {'T (s)':>6} {'worst (ms)':>10} {'median (ms)':>11}")
    for name, mode, recover, total, worst, median in summary:
        print(f"{name:<17} {mode:<6} {recover:<10} {total:6.1f} {worst * 1000:10.0f} {median * 1000:11.0f}")
    print()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
