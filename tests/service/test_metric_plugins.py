"""Metrics through the service: plugins installed on a real server subprocess, chosen by name;
code of the client's own through the CLI, locally only."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import onnx
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

import pruner
from service import convert
from service._gen.onnxpruner.v1 import pruner_pb2 as pb
from service._gen.onnxpruner.v1 import pruner_pb2_grpc as pb_grpc
from service.client import Connection
from tests.helpers import REPO_ROOT, tiny_mlp, tiny_mlp_evalset, write_npz
from tests.pruner.test_metrics_plugin import PLUGIN_MODULE, install_metric_plugin

TOKEN = "plugin-test-token"
QUICK = {"max_evaluations": 3, "tolerance": pruner.Tolerance(0.5)}


@dataclass(frozen=True)
class PluginServer:
    address: str
    site: Path
    """Where the plugin package is installed (on the server's PYTHONPATH only)."""


@pytest.fixture(scope="module")
def plugin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginServer]:
    """``python -m service`` with the fixture plugin package installed, wanting a bearer token."""
    site = install_metric_plugin(tmp_path_factory.mktemp("metric_plugin"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(site)]), "ONNX_PRUNER_TOKEN": TOKEN}
    server = subprocess.Popen(
        [sys.executable, "-m", "service", "--address", address],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not _serving(address):
            assert server.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server did not start serving"
            time.sleep(0.2)
        yield PluginServer(address, site)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "model.onnx"
    onnx.save_model(tiny_mlp(), str(model))
    return model, write_npz(tmp_path / "eval.npz", tiny_mlp_evalset(32))


def run_cli(
    *args: str | Path, pythonpath: Sequence[Path] = (), cwd: Path = REPO_ROOT
) -> subprocess.CompletedProcess[str]:
    """The real ``onnx-prune`` console script; PYTHONPATH is the worktree plus ``pythonpath``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [REPO_ROOT, *pythonpath])), "ONNX_PRUNER_TOKEN": TOKEN}
    return subprocess.run(
        ["onnx-prune", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


# -- the server offers its installed plugins, by name only


def test_list_metrics_lists_the_installed_plugins(plugin_server: PluginServer) -> None:
    with Connection(plugin_server.address, token=TOKEN) as connection:
        catalogue = connection.list_metrics()
    assert [m.name for m in catalogue.builtin] == [k.value for k in pruner.MetricKind]
    assert all(m.description for m in catalogue.builtin)
    plugins = {m.name: m for m in catalogue.plugins}
    assert plugins["score_gap"].source == f"{PLUGIN_MODULE}:score_gap"
    assert plugins["score_gap"].higher_is_better is False and plugins["score_gap"].error == ""
    assert "Largest absolute difference" in plugins["score_gap"].description
    assert plugins["top1_kept"].higher_is_better is True
    assert "not_a_metric" in plugins["not_a_metric"].error
    # this process has no plugin installed: the list is the server's
    assert "score_gap" not in pruner.metric_plugins()


def test_list_metrics_wants_the_token(plugin_server: PluginServer) -> None:
    with grpc.insecure_channel(plugin_server.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.PrunerServiceStub(channel).ListMetrics(pb.ListMetricsRequest(), timeout=30)  # type: ignore[no-untyped-call]
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_client_chooses_a_server_plugin_by_name(plugin_server: PluginServer, files: tuple[Path, Path]) -> None:
    model, evalset = files
    options = pruner.PruneOptions(metric=convert.server_metric("score_gap"), **QUICK)  # type: ignore[arg-type]
    with Connection(plugin_server.address, token=TOKEN) as connection:
        result = connection.prune(model, evalset, options)
    report = result.report
    assert report.metric == "score_gap"
    assert report.baseline.search == 0.0  # the unpruned model's gap from itself
    assert report.status == "pruned" and report.sparsity > 0
    assert report.final.search is not None and 0.0 <= report.final.search <= 0.5


def test_a_plugin_installed_on_both_sides_is_sent_by_name(
    plugin_server: PluginServer, files: tuple[Path, Path]
) -> None:
    model, evalset = files
    sys.path.insert(0, str(plugin_server.site))
    try:
        metric = pruner.plugin_metric("top1_kept")
        assert convert.options_to_proto(pruner.PruneOptions(metric=metric)).metric_plugin == "top1_kept"
        options = pruner.PruneOptions(metric=metric, **QUICK)  # type: ignore[arg-type]
        with Connection(plugin_server.address, token=TOKEN) as connection:
            report = connection.prune(model, evalset, options).report
    finally:
        sys.path.remove(str(plugin_server.site))
        sys.modules.pop(PLUGIN_MODULE, None)
    assert report.metric == "top1_kept"
    assert report.baseline.search == 1.0


def test_an_uninstalled_plugin_is_invalid_argument_naming_it(
    plugin_server: PluginServer, files: tuple[Path, Path]
) -> None:
    model, evalset = files
    options = pruner.PruneOptions(metric=convert.server_metric("no_such_metric"), **QUICK)  # type: ignore[arg-type]
    with Connection(plugin_server.address, token=TOKEN) as connection:
        with pytest.raises(pruner.InvalidInputError, match="no metric plugin 'no_such_metric'") as caught:
            connection.prune(model, evalset, options)
    assert "score_gap" in str(caught.value)  # the installed ones are listed
    # on the wire: INVALID_ARGUMENT with a BadRequest naming the config field
    config = convert.options_to_proto(options)
    with grpc.insecure_channel(plugin_server.address) as channel:
        stub = pb_grpc.PrunerServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as raw:
            list(stub.Prune(iter([pb.PruneRequest(config=config)]), metadata=[("authorization", f"Bearer {TOKEN}")]))
    assert raw.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(raw.value)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == "config.metric_plugin"


def test_a_plugin_that_is_not_a_metric_is_invalid_argument(
    plugin_server: PluginServer, files: tuple[Path, Path]
) -> None:
    model, evalset = files
    options = pruner.PruneOptions(metric=convert.server_metric("not_a_metric"), **QUICK)  # type: ignore[arg-type]
    with Connection(plugin_server.address, token=TOKEN) as connection:
        with pytest.raises(pruner.InvalidInputError, match="not_a_metric"):
            connection.prune(model, evalset, options)


def test_metric_and_metric_plugin_together_are_refused() -> None:
    config = pb.PruneConfig(metric=pb.METRIC_KL, metric_plugin="score_gap")
    with pytest.raises(pruner.InvalidConfigError, match="metric or metric_plugin, not both"):
        convert.options_from_proto(config)


def test_local_code_is_never_sent() -> None:
    metric = pruner.CustomMetric(name="mine", fn=lambda o, labels, r: o[:, 0])
    with pytest.raises(pruner.InvalidConfigError, match="'mine' is your own code and runs locally only"):
        convert.options_to_proto(pruner.PruneOptions(metric=metric))


def test_a_server_metric_cannot_run_locally(files: tuple[Path, Path]) -> None:
    model, evalset = files
    options = pruner.PruneOptions(metric=convert.server_metric("score_gap"), max_evaluations=1)
    with pytest.raises(pruner.InvalidConfigError, match="'score_gap' was chosen for a server"):
        pruner.prune(model, evalset, options)


# -- through the CLI


def test_cli_metric_plugin_on_the_server(plugin_server: PluginServer, files: tuple[Path, Path]) -> None:
    model, evalset = files
    out = model.parent / "pruned.onnx"
    report = model.parent / "report.json"
    done = run_cli(
        "prune", model, "--eval", evalset, "-o", out, "--report", report, "--quiet",
        "--server", plugin_server.address, "--metric-plugin", "score_gap", "--tolerance", "0.5",
        "--max-evaluations", "3",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(report.read_text())["metric"] == "score_gap"
    assert out.is_file()


def test_cli_metric_plugin_locally(plugin_server: PluginServer, files: tuple[Path, Path]) -> None:
    model, evalset = files
    report = model.parent / "report.json"
    done = run_cli(
        "prune", model, "--eval", evalset, "-o", model.parent / "pruned.onnx", "--report", report, "--quiet",
        "--metric-plugin", "top1_kept", "--max-evaluations", "3", pythonpath=[plugin_server.site],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(report.read_text())["metric"] == "top1_kept"


def test_cli_unknown_plugin_on_the_server_exits_2(plugin_server: PluginServer, files: tuple[Path, Path]) -> None:
    model, evalset = files
    done = run_cli(
        "prune", model, "--eval", evalset, "-o", model.parent / "pruned.onnx", "--quiet",
        "--server", plugin_server.address, "--metric-plugin", "no_such_metric",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "no metric plugin 'no_such_metric'" in done.stderr


def test_cli_metrics_lists_the_servers_plugins(plugin_server: PluginServer) -> None:
    done = run_cli("metrics", "--server", plugin_server.address)
    assert done.returncode == 0, done.stderr
    assert f"on the server at {plugin_server.address}" in done.stdout
    assert "score_gap" in done.stdout and "kl" in done.stdout
    listed = run_cli("metrics", "--json", "--server", plugin_server.address)
    data = json.loads(listed.stdout)
    assert {p["name"] for p in data["plugins"]} == {"score_gap", "top1_kept", "not_a_metric"}


def test_cli_metrics_lists_local_plugins(plugin_server: PluginServer) -> None:
    bare = run_cli("metrics", "--json")
    assert bare.returncode == 0, bare.stderr
    assert json.loads(bare.stdout)["plugins"] == []
    assert {m["name"] for m in json.loads(bare.stdout)["builtin"]} == {k.value for k in pruner.MetricKind}
    done = run_cli("metrics", pythonpath=[plugin_server.site])
    assert "installed here" in done.stdout
    assert "score_gap" in done.stdout and "unusable" in done.stdout  # not_a_metric


MY_METRIC = """
import numpy as np
from pathlib import Path

Path("imported").write_text("yes")  # proves the module ran

def worst_gap(outputs, labels, reference):
    \"\"\"Largest absolute difference per sample.\"\"\"
    return np.abs(outputs - reference).reshape(len(outputs), -1).max(axis=1)

worst_gap.higher_is_better = False
worst_gap.best = 0.0
"""


def test_cli_metric_module_function_runs_locally(tmp_path: Path, files: tuple[Path, Path]) -> None:
    model, evalset = files
    (tmp_path / "mymod.py").write_text(MY_METRIC)
    report = tmp_path / "report.json"
    done = run_cli(
        "prune", model, "--eval", evalset, "-o", tmp_path / "pruned.onnx", "--report", report, "--quiet",
        "--metric", "mymod:worst_gap", "--tolerance", "0.5", "--max-evaluations", "3",
        pythonpath=[tmp_path], cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    assert data["metric"] == "mymod:worst_gap"
    assert data["baseline"]["search"] == 0.0
    assert (tmp_path / "imported").read_text() == "yes"


def test_cli_metric_module_function_is_refused_for_a_server(tmp_path: Path, files: tuple[Path, Path]) -> None:
    model, evalset = files
    (tmp_path / "mymod.py").write_text(MY_METRIC)
    with socket.socket() as s:  # nobody listens: a connection attempt would exit 4, not 2
        s.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{s.getsockname()[1]}"
    done = run_cli(
        "prune", model, "--eval", evalset, "-o", tmp_path / "pruned.onnx", "--quiet",
        "--metric", "mymod:worst_gap", "--server", nobody, pythonpath=[tmp_path], cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "'mymod:worst_gap' is your own code and runs locally only" in lines[0]
    assert "--metric-plugin" in lines[0]
    assert not (tmp_path / "imported").exists()  # not even imported
    assert not (tmp_path / "pruned.onnx").exists()
