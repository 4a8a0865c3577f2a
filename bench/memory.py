"""Peak memory (and time overhead) of a default run on the zoo models in the cache.

    python bench/memory.py                          # every zoo model whose model and eval set are cached
    python bench/memory.py --models efficientnet_lite0,open_nsfw --max-evaluations 6

Each model runs in its own process: the model file and its cached 500-sample eval set
(``bench/zoo.py``'s) are read, the process's peak RSS is reset (``/proc/self/clear_refs``), and
``pruner.prune`` runs with the zoo's default options (zero mode, tolerance 1 point, batch 64) but a
small ``max_evaluations``. The ``phase ... done`` DEBUG lines of ``pruner._prune`` (and the
``calibrated`` line of the candidates phase) mark the phases: at each, the peak since the previous
mark is read and reset, so every phase gets its own peak. The limit is issue 18's:
2 x (model bytes + eval-set bytes) + 1 GiB, eval-set bytes being the decoded arrays the run is given.

Time: ``pass`` is one plain pass of the unpruned model over the search split (a session as the run
makes them, same threads), ``evals`` every metric pass the run made (search trials, held-out
confirmations, the baseline and the final check), ``overhead`` = (wall - calibration) / (evals x pass).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import run_job, table
from zoo_models import CACHE, MODELS

import pruner
from pruner import Criterion, Mode, PruneOptions, Recovery, Tolerance
from pruner._evaluate import make_session, session_runner
from pruner._phases import process_memory

EVAL = 500
BATCH = 64
MAX_EVALUATIONS = 6
MiB = 2**20
PHASES = ("load", "baseline", "calibration", "candidates", "search", "confirm", "write", "report")


def data_path(key: str) -> Path:
    return CACHE / "data" / f"{MODELS[key].data}_{EVAL}_0.npz"


def present() -> list[str]:
    return [k for k in MODELS if (CACHE / "models" / f"{k}.onnx").exists() and data_path(k).exists()]


class PhasePeaks(logging.Handler):
    """Reads and resets the process's peak RSS at every phase mark."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.peaks: dict[str, int] = {}
        self.after: dict[str, int] = {}
        """RSS at the end of each phase."""

    def reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def mark(self, phase: str) -> None:
        rss, peak = process_memory()
        self.peaks[phase] = max(self.peaks.get(phase, 0), peak)
        self.after[phase] = rss
        self.reset()

    def emit(self, record: logging.LogRecord) -> None:
        phase = getattr(record, "phase", None)
        if phase is not None:
            self.mark(phase)
        elif record.name == "pruner._candidates" and record.getMessage().startswith("calibrated "):
            self.mark("calibration")


def job(key: str, max_evaluations: int, threads: int, criterion: Criterion = Criterion.AUTO) -> dict[str, Any]:
    spec = MODELS[key]
    model = (CACHE / "models" / f"{key}.onnx").read_bytes()
    with np.load(data_path(key)) as z:
        inputs = {k[2:]: z[k] for k in z.files if k.startswith("i_")}
        labels = z["labels"] if "labels" in z.files else None
    options = PruneOptions(
        mode=Mode.ZERO,
        criterion=criterion,
        metric=spec.metric,
        tolerance=Tolerance(0.01),
        recover=Recovery.AUTO,
        batch_size=BATCH,
        max_evaluations=max_evaluations,
        threads=threads,
    )
    session = make_session(model, threads=threads)
    output = spec.output or session.get_outputs()[0].name
    run = session_runner(session, output)
    n = len(next(iter(inputs.values())))
    search = round(n * (1 - options.holdout_fraction))
    run({k: v[:BATCH] for k, v in inputs.items()})  # warm-up
    start = time.perf_counter()
    reference = np.concatenate([run({k: v[i : i + BATCH] for k, v in inputs.items()}) for i in range(0, n, BATCH)])
    pass_seconds = (time.perf_counter() - start) * search / n
    del session, run
    if spec.labels != "real":
        labels = reference if spec.metric.needs_labels else None
    data = pruner.EvalSet(inputs, labels)
    del reference
    gc.collect()
    eval_bytes = sum(v.nbytes for v in inputs.values()) + (0 if labels is None else labels.nbytes)
    peaks = PhasePeaks()
    log = logging.getLogger("pruner")
    log.setLevel(logging.DEBUG)
    log.addHandler(peaks)
    before = process_memory()[0]
    peaks.reset()
    start = time.perf_counter()
    result = pruner.prune(model, data, options)
    wall = time.perf_counter() - start
    report = result.report
    evaluations = report.evaluations + report.confirmations + 2  # + baseline + final check
    calibration = report.timings.get("calibration", 0.0)
    return {
        "model": key,
        "model_bytes": len(model),
        "eval_bytes": eval_bytes,
        "rss_before": before,
        "peaks": peaks.peaks,
        "after": peaks.after,
        "peak": max(peaks.peaks.values()),
        "wall": wall,
        "calibration": calibration,
        "pass": pass_seconds,
        "evaluations": evaluations,
        "timings": report.timings,
        "sparsity": report.sparsity,
        "status": report.status,
    }


