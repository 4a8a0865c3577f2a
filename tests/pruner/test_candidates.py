"""What a candidate at a given level builds: the model ``pruner.prune`` returns for a fixed ``target_sparsity``.

The candidate classes of ``pruner._candidates`` are being rewired (how they receive the run's
state changes), so these tests go through the narrowest entry point that stays: ``pruner.prune``
with ``target_sparsity`` set evaluates exactly one candidate, the one at that level, and with a
tolerance nothing can exceed it is kept, so ``result.model`` is that candidate's ``build``. The
assertions are about that model only: its sparsity, which weights changed and how, the checker,
and an onnxruntime run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import pruner
from pruner import Allocation, Criterion, MetricKind, Mode, PruneOptions, Recovery, Tolerance
from pruner._candidates import CRITERION_MARGIN, WeightCandidates, make_candidates
from pruner._phases import load, measure_baseline
from pruner._score import unit_scores
from tests.helpers import parse, seeded

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

MLP_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 16] x) => (float[N, 6] y) {
    h = Gemm <transB = 1> (x, w1, b1)
    r = Relu (h)
    y = MatMul (r, w2)
}
"""
LINEAR_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 16] x) => (float[N, 6] y) {
    y = Gemm <transB = 1> (x, w, b)
}
"""
WEIGHTS = {"w1", "w2"}
"""The MLP's prunable weights (its bias is not pruned, only removed with its channel)."""
EVERYTHING_PASSES = Tolerance(1.0)
"""An absolute loss of 1 on accuracy: the candidate at the target level is always kept."""


def mlp() -> onnx.ModelProto:
    # rows of w1 scaled differently, so channel norms differ clearly
    w1 = seeded((48, 16), 0) * np.linspace(0.1, 2.0, 48, dtype=np.float32)[:, None]
    return parse(MLP_TEXT, {"w1": w1, "b1": seeded((48,), 1) * 0.1, "w2": seeded((48, 6), 2)})


def linear() -> onnx.ModelProto:
    return parse(LINEAR_TEXT, {"w": seeded((6, 16), 3), "b": seeded((6,), 4)})


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {"x": x})[0]
    return out


def inputs(n: int = 400, seed: int = 5) -> np.ndarray:
    """Correlated inputs with a nonzero mean: what makes a refit worth more than masking."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((16, 16)).astype(np.float32)
    return (rng.standard_normal((n, 16)).astype(np.float32) @ mixing + 1.0).astype(np.float32)


def evalset(model: onnx.ModelProto) -> pruner.EvalSet:
    x = inputs()
    return pruner.EvalSet({"x": x}, run(model, x).argmax(-1).astype(np.int64))


def at_level(model: onnx.ModelProto, level: float, **options: object) -> pruner.PruneResult:
    """The result of the one candidate at ``level`` (normalized allocation unless given: every layer
    gets a share of the level)."""
    options.setdefault("allocation", Allocation.NORMALIZED)
    result = pruner.prune(
        model, evalset(model), PruneOptions(target_sparsity=level, tolerance=EVERYTHING_PASSES, **options)
    )
    assert result.report.status == "pruned" and result.report.evaluations == 1
    onnx.checker.check_model(result.model, full_check=True)
    out = run(result.model, inputs(8))
    assert out.shape == (8, 6) and np.isfinite(out).all()
    return result


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def zeroed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Where ``after`` is zero and ``before`` was not."""
    return (after == 0) & (before != 0)


# --- zero mode ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0.3, 0.5, 0.8])
def test_zero_mode_zeroes_the_smallest_weights_of_each_layer_and_nothing_else(level: float) -> None:
    model = mlp()
    result = at_level(model, level, recover=Recovery.NONE, criterion=Criterion.MAGNITUDE)
    before, after = weights(model), weights(result.model)
    assert before.keys() == after.keys()
    assert all(after[name].shape == w.shape and after[name].dtype == w.dtype for name, w in before.items())
    np.testing.assert_array_equal(after["b1"], before["b1"])  # not a prunable weight, no recovery
    prunable = sum(before[name].size for name in WEIGHTS)
    zeros = 0
    for name in WEIGHTS:
        w, p = before[name], after[name]
        gone = zeroed(w, p)
        # a weight is either kept as it was or set to zero: masking, no refit
        np.testing.assert_array_equal(p[~gone], w[~gone])
        assert gone.any() and (~gone).any()
        # the zeroed ones are the layer's smallest in magnitude
        assert np.abs(w[gone]).max() <= np.abs(w[~gone]).min()
        zeros += int(gone.sum())
    # the level is reached up to one unit per layer, and the report counts what the model holds
    assert abs(zeros / prunable - level) <= len(WEIGHTS) / prunable
    assert result.report.nonzero_after == prunable - zeros
    assert result.report.sparsity == pytest.approx(zeros / prunable)


