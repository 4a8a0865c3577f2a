"""Regenerate the ONNX test fixtures in ``tests/fixtures/``.

Trains tiny models on scikit-learn's bundled digits data (8x8 images, 10
classes) with PyTorch, exports them to ONNX (opset 17) and writes the matching
eval sets (``<name>_eval.npz`` with keys ``input`` and ``labels``).

Requirements (fixture generation only; the library itself never imports torch)::

    pip install torch==2.13.0 scikit-learn

plus onnx, onnxruntime and numpy. This script is used only to regenerate the
committed fixtures. Run it from the repository root::

    python tools/make_fixtures.py
"""

from __future__ import annotations

import io
import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "tests" / "fixtures"

SEED = 0
OPSET = 17
EVAL_SIZE = 720
NUM_CLASSES = 10
MAX_TOTAL_BYTES = 3 * 1024 * 1024
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"

# Global-magnitude property of the compact fixture.
PRUNE_SPARSITIES = (0.1, 0.2, 0.3)
COMPACT_MIN_DROP = 0.01
COMPACT_MIN_ACCURACY = 0.90
# Channel configs tried in order (stem, mid, out); first one that has the property wins.
COMPACT_CHANNELS = ((8, 16, 24), (6, 12, 16), (4, 8, 12), (4, 6, 8))


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Split:
    """Digits scaled to [0, 1], flattened to 64 features; labels int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray


def load_split() -> Split:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_eval, y_train, y_eval = train_test_split(x, y, test_size=EVAL_SIZE, stratify=y, random_state=SEED)
    return Split(
        np.ascontiguousarray(x_train),
        np.ascontiguousarray(y_train),
        np.ascontiguousarray(x_eval),
        np.ascontiguousarray(y_eval),
    )


# ------------------------------------------------------------------------- models


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class MLP(nn.Module):
    """64 -> 128 -> 128 -> 10 with ReLU (exports as three Gemm nodes)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 128),
            nn.ReLU(),
            nn.Linear(128, 128),
            nn.ReLU(),
            nn.Linear(128, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResidualBlock(nn.Module):
    """x + ReLU(BN(Conv3x3(x)))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = conv_bn_relu(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class CNN(nn.Module):
    """Small CNN with a residual Add, a depthwise conv and a 2-layer Gemm head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, 16),
            conv_bn_relu(16, 32),
            ResidualBlock(32),
            conv_bn_relu(32, 32, groups=32),
            nn.Conv2d(32, 32, 1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TinyAttention(nn.Module):
    """Rows as 8 tokens of 8 features; one post-norm single-head transformer block."""

    def __init__(self, tokens: int = 8, features: int = 8, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.pos = nn.Parameter(torch.randn(tokens, dim) * 0.02)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos
        q, k, v = self.q(h), self.k(h), self.v(h)
        attn = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * self.scale, dim=-1)
        h = self.norm1(h + self.proj(torch.matmul(attn, v)))
        h = self.norm2(h + self.fc2(self.act(self.fc1(h))))
        return self.head(h.mean(dim=1))


class Compact(nn.Module):
    """Compact depthwise-separable CNN ending in global average pooling."""

    def __init__(self, channels: tuple[int, int, int]) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            conv_bn_relu(1, c1),
            conv_bn_relu(c1, c1, groups=c1),
            conv_bn_relu(c1, c2, kernel=1),
            conv_bn_relu(c2, c2, stride=2, groups=c2),
            conv_bn_relu(c2, c3, kernel=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(c3, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ----------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    lr: float
    weight_decay: float = 0.0
    batch_size: int = 64


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, config: TrainConfig, seed: int) -> float:
    """Adam + cosine LR decay; returns final train accuracy (eval mode)."""
    generator = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(config.epochs):
        model.train()
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), config.batch_size):
            idx = order[start : start + config.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            optimizer.step()
        scheduler.step()
    model.eval()
    with torch.no_grad():
        return float((model(xt).argmax(1) == yt).float().mean())


def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


# ------------------------------------------------------------------------- export


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    *,
    dynamic_batch: bool = True,
    keep_batchnorm: bool = False,
    opset: int = OPSET,
) -> onnx.ModelProto:
    """TorchScript export (opset 17 unless given); BN folded unless ``keep_batchnorm``."""
    model.eval()
    buffer = io.BytesIO()
    dynamic_axes = {INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}} if dynamic_batch else None
    training = torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            export_params=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
            training=training,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


