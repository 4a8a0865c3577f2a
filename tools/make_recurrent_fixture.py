"""Regenerate ``tests/fixtures/recurrent.onnx`` and ``recurrent_eval.npz``: a PyTorch-exported
recurrent classifier (bidirectional LSTM, then a GRU, then a Linear head).

Each 8x8 digit of scikit-learn's digits data is read as a sequence of 8 rows of 8 pixels
(the split of ``tools/make_fixtures.py``: 1077 training, 720 eval samples). The model is
trained briefly with PyTorch and exported with the TorchScript exporter (opset 17), so the
graph carries what exporters write for RNNs: ``LSTM``/``GRU`` nodes with gate blocks
reordered from PyTorch's (i, f, g, o) into ONNX's (i, o, f, c), ``Transpose``/``Squeeze``
around them and ``Shape``-computed initial states.

Requirements (fixture generation only)::

    pip install torch==2.13.0 scikit-learn

Run from the repository root::

    python tools/make_recurrent_fixture.py
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "tests" / "fixtures"
SEED = 0
EVAL_SIZE = 720
MAX_BYTES = 200 * 1024


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(32, 16, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(x)
        _, last = self.gru(h)
        return self.head(last[0])  # type: ignore[no-any-return]


def main() -> None:
    torch.manual_seed(SEED)
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, 8, 8)
    y = digits.target.astype(np.int64)
    x_train, x_eval, y_train, y_eval = train_test_split(x, y, test_size=EVAL_SIZE, stratify=y, random_state=SEED)
    model = Recurrent()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(60):
        for start in range(0, len(xt), 64):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[start : start + 64]), yt[start : start + 64])
            loss.backward()
            optimizer.step()
    model.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(x_eval[:2]),),
            buffer,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    exported = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(exported, full_check=True)
    session = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": x_eval})[0]
    with torch.no_grad():
        expected = model(torch.from_numpy(x_eval)).numpy()
    assert np.abs(logits - expected).max() < 1e-3
    accuracy = float((logits.argmax(-1) == y_eval).mean())
    onnx.save(exported, OUT_DIR / "recurrent.onnx")
    np.savez_compressed(OUT_DIR / "recurrent_eval.npz", input=x_eval, labels=y_eval)
    size = (OUT_DIR / "recurrent.onnx").stat().st_size + (OUT_DIR / "recurrent_eval.npz").stat().st_size
    assert size < MAX_BYTES, size
    print(f"recurrent.onnx: accuracy {accuracy:.4f}, {size} bytes with its eval set")


if __name__ == "__main__":
    main()
