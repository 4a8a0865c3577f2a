"""Options of a pruning run: frozen, keyword-only, validated on construction."""

from __future__ import annotations

import copy
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ._errors import InvalidConfigError
from ._search import MAX_SEARCH_WIDTH

__all__ = [
    "AcceptanceRule",
    "Allocation",
    "Criterion",
    "CustomMetric",
    "Executor",
    "MetricKind",
    "Mode",
    "Objective",
    "PruneOptions",
    "Tolerance",
]

DEFAULT_TOLERANCE = "0.01"
DEFAULT_MAX_EVALUATIONS = 12
DEFAULT_BATCH_SIZE = 64
DEFAULT_HOLDOUT_FRACTION = 0.2
DEFAULT_LAYER_CAP = 0.98
DEFAULT_RESOLUTION = 0.01
DEFAULT_TOP_K = 5
DEFAULT_CALIBRATION_SAMPLES = 256
DEFAULT_THRESHOLD = 0.5
MAX_SAMPLE_AXIS = 16
DEFAULT_CONFIDENCE = 0.9
MAX_BATCH_SIZE = 65536


class Mode(enum.Enum):
    """How weights are pruned."""

    ZERO = "zero"
    """Set weights to zero; tensor shapes stay the same."""
    REMOVE = "remove"
    """Remove whole channels, neurons and their coupled slices: tensors shrink."""
    NM = "nm"
    """N:M semi-structured zeroing (e.g. 2:4) of whole layers, for sparse tensor cores."""


class Criterion(enum.Enum):
    """How weights are scored; the lowest scores are pruned first."""

    AUTO = "auto"
    """Zero and remove modes with recovery: ``activation``, scored from the calibration that recovery runs
    anyway, and in zero mode with allocation ``auto`` ``magnitude`` instead where the allocation probes find
    it clearly better (``PruneOptions.criterion_choices``); otherwise (recovery ``none``, N:M mode)
    ``magnitude``: ``PruneOptions.effective_criterion``. The report and the plan name the one that ran."""
    MAGNITUDE = "magnitude"
    """|w| of each element."""
    L1 = "l1"
    """L1 norm of each output channel; whole channels are zeroed."""
    L2 = "l2"
    """L2 norm of each output channel; whole channels are zeroed."""
    ACTIVATION = "activation"
    """|w| times the L2 norm of its input over calibration data (Wanda; summed per channel in remove mode)."""
    GRADIENT = "gradient"
    """First-order Taylor importance: |w * dL/dw| summed over the calibration samples, L the
    metric's loss (or the output deviation; docs/criteria.md). Zero and N:M modes; needs the
    ``gradient`` extra (torch and onnx2torch)."""
    FISHER = "fisher"
    """Its squared variant (empirical Fisher): (w * dL/dw)^2 summed over the calibration samples."""


GRADIENT_CRITERIA = (Criterion.GRADIENT, Criterion.FISHER)
"""Criteria scored from gradients of the converted model (``pruner._gradient``)."""


class Recovery(enum.Enum):
    """What is done after pruning to win accuracy back, from calibration data."""

    NONE = "none"
    BIAS = "bias"
    """Shift each pruned layer's bias so its mean output on calibration data is unchanged (a layer
    without a bias: the running mean of the BatchNormalization right after it)."""
    LSQ = "lsq"
    """Refit the kept weights by least squares (the objective SparseGPT's OBS updates approximate,
    solved by conjugate gradients), then correct the bias."""
    AUTO = "auto"
    """The default: ``LSQ`` for every layer whose fit is cheap (output rows x inputs^2 up to
    ``AUTO_LSQ_COST``, e.g. convs up to 128 channels, 1x1 convs up to ~1000 inputs); the wider
    ones by one OBS pass and a few conjugate-gradient steps (named in the report's notes). Each
    layer is fitted on the unpruned model's inputs: ``SEQUENTIAL`` keeps fewer weights but costs
    about 4 calibration passes per candidate, past the 5x-evaluations budget on the zoo's models
    (docs/recovery.md), so it is asked for explicitly."""
    SEQUENTIAL = "sequential"
    """LSQ layer by layer in graph order, each fitted on the inputs the already pruned model
    produces (errors no longer add up); dense layers after pruned ones are refit too. Each
    candidate walks the calibration samples through the model once. In remove mode every layer after a removal is
    refit that way at full shape (removed rows and columns held at zero), then sliced."""