def _fold_weight_producers(model: onnx.ModelProto) -> None:
    """Turn Constant nodes and Identity-of-initializer nodes into plain initializers."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    graph_outputs = {out.name for out in graph.output}
    changed = True
    while changed:
        changed = False
        for node in list(graph.node):
            if node.output[0] in graph_outputs:
                continue
            tensor: onnx.TensorProto | None = None
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                tensor = onnx.TensorProto()
                tensor.CopyFrom(node.attribute[0].t)
            elif node.op_type == "Identity" and node.input[0] in initializers:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(initializers[node.input[0]])
            if tensor is None:
                continue
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            initializers[tensor.name] = graph.initializer[-1]
            graph.node.remove(node)
            changed = True


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    graph = model.graph
    used = {name for node in graph.node for name in node.input}
    used |= {out.name for out in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    graph_inputs = [inp for inp in graph.input if inp.name in used]
    del graph.input[:]
    graph.input.extend(graph_inputs)


def finalize(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """Clean weight producers, drop exporter value_info, name the graph, check strictly."""
    _fold_weight_producers(model)
    _drop_unused_initializers(model)
    del model.graph.value_info[:]
    model.graph.name = name
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    known = {vi.name for vi in inferred.graph.value_info} | {i.name for i in model.graph.initializer}
    known |= {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    missing = [out for node in model.graph.node for out in node.output if out and out not in known]
    if missing:
        raise RuntimeError(f"{name}: shape inference left tensors untyped: {missing}")
    return model


# ---------------------------------------------------------------------- analysis


def ort_logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Run the whole eval set; one sample at a time if the batch dim is fixed."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    batch_dim = session.get_inputs()[0].shape[0]
    if isinstance(batch_dim, int):
        chunks = [
            session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + batch_dim]})[0] for i in range(0, len(x), batch_dim)
        ]
        return np.concatenate(chunks)
    return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def pruneable_weights(model: onnx.ModelProto) -> list[str]:
    """Initializers feeding input 1 of Conv/Gemm with >= 2 dims (unique, graph order)."""
    initializers = {init.name: init for init in model.graph.initializer}
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 1:
            weight = initializers.get(node.input[1])
            if weight is not None and len(weight.dims) >= 2 and weight.name not in names:
                names.append(weight.name)
    return names


def global_magnitude_prune(model: onnx.ModelProto, sparsity: float) -> onnx.ModelProto:
    """Copy of ``model`` with the smallest-|w| fraction of all Conv/Gemm weights zeroed."""
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    names = set(pruneable_weights(pruned))
    targets = [init for init in pruned.graph.initializer if init.name in names]
    arrays = [numpy_helper.to_array(init) for init in targets]
    flat = np.concatenate([np.abs(a).ravel() for a in arrays])
    count = round(sparsity * flat.size)
    mask = np.ones(flat.size, dtype=bool)
    mask[np.argsort(flat, kind="stable")[:count]] = False
    offset = 0
    for init, array in zip(targets, arrays, strict=True):
        keep = mask[offset : offset + array.size].reshape(array.shape)
        offset += array.size
        init.CopyFrom(numpy_helper.from_array(np.where(keep, array, 0).astype(array.dtype), init.name))
    return pruned


def magnitude_table(
    model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, sparsities: Sequence[float]
) -> list[tuple[float, float]]:
    return [(s, accuracy(ort_logits(global_magnitude_prune(model, s), x), y)) for s in sparsities]


def has_drop(table: Sequence[tuple[float, float]], baseline: float) -> bool:
    """True if accuracy falls by more than COMPACT_MIN_DROP at some sparsity below 30%."""
    return any(baseline - acc > COMPACT_MIN_DROP for s, acc in table if s < 0.3 - 1e-9)


def param_count(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(init.dims, dtype=np.int64) for init in model.graph.initializer))


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def io_shape(value: onnx.ValueInfoProto) -> list[int | str]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in dims]


def check_batchnorm_graph(model: onnx.ModelProto) -> int:
    """Number of BatchNormalization nodes; each must have one output and initializer params."""
    initializers = {init.name for init in model.graph.initializer}
    bn_nodes = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    for node in bn_nodes:
        if len(node.output) != 1 or not all(name in initializers for name in node.input[1:]):
            raise RuntimeError(f"unexpected BatchNormalization node {node.name}")
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") and node.input[1] not in initializers:
            raise RuntimeError(f"{node.op_type} {node.name} weight is not an initializer")
    return len(bn_nodes)


# ------------------------------------------------------------------------ fixtures


@dataclass
class Fixture:
    name: str
    model: onnx.ModelProto
    eval_name: str
    x_eval: np.ndarray
    y_eval: np.ndarray
    torch_params: int
    train_accuracy: float
    reference_logits: np.ndarray
    description: str
    min_accuracy: float = 0.90
    accuracy: float = 0.0
    size: int = 0
    extra: dict[str, str] = field(default_factory=dict)


def seeded(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def build_model(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    seeded(seed)
    return factory()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_fixtures(split: Split) -> tuple[list[Fixture], list[tuple[float, float]], tuple[int, int, int]]:
    fixtures: list[Fixture] = []
    x_img_train = split.x_train.reshape(-1, 1, 8, 8)
    x_img_eval = split.x_eval.reshape(-1, 1, 8, 8)
    x_tok_train = split.x_train.reshape(-1, 8, 8)
    x_tok_eval = split.x_eval.reshape(-1, 8, 8)

    # 1 + 6: MLP, dynamic batch and fixed batch 1.
    mlp = build_model(MLP, SEED + 1)
    mlp_train = train(mlp, split.x_train, split.y_train, TrainConfig(epochs=100, lr=1e-3), SEED + 1)
    mlp_ref = torch_logits(mlp, split.x_eval)
    example = torch.from_numpy(split.x_eval[:1])
    fixtures.append(
        Fixture(
            "mlp",
            finalize(export_onnx(mlp, example), "mlp"),
            "mlp",
            split.x_eval,
            split.y_eval,
            n_params(mlp),
            mlp_train,
            mlp_ref,
            "Linear(64,128)-ReLU-Linear(128,128)-ReLU-Linear(128,10); 3 Gemm nodes.",
            min_accuracy=0.95,
        )
    )
    fixtures.append(
        Fixture(
            "mlp_b1",
            finalize(export_onnx(mlp, example, dynamic_batch=False), "mlp_b1"),
            "mlp",
            split.x_eval,
            split.y_eval,
            n_params(mlp),
            mlp_train,
            mlp_ref,
            "Same trained weights as mlp.onnx, exported with a fixed batch of 1.",
            min_accuracy=0.95,
        )
    )

    # 2 + 3: CNN, BN folded and BN kept.
    cnn = build_model(CNN, SEED + 2)
    cnn_train = train(cnn, x_img_train, split.y_train, TrainConfig(epochs=60, lr=2e-3, weight_decay=1e-4), SEED + 2)
    cnn_ref = torch_logits(cnn, x_img_eval)
    example = torch.from_numpy(x_img_eval[:1])
    fixtures.append(
        Fixture(
            "cnn",
            finalize(export_onnx(cnn, example), "cnn"),
            "cnn",
            x_img_eval,
            split.y_eval,
            n_params(cnn),
            cnn_train,
            cnn_ref,
            "Conv+BN+ReLU x2, residual conv block (Add), depthwise conv, 1x1 conv+ReLU, "
            "MaxPool 2, Flatten, Gemm-ReLU-Gemm. BatchNorm folded into the convs.",
            min_accuracy=0.95,
        )
    )
    cnn_bn = finalize(export_onnx(cnn, example, keep_batchnorm=True), "cnn_bn")
    fixtures.append(
        Fixture(
            "cnn_bn",
            cnn_bn,
            "cnn_bn",
            x_img_eval,
            split.y_eval,
            n_params(cnn),
            cnn_train,
            cnn_ref,
            "Same trained network as cnn.onnx with BatchNormalization nodes kept (eval mode, "
            "1 output each); convs before BN have no bias.",
            min_accuracy=0.95,
            extra={"batchnorm_nodes": str(check_batchnorm_graph(cnn_bn))},
        )
    )

    # 4: attention.
    att = build_model(TinyAttention, SEED + 4)
    att_train = train(att, x_tok_train, split.y_train, TrainConfig(epochs=200, lr=2e-3, weight_decay=1e-4), SEED + 4)
    example = torch.from_numpy(x_tok_eval[:1])
    fixtures.append(
        Fixture(
            "attention",
            finalize(export_onnx(att, example), "attention"),
            "attention",
            x_tok_eval,
            split.y_eval,
            n_params(att),
            att_train,
            torch_logits(att, x_tok_eval),
            "Rows as 8 tokens x 8 features: Linear embed 8->32 (MatMul+Add) + learned positional "
            "Add, single-head self-attention (Q/K/V/out MatMul+Add, scaled by 1/sqrt(32), Softmax), "
            "residual Add + LayerNormalization, MLP 32->64->32 with GELU (Erf form) + residual + "
            "LayerNormalization, ReduceMean over tokens, Gemm 32->10.",
            min_accuracy=0.93,
        )
    )

    # 5: compact; shrink until global magnitude pruning hurts below 30% sparsity.
    example = torch.from_numpy(x_img_eval[:1])
    for channels in COMPACT_CHANNELS:
        compact = build_model(lambda c=channels: Compact(c), SEED + 5)
        compact_train = train(compact, x_img_train, split.y_train, TrainConfig(epochs=250, lr=1e-2), SEED + 5)
        compact_onnx = finalize(export_onnx(compact, example), "compact")
        baseline = accuracy(ort_logits(compact_onnx, x_img_eval), split.y_eval)
        table = magnitude_table(compact_onnx, x_img_eval, split.y_eval, PRUNE_SPARSITIES)
        if has_drop(table, baseline) and baseline >= COMPACT_MIN_ACCURACY:
            break
    else:
        raise RuntimeError("no compact configuration has the global-magnitude property")
    c1, c2, c3 = channels
    fixtures.append(
        Fixture(
            "compact",
            compact_onnx,
            "compact",
            x_img_eval,
            split.y_eval,
            n_params(compact),
            compact_train,
            torch_logits(compact, x_img_eval),
            f"Depthwise-separable CNN: Conv 1->{c1} 3x3, depthwise 3x3 ({c1}), pointwise "
            f"{c1}->{c2}, depthwise 3x3 stride 2 ({c2}), pointwise {c2}->{c3} (all BN folded, "
            f"ReLU), GlobalAveragePool, Flatten, Gemm {c3}->10. Trained 250 epochs (Adam, cosine "
            "LR) to ~100% train accuracy; plain global magnitude pruning hurts it early.",
        )
    )
    return fixtures, [(0.0, baseline), *table], channels


# ------------------------------------------------------------------------ output


def write_fixtures(fixtures: Sequence[Fixture]) -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    written_evals: set[str] = set()
    for fx in fixtures:
        path = OUT_DIR / f"{fx.name}.onnx"
        onnx.save_model(fx.model, path, save_as_external_data=False)
        reloaded = onnx.load(path)
        onnx.checker.check_model(reloaded, full_check=True)
        logits = ort_logits(reloaded, fx.x_eval)
        max_diff = float(np.abs(logits - fx.reference_logits).max())
        if max_diff > 1e-3:
            raise RuntimeError(f"{fx.name}: ORT differs from torch by {max_diff:g}")
        fx.accuracy = accuracy(logits, fx.y_eval)
        if fx.accuracy < fx.min_accuracy:
            raise RuntimeError(f"{fx.name}: accuracy {fx.accuracy:.4f} < {fx.min_accuracy}")
        fx.size = path.stat().st_size
        fx.extra["max_abs_diff_vs_torch"] = f"{max_diff:.2e}"
        if fx.eval_name not in written_evals:
            np.savez_compressed(
                OUT_DIR / f"{fx.eval_name}_eval.npz",
                input=fx.x_eval.astype(np.float32),
                labels=fx.y_eval.astype(np.int64),
            )
            written_evals.add(fx.eval_name)
        with np.load(OUT_DIR / f"{fx.eval_name}_eval.npz", allow_pickle=False) as data:
            if (
                sorted(data.files) != ["input", "labels"]
                or data["input"].dtype != np.float32
                or data["labels"].dtype != np.int64
                or data["labels"].shape != (EVAL_SIZE,)
                or data["input"].shape[1:] != tuple(io_shape(fx.model.graph.input[0]))[1:]
            ):
                raise RuntimeError(f"{fx.eval_name}_eval.npz does not match {fx.name}.onnx")


README_HEADER = """\
# Test fixtures

