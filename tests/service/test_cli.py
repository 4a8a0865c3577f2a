"""End to end through the ``onnx-prune`` command line on every committed fixture."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import pruner
from tests.helpers import run_cli
from tests.pruner.test_analysis import recurrent_model

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
# (model, eval set): mlp_b1 has a fixed batch of 1 and shares the MLP's eval set
CASES = [
    ("mlp", "mlp"),
    ("mlp_b1", "mlp"),
    ("cnn", "cnn"),
    ("cnn_bn", "cnn_bn"),
    ("attention", "attention"),
    ("compact", "compact"),
    ("encoder_exported", "attention"),
]


def accuracy(model_path: Path, evalset: pruner.EvalSet) -> float:
    """Accuracy of a written model over the whole eval set, by a session of our own."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    fixed = session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) else 128
    right = 0
    for i in range(0, len(evalset), step):
        feeds = {k: v[i : i + step] for k, v in evalset.inputs.items()}
        (logits,) = session.run(None, feeds)
        assert evalset.labels is not None
        right += int((logits.argmax(-1) == evalset.labels[i : i + step]).sum())
    return right / len(evalset)


def assert_reported_accuracy_is_the_files(out: Path, report: dict, evalset: pruner.EvalSet) -> None:  # type: ignore[type-arg]
    """The report's final metric, over both splits, is what a fresh session of the written file measures."""
    n_search, n_hold = report["samples"]["search"], report["samples"]["holdout"]
    final = report["final"]
    overall = (final["search"] * n_search + final["holdout"] * n_hold) / (n_search + n_hold)
    assert accuracy(out, evalset) == pytest.approx(overall, abs=1e-9)