def row(r: dict[str, Any]) -> tuple[object, ...]:
    size = (r["model_bytes"] + r["eval_bytes"]) / MiB
    limit = 2 * size + 1024
    peak = r["peak"] / MiB
    rest = max(v for k, v in r["peaks"].items() if k != "calibration") / MiB
    phases = " ".join(f"{p[:5]}={r['peaks'][p] / MiB:.0f}" for p in PHASES if p in r["peaks"])
    overhead = (r["wall"] - r["calibration"]) / max(r["evaluations"] * r["pass"], 1e-9)
    return (
        r["model"],
        f"{size:.0f}",
        f"{r['rss_before'] / MiB:.0f}",
        f"{peak:.0f}",
        f"{limit:.0f}",
        "pass" if peak <= limit else "FAIL",
        f"{rest:.0f}",
        f"{r['wall']:.1f}",
        f"{r['calibration']:.1f}",
        r["evaluations"],
        f"{r['pass']:.2f}",
        f"{overhead:.2f}",
        phases,
    )


HEADERS = [
    "model",
    "model+eval MiB",
    "RSS before",
    "peak RSS MiB",
    "limit MiB",
    "",
    "peak w/o calibration",
    "wall s",
    "calib s",
    "evals",
    "pass s",
    "overhead",
    "per-phase peak MiB",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", help="comma-separated keys of bench/zoo_models.py (default: all cached)")
    parser.add_argument("--max-evaluations", type=int, default=MAX_EVALUATIONS)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its choice)")
    parser.add_argument("--criterion", default=Criterion.AUTO.value, choices=[c.value for c in Criterion])
    parser.add_argument("--json", type=Path, help="print the table of the job results saved in this file (one a line)")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(job(args.job, args.max_evaluations, args.threads, Criterion(args.criterion))))
        return
    rows = []
    if args.json:
        lines = args.json.read_text().splitlines()
        rows = [row(json.loads(line)) for line in lines if line.startswith("{")]
        print(table(HEADERS, rows))
        return
    keys = args.models.split(",") if args.models else present()
    for key in keys:
        if key not in present():
            print(f"{key}: model or eval set not in {CACHE}; skipped", file=sys.stderr)
            continue
        print(f"running {key} ...", file=sys.stderr, flush=True)
        r = run_job(
            __file__,
            key,
            *("--max-evaluations", str(args.max_evaluations), "--threads", str(args.threads)),
            *("--criterion", args.criterion),
        )
        if r is None:
            continue
        rows.append(row(r))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {platform.machine()} cores={os.cpu_count()} load average {load}")
    print(
        f"zero mode, default options (criterion {args.criterion}), tolerance 1 point, batch {BATCH}, "
        f"max_evaluations {args.max_evaluations}"
    )
    print(table(HEADERS, rows))


if __name__ == "__main__":
    main()
