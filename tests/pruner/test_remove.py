"""Remove mode's search space: channel families stand in for layers, typed as such."""

from __future__ import annotations

from pathlib import Path

import onnx

import pruner
from pruner._analysis import PrunableWeight, SkippedWeight, Unit
from pruner._remove import Remover

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_families_are_channel_units_not_weights_with_an_op_string() -> None:
    model = onnx.load(FIXTURES / "cnn.onnx")
    remover = Remover(model, pruner.PruneOptions(mode=pruner.Mode.REMOVE, recover=pruner.Recovery.NONE))
    layers = [u.layer for u in remover.space.layers]
    assert layers
    assert all(layer.unit is Unit.CHANNELS and layer.op_type == "" for layer in layers)
    assert [layer.name for layer in layers] == [f.name for f in remover.families]
    assert [layer.params for layer in layers] == [int(f.params_per_component.sum()) for f in remover.families]
    config = remover.space.at_level(0.3)
    reports, _ = remover.summary(config, remover.to_proto(config))
    assert {r.op_type for r in reports} == {Unit.CHANNELS.value}  # the report's op column


def test_weights_found_by_analysis_are_weight_units() -> None:
    inspection = pruner.inspect(FIXTURES / "cnn.onnx")
    assert inspection.layers and all(layer.unit is Unit.WEIGHT for layer in inspection.layers)
    assert all("unit" not in layer for layer in inspection.to_dict()["layers"])  # JSON as before


def test_family_constructors() -> None:
    family = PrunableWeight.family("conv1", 96)
    assert (family.unit, family.params, family.channel_axis) == (Unit.CHANNELS, 96, 0)
    assert SkippedWeight.family("conv1", "why") == SkippedWeight("conv1", "channels", "why")
