"""Plans, allocation and the laws they obey."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import pruner
from pruner._analysis import analyze
from pruner._options import Allocation, Criterion
from pruner._plan import LayerPlan, PruningPlan, check_plan, transfer_plan
from pruner._score import granularity, lowest, unit_scores
from pruner._space import ZeroSpace, build_units

MODEL_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 6, 6] x) => (float[N, 5] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, cw)
    r = Relu (c)
    f = Flatten (r)
    y = Gemm <transB = 1> (f, fw)
}
"""


def make_model(seed: int = 0, zeros: float = 0.0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    cw = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    fw = (rng.standard_normal((5, 144)) * 0.1).astype(np.float32)
    for w in (cw, fw):
        w[rng.random(w.shape) < zeros] = 0
    model = onnx.parser.parse_model(MODEL_TEXT)
    model.graph.initializer.extend([numpy_helper.from_array(cw, "cw"), numpy_helper.from_array(fw, "fw")])
    onnx.checker.check_model(model, full_check=True)
    return model


def make_space(model: onnx.ModelProto, criterion: Criterion, allocation: Allocation) -> ZeroSpace:
    units = []
    for layer in analyze(model).layers:
        weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == layer.name))
        scores = unit_scores(criterion, layer, weight)
        units.append(build_units(layer, weight, scores, granularity(criterion), allocation, 0.98))
    return ZeroSpace(units, allocation)


@settings(max_examples=60, deadline=None)
@given(
    level=st.floats(0.0, 0.97),
    allocation=st.sampled_from(list(Allocation)),
    seed=st.integers(0, 5),
)
def test_requested_sparsity_is_exactly_achieved(level: float, allocation: Allocation, seed: int) -> None:
    space = make_space(make_model(seed), Criterion.MAGNITUDE, allocation)
    config = space.at_level(level)
    assert space.zeroed(config) == round(level * space.total_params)
    assert all(a <= u.max_amount for a, u in zip(config, space.layers, strict=True))


@settings(max_examples=30, deadline=None)
@given(level=st.floats(0.0, 0.95), allocation=st.sampled_from(list(Allocation)))
def test_channel_sparsity_is_within_one_channel_per_layer(level: float, allocation: Allocation) -> None:
    space = make_space(make_model(), Criterion.L2, allocation)
    config = space.at_level(level)
    slack = sum(u.params_per_unit for u in space.layers)
    assert abs(space.zeroed(config) - level * space.total_params) <= slack


def test_levels_are_monotone() -> None:
    space = make_space(make_model(), Criterion.MAGNITUDE, Allocation.LAMP)
    configs = [space.at_level(x / 100) for x in range(0, 99)]
    for a, b in itertools.pairwise(configs):
        assert all(x <= y for x, y in zip(a, b, strict=True))


def _plan(model: onnx.ModelProto, criterion: Criterion, level: float) -> PruningPlan:
    space = make_space(model, criterion, Allocation.GLOBAL)
    config = space.at_level(level)
    return PruningPlan(
        pruner.Mode.ZERO,
        criterion,
        tuple(
            LayerPlan(u.layer.name, a, u.units, u.layer.channel_axis) for u, a in zip(space.layers, config, strict=True)
        ),
    )


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


PLAN_CRITERIA = [c for c in Criterion if c is not Criterion.AUTO]
"""What a plan can name: the criterion that ran (``auto`` is resolved before scoring)."""


@pytest.mark.parametrize("criterion", PLAN_CRITERIA)
def test_plan_round_trips_through_json(criterion: Criterion) -> None:
    plan = _plan(make_model(), criterion, 0.5)
    assert PruningPlan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize("criterion", PLAN_CRITERIA)
def test_transfer_does_not_mutate_and_is_idempotent(criterion: Criterion) -> None:
    model = make_model()
    before = model.SerializeToString()
    plan = _plan(model, criterion, 0.4)
    once = transfer_plan(plan, model)
    assert model.SerializeToString() == before
    twice = transfer_plan(plan, once)
    for name, w in weights(once).items():
        np.testing.assert_array_equal(w, weights(twice)[name])
    zeroed = sum(int((w == 0).sum()) for w in weights(once).values())
    assert zeroed == sum(layer.amount * (1 if criterion is Criterion.MAGNITUDE else 0) for layer in plan.layers) or (
        criterion is not Criterion.MAGNITUDE
    )
    onnx.checker.check_model(once, full_check=True)


def test_a_plan_naming_criterion_auto_is_refused() -> None:
    data = _plan(make_model(), Criterion.MAGNITUDE, 0.5).to_dict()
    with pytest.raises(pruner.InvalidInputError, match="a plan names the criterion that ran"):
        PruningPlan.from_dict({**data, "criterion": "auto"})