Generated by `python tools/make_fixtures.py` (needs `pip install torch==2.13.0 scikit-learn`;
torch is used only to regenerate these files). Do not edit by hand: rerun the script.

## Data

`sklearn.datasets.load_digits` (1797 images of 8x8, 10 classes), pixels divided by 16 to
[0, 1] float32, stratified split with `random_state={seed}`: 1077 training samples, {n_eval}
eval samples. Every `<name>_eval.npz` (`np.savez_compressed`, no object arrays) holds `input`
(float32, `[{n_eval}, ...]` matching the model input) and `labels` (int64, `[{n_eval}]`). All
eval files hold the same samples, reshaped per model; `mlp_b1.onnx` uses `mlp_eval.npz`.

## Export

TorchScript exporter (`torch.onnx.export(..., dynamo=False)`), opset {opset}, IR version {ir},
input `{input}`, output `{output}`, symbolic dim `{batch}` on both (except `mlp_b1`, fixed
batch 1). Weights are stored inside each `.onnx` (no external data) and the graphs carry no
`value_info`. Each model passes `onnx.checker.check_model(full_check=True)` and strict shape
inference, and its onnxruntime logits match torch to within 1e-3 (about 1e-5 in practice).

Graph quirks worth knowing:

- The exporter deduplicates bit-identical parameters through `Identity` nodes, and emits
  scalar `Constant` nodes (attention scale, GELU constants). The script rewrites both into
  plain initializers, so there are no `Identity` or `Constant` nodes: every Conv/Gemm/MatMul
  weight, bias, BN and LayerNorm parameter is an initializer feeding its op directly.
