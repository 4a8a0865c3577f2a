"""End-to-end runs of pruner.prune with real onnxruntime sessions."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import pruner
from pruner import EventKind, MetricKind, PruneOptions, Tolerance
from pruner._confirm import FALLBACK_STEPS

MLP_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g ({dtype}[N, 16] x) => ({dtype}[N, 6] y) {{
    h = Gemm <transB = 1> (x, w1, b1)
    r = Relu (h)
    y = MatMul (r, w2)
}}
"""


def mlp(dtype: str = "float", batch: str = "N", seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    np_dtype = {"float": np.float32, "float16": np.float16}[dtype]
    model = onnx.parser.parse_model(MLP_TEXT.format(dtype=dtype).replace("[N,", f"[{batch},"))
    model.graph.initializer.extend(
        [
            numpy_helper.from_array((rng.standard_normal((48, 16)) * rng.random((48, 1))).astype(np_dtype), "w1"),
            numpy_helper.from_array(np.zeros(48, np_dtype), "b1"),
            numpy_helper.from_array(rng.standard_normal((48, 6)).astype(np_dtype), "w2"),
        ]
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def evalset(model: onnx.ModelProto, n: int = 400, seed: int = 1) -> pruner.EvalSet:
    dtype = np.float16 if model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else np.float32
    x = np.random.default_rng(seed).standard_normal((n, 16)).astype(dtype)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    if batch.HasField("dim_value"):
        y = np.concatenate([session.run(None, {"x": x[i : i + 1]})[0] for i in range(n)])
    else:
        y = session.run(None, {"x": x})[0]
    return pruner.EvalSet({"x": x}, y.argmax(-1).astype(np.int64))


def assert_deliverable(result: pruner.PruneResult, original: onnx.ModelProto, data: pruner.EvalSet) -> None:
    """Every returned model: full checker, same I/O, runs in onnxruntime."""
    onnx.checker.check_model(result.model, full_check=True)
    assert [i.name for i in result.model.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in result.model.graph.output] == [o.name for o in original.graph.output]
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    first = {k: v[:1] for k, v in data.inputs.items()}
    (out,) = session.run(None, first)
    assert np.isfinite(out).all()


def test_prune_zeroes_weights_within_tolerance() -> None:
    model = mlp()
    data = evalset(model)
    result = pruner.prune(model, data, PruneOptions(tolerance=Tolerance(0.05)))
    report = result.report
    assert_deliverable(result, model, data)
    assert report.status == "pruned"
    assert report.sparsity > 0.2
    assert report.baseline.search - report.final.search <= 0.05 + 1e-9
    assert report.baseline.holdout is not None and report.final.holdout is not None
    assert report.baseline.holdout - report.final.holdout <= 0.05 + 1e-9
    zeros = sum(int((numpy_helper.to_array(t) == 0).sum()) for t in result.model.graph.initializer if t.name != "b1")
    assert report.nonzero_before - report.nonzero_after == zeros
    assert 1 <= report.evaluations <= PruneOptions().max_evaluations + FALLBACK_STEPS
    assert all(c.samples <= report.samples["search"] for c in report.trace)


def test_final_metric_comes_from_the_serialized_model() -> None:
    model = mlp()
    data = evalset(model)
    result = pruner.prune(model, data, PruneOptions(tolerance=Tolerance(0.05), holdout_fraction=0.0))
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    acc = float((session.run(None, data.inputs)[0].argmax(-1) == data.labels).mean())
    assert result.report.final.search == pytest.approx(acc)
    assert result.report.final.holdout is None
    assert any("not confirmed" in n for n in result.report.notes)


def test_same_seed_same_result_and_caller_model_untouched() -> None:
    model = mlp()
    before = model.SerializeToString()
    data = evalset(model)
    options = PruneOptions(tolerance=Tolerance(0.05), seed=7)
    a = pruner.prune(model, data, options)
    b = pruner.prune(model, data, options)
    assert model.SerializeToString() == before
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert a.report.sparsity == b.report.sparsity


def test_nothing_passes_returns_original_unchanged() -> None:
    model = mlp()
    data = evalset(model)
    result = pruner.prune(model, data, PruneOptions(tolerance=Tolerance(0.0), metric=MetricKind.COSINE))
    # cosine drops below 1.0 at the first zeroed weight
    assert result.report.status == "unchanged"
    assert result.model.SerializeToString() == model.SerializeToString()
    assert result.report.nonzero_after == result.report.nonzero_before


@pytest.mark.parametrize("metric", [MetricKind.AGREEMENT, MetricKind.COSINE, MetricKind.TOPK])
def test_label_free_and_topk_metrics(metric: MetricKind) -> None:
    model = mlp()
    data = evalset(model)
    if metric is not MetricKind.TOPK:
        data = pruner.EvalSet(data.inputs)
    result = pruner.prune(model, data, PruneOptions(metric=metric, tolerance=Tolerance(0.05), top_k=2))
    assert_deliverable(result, model, data)
    assert result.report.baseline.search == pytest.approx(1.0)
    assert result.report.sparsity > 0


def test_regression_metric_lower_is_better() -> None:
    model = mlp()
    x = evalset(model).inputs["x"]
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    data = pruner.EvalSet({"x": x}, y)
    result = pruner.prune(model, data, PruneOptions(metric=MetricKind.MSE, tolerance=Tolerance(0.5, relative=True)))
    assert result.report.baseline.search == pytest.approx(0.0)
    # relative tolerance of a zero baseline allows nothing
    assert result.report.status == "unchanged"
    result = pruner.prune(model, data, PruneOptions(metric=MetricKind.MSE, tolerance=Tolerance(0.5)))
    assert result.report.final.search <= 0.5 + 1e-6
    assert result.report.sparsity > 0


def test_float16_weights_are_written_back_as_float16() -> None:
    model = mlp("float16")
    data = evalset(model)
    result = pruner.prune(model, data, PruneOptions(tolerance=Tolerance(0.05)))
    assert_deliverable(result, model, data)
    dtypes = {t.name: t.data_type for t in result.model.graph.initializer}
    assert dtypes["w1"] == onnx.TensorProto.FLOAT16
    assert result.report.sparsity > 0


def test_fixed_batch_dimension_model() -> None:
    model = mlp(batch="1")
    data = evalset(model, n=101)
    result = pruner.prune(model, data, PruneOptions(tolerance=Tolerance(0.05), batch_size=32))
    assert_deliverable(result, model, data)
    assert result.report.samples["search"] + result.report.samples["holdout"] == 101


@pytest.mark.parametrize("mode", [pruner.Mode.ZERO, pruner.Mode.REMOVE])
def test_a_negative_batch_size_is_a_dynamic_batch(mode: pruner.Mode) -> None:
    """paddle2onnx declares a dynamic batch as dim_value -1; onnxruntime runs any batch there."""
    model = mlp()
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = -1
    data = evalset(mlp(), n=200)
    result = pruner.prune(model, data, PruneOptions(mode=mode, tolerance=Tolerance(0.05), batch_size=32))
    assert_deliverable(result, model, data)
    assert result.report.samples["search"] + result.report.samples["holdout"] == 200
    assert result.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1  # declared as it was
    assert (
        result.report.nonzero_after < result.report.nonzero_before
        or result.report.bytes_after < result.report.bytes_before
    )


def test_constant_node_weight_is_pruned() -> None:
    model = mlp()
    w2 = next(t for t in model.graph.initializer if t.name == "w2")
    const = onnx.helper.make_node("Constant", [], ["w2"], value=w2)
    kept = [t for t in model.graph.initializer if t.name != "w2"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.node.insert(0, const)
    onnx.checker.check_model(model, full_check=True)
    data = evalset(model)
    result = pruner.prune(model, data, PruneOptions(tolerance=Tolerance(0.05)))
    assert_deliverable(result, model, data)
    assert "w2" in [layer.name for layer in result.report.layers]


def test_progress_events_in_order() -> None:
    model = mlp()
    events: list[pruner.ProgressEvent] = []
    pruner.prune(model, evalset(model), PruneOptions(tolerance=Tolerance(0.05)), on_progress=events.append)
    kinds = [e.kind for e in events]
    assert kinds[0] is EventKind.BASELINE
    assert kinds[-1] is EventKind.DONE
    assert EventKind.CANDIDATE in kinds and EventKind.CONFIRM in kinds
    candidates = [e for e in events if e.kind is EventKind.CANDIDATE]
    assert [e.evaluation for e in candidates] == list(range(1, len(candidates) + 1))


def test_stop_event_cancels() -> None:
    model = mlp()
    stop = threading.Event()

    def on_progress(event: pruner.ProgressEvent) -> None:
        if event.kind is EventKind.CANDIDATE:
            stop.set()

    with pytest.raises(pruner.CancelledError):
        pruner.prune(model, evalset(model), PruneOptions(), on_progress=on_progress, stop=stop)


def test_sparse_initializers_never_break_the_checker() -> None:
    model = mlp()
    data = evalset(model)
    options = PruneOptions(tolerance=Tolerance(0.3), sparse_initializers=True, layer_cap=0.9)
    result = pruner.prune(model, data, options)
    assert_deliverable(result, model, data)
    assert result.report.sparsity > 0
    assert any("sparse_initializer" in n for n in result.report.notes)


def test_include_exclude_limit_the_layers() -> None:
    model = mlp()
    data = evalset(model)
    result = pruner.prune(model, data, PruneOptions(tolerance=Tolerance(0.05), exclude=("w2",)))
    assert [layer.name for layer in result.report.layers] == ["w1"]
    assert any(s.name == "w2" and "w2" in s.reason for s in result.report.skipped)
    w2 = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "w2"))
    assert (w2 != 0).all()


def test_report_is_json() -> None:
    import json

    model = mlp()
    result = pruner.prune(model, evalset(model), PruneOptions(tolerance=Tolerance(0.05)))
    data = json.loads(result.report.to_json())
    for key in ("versions", "options", "baseline", "final", "trace", "layers", "timings", "plan"):
        assert key in data
    assert pruner.PruningPlan.from_dict(data["plan"]) == result.plan


def test_models_over_the_protobuf_limit_go_through_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a 2 GB model is too slow for a test: lower the limit so the tiny model takes the large path
    import pruner._evaluate
    import pruner._model

    monkeypatch.setattr(pruner._model, "PROTOBUF_LIMIT", 1000)
    monkeypatch.setattr(pruner._evaluate, "PROTOBUF_LIMIT", 1000)
    model = mlp()
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    onnx.save_model(
        onnx.ModelProto.FromString(model.SerializeToString()),
        str(source),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    result = pruner.prune(source, evalset(model), PruneOptions(tolerance=Tolerance(0.05)))
    assert result.model_bytes is None
    assert result.report.status == "pruned"
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    result.save(out, tmp_path / "out" / "report.json")
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned.onnx", "pruned.onnx.data", "report.json"]
    onnx.checker.check_model(str(out), full_check=True)
    reloaded = onnx.load(str(out))
    assert sum(int((numpy_helper.to_array(t) == 0).sum()) for t in reloaded.graph.initializer) > 0
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_remove_plan_replays_to_the_same_model(tmp_path: Path) -> None:
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    model = onnx.load(str(fixtures / "cnn_bn.onnx"))
    options = PruneOptions(mode=pruner.Mode.REMOVE, tolerance=Tolerance(0.02), recover=pruner.Recovery.NONE)
    result = pruner.prune(model, fixtures / "cnn_bn_eval.npz", options)
    assert result.report.status == "pruned"
    plan = pruner.PruningPlan.from_bytes(result.plan.to_bytes())
    assert pruner.check_plan(plan, model) == []
    replayed = pruner.apply_plan(plan, model)
    weights = {t.name: numpy_helper.to_array(t) for t in replayed.graph.initializer}
    for tensor in result.model.graph.initializer:
        np.testing.assert_array_equal(weights[tensor.name], numpy_helper.to_array(tensor))
    # with recovery (the default) the plan says so and replays the removal, not the refit values
    refit = pruner.prune(model, fixtures / "cnn_bn_eval.npz", PruneOptions(mode=pruner.Mode.REMOVE)).plan
    assert pruner.PruningPlan.from_json(refit.to_json()).recover is pruner.Recovery.AUTO
    wrong = pruner.PruningPlan(plan.mode, plan.criterion, (pruner.LayerPlan("nope", 1, 4),))
    assert [i.reason for i in pruner.check_plan(wrong, model)] == ["no removable channel family of this name"]


def test_remove_mode_shrinks_a_transformers_residual_stream() -> None:
    """The hidden size behind the LayerNorms goes too (approximately), and the report says so."""
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    model, evals = fixtures / "attention.onnx", fixtures / "attention_eval.npz"
    options = PruneOptions(mode=pruner.Mode.REMOVE, recover=pruner.Recovery.SEQUENTIAL)
    result = pruner.prune(model, evals, options)
    report = result.report
    stream = "onnx::MatMul_64"  # the embedding's weight: what every residual-stream writer shares
    assert any(n.startswith(f"{stream}: removing its channels is approximate") for n in report.notes)
    (layer,) = [la for la in report.layers if la.name == stream]
    assert layer.channels_before == 32 and layer.channels_after is not None and layer.channels_after < 32
    norm = next(t for t in result.model.graph.initializer if t.name == "norm2.weight")
    assert norm.dims == [layer.channels_after]
    assert report.baseline.holdout - report.final.holdout <= 0.01 + 1e-9  # type: ignore[operator]


def test_remove_mode_handles_an_encoder_as_pytorch_exports_it() -> None:
    """Computed head-split targets and a decomposed LayerNorm: heads, MLP neurons and the stream go."""
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    model, evals = fixtures / "encoder_exported.onnx", fixtures / "attention_eval.npz"
    options = PruneOptions(mode=pruner.Mode.REMOVE, tolerance=Tolerance(0.02), channel_multiple=1)
    result = pruner.prune(model, evals, options)
    report = result.report
    assert any(n.startswith("8 Reshape target(s) computed at run time") for n in report.notes)
    assert report.skipped == [pruner.SkippedWeight("head.weight", "channels", "'logits' is a graph output")]
    assert len(report.layers) == 5  # the stream, and per block its heads and MLP neurons
    stream = next(la for la in report.layers if la.channels_before == 32)
    assert stream.channels_after is not None and stream.channels_after < 32
    assert report.baseline.holdout - report.final.holdout <= 0.02 + 1e-9  # type: ignore[operator]
    session = ort.InferenceSession(result.model_bytes, providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.zeros((3, 8, 8), np.float32)})[0].shape == (3, 10)


def test_sensitivity_profile_is_reported_and_reused() -> None:
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    model, evals = fixtures / "mlp.onnx", fixtures / "mlp_eval.npz"
    first = pruner.prune(model, evals, PruneOptions(allocation=pruner.Allocation.SENSITIVITY)).report
    profile = first.sensitivity
    assert set(profile) == {la.name for la in first.layers}
    assert all(len(points) == 3 and points[0][1] <= points[-1][1] * 10 for points in profile.values())
    again = PruneOptions(allocation=pruner.Allocation.SENSITIVITY, sensitivity=json.loads(json.dumps(profile)))
    second = pruner.prune(model, evals, again).report
    assert second.nonzero_after == first.nonzero_after
    assert any("0 probes" in note for note in second.notes)
    with pytest.raises(pruner.InvalidConfigError, match="sensitivity"):
        PruneOptions(sensitivity={"w": [[0.5, float("nan")]]})


def test_a_family_whose_removal_breaks_the_model_keeps_its_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    """A channel rule that does not fit the graph (as Splits sharing their sizes once did): the
    trial removal finds the family, it is left out of the search and named, the run goes on."""
    from pruner import _remove
    from pruner._structure import analyze_structure

    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    model = onnx.load(str(fixtures / "cnn.onnx"))
    families = analyze_structure(model).families
    victim = families[1]
    real_remove = _remove.remove_components

    def faulty(model: onnx.ModelProto, structure, removed, **kwargs):  # type: ignore[no-untyped-def]
        out = real_remove(model, structure, removed, **kwargs)
        if int(victim.components[0]) in {int(c) for c in removed}:  # as if its rule were wrong
            bias = next(t for t in reversed(out.graph.initializer) if len(t.dims) == 1)
            bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 1.0, bias.name))
        return out

    monkeypatch.setattr(_remove, "remove_components", faulty)
    options = PruneOptions(
        mode=pruner.Mode.REMOVE, recover=pruner.Recovery.NONE, target_sparsity=0.3, tolerance=Tolerance(1.0)
    )
    result = pruner.prune(model, fixtures / "cnn_eval.npz", options)
    skipped = result.report.to_dict()["skipped"]
    assert [s["name"] for s in skipped if "changed the outputs" in s["reason"]] == [victim.name]
    assert result.report.bytes_after < result.report.bytes_before  # the other families went
    onnx.checker.check_model(result.model, full_check=True)


@pytest.mark.parametrize("mode", [pruner.Mode.ZERO, pruner.Mode.REMOVE])
def test_nothing_prunable_says_only_that(mode: pruner.Mode) -> None:
    model = mlp()
    data = evalset(model)
    options = PruneOptions(tolerance=Tolerance(0.05), exclude=("*",), mode=mode, recover=pruner.Recovery.LSQ)
    result = pruner.prune(model, data, options)
    report = result.report
    assert report.status == "unchanged"
    assert report.evaluations == 0 and report.trace == []
    assert report.notes == ["no prunable weights: the model is returned unchanged"]


def test_max_seconds_budget_spent_returns_the_model_unevaluated() -> None:
    model = mlp()
    data = evalset(model)
    result = pruner.prune(model, data, PruneOptions(tolerance=Tolerance(0.05), max_seconds=1e-9))
    report = result.report
    assert report.evaluations == 0 and report.trace == []
    assert report.stopped_by == "max_seconds"
    assert report.status == "unchanged" and report.nonzero_after == report.nonzero_before