def test_channel_plans_zero_whole_channels() -> None:
    model = make_model()
    plan = _plan(model, Criterion.L1, 0.5)
    out = weights(transfer_plan(plan, model))
    rows = out["fw"].reshape(5, -1)
    zero_rows = int((np.abs(rows).sum(axis=1) == 0).sum())
    assert zero_rows == next(la.amount for la in plan.layers if la.tensor == "fw")


@settings(max_examples=20, deadline=None)
@given(zeros=st.floats(0.05, 0.6), seed=st.integers(0, 3))
def test_zeroing_already_zero_weights_changes_nothing(zeros: float, seed: int) -> None:
    model = make_model(seed, zeros)
    w = weights(model)
    already = {k: int((v == 0).sum()) for k, v in w.items()}
    space = make_space(model, Criterion.MAGNITUDE, Allocation.UNIFORM)
    plan = PruningPlan(
        pruner.Mode.ZERO,
        Criterion.MAGNITUDE,
        tuple(LayerPlan(u.layer.name, already[u.layer.name], u.units) for u in space.layers),
    )
    out = weights(transfer_plan(plan, model))
    for k in w:
        np.testing.assert_array_equal(out[k], w[k])
    # and the objective counts them as already gone
    config = tuple(already[u.layer.name] for u in space.layers)
    assert space.nonzero(config) == space.nonzero(space.empty())


def test_check_plan_reports_mismatches() -> None:
    model = make_model()
    plan = PruningPlan(
        pruner.Mode.ZERO,
        Criterion.MAGNITUDE,
        (LayerPlan("nope", 1, 10), LayerPlan("cw", 1, 99), LayerPlan("fw", 1000, 720)),
    )
    issues = check_plan(plan, model)
    assert [i.tensor for i in issues] == ["nope", "cw", "fw"]
    with pytest.raises(pruner.PlanMismatchError, match=r"does not fit the model: nope: no initializer"):
        transfer_plan(plan, model)
    with pytest.raises(pruner.PlanMismatchError, match="no replay data"):
        pruner.apply_plan(plan, model)


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, float("nan"), float("inf")]), min_size=1, max_size=40),
    data=st.data(),
)
def test_lowest_is_a_stable_argsort_prefix(scores: list[float], data: st.DataObject) -> None:
    # ties by index, NaN as +inf: the order plans replay, computed without keeping an index array
    array = np.array(scores, dtype=np.float32)
    amount = data.draw(st.integers(0, len(scores)))
    expected = np.zeros(len(scores), dtype=bool)
    expected[np.argsort(np.where(np.isnan(array), np.inf, array), kind="stable")[:amount]] = True
    np.testing.assert_array_equal(lowest(array, amount), expected)


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, float("nan")]), min_size=2, max_size=60),
    points=st.integers(2, 8),
    data=st.data(),
)
def test_lowest_with_a_sorted_sample_hint_is_the_same(scores: list[float], points: int, data: st.DataObject) -> None:
    array = np.array(scores, dtype=np.float32)
    amount = data.draw(st.integers(0, len(scores)))
    ranks = np.unique(np.linspace(0, len(scores) - 1, points).astype(np.int64))
    values = np.sort(np.where(np.isnan(array), np.inf, array))[ranks]
    np.testing.assert_array_equal(lowest(array, amount, (ranks, values)), lowest(array, amount))


@settings(max_examples=60, deadline=None)
@given(
    n_m=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 8), (4, 8)]),
    shape_kind=st.sampled_from(["conv", "gemm", "matmul"]),
    seed=st.integers(0, 1000),
)
def test_nm_masks_keep_exactly_n_of_every_m(n_m: tuple[int, int], shape_kind: str, seed: int) -> None:
    from pruner._analysis import PrunableWeight
    from pruner._nm import nm_mask, reduction_axis

    n, m = n_m
    shape, axis = {"conv": ((6, 16, 3, 3), 0), "gemm": ((5, 24), 0), "matmul": ((32, 7), 1)}[shape_kind]
    layer = PrunableWeight("w", "", (), shape, "float32", axis)
    scores = np.random.default_rng(seed).random(shape).astype(np.float32).reshape(-1)
    mask = nm_mask(layer, scores, n, m)
    assert mask is not None
    kept = np.moveaxis(~mask, reduction_axis(layer), -1).reshape(-1, m)
    assert (kept.sum(axis=1) == n).all()
    # the kept ones are the best of their group
    best = np.moveaxis(scores.reshape(shape), reduction_axis(layer), -1).reshape(-1, m)
    assert (np.where(kept, best, np.inf).min(axis=1) >= np.where(kept, -np.inf, best).max(axis=1)).all()


def test_nm_layer_not_divisible_is_none() -> None:
    from pruner._analysis import PrunableWeight
    from pruner._nm import nm_mask

    layer = PrunableWeight("w", "", (), (4, 6), "float32", 0)
    assert nm_mask(layer, np.ones(24, np.float32), 2, 4) is None