@pytest.mark.parametrize("criterion", [Criterion.L1, Criterion.L2])
def test_a_channel_criterion_zeroes_whole_output_channels_of_least_norm(criterion: Criterion) -> None:
    model = mlp()
    result = at_level(model, 0.5, recover=Recovery.NONE, criterion=criterion)
    before, after = weights(model), weights(result.model)
    order = 1 if criterion is Criterion.L1 else 2
    # output channels: rows of w1 (Gemm with transB=1 stores [out, in]), columns of w2 (MatMul: [in, out])
    for name, axis in (("w1", 0), ("w2", 1)):
        w = np.moveaxis(before[name], axis, 0)
        p = np.moveaxis(after[name], axis, 0)
        gone = np.array([not channel.any() for channel in p])
        assert gone.any() and (~gone).any()
        np.testing.assert_array_equal(p[~gone], w[~gone])  # a kept channel is kept whole
        norms = np.linalg.norm(w.reshape(len(w), -1), ord=order, axis=1)
        assert norms[gone].max() <= norms[~gone].min()
    assert result.report.sparsity == pytest.approx(0.5, abs=0.05)


def test_recovery_refits_the_kept_weights_and_cuts_the_output_error() -> None:
    model = linear()
    x = inputs()
    reference = run(model, x)
    errors = {}
    for recover in (Recovery.NONE, Recovery.LSQ):
        result = at_level(model, 0.5, recover=recover, criterion=Criterion.MAGNITUDE)
        w, p = weights(model)["w"], weights(result.model)["w"]
        # the same weights are zeroed, at the same level, whether or not the rest is refit
        assert np.count_nonzero(p == 0) == pytest.approx(w.size / 2, abs=1)
        if recover is Recovery.NONE:
            plain_zeros = p == 0
        else:
            np.testing.assert_array_equal(p == 0, plain_zeros)
            assert not np.array_equal(p[~plain_zeros], w[~plain_zeros])  # refit
            assert not np.array_equal(weights(result.model)["b"], weights(model)["b"])  # bias corrected
        errors[recover] = float(np.mean((run(result.model, x) - reference) ** 2))
    # a least-squares refit on correlated inputs does much better than masking (typically 10x)
    assert errors[Recovery.LSQ] < 0.5 * errors[Recovery.NONE]


# --- remove mode -------------------------------------------------------------------------------------


def test_remove_mode_builds_the_model_without_the_channels_and_the_same_outputs_as_zeroing_them() -> None:
    model = mlp()
    result = at_level(model, 0.5, mode=Mode.REMOVE, recover=Recovery.NONE)
    before, after = weights(model), weights(result.model)
    kept = after["w1"].shape[0]
    assert 0 < kept < 48 and kept % 8 == 0  # 48 is a multiple of 8: so is what is kept
    assert after["w1"].shape == (kept, 16) and after["b1"].shape == (kept,) and after["w2"].shape == (kept, 6)
    # each kept hidden channel is an original one, whole, in its original order
    rows = [int(np.flatnonzero((before["w1"] == row).all(axis=1))[0]) for row in after["w1"]]
    assert rows == sorted(rows) and len(set(rows)) == kept
    np.testing.assert_array_equal(after["b1"], before["b1"][rows])
    np.testing.assert_array_equal(after["w2"], before["w2"][rows])
    removed = sorted(set(range(48)) - set(rows))
    # removing a channel is zeroing it (Relu(0) = 0 contributes nothing downstream)
    zeroed_model = onnx.ModelProto()
    zeroed_model.CopyFrom(model)
    for tensor in zeroed_model.graph.initializer:
        if tensor.name in ("w1", "b1"):
            array = numpy_helper.to_array(tensor).copy()
            array[removed] = 0
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    x = inputs()
    np.testing.assert_allclose(run(result.model, x), run(zeroed_model, x), rtol=1e-5, atol=1e-5)
    # remove mode counts the params left in the pruned layers, their biases included
    assert result.report.nonzero_after == sum(w.size for w in after.values())
    assert result.model.ByteSize() < model.ByteSize()


