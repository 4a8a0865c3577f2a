"""A config's layer fits on several threads, the search's best kept for its confirmation and
write, and the fitting time when fits overlap."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pruner import EvalSet, MetricKind, PruneOptions, Recovery
from pruner._blas import one_blas_thread
from pruner._candidates import WeightCandidates, make_candidates
from pruner._phases import load, measure_baseline
from pruner._recover import Calibration
from tests.helpers import parse, seeded

MLP_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[N, 48] x) => (float[N, 8] y) {
    h1 = Gemm <transB = 1> (x, w1, b1)
    r1 = Relu (h1)
    h2 = MatMul (r1, w2)
    r2 = Relu (h2)
    h3 = MatMul (r2, w3)
    r3 = Relu (h3)
    y = MatMul (r3, w4)
}
"""


def pool(threads: int, *, large: bool) -> WeightCandidates:
    """Candidates of a four-layer MLP whose layers are fit by conjugate gradients (48-64 inputs,
    more than the exact solvers take), ``large``: as for weights over ``FED_ALWAYS_BYTES`` (fits
    not kept per layer)."""
    weights = {
        "w1": seeded((64, 48), 1),
        "b1": seeded((64,), 2),
        "w2": seeded((64, 56), 3),
        "w3": seeded((56, 64), 4),
        "w4": seeded((64, 8), 5),
    }
    model = parse(MLP_TEXT, weights)
    x = np.random.default_rng(0).standard_normal((160, 48)).astype(np.float32)
    options = PruneOptions(metric=MetricKind.COSINE, recover=Recovery.LSQ, threads=threads)
    loaded, owned = load(model, EvalSet({"x": x}), options, None)
    baseline = measure_baseline(owned, loaded, options.tolerance, 1)
    candidates = make_candidates(owned, loaded.inspection, loaded.search_idx, baseline.evaluator, options)
    assert isinstance(candidates.pool, WeightCandidates)
    candidates.pool.keep_scores = not large
    return candidates.pool


def levels(candidates: WeightCandidates) -> list[tuple[int, ...]]:
    """A search's worth of configs: levels up and down, one revisited, one layer left whole."""
    space = candidates.space
    configs = [space.at_level(s) for s in (0.5, 0.75, 0.6, 0.75, 0.3)]
    return [*configs, (0, *configs[1][1:])]


@pytest.mark.parametrize("large", [False, True], ids=["fits-kept", "large"])
def test_fits_on_two_threads_give_the_weights_of_fits_one_after_another(large: bool) -> None:
    one, two = pool(1, large=large), pool(2, large=large)
    assert (one.fit_threads, two.fit_threads) == (1, 2)
    with one_blas_thread():  # as a run holds it
        for config in levels(one):
            a, b = one.weights(config), two.weights(config)
            assert a.keys() == b.keys()
            for name in a:
                assert np.array_equal(a[name], b[name]), name
            assert one.recovered.keys() == two.recovered.keys()
            for key, (weight, shift) in one.recovered.items():
                other, other_shift = two.recovered[key]
                assert np.array_equal(weight, other)
                if shift is None:
                    assert other_shift is None
                else:
                    assert other_shift is not None and np.array_equal(shift, other_shift)
    assert any(a.any() for a in one.weights(levels(one)[0]).values())


def counted_fits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the layers fit from here on, in order (``Calibration.recover`` counted)."""
    fits: list[str] = []
    recover = Calibration.recover

    def counted(self: Calibration, name: str, *args: object, **kwargs: object) -> object:
        fits.append(name)
        return recover(self, name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Calibration, "recover", counted)
    return fits


def test_the_sparsest_passing_candidate_is_kept_while_its_runner_holds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    candidates = pool(2, large=True)
    fits = counted_fits(monkeypatch)
    low, high = candidates.space.at_level(0.3), candidates.space.at_level(0.6)
    held = candidates.weights(low)
    candidates.keep(low)
    fitted = len(fits)
    again = candidates.weights(low)
    assert len(fits) == fitted  # no refit: the very arrays the search ran
    assert all(again[name] is held[name] for name in held)
    held = candidates.weights(high)
    candidates.keep(high)
    candidates.keep(low)  # less sparse than the kept one: changes nothing
    fitted = len(fits)
    assert all(candidates.weights(high)[name] is held[name] for name in held) and len(fits) == fitted
    del held
    candidates.weights(low)
    candidates.keep(low)  # its runner is gone (a built session holds no arrays): nothing to keep
    candidates.release()
    assert candidates.recovered == {} and not candidates.split.weights


@pytest.mark.parametrize("pushed", range(4))
def test_a_candidate_near_the_kept_one_refits_only_the_layers_it_moves(
    monkeypatch: pytest.MonkeyPatch, pushed: int
) -> None:
    """A refinement probe pushes one group of layers from the search's best: the other layers' fits
    (weights and bias shifts) are the kept candidate's own, and the result is what fitting every
    layer afresh gives."""
    candidates, fresh = pool(2, large=True), pool(2, large=True)
    fits = counted_fits(monkeypatch)
    best = candidates.space.at_level(0.4)
    held = candidates.weights(best)
    candidates.keep(best)
    near = candidates.space.push(best, [pushed], 0.25)
    moved = candidates.units[pushed].layer.name
    assert near != best
    fits.clear()
    with one_blas_thread():
        got = candidates.weights(near)
        assert fits == [moved]
        want = fresh.weights(near)
    assert got.keys() == want.keys()
    for name in got:
        if name != moved and name != "b1":
            assert got[name] is held[name] or got[name] is candidates.split.weights[name], name
        # the moved layer's conjugate gradients may start from the fit at its nearest amount (as
        # in every search): the same solution, to the solver's tolerance
        close = {"rtol": 1e-2, "atol": 1e-3} if name in (moved, "b1") else {"rtol": 1e-6, "atol": 0}
        np.testing.assert_allclose(got[name], want[name], err_msg=name, **close)  # type: ignore[arg-type]
    assert not np.array_equal(got["b1"], candidates.split.weights["b1"])  # w1's shift, reused or refit


def test_a_pool_whose_fits_are_kept_per_layer_keeps_no_best() -> None:
    candidates = pool(1, large=False)
    config = candidates.space.at_level(0.5)
    held = candidates.weights(config)
    candidates.keep(config)
    assert candidates.weights(config) is not held and candidates.recovered


def test_overlapping_fits_on_threads_count_their_wall_time_once() -> None:
    calibration = Calibration({}, {}, 0)
    inner_in, inner_out = threading.Event(), threading.Event()
    spans: dict[str, float] = {}

    def outer() -> None:
        start = time.perf_counter()
        with calibration.timed():
            inner_in.wait()
            time.sleep(0.05)
            inner_out.wait()
            time.sleep(0.05)
        spans["outer"] = time.perf_counter() - start

    def inner() -> None:
        start = time.perf_counter()
        with calibration.timed():
            inner_in.set()
            time.sleep(0.1)
        spans["inner"] = time.perf_counter() - start
        inner_out.set()

    threads = [threading.Thread(target=outer), threading.Thread(target=inner)]
    threads[0].start()
    time.sleep(0.01)
    threads[1].start()
    for thread in threads:
        thread.join()
    assert spans["inner"] <= calibration.seconds <= spans["outer"]
