"""Accuracy recovery without retraining, from calibration activations.

Calibration runs the unpruned model on a few hundred samples of the search
split (never the held-out one) with the input of every prunable layer exposed
as an extra output, and accumulates per layer, batch by batch: the mean input
row and the input Gram matrix X^T X / n (its diagonal alone when the full matrix
is not needed). Conv inputs are unfolded (im2col) so a row is one receptive
field, matching the weight flattened to [out, in * kh * kw]; a ConvTranspose's
are the equivalent conv's on its dilated input, a recurrent node's W rows its steps'
inputs and R rows its previous states, and a weight several nodes read gets the
rows of all of them.

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
import hashlib
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ._analysis import PrunableWeight
from ._blas import one_blas_thread
from ._errors import UnsupportedModelError, check_stop
from ._evalset import EvalSet
from ._evaluate import Batches, SplitModel, make_session, run_session
from ._graph import Attributes, GraphIndex, keep_needed, reads
from ._ops import RECURRENT_GATES, Unfold, layout_of

__all__ = ["Calibration", "LayerLayout", "SequentialRefit", "calibrate", "layouts"]

DAMPING = 0.01
"""Share of the mean Hessian diagonal added to it before inversion."""


@dataclass(frozen=True)
class Recurrent:
    """What the rows of a recurrent node's weights need beyond its input X (``Unfold.SEQUENCE``:
    W's rows are the steps' inputs x_t; ``Unfold.STATE``: R's rows the previous states h_{t-1})."""

    hidden: int
    directions: int
    gates: int
    batch_major: bool
    """``layout=1``: X [batch, seq, in], Y [batch, seq, directions, hidden], initial_h [batch, directions, hidden]."""
    state: str
    """The node's output Y (named by calibration when the node leaves it unnamed: ``_state_name``)."""
    initial: str = ""
    """initial_h ("": zeros)."""
    lengths: str = ""
    """sequence_lens ("": every step of every sequence); the steps past a sequence's end are not rows."""
    reset: tuple[str, str, str] | None = None
    """A GRU without ``linear_before_reset``: its W, R and B, from which the reset gate r_t is computed,
    since the hidden gate's block of R multiplies r_t * h_{t-1}."""

    def reads(self) -> tuple[str, ...]:
        return tuple(n for n in (self.state, self.initial, self.lengths, *(self.reset or ())) if n)


@dataclass(frozen=True)
class LayerUse:
    """One node a weight feeds: the activation it multiplies (and a recurrent node's other tensors)."""

    input: str
    recurrent: Recurrent | None = None

    def reads(self) -> tuple[str, ...]:
        return (self.input, *(() if self.recurrent is None else self.recurrent.reads()))