REFITTING = (Recovery.AUTO, Recovery.LSQ, Recovery.SEQUENTIAL)
"""Recoveries that refit kept weights by least squares (and need the input Gram matrices)."""
AUTO_LSQ_COST = 1 << 28
"""``Recovery.AUTO`` fits a layer by least squares when output rows x inputs^2 stays below this
(one solver step's multiply-adds: ~5 ms here, the fit about 30 steps per candidate)."""


class AcceptanceRule(enum.Enum):
    """How the held-out split decides whether a search candidate is returned (docs/acceptance.md)."""

    EXACT = "exact"
    """The measured held-out drop is within the tolerance (on 50 samples one sample is 2 points)."""
    INTERVAL = "interval"
    """The held-out split does not show, at the confidence level, that the drop exceeds the tolerance:
    a candidate within the tolerance is refused with probability <= (1 - confidence) / 2, however
    small the split, so a small eval set cannot throttle pruning (the search split's exact test still applies)."""
    BOUND = "bound"
    """The upper end of the held-out confidence interval is within the tolerance: with probability >=
    confidence the drop on new data is within it. Needs a large held-out split (the report warns)."""


class Allocation(enum.Enum):
    """How a global sparsity level is shared between layers."""

    GLOBAL = "global"
    """One threshold on the raw scores across all layers."""
    NORMALIZED = "normalized"
    """One threshold on scores divided by their layer's RMS score."""
    LAMP = "lamp"
    """One threshold on layer-adaptive magnitude scores (Lee et al., 2021)."""
    UNIFORM = "uniform"
    """The same sparsity in every layer."""
    SENSITIVITY = "sensitivity"
    """Per-layer sensitivity profiles (output deviation with only that layer pruned at a few
    levels) decide: sparsity goes where it costs least per weight."""
    AUTO = "auto"
    """The default: ``NORMALIZED``, ``LAMP`` or ``UNIFORM``, whichever gives the lowest label-free
    output deviation at two pilot levels, chosen before the search in zero mode
    (``docs/search.md``; six probes, the report's notes name the one chosen). Remove mode uses
    ``NORMALIZED``."""


class Executor(enum.Enum):
    """Where a run's expensive parts (candidate evaluation, calibration, probes) run."""

    LOCAL = "local"
    """In this process, on onnxruntime's own threads (the default; needs nothing more)."""
    RAY = "ray"
    """Sharded over the workers of a Ray cluster (the optional ``ray`` extra): the same results."""


class Objective(enum.Enum):
    """What 'smallest' means in the search."""

    PARAMS = "params"
    """Nonzero prunable parameters (the default in zero mode)."""
    BYTES = "bytes"
    """Bytes of the pruned weights (remove mode; its default)."""
    LATENCY = "latency"
    """onnxruntime CPU latency of one batch, median of repeated runs (remove mode)."""


class MetricKind(enum.Enum):
    """Quality measure of a candidate; docs/metrics.md says which fits which output."""

    ACCURACY = "accuracy"
    """Top-1 accuracy over the last axis against integer labels (per position for sequences)."""
    TOPK = "topk"
    """Top-k accuracy against integer labels (k = ``top_k``)."""
    MSE = "mse"
    """Mean squared error against labels (lower is better)."""
    MAE = "mae"
    """Mean absolute error against labels (lower is better)."""
    AGREEMENT = "agreement"
    """Top-1 agreement with the unpruned model (per position for sequences); needs no labels."""
    COSINE = "cosine"
    """Cosine similarity to the unpruned model's output; needs no labels."""
    DICE = "dice"
    """Dice of the output thresholded at ``threshold`` against the labels' nonzero entries, or
    against the unpruned model's thresholded output without labels; two empty maps score 1."""
    IOU = "iou"
    """Intersection over union, thresholded like ``DICE``."""
    SEQUENCE_MATCH = "sequence_match"
    """Share of samples whose decoded sequence (argmax ids, masked positions and ``pad_id``
    dropped, CTC-collapsed with ``ctc_blank``) is identical to the unpruned model's."""
    SEQUENCE_SIMILARITY = "sequence_similarity"
    """1 - edit distance / length of the decoded sequences (per letter), against the unpruned model's."""
    KL = "kl"
    """KL divergence from the unpruned model's class distribution (softmax of logits, or the
    probabilities themselves) to the candidate's, in nats; lower is better."""
    COLUMN_MAE = "column_mae"
    """Mean absolute difference of ``output[..., column]`` from the unpruned model's; lower is better."""
    RANK_CORRELATION = "rank_correlation"
    """Spearman correlation of one score per sample (``output[..., column]``) with the labels, or with
    the unpruned model's scores without labels, over the whole split (no early stopping)."""

    @property
    def higher_is_better(self) -> bool:
        return self not in (MetricKind.MSE, MetricKind.MAE, MetricKind.KL, MetricKind.COLUMN_MAE)

    @property
    def needs_labels(self) -> bool:
        return self in (MetricKind.ACCURACY, MetricKind.TOPK, MetricKind.MSE, MetricKind.MAE)


