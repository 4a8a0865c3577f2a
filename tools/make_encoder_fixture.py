"""Write tests/fixtures/encoder_exported.onnx, a trained encoder as PyTorch's exporter leaves it,
and torch_encoder_exported.onnx, PyTorch's own nn.TransformerEncoder as exported (untrained).

    pip install torch==2.13.0 scikit-learn   # only to regenerate the file
    python tools/make_encoder_fixture.py

The other fixtures are cleaned up after export (tools/make_fixtures.py). This one is not: it
is what a user exporting a Hugging Face-style encoder gets below opset 17, and the test that
remove mode copes with it. Two post-norm blocks of 4-head attention whose heads are split and
merged with ``x.view(x.size()[:-1] + (heads, head_dim))`` (Shape -> Gather -> Unsqueeze ->
Concat -> Reshape), LayerNorm decomposed into ReduceMean arithmetic (opset 14), GELU MLPs,
mean pooling. Rows of the digits images are its 8 tokens of 8 features, so it shares
``attention_eval.npz`` with ``attention.onnx``.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import torch
from make_fixtures import OUT_DIR, SEED, TrainConfig, export_onnx, load_split, train
from torch import nn

OPSET = 14
DIM, HEADS, HIDDEN, TOKENS, FEATURES, CLASSES = 32, 4, 64, 8, 8, 10


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value, self.output = (nn.Linear(DIM, DIM) for _ in range(4))

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        # written as Hugging Face writes it: the exporter turns it into Shape arithmetic
        return x.view(x.size()[:-1] + (HEADS, DIM // HEADS)).permute(0, 2, 1, 3)  # noqa: RUF005

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(self.query(x)), self.heads(self.key(x)), self.heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(DIM // HEADS)
        context = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3).contiguous()
        return self.output(context.view(context.size()[:-2] + (DIM,)))  # noqa: RUF005


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = Attention()
        self.norm1 = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)
        self.norm2 = nn.LayerNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.down(nn.functional.gelu(self.up(x))))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, DIM)
        self.position = nn.Parameter(torch.randn(TOKENS, DIM) * 0.02)
        self.norm = nn.LayerNorm(DIM)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(x) + self.position)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(dim=1))


class TorchEncoder(nn.Module):
    """PyTorch's own nn.TransformerEncoder (packed Q/K/V, heads folded into the batch axis)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, DIM)
        layer = nn.TransformerEncoderLayer(DIM, HEADS, HIDDEN, dropout=0.0, batch_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


def export(model: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    """As tools/make_fixtures.py exports, at ``opset``, and kept as the exporter wrote it."""
    exported = export_onnx(model, example, opset=opset)
    onnx.checker.check_model(exported, full_check=True)
    return exported


def write_torch_encoder() -> None:
    """tests/fixtures/torch_encoder_exported.onnx: untrained (random weights, perturbed so the
    exporter does not share the layers' identical initial values), for the channel rules only."""
    torch.manual_seed(SEED + 7)
    model = TorchEncoder().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    exported = export(model, torch.randn(2, TOKENS, FEATURES), 17)
    path = OUT_DIR / "torch_encoder_exported.onnx"
    onnx.save(exported, str(path))
    print(f"{path.name}: {path.stat().st_size} bytes")


def main() -> None:
    split = load_split()
    x_train = split.x_train.reshape(-1, TOKENS, FEATURES)
    x_eval = split.x_eval.reshape(-1, TOKENS, FEATURES)
    torch.manual_seed(SEED + 6)
    model = Encoder()
    train_accuracy = train(model, x_train, split.y_train, TrainConfig(epochs=150, lr=2e-3, weight_decay=1e-4), SEED + 6)
    exported = export(model, torch.from_numpy(x_eval[:2]), OPSET)
    session = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": x_eval})[0]
    with torch.no_grad():
        expected = model(torch.from_numpy(x_eval)).numpy()
    assert np.allclose(logits, expected, atol=1e-3)
    accuracy = float((logits.argmax(1) == split.y_eval).mean())
    path = OUT_DIR / "encoder_exported.onnx"
    onnx.save(exported, str(path))
    ops = sorted({n.op_type for n in exported.graph.node})
    print(f"{path.name}: train {train_accuracy:.4f}, eval {accuracy:.4f}, {path.stat().st_size} bytes, ops {ops}")
    write_torch_encoder()


if __name__ == "__main__":
    main()