# --- N:M mode ----------------------------------------------------------------------------------------


def test_nm_mode_keeps_at_most_n_of_every_m_weights_along_the_reduction_axis() -> None:
    model = mlp()
    result = at_level(model, 0.5, mode=Mode.NM, nm=(2, 4), recover=Recovery.NONE)
    before, after = weights(model), weights(result.model)
    np.testing.assert_array_equal(after["b1"], before["b1"])
    # the reduction axis: inputs of w1 (Gemm transB=1: [out, in]), rows of w2 (MatMul: [in, out])
    for name, axis in (("w1", 1), ("w2", 0)):
        w, p = before[name], after[name]
        gone = zeroed(w, p)
        np.testing.assert_array_equal(p[~gone], w[~gone])
        groups = np.moveaxis(p, axis, -1).reshape(-1, 4)
        assert (np.count_nonzero(groups, axis=1) == 2).all()  # no weight of these was zero before
        # in each group the two kept are the two largest in magnitude
        originals = np.moveaxis(w, axis, -1).reshape(-1, 4)
        kept_min = np.where(groups != 0, np.abs(originals), np.inf).min(axis=1)
        gone_max = np.where(groups == 0, np.abs(originals), -np.inf).max(axis=1)
        assert (gone_max <= kept_min).all()
    assert result.report.sparsity == pytest.approx(0.5)


def test_auto_allocation_takes_the_choice_whose_probes_deviate_least() -> None:
    from pruner._analysis import analyze
    from pruner._candidates import _choose_allocation
    from pruner._score import Granularity
    from pruner._space import AUTO_CHOICES, ZeroSpace, build_units

    model = mlp()
    found = analyze(model)
    layers = [
        build_units(layer, weights(model)[layer.name], np.abs(weights(model)[layer.name]).ravel(), Granularity.ELEMENT,
                    Allocation.AUTO, 0.98)
        for layer in found.layers
    ]  # fmt: skip
    space = ZeroSpace(layers, Allocation.AUTO)
    configs = {}
    for allocation in AUTO_CHOICES:
        space.use(allocation)
        configs[allocation] = space.at_level(0.4)
    assert len(set(configs.values())) == len(AUTO_CHOICES)  # three different configs at one level
    probed: list[tuple[int, ...]] = []
    for best in AUTO_CHOICES:
        probed.clear()

        def probe(config: tuple[int, ...], best: Allocation = best) -> float:
            probed.append(config)
            return 0.01 if config == configs[best] else 0.1

        (note,) = _choose_allocation(space, probe, 0.4, None)
        assert space.allocation is best and space.at_level(0.4) == configs[best]
        assert note.startswith(f"allocation auto: {best.value} (output deviation at 40%")
        assert probed == list(configs.values())  # with a target, the probes run at it alone
    probed.clear()

    def flat(config: tuple[int, ...]) -> float:
        probed.append(config)
        return 0.5

    (note,) = _choose_allocation(space, flat, None, None)
    assert space.allocation is AUTO_CHOICES[0]  # a tie keeps the first choice
    assert len(probed) == 6 and "6 probes" in note  # two pilot levels a choice without a target


@pytest.mark.parametrize("recover", [Recovery.NONE, Recovery.AUTO])
def test_the_default_allocation_gives_the_model_of_the_allocation_it_names(recover: Recovery) -> None:
    model = mlp()
    auto = at_level(model, 0.5, allocation=Allocation.AUTO, recover=recover)
    (note,) = [n for n in auto.report.notes if n.startswith("allocation auto: ")]
    chosen = Allocation(note.split()[2])
    options = auto.report.to_dict()["options"]
    assert options["allocation"] == "auto"
    same = at_level(model, 0.5, allocation=chosen, recover=recover, criterion=Criterion(options["criterion"]))
    if recover is Recovery.NONE:
        assert auto.model_bytes == same.model_bytes
    else:  # the same weights are zeroed; a refit starts from the fits the probes made, so ends nearby
        for name, w in weights(auto.model).items():
            other = weights(same.model)[name]
            np.testing.assert_array_equal(w == 0, other == 0)
            np.testing.assert_allclose(w, other, atol=0.02)


