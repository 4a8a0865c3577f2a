"""How far the compact fixture's architecture goes *with* retraining: an upper bound on what
post-training pruning (onnx-pruner never retrains) could reach on it.

Retrains the fixture recipe (the same weights as ``tests/fixtures/compact.onnx``), then

1. zeroes 70/80/90% of the Conv/Gemm weights (LAMP scores, one global ranking, the budget
   refilled until every kept weight lies on an input-to-logits path: plain magnitude masks cut
   every path of this chain from 70% on, and no training brings that back) and fine-tunes
   with the mask fixed;
2. removes pointwise channels down to each smaller configuration of multiples of 8 (by the L1
   norm of the folded rows) and fine-tunes.

Prints onnxruntime accuracy of the exported models on the 720-image eval set, right after the
cut (what post-training methods start from) and after fine-tuning. Fixture tooling: needs
``pip install torch==2.13.0 scikit-learn``. About five minutes on two cores::

    python tools/compact_retraining_bound.py
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import torch
from make_fixtures import (
    SEED,
    Compact,
    TrainConfig,
    accuracy,
    build_model,
    export_onnx,
    finalize,
    load_split,
    ort_logits,
    train,
)
from torch import nn

ZEROED = (0.7, 0.8, 0.9)
ZERO_TUNING = TrainConfig(epochs=600, lr=2e-2)
"""Fine-tuning with the mask fixed: the best of the budgets tried (300-1200 epochs, lr 3e-3 to 2e-2)."""
SMALLER = ((16, 16), (16, 8), (8, 16), (8, 8))
"""(pointwise 1, pointwise 2) output channels; the first conv and depthwise stay at 8 (coupled)."""
REMOVE_TUNING = TrainConfig(epochs=250, lr=1e-2)


def folded(model: Compact) -> list[torch.Tensor]:
    """The six weights as the exported model holds them (BN scale folded into the convs)."""
    out = []
    for block in list(model.features)[:5]:
        conv, bn = block[0], block[1]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        out.append((conv.weight * scale.view(-1, 1, 1, 1)).detach())
    return [*out, model.head.weight.detach()]


def parameters(model: Compact) -> list[nn.Parameter]:
    return [block[0].weight for block in list(model.features)[:5]] + [model.head.weight]


def lamp(weight: torch.Tensor) -> torch.Tensor:
    """LAMP score (Lee et al. 2021): w^2 over the sum of w'^2 for every w' of the layer at least as large."""
    squares = weight.flatten() ** 2
    ordered, index = torch.sort(squares, stable=True)
    tails = torch.flip(torch.cumsum(torch.flip(ordered, [0]), 0), [0])
    scores = torch.empty_like(squares)
    scores[index] = ordered / tails.clamp_min(1e-30)
    return scores.view_as(weight)


def on_paths(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """The kept weights on some input-to-logits path of the chain conv, dw, pw, dw, pw, head."""
    m0, m1, m2, m3, m4, m5 = (m.bool() for m in masks)
    pw1, pw2 = m2[:, :, 0, 0], m4[:, :, 0, 0]
    live1 = m0.flatten(1).any(1) & m1.flatten(1).any(1)  # depthwise: channel c reads channel c
    live3 = (pw1 & live1[None]).any(1) & m3.flatten(1).any(1)
    live4 = (pw2 & live3[None]).any(1)
    used4 = live4 & m5.any(0)
    used3 = live3 & (pw2 & used4[:, None]).any(0)
    used1 = live1 & (pw1 & used3[:, None]).any(0)

    def rows(alive: torch.Tensor) -> torch.Tensor:
        return alive.view(-1, 1, 1, 1)

    return [
        m0 & rows(used1),
        m1 & rows(used1),
        m2 & rows(used3) & used1.view(1, -1, 1, 1),
        m3 & rows(used3),
        m4 & rows(used4) & used3.view(1, -1, 1, 1),
        m5 & used4.view(1, -1),
    ]


def zero_masks(model: Compact, level: float) -> list[torch.Tensor]:
    """Keep the top (1 - level) of all weights by LAMP score; weights off every path give their
    place to the next ones until none is."""
    scores = [lamp(w) for w in folded(model)]
    sizes = [s.numel() for s in scores]
    keep = sum(sizes) - round(level * sum(sizes))
    banned = [torch.zeros_like(s, dtype=torch.bool) for s in scores]
    masks: list[torch.Tensor] = []
    for _ in range(200):
        flat = torch.cat([torch.where(b, -1.0, s).flatten() for s, b in zip(scores, banned, strict=True)])
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen[torch.argsort(flat, descending=True, stable=True)[:keep]] = True
        masks = [part.view_as(s) for part, s in zip(torch.split(chosen, sizes), scores, strict=True)]
        useful = on_paths(masks)
        dead = [m & ~u for m, u in zip(masks, useful, strict=True)]
        if not any(d.any() for d in dead):
            return masks
        banned = [b | d for b, d in zip(banned, dead, strict=True)]
    return on_paths(masks)


def hold_at_zero(model: Compact, masks: list[torch.Tensor]) -> None:
    """Zero the masked weights and keep them there in training: their gradients are masked, so
    Adam (no weight decay) never moves them."""
    with torch.no_grad():
        for w, m in zip(parameters(model), masks, strict=True):
            w.mul_(m)
            w.register_hook(lambda grad, m=m: grad * m)


def sliced(source: Compact, pw1: int, pw2: int) -> Compact:
    """The trained model with pointwise output channels kept by the L1 norm of their folded rows."""
    weights = folded(source)
    kept1 = torch.sort(torch.argsort(weights[2].abs().flatten(1).sum(1), descending=True)[:pw1]).values
    kept2 = torch.sort(torch.argsort(weights[4].abs().flatten(1).sum(1), descending=True)[:pw2]).values
    target = Compact((8, pw1, pw2))
    src, dst = source.features, target.features
    with torch.no_grad():
        for i in (0, 1):
            dst[i].load_state_dict(src[i].state_dict())
        for i, rows, cols in ((2, kept1, None), (3, kept1, None), (4, kept2, kept1)):
            weight = src[i][0].weight[rows]
            dst[i][0].weight.copy_(weight if cols is None else weight[:, cols])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(dst[i][1], name).copy_(getattr(src[i][1], name)[rows])
        target.head.weight.copy_(source.head.weight[:, kept2])
        target.head.bias.copy_(source.head.bias)
    target.eval()
    return target


def exported(model: Compact, x: np.ndarray) -> onnx.ModelProto:
    return finalize(export_onnx(model, torch.from_numpy(x[:1])), "compact")


def main() -> None:
    torch.use_deterministic_algorithms(True)
    split = load_split()
    x_train, x_eval = (a.reshape(-1, 1, 8, 8) for a in (split.x_train, split.x_eval))
    y_train, y_eval = split.y_train, split.y_eval

    def scored(model: Compact) -> tuple[float, int, int]:
        proto = exported(model, x_eval)
        nonzero = sum(int(torch.count_nonzero(w)) for w in parameters(model))
        return accuracy(ort_logits(proto, x_eval), y_eval), nonzero, len(proto.SerializeToString())

    trained = build_model(lambda: Compact((8, 16, 24)), SEED + 5)
    assert isinstance(trained, Compact)
    train(trained, x_train, y_train, TrainConfig(epochs=250, lr=1e-2), SEED + 5)
    base, weights, size = scored(trained)
    print(f"compact fixture recipe: eval accuracy {base:.4f}, {weights} weights, {size} bytes")
    print(f"\nZeroed, then fine-tuned {ZERO_TUNING.epochs} epochs (lr {ZERO_TUNING.lr}) with the mask fixed")
    print("zeroed  nonzero  right after the cut  fine-tuned")
    for level in ZEROED:
        model = copy.deepcopy(trained)
        hold_at_zero(model, zero_masks(model, level))
        before = scored(model)[0]
        train(model, x_train, y_train, ZERO_TUNING, seed=1)
        after, nonzero, _ = scored(model)
        print(f"{level:6.0%}  {nonzero:7d}  {before:19.4f}  {after:10.4f}")
    print(f"\nPointwise channels removed, then fine-tuned {REMOVE_TUNING.epochs} epochs (lr {REMOVE_TUNING.lr})")
    print("channels      bytes  smaller  right after the cut  fine-tuned")
    for pw1, pw2 in SMALLER:
        model = sliced(trained, pw1, pw2)
        before, _, cut = scored(model)
        train(model, x_train, y_train, REMOVE_TUNING, seed=1)
        after = scored(model)[0]
        print(f"8,{pw1:2d},{pw2:2d}  {cut:9d}  {size / cut:6.2f}x  {before:19.4f}  {after:10.4f}")


if __name__ == "__main__":
    main()
