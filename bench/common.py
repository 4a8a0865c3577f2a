"""Shared bits of the benchmarks: fixture discovery, timing, tables."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's pruner, whatever else is installed

import pruner  # noqa: E402
from pruner._evaluate import make_session  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"


SHARED_EVAL = {"encoder_exported": "attention"}
"""Fixtures whose eval set is another fixture's."""


def fixtures() -> list[tuple[str, Path, Path]]:
    """(name, model, eval set) of each committed fixture; ``x_b1.onnx`` uses ``x_eval.npz``."""
    out = []
    for model in sorted(FIXTURES.glob("*.onnx")):
        name = model.stem
        evals = FIXTURES / f"{SHARED_EVAL.get(name, name)}_eval.npz"
        if not evals.exists():
            evals = FIXTURES / f"{name.split('_')[0]}_eval.npz"
        if evals.exists():
            out.append((name, model, evals))
    return out


def repeated(evals: Path, times: int) -> pruner.EvalSet:
    """A fixture's labelled eval set repeated ``times`` over: evaluations cost as on a larger set
    (timing only: the copies make the held-out split overlap the search split)."""
    small = pruner.load_eval_set(evals)
    assert small.labels is not None
    inputs = {k: np.concatenate([v] * times) for k, v in small.inputs.items()}
    return pruner.EvalSet(inputs, np.concatenate([small.labels] * times))


def plain_pass_seconds(model: Path, evalset: pruner.EvalSet, batch_size: int = 64, repeats: int = 5) -> float:
    """Median time of one onnxruntime pass of the whole eval set through the unpruned model."""
    session = make_session(model.read_bytes())
    fixed = session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) else batch_size
    n = len(evalset)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for i in range(0, n, step):
            feeds = {k: v[i : i + step] for k, v in evalset.inputs.items()}
            if isinstance(fixed, int) and len(next(iter(feeds.values()))) < fixed:
                continue
            session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def run_job(script: str, key: str, *args: str) -> dict[str, object] | None:
    """``python SCRIPT --job KEY ARGS...`` in a process of its own (its peak RSS is then this job's
    alone): the dict its last stdout line holds, or None (the failure said on stderr)."""
    command = [sys.executable, script, "--job", key, *args]
    env = {**os.environ, "PYTHONPATH": str(Path(script).resolve().parents[1])}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        print(f"{key}: failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    result = dict(json.loads(done.stdout.strip().splitlines()[-1]))
    print(json.dumps(result), file=sys.stderr)
    return result


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([line, sep, *body])


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, np.floating):
        return _fmt(float(value))
    return str(value)