- Gemm nodes use `transB=1` (weight `[out, in]`). Conv weights are `[out, in/group, kh, kw]`.
- Folded convs (`cnn`, `compact`) get exporter names such as `onnx::Conv_52` for weight and
  bias; unfolded parameters keep torch names (`head.1.weight`, `features.4.bias`).
- In `attention.onnx`, Linear layers on 3-D tensors become `MatMul` with a pre-transposed
  `[in, out]` initializer (named `onnx::MatMul_NN`) followed by `Add(bias, matmul_out)`: the
  bias is the *first* Add input. GELU is the exact Erf form (Div, Erf, Add, Mul, Mul).
- In `cnn_bn.onnx`, convs feeding BatchNormalization have no bias input; each BN node has one
  output and `training_mode=0`.

## Files

| file | input | output | eval file | ORT accuracy | params | size (bytes) |
| --- | --- | --- | --- | --- | --- | --- |
"""

README_PRUNING = """
## Global magnitude pruning of `compact.onnx`

One |w| threshold over all Conv/Gemm weight initializers with >= 2 dims (biases untouched),
the smallest weights zeroed, evaluated with onnxruntime on `compact_eval.npz`. The fixture
is meant to be hard: accuracy drops by more than one point below 30% sparsity.

| sparsity | accuracy |
| --- | --- |
"""


README_EXPORTED = """
## `encoder_exported.onnx`

