"""A run's plan replays to the very model the run returned, and transfers to other weights.

Every fixture model x mode x recovery: ``apply_plan(result.plan, original)`` is byte-identical to
``result.model`` (and to the saved file), a model that is not the original is refused, and
``transfer_plan`` prunes a perturbed copy of the weights by the same amounts.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import pruner
from pruner import Mode, Recovery
from pruner._plan import _rebuild, replayable

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MODELS = {
    "mlp": "mlp_eval.npz",
    "mlp_b1": "mlp_eval.npz",
    "cnn": "cnn_eval.npz",
    "cnn_bn": "cnn_bn_eval.npz",
    "attention": "attention_eval.npz",
    "compact": "compact_eval.npz",
    "encoder_exported": "attention_eval.npz",
    "torch_encoder_exported": "attention_eval.npz",  # untrained: its own outputs are the reference
}
SAMPLES = 96
"""Eval samples per run: enough for a search split, a held-out split and a calibration."""


@functools.cache
def evalset(name: str) -> pruner.EvalSet:
    data = pruner.load_eval_set(FIXTURES / MODELS[name])
    rows = np.random.default_rng(0).choice(len(data), SAMPLES, replace=False)
    return pruner.EvalSet({k: v[rows] for k, v in data.inputs.items()}, None)


def original(name: str) -> onnx.ModelProto:
    return onnx.load(str(FIXTURES / f"{name}.onnx"))


@functools.cache
def run(name: str, mode: Mode, recover: Recovery, criterion: pruner.Criterion) -> pruner.PruneResult:
    """One evaluation at a fixed sparsity with a generous tolerance: the replay, not the search, is tested."""
    options = pruner.PruneOptions(
        mode=mode,
        recover=recover,
        criterion=criterion,
        metric=pruner.MetricKind.COSINE,
        tolerance=pruner.Tolerance(0.9),
        target_sparsity=0.3 if mode is not Mode.NM else None,
        max_evaluations=2,
        calibration_samples=32,
        channel_multiple=1,
        threads=1,
    )
    return pruner.prune(original(name), evalset(name), options)


CASES = [
    pytest.param(name, mode, recover, id=f"{name}-{mode.value}-{recover.value}")
    for name in MODELS
    for mode in Mode
    for recover in (Recovery.NONE, Recovery.AUTO, Recovery.SEQUENTIAL)
]


@pytest.mark.parametrize(("name", "mode", "recover"), CASES)
def test_a_plan_replays_to_the_returned_model_byte_for_byte(
    name: str, mode: Mode, recover: Recovery, tmp_path: Path
) -> None:
    result = run(name, mode, recover, pruner.Criterion.MAGNITUDE)
    model = original(name)
    before = model.SerializeToString()
    replayed = pruner.apply_plan(result.plan, model)
    assert replayed.SerializeToString() == result.model.SerializeToString()
    assert model.SerializeToString() == before  # the caller's model is not changed
    assert result.plan.source_sha256 == pruner.model_sha256(model)
    assert result.plan.result_sha256 == pruner.model_sha256(result.model)
    # through the file the plan is saved to, and against the file the user gets
    result.plan.save(tmp_path / "plan.npz")
    loaded = pruner.PruningPlan.load(tmp_path / "plan.npz")
    assert loaded == result.plan and loaded.replay == result.plan.replay
    result.save(tmp_path / "pruned.onnx")
    written = onnx.load(str(tmp_path / "pruned.onnx")).SerializeToString()
    assert pruner.apply_plan(loaded, model).SerializeToString() == written


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode", list(Mode))
def test_the_runs_prune_and_recovery_refits(name: str, mode: Mode) -> None:
    """The matrix above is not vacuous: every fixture is pruned in every mode, and with recovery
    the plan carries refit values where the run changed kept weights."""
    plain = run(name, mode, Recovery.NONE, pruner.Criterion.MAGNITUDE)
    assert plain.report.status == "pruned", plain.report.notes
    replay = plain.plan.replay
    assert replay is not None
    if mode is Mode.REMOVE:
        assert replay.removed
    else:
        assert any(e.zeroed for e in replay.edits) and not any(e.refit for e in replay.edits)
    recovered = run(name, mode, Recovery.AUTO, pruner.Criterion.MAGNITUDE)
    assert recovered.report.status == "pruned"
    assert recovered.plan.replay is not None and any(e.refit for e in recovered.plan.replay.edits)


@pytest.mark.parametrize("name", list(MODELS))
def test_another_model_is_refused(name: str) -> None:
    result = run(name, Mode.ZERO, Recovery.AUTO, pruner.Criterion.MAGNITUDE)
    model = original(name)
    changed = model.graph.initializer[0]
    array = numpy_helper.to_array(changed).copy()
    array.reshape(-1)[0] += 1
    changed.CopyFrom(numpy_helper.from_array(array, changed.name))
    with pytest.raises(pruner.PlanMismatchError, match=r"not the one the plan was made from.*transfer_plan"):
        pruner.apply_plan(result.plan, model)
    # a plan read from JSON (the report's) describes, it does not replay
    described = pruner.PruningPlan.from_json(result.plan.to_json())
    assert described == result.plan and described.replay is None
    with pytest.raises(pruner.PlanMismatchError, match="no replay data"):
        pruner.apply_plan(described, original(name))


def perturbed(model: onnx.ModelProto, seed: int = 1) -> onnx.ModelProto:
    """The same architecture with other weights: every float tensor scaled element-wise by 1 +- 10%."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rng = np.random.default_rng(seed)
    for tensor in out.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and array.size > 1:
            noise = rng.uniform(0.9, 1.1, array.shape).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(array * noise, tensor.name))
    return out


