"""Accuracy recovery without retraining, from calibration activations.

Calibration runs the unpruned model on a few hundred samples of the search
split (never the held-out one) with the input of every prunable layer exposed
as an extra output, and accumulates per layer, batch by batch: the mean input
row and the input Gram matrix X^T X / n (its diagonal alone when the full matrix
is not needed). Conv inputs are unfolded (im2col) so a row is one receptive
field, matching the weight flattened to [out, in * kh * kw].

From those statistics:

* the ``activation`` criterion (Wanda): |W_ij| * ||X_j||_2;
* bias correction: after pruning, the layer's bias moves by (W - W') E[x] so its
  mean output on calibration data is the original one;
* least-squares reconstruction (``lsq``): the kept weights of each output row are
  updated to minimise ||X w - X w'||^2 under the mask (damped Hessian X^T X, computed
  once per layer), solved by projected conjugate gradients for all rows at once, or exactly:
  with one factorisation per mask when many rows share it (remove mode's consumers), or per
  row on its own kept inputs when few are kept (high sparsity, small layers).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ._analysis import PrunableWeight
from ._errors import UnsupportedModelError, check_stop
from ._evalset import EvalSet
from ._evaluate import Batches, SplitModel, make_session, run_session
from ._graph import Attributes, GraphIndex, keep_needed, reads
from ._ops import Unfold, layout_of

__all__ = ["Calibration", "LayerLayout", "SequentialRefit", "calibrate", "layouts"]

DAMPING = 0.01
"""Share of the mean Hessian diagonal added to it before inversion."""


@dataclass(frozen=True)
class LayerLayout:
    """How a prunable weight meets its input: which tensor feeds it and how to flatten both."""

    name: str
    op_type: str
    input: str
    """The activation multiplied by the weight."""
    transpose: bool
    """Gemm/MatMul: the weight is [in, out] and is transposed to rows = outputs."""
    conv: dict[str, list[int]] | None = None
    """Conv: kernel, strides, pads, dilations (2-D; a 1-D conv's as a 2-D one on maps one high)."""
    bias: str | None = None
    """The constant added to the layer's output per output channel, if any: its bias, or the
    mean of the BatchNormalization right after a layer without one (subtracted, not added)."""
    bias_is_mean: bool = False
    groups: int = 1
    """Conv groups: output rows of group j read only input columns of group j (depthwise: one
    channel each), so statistics and fits are per group."""
    unfold: Unfold = Unfold.LAST_AXIS
    """How the input becomes rows (the op declaration's, ``_ops``); IM2COL with ``conv`` set."""

    def grouped(self, rows: np.ndarray) -> np.ndarray:
        """[out, in] rows (or [in] columns) as [groups, out / groups, in] ([groups, in / groups])."""
        if rows.ndim == 1:
            return rows.reshape(self.groups, -1)
        return rows.reshape(self.groups, rows.shape[0] // self.groups, rows.shape[1])

    def rows(self, weight: np.ndarray) -> np.ndarray:
        """The weight as [out, in] (a view when possible)."""
        if self.conv is not None:
            return weight.reshape(weight.shape[0], -1)
        return weight.T if self.transpose else weight

    def unrows(self, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return (rows.T if self.transpose and self.conv is None else rows).reshape(shape)

    def shifted(self, bias: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """``bias`` moved so that the layer's output moves by ``shift``, in its own dtype."""
        step = shift.reshape(bias.shape).astype(np.float64)
        return (bias.astype(np.float64) + (-step if self.bias_is_mean else step)).astype(bias.dtype)


@dataclass
class LayerStats:
    count: int = 0
    total: np.ndarray | None = None
    squares: np.ndarray | None = None
    gram: np.ndarray | None = None

    def add(self, x: np.ndarray, full: bool, groups: int = 1) -> None:
        """Accumulate one batch of input rows: products in float32 (no float64 copy of the
        unfolded rows, twice as fast), sums over batches in float64."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.count += len(x)
        total = (np.ones(len(x), dtype=np.float32) @ x).astype(np.float64)  # a BLAS pass, not a reduction
        if full:
            gram = _grams(x, groups).astype(np.float64)
            self.gram = gram if self.gram is None else self.gram + gram
            squares = np.diagonal(gram, axis1=1, axis2=2).reshape(-1)  # columns in group order, as x's
        else:
            squares = (x * x).sum(axis=0, dtype=np.float64)
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares

    def merge(self, other: LayerStats) -> None:
        """Add the statistics of other rows (a shard's: Gram matrices and sums add)."""
        self.count += other.count
        for name in ("total", "squares", "gram"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if theirs is not None:
                setattr(self, name, theirs if mine is None else mine + theirs)

    @property
    def mean(self) -> np.ndarray:
        assert self.total is not None
        return self.total / max(self.count, 1)

    @property
    def norms(self) -> np.ndarray:
        """||X_j||_2 per input column (over the calibration rows, scaled to a mean)."""
        assert self.squares is not None
        return np.sqrt(self.squares / max(self.count, 1))


@dataclass
class Calibration:
    """Per-layer input statistics, and what the recovery methods derive from them once."""

    layouts: dict[str, LayerLayout]
    stats: dict[str, LayerStats]
    samples: int
    skipped: dict[str, str] = field(default_factory=dict)
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """The evaluation-set rows calibrated on."""
    partial: dict[str, str] = field(default_factory=dict)
    """Layers without Gram matrices (least squares skipped, bias correction kept), and why."""
    one_pass: dict[str, str] = field(default_factory=dict)
    """Layers whose plain fit is one OBS pass and a few conjugate-gradient steps (``_fit_rows`` with a factor)
    rather than solved to tolerance, and why (an exact solver step over the auto limit)."""
    seconds: float = 0.0
    """Time spent fitting (``recover`` and sequential refits), calibration itself excluded."""
    stop: threading.Event | None = field(default=None, repr=False, compare=False)
    """Cancels the fits (and sequential refits) made from these statistics: checked every step."""
    _hessians: dict[str, np.ndarray] = field(default_factory=dict)
    _factors: dict[str, np.ndarray | None] = field(default_factory=dict)
    _timing: int = 0

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Add the block's time to ``seconds`` (nested blocks count once)."""
        self._timing += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self._timing -= 1
            if not self._timing:
                self.seconds += time.perf_counter() - start

    def activation_scores(self, layer: PrunableWeight, weight: np.ndarray) -> np.ndarray | None:
        """Wanda scores |W| * ||x|| for every element of ``weight`` (None without statistics)."""
        layout, stats = self.layouts.get(layer.name), self.stats.get(layer.name)
        if layout is None or stats is None or stats.squares is None:
            return None
        rows = layout.grouped(np.abs(layout.rows(weight.astype(np.float32))))
        scored = rows * layout.grouped(stats.norms.astype(np.float32))[:, None, :]
        return np.ascontiguousarray(layout.unrows(scored.reshape(-1, scored.shape[2]), weight.shape)).reshape(-1)

    def hessian(self, name: str) -> np.ndarray | None:
        """The damped input Gram matrices of layer ``name``, [groups, in, in] (cached; None without
        full statistics)."""
        if name in self._hessians:
            return self._hessians[name]
        stats = self.stats.get(name)
        if stats is None or stats.gram is None:
            return None
        hessian = _damped(stats.gram / max(stats.count, 1))
        self._hessians[name] = hessian
        return hessian

    def factor(self, name: str) -> np.ndarray | None:
        """The upper Cholesky factors U of the inverse damped Hessians of layer ``name`` (H^-1 = U^T U),
        [groups, in, in] float32, computed once and reused by every mask (cached; None without full
        statistics, or when a Hessian cannot be factorised)."""
        if name not in self._factors:
            hessian = self.hessian(name)
            self._factors[name] = None if hessian is None else _inverse_factor(hessian, self.stop)
        return self._factors[name]

    def recover(
        self,
        name: str,
        original: np.ndarray,
        mask: np.ndarray,
        *,
        reconstruct: bool,
        start: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The pruned weight (``mask`` True = pruned) and the shift its bias needs (None: no bias).

        With ``reconstruct`` the kept weights are updated by least squares, from ``start``
        (this layer's fit at another amount) if given, else from the original;
        without, the weight is simply masked.
        """
        with self.timed(), np.errstate(all="ignore"):  # non-finite results are handled below
            new, shift = self._recover(name, original, mask, reconstruct=reconstruct, start=start)
        if not np.isfinite(new).all():  # activations overflowed float32: masking is all that is safe
            return np.where(mask.reshape(original.shape), 0, original).astype(original.dtype), None
        if shift is not None and not np.isfinite(shift).all():
            shift = None
        return new, shift

    def _recover(
        self,
        name: str,
        original: np.ndarray,
        mask: np.ndarray,
        *,
        reconstruct: bool,
        start: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        layout = self.layouts[name]
        hessian = self.hessian(name) if reconstruct else None
        stats = self.stats.get(name)
        mask = mask.reshape(original.shape)
        if hessian is None:  # masking (and the bias shift): no float64 copies of a possibly large weight
            shift = None
            if layout.bias is not None and stats is not None and stats.total is not None:
                removed = layout.rows(np.where(mask, original, 0).astype(np.float32))
                shift = _mean_output(layout, removed, stats.mean.astype(np.float32)).astype(np.float64)
            return np.where(mask, 0, original).astype(original.dtype), shift
        rows = layout.rows(original.astype(np.float64)).copy()
        pruned = layout.rows(mask)
        target = rows.copy()
        if start is not None:
            rows = layout.rows(start.astype(np.float64)).copy()
        rows[pruned] = 0.0
        linear = layout.grouped(target) @ hessian
        factor = self.factor(name) if name in self.one_pass else None
        # a wide layer: one OBS pass from the original weights, then a few steps
        begin = rows if factor is None else target
        rows = _fit_rows(layout, begin, linear, pruned, hessian, stop=self.stop, factor=factor)
        new = layout.unrows(rows, original.shape).astype(original.dtype)
        shift = None
        if layout.bias is not None and stats is not None and stats.total is not None:
            shift = _mean_output(layout, target - rows, stats.mean)
        return new, shift


LSQ_STEPS = 30
"""Most conjugate-gradient steps of the least-squares fit."""
LSQ_TOLERANCE = 1e-5
"""A row's fit stops when its residual is this small relative to its right-hand side. Looser
stops (1e-4, 1e-3) save a few more steps but cost the CNN fixtures 5-10 points of sparsity at
tolerance 0.01: the search needs the fits to be close to exact."""


def _least_squares(
    rows: np.ndarray,
    linear: np.ndarray,
    pruned: np.ndarray,
    hessian: np.ndarray,
    stop: threading.Event | None = None,
    steps: int = LSQ_STEPS,
) -> np.ndarray:
    """Minimise w H w^T - 2 w b^T over the kept weights of every row at once (``linear`` = b), by
    projected conjugate gradients, preconditioned by H's diagonal, from ``rows`` (pruned entries
    zero): the original weights, or a fit of the same layer at another amount.

    Arrays are per group: rows, linear, pruned [groups, out, in], hessian [groups, in, in].
    With b = w0 H this is (w - w0) H (w - w0)^T, the objective SparseGPT's one-pass OBS
    updates approximate; solving it (to CG tolerance) leaves markedly less error than
    one OBS pass (about 40% less on random correlated inputs at 50-70% sparsity) and
    costs a few matrix products.
    """
    keep = ~pruned
    w = rows.copy()
    diagonal = np.einsum("gii->gi", hessian)[:, None, :]
    residual = (linear - w @ hessian) * keep
    goal = (LSQ_TOLERANCE**2) * np.einsum("gij,gij->gi", linear * keep, linear * keep)
    z = residual / diagonal
    direction = z.copy()
    rz = np.einsum("gij,gij->gi", residual, z)
    for _ in range(steps):
        if np.all(np.einsum("gij,gij->gi", residual, residual) <= goal):
            break
        check_stop(stop)
        hp = direction @ hessian
        curvature = np.einsum("gij,gij->gi", direction, hp)
        alpha = np.divide(rz, curvature, out=np.zeros_like(rz), where=curvature > 1e-30)
        w += alpha[..., None] * direction
        residual -= alpha[..., None] * hp * keep
        z = residual / diagonal
        rz_next = np.einsum("gij,gij->gi", residual, z)
        beta = np.divide(rz_next, rz, out=np.zeros_like(rz), where=rz > 1e-30)
        direction = z + beta[..., None] * direction
        rz = rz_next
    return w


ROW_BLOCK_BYTES = 32 << 20
"""Rows solved at once: the solver holds a few float32 copies of them."""


def _fit_rows(
    layout: LayerLayout,
    start: np.ndarray,
    linear: np.ndarray,
    pruned: np.ndarray,
    hessian: np.ndarray,
    *,
    stop: threading.Event | None = None,
    factor: np.ndarray | None = None,
) -> np.ndarray:
    """``_least_squares`` of [out, in] rows (``linear`` per group), in blocks of rows, masked after.

    With ``factor`` (``Calibration.factor``: U, H^-1 = U^T U per group) the conjugate gradients
    start from one OBS pass over ``start`` (the unconstrained optimum, unmasked) and take at most
    ``ONE_PASS_STEPS``: a close fit at a fraction of the cost, for layers too wide to solve."""
    grouped = [layout.grouped(a) for a in (start, pruned)]
    out = np.empty_like(grouped[0])
    per_group = out.shape[1]
    # grouped Convs (depthwise: one row a group) go to the solvers below, all groups at once
    # an exact solve must beat the steps it replaces: fewer of them after a pass
    share = 1.0 if factor is None else (ONE_PASS_STEPS + 2) / LSQ_STEPS
    if len(out) == 1 and _solve_shared(linear[0], grouped[1][0], hessian[0], out[0], stop, share):
        per_group = 0
    elif _solve_rows(linear, grouped[1], hessian, out, stop, share):
        per_group = 0
    # conjugate gradients in float32: 1.5x faster, the same objective to 7 digits
    hessian32 = hessian.astype(np.float32) if per_group else hessian
    step = max(1, ROW_BLOCK_BYTES // max(4 * out.shape[0] * out.shape[2], 1))
    for i in range(0, per_group, step):
        block = slice(i, i + step)
        start32, linear32 = (a[:, block].astype(np.float32) for a in (grouped[0], linear))
        steps = LSQ_STEPS
        if factor is not None:
            start32 = np.stack(
                [_one_pass(start32[g], grouped[1][g, block], factor[g], stop) for g in range(len(factor))]
            )
            steps = ONE_PASS_STEPS
        out[:, block] = _least_squares(start32, linear32, grouped[1][:, block], hessian32, stop, steps)
    rows = out.reshape(start.shape)
    rows[pruned] = 0.0
    return rows


ONE_PASS_STEPS = 3
"""Conjugate-gradient steps after the OBS pass of a wide layer. Measured on correlated inputs
(1536x384 and 1280x1000 layers, 30-85% pruned by Wanda scores): one OBS pass leaves 1.1-2.5x
the error of the exact fit, three steps from there 1.05-1.2x, thirty 1.0x; each step costs about
what the pass does."""
OBS_BLOCK = 128
"""Columns an OBS pass updates one by one before it applies their errors to the rest at once
(SparseGPT's lazy batch): the rank-one updates stay within a block that fits in cache."""


def _one_pass(rows: np.ndarray, pruned: np.ndarray, factor: np.ndarray, stop: threading.Event | None) -> np.ndarray:
    """One OBS pass (SparseGPT's, for a given mask): column by column, each pruned weight is
    zeroed and its error spread over the row's later columns through the inverse Hessian's
    Cholesky factor, so that ||(w - w0) X||^2 grows the least given the columns already done.

    Arrays: rows, pruned [rows, in] (rows float32, unmasked), factor [in, in] (upper, H^-1 = U^T U).
    Cost: rows x in^2 / 2 multiply-adds in matrix products, rows x in x ``OBS_BLOCK`` in rank-one
    updates.
    """
    w = np.array(rows, dtype=np.float32)
    width = w.shape[1]
    for i1 in range(0, width, OBS_BLOCK):
        check_stop(stop)
        i2 = min(i1 + OBS_BLOCK, width)
        block, cut, u = w[:, i1:i2].copy(), pruned[:, i1:i2], factor[i1:i2, i1:i2]
        errors = np.zeros_like(block)
        for i in range(i2 - i1):
            if not cut[:, i].any():
                continue
            error = np.where(cut[:, i], block[:, i], 0.0) / u[i, i]
            block[:, i:] -= error[:, None] * u[i, i:][None, :]
            errors[:, i] = error
        block[cut] = 0.0
        w[:, i1:i2] = block
        if i2 < width:
            w[:, i2:] -= errors @ factor[i1:i2, i2:]
    return w


def _inverse_factor(hessian: np.ndarray, stop: threading.Event | None = None) -> np.ndarray | None:
    """Per group, the upper Cholesky factor U of the inverse of a damped Hessian (H^-1 = U^T U),
    float32; None if a Hessian cannot be factorised (non-finite statistics)."""
    out = np.empty(hessian.shape, dtype=np.float32)
    try:
        for g, block in enumerate(hessian):
            check_stop(stop)
            inverse = np.linalg.inv(block)
            out[g] = np.linalg.cholesky((inverse + inverse.T) / 2).T
    except np.linalg.LinAlgError:
        return None
    return out


DIRECT_STEPS = 20
"""A mask shared by many rows is solved exactly when one factorisation per distinct mask costs less
than about this many conjugate-gradient steps for every row."""


def _solve_shared(
    linear: np.ndarray,
    pruned: np.ndarray,
    hessian: np.ndarray,
    out: np.ndarray,
    stop: threading.Event | None = None,
    share: float = 1.0,
) -> bool:
    """Write into ``out`` the exact least-squares rows of one group when few distinct masks cover
    them (remove mode: every row of a consumer loses the same input columns); False, and ``out``
    untouched, when conjugate gradients are cheaper.

    Arrays: linear, pruned, out [rows, in], hessian [in, in]. Per distinct mask the kept block of
    the Hessian is solved for the rows that share it (usually one factorisation; blocks of rows
    bound the memory on very wide layers).
    """
    packed = np.ascontiguousarray(np.packbits(pruned, axis=1))
    keys = packed.view(np.dtype((np.void, packed.shape[1]))).reshape(-1)  # one hashable key per row
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    if len(first) * hessian.shape[0] > share * DIRECT_STEPS * len(pruned):
        return False
    out[...] = 0.0
    step = max(1, ROW_BLOCK_BYTES // max(8 * hessian.shape[0], 1))
    for i, row in enumerate(first):
        check_stop(stop)
        keep = np.flatnonzero(~pruned[row])
        if not len(keep):
            continue
        kept = hessian[np.ix_(keep, keep)]  # damped: symmetric positive definite
        rows = np.flatnonzero(inverse.reshape(-1) == i)
        for j in range(0, len(rows), step):
            block = rows[j : j + step]
            out[np.ix_(block, keep)] = np.linalg.solve(kept, linear[np.ix_(block, keep)].T).T
    return True


DIRECT_ROWS = 4.0
"""Rows are solved exactly, each on its own kept block of the Hessian, when the widest block's
k^3 is at most this many times in^2 (k kept of in inputs): one batched factorisation then costs
less than the conjugate-gradient steps it replaces (measured: a k^3 LU step takes about 7x a
multiply-add of the float32 matrix products, and CG takes up to LSQ_STEPS of in^2 products),
which is the case at high sparsity: 85% and up on a 1152-wide conv, and on tiny layers, where
the solver's per-step overhead dominates."""
DIRECT_SMALL = 32
"""Inputs per row up to which rows are always solved exactly (depthwise 3x3 windows, small MLPs)."""


def _solve_rows(
    linear: np.ndarray,
    pruned: np.ndarray,
    hessian: np.ndarray,
    out: np.ndarray,
    stop: threading.Event | None = None,
    share: float = 1.0,
) -> bool:
    """Write into ``out`` the exact least-squares fit of every row on its own kept inputs when that is
    cheaper than conjugate gradients (see ``DIRECT_ROWS``; ``share``: of the steps a full fit takes);
    False, and ``out`` untouched, otherwise
    (or when a block cannot be factorised).

    Arrays per group: linear, pruned, out [groups, rows, in], hessian [groups, in, in]. Each row's
    kept block of its group's Hessian is gathered into a batch padded to the widest row with an
    identity block (whose right-hand side is zero), in blocks of rows that bound the memory.
    """
    groups, rows, width = pruned.shape
    counts = width - pruned.sum(axis=2)
    widest = int(counts.max(initial=0))
    if widest**3 > share * DIRECT_ROWS * width**2 and width > DIRECT_SMALL:
        return False
    if not widest:
        out[...] = 0.0
        return True
    flat_out = np.zeros((groups * rows, width))
    flat_linear = np.ascontiguousarray(linear).reshape(-1, width)
    kept = np.argsort(pruned.reshape(-1, width), axis=1, kind="stable")[:, :widest]  # kept inputs first
    real = np.arange(widest) < counts.reshape(-1, 1)  # False: padding
    owner = np.repeat(np.arange(groups), rows)
    step = max(1, ROW_BLOCK_BYTES // (8 * widest * widest))
    for i in range(0, len(kept), step):
        check_stop(stop)
        block = slice(i, i + step)
        index, used = kept[block], real[block]
        blocks = hessian[owner[block, None, None], index[:, :, None], index[:, None, :]]
        blocks *= used[:, :, None] & used[:, None, :]
        np.einsum("bii->bi", blocks)[...] += ~used  # damped: symmetric positive definite
        rhs = np.take_along_axis(flat_linear[block], index, axis=1) * used
        try:
            solved = np.linalg.solve(blocks, rhs[..., None])[..., 0]
        except np.linalg.LinAlgError:  # only non-finite statistics make a damped block singular
            return False
        # padding entries solve to zero, so writing them over the row's pruned inputs is harmless
        np.put_along_axis(flat_out[block], index, solved, axis=1)
    out[...] = flat_out.reshape(out.shape)
    return True


def _grams(x: np.ndarray, groups: int, y: np.ndarray | None = None) -> np.ndarray:
    """x^T y (y defaults to x) of each group's columns, [groups, in, in]: only the blocks a
    grouped Conv uses."""
    y = x if y is None else y
    if groups == 1:
        return (x.T @ y)[None]
    left, right = (z.reshape(len(z), groups, -1).transpose(1, 0, 2) for z in (x, y))
    return left.transpose(0, 2, 1) @ right


def _damped(gram: np.ndarray) -> np.ndarray:
    """Each group's Gram matrix with dead inputs set to 1 and the diagonal raised by ``DAMPING``."""
    out = gram.copy()
    for block in out:
        dead = np.diag(block) == 0
        block[dead, dead] = 1.0
        block += DAMPING * float(np.mean(np.diag(block))) * np.eye(len(block))
    return out


def _mean_output(layout: LayerLayout, rows: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Each output row's mean, given the mean input row (columns of its own group only)."""
    return np.einsum("grd,gd->gr", layout.grouped(rows), layout.grouped(mean)).reshape(-1)


def layouts(model: onnx.ModelProto, layers: list[PrunableWeight]) -> tuple[dict[str, LayerLayout], dict[str, str]]:
    """The layout of every layer recovery can handle, and why the others are left alone.

    Which input a weight multiplies and how that input unfolds into rows are its op's
    declaration (``_ops``); a weight whose declaration has no unfolding is left alone.
    """
    index = GraphIndex.build(model.graph)
    out: dict[str, LayerLayout] = {}
    skipped: dict[str, str] = {}
    for layer in layers:
        users = [u for u in index.uses(layer.name) if not u.in_subgraph]
        if len(users) != 1:
            skipped[layer.name] = "shared by several nodes"
            continue
        node, slot = users[0].node, users[0].index
        op_layout = layout_of(node)
        weight = None if op_layout is None else op_layout.slot(slot)
        if op_layout is None or weight is None or weight.unfold is None:
            skipped[layer.name] = f"{node.op_type} input {slot} is not handled by recovery (no refit declared)"
            continue
        data = node.input[weight.data]
        if weight.unfold is not Unfold.IM2COL:
            if len(layer.shape) != 2:
                skipped[layer.name] = f"a {len(layer.shape)}-D {node.op_type} weight is not handled by recovery"
                continue
            transpose = weight.out_axis % 2 == 1  # [in, out]: transposed to rows = outputs
            if node.op_type == "MatMul":
                bias = _following_bias(index, node, layer.channels)
                out[layer.name] = LayerLayout(layer.name, "MatMul", data, transpose, bias=bias, unfold=weight.unfold)
                continue
            bias = _own_bias(index, node, layer.channels)
            mean = None if bias is not None else _following_mean(index, node, layer.channels)
            out[layer.name] = LayerLayout(
                layer.name,
                node.op_type,
                data,
                transpose,
                bias=bias or mean,
                bias_is_mean=mean is not None,
                unfold=weight.unfold,
            )
            continue
        if len(layer.shape) not in (3, 4):
            skipped[layer.name] = f"a {len(layer.shape) - 2}-D Conv is not handled by recovery (1-D and 2-D are)"
            continue
        attrs = Attributes(node)
        if attrs.get_str("auto_pad", "NOTSET") != "NOTSET":
            skipped[layer.name] = "Conv with auto_pad"
            continue
        spatial = len(layer.shape) - 2
        conv = {
            "kernel": list(layer.shape[2:]),
            "strides": attrs.get_ints("strides", [1] * spatial) or [],
            "pads": attrs.get_ints("pads", [0] * 2 * spatial) or [],
            "dilations": attrs.get_ints("dilations", [1] * spatial) or [],
        }
        if spatial == 1:  # a 1-D conv is a 2-D one on maps one high
            conv = {
                "kernel": [1, *conv["kernel"]],
                "strides": [1, *conv["strides"]],
                "pads": [0, conv["pads"][0], 0, conv["pads"][1]],
                "dilations": [1, *conv["dilations"]],
            }
        bias = _own_bias(index, node, layer.channels)
        bias = bias or _following_bias(index, node, layer.channels, spatial=spatial)
        mean = None if bias is not None else _following_mean(index, node, layer.channels)
        out[layer.name] = LayerLayout(
            layer.name,
            node.op_type,
            data,
            False,
            conv=conv,
            bias=bias or mean,
            bias_is_mean=mean is not None,
            groups=op_layout.groups,
            unfold=Unfold.IM2COL,
        )
    return out, skipped


def _own_bias(index: GraphIndex, node: onnx.NodeProto, width: int) -> str | None:
    """The node's constant third input (Conv's B, Gemm's C) if it has one value per output."""
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is None or not index.is_constant(bias) or _size(index, bias) != width:
        return None
    return bias


def _size(index: GraphIndex, name: str) -> int:
    tensor = index.tensor(name)
    return -1 if tensor is None else math.prod(tensor.dims)


def _following_bias(index: GraphIndex, node: onnx.NodeProto, width: int, *, spatial: int = 0) -> str | None:
    """The per-output constant of the single Add after a MatMul, or after a Conv without a bias
    (``spatial`` its dims: how exporters write a bias, paddle2onnx for every squeeze-and-excitation
    conv once its Reshape to [1, C, 1, 1] is folded)."""
    users = index.uses(node.output[0])
    if len(users) != 1 or users[0].node.op_type != "Add":
        return None
    add = users[0].node
    other = add.input[1 - users[0].index]
    tensor = index.tensor(other)  # an initializer or a Constant node (paddle2onnx writes those)
    shapes = ([1, width, *[1] * spatial], [width, *[1] * spatial]) if spatial else ([width], [1, width])
    if tensor is None or list(tensor.dims) not in shapes or len(index.uses(other)) != 1:
        return None
    return other


def _following_mean(index: GraphIndex, node: onnx.NodeProto, width: int) -> str | None:
    """The running mean of the BatchNormalization that alone reads a layer's output (a layer
    without a bias of its own: moving that mean moves the layer's output the other way)."""
    users = index.uses(node.output[0])
    if len(users) != 1 or users[0].node.op_type != "BatchNormalization" or users[0].index != 0:
        return None
    norm = users[0].node
    if len(norm.input) < 4 or len(norm.output) != 1 or len(index.uses(norm.input[3])) != 1:
        return None
    if any(a.name == "training_mode" and a.i for a in norm.attribute):  # normalizes by batch statistics
        return None
    mean = norm.input[3]
    if _size(index, mean) != width:
        return None
    return mean


ROWS_PER_INPUT = 128
"""Unfolded rows a conv's input statistics need per input of one output (C/groups * kh * kw)
over all calibration samples; beyond that, each sample contributes a random subset of its output
positions (at least ``MIN_POSITIONS``), its own, so that the subsets together cover the map
evenly. Large feature maps otherwise make calibration cost time and memory in proportion to
their area (a 3x3 conv on 56x56 maps: 200,000 rows for 576 inputs from 64 samples), with no
better statistics to show for it."""
MIN_POSITIONS = 16
"""Measured on the real classifier of ``bench/real.py`` (48x192 inputs, depthwise 5x5 convs): 8,
16 and 64 positions a sample give the same accuracies at fixed levels to a few samples of 480,
and 16 calibrates in 1.2-1.5 s against 2.5-3.4 s. (When every sample had the same positions, 16
cost up to 1.5 points: a fixed subset of a map is a biased sample of its mean.)"""


def positions_kept(conv: Mapping[str, list[int]], channels: int, groups: int, samples: int) -> int:
    """How many output positions per sample ``_unfold`` keeps for a conv reading ``channels``."""
    kh, kw = conv["kernel"]
    return max(MIN_POSITIONS, -(-ROWS_PER_INPUT * (channels // groups) * kh * kw // max(samples, 1)))


def _layer_rows(layout: LayerLayout, x: np.ndarray, samples: int) -> np.ndarray:
    """A layer's input as float32 rows of what one output reads: a conv's unfolded (large maps at
    ``positions_kept`` positions for ``samples`` calibration samples), others' last axis."""
    if layout.conv is None:
        if layout.unfold is Unfold.TRANSPOSED:  # Gemm with transA: x is [K, M]
            x = x.T
        return np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)
    if x.ndim == 3:  # a 1-D conv's [N, C, L]
        x = x[:, :, None, :]
    keep = positions_kept(layout.conv, x.shape[1], layout.groups, samples)
    return np.ascontiguousarray(_unfold(x.astype(np.float32, copy=False), layout.conv, keep))


@functools.lru_cache(maxsize=64)
def _positions(samples: int, total: int, positions: int) -> np.ndarray:
    """``positions`` of ``total`` output positions for each of ``samples`` batch slots, sorted
    [samples, positions]: a different draw per slot, so that a batch covers the map evenly, but
    a fixed one (a layer's current and original inputs stay paired row by row, and the first
    slots of a short last batch draw what a full batch's do)."""
    keys = np.random.default_rng(total).random((samples, total))
    picked = np.sort(np.argpartition(keys, positions - 1, axis=1)[:, :positions], axis=1)
    picked.flags.writeable = False  # shared through the cache
    return picked


def _unfold(x: np.ndarray, conv: Mapping[str, list[int]], positions: int | None = None) -> np.ndarray:
    """im2col: [N, C, H, W] -> [N * OH * OW, C * kh * kw] rows, in the weight's (c, kh, kw) order;
    with ``positions``, only that many output positions of each sample (``_positions``: the same
    ones for every array of the same shape, so a layer's current and original inputs stay paired
    row by row)."""
    kh, kw = conv["kernel"]
    sh, sw = conv["strides"]
    dh, dw = conv["dilations"]
    top, left, bottom, right = conv["pads"]
    n, c, h, w = x.shape
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    if positions is not None and positions < oh * ow:
        picked = _positions(n, oh * ow, positions)
        # the input pixels each picked window reads; outside the image, padding: a zero pixel
        ys = (picked // ow)[:, :, None, None] * sh + (np.arange(kh) * dh)[None, None, :, None] - top
        xs = (picked % ow)[:, :, None, None] * sw + (np.arange(kw) * dw)[None, None, None, :] - left
        inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        pixels = np.where(inside, ys * w + xs, h * w).reshape(n, positions, 1, kh * kw)
        flat = np.zeros((n, c, h * w + 1), dtype=x.dtype)
        flat[:, :, : h * w] = x.reshape(n, c, h * w)
        flat = flat.reshape(n, -1)
        channels = (np.arange(c) * (h * w + 1))[None, :, None]
        rows = np.empty((n, positions, c, kh * kw), dtype=x.dtype)
        for i in range(n):  # one sample at a time: its index array stays in cache
            np.take(flat[i], pixels[i] + channels, out=rows[i])
        return rows.reshape(n * positions, c * kh * kw)
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    windows = np.lib.stride_tricks.sliding_window_view(padded, (span_h, span_w), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, OH, OW, kh, kw]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)


def calibrate(
    model: onnx.ModelProto,
    layers: list[PrunableWeight],
    evalset: EvalSet,
    rows: np.ndarray,
    *,
    batch_size: int,
    fixed_batch: int | None,
    full: bool,
    max_cost: int | None = None,
    threads: int = 0,
    stop: threading.Event | None = None,
    runs_on: Batches | None = None,
) -> Calibration:
    """Statistics of every handled layer's input over ``rows`` of ``evalset`` (batch by batch).

    ``runs_on``: batches of the same eval set whose executor, when remote, computes the
    statistics per shard of batches on its workers (and this process adds them up).

    ``stop`` cancels it (checked per batch and layer) and every fit made from its result.

    With ``full``, the Gram matrices too, smallest first within ``HESSIAN_BUDGET_BYTES``; the
    others are named in ``Calibration.partial`` (bias correction only). Layers whose exact solver
    step (output rows x inputs^2) is over ``max_cost`` are fit by one OBS pass and a few steps
    (named in ``Calibration.one_pass``), up to ``ONE_PASS_COST`` (factorisation included); beyond
    that, bias correction only.
    """
    found, skipped = layouts(model, layers)
    wide: dict[str, str] = {}
    one_pass: dict[str, str] = {}
    if full:
        shapes = {layer.name: layer.shape for layer in layers}
        sizes = {name: 8 * layout.groups * _inputs_per_row(layout, shapes[name]) ** 2 for name, layout in found.items()}
        for name, layout in found.items():
            cost = _outputs(layout, shapes[name]) * _inputs_per_row(layout, shapes[name]) ** 2
            if max_cost is None or cost <= max_cost:
                continue
            if cost + layout.groups * _inputs_per_row(layout, shapes[name]) ** 3 > ONE_PASS_COST:
                wide[name] = (
                    f"{cost / 1e9:.1f} G multiply-adds per solver step, over the auto limit; --recover lsq fits it"
                )
            else:
                one_pass[name] = f"{cost / 1e9:.1f} G multiply-adds per exact solver step; --recover lsq solves it"
        used = 0
        for name in sorted(set(sizes) - set(wide), key=lambda n: (sizes[n], n)):
            used += sizes[name]
            if used > HESSIAN_BUDGET_BYTES:
                wide[name] = f"its Gram matrices would take least squares past {HESSIAN_BUDGET_BYTES >> 20} MiB"
                one_pass.pop(name, None)
    stats = {name: LayerStats() for name in found}
    if not found:  # nothing to run for (and onnxruntime would return every output for none asked)
        return Calibration(found, stats, len(rows), skipped, rows, wide, one_pass, stop=stop)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    wanted = sorted({layout.input for layout in found.values()})
    for name in wanted:
        if name not in existing:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    probe_bytes = probe.SerializeToString()
    del probe
    session = make_session(probe_bytes, threads=threads)
    step = fixed_batch or _fitting_step(session, wanted, evalset, rows, batch_size)
    batches = list(_batches(rows, step, fixed_batch))
    collect = functools.partial(
        _collect, wanted=wanted, layouts=found, full={n for n in found if full and n not in wide}, samples=len(rows)
    )
    executor = None if runs_on is None else runs_on.executor
    if executor is not None and executor.remote and len(batches) > 1:
        del session
        # contiguous shards of whole batches, a few per worker. A shard returns each batch's
        # statistics and they are added here in batch order: the sums are the local run's to the
        # bit (a shard's own sum would reorder float additions, and move a weight or two)
        count = min(len(batches), 2 * executor.workers)
        bounds = [round(i * len(batches) / count) for i in range(count + 1)]
        shards = [batches[bounds[i] : bounds[i + 1]] for i in range(count)]
        assert runs_on is not None
        for part in executor.map_model(runs_on, probe_bytes, functools.partial(_each_batch, collect), shards):
            for batch_stats in part:
                check_stop(stop)
                for name, layer_stats in batch_stats.items():
                    stats[name].merge(layer_stats)
    else:
        collect(session, evalset, batches, stats=stats, stop=stop)
    return Calibration(found, stats, len(rows), skipped, rows, wide, one_pass, stop=stop)


def _each_batch(
    collect: Callable[..., dict[str, LayerStats]],
    session: ort.InferenceSession,
    evalset: EvalSet,
    batches: Sequence[tuple[np.ndarray, int]],
) -> list[dict[str, LayerStats]]:
    """Each batch's statistics on its own (a worker's shard of the calibration pass)."""
    return [collect(session, evalset, [batch]) for batch in batches]


def _collect(
    session: ort.InferenceSession,
    evalset: EvalSet,
    batches: Sequence[tuple[np.ndarray, int]],
    *,
    wanted: list[str],
    layouts: Mapping[str, LayerLayout],
    full: set[str],
    samples: int,
    stats: dict[str, LayerStats] | None = None,
    stop: threading.Event | None = None,
) -> dict[str, LayerStats]:
    """Accumulate every layer's input statistics over ``batches`` (of ``samples`` calibration
    rows in all) into ``stats`` (new ones when None), and return them. Runs on a worker too."""
    stats = {name: LayerStats() for name in layouts} if stats is None else stats
    for batch, real in batches:
        check_stop(stop)
        feeds = {k: v[batch] for k, v in evalset.inputs.items()}
        outputs = dict(zip(wanted, run_session(session, wanted, feeds), strict=True))
        for name, layout in layouts.items():
            check_stop(stop)
            flat = _layer_rows(layout, np.asarray(outputs[layout.input])[:real], samples)
            stats[name].add(flat, name in full, layout.groups)
    return stats


CALIBRATION_BATCH_BYTES = 256 * 2**20
"""Layer inputs one calibration batch may return together: a model whose layer inputs of
``batch_size`` samples are larger calibrates in smaller batches (open_nsfw's 64-sample batch
returned 1.3 GiB at once, the peak of its whole run)."""


def _fitting_step(
    session: ort.InferenceSession, wanted: list[str], evalset: EvalSet, rows: np.ndarray, batch_size: int
) -> int:
    """The calibration batch size: ``batch_size``, or fewer samples when their layer inputs would
    take more than ``CALIBRATION_BATCH_BYTES`` (measured on one sample, which is not counted)."""
    if len(rows) <= 1 or batch_size <= 1:
        return batch_size
    feeds = {k: v[rows[:1]] for k, v in evalset.inputs.items()}
    per_sample = sum(np.asarray(x).nbytes for x in run_session(session, wanted, feeds))
    return max(1, min(batch_size, CALIBRATION_BATCH_BYTES // max(per_sample, 1)))


HESSIAN_BUDGET_BYTES = 1 << 30
"""Memory all layers' input Gram matrices may take together (float64)."""
ONE_PASS_COST = 1 << 35
"""Widest layer ``Recovery.AUTO`` fits by one OBS pass, in multiply-adds: an exact solver step
(output rows x inputs^2; the pass and its steps cost about five) plus the factorisation made once
per layer (about inputs^3 per group). Every layer of the zoo is under it (the largest: PP-OCR's
recognizer, 60 x 2880, 24 G; MiniLM's MLP out, 4.5 G); a ResNet-18 3x3 conv at 512 channels
(512 x 4608, 109 G) is over, and bias-corrected only."""


def _inputs_per_row(layout: LayerLayout, shape: tuple[int, ...]) -> int:
    """Width of the input row one output of the layer reads."""
    if layout.conv is not None:
        return math.prod(shape[1:])
    return shape[0] if layout.transpose else shape[1]


def _outputs(layout: LayerLayout, shape: tuple[int, ...]) -> int:
    """Output rows of the layer (channels or features)."""
    if layout.conv is not None:
        return shape[0]
    return shape[1] if layout.transpose else shape[0]


def _batches(rows: np.ndarray, step: int, fixed: int | None) -> Iterator[tuple[np.ndarray, int]]:
    """Batches of ``rows`` (padded to a fixed batch size) and how many of their rows are real."""
    for start in range(0, len(rows), step):
        batch = rows[start : start + step]
        real = len(batch)
        if fixed and real < fixed:
            batch = np.concatenate([batch, np.repeat(batch[-1:], fixed - real)])
        yield batch, real


ORIGINAL_CACHE_BYTES = 512 * 2**20
"""Layer inputs of the unpruned model kept between candidates (recomputed per pass above this).
PaddleOCR's classifier needs 382 MiB: kept, its sequential search takes 41 s instead of 47 s,
and the peak memory stays the same (1.7 GB), the unpruned walk's activations no longer held."""
FIT_CACHE_BYTES = 256 * 2**20
"""Refit weights kept for candidates that share a prefix of layers (dropped beyond this)."""


@dataclass(frozen=True)
class _Group:
    """Layers that read the same activation: one calibration pass serves them all."""

    input: str
    position: int
    """Index of the first node that reads it (graph order)."""
    layers: tuple[str, ...]


class SequentialRefit:
    """Least squares on the inputs the pruned model really sees (``Recovery.SEQUENTIAL``).

    Plain reconstruction fits each layer to the unpruned model's inputs, so the
    errors of the layers before it add up unchecked: at high sparsity the model
    collapses although every layer alone is well fitted. Here layers are refit in
    graph order, each one on the activations X' the model produces with every
    layer before it already pruned and refit, to reproduce the unpruned output X W:
    minimise ||X' W' - X W||^2 + lambda ||W' - W||^2 under the mask (so W' = W where
    nothing drifted), then shift the bias so the mean output matches. Layers left
    dense after a pruned one are refit the same way (no mask): they absorb drift.
    Per candidate the calibration samples walk through the model once (``_Walk``), cut
    where each group of layers sharing an input gets it; fits are cached by the amounts of
    everything before them.
    """

    def __init__(
        self,
        calibration: Calibration,
        split: SplitModel,
        evalset: EvalSet,
        *,
        batch_size: int,
        fixed_batch: int | None,
        threads: int = 0,
    ) -> None:
        self.calibration = calibration
        self.stop = calibration.stop
        self.evalset = evalset
        self.step, self.fixed = fixed_batch or batch_size, fixed_batch
        index = GraphIndex.build(split.rest.graph)
        nodes = len(split.rest.graph.node)
        groups: dict[str, list[str]] = {}
        first: dict[str, int] = {}
        inputs: dict[str, str] = {}
        self.position: dict[str, int] = {}
        for name in split.weights:
            users = [index.position(u.node) for u in index.uses(name) if not u.in_subgraph]
            self.position[name] = min(users, default=nodes)
        for name, layout in calibration.layouts.items():
            # one pass serves the layers reading one activation the same way (Convs of one kernel)
            key = f"{layout.input}|{layout.unfold.value}|{layout.conv}|{layout.groups}"
            inputs[key] = layout.input
            groups.setdefault(key, []).append(name)
            first[key] = min(first.get(key, nodes), self.position[name])
        self.groups = sorted(
            (
                _Group(inputs[k], first[k], tuple(sorted(names, key=lambda n: self.position[n])))
                for k, names in groups.items()
            ),
            key=lambda g: g.position,
        )
        self.tapped = sorted({g.input for g in self.groups})
        self.fed = split.fed(self.tapped)
        self.threads = threads
        self.session = make_session(self.fed.SerializeToString(), threads=threads)
        self._taps: dict[str, tuple[ort.InferenceSession, set[str]]] = {}
        self._graph_inputs = {v.name for v in self.fed.graph.input}
        self.segments = _Segments(self.fed, self.groups, set(evalset.inputs), threads)
        # walked in the order their inputs are computed: every layer before a group's input is refit first
        self.groups.sort(key=lambda g: (self.segments.cut[g], g.position))
        self.original = dict(split.weights)
        self._originals: dict[_Group, list[np.ndarray]] | None = None
        self._cache: dict[tuple[object, ...], dict[str, np.ndarray]] = {}
        self._cached_bytes = 0

    def release(self) -> None:
        self.original.clear()
        self._originals = None
        self._taps.clear()
        self.forget()

    def forget(self) -> None:
        """Drop the cached fits (the unpruned activations stay)."""
        self._cache.clear()
        self._cached_bytes = 0

    def _flat(self, name: str, x: np.ndarray) -> np.ndarray:
        return _layer_rows(self.calibration.layouts[name], x, len(self.calibration.rows))

    def _tap(self, name: str) -> tuple[ort.InferenceSession, set[str]]:
        """A session of only the nodes ``name`` depends on, and the inputs it reads: onnxruntime
        runs every node of a graph whatever outputs are asked for."""
        if name not in self._taps:
            model = onnx.ModelProto()
            model.CopyFrom(self.fed)
            del model.graph.output[:]
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
            keep_needed(model.graph, [name], inputs_too=True)
            session = make_session(model.SerializeToString(), threads=self.threads)
            self._taps[name] = session, {v.name for v in model.graph.input}
        return self._taps[name]

    def _inputs(self, weights: Mapping[str, np.ndarray], names: list[str]) -> Iterator[list[np.ndarray]]:
        """The activations ``names`` per calibration batch, with ``weights`` in the model (one name:
        through a session of just what it depends on)."""
        tap = len(names) == 1 and names[0] not in self._graph_inputs
        session, wanted = self._tap(names[0]) if tap else (self.session, None)
        for batch, real in _batches(self.calibration.rows, self.step, self.fixed):
            check_stop(self.stop)
            feeds = {k: v[batch] for k, v in self.evalset.inputs.items()}
            feeds.update(weights)
            if wanted is not None:
                feeds = {k: v for k, v in feeds.items() if k in wanted}
            yield [np.asarray(x)[:real] for x in run_session(session, names, feeds)]

    def _cache_originals(self) -> bool:
        """Keep every group's flattened input in the unpruned model if all together stay under
        ``ORIGINAL_CACHE_BYTES`` (one pass); whether they are kept."""
        if self._originals is None:
            kept: dict[_Group, list[np.ndarray]] = {g: [] for g in self.groups}
            size = 0
            for arrays in self._inputs(self.original, self.tapped):
                by_name = dict(zip(self.tapped, arrays, strict=True))
                for g in self.groups:
                    kept[g].append(self._flat(g.layers[0], by_name[g.input]))
                    size += kept[g][-1].nbytes
                if size > ORIGINAL_CACHE_BYTES:
                    self._originals = {}
                    break
            else:
                self._originals = kept
        return bool(self._originals)

    def _original(self, group: _Group) -> Iterator[np.ndarray]:
        """The group's flattened input in the unpruned model, per calibration batch (cached, or
        recomputed from the model inputs)."""
        if self._cache_originals():
            assert self._originals is not None
            yield from self._originals[group]
        else:
            for (x,) in self._inputs(self.original, [group.input]):
                yield self._flat(group.layers[0], x)

    def refit(
        self, weights: dict[str, np.ndarray], masks: Mapping[str, np.ndarray], amounts: Mapping[str, int]
    ) -> None:
        """Refit ``weights`` in place, in graph order.

        ``weights``: every pruned layer already masked, the biases original; ``masks``
        (True = pruned) of the pruned layers calibration handles; ``amounts``: the
        config's amount per layer (drift comes from any pruned layer before a group,
        and the cache is keyed on them).
        """
        with self.calibration.timed(), np.errstate(all="ignore"):  # non-finite fits are dropped in _fit
            self._refit(weights, masks, amounts)

    def _refit(
        self, weights: dict[str, np.ndarray], masks: Mapping[str, np.ndarray], amounts: Mapping[str, int]
    ) -> None:
        pruned_at = min((self.position.get(n, -1) for n, a in amounts.items() if a), default=None)
        todo: list[tuple[_Group, tuple[object, ...], bool]] = []
        for group in self.groups:
            drifted = pruned_at is not None and pruned_at < group.position
            if not drifted and all(masks.get(n) is None for n in group.layers):
                continue
            upstream = tuple(sorted((n, a) for n, a in amounts.items() if a and self.position[n] < group.position))
            todo.append((group, (group, upstream, tuple(amounts.get(n, 0) for n in group.layers)), drifted))
        # the drifted inputs come from walking the model cut by cut, as far as the last one to fit
        to_walk = [g for g, key, drifted in todo if drifted and key not in self._cache]
        walk = _Walk(self, weights, pruned_at, cached=self._cache_originals()) if to_walk else None
        for group, cache_key, drifted in todo:
            check_stop(self.stop)
            fitted = self._cache.get(cache_key)
            if fitted is None:
                pairs: Iterable[tuple[np.ndarray, np.ndarray]] = ()
                if drifted:
                    walked = walk.inputs(group) if walk is not None else None
                    if walked is None:  # past the walk's memory: from the model inputs
                        walk = None
                        now = (self._flat(group.layers[0], x) for (x,) in self._inputs(weights, [group.input]))
                        walked = zip(now, self._original(group), strict=True)
                    pairs = walked
                fitted = self._fit(group, pairs, masks, drifted)
                size = sum(a.nbytes for a in fitted.values())
                if self._cached_bytes + size > FIT_CACHE_BYTES:  # large models: recompute, do not hoard
                    self._cache.clear()
                    self._cached_bytes = 0
                self._cache[cache_key] = fitted
                self._cached_bytes += size
            weights.update(fitted)
            if walk is not None and group is to_walk[-1]:
                walk = None  # nothing further to fit from it

    def _fit(
        self,
        group: _Group,
        pairs: Iterable[tuple[np.ndarray, np.ndarray]],
        masks: Mapping[str, np.ndarray | None],
        drifted: bool,
    ) -> dict[str, np.ndarray]:
        """Refit the group's layers: plainly if nothing before it drifted, else on ``pairs``, the
        flattened input per calibration batch in the pruned and in the unpruned model."""
        calibration = self.calibration
        out: dict[str, np.ndarray] = {}
        if not drifted:  # the layers see the unpruned inputs: plain reconstruction
            for name in group.layers:
                check_stop(self.stop)
                mask = masks.get(name)
                if mask is None:
                    continue
                out[name], shift = calibration.recover(name, self.original[name], mask, reconstruct=True)
                self._shift(out, name, shift)
            return out
        first = group.layers[0]
        groups = calibration.layouts[first].groups
        count, gram, cross, mean, mean_now = 0, None, None, None, None
        for now, before in pairs:
            check_stop(self.stop)
            count += len(now)
            batch_gram = _grams(now, groups).astype(np.float64)
            batch_cross = _grams(now, groups, before).astype(np.float64)
            gram = batch_gram if gram is None else gram + batch_gram
            cross = batch_cross if cross is None else cross + batch_cross
            mean_now = now.sum(axis=0, dtype=np.float64) + (0 if mean_now is None else mean_now)
            mean = before.sum(axis=0, dtype=np.float64) + (0 if mean is None else mean)
        assert gram is not None and cross is not None and mean is not None and mean_now is not None
        gram, cross, mean, mean_now = gram / count, cross / count, mean / count, mean_now / count
        damped = _damped(gram)
        cross += damped - gram  # the same damping pulls towards the original weights
        for name in group.layers:
            check_stop(self.stop)
            layout, original = calibration.layouts[name], self.original[name]
            w0 = layout.rows(original.astype(np.float64))
            mask = masks.get(name)
            pruned = np.zeros(w0.shape, dtype=bool) if mask is None else layout.rows(mask.reshape(original.shape))
            start = np.where(pruned, 0.0, w0)
            rows = _fit_rows(
                layout, start, layout.grouped(w0) @ cross.transpose(0, 2, 1), pruned, damped, stop=self.stop
            )
            out[name] = layout.unrows(rows, original.shape).astype(original.dtype)
            if layout.bias is not None:
                self._shift(out, name, _mean_output(layout, w0, mean) - _mean_output(layout, rows, mean_now))
        if not all(np.isfinite(a).all() for a in out.values()):  # overflowed activations: keep the masking
            return {}
        return out

    def _shift(self, out: dict[str, np.ndarray], name: str, shift: np.ndarray | None) -> None:
        bias = self.calibration.layouts[name].bias
        if bias is None or shift is None:
            return
        out[bias] = self.calibration.layouts[name].shifted(self.original[bias], shift)


STATE_BYTES = 1 << 30
"""Activations a sequential refit carries from one cut to the next (pruned and unpruned model
together); past this, the remaining groups' inputs are recomputed from the model inputs."""


class _Segments:
    """The fed model cut right after each group's input is computed, run stretch by stretch.

    Each stretch between consecutive cuts becomes a session of just its nodes, reading the
    tensors still needed at the cut before (and weights) and returning those still needed at
    the cut after: walking them in turn computes every group's input with each node run once,
    where a session per group would rerun the whole prefix of the model.
    """

    def __init__(self, fed: onnx.ModelProto, groups: list[_Group], inputs: set[str], threads: int) -> None:
        self.fed, self.threads = fed, threads
        nodes = fed.graph.node
        produced = GraphIndex.build(fed.graph).producers
        self.cut = {g: produced[g.input] + 1 if g.input in produced else 0 for g in groups}
        self.walkable = {g for g in groups if g.input in produced or g.input in inputs}
        read = [reads(node) for node in nodes]
        needed = {g.input for g in groups}
        self._used = [False] * len(nodes)
        for i in reversed(range(len(nodes))):
            if any(name in needed for name in nodes[i].output):
                self._used[i] = True
                needed.update(read[i])
        self._last: dict[str, int] = {}
        for i, names in enumerate(read):
            if self._used[i]:
                self._last.update((name, i) for name in names)
        for g, cut in self.cut.items():  # a group's own reader may feed no other group's input
            self._last[g.input] = max(self._last.get(g.input, 0), cut)
        self._defined = {name: -1 for name in inputs} | produced
        self._sessions: dict[tuple[int, int], tuple[ort.InferenceSession, list[str], list[str]] | None] = {}
        self._live: dict[int, set[str]] = {}

    def live(self, cut: int) -> set[str]:
        """The computed tensors (and model inputs) read at or after ``cut`` that exist before it."""
        if cut not in self._live:
            defined = self._defined
            self._live[cut] = {n for n, last in self._last.items() if n in defined and defined[n] < cut <= last}
        return self._live[cut]

    def stretch(
        self, start: int, end: int, state: Mapping[str, np.ndarray]
    ) -> tuple[ort.InferenceSession, list[str], list[str]] | None:
        """The session running nodes ``start:end`` from ``state`` (a batch at ``start``) and weights,
        the names it reads and returns; None if onnxruntime cannot load that part on its own."""
        key = (start, end)
        if key not in self._sessions:
            try:
                self._sessions[key] = self._build(start, end, state)
            except UnsupportedModelError:
                self._sessions[key] = None
        return self._sessions[key]

    def _build(
        self, start: int, end: int, state: Mapping[str, np.ndarray]
    ) -> tuple[ort.InferenceSession, list[str], list[str]]:
        nodes = [node for i, node in enumerate(self.fed.graph.node[start:end], start) if self._used[i]]
        made = {name for node in nodes for name in node.output}
        outputs = sorted(n for n in self.live(end) if n in made)
        carried = sorted({name for node in nodes for name in reads(node)} & (set(state) - made))
        model = onnx.ModelProto()
        model.CopyFrom(self.fed)
        graph = model.graph
        del graph.node[:]
        graph.node.extend(nodes)
        fed = [v for v in graph.input if v.name not in state]  # the weights
        del graph.input[:]
        graph.input.extend(fed)
        for name in carried:
            dtype = helper.np_dtype_to_tensor_dtype(state[name].dtype)
            graph.input.append(helper.make_tensor_value_info(name, dtype, None))
        for k in reversed(range(len(graph.value_info))):
            if graph.value_info[k].name in state:
                del graph.value_info[k]
        del graph.output[:]
        graph.output.extend(helper.make_empty_tensor_value_info(n) for n in outputs)
        keep_needed(graph, outputs, inputs_too=True)
        feeds = [v.name for v in graph.input]
        return make_session(model.SerializeToString(), threads=self.threads), feeds, outputs


class _Walk:
    """The pruned model's activations at one cut, per calibration batch, and the unpruned model's
    (unless its flattened group inputs are cached): one list for both while no pruned layer has run."""

    def __init__(self, refit: SequentialRefit, weights: Mapping[str, np.ndarray], pruned_at: int | None, cached: bool):
        self.refit, self.weights, self.cached = refit, weights, cached
        self.pruned_at = len(refit.fed.graph.node) if pruned_at is None else pruned_at
        batches = list(_batches(refit.calibration.rows, refit.step, refit.fixed))
        self.real = [real for _, real in batches]
        self.now: list[dict[str, np.ndarray]] = [
            {k: v[batch] for k, v in refit.evalset.inputs.items()} for batch, _ in batches
        ]
        self.before: list[dict[str, np.ndarray]] = [] if cached else self.now
        self.at = 0

    def inputs(self, group: _Group) -> Iterator[tuple[np.ndarray, np.ndarray]] | None:
        """The group's flattened input per batch, pruned and unpruned; None if it cannot be
        walked to (past ``STATE_BYTES``, or a tensor on the way that is not an array)."""
        segments = self.refit.segments
        if group not in segments.walkable or not self._advance(segments.cut[group]):
            return None
        flat, name, first = self.refit._flat, group.input, group.layers[0]
        now = [state[name][:real] for state, real in zip(self.now, self.real, strict=True)]
        if self.cached:
            assert self.refit._originals
            before: Iterable[np.ndarray] = self.refit._originals[group]
        else:
            raw = [state[name][:real] for state, real in zip(self.before, self.real, strict=True)]
            before = (flat(first, x) for x in raw)
        return zip((flat(first, x) for x in now), before, strict=True)

    def _advance(self, cut: int) -> bool:
        """Run on to ``cut``; whether it stayed within ``STATE_BYTES``."""
        segments = self.refit.segments
        while self.at < cut:
            check_stop(self.refit.stop)
            end = min(c for c in (*segments.cut.values(), cut) if c > self.at)
            now = self._run(self.at, end, self.now, self.weights)
            if self.before is self.now and end <= self.pruned_at:
                before = now  # nothing pruned has run yet: the same activations
            else:
                before = self._run(self.at, end, self.before, self.refit.original) if self.before else []
            if now is None or before is None:
                return False
            self.now, self.before, self.at = now, before, end
            states = self.now + ([] if self.before is self.now else self.before)
            if sum(a.nbytes for state in states for a in state.values()) > STATE_BYTES:
                return False
        return True

    def _run(
        self, start: int, end: int, states: list[dict[str, np.ndarray]], weights: Mapping[str, np.ndarray]
    ) -> list[dict[str, np.ndarray]] | None:
        """``states`` (one per batch, at cut ``start``) carried to cut ``end``; None if that part of
        the model does not load or run on its own, or a tensor on the way is not an array (a
        sequence, a map)."""
        segments = self.refit.segments
        stretch = segments.stretch(start, end, states[0])
        if stretch is None:
            return None
        session, inputs, outputs = stretch
        live = segments.live(end)
        out = []
        for state in states:
            check_stop(self.refit.stop)
            moved = {n: v for n, v in state.items() if n in live}
            if outputs:
                feeds = {n: state[n] if n in state else weights[n] for n in inputs}
                try:
                    results = session.run(outputs, feeds)
                except Exception:  # onnxruntime's own types; the whole model runs: go that way
                    return None
                if not all(isinstance(r, np.ndarray) for r in results):
                    return None
                moved.update(zip(outputs, results, strict=True))
            out.append(moved)
        return out