@dataclass(frozen=True)
class LayerLayout:
    """How a prunable weight meets its input: which tensor feeds it and how to flatten both."""

    name: str
    op_type: str
    input: str
    """The activation multiplied by the weight (of its first use)."""
    transpose: bool
    """Gemm/MatMul: the weight is [in, out] and is transposed to rows = outputs."""
    conv: dict[str, list[int]] | None = None
    """Conv: kernel, strides, pads, dilations (2-D or 3-D; a 1-D conv's as a 2-D one on maps one high).
    ConvTranspose: the equivalent conv's on the dilated input (``transposed``). With auto_pad SAME_UPPER
    (SAME_LOWER), ``same`` is [1] ([0]) and the pads are computed per input size (``_explicit``)."""
    bias: str | None = None
    """The constant added to the layer's output per output channel, if any: its bias, or the
    mean of the BatchNormalization right after a layer without one (subtracted, not added)."""
    bias_is_mean: bool = False
    groups: int = 1
    """Conv groups: output rows of group j read only input columns of group j (depthwise: one
    channel each), so statistics and fits are per group. Also a batched MatMul weight's matrices,
    and a recurrent R's (direction, gate) blocks."""
    unfold: Unfold = Unfold.LAST_AXIS
    """How the input becomes rows (the op declaration's, ``_ops``); IM2COL with ``conv`` set."""
    uses: tuple[LayerUse, ...] = ()
    """Every node the weight feeds (empty: the one reading ``input``): a weight shared by several
    nodes (an unrolled decoder's) is fit once on the rows of all of them."""
    transposed: dict[str, list[int]] | None = None
    """ConvTranspose: the strides its input is dilated by and the pads (negative: cropped) of the
    equivalent conv, per spatial axis (begins, then ends)."""

    @property
    def all_uses(self) -> tuple[LayerUse, ...]:
        return self.uses or (LayerUse(self.input),)

    @property
    def walkable(self) -> bool:
        """Whether a sequential refit can walk to its one input and fit it there (recurrent and
        shared weights are fit on the unpruned model's inputs)."""
        return len(self.all_uses) == 1 and self.all_uses[0].recurrent is None

    def grouped(self, rows: np.ndarray) -> np.ndarray:
        """[out, in] rows (or [in] columns) as [groups, out / groups, in] ([groups, in / groups])."""
        if rows.ndim == 1:
            return rows.reshape(self.groups, -1)
        return rows.reshape(self.groups, rows.shape[0] // self.groups, rows.shape[1])

    def rows(self, weight: np.ndarray) -> np.ndarray:
        """The weight as [out, in] (a view when possible)."""
        if self.transposed is not None:  # [in, out / groups, k...] -> [out, in / groups * k...], flipped
            g, spatial = self.groups, weight.ndim - 2
            split = weight.reshape(g, weight.shape[0] // g, *weight.shape[1:])
            flipped = np.flip(split, axis=tuple(range(3, 3 + spatial)))
            moved = flipped.transpose(0, 2, 1, *range(3, 3 + spatial))
            return moved.reshape(g * weight.shape[1], -1)
        if self.conv is not None:
            return weight.reshape(weight.shape[0], -1)
        if weight.ndim > 2:  # a batched MatMul's [..., in, out], a recurrent [directions, gates * hidden, in]
            if self.transpose:
                return np.swapaxes(weight, -1, -2).reshape(-1, weight.shape[-2])
            return weight.reshape(-1, weight.shape[-1])
        return weight.T if self.transpose else weight

    def unrows(self, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.transposed is not None:
            g, spatial = self.groups, len(shape) - 2
            split = rows.reshape(g, shape[1], shape[0] // g, *shape[2:])
            moved = split.transpose(0, 2, 1, *range(3, 3 + spatial))
            return np.flip(moved, axis=tuple(range(3, 3 + spatial))).reshape(shape)
        if self.conv is None and len(shape) > 2 and self.transpose:
            return np.swapaxes(rows.reshape(*shape[:-2], shape[-1], shape[-2]), -1, -2)
        return (rows.T if self.transpose and self.conv is None and len(shape) == 2 else rows).reshape(shape)

    def shifted(self, bias: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """``bias`` moved so that the layer's output moves by ``shift``, in its own dtype."""
        if self.unfold in (Unfold.SEQUENCE, Unfold.STATE):  # B [directions, 2 * rows]: Wb, then Rb
            out = bias.astype(np.float64).reshape(bias.shape[0], -1)
            half = out.shape[1] // 2
            # each term is added where its product is (a GRU's Rb_h inside the reset gate, as R_h h)
            part = out[:, half:] if self.unfold is Unfold.STATE else out[:, :half]
            part += shift.reshape(bias.shape[0], -1)
            return out.reshape(bias.shape).astype(bias.dtype)
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
    _fits: OrderedDict[tuple[str, bytes], tuple[np.ndarray, np.ndarray | None]] = field(default_factory=OrderedDict)
    _fit_bytes: int = 0
    _linears: dict[str, np.ndarray] = field(default_factory=dict)
    _timing: int = 0
    _since: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    """Guards the timing and the cached fits: a config's layers are fit on several threads."""

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Add the block's time to ``seconds``; blocks that overlap (nested, or on other threads) count
        once, from the first one's start to the last one's end."""
        with self._lock:
            if not self._timing:
                self._since = time.perf_counter()
            self._timing += 1
        try:
            yield
        finally:
            with self._lock:
                self._timing -= 1
                if not self._timing:
                    self.seconds += time.perf_counter() - self._since

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
        stats.gram = None  # the damped matrix replaces it: not two float64 copies of every layer's
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
        # a one-pass fit does not depend on ``start``: the same mask gives the same fit, kept for
        # the next candidate (the search revisits a wide layer's amounts; without this its pass and
        # steps were paid again for every candidate of a large model)
        key = _fit_key(name, original, mask) if reconstruct and name in self.one_pass else None
        if key is not None:
            with self._lock:
                if key in self._fits:
                    self._fits.move_to_end(key)
                    return self._fits[key]
        with self.timed(), np.errstate(all="ignore"):  # non-finite results are handled below
            new, shift = self._recover(name, original, mask, reconstruct=reconstruct, start=start)
        if not np.isfinite(new).all():  # activations overflowed float32: masking is all that is safe
            new, shift = np.where(mask.reshape(original.shape), 0, original).astype(original.dtype), None
        if shift is not None and not np.isfinite(shift).all():
            shift = None
        if key is not None:
            with self._lock:
                self._keep_fit(key, new, shift)
        return new, shift

    def _keep_fit(self, key: tuple[str, bytes], new: np.ndarray, shift: np.ndarray | None) -> None:
        """Cache a one-pass fit (read-only: callers share it), the oldest dropped past ``FIT_KEEP_BYTES``."""
        size = new.nbytes + (0 if shift is None else shift.nbytes)
        if size > FIT_KEEP_BYTES:
            return
        for array in (new, shift):
            if array is not None:
                array.flags.writeable = False
        self._fits[key] = (new, shift)
        self._fit_bytes += size
        while self._fit_bytes > FIT_KEEP_BYTES:
            _, (old, old_shift) = self._fits.popitem(last=False)
            self._fit_bytes -= old.nbytes + (0 if old_shift is None else old_shift.nbytes)

    def _linear(self, name: str, target: np.ndarray, hessian: np.ndarray) -> np.ndarray:
        """The right-hand side W0 H of layer ``name``'s fit (``target``: its original rows), the same for
        every candidate: cached for the layers fit by one pass (a 4096 x 1024 layer's costs what its
        pass does), others' recomputed (cheap by the auto limit, and not to hold a float64 copy of
        every layer)."""
        if name not in self.one_pass:
            return _times_hessian(self.layouts[name], target, hessian)
        if name not in self._linears:
            self._linears[name] = _times_hessian(self.layouts[name], target, hessian)
        return self._linears[name]

    def release(self) -> None:
        """Drop what only fits need (Gram matrices, Hessians, factors, cached fits) once the model to
        write is built: on open_nsfw they held 450 MiB through the write phase's session runs. The
        means and norms stay; no fit can be made afterwards."""
        self._fits.clear()
        self._fit_bytes = 0
        self._linears.clear()
        self._hessians.clear()
        self._factors.clear()
        for stats in self.stats.values():
            stats.gram = None

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
        linear = self._linear(name, target, hessian)
        factor = self.factor(name) if name in self.one_pass else None
        # a wide layer: one OBS pass from the original weights, then a few steps
        begin = rows if factor is None else target
        rows = _fit_rows(layout, begin, linear, pruned, hessian, stop=self.stop, factor=factor)
        new = layout.unrows(rows, original.shape).astype(original.dtype)
        shift = None
        if layout.bias is not None and stats is not None and stats.total is not None:
            shift = _mean_output(layout, target - rows, stats.mean)
        return new, shift


FIT_KEEP_BYTES = 64 * 2**20
"""One-pass fits (``Calibration.one_pass`` layers) kept for later candidates with the same mask."""


def _times_hessian(layout: LayerLayout, rows: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """[out, in] ``rows`` times each group's Hessian, [groups, out / groups, in]."""
    return layout.grouped(rows) @ hessian


def _fit_key(name: str, original: np.ndarray, mask: np.ndarray) -> tuple[str, bytes]:
    """A layer's fit cache key: its name and a digest of the mask (the original weights are the
    layer's own, fixed for a run)."""
    digest = hashlib.blake2b(np.packbits(np.asarray(mask, dtype=bool).reshape(-1)).tobytes(), digest_size=16)
    digest.update(str(original.shape).encode())
    return name, digest.digest()


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
    # each group's columns copied out as one contiguous [in, rows] block, then one stacked
    # product: numpy's matmul on the strided [rows, in] views of x, and a product-and-sum per
    # column (the previous way), were 2-3x slower on depthwise convs (5x5 at 200 channels)
    left = np.ascontiguousarray(x.reshape(len(x), groups, -1).transpose(1, 2, 0))
    right = left if y is x else np.ascontiguousarray(y.reshape(len(y), groups, -1).transpose(1, 2, 0))
    return left @ right.transpose(0, 2, 1)


def _gram_pair(x: np.ndarray, groups: int, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_grams(x, groups)`` and ``_grams(x, groups, y)``, x's group columns copied out once."""
    if groups == 1:
        return (x.T @ x)[None], (x.T @ y)[None]
    left, right = _group_columns(x, groups), _group_columns(y, groups)
    return left @ left.transpose(0, 2, 1), left @ right.transpose(0, 2, 1)


def _group_columns(x: np.ndarray, groups: int) -> np.ndarray:
    """[rows, in] as [groups, in / groups, rows] (x.T itself, a view, with one group)."""
    if groups == 1:
        return x.T[None]
    return np.ascontiguousarray(x.reshape(len(x), groups, -1).transpose(1, 2, 0))


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
    declaration (``_ops``); a weight whose declaration has no unfolding is left alone. A weight
    several nodes read the same way gets one layout over all of them.
    """
    index = GraphIndex.build(model.graph)
    out: dict[str, LayerLayout] = {}
    skipped: dict[str, str] = {}
    for layer in layers:
        users = [u for u in index.uses(layer.name) if not u.in_subgraph]
        found = [_use_layout(index, layer, u.node, u.index, len(users)) for u in users]
        reasons = [f for f in found if isinstance(f, str)]
        if not found:
            skipped[layer.name] = "read by no node"
        elif reasons:
            skipped[layer.name] = (
                reasons[0] if len(found) == 1 else f"shared by several nodes, one of them: {reasons[0]}"
            )
        else:
            merged = _merged([f for f in found if isinstance(f, LayerLayout)])
            if merged is None:
                skipped[layer.name] = "shared by several nodes that read it differently"
            else:
                out[layer.name] = merged
    return out, skipped


def _merged(found: list[LayerLayout]) -> LayerLayout | None:
    """One layout for every use of a shared weight: its rows are all of theirs (None if the uses
    unfold differently); a bias only if every use adds the same one."""
    first = found[0]
    if len(found) == 1:
        return first
    plain = [replace(f, input="", uses=(), bias=None, bias_is_mean=False) for f in found]
    if any(p != plain[0] for p in plain[1:]):
        return None
    same_bias = all(f.bias == first.bias and f.bias_is_mean == first.bias_is_mean for f in found)
    return replace(
        first,
        uses=tuple(u for f in found for u in f.all_uses),
        bias=first.bias if same_bias else None,
        bias_is_mean=first.bias_is_mean and same_bias,
    )


def _use_layout(
    index: GraphIndex, layer: PrunableWeight, node: onnx.NodeProto, slot: int, users: int
) -> LayerLayout | str:
    """The layout of ``layer`` as ``node.input[slot]`` (``users``: nodes reading it), or why recovery
    leaves it alone."""
    op_layout = layout_of(node)
    weight = None if op_layout is None else op_layout.slot(slot)
    if op_layout is None or weight is None or weight.unfold is None:
        return f"{node.op_type} input {slot} is not handled by recovery (no refit declared)"
    shape = layer.shape
    if weight.unfold in (Unfold.SEQUENCE, Unfold.STATE):  # R's data, initial_h, may be absent
        return _recurrent_layout(index, layer, node, weight.unfold, op_layout.slot(1) is weight, users)
    data = node.input[weight.data]
    if weight.unfold in (Unfold.LAST_AXIS, Unfold.TRANSPOSED):
        transpose = weight.out_axis % 2 == 1  # [in, out]: transposed to rows = outputs
        if len(shape) != 2:
            if slot != 1 or node.op_type != "MatMul":
                return f"a {len(shape)}-D {node.op_type} weight is not handled by recovery"
            # one matrix per batch: each multiplies its own slice of the input, a group of its own
            groups = math.prod(shape[:-2])
            return LayerLayout(layer.name, "MatMul", data, True, groups=groups, unfold=weight.unfold)
        if slot == 0:  # the weight is the first operand: its output channels are the output's rows
            bias = _own_bias(index, node, layer.channels, column=True, users=users)
            return LayerLayout(layer.name, node.op_type, data, transpose, bias=bias, unfold=weight.unfold)
        if node.op_type == "MatMul":
            bias = _following_bias(index, node, layer.channels, users=users)
            return LayerLayout(layer.name, "MatMul", data, transpose, bias=bias, unfold=weight.unfold)
        bias = _own_bias(index, node, layer.channels, users=users)
        mean = None if bias is not None else _following_mean(index, node, layer.channels)
        return LayerLayout(
            layer.name,
            node.op_type,
            data,
            transpose,
            bias=bias or mean,
            bias_is_mean=mean is not None,
            unfold=weight.unfold,
        )
    spatial = len(shape) - 2
    if spatial not in (1, 2, 3):
        return f"a {spatial}-D {node.op_type} is not handled by recovery (1-D, 2-D and 3-D are)"
    attrs = Attributes(node)
    auto_pad = attrs.get_str("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        return f"{node.op_type} with auto_pad {auto_pad!r} (not an ONNX value)"
    strides = attrs.get_ints("strides", [1] * spatial) or []
    pads = [0] * 2 * spatial  # VALID: none; SAME: computed from the input's size (``_explicit``)
    if auto_pad == "NOTSET":
        pads = attrs.get_ints("pads", pads) or []
    dilations = attrs.get_ints("dilations", [1] * spatial) or []
    same = {"same": [int(auto_pad == "SAME_UPPER")]} if auto_pad.startswith("SAME") else {}
    transposed = None
    if weight.unfold is Unfold.TRANSPOSED_CONV:
        if attrs.get_ints("output_shape"):
            return "ConvTranspose with output_shape"
        extra = attrs.get_ints("output_padding", [0] * spatial) or []
        reach = [d * (k - 1) for d, k in zip(dilations, shape[2:], strict=True)]
        if same:
            pads = _transposed_same_pads(strides, reach, extra, upper=bool(same["same"][0]))
            same = {}
        # the transposed conv is a conv with the flipped kernel on its input dilated by its strides
        transposed = {
            "strides": strides,
            "pads": [r - p for r, p in zip(reach, pads[:spatial], strict=True)]
            + [r - p + e for r, p, e in zip(reach, pads[spatial:], extra, strict=True)],
        }
        strides, pads = [1] * spatial, [0] * 2 * spatial
    conv = {"kernel": list(shape[2:]), "strides": strides, "pads": pads, "dilations": dilations, **same}
    if spatial == 1:  # a 1-D conv is a 2-D one on maps one high (its SAME pads: none on that axis)
        conv = {
            "kernel": [1, *conv["kernel"]],
            "strides": [1, *conv["strides"]],
            "pads": [0, conv["pads"][0], 0, conv["pads"][1]],
            "dilations": [1, *conv["dilations"]],
            **same,
        }
    bias = _own_bias(index, node, layer.channels, users=users)
    bias = bias or _following_bias(index, node, layer.channels, spatial=spatial, users=users)
    mean = None if bias is not None or users > 1 else _following_mean(index, node, layer.channels)
    return LayerLayout(
        layer.name,
        node.op_type,
        data,
        False,
        conv=conv,
        bias=bias or mean,
        bias_is_mean=mean is not None,
        groups=op_layout.groups,
        unfold=weight.unfold,
        transposed=transposed,
    )


def _transposed_same_pads(strides: list[int], reach: list[int], extra: list[int], *, upper: bool) -> list[int]:
    """A ConvTranspose's pads under auto_pad SAME_UPPER/SAME_LOWER (begins, then ends): its output is
    its input times its strides, which leaves a total of ``reach`` + 1 + output_padding - stride per
    axis, whatever the input's size; onnxruntime, as the ONNX spec, puts the odd one at the end
    for SAME_UPPER."""
    total = [max(r + 1 + e - s, 0) for r, e, s in zip(reach, extra, strides, strict=True)]
    small, large = [t // 2 for t in total], [t - t // 2 for t in total]
    return small + large if upper else large + small


def _explicit(conv: Mapping[str, list[int]], sizes: Sequence[int]) -> Mapping[str, list[int]]:
    """``conv`` with the pads of its auto_pad SAME_UPPER (``same`` [1]) or SAME_LOWER ([0]) for an
    input of spatial ``sizes``: in total per axis what makes ceil(size / stride) outputs, the odd
    one at the end (upper) or at the beginning (lower). Explicit pads are returned as they are."""
    if "same" not in conv:
        return conv
    begins, ends = [], []
    for m, s, d, k in zip(sizes, conv["strides"], conv["dilations"], conv["kernel"], strict=True):
        total = max(0, (-(-m // s) - 1) * s + d * (k - 1) + 1 - m)
        small, large = total // 2, total - total // 2
        begins.append(small if conv["same"][0] else large)
        ends.append(large if conv["same"][0] else small)
    return {"kernel": conv["kernel"], "strides": conv["strides"], "pads": begins + ends, "dilations": conv["dilations"]}


def _state_name(index: GraphIndex, node: onnx.NodeProto) -> str:
    """The name of a recurrent node's output Y: its own, or one calibration gives it."""
    if node.output and node.output[0]:
        return node.output[0]
    return f"{index.node_name(node)}#{index.position(node)}/Y"


def _recurrent_layout(
    index: GraphIndex, layer: PrunableWeight, node: onnx.NodeProto, unfold: Unfold, is_w: bool, users: int
) -> LayerLayout | str:
    attrs = Attributes(node)
    gates = RECURRENT_GATES[node.op_type]
    directions = 2 if attrs.get_str("direction", "forward") == "bidirectional" else 1
    hidden = layer.shape[1] // gates
    read = list(node.input) + [""] * (8 - len(node.input))
    reset = None
    if unfold is Unfold.STATE and node.op_type == "GRU" and not attrs.get_int("linear_before_reset", 0):
        names = (read[1], read[2], read[3])
        if not all(index.is_constant(n) for n in names):
            return "GRU without linear_before_reset and with computed W, R or B"
        if "activations" in attrs or "clip" in attrs:  # the reset gate is computed with the default sigmoid
            return "GRU without linear_before_reset and with custom activations or clip"
        reset = names
    recurrent = Recurrent(
        hidden=hidden,
        directions=directions,
        gates=gates,
        batch_major=bool(attrs.get_int("layout", 0)),
        state=_state_name(index, node),
        initial=read[5],
        lengths=read[4],
        reset=reset,
    )
    bias = read[3] if read[3] and index.is_constant(read[3]) and len(index.uses(read[3])) == users else None
    return LayerLayout(
        layer.name,
        node.op_type,
        read[0],
        False,
        bias=bias,
        # R: one block of columns per direction and gate (each its own previous state)
        groups=1 if is_w else directions * gates,
        unfold=unfold,
        uses=(LayerUse(read[0], recurrent),),
    )


def _own_bias(
    index: GraphIndex, node: onnx.NodeProto, width: int, *, column: bool = False, users: int = 1
) -> str | None:
    """The node's constant third input (Conv's B, Gemm's C) if it has one value per output
    (``column``: per row of the output, C [M, 1], for Gemm's first operand), read by no other
    node than the ``users`` that share the weight."""
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is None or not index.is_constant(bias) or _size(index, bias) != width:
        return None
    tensor = index.tensor(bias)
    if column and (tensor is None or list(tensor.dims) != [width, 1]):
        return None
    if users > 1 and len(index.uses(bias)) != users:
        return None
    return bias


def _size(index: GraphIndex, name: str) -> int:
    tensor = index.tensor(name)
    return -1 if tensor is None else math.prod(tensor.dims)


def _following_bias(
    index: GraphIndex, node: onnx.NodeProto, width: int, *, spatial: int = 0, users: int = 1
) -> str | None:
    """The per-output constant of the single Add after a MatMul, or after a Conv without a bias
    (``spatial`` its dims: how exporters write a bias, paddle2onnx for every squeeze-and-excitation
    conv once its Reshape to [1, C, 1, 1] is folded); with ``users`` nodes sharing the weight, read
    by the Adds after them only."""
    readers = index.uses(node.output[0])
    if len(readers) != 1 or readers[0].node.op_type != "Add":
        return None
    add = readers[0].node
    other = add.input[1 - readers[0].index]
    tensor = index.tensor(other)  # an initializer or a Constant node (paddle2onnx writes those)
    shapes = ([1, width, *[1] * spatial], [width, *[1] * spatial]) if spatial else ([width], [1, width])
    if tensor is None or list(tensor.dims) not in shapes or len(index.uses(other)) != users:
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
    per_row = (channels // groups) * math.prod(conv["kernel"])
    return max(MIN_POSITIONS, -(-ROWS_PER_INPUT * per_row // max(samples, 1)))


def _layer_rows(layout: LayerLayout, x: np.ndarray, samples: int) -> np.ndarray:
    """A layer's input as float32 rows of what one output reads: a conv's unfolded (large maps at
    ``positions_kept`` positions for ``samples`` calibration samples), others' last axis (a batched
    MatMul's matrices side by side, one group each)."""
    if layout.conv is None:
        if layout.unfold is Unfold.TRANSPOSED:  # Gemm with transA, or the weight is the first operand
            x = np.swapaxes(x, -1, -2)
        if layout.groups > 1:  # a batched MatMul: x [..., groups..., M, K] -> [rows, groups * K]
            x = _per_matrix(x, layout.groups).transpose(0, 2, 1, 3)
            return np.ascontiguousarray(x.reshape(-1, layout.groups * x.shape[-1]), dtype=np.float32)
        return np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)
    if layout.transposed is not None:
        x = _dilated(x, layout.transposed["strides"], layout.transposed["pads"])
    if x.ndim == 3:  # a 1-D conv's [N, C, L]
        x = x[:, :, None, :]
    keep = positions_kept(layout.conv, x.shape[1], layout.groups, samples)
    return np.ascontiguousarray(_unfold(x.astype(np.float32, copy=False), layout.conv, keep))


def _per_matrix(x: np.ndarray, groups: int) -> np.ndarray:
    """A batched MatMul's data [..., M, K] as [n, groups, M, K]: its trailing batch axes are the
    weight's (one matrix each), or it has none and every matrix reads all of it (broadcast)."""
    lead = math.prod(x.shape[-3:-2]) if x.ndim > 2 else 1
    for size in reversed(x.shape[:-3]):
        if lead >= groups:
            break
        lead *= size
    if lead == groups:
        return x.reshape(-1, groups, *x.shape[-2:])
    if math.prod(x.shape[:-2]) == 1 or x.ndim == 2:
        return np.broadcast_to(x.reshape(1, 1, *x.shape[-2:]), (1, groups, *x.shape[-2:]))
    # batch axes of their own before the weight's broadcast ones: [n, 1..., M, K]
    return np.broadcast_to(x.reshape(-1, 1, *x.shape[-2:]), (x.size // math.prod(x.shape[-2:]), groups, *x.shape[-2:]))


def _dilated(x: np.ndarray, strides: list[int], pads: list[int]) -> np.ndarray:
    """A transposed conv's input [N, C, spatial...] as the equivalent conv reads it: ``strides`` - 1
    zeros between neighbours, then padded by ``pads`` (begins, then ends; negative: cropped)."""
    spatial = len(strides)
    begins, ends = pads[:spatial], pads[spatial:]
    sizes = [s * (m - 1) + 1 for s, m in zip(strides, x.shape[2:], strict=True)]
    grown = (m + max(b, 0) + max(e, 0) for m, b, e in zip(sizes, begins, ends, strict=True))
    out = np.zeros((*x.shape[:2], *grown), dtype=np.float32)
    spread = (slice(max(b, 0), max(b, 0) + m, s) for b, m, s in zip(begins, sizes, strides, strict=True))
    out[(slice(None), slice(None), *spread)] = x
    crop = (slice(max(-b, 0), n - max(-e, 0)) for b, e, n in zip(begins, ends, out.shape[2:], strict=True))
    return out[(slice(None), slice(None), *crop)]


def _use_rows(
    layout: LayerLayout, use: LayerUse, values: Mapping[str, np.ndarray], real: int, samples: int
) -> np.ndarray:
    """The rows one use of a layer reads, from ``values`` (a calibration batch's tensors, of which
    the first ``real`` samples count; ``samples`` in the whole calibration)."""
    if use.recurrent is None:
        return _layer_rows(layout, np.asarray(values[use.input])[:real], samples)
    return _recurrent_rows(layout.unfold, use.input, use.recurrent, values, real, samples)


def _recurrent_rows(
    unfold: Unfold, data: str, rec: Recurrent, values: Mapping[str, np.ndarray], real: int, samples: int
) -> np.ndarray:
    """A recurrent node's rows, one per (step, sequence) within its length: x_t for W
    (``Unfold.SEQUENCE``), and for R (``Unfold.STATE``) h_{t-1} per direction and gate,
    [rows, directions * gates * hidden] (initial_h before the first step, a reverse direction's
    at its sequence's last step). Long sequences keep a seeded subset of their steps, as large
    feature maps keep a subset of positions: ``ROWS_PER_INPUT`` rows per input over all samples."""
    x = np.asarray(values[data], dtype=np.float32)
    if rec.batch_major:
        x = x.swapaxes(0, 1)
    x = x[:, :real]  # [seq, batch, in]
    seq, batch = x.shape[:2]
    lengths = np.full(batch, seq, dtype=np.int64)
    if rec.lengths:
        lengths = np.minimum(np.asarray(values[rec.lengths], dtype=np.int64).reshape(-1)[:real], seq)
    cells = np.flatnonzero(np.arange(seq)[:, None] < lengths[None, :])  # valid (step, sequence), step-major
    width = x.shape[2] if unfold is Unfold.SEQUENCE else rec.hidden
    quota = max(MIN_POSITIONS * batch, -(-ROWS_PER_INPUT * width * batch // max(samples, 1)))
    if len(cells) > quota:
        cells = np.sort(np.random.default_rng(len(cells)).choice(cells, quota, replace=False))
    x_rows = x.reshape(seq * batch, -1)[cells]
    if unfold is Unfold.SEQUENCE:
        return np.ascontiguousarray(x_rows)
    d, h = rec.directions, rec.hidden
    y = np.asarray(values[rec.state], dtype=np.float32)
    y = (y.transpose(1, 2, 0, 3) if rec.batch_major else y)[:, :, :real]  # [seq, directions, batch, hidden]
    initial = np.zeros((d, batch, h), dtype=np.float32)
    if rec.initial:
        given = np.asarray(values[rec.initial], dtype=np.float32)
        initial = (given.swapaxes(0, 1) if rec.batch_major else given)[:, :real]
    previous = np.zeros((d, seq, batch, h), dtype=np.float32)
    previous[0, 0] = initial[0]
    previous[0, 1:] = y[:-1, 0]
    if d == 2:  # the reverse direction starts at each sequence's last step
        previous[1, :-1] = y[1:, 1]
        ends = np.flatnonzero(lengths > 0)
        previous[1, lengths[ends] - 1, ends] = initial[1, ends]
    states = previous.reshape(d, seq * batch, h)[:, cells]  # [directions, rows, hidden]
    blocks = np.repeat(states[:, None], rec.gates, axis=1)  # [directions, gates, rows, hidden]
    if rec.reset is not None:  # a GRU's hidden gate reads r_t * h_{t-1} (gates z, r, h; B = Wb, Rb)
        w, r, b = (np.asarray(values[n], dtype=np.float32) for n in rec.reset)
        gate = slice(h, 2 * h)
        for k in range(d):
            pre = x_rows @ w[k, gate].T + states[k] @ r[k, gate].T + b[k, gate] + b[k, 4 * h : 5 * h]
            blocks[k, 2] *= 1.0 / (1.0 + np.exp(-pre))
    return np.ascontiguousarray(blocks.transpose(2, 0, 1, 3).reshape(len(cells), -1))


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


_ConvKey = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]
"""A conv's kernel, strides, dilations and begin pads (hashable)."""


@functools.lru_cache(maxsize=64)
def _window_pixels(
    samples: int, sizes: tuple[int, ...], out: tuple[int, ...], conv: _ConvKey, positions: int
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """The input pixels each of ``_positions``' windows reads, [samples, positions * window] flat
    indices into a map of ``sizes`` (a padding pixel as pixel 0), and per sample which of them are
    padding (to be zeroed)."""
    kernel, strides, dilations, pads = conv
    window = math.prod(kernel)
    at = np.unravel_index(_positions(samples, math.prod(out), positions), out)
    offsets = np.unravel_index(np.arange(window), kernel)
    inside = np.ones((samples, positions, window), dtype=bool)
    flat = np.zeros((samples, positions, window), dtype=np.int64)
    for axis in range(len(kernel)):
        where = at[axis][:, :, None] * strides[axis] + offsets[axis][None, None, :] * dilations[axis]
        where -= pads[axis]
        inside &= (where >= 0) & (where < sizes[axis])
        flat = flat * sizes[axis] + where
    pixels = np.where(inside, flat, 0).reshape(samples, positions * window)
    pixels.flags.writeable = False  # shared through the cache
    padding = tuple(np.flatnonzero(~sample) for sample in inside.reshape(samples, -1))
    return pixels, padding


def _unfold(x: np.ndarray, conv: Mapping[str, list[int]], positions: int | None = None) -> np.ndarray:
    """im2col: [N, C, spatial...] -> [N * positions, C * kernel size] rows, in the weight's (c, k...)
    order; with ``positions``, only that many output positions of each sample (``_positions``: the
    same ones for every array of the same shape, so a layer's current and original inputs stay
    paired row by row)."""
    conv = _explicit(conv, x.shape[2:])
    kernel, strides, dilations, pads = conv["kernel"], conv["strides"], conv["dilations"], conv["pads"]
    spatial = len(kernel)
    begins, ends = pads[:spatial], pads[spatial:]
    n, c = x.shape[:2]
    sizes = x.shape[2:]
    out = [
        (m + b + e - d * (k - 1) - 1) // s + 1
        for m, b, e, d, k, s in zip(sizes, begins, ends, dilations, kernel, strides, strict=True)
    ]
    total, window = math.prod(out), math.prod(kernel)
    if positions is not None and positions < total:
        key = (tuple(kernel), tuple(strides), tuple(dilations), tuple(begins))
        pixels, padding = _window_pixels(n, tuple(sizes), tuple(out), key, positions)
        # one sample at a time, in cache: the picked windows' pixels read straight from its map
        # ([c, area]; a padded copy of the whole map, to read 16 of its 12,544 positions, was most
        # of the time) with one [positions * window] index for all channels, then transposed into
        # its rows. (An index per channel and window, c times larger, took longer to build than
        # the gather it served.)
        gathered = np.empty((c, positions * window), dtype=x.dtype)
        rows = np.empty((n, positions, c, window), dtype=x.dtype)
        maps = x.reshape(n, c, math.prod(sizes))
        for i in range(n):
            np.take(maps[i], pixels[i], axis=1, out=gathered, mode="clip")  # in range: unbuffered
            if len(padding[i]):
                gathered[:, padding[i]] = 0
            rows[i] = gathered.reshape(c, positions, window).transpose(1, 0, 2)
        return rows.reshape(n * positions, c * window)
    padded = np.pad(x, ((0, 0), (0, 0), *zip(begins, ends, strict=True)))
    spans = tuple(d * (k - 1) + 1 for d, k in zip(dilations, kernel, strict=True))
    axes = tuple(range(2, 2 + spatial))
    windows = np.lib.stride_tricks.sliding_window_view(padded, spans, axis=axes)
    steps = (*(slice(None, None, s) for s in strides), *(slice(None, None, d) for d in dilations))
    windows = windows[(slice(None), slice(None), *steps)]
    order = (0, *axes, 1, *range(2 + spatial, 2 + 2 * spatial))  # [N, out..., C, kernel...]
    return windows.transpose(order).reshape(n * total, c * window)


STATS_THREADS = 4
"""Most threads a calibration pass computes its layers' statistics on: each holds one layer's rows
of the batch (an unfolded conv's can be 100+ MiB), so a many-core machine must not hold dozens."""


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
    probe, constants = _probe(model, found)
    wanted = sorted({n for la in found.values() for use in la.all_uses for n in use.reads()} - set(constants))
    probe_bytes = probe.SerializeToString()
    del probe
    session = make_session(probe_bytes, threads=threads, arena=True)
    step = fixed_batch or _fitting_step(session, wanted, evalset, rows, batch_size)
    batches = list(_batches(rows, step, fixed_batch))
    collect = functools.partial(
        _collect,
        wanted=wanted,
        constants=constants,
        layouts=found,
        full={n for n in found if full and n not in wide},
        samples=len(rows),
        threads=min(threads or os.cpu_count() or 1, STATS_THREADS),
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
        # a worker has one CPU: its statistics on one thread (the same bits on any count)
        each = functools.partial(_each_batch, functools.partial(collect, threads=1))
        for part in executor.map_model(runs_on, probe_bytes, each, shards):
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
    constants: Mapping[str, np.ndarray],
    layouts: Mapping[str, LayerLayout],
    full: set[str],
    samples: int,
    stats: dict[str, LayerStats] | None = None,
    stop: threading.Event | None = None,
    threads: int = 1,
) -> dict[str, LayerStats]:
    """Accumulate every layer's input statistics over ``batches`` (of ``samples`` calibration
    rows in all) into ``stats`` (new ones when None), and return them. Runs on a worker too.

    The layers' statistics of a batch are computed on ``threads`` threads, a layer at a time each
    (numpy's copies and its one-thread BLAS let go of the GIL): a layer's sums are made by one
    thread in batch order, as on one, so the bits do not depend on ``threads``."""
    stats = {name: LayerStats() for name in layouts} if stats is None else stats
    seconds: dict[str, float] = {}  # each layer's on the last batch: the longest start first

    def add(name: str, outputs: Mapping[str, np.ndarray], real: int) -> None:
        start = time.perf_counter()
        layout = layouts[name]
        for use in layout.all_uses:  # a shared weight: the rows of every node it feeds
            check_stop(stop)
            stats[name].add(_use_rows(layout, use, outputs, real, samples), name in full, layout.groups)
        seconds[name] = time.perf_counter() - start

    with contextlib.ExitStack() as stack:
        # a run holds it from start to end; here for a pass called on its own, once for all its
        # batches (setting the limit and restoring it took 1-4 ms each time)
        stack.enter_context(one_blas_thread())
        pool = stack.enter_context(ThreadPoolExecutor(threads)) if threads > 1 and len(layouts) > 1 else None
        for batch, real in batches:
            check_stop(stop)
            # feeds stays referenced while outputs do: a layer input that is a model input comes back as a
            # view of its feed (an OrtValue made from an array does not keep the array alive)
            feeds = {k: v[batch] for k, v in evalset.inputs.items()}
            outputs = dict(zip(wanted, _run_views(session, wanted, feeds), strict=True)) | dict(constants)
            each = functools.partial(add, outputs=outputs, real=real)
            if pool is None:
                for name in layouts:
                    each(name)
            else:  # longest first (on the first batch: largest input): no thread ends on a long one alone
                cost = seconds.copy() if seconds else {n: _input_size(la, outputs) for n, la in layouts.items()}
                order = sorted(layouts, key=lambda n: -cost[n])
                list(pool.map(each, order))
            del outputs, each  # before the next run: one batch's layer inputs held at a time, not two
    return stats


def _input_size(layout: LayerLayout, values: Mapping[str, np.ndarray]) -> float:
    """A guess at a layer's share of a batch's statistics before it is timed: the size of what its
    uses read."""
    return float(sum(np.size(values[n]) for use in layout.all_uses for n in use.reads() if n in values))


def _run_views(session: ort.InferenceSession, names: list[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """``run_session``'s outputs as views of onnxruntime's own buffers, not copies: calibration's
    probe returns every layer input of a batch (145 MiB a batch on ppocr_cls), and copying them
    took as long as the run (with the arena, the views' memory is reused by the next run)."""
    try:
        values = session.run_with_ort_values(names, {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()})
        return [np.asarray(v.numpy()) for v in values]
    except Exception:  # a feed or output numpy cannot view (strings, sequences): the copying run
        return run_session(session, names, feeds)


def _probe(model: onnx.ModelProto, found: Mapping[str, LayerLayout]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``model`` with every tensor the layers' rows read as an output (a recurrent node's Y named
    where the node leaves it unnamed), and those of them that are constants, as arrays."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    index = GraphIndex.build(probe.graph)
    reads = {n for la in found.values() for use in la.all_uses for n in use.reads()}
    constants = {n: np.asarray(index.value(n)) for n in reads if index.is_constant(n)}
    for node in probe.graph.node:
        if node.op_type not in RECURRENT_GATES or (node.output and node.output[0]):
            continue
        name = _state_name(index, node)
        if name in reads:
            if node.output:
                node.output[0] = name
            else:
                node.output.append(name)
    existing = {o.name for o in probe.graph.output}
    for name in sorted(reads - set(constants) - existing):
        probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    return probe, constants


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


def _row_shape(layout: LayerLayout, shape: tuple[int, ...]) -> tuple[int, int]:
    """Output rows of the layer (channels or features) and the width of the input row one reads."""
    if layout.transposed is not None:  # [in, out / groups, k...]
        return shape[1] * layout.groups, shape[0] // layout.groups * math.prod(shape[2:])
    if layout.conv is not None:
        return shape[0], math.prod(shape[1:])
    lead = math.prod(shape[:-2])
    return (lead * shape[-1], shape[-2]) if layout.transpose else (lead * shape[-2], shape[-1])


def _inputs_per_row(layout: LayerLayout, shape: tuple[int, ...]) -> int:
    """Width of the input row one output of the layer reads."""
    return _row_shape(layout, shape)[1]


def _outputs(layout: LayerLayout, shape: tuple[int, ...]) -> int:
    """Output rows of the layer (channels or features)."""
    return _row_shape(layout, shape)[0]


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


Unpruned = np.ndarray | tuple[np.ndarray, ...]
"""What a sequential fit reads of the unpruned model for one batch: a group's flattened input rows
X, or each of its layers' output rows Y = X W0^T ([groups, rows, out / groups])."""


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
        self.plain = [name for name, layout in calibration.layouts.items() if not layout.walkable]
        """Layers fit on the unpruned model's inputs, as ``lsq`` does (recurrent and shared weights)."""
        self._plain: dict[tuple[str, int], tuple[np.ndarray, np.ndarray | None]] = {}
        for name, layout in calibration.layouts.items():
            if not layout.walkable:
                continue
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
        self._originals: dict[_Group, list[Unpruned]] | None = None
        self._means: dict[_Group, np.ndarray] = {}
        """The mean of each group's cached unpruned input rows (made by its first drifted fit)."""
        self._cache: dict[tuple[object, ...], dict[str, np.ndarray]] = {}
        self._cached_bytes = 0
        self._starts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        """Each layer's latest drifted fit (float32 rows) and its mask: the next fit of the same
        mask starts there (the drift before it changed a little: a few steps, not thirty)."""
        self._start_bytes = 0

    def release(self) -> None:
        self.original.clear()
        self._originals = None
        self._means.clear()
        self._taps.clear()
        self.forget()

    def forget(self) -> None:
        """Drop the cached fits (the unpruned activations stay)."""
        self._cache.clear()
        self._plain.clear()
        self._cached_bytes = 0
        self._starts.clear()
        self._start_bytes = 0

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

    def _input(self, weights: Mapping[str, np.ndarray], name: str, batch: np.ndarray, real: int) -> np.ndarray:
        """The activation ``name`` of one calibration batch, with ``weights`` in the model, through a
        session of just what it depends on."""
        if name in self._graph_inputs:
            return np.asarray(self.evalset.inputs[name][batch])[:real]
        session, wanted = self._tap(name)
        feeds = {k: v[batch] for k, v in self.evalset.inputs.items() if k in wanted}
        feeds.update((k, v) for k, v in weights.items() if k in wanted)
        return np.asarray(run_session(session, [name], feeds)[0])[:real]

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
        """Keep, per group and batch, what the fits need of the unpruned model if all together stay
        under ``ORIGINAL_CACHE_BYTES`` (one pass); whether they are kept.

        A group keeps its flattened input rows X, or, where they take fewer bytes, each layer's
        unpruned output rows Y = X W0^T (one per output: a depthwise conv's 25-wide windows give
        one value): the fit's right-hand side W0 X^T X' is Y^T X'. The mean of X is kept either way.
        """
        if self._originals is None:
            kept: dict[_Group, list[Unpruned]] = {g: [] for g in self.groups}
            sums: dict[_Group, np.ndarray] = {}
            counts = dict.fromkeys(self.groups, 0)
            size = 0
            for arrays in self._inputs(self.original, self.tapped):
                by_name = dict(zip(self.tapped, arrays, strict=True))
                for g in self.groups:
                    x = self._flat(g.layers[0], by_name[g.input])
                    total = x.sum(axis=0, dtype=np.float64)
                    sums[g] = total if g not in sums else total + sums[g]
                    counts[g] += len(x)
                    outputs = tuple(self._unpruned_rows(name, x) for name in g.layers)
                    kept[g].append(outputs if sum(y.nbytes for y in outputs) < x.nbytes else x)
                    size += sum(a.nbytes for a in kept[g][-1]) if isinstance(kept[g][-1], tuple) else x.nbytes
                if size > ORIGINAL_CACHE_BYTES:
                    self._originals = {}
                    break
            else:
                self._originals = kept
                self._means = {g: total / counts[g] for g, total in sums.items()}
        return bool(self._originals)

    def _unpruned_rows(self, name: str, x: np.ndarray) -> np.ndarray:
        """Layer ``name``'s unpruned output rows on its flattened input ``x``: [groups, rows, out / groups]."""
        layout = self.calibration.layouts[name]
        w0 = layout.grouped(layout.rows(self.original[name].astype(np.float32)))
        per_group = x.reshape(len(x), layout.groups, -1).transpose(1, 0, 2)
        return np.ascontiguousarray(per_group @ w0.transpose(0, 2, 1))

    def _original(self, group: _Group) -> Iterator[Unpruned]:
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
        self._refit_plain(weights, masks, amounts)
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
                pairs: Iterable[tuple[np.ndarray, Unpruned]] = ()
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

    def _refit_plain(
        self, weights: dict[str, np.ndarray], masks: Mapping[str, np.ndarray], amounts: Mapping[str, int]
    ) -> None:
        """Refit the pruned layers a walk cannot feed (``plain``) as ``lsq`` does, and shift their
        biases (a recurrent node's W and R move the same B: the shifts add up)."""
        for name in self.plain:
            mask = masks.get(name)
            if mask is None:
                continue
            check_stop(self.stop)
            key = (name, amounts.get(name, 0))
            if key not in self._plain:
                self._plain[key] = self.calibration.recover(name, self.original[name], mask, reconstruct=True)
            weights[name], shift = self._plain[key]
            layout = self.calibration.layouts[name]
            if layout.bias is not None and shift is not None and layout.bias in weights:
                weights[layout.bias] = layout.shifted(weights[layout.bias], shift)

    def _fit(
        self,
        group: _Group,
        pairs: Iterable[tuple[np.ndarray, Unpruned]],
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
        # the unpruned inputs' mean is kept with them (``_cache_originals``), or summed here
        known = self._means.get(group) if self._originals else None
        count, gram, mean, mean_now = 0, None, known, None
        linear: dict[str, np.ndarray] = {}
        """Per layer, sum over rows of its unpruned output times the pruned input: W0 X^T X'."""
        cross = None
        """X'^T X, when the unpruned rows are X (``linear`` is then made from it after the loop)."""
        for now, before in pairs:
            check_stop(self.stop)
            count += len(now)
            if isinstance(before, tuple):  # each layer's unpruned output rows Y: Y^T X'
                left = _group_columns(now, groups)
                batch_gram = ((now.T @ now)[None] if groups == 1 else left @ left.transpose(0, 2, 1)).astype(np.float64)
                for name, y in zip(group.layers, before, strict=True):
                    product = (left @ y).transpose(0, 2, 1).astype(np.float64)
                    linear[name] = product if name not in linear else linear[name] + product
            else:
                batch_gram, batch_cross = (g.astype(np.float64) for g in _gram_pair(now, groups, before))
                cross = batch_cross if cross is None else cross + batch_cross
                if known is None:
                    mean = before.sum(axis=0, dtype=np.float64) + (0 if mean is None else mean)
            gram = batch_gram if gram is None else gram + batch_gram
            mean_now = now.sum(axis=0, dtype=np.float64) + (0 if mean_now is None else mean_now)
        assert gram is not None and mean is not None and mean_now is not None
        gram, mean_now = gram / count, mean_now / count
        if known is None:
            mean = mean / count
        damped = _damped(gram)
        if cross is not None:
            cross = cross / count + (damped - gram)  # the same damping pulls towards the original weights
        for name in group.layers:
            check_stop(self.stop)
            layout, original = calibration.layouts[name], self.original[name]
            w0 = layout.rows(original.astype(np.float64))
            mask = masks.get(name)
            pruned = np.zeros(w0.shape, dtype=bool) if mask is None else layout.rows(mask.reshape(original.shape))
            start = np.where(pruned, 0.0, w0)
            prior = self._starts.get(name)
            if prior is not None and np.array_equal(prior[1], pruned):
                start = prior[0].astype(np.float64)
            if cross is not None:
                right = layout.grouped(w0) @ cross.transpose(0, 2, 1)
            else:
                right = linear[name] / count + layout.grouped(w0) @ (damped - gram).transpose(0, 2, 1)
            rows = _fit_rows(layout, start, right, pruned, damped, stop=self.stop)
            self._keep_start(name, rows, pruned)
            out[name] = layout.unrows(rows, original.shape).astype(original.dtype)
            if layout.bias is not None:
                self._shift(out, name, _mean_output(layout, w0, mean) - _mean_output(layout, rows, mean_now))
        if not all(np.isfinite(a).all() for a in out.values()):  # overflowed activations: keep the masking
            return {}
        return out

    def _keep_start(self, name: str, rows: np.ndarray, pruned: np.ndarray) -> None:
        """Keep a drifted fit as the start of the layer's next one, within ``FIT_CACHE_BYTES``."""
        old = self._starts.pop(name, None)
        if old is not None:
            self._start_bytes -= old[0].nbytes + old[1].nbytes
        if not np.isfinite(rows).all():
            return
        kept = (rows.astype(np.float32), pruned.copy())
        size = kept[0].nbytes + kept[1].nbytes
        if self._start_bytes + size <= FIT_CACHE_BYTES:
            self._starts[name] = kept
            self._start_bytes += size

    def _shift(self, out: dict[str, np.ndarray], name: str, shift: np.ndarray | None) -> None:
        bias = self.calibration.layouts[name].bias
        if bias is None or shift is None:
            return
        out[bias] = self.calibration.layouts[name].shifted(self.original[bias], shift)


STATE_BYTES = 1 << 30
"""Activations a sequential refit keeps at its checkpoint cut (pruned and unpruned model
together, every calibration batch); a cut whose tensors pass this is not kept, and the groups
after it are computed from the last cut kept."""


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
    """The pruned model's activations at one cut (the checkpoint), per calibration batch, and the
    unpruned model's (unless its flattened group inputs are cached): one list for both while no
    pruned layer has run.

    A group's input is computed batch by batch from the checkpoint through the stretches up to
    its cut, and the checkpoint moves to that cut when every batch's tensors there fit in
    ``STATE_BYTES`` (pruned and unpruned together); where they do not (wide early feature maps),
    it stays, and the next groups are computed from it again: only the stretches since the
    checkpoint are rerun, not the model from its inputs for every group.
    """

    def __init__(self, refit: SequentialRefit, weights: Mapping[str, np.ndarray], pruned_at: int | None, cached: bool):
        self.refit, self.weights, self.cached = refit, weights, cached
        self.pruned_at = len(refit.fed.graph.node) if pruned_at is None else pruned_at
        self.batches = list(_batches(refit.calibration.rows, refit.step, refit.fixed))
        self.real = [real for _, real in self.batches]
        self.now: list[dict[str, np.ndarray]] = [
            {k: v[batch] for k, v in refit.evalset.inputs.items()} for batch, _ in self.batches
        ]
        self.before: list[dict[str, np.ndarray]] = [] if cached else self.now
        self.at = 0
        self.broken = False
        """A stretch did not load or run: the remaining groups come from the model inputs."""

    def inputs(self, group: _Group) -> Iterator[tuple[np.ndarray, Unpruned]] | None:
        """The group's flattened input per batch, pruned and unpruned; None if it cannot be
        walked to (an input no node computes, or a stretch on the way that does not load or run)."""
        segments = self.refit.segments
        cut = segments.cut.get(group, -1)
        if self.broken or group not in segments.walkable or cut < self.at:
            return None
        return self._stream(group, cut)

    def _stream(self, group: _Group, cut: int) -> Iterator[tuple[np.ndarray, Unpruned]]:
        refit = self.refit
        bounds = sorted({c for c in refit.segments.cut.values() if self.at < c < cut} | ({cut} - {self.at}))
        flat, name, first = refit._flat, group.input, group.layers[0]
        shared = self.before is self.now
        kept_now: list[dict[str, np.ndarray]] | None = []
        kept_before: list[dict[str, np.ndarray]] = []
        size = 0
        for i, (batch, real) in enumerate(self.batches):
            check_stop(refit.stop)
            now: dict[str, np.ndarray] | None = self.now[i]
            before: dict[str, np.ndarray] | None = now if shared else (self.before[i] if self.before else None)
            start = self.at
            for end in bounds if not self.broken else ():
                assert now is not None
                moved = self._run(start, end, now, self.weights)
                if before is None:
                    pass
                elif before is now and end <= self.pruned_at:
                    before = moved  # nothing pruned has run yet: the same activations
                else:
                    before = self._run(start, end, before, refit.original)
                now, start = moved, end
                if now is None or (before is None and not self.cached):
                    self.broken = True
                    break
            if self.broken:  # this batch, and the rest, from the model inputs
                kept_now = None
                x_now = refit._input(self.weights, name, batch, real)
                x_before = None if self.cached else refit._input(refit.original, name, batch, real)
            else:
                assert now is not None
                x_now = now[name][:real]
                x_before = None if before is None else before[name][:real]
                if kept_now is not None:  # an array both models carry (a model input) counts once
                    arrays = {id(a): a for a in (*now.values(), *(() if before is None else before.values()))}
                    size += sum(a.nbytes for a in arrays.values())
                    if size > STATE_BYTES:
                        kept_now, kept_before = None, []
                    else:
                        kept_now.append(now)
                        if before is not None:
                            kept_before.append(before)
            if x_before is None:
                assert refit._originals
                yield flat(first, x_now), refit._originals[group][i]
            else:
                yield flat(first, x_now), flat(first, x_before)
        if kept_now is not None and cut > self.at:  # the checkpoint moves on
            together = not self.cached and all(b is n for b, n in zip(kept_before, kept_now, strict=True))
            self.now, self.before = kept_now, (kept_now if together else kept_before)
            self.at = cut

    def _run(
        self, start: int, end: int, state: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray] | None:
        """One batch's ``state`` (at cut ``start``) carried to cut ``end``; None if that part of
        the model does not load or run on its own, or a tensor on the way is not an array (a
        sequence, a map)."""
        check_stop(self.refit.stop)
        segments = self.refit.segments
        stretch = segments.stretch(start, end, state)
        if stretch is None:
            return None
        session, inputs, outputs = stretch
        live = segments.live(end)
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
        return moved