def zeros(model: onnx.ModelProto, names: set[str]) -> dict[str, int]:
    return {
        t.name: int(np.count_nonzero(numpy_helper.to_array(t) == 0)) for t in model.graph.initializer if t.name in names
    }


def shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode", list(Mode))
def test_transfer_prunes_other_weights_by_the_same_amounts(name: str, mode: Mode) -> None:
    result = run(name, mode, Recovery.AUTO, pruner.Criterion.MAGNITUDE)
    other = perturbed(original(name))
    with pytest.raises(pruner.PlanMismatchError):
        pruner.apply_plan(result.plan, other)
    assert pruner.check_plan(result.plan, other) == []
    moved = pruner.transfer_plan(result.plan, other)
    onnx.checker.check_model(moved, full_check=True)
    ort.InferenceSession(moved.SerializeToString(), providers=["CPUExecutionProvider"])
    if mode is Mode.REMOVE:
        # the same channels per family go: every tensor has the returned model's shape
        assert {k: v for k, v in shapes(moved).items() if k in shapes(result.model)} == shapes(result.model)
    else:
        # the same number of weights per layer are zero (refit leaves the run's zeros zero)
        names = {layer.tensor for layer in result.plan.layers}
        assert zeros(moved, names) == zeros(result.model, names)
        assert sum(zeros(moved, names).values()) > sum(zeros(other, names).values())


def test_an_activation_scored_removal_replays_but_does_not_transfer() -> None:
    result = run("cnn_bn", Mode.REMOVE, Recovery.NONE, pruner.Criterion.ACTIVATION)
    assert result.report.status == "pruned"
    model = original("cnn_bn")
    assert pruner.apply_plan(result.plan, model).SerializeToString() == result.model.SerializeToString()
    with pytest.raises(pruner.PlanMismatchError, match="calibration data"):
        pruner.transfer_plan(result.plan, perturbed(model))