def test_remove_mode_takes_auto_as_normalized() -> None:
    model = mlp()
    auto, normalized = (
        at_level(model, 0.3, mode=Mode.REMOVE, recover=Recovery.NONE, allocation=allocation)
        for allocation in (Allocation.AUTO, Allocation.NORMALIZED)
    )
    assert auto.model_bytes == normalized.model_bytes
    assert not [n for n in auto.report.notes if n.startswith("allocation auto")]


RESOLVED = [
    (Mode.ZERO, Recovery.AUTO, Criterion.ACTIVATION),
    (Mode.ZERO, Recovery.LSQ, Criterion.ACTIVATION),
    (Mode.ZERO, Recovery.NONE, Criterion.MAGNITUDE),
    (Mode.NM, Recovery.AUTO, Criterion.MAGNITUDE),
    (Mode.REMOVE, Recovery.AUTO, Criterion.ACTIVATION),
    (Mode.REMOVE, Recovery.NONE, Criterion.MAGNITUDE),
]
"""(mode, recovery, the criterion ``auto`` resolves to)."""


@pytest.mark.parametrize(("mode", "recover", "resolved"), RESOLVED)
def test_the_default_criterion_is_activation_where_recovery_calibrates(
    mode: Mode, recover: Recovery, resolved: Criterion
) -> None:
    options = PruneOptions(mode=mode, recover=recover)
    assert options.criterion is Criterion.AUTO and options.effective_criterion is resolved
    assert options.to_dict()["criterion"] == resolved.value
    given = PruneOptions(mode=mode, recover=recover, criterion=Criterion.ACTIVATION)
    assert given.effective_criterion is Criterion.ACTIVATION  # a criterion given is the one that runs


@pytest.mark.parametrize(("mode", "recover", "resolved"), [r for r in RESOLVED if r[0] is not Mode.NM])
def test_the_default_criterion_gives_the_model_of_the_criterion_it_resolves_to(
    mode: Mode, recover: Recovery, resolved: Criterion
) -> None:
    model = mlp()
    auto = at_level(model, 0.3, mode=mode, recover=recover)
    same = at_level(model, 0.3, mode=mode, recover=recover, criterion=resolved)
    assert auto.model_bytes == same.model_bytes
    assert auto.report.to_dict()["options"]["criterion"] == resolved.value
    said = [n for n in auto.report.notes if n.startswith("criterion auto")]
    assert said == ([f"criterion auto: {resolved.value}"] if mode is not Mode.NM else [])  # where it chooses
    assert auto.plan.criterion is resolved
    if resolved is Criterion.ACTIVATION:  # it scores otherwise than magnitude on this model
        magnitude = at_level(model, 0.3, mode=mode, recover=recover, criterion=Criterion.MAGNITUDE)
        assert auto.model_bytes != magnitude.model_bytes


CHOICES = [
    ({}, (Criterion.ACTIVATION, Criterion.MAGNITUDE)),
    ({"recover": Recovery.LSQ}, (Criterion.ACTIVATION, Criterion.MAGNITUDE)),
    ({"allocation": Allocation.LAMP}, (Criterion.ACTIVATION,)),  # no allocation probes to weigh it with
    ({"recover": Recovery.NONE}, (Criterion.MAGNITUDE,)),
    ({"mode": Mode.REMOVE}, (Criterion.ACTIVATION,)),
    ({"mode": Mode.NM}, (Criterion.MAGNITUDE,)),
    ({"criterion": Criterion.ACTIVATION}, (Criterion.ACTIVATION,)),  # a criterion given is the one that runs
]


@pytest.mark.parametrize(("given", "choices"), CHOICES)
def test_the_default_criterion_chooses_by_probes_where_the_allocation_is_probed(
    given: dict[str, object], choices: tuple[Criterion, ...]
) -> None:
    assert PruneOptions(**given).criterion_choices == choices  # type: ignore[arg-type]