SEQUENCE_METRICS = (MetricKind.SEQUENCE_MATCH, MetricKind.SEQUENCE_SIMILARITY)
METRIC_OPTIONS: dict[str, tuple[MetricKind, ...]] = {
    "column": (
        MetricKind.MSE,
        MetricKind.MAE,
        MetricKind.COLUMN_MAE,
        MetricKind.RANK_CORRELATION,
        MetricKind.DICE,
        MetricKind.IOU,
    ),
    "pad_id": (MetricKind.ACCURACY, MetricKind.AGREEMENT, *SEQUENCE_METRICS),
    "sequence_mask": (MetricKind.ACCURACY, MetricKind.AGREEMENT, *SEQUENCE_METRICS),
    "ctc_blank": SEQUENCE_METRICS,
}
"""The metrics that read each metric option; setting it for another metric is an error."""

MetricFunction = Callable[[np.ndarray, "np.ndarray | None", np.ndarray], Any]
"""``fn(outputs, labels, reference) -> scores``: see :class:`CustomMetric`."""


@dataclass(frozen=True, kw_only=True)
class CustomMetric:
    """A metric of your own: one score per sample, whose mean over a split is the metric.

    ``fn(outputs, labels, reference)`` gets a chunk of samples, sample axis first: the
    candidate's output (the model's dtype), the labels' rows (None without labels) and the
    unpruned model's output for the same samples, and returns an array of shape ``[n]``
    with one finite score per sample.

    Args:
        name: recorded in the report (not the name of a built-in metric).
        fn: the scoring function.
        higher_is_better: False for errors and distances.
        best: the best score a single sample can get (1.0 for a share, 0.0 for an error);
            with it a candidate that can no longer pass stops early. None: no early stop.
        needs_labels: refuse eval sets without labels.
    """

    name: str
    fn: MetricFunction
    higher_is_better: bool = True
    best: float | None = None
    needs_labels: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidConfigError(f"a custom metric needs a non-empty name, got {self.name!r}")
        if self.name in {m.value for m in MetricKind}:
            raise InvalidConfigError(
                f"custom metric name {self.name!r} is a built-in metric's; give yours another name"
            )
        if not callable(self.fn):
            raise InvalidConfigError(f"custom metric {self.name!r}: fn must be callable, got {self.fn!r}")
        for flag in ("higher_is_better", "needs_labels"):
            if not isinstance(getattr(self, flag), bool):
                raise InvalidConfigError(f"custom metric {self.name!r}: {flag} must be True or False")
        if self.best is not None and not _finite(self.best):
            raise InvalidConfigError(f"custom metric {self.name!r}: best must be a finite number or None")


@dataclass(frozen=True)
class Tolerance:
    """Allowed loss of the metric against the unpruned baseline.

    ``Tolerance(0.01)`` allows one metric point (0.01 absolute);
    ``Tolerance(0.01, relative=True)`` allows 1% of the baseline value.
    """

    value: float
    relative: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise InvalidConfigError(f"tolerance must be a finite number, got {self.value!r}")
        if self.value < 0:
            raise InvalidConfigError(f"tolerance must be >= 0, got {self.value}")
        if self.relative and self.value > 1:
            raise InvalidConfigError(f"relative tolerance must be <= 100%, got {self.value * 100:g}%")

    @classmethod
    def parse(cls, text: str) -> Tolerance:
        """Parse ``"0.01"`` (absolute) or ``"1%"`` (relative)."""
        raw = text.strip()
        relative = raw.endswith("%")
        number = raw[:-1].strip() if relative else raw
        try:
            value = float(number)
        except ValueError:
            raise InvalidConfigError(
                f"tolerance {text!r} is not a number; use e.g. 0.01 (absolute) or 1% (relative)"
            ) from None
        return cls(value / 100 if relative else value, relative=relative)

    def allowed_loss(self, baseline: float) -> float:
        """The largest metric loss that still passes, in metric units."""
        return self.value * abs(baseline) if self.relative else self.value

    def __str__(self) -> str:
        return f"{self.value * 100:g}%" if self.relative else f"{self.value:g}"