def test_sparse_initializers_replay() -> None:
    # the fixtures' Gemm with a symbolic batch fails the strict checker with sparse inputs; MatMul passes
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 16] x) => (float[N, 6] y) {
            h = Gemm <transB = 1> (x, w1, b1)
            r = Relu (h)
            y = MatMul (r, w2)
        }
        """
    )
    rng = np.random.default_rng(0)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(rng.standard_normal((48, 16)).astype(np.float32), "w1"),
            numpy_helper.from_array(np.zeros(48, np.float32), "b1"),
            numpy_helper.from_array(rng.standard_normal((48, 6)).astype(np.float32), "w2"),
        ]
    )
    data = pruner.EvalSet({"x": rng.standard_normal((96, 16)).astype(np.float32)}, None)
    options = pruner.PruneOptions(
        metric=pruner.MetricKind.COSINE,
        tolerance=pruner.Tolerance(0.9),
        target_sparsity=0.85,
        sparse_initializers=True,
        recover=Recovery.NONE,
    )
    result = pruner.prune(model, data, options)
    replay = result.plan.replay
    assert replay is not None
    assert replay.sparse == tuple(t.values.name for t in result.model.graph.sparse_initializer)
    assert pruner.apply_plan(result.plan, model).SerializeToString() == result.model.SerializeToString()
    # onnx 1.23's strict shape inference refuses sparse inputs of Gemm/MatMul, so the run kept
    # them dense; a replay that names them stores them sparse, with the same values
    sparse = dataclasses.replace(result.plan, replay=dataclasses.replace(replay, sparse=("w1", "w2")))
    rebuilt = _rebuild(sparse, model)
    assert [t.values.name for t in rebuilt.graph.sparse_initializer] == ["w1", "w2"]
    for tensor in rebuilt.graph.sparse_initializer:
        dense = np.zeros(int(np.prod(tensor.dims)), np.float32)
        dense[numpy_helper.to_array(tensor.indices)] = numpy_helper.to_array(tensor.values)
        expected = next(t for t in result.model.graph.initializer if t.name == tensor.values.name)
        np.testing.assert_array_equal(dense.reshape(tuple(tensor.dims)), numpy_helper.to_array(expected))


def test_an_unchanged_run_replays_to_its_source() -> None:
    options = pruner.PruneOptions(metric=pruner.MetricKind.COSINE, tolerance=pruner.Tolerance(0.0), target_sparsity=0.9)
    model = original("compact")
    result = pruner.prune(model, evalset("compact"), options)
    assert result.report.status == "unchanged"
    assert result.plan.source_sha256 == result.plan.result_sha256 == pruner.model_sha256(model)
    assert pruner.apply_plan(result.plan, model).SerializeToString() == model.SerializeToString()


def test_damaged_plans_are_project_errors(tmp_path: Path) -> None:
    result = run("mlp", Mode.ZERO, Recovery.AUTO, pruner.Criterion.MAGNITUDE)
    data = result.plan.to_bytes()
    with pytest.raises(pruner.InvalidInputError, match="not a saved pruning plan"):
        pruner.PruningPlan.from_bytes(data[: len(data) // 2])
    with pytest.raises(pruner.InvalidInputError, match="not a pruning plan"):
        pruner.PruningPlan.from_json('{"mode": "sideways", "criterion": "magnitude", "layers": []}')
    with pytest.raises(pruner.InvalidInputError, match="cannot read the plan"):
        pruner.PruningPlan.load(tmp_path / "missing.npz")
    replay = result.plan.replay
    assert replay is not None
    edit = next(e for e in replay.edits if e.refit)
    short = type(edit)(edit.tensor, edit.zeroed, edit.refit[:-3])  # not even whole values
    damaged = dataclasses.replace(
        result.plan, replay=dataclasses.replace(replay, edits=tuple(short if e is edit else e for e in replay.edits))
    )
    with pytest.raises(pruner.PlanMismatchError, match=f"refit values of {edit.tensor!r}"):
        pruner.apply_plan(damaged, original("mlp"))


def test_the_digest_is_of_the_whole_model() -> None:
    model = original("mlp")
    digest = pruner.model_sha256(model)
    assert (
        digest
        == pruner.model_sha256(original("mlp"))
        == pruner.model_sha256(onnx.ModelProto.FromString(model.SerializeToString()))
    )
    assert pruner.model_sha256(perturbed(model)) != digest
    renamed = original("mlp")
    renamed.graph.name = "other"
    assert pruner.model_sha256(renamed) != digest
    relabelled = original("mlp")
    relabelled.graph.node[0].name = "other"
    assert pruner.model_sha256(relabelled) != digest


def test_a_model_read_from_a_file_with_external_data_replays_on_the_large_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a 2 GB model is too slow for a test: lower the limit so the small model takes the large path
    import pruner._evaluate
    import pruner._model

    monkeypatch.setattr(pruner._model, "PROTOBUF_LIMIT", 1000)
    monkeypatch.setattr(pruner._evaluate, "PROTOBUF_LIMIT", 1000)
    source = tmp_path / "model.onnx"
    onnx.save_model(original("cnn"), str(source), save_as_external_data=True, location="model.data", size_threshold=0)
    options = pruner.PruneOptions(
        metric=pruner.MetricKind.COSINE, tolerance=pruner.Tolerance(0.9), target_sparsity=0.3, calibration_samples=32
    )
    result = pruner.prune(source, evalset("cnn"), options)
    assert result.model_bytes is None and result.report.status == "pruned"
    replay = result.plan.replay
    assert replay is not None and any(e.refit for e in replay.edits)
    for model in (onnx.load(str(source)), pruner.load_model(source)):
        assert pruner.apply_plan(result.plan, model).SerializeToString() == result.model.SerializeToString()


def test_a_replay_that_misses_the_result_is_our_bug() -> None:
    result = run("mlp", Mode.ZERO, Recovery.NONE, pruner.Criterion.MAGNITUDE)
    replay = result.plan.replay
    assert replay is not None
    # told the run wrote back one weight fewer than it did, the plan cannot rebuild the model
    wrong = dataclasses.replace(replay, tensors=replay.tensors[1:], edits=())
    with pytest.raises(pruner.InternalError, match="does not replay to the pruned model"):
        replayable(result.plan, original("mlp"), result.model, wrong)
    tampered = dataclasses.replace(result.plan, result_sha256="0" * 64)
    with pytest.raises(pruner.InternalError, match="not the one the plan's run returned"):
        pruner.apply_plan(tampered, original("mlp"))