def choice_pool(margin: float) -> tuple[WeightCandidates, list[Criterion]]:
    """Candidates of ``mlp()`` choosing between activation and magnitude, and a probe under which
    magnitude's deviation is ``margin`` times activation's: the pool, and the criteria probed."""
    model = mlp()
    options = PruneOptions(metric=MetricKind.ACCURACY, tolerance=EVERYTHING_PASSES)
    loaded, owned = load(model, evalset(model), options, None)
    baseline = measure_baseline(owned, loaded, options.tolerance, 1)
    candidates = make_candidates(
        owned, loaded.inspection, loaded.search_idx, baseline.evaluator, loaded.options, criteria=loaded.criteria
    )
    pool = candidates.pool
    assert isinstance(pool, WeightCandidates) and set(pool.alternatives) == {Criterion.MAGNITUDE}
    probed: list[Criterion] = []

    def probe(config: tuple[int, ...]) -> float:
        pool.runner(config)  # the weights of the criterion being probed
        probed.append(pool.options.criterion)
        return 0.01 * (margin if pool.options.criterion is Criterion.MAGNITUDE else 1.0)

    _, notes = pool.with_probe(probe)
    assert len(notes) == 2 and notes[1].startswith("allocation auto: ")
    assert notes[0].startswith(f"criterion auto: {pool.options.criterion.value} (lowest output deviation: ")
    assert notes[0].endswith("12 probes)") and not pool.alternatives
    return pool, probed


@pytest.mark.parametrize(("margin", "chosen"), [(0.9, Criterion.ACTIVATION), (0.7, Criterion.MAGNITUDE)])
def test_auto_leaves_activation_only_for_a_criterion_clearly_lower(margin: float, chosen: Criterion) -> None:
    assert 0.7 < CRITERION_MARGIN < 0.9
    pool, probed = choice_pool(margin)
    assert probed == [Criterion.ACTIVATION] * 6 + [Criterion.MAGNITUDE] * 6
    assert pool.options.criterion is chosen and not pool._fits_by  # no fit of the other's masks stays
    # the space and the weights are the chosen criterion's
    config = pool.space.at_level(0.4)
    layer = pool.units[0].layer
    kept = pool.weights(config)[layer.name] != 0
    scores = unit_scores(chosen, layer, pool.split.weights[layer.name], pool.calibration)
    assert (kept.sum(), scores[~kept.ravel()].max() <= scores[kept.ravel()].min()) == (kept.size - config[0], True)


def test_the_default_gives_the_model_of_the_criterion_its_probes_chose() -> None:
    model, data = FIXTURES / "mlp.onnx", pruner.load_eval_set(FIXTURES / "mlp_eval.npz")
    auto = pruner.prune(model, data, PruneOptions(target_sparsity=0.5, tolerance=EVERYTHING_PASSES))
    said = [n for n in auto.report.notes if n.startswith("criterion auto: ")]
    assert len(said) == 1 and said[0].startswith("criterion auto: magnitude (")  # this fixture's choice
    assert auto.report.options["criterion"] == "magnitude" and auto.plan.criterion is Criterion.MAGNITUDE
    (note,) = [n for n in auto.report.notes if n.startswith("allocation auto: ")]
    given = PruneOptions(
        target_sparsity=0.5,
        tolerance=EVERYTHING_PASSES,
        criterion=Criterion.MAGNITUDE,
        allocation=Allocation(note.split()[2]),
    )
    same = pruner.prune(model, data, given)
    for name, w in weights(auto.model).items():  # the same weights zeroed; the refits end nearby
        other = weights(same.model)[name]
        np.testing.assert_array_equal(w == 0, other == 0)
        np.testing.assert_allclose(w, other, atol=0.02)


def test_probing_magnitude_leaves_the_model_of_activation_as_it_was() -> None:
    """Where the probes keep activation, the run gives the model activation alone gives, to the bit:
    magnitude's probes and fits leave nothing behind."""
    model, data = FIXTURES / "attention.onnx", pruner.load_eval_set(FIXTURES / "attention_eval.npz")
    auto = pruner.prune(model, data, PruneOptions(target_sparsity=0.5, tolerance=EVERYTHING_PASSES))
    assert [n for n in auto.report.notes if n.startswith("criterion auto: activation (")]  # this fixture's choice
    alone = pruner.prune(
        model, data, PruneOptions(target_sparsity=0.5, tolerance=EVERYTHING_PASSES, criterion=Criterion.ACTIVATION)
    )
    assert auto.model_bytes == alone.model_bytes
