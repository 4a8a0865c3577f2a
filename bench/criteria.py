"""Scoring criteria compared on zoo models: magnitude, activation, gradient and fisher.

    python bench/criteria.py                      # ppocr_cls and magika, zero mode, 1 point
    python bench/criteria.py --table              # print the cached results, run nothing
    python bench/criteria.py --models ppocr_cls --recover none

Needs the gradient extra (``pip install -e '.[gradient]'``) and the zoo's models and sets
(``bench/zoo.py``, cached in ``$ONNX_PRUNER_ZOO_CACHE``). Every run is the real search in zero
mode at an absolute tolerance (default 0.01, one point), on the zoo's eval set of 500 samples;
the test drop is measured on the zoo's independent test set of 1000 samples. Results are cached
as JSON in ``$ONNX_PRUNER_ZOO_CACHE/results/criteria_*.json``.

Columns: nonzero share of the weights (``bench/zoo.py``'s count), held-out drop the tool saw,
drop on the test set, wall time of the run, the seconds spent in calibration (recovery's, and
the activation criterion's) and in the gradient passes, and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import table
from zoo import dataset, evalset, nonzero, outputs, scores
from zoo_data import version
from zoo_models import CACHE, MODELS, model_path

import pruner
from pruner import Criterion, Mode, PruneOptions, Recovery, Tolerance
from pruner._metrics import Metric

MODELS_RUN = ("ppocr_cls", "magika")
CRITERIA = (Criterion.MAGNITUDE, Criterion.ACTIVATION, Criterion.GRADIENT, Criterion.FISHER)
EVAL, TEST = 500, 1000
BATCH = 64


def result_path(key: str, criterion: Criterion, recover: Recovery, tolerance: float) -> Path:
    """Where a run's result is cached; ``_d<N>`` for sets past version 1, as in bench/zoo.py."""
    data = version(MODELS[key].data)
    tag = f"_d{data}" if data > 1 else ""
    return CACHE / "results" / f"criteria_{key}_{criterion.value}_{recover.value}_{tolerance:g}{tag}.json"


def run(key: str, criterion: Criterion, recover: Recovery, tolerance: float) -> dict[str, Any]:
    spec = MODELS[key]
    original = model_path(key).read_bytes()
    inputs, labels = dataset(key, EVAL, 0)
    test_inputs, test_labels = dataset(key, TEST, 1)
    reference = outputs(original, inputs, spec.output)
    test_reference = outputs(original, test_inputs, spec.output)
    base_test = scores(key, original, test_inputs, test_labels, test_reference)
    metric = Metric(spec.metric)
    options = PruneOptions(
        mode=Mode.ZERO,
        metric=spec.metric,
        criterion=criterion,
        recover=recover,
        tolerance=Tolerance(tolerance),
        batch_size=BATCH,
        output=spec.output,
    )
    out: dict[str, Any] = {"model": key, "criterion": criterion.value, "recover": recover.value, "tolerance": tolerance}
    start = time.perf_counter()
    try:
        result = pruner.prune(original, evalset(key, inputs, labels, reference), options)
    except pruner.PrunerError as e:
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return out
    out["wall"] = time.perf_counter() - start
    report = result.report
    assert result.model_bytes is not None
    base, final = report.baseline.holdout, report.final.holdout
    out["holdout_drop"] = None if base is None or final is None else metric.loss(base, final)
    weights = nonzero(onnx.load_from_string(original))
    out["nonzero_share"] = nonzero(onnx.load_from_string(result.model_bytes)) / max(weights, 1)
    out["test_drop"] = metric.loss(base_test, scores(key, result.model_bytes, test_inputs, test_labels, test_reference))
    timings = report.timings if isinstance(report.timings, dict) else {}
    out["scoring_seconds"] = sum(float(v) for k, v in timings.items() if k in ("calibration", "gradients"))
    out["notes"] = [n for n in report.notes if "criterion" in n or "gradient" in n]
    out["load"] = os.getloadavg()[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS_RUN))
    parser.add_argument("--recover", default="auto", help="comma-separated recoveries (auto, none, ...)")
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--table", action="store_true", help="print the cached results; run nothing")
    args = parser.parse_args()
    rows = []
    for key in args.models.split(","):
        for recover in (Recovery(r) for r in args.recover.split(",")):
            for criterion in CRITERIA:
                path = result_path(key, criterion, recover, args.tolerance)
                if path.exists():
                    r = json.loads(path.read_text())
                elif args.table:
                    continue
                else:
                    r = run(key, criterion, recover, args.tolerance)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(r))
                rows.append(_row(r))
    headers = ["model", "recover", "criterion", "nonzero", "held-out drop", "test drop", "wall s", "calib+grad s"]
    headers.append("load")
    print(f"zero mode, tolerance {args.tolerance:g}; load now: {_load()} (load: 1-minute average as each run ended)")
    print(table(headers, rows))
    for key in args.models.split(","):
        for criterion in (Criterion.GRADIENT, Criterion.FISHER):
            for recover in (Recovery(r) for r in args.recover.split(",")):
                path = result_path(key, criterion, recover, args.tolerance)
                if path.exists():
                    for note in json.loads(path.read_text()).get("notes", []):
                        print(f"{key} ({recover.value}): {note}")


def _row(r: dict[str, Any]) -> tuple[object, ...]:
    if "error" in r:
        return (r["model"], r["recover"], r["criterion"], r["error"][:60], "", "", "", "", "")

    def points(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:+.1f} pt"

    return (
        r["model"],
        r["recover"],
        r["criterion"],
        f"{r['nonzero_share']:.3f}",
        points(r["holdout_drop"]),
        points(r["test_drop"]),
        f"{r['wall']:.0f}",
        f"{r['scoring_seconds']:.1f}",
        f"{r['load']:.1f}" if "load" in r else "-",
    )


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
