"""The committed gRPC stubs match the protos, and the API obeys its compatibility rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from service._gen.onnxpruner.v1 import pruner_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_are_fresh() -> None:
    done = subprocess.run(
        [sys.executable, "tools/gen_protos.py", "--check"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_every_enum_starts_with_unspecified_zero() -> None:
    # unset fields must mean "the library's default", so new values never change old clients' meaning
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values[0].number == 0 and enum.values[0].name.endswith("_UNSPECIFIED"), enum.name


def test_config_scalars_are_optional() -> None:
    # a zero that means "unset" would make e.g. seed 0 or layer_cap 0 unsayable
    config = pb.PruneConfig.DESCRIPTOR
    for field in config.fields:
        if field.type in (field.TYPE_UINT32, field.TYPE_UINT64, field.TYPE_DOUBLE):
            assert field.has_presence, field.name


def test_options_survive_the_round_trip_through_the_config() -> None:
    import pruner
    from service import convert

    cases = [
        pruner.PruneOptions(),
        pruner.PruneOptions(criterion=pruner.Criterion.ACTIVATION, recover=pruner.Recovery.LSQ),
        pruner.PruneOptions(mode=pruner.Mode.NM, recover=pruner.Recovery.SEQUENTIAL),
        pruner.PruneOptions(acceptance=pruner.AcceptanceRule.INTERVAL, confidence=0.8),
        pruner.PruneOptions(acceptance=pruner.AcceptanceRule.BOUND),
        pruner.PruneOptions(search_width=3, max_evaluations=15),
        pruner.PruneOptions(
            mode=pruner.Mode.REMOVE,
            objective=pruner.Objective.BYTES,
            channel_multiple=8,
            criterion=pruner.Criterion.L2,
            calibration_samples=64,
            target_sparsity=0.5,
            nm=(1, 8),
            sensitivity={"w": [[0.25, 0.1], [0.5, 0.2], [0.75, 0.5]]},
            allocation=pruner.Allocation.LAMP,
            metric=pruner.MetricKind.TOPK,
            top_k=3,
            output="logits",
            tolerance=pruner.Tolerance(0.02, relative=True),
            max_evaluations=20,
            max_seconds=60.0,
            seed=0,
            holdout_fraction=0.0,
            batch_size=1,
            layer_cap=0.5,
            include=("a*",),
            exclude=("b",),
            sparse_initializers=True,
        ),
    ]
    for options in cases:
        assert convert.options_from_proto(convert.options_to_proto(options)) == options


def test_every_metric_has_a_proto_value_and_a_description() -> None:
    import pruner
    from service import convert

    for kind in pruner.MetricKind:
        config = convert.options_to_proto(pruner.PruneOptions(metric=kind))
        assert pb.Metric.Name(config.metric) == f"METRIC_{kind.name}"
        assert convert.BUILTIN_METRICS[kind]


def test_every_metric_option_survives_the_round_trip() -> None:
    import pruner
    from service import convert

    kind = pruner.MetricKind
    cases = [
        pruner.PruneOptions(metric=kind.DICE, threshold=0.0, column=2),
        pruner.PruneOptions(metric=kind.IOU, threshold=-1.5),
        pruner.PruneOptions(
            metric=kind.SEQUENCE_MATCH,
            pad_id=0,
            ctc_blank=5,
            sequence_mask="attention_mask",
            output_sample_axis=1,
            input_sample_axes={"h0": 1, "c0": 2},
            recover=pruner.Recovery.NONE,
        ),
        pruner.PruneOptions(metric=kind.SEQUENCE_SIMILARITY, ctc_blank=0),
        pruner.PruneOptions(metric=kind.ACCURACY, pad_id=2**31 - 1, sequence_mask="m"),
        pruner.PruneOptions(metric=kind.KL),
        pruner.PruneOptions(metric=kind.COLUMN_MAE, column=-1),
        pruner.PruneOptions(metric=kind.RANK_CORRELATION, column=0),
        pruner.PruneOptions(metric=kind.MSE, column=3),
    ]
    for options in cases:
        config = convert.options_to_proto(options)
        assert convert.options_from_proto(pb.PruneConfig.FromString(config.SerializeToString())) == options


def test_a_plugin_metric_is_sent_by_name_only() -> None:
    import pruner
    from service import convert

    config = convert.options_to_proto(pruner.PruneOptions(metric=convert.server_metric("score_gap")))
    assert config.metric_plugin == "score_gap"
    assert config.metric == pb.METRIC_UNSPECIFIED