@dataclass(frozen=True, kw_only=True)
class PruneOptions:
    """Everything that steers a pruning run. All fields have defaults."""

    mode: Mode = Mode.ZERO
    criterion: Criterion = Criterion.AUTO
    allocation: Allocation = Allocation.AUTO
    metric: MetricKind | CustomMetric = MetricKind.ACCURACY
    """A built-in metric, or a :class:`CustomMetric` (see ``load_metric`` and ``plugin_metric``)."""
    top_k: int = DEFAULT_TOP_K
    threshold: float = DEFAULT_THRESHOLD
    """``dice`` and ``iou``: an output value above it is foreground (0.5 for probabilities; 0 for logits)."""
    column: int | None = None
    """Metrics of one score (``column_mae``, ``rank_correlation``, ``mse``, ``mae``, ``dice``, ``iou``)
    read ``output[..., column]``; None: the whole output."""
    pad_id: int | None = None
    """Sequence metrics: positions whose target id (label, or the unpruned model's prediction) is
    this id are ignored; decoded sequences drop it."""
    sequence_mask: str | None = None
    """Sequence metrics: an eval set array of shape [samples, positions] (e.g. an attention mask
    input); positions where it is 0 are ignored."""
    ctc_blank: int | None = None
    """Sequence metrics: decode CTC-style, collapsing repeated ids and dropping this blank id."""
    output_sample_axis: int = 0
    """Axis of the measured output that holds the samples (1 for time-major [time, batch, classes])."""
    input_sample_axes: dict[str, int] | None = None
    """Model inputs whose sample axis is not the first (e.g. {"h0": 1} for recurrent state
    [layers, batch, hidden]). The eval set still stores every array samples first."""
    output: str | None = None
    """Model output the metric reads; the first output when None."""
    tolerance: Tolerance = Tolerance(float(DEFAULT_TOLERANCE))
    objective: Objective | None = None
    """What smallest means; None: the mode's default (params in zero mode, bytes in remove mode)."""
    max_evaluations: int = DEFAULT_MAX_EVALUATIONS
    """Candidate evaluations on the search split (the baseline and the confirmation are extra; a held-out
    miss adds at most 6 fallback evaluations, counted in the report)."""
    max_seconds: float | None = None
    """Wall-clock budget of the search; the best model found so far is returned."""
    seed: int = 0
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION
    batch_size: int = DEFAULT_BATCH_SIZE
    threads: int = 0
    """onnxruntime intra-op threads; 0 lets onnxruntime choose."""
    layer_cap: float = DEFAULT_LAYER_CAP
    """No layer loses more than this share of its weights."""
    resolution: float = DEFAULT_RESOLUTION
    """Step of the global sparsity bisection."""
    search_width: int = 1
    """Levels judged in each round of the global-level bisection: 1 bisects; k > 1 judges the k
    levels that cut the interval into k + 1 equal parts, at once where the executor has the workers
    (a k-section, see ``docs/search.md``). Every one counts against ``max_evaluations``."""
    include: tuple[str, ...] = ()
    """Globs on node or initializer names; when set, only matching layers are pruned."""
    exclude: tuple[str, ...] = ()
    """Globs on node or initializer names whose layers are never pruned."""
    sparse_initializers: bool = False
    """Store zeroed weights as ONNX sparse_initializer where that makes the file smaller."""
    nm: tuple[int, int] = (2, 4)
    """N:M mode: keep N of every M weights along the reduction axis."""
    sensitivity: dict[str, list[list[float]]] | None = None
    """A profile from an earlier report (``report.sensitivity``) to reuse instead of measuring it."""
    target_sparsity: float | None = None
    """Skip the search: evaluate only this global level (share of prunable params zeroed, or removed
    in remove mode) and return it if it passes, the original otherwise."""
    recover: Recovery = Recovery.AUTO
    """Recovery from calibration activations (search split only): in remove mode the layers that
    consumed removed channels are refit."""
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES
    """Samples of the search split whose activations calibrate the activation criterion and recovery."""
    acceptance: AcceptanceRule = AcceptanceRule.EXACT
    """The held-out acceptance rule; every rule reports the drop's confidence interval."""
    confidence: float = DEFAULT_CONFIDENCE
    """Level of the held-out drop's two-sided confidence interval (alpha = 1 - confidence)."""
    executor: Executor = Executor.LOCAL
    """Where evaluation, calibration and probes run (see ``docs/ray.md``)."""
    ray_address: str | None = None
    """``executor`` ray: the cluster's address (``host:port`` or ``ray://...``); None starts a local one."""
    executor_workers: int = 0
    """``executor`` ray: workers (one CPU and one onnxruntime thread each); 0: one per CPU of the cluster."""
    channel_multiple: int | None = None
    """Remove mode: keep every layer's channel count a multiple of this. None: 8 for layers whose
    count is a multiple of 8 (onnxruntime's fast blocked conv kernels need it: odd counts can make
    a smaller model slower), 1 for the others; with the latency objective, the kernels' block
    size on this CPU (16 with AVX-512) where the count is a multiple of it."""

    def __post_init__(self) -> None:
        for name, enum_type in (
            ("mode", Mode),
            ("criterion", Criterion),
            ("allocation", Allocation),
            ("objective", Objective),
            ("recover", Recovery),
            ("acceptance", AcceptanceRule),
            ("executor", Executor),
        ):
            if name == "objective" and self.objective is None:
                continue
            if not isinstance(getattr(self, name), enum_type):
                choices = ", ".join(m.value for m in enum_type)
                raise InvalidConfigError(f"{name} must be one of: {choices}; got {getattr(self, name)!r}")
        self._check_metric_options()
        if not isinstance(self.tolerance, Tolerance):
            raise InvalidConfigError("tolerance must be a Tolerance; use Tolerance.parse('0.01')")
        _check_int("max_evaluations", self.max_evaluations, 1, 10_000)
        _check_int("calibration_samples", self.calibration_samples, 1, 1_000_000)
        if (
            not isinstance(self.nm, tuple)
            or len(self.nm) != 2
            or not all(isinstance(v, int) for v in self.nm)
            or not 1 <= self.nm[0] < self.nm[1] <= 64
        ):
            raise InvalidConfigError(f"nm must be (N, M) with 1 <= N < M <= 64, got {self.nm!r}")
        if self.mode is Mode.NM and self.criterion in (Criterion.L1, Criterion.L2):
            raise InvalidConfigError("N:M mode scores single weights: use criterion magnitude or activation")
        if self.mode is Mode.REMOVE and self.criterion in GRADIENT_CRITERIA:
            raise InvalidConfigError(
                f"criterion {self.criterion.value} scores single weights (zero and N:M modes); "
                "remove mode: use criterion l1, l2, magnitude or activation"
            )
        if self.sensitivity is not None and not (
            isinstance(self.sensitivity, dict)
            and all(
                isinstance(k, str)
                and isinstance(v, list)
                and all(isinstance(p, list) and len(p) == 2 and all(_finite(x) for x in p) for p in v)
                for k, v in self.sensitivity.items()
            )
        ):
            raise InvalidConfigError("sensitivity must map layer names to [[sparsity, deviation], ...] lists")
        if self.target_sparsity is not None:
            _check_float("target_sparsity", self.target_sparsity, 0.0, 1.0, low_open=True, high_open=True)
        if self.channel_multiple is not None:
            _check_int("channel_multiple", self.channel_multiple, 1, 1024)
        if self.mode is not Mode.REMOVE and self.objective in (Objective.BYTES, Objective.LATENCY):
            raise InvalidConfigError(
                f"objective {self.objective.value} needs mode remove: zeroed weights take as many bytes and as long"
            )
        _check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _check_int("top_k", self.top_k, 1, 1_000_000)
        _check_int("threads", self.threads, 0, 1024)
        _check_int("executor_workers", self.executor_workers, 0, 100_000)
        if self.executor is not Executor.RAY and (self.ray_address is not None or self.executor_workers):
            raise InvalidConfigError("ray_address and executor_workers need executor ray")
        if self.ray_address is not None and (not isinstance(self.ray_address, str) or not self.ray_address.strip()):
            raise InvalidConfigError(f"ray_address must be a non-empty address, got {self.ray_address!r}")
        _check_int("seed", self.seed, 0, 2**32 - 1)
        if self.max_seconds is not None:
            _check_float("max_seconds", self.max_seconds, 0.0, 30 * 24 * 3600.0, low_open=True)
        _check_float("holdout_fraction", self.holdout_fraction, 0.0, 0.9)
        _check_float("confidence", self.confidence, 0.5, 1.0, high_open=True)
        _check_float("layer_cap", self.layer_cap, 0.0, 1.0, low_open=True, high_open=True)
        _check_float("resolution", self.resolution, 0.001, 0.25)
        _check_int("search_width", self.search_width, 1, MAX_SEARCH_WIDTH)
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
                raise InvalidConfigError(f"{name} must be a tuple of non-empty glob strings")
        if self.output is not None and (not isinstance(self.output, str) or not self.output):
            raise InvalidConfigError("output must be a non-empty output name or None")

    def _check_metric_options(self) -> None:
        if not isinstance(self.metric, (MetricKind, CustomMetric)):
            choices = ", ".join(m.value for m in MetricKind)
            raise InvalidConfigError(f"metric must be one of: {choices} (or a CustomMetric); got {self.metric!r}")
        if not _finite(self.threshold):
            raise InvalidConfigError(f"threshold must be a finite number, got {self.threshold!r}")
        if self.column is not None and (isinstance(self.column, bool) or not isinstance(self.column, int)):
            raise InvalidConfigError(
                f"column must be an integer (an index on the output's last axis), got {self.column!r}"
            )
        for name in ("pad_id", "ctc_blank"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0, 2**31 - 1)
        if self.sequence_mask is not None and (not isinstance(self.sequence_mask, str) or not self.sequence_mask):
            raise InvalidConfigError("sequence_mask must be the name of an eval set array or None")
        for name, kinds in METRIC_OPTIONS.items():
            if getattr(self, name) is not None and self.metric not in kinds:
                metric = self.metric.value if isinstance(self.metric, MetricKind) else self.metric.name
                raise InvalidConfigError(
                    f"{name} is read by the metrics {', '.join(k.value for k in kinds)}; metric {metric!r} ignores it"
                )
        _check_int("output_sample_axis", self.output_sample_axis, 0, MAX_SAMPLE_AXIS)
        axes = self.input_sample_axes
        if axes is not None:
            if not isinstance(axes, dict) or not all(isinstance(k, str) and k for k in axes):
                raise InvalidConfigError("input_sample_axes must map model input names to axes")
            for name, axis in axes.items():
                _check_int(f"input_sample_axes[{name!r}]", axis, 0, MAX_SAMPLE_AXIS)

    @property
    def metric_name(self) -> str:
        return self.metric.value if isinstance(self.metric, MetricKind) else self.metric.name

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view: enums as their values, a custom metric as its name, the tolerance as text."""
        out = {
            f.name: self.metric_name if f.name == "metric" else copy.deepcopy(getattr(self, f.name))
            for f in fields(self)
        }
        for key, value in out.items():
            if isinstance(value, enum.Enum):
                out[key] = value.value
            elif isinstance(value, tuple):
                out[key] = list(value)
        out["tolerance"] = str(self.tolerance)
        out["objective"] = self.effective_objective.value
        out["criterion"] = self.effective_criterion.value
        return out

    @property
    def effective_criterion(self) -> Criterion:
        """The criterion that scores: ``AUTO`` is ``activation`` in zero and remove modes with recovery
        (whose calibration gives the input norms at no extra pass), ``magnitude`` otherwise."""
        if self.criterion is not Criterion.AUTO:
            return self.criterion
        if self.mode in (Mode.ZERO, Mode.REMOVE) and self.recover is not Recovery.NONE:
            return Criterion.ACTIVATION
        return Criterion.MAGNITUDE

    @property
    def criterion_choices(self) -> tuple[Criterion, ...]:
        """The criteria the run may score by, the one it starts from first: ``AUTO`` in zero mode
        with recovery and allocation ``auto`` also probes ``magnitude`` against ``activation``,
        with the allocations, before the search (``docs/criteria.md``); otherwise the effective one."""
        effective = self.effective_criterion
        if (
            self.criterion is Criterion.AUTO
            and self.mode is Mode.ZERO
            and effective is Criterion.ACTIVATION
            and self.allocation is Allocation.AUTO
        ):
            return (Criterion.ACTIVATION, Criterion.MAGNITUDE)
        return (effective,)

    @property
    def effective_objective(self) -> Objective:
        if self.objective is not None:
            return self.objective
        return Objective.BYTES if self.mode is Mode.REMOVE else Objective.PARAMS


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def _check_float(
    name: str,
    value: object,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        assert isinstance(value, (int, float))
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise InvalidConfigError(f"{name} must be a number in {lo}{low:g}, {high:g}{hi}, got {value!r}")
