"""Shared builders for tests: tiny models in ONNX text syntax with seeded weights, and eval sets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = [
    "TINY_MLP_TEXT",
    "parse",
    "seeded",
    "tiny_mlp",
    "tiny_mlp_evalset",
    "write_npz",
]

TINY_MLP_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
tiny_mlp (float[N, 8] x) => (float[N, 4] y) {
    h = Gemm <transB = 1> (x, w1, b1)
    r = Relu (h)
    y = MatMul (r, w2)
}
"""


def seeded(shape: tuple[int, ...], seed: int = 0, dtype: type | np.dtype = np.float32) -> np.ndarray:
    """Standard-normal values of ``shape`` from a fixed seed, cast to ``dtype``."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def parse(text: str, weights: dict[str, np.ndarray] | None = None, *, check: bool = True) -> onnx.ModelProto:
    """Parse a model in ONNX text syntax and attach ``weights`` as initializers.

    With ``check`` the result must pass ``onnx.checker`` (full check), so a typo in a
    test graph fails loudly instead of testing the wrong thing.
    """
    model = onnx.parser.parse_model(text)
    for name, array in (weights or {}).items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def tiny_mlp(seed: int = 0) -> onnx.ModelProto:
    """A valid model: input ``x`` float [N, 8] -> Gemm(transB) -> Relu -> MatMul -> output ``y`` float [N, 4]."""
    return parse(
        TINY_MLP_TEXT,
        {
            "w1": seeded((16, 8), seed),
            "b1": np.zeros(16, np.float32),
            "w2": seeded((16, 4), seed + 1),
        },
    )


def tiny_mlp_evalset(n: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays for :func:`tiny_mlp`: ``x`` float32 [n, 8] and integer ``labels`` in [0, 4)."""
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((n, 8)).astype(np.float32),
        "labels": rng.integers(0, 4, size=n).astype(np.int64),
    }


def write_npz(path: str | os.PathLike[str], arrays: dict[str, np.ndarray]) -> Path:
    """Save ``arrays`` with ``np.savez`` at ``path`` (exactly that name) and return the path."""
    target = Path(path)
    with open(target, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    return target


REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str | os.PathLike[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``onnx-prune ARGS`` in a subprocess from the repository root, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def status_mib(pid: int, field: str) -> float:
    """A memory field of ``/proc/PID/status`` in MiB: ``VmRSS`` (now) or ``VmHWM`` (the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")
