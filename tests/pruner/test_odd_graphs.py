"""Structurally odd but checker-valid graphs: each is a clear error naming the problem, or just works."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import pruner
from tests.helpers import parse, seeded

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
WEIGHTS = {"w": seeded((4, 3))}


def model(signature: str, body: str = "y = MatMul (x, w)") -> onnx.ModelProto:
    return parse(HEADER + f"g {signature} {{\n    {body}\n}}\n", WEIGHTS)


def data(labels: bool = False) -> pruner.EvalSet:
    x = seeded((64, 4), 1)
    return pruner.EvalSet({"x": x}, np.zeros(64, np.int64) if labels else None)


AGREE = pruner.PruneOptions(metric=pruner.MetricKind.AGREEMENT)


def test_a_graph_without_outputs_is_refused_when_loaded() -> None:
    odd = model("(float[N, 4] x) => ()")
    for attempt in (
        lambda: pruner.load_model(odd.SerializeToString()),
        lambda: pruner.inspect(odd),
        lambda: pruner.prune(odd, data(), AGREE),
        lambda: pruner.prune(odd, data(), pruner.PruneOptions(mode=pruner.Mode.REMOVE)),
    ):
        with pytest.raises(pruner.InvalidModelError, match="declares no outputs"):
            attempt()


def test_a_model_without_inputs_is_unsupported_by_prune_but_inspected() -> None:
    odd = model("() => (float[4, 3] y)", "y = Identity (w)")
    assert pruner.inspect(odd).total_params == 12
    with pytest.raises(pruner.UnsupportedModelError, match="no inputs"):
        pruner.prune(odd, pruner.EvalSet({}, np.zeros(8, np.int64)), AGREE)


def test_an_output_that_is_a_model_input_is_not_measured() -> None:
    odd = model("(float[N, 4] x) => (float[N, 4] x, float[N, 3] y)")
    with pytest.raises(pruner.UnsupportedModelError, match=r"'x' is a model input passed through.*'y'"):
        pruner.prune(odd, data(), AGREE)
    with pytest.raises(pruner.InvalidConfigError, match="'x' is a model input passed through"):
        pruner.prune(odd, data(), pruner.PruneOptions(metric=pruner.MetricKind.AGREEMENT, output="x"))
    result = pruner.prune(odd, data(), pruner.PruneOptions(metric=pruner.MetricKind.AGREEMENT, output="y"))
    assert result.report.output == "y"
    onnx.checker.check_model(result.model, full_check=True)


def test_an_output_that_is_an_initializer_is_not_measured() -> None:
    odd = model("(float[N, 4] x) => (float[4, 3] w, float[N, 3] y)")
    with pytest.raises(pruner.UnsupportedModelError, match="'w' is an initializer"):
        pruner.prune(odd, data(), AGREE)
    only = model("(float[N, 4] x) => (float[4, 3] w)")
    with pytest.raises(pruner.UnsupportedModelError, match=r"'w' is an initializer.*not depend on any model input"):
        pruner.prune(only, data(), pruner.PruneOptions(mode=pruner.Mode.REMOVE, metric=pruner.MetricKind.AGREEMENT))
    result = pruner.prune(odd, data(), pruner.PruneOptions(metric=pruner.MetricKind.AGREEMENT, output="y"))
    assert result.report.output == "y"


def test_an_output_computed_from_constants_only_is_not_measured() -> None:
    odd = model("(float[N, 4] x) => (float[4, 3] z, float[N, 3] y)", "y = MatMul (x, w)\n    z = Relu (w)")
    with pytest.raises(pruner.InvalidConfigError, match="'z' is computed from constants only"):
        pruner.prune(odd, data(), pruner.PruneOptions(metric=pruner.MetricKind.AGREEMENT, output="z"))


def test_an_output_no_node_produces_is_refused_by_the_checker() -> None:
    odd = parse(HEADER + "g (float[N, 4] x) => (float[N, 3] z) {\n    y = MatMul (x, w)\n}\n", WEIGHTS, check=False)
    with pytest.raises(pruner.InvalidModelError, match="'z'"):
        pruner.prune(odd, data(), AGREE)