Written by `python tools/make_encoder_fixture.py`, and left exactly as the exporter wrote it
(opset 14): a trained 2-block, 4-head encoder of the digits rows (8 tokens of 8 features,
eval set `attention_eval.npz`) whose head split and merge targets are computed from Shape
nodes and whose LayerNorms are decomposed into ReduceMean arithmetic, as a Hugging
Face-style encoder exports. `torch_encoder_exported.onnx`, from the same script, is PyTorch's
own `nn.TransformerEncoder` exported at opset 17 (packed Q/K/V, heads folded into the batch
axis), untrained and without an eval set: it serves the channel-rule tests only. This script
does not regenerate either.
"""


def render_readme(fixtures: Sequence[Fixture], table: Sequence[tuple[float, float]], total: int) -> str:
    lines = [
        README_HEADER.format(
            seed=SEED,
            n_eval=EVAL_SIZE,
            opset=OPSET,
            ir=fixtures[0].model.ir_version,
            input=INPUT_NAME,
            output=OUTPUT_NAME,
            batch=BATCH_DIM,
        ).rstrip("\n")
    ]
    for fx in fixtures:
        inp = io_shape(fx.model.graph.input[0])
        out = io_shape(fx.model.graph.output[0])
        lines.append(
            f"| `{fx.name}.onnx` | {inp} | {out} | `{fx.eval_name}_eval.npz` | "
            f"{fx.accuracy:.4f} | {param_count(fx.model)} | {fx.size} |"
        )
    lines += ["", "Params = elements of all initializers in the ONNX file.", ""]
    for fx in fixtures:
        ops = ", ".join(f"{op} x{n}" for op, n in op_histogram(fx.model).items())
        lines += [f"### `{fx.name}.onnx`", "", fx.description, "", f"Ops: {ops}.", ""]
    lines.append(README_PRUNING.rstrip("\n"))
    lines += [f"| {s:.0%} | {acc:.4f} |" for s, acc in table]
    lines += ["", README_EXPORTED.rstrip("\n")]
    lines += ["", f"Total size of `tests/fixtures/` without this README: {total} bytes.", ""]
    return "\n".join(lines)


def main() -> None:
    seeded(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    split = load_split()
    fixtures, table, channels = make_fixtures(split)
    write_fixtures(fixtures)

    files = sorted(p for p in OUT_DIR.iterdir() if p.is_file() and p.name != "README.md")
    total = sum(p.stat().st_size for p in files)
    (OUT_DIR / "README.md").write_text(render_readme(fixtures, table, total))
    total = sum(p.stat().st_size for p in OUT_DIR.iterdir() if p.is_file())

    print(f"{'fixture':<12}{'input':<18}{'train acc':>10}{'ORT acc':>10}{'params':>9}{'bytes':>9}")
    for fx in fixtures:
        shape = str(io_shape(fx.model.graph.input[0]))
        print(
            f"{fx.name:<12}{shape:<18}{fx.train_accuracy:>10.4f}{fx.accuracy:>10.4f}"
            f"{param_count(fx.model):>9}{fx.size:>9}  {fx.extra}"
        )
    print(f"\ncompact channels {channels}; global magnitude pruning (ORT eval accuracy):")
    for sparsity, acc in table:
        print(f"  {sparsity:>4.0%}  {acc:.4f}  (drop {table[0][1] - acc:+.4f})")
    print("\nfiles:")
    for p in sorted(OUT_DIR.iterdir()):
        print(f"  {p.name:<22}{p.stat().st_size:>9}")
    print(f"total {total} bytes (limit {MAX_TOTAL_BYTES})")
    if total >= MAX_TOTAL_BYTES:
        raise SystemExit("fixtures exceed the size limit")


if __name__ == "__main__":
    main()