@pytest.mark.parametrize(("name", "eval_name"), CASES)
def test_prune_fixture_end_to_end(tmp_path: Path, name: str, eval_name: str) -> None:
    model_path = FIXTURES / f"{name}.onnx"
    eval_path = FIXTURES / f"{eval_name}_eval.npz"
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    proc = run_cli(
        "prune", model_path, "--eval", eval_path, "--metric", "accuracy", "--tolerance", "0.01",
        "-o", out, "--report", report_path, "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "sparsity" in proc.stdout
    assert "fits" in next(line for line in proc.stdout.splitlines() if line.startswith("wall time"))

    report = json.loads(report_path.read_text())
    original, pruned = onnx.load(str(model_path)), onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    assert [i.name for i in pruned.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in pruned.graph.output] == [o.name for o in original.graph.output]
    assert pruned.opset_import == original.opset_import

    # the report's numbers are those of the written file
    weights = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert sum(int(np.count_nonzero(weights[n])) for n in layers) == report["nonzero_after"]
    assert report["bytes_after"] == out.stat().st_size
    assert_reported_accuracy_is_the_files(out, report, pruner.load_eval_set(eval_path))
    final = report["final"]

    # within tolerance on both splits, and something was pruned: every fixture has slack at 0.01
    base = report["baseline"]
    assert base["search"] - final["search"] <= 0.01 + 1e-9
    assert base["holdout"] - final["holdout"] <= 0.01 + 1e-9
    assert report["status"] == "pruned"
    assert report["nonzero_after"] < report["nonzero_before"]
    assert report["evaluations"] <= 12 + 6  # search budget + held-out fallback (FALLBACK_STEPS)


def test_inspect_fixture_lists_layers_and_json(tmp_path: Path) -> None:
    text = run_cli("inspect", FIXTURES / "cnn_bn.onnx")
    assert text.returncode == 0, text.stderr
    as_json = run_cli("inspect", FIXTURES / "cnn_bn.onnx", "--json")
    data = json.loads(as_json.stdout)
    assert data["layers"], data
    for layer in data["layers"]:
        assert layer["name"] in text.stdout
        assert layer["op_type"] in ("Conv", "Gemm", "MatMul", "ConvTranspose")


def test_inspect_prints_every_skipped_weight(tmp_path: Path) -> None:
    path = tmp_path / "bilstm.onnx"
    onnx.save(recurrent_model("LSTM"), path)
    text = run_cli("inspect", path)
    assert text.returncode == 0, text.stderr
    assert "skipped B (LSTM): input B of rnn (LSTM): the gate biases: biases are not pruned" in text.stdout
    data = json.loads(run_cli("inspect", path, "--json").stdout)
    assert {s["name"] for s in data["skipped"]} == {"B"}
    assert {la["name"] for la in data["layers"]} == {"W", "R", "w_out"}


def test_label_free_metric_and_relative_tolerance(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    proc = run_cli(
        "prune", FIXTURES / "attention.onnx", "--eval", FIXTURES / "attention_eval.npz",
        "--metric", "cosine", "--tolerance", "0.5%", "--criterion", "l2", "-o", out, "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


@pytest.fixture
def server_address() -> Iterator[str]:
    from service.server import ServerConfig, create_server, set_serving

    server, port, health = create_server(ServerConfig(address="127.0.0.1:0"))
    server.start()
    set_serving(health, True)
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_server_mode_writes_what_local_mode_writes(tmp_path: Path, server_address: str) -> None:
    outputs = {}
    for mode in ("local", "remote"):
        out, report = tmp_path / f"{mode}.onnx", tmp_path / f"{mode}.json"
        remote = ["--server", server_address] if mode == "remote" else []
        proc = run_cli(
            "prune", FIXTURES / "cnn.onnx", "--eval", FIXTURES / "cnn_eval.npz", "--max-evaluations", "4",
            "-o", out, "--report", report, "--quiet", *remote,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        outputs[mode] = (json.loads(report.read_text()), onnx.load(str(out)), proc.stdout)
    (local_report, _, local_out), (remote_report, remote_model, remote_out) = outputs.values()
    onnx.checker.check_model(remote_model, full_check=True)
    for key in ("status", "nonzero_after", "bytes_after", "baseline", "final", "evaluations"):
        assert remote_report[key] == local_report[key], key
    assert local_out.splitlines()[:8] == remote_out.splitlines()[:8]


def test_metric_options_reach_the_report_locally_and_on_a_server(tmp_path: Path, server_address: str) -> None:
    reports = {}
    for mode in ("local", "remote"):
        report = tmp_path / f"{mode}.json"
        remote = ["--server", server_address] if mode == "remote" else []
        proc = run_cli(
            "prune", FIXTURES / "mlp.onnx", "--eval", FIXTURES / "mlp_eval.npz", "-o", tmp_path / f"{mode}.onnx",
            "--report", report, "--quiet", "--max-evaluations", "3", "--tolerance", "0.05",
            "--metric", "column_mae", "--column", "2", "--output-sample-axis", "0", "--input-sample-axis", "input=0",
            *remote,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        reports[mode] = json.loads(report.read_text())
    local, remote_report = reports["local"], reports["remote"]
    assert local["metric"] == "column_mae"
    assert local["options"]["column"] == 2 and local["options"]["input_sample_axes"] == {"input": 0}
    assert local["baseline"]["search"] == 0.0  # the unpruned model against itself
    for key in ("baseline", "final", "nonzero_after", "status"):
        assert remote_report[key] == local[key], key
    threads = {"threads"}  # the server's choice
    options = {k: v for k, v in local["options"].items() if k not in threads}
    assert {k: v for k, v in remote_report["options"].items() if k not in threads} == options


def test_server_mode_bad_input_exits_2_with_the_servers_message(tmp_path: Path, server_address: str) -> None:
    proc = run_cli(
        "prune", FIXTURES / "mlp.onnx", "--eval", FIXTURES / "cnn_eval.npz", "-o", tmp_path / "o.onnx",
        "--server", server_address,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "eval input 'input' has shape" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_server_mode_inspect(server_address: str) -> None:
    local = run_cli("inspect", FIXTURES / "compact.onnx", "--json")
    remote = run_cli("inspect", FIXTURES / "compact.onnx", "--json", "--server", server_address)
    assert remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout) == json.loads(local.stdout)


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_cli(
        "prune", FIXTURES / "mlp.onnx", "--eval", FIXTURES / "mlp_eval.npz", "-o", tmp_path / "o.onnx",
        "--server", "127.0.0.1:1",
    )  # fmt: skip
    assert proc.returncode == 4  # unreachable: retry later or elsewhere, not an internal error
    assert "cannot reach the server at 127.0.0.1:1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fail_unchanged_exits_3_when_nothing_passes(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    args = ["prune", FIXTURES / "mlp.onnx", "--eval", FIXTURES / "mlp_eval.npz", "--metric", "cosine"]
    proc = run_cli(*args, "--tolerance", "0", "--recover", "none", "-o", out, "--quiet", "--fail-unchanged")
    assert proc.returncode == 3, proc.stderr
    assert "nothing could be pruned" in proc.stderr
    assert out.exists()


@pytest.mark.parametrize(("name", "eval_name"), CASES)
def test_remove_mode_end_to_end(tmp_path: Path, name: str, eval_name: str) -> None:
    model_path, eval_path = FIXTURES / f"{name}.onnx", FIXTURES / f"{eval_name}_eval.npz"
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    proc = run_cli(
        "prune", model_path, "--eval", eval_path, "--mode", "remove", "--tolerance", "0.01",
        "-o", out, "--report", report_path, "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    pruned, original = onnx.load(str(out)), onnx.load(str(model_path))
    onnx.checker.check_model(pruned, full_check=True)
    assert [i.name for i in pruned.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in pruned.graph.output] == [o.name for o in original.graph.output]
    assert report["bytes_after"] == out.stat().st_size
    assert_reported_accuracy_is_the_files(out, report, pruner.load_eval_set(eval_path))
    final = report["final"]
    assert report["baseline"]["holdout"] - final["holdout"] <= 0.01 + 1e-9
    for layer in report["layers"]:
        assert 1 <= layer["channels_after"] <= layer["channels_before"]
    if report["status"] == "pruned":
        assert report["bytes_after"] < report["bytes_before"]
    assert any("graph output" in s["reason"] for s in report["skipped"])


def test_remove_mode_keeps_channel_multiples(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    proc = run_cli(
        "prune", FIXTURES / "cnn.onnx", "--eval", FIXTURES / "cnn_eval.npz", "--mode", "remove",
        "--channel-multiple", "8", "--tolerance", "0.02", "-o", tmp_path / "o.onnx", "--report", report_path,
        "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    layers = json.loads(report_path.read_text())["layers"]
    assert all(la["channels_after"] % 8 == 0 for la in layers if la["channels_before"] % 8 == 0), layers


def test_latency_objective(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    proc = run_cli(
        "prune", FIXTURES / "mlp.onnx", "--eval", FIXTURES / "mlp_eval.npz", "--mode", "remove",
        "--objective", "latency", "--threads", "1", "--max-evaluations", "5", "-o", tmp_path / "o.onnx",
        "--report", report_path, "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert report["options"]["objective"] == "latency"
    timed = [t for t in report["trace"] if t["passed"]]
    assert timed and all(t["latency"] > 0 for t in timed)
    assert all(t["latency"] is None for t in report["trace"] if not t["passed"])


def test_zero_mode_refuses_byte_and_latency_objectives(tmp_path: Path) -> None:
    proc = run_cli(
        "prune", FIXTURES / "mlp.onnx", "--eval", FIXTURES / "mlp_eval.npz", "--objective", "latency",
        "-o", tmp_path / "o.onnx",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "needs mode remove" in proc.stderr


@pytest.mark.parametrize("name", ["mlp", "cnn", "attention", "compact"])
@pytest.mark.parametrize(
    "method",
    [
        ["--criterion", "activation"],
        ["--recover", "bias"],
        ["--recover", "lsq", "--calibration-samples", "128"],
        ["--recover", "sequential", "--calibration-samples", "128"],
    ],
)
def test_recovery_methods_end_to_end(tmp_path: Path, name: str, method: list[str]) -> None:
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    proc = run_cli(
        "prune", FIXTURES / f"{name}.onnx", "--eval", FIXTURES / f"{name}_eval.npz", *method,
        "-o", out, "--report", report_path, "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert report["baseline"]["holdout"] - report["final"]["holdout"] <= 0.01 + 1e-9
    assert_reported_accuracy_is_the_files(out, report, pruner.load_eval_set(FIXTURES / f"{name}_eval.npz"))


@pytest.mark.parametrize("name", ["cnn", "cnn_bn", "mlp_b1"])
@pytest.mark.parametrize("recover", ["lsq", "sequential"])
def test_remove_mode_with_refit_end_to_end(tmp_path: Path, name: str, recover: str) -> None:
    evals = FIXTURES / f"{name.removesuffix('_b1')}_eval.npz"
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    proc = run_cli(
        "prune", FIXTURES / f"{name}.onnx", "--eval", evals, "--mode", "remove", "--recover", recover,
        "--calibration-samples", "128", "-o", out, "--report", report_path, "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert report["status"] == "pruned"
    assert report["baseline"]["holdout"] - report["final"]["holdout"] <= 0.01 + 1e-9
    assert report["bytes_after"] == out.stat().st_size < report["bytes_before"]


@pytest.mark.parametrize("method", [[], ["--recover", "lsq"]])
def test_nm_mode_end_to_end(tmp_path: Path, method: list[str]) -> None:
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    proc = run_cli(
        "prune", FIXTURES / "cnn.onnx", "--eval", FIXTURES / "cnn_eval.npz", "--mode", "nm", "--nm", "2:4", *method,
        "-o", out, "--report", report_path, "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert report["status"] == "pruned" and report["plan"]["nm"] == [2, 4]
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    layers = pruner.inspect(FIXTURES / "cnn.onnx").layers
    converted = [la for la in layers if la.name in {p["tensor"] for p in report["plan"]["layers"] if p["amount"]}]
    assert converted
    for layer in converted:
        from pruner._nm import reduction_axis

        groups = np.moveaxis(weights[layer.name], reduction_axis(layer), -1).reshape(-1, 4)
        assert (np.count_nonzero(groups, axis=1) <= 2).all()
    assert report["baseline"]["holdout"] - report["final"]["holdout"] <= 0.01 + 1e-9


def test_nm_plan_replays(tmp_path: Path) -> None:
    options = pruner.PruneOptions(mode=pruner.Mode.NM, recover=pruner.Recovery.NONE)  # exact values: no refit
    result = pruner.prune(FIXTURES / "mlp.onnx", FIXTURES / "mlp_eval.npz", options)
    plan = pruner.PruningPlan.from_bytes(result.plan.to_bytes())
    replayed = pruner.apply_plan(plan, onnx.load(str(FIXTURES / "mlp.onnx")))
    expected = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    for tensor in replayed.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), expected[tensor.name])


def test_plot_and_html_are_written_with_the_runs_numbers(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra (pip install 'onnx-pruner[plot]')")
    files = {
        k: tmp_path / v for k, v in {"out": "o.onnx", "report": "r.json", "plot": "p.png", "html": "r.html"}.items()
    }
    proc = run_cli(
        "prune", FIXTURES / "cnn_bn.onnx", "--eval", FIXTURES / "cnn_bn_eval.npz", "--mode", "remove",
        "-o", files["out"], "--report", files["report"], "--plot", files["plot"], "--html", files["html"], "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(files["report"].read_text())
    page = files["html"].read_text()
    assert "data:image/png;base64," in page
    assert f"{report['final']['search']:.4f}" in page and f"{report['sparsity']:.1%}" in page
    for layer in report["layers"]:
        assert layer["name"] in page and f"{layer['channels_before']} → {layer['channels_after']}" in page
    assert page.count("<tr>") >= len(report["trace"]) + len(report["layers"])


def test_plot_without_matplotlib_says_how_to_install(tmp_path: Path) -> None:
    # a site dir shadowing matplotlib with a module that fails to import
    fake = tmp_path / "site"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "prune", str(FIXTURES / "mlp.onnx"), "--eval",
         str(FIXTURES / "mlp_eval.npz"), "-o", str(tmp_path / "o.onnx"), "--plot", str(tmp_path / "p.png")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "pip install 'onnx-pruner[plot]'" in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("width", ["0", "17"])
def test_a_search_width_out_of_range_exits_2_naming_it(tmp_path: Path, width: str) -> None:
    proc = run_cli(
        "prune", FIXTURES / "mlp.onnx", "--eval", FIXTURES / "mlp_eval.npz", "-o", tmp_path / "o.onnx",
        "--search-width", width,
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"search_width must be an integer in [1, 16], got {width}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_search_width_reaches_the_run_and_its_report(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    proc = run_cli(
        "prune", FIXTURES / "mlp.onnx", "--eval", FIXTURES / "mlp_eval.npz", "-o", tmp_path / "o.onnx",
        "--search-width", "2", "--max-evaluations", "4", "--report", report, "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    written = json.loads(report.read_text())
    assert written["options"]["search_width"] == 2
    assert [t["index"] for t in written["trace"][:2]] == [1, 2]
    assert [t["sparsity"] for t in written["trace"][:2]] == pytest.approx([0.33, 0.66], abs=0.015)
