"""The Ray executor on a real two-node Ray cluster: the same model and report as the local executor.

The cluster (``tests/ray_cluster.py``: a head and one more worker node, one CPU each, started
with ``ray start`` as separate processes) is started once for the module and stopped at teardown.
The tests need the ``ray`` extra and are skipped without it, except under PRUNER_CI_REQUIRE_RAY=1
(CI's Ray step), where a missing extra fails them. The tests of the options and of the missing
extra need no cluster.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import pruner
from pruner import AcceptanceRule, Executor, InvalidConfigError, Mode, PruneOptions, ResourceLimitError
from tests.ray_cluster import HAVE_RAY, ROOT, Cluster, free_port, running_cluster

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with running_cluster() as started:
        yield started


def _run(name: str, executor: Executor, on_progress: Any = None, **options: Any) -> tuple[str, dict[str, Any]]:
    """The sha256 of the returned model, and the report's figures (what does not depend on where
    or how fast it ran: no timings, no executor options, no per-candidate seconds)."""
    result = pruner.prune(
        FIXTURES / f"{name}.onnx",
        FIXTURES / f"{name}_eval.npz",
        PruneOptions(executor=executor, **options),
        on_progress=on_progress,
    )
    model = result.model_bytes or result.model.SerializeToString()
    figures = json.loads(result.report.to_json())
    del figures["timings"]
    for key in ("executor", "ray_address", "executor_workers"):
        del figures["options"][key]
    for record in figures["trace"]:
        del record["seconds"]
    # fed weights or built sessions is chosen by timing both (either way the same outputs)
    figures["notes"] = [n for n in figures["notes"] if not n.startswith("candidates ran")]
    return hashlib.sha256(model).hexdigest(), figures


def _mlp_batches() -> tuple[bytes, Any]:
    """The mlp fixture's bytes and its eval set's batches of 16 (``Batches``; ``.output`` its output)."""
    from pruner._evalset import load_eval_set, model_inputs
    from pruner._evaluate import Batches

    model = (FIXTURES / "mlp.onnx").read_bytes()
    proto = onnx.load_from_string(model)
    data = load_eval_set(FIXTURES / "mlp_eval.npz")
    return model, Batches(model_inputs(proto), proto.graph.output[0].name, data, batch_size=16)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("mlp", {}),  # zero mode, least-squares recovery: the calibration pass is sharded too
        ("cnn_bn", {"mode": Mode.REMOVE}),  # every candidate a rebuilt model, sent as bytes
        ("mlp", {"acceptance": AcceptanceRule.INTERVAL}),  # the held-out scores of the confirmation
    ],
)
def test_ray_gives_the_local_model_and_report(cluster: Cluster, name: str, options: dict[str, Any]) -> None:
    local_sha, local_figures = _run(name, Executor.LOCAL, **options)
    ray_sha, ray_figures = _run(name, Executor.RAY, **options)
    assert ray_sha == local_sha
    assert ray_figures == local_figures
    assert ray_figures["evaluations"] > 1 and ray_figures["status"] == "pruned"


def test_a_worker_killed_mid_run_has_its_pieces_run_again(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    local_sha, local_figures = _run("mlp", Executor.LOCAL)
    killed: list[int] = []

    def kill_a_worker(event: pruner.ProgressEvent) -> None:
        if killed or event.kind is not pruner.EventKind.CANDIDATE:
            return
        # the worker actor on the second node: a process under that node's raylet
        workers = [pid for pid, line in cluster.descendants(cluster.nodes[1].pid) if line.startswith("ray::_Worker")]
        assert workers, "no executor worker runs on the second node"
        os.kill(workers[0], signal.SIGKILL)
        killed.append(workers[0])

    with caplog.at_level(logging.WARNING, logger="pruner._ray"):
        sha, figures = _run("mlp", Executor.RAY, on_progress=kill_a_worker)
    assert killed
    assert any("died" in r.getMessage() and "run again on the 1 left" in r.getMessage() for r in caplog.records)
    assert sha == local_sha
    assert figures == local_figures


def test_every_worker_dead_is_a_clear_error_not_a_hang(cluster: Cluster) -> None:
    from pruner._evaluate import PortableRunner
    from pruner._ray import RayExecutor

    model, batches = _mlp_batches()
    output, data = batches.output, batches.evalset
    executor = RayExecutor(None, 2)
    try:
        runner = PortableRunner(output, model=lambda: model)
        pieces = batches.pieces(np.arange(len(data)))
        expected = batches.outputs(runner, np.arange(len(data)))
        assert np.array_equal(np.concatenate(list(executor.outputs(batches, runner, pieces))), expected)
        for pid in executor.pids():
            os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(ResourceLimitError, match="every Ray worker of the run died"):
            list(executor.outputs(batches, PortableRunner(output, model=lambda: model), pieces))
        assert time.monotonic() - start < 120  # Ray's own failure detection; a hang would be the test's timeout
    finally:
        executor.close()


def _perturbed_mlp() -> bytes:
    """The fixture MLP with half of its first weight's rows zeroed: a model whose metric is not the baseline's."""
    model = onnx.load(FIXTURES / "mlp.onnx")
    tensor = model.graph.initializer[0]
    weight = onnx.numpy_helper.to_array(tensor).copy()
    weight[: len(weight) // 2] = 0
    tensor.CopyFrom(onnx.numpy_helper.from_array(weight, tensor.name))
    return model.SerializeToString()


def _driver_side(executor: Any) -> tuple[Any, Any, Any]:
    """The load and baseline phases of the fixture MLP run with ``executor``: what the final check
    and the confirmation are made of."""
    from pruner._phases import load, measure_baseline

    options = PruneOptions()
    loaded, owned = load(FIXTURES / "mlp.onnx", FIXTURES / "mlp_eval.npz", options, None)
    loaded.batches.executor = executor
    baseline = measure_baseline(owned, loaded, options.tolerance, options.threads)
    return options, loaded, baseline


def test_the_final_check_runs_the_written_bytes_on_the_workers(cluster: Cluster) -> None:
    from pruner._executor import LocalExecutor
    from pruner._phases import FinalCheck
    from pruner._ray import RayExecutor

    written = _perturbed_mlp()
    checked = {}
    for name, executor in (("local", LocalExecutor()), ("ray", RayExecutor(None, 2))):
        try:
            options, loaded, baseline = _driver_side(executor)
            check = FinalCheck(baseline.evaluator, loaded.io_names, loaded.search_idx, loaded.hold_idx, options.threads)
            before = executor.rows_run() if isinstance(executor, RayExecutor) else []
            checked[name] = check(written, ())
            if isinstance(executor, RayExecutor):
                ran = [after - b for after, b in zip(executor.rows_run(), before, strict=True)]
                # every row of both splits went through a worker's session of the bytes, none through the driver's
                assert sum(ran) == len(loaded.search_idx) + len(loaded.hold_idx)
                assert all(n > 0 for n in ran), ran
        finally:
            executor.close()
    local, ray = checked["local"], checked["ray"]
    assert ray.final == local.final
    assert local.final.search != baseline.metric.search  # a model the baseline's figures could not stand for
    assert local.hold_scores is not None and ray.hold_scores is not None
    assert np.array_equal(ray.hold_scores, local.hold_scores)
    assert ray.model_bytes == local.model_bytes == written


def test_the_confirmation_scores_the_held_out_split_on_the_workers(cluster: Cluster) -> None:
    from pruner._confirm import HeldOut
    from pruner._evaluate import PortableRunner
    from pruner._executor import LocalExecutor
    from pruner._ray import RayExecutor

    written = _perturbed_mlp()
    scores, passes = {}, {}
    for name, executor in (("local", LocalExecutor()), ("ray", RayExecutor(None, 2))):
        try:
            options, loaded, baseline = _driver_side(executor)
            held_out = HeldOut.of(
                baseline.evaluator,
                loaded.hold_idx,
                baseline.metric.holdout,
                options.tolerance,
                AcceptanceRule.INTERVAL,
                options.confidence,
            )
            before = executor.rows_run() if isinstance(executor, RayExecutor) else []
            scores[name] = held_out.scores(PortableRunner(loaded.batches.output, model=lambda: written))
            if isinstance(executor, RayExecutor):
                ran = [after - b for after, b in zip(executor.rows_run(), before, strict=True)]
                assert sum(ran) == len(loaded.hold_idx)  # every held-out row on a worker, none on the driver
                assert all(n > 0 for n in ran), ran
            passes[name] = held_out.passes(PortableRunner(loaded.batches.output, model=lambda: written))
        finally:
            executor.close()
    assert np.array_equal(scores["ray"], scores["local"])
    assert len(scores["local"]) == len(loaded.hold_idx)
    assert passes["ray"] == passes["local"]


def test_the_pieces_left_queued_by_an_early_stop_are_skipped_not_run(cluster: Cluster) -> None:
    import ray

    from pruner._evaluate import PortableRunner
    from pruner._ray import RayExecutor

    model, batches = _mlp_batches()
    output, data = batches.output, batches.evalset
    executor = RayExecutor(None, 2)
    try:
        runner = PortableRunner(output, model=lambda: model)
        pieces = batches.pieces(np.arange(len(data)))
        outputs = executor.outputs(batches, runner, pieces)
        assert np.array_equal(next(outputs), batches.outputs(runner, pieces[0]))
        outputs.close()  # as an early stop does: the call is marked abandoned
        assert len(executor._abandoned) == 1
        # a piece of that call that a worker has not started yet returns at once, unrun
        shipped, spec, worker = executor._batches_ref(batches), executor._spec(runner), executor._actors[0]
        before = executor.rows_run()
        assert ray.get(worker.outputs.remote(shipped, spec, pieces[1], executor._abandoned[0])) is None
        assert executor.rows_run() == before
        fresh = ray.get(worker.outputs.remote(shipped, spec, pieces[1], "another call"))
        assert np.array_equal(fresh, batches.outputs(runner, pieces[1]))
        # a call read to its end is not marked
        assert np.array_equal(
            np.concatenate(list(executor.outputs(batches, runner, pieces))),
            batches.outputs(runner, np.arange(len(data))),
        )
        assert len(executor._abandoned) == 1
    finally:
        executor.close()
    assert executor._abandoned == []


def test_a_worker_that_is_held_up_runs_fewer_batches_and_the_outputs_stay_in_order(cluster: Cluster) -> None:
    import ray

    from pruner._evaluate import PortableRunner
    from pruner._ray import IN_FLIGHT, WINDOW, RayExecutor

    model, batches = _mlp_batches()
    output = batches.output
    executor = RayExecutor(None, 2)
    try:
        runner = PortableRunner(output, model=lambda: model)
        rows = np.arange(16 * 2 * WINDOW)  # as many batches as the window holds
        pieces = batches.pieces(rows)
        expected = batches.outputs(runner, rows)
        assert np.array_equal(np.concatenate(list(executor.outputs(batches, runner, pieces))), expected)
        before = executor.rows_run()

        # worker 0 is held up (a slow node, or the driver beside it): a task of 4 s ahead of ours
        def sleep(session: Any, evalset: Any, seconds: float) -> float:  # pickled by value: a local function
            time.sleep(seconds)
            return seconds

        shipped, sent = executor._batches_ref(batches), [ray.put(model)]
        held = executor._actors[0].map_model.remote(shipped, sent, sleep, 4.0, None)
        got = np.concatenate(list(executor.outputs(batches, runner, pieces)))
        ray.get(held)
        assert np.array_equal(got, expected)  # the same outputs, in order, whichever worker ran them
        ran = [(after - b) // 16 for after, b in zip(executor.rows_run(), before, strict=True)]
        assert sum(ran) == 2 * WINDOW
        # the first batch waits behind the slow task; the other worker takes every batch after
        # its share of the first round (in turn, it would have taken only half of them)
        assert ran[0] <= IN_FLIGHT and ran[1] >= 2 * WINDOW - IN_FLIGHT, ran
    finally:
        executor.close()


def test_a_run_s_workers_start_together_or_wait_together(cluster: Cluster) -> None:
    """Two runs sharing a cluster must not each take some of the CPUs the other's workers wait for
    (both would wait for ever): a run's workers are one placement group, placed all at once."""
    import threading

    import ray

    from pruner._evaluate import PortableRunner
    from pruner._ray import RayExecutor

    model, batches = _mlp_batches()
    output = batches.output
    runner = PortableRunner(output, model=lambda: model)
    rows = np.arange(64)

    class Holder:  # pickled by value: a local class
        def ping(self) -> int:
            return os.getpid()

    holder = ray.remote(num_cpus=1)(Holder).remote()  # another run's worker, holding one of the 2 CPUs
    ray.get(holder.ping.remote())
    before = set(cluster.processes("ray::_Worker"))
    executor = RayExecutor(None, 2)
    got: list[np.ndarray] = []
    reader = threading.Thread(target=lambda: got.extend(executor.outputs(batches, runner, batches.pieces(rows))))
    try:
        reader.start()
        time.sleep(5.0)
        # neither worker started on the one free CPU: they wait together
        assert set(cluster.processes("ray::_Worker")) - before == set()
        assert reader.is_alive() and not got
        ray.kill(holder)  # the other run ends: both start, and the run goes on
        reader.join(120)
        assert not reader.is_alive()
        assert np.array_equal(np.concatenate(got), batches.outputs(runner, rows))
    finally:
        ray.kill(holder)
        executor.close()
        reader.join(30)


def test_more_workers_than_the_cluster_has_cpus_is_a_config_error(cluster: Cluster) -> None:
    options = PruneOptions(executor=Executor.RAY, executor_workers=3)
    with pytest.raises(InvalidConfigError, match="executor_workers 3 is more than the Ray cluster's 2 CPU"):
        pruner.prune(FIXTURES / "mlp.onnx", FIXTURES / "mlp_eval.npz", options)


def test_ray_options_are_checked() -> None:
    with pytest.raises(InvalidConfigError, match="ray_address and executor_workers need executor ray"):
        PruneOptions(ray_address="127.0.0.1:6379")
    with pytest.raises(InvalidConfigError, match="executor_workers"):
        PruneOptions(executor=Executor.RAY, executor_workers=-1)
    with pytest.raises(InvalidConfigError, match="executor must be one of: local, ray"):
        PruneOptions(executor="ray")  # type: ignore[arg-type]


def test_executor_workers_without_executor_ray_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    args = ["prune", str(FIXTURES / "mlp.onnx"), "--eval", str(FIXTURES / "mlp_eval.npz"), "--quiet"]
    assert main([*args, "-o", str(tmp_path / "out.onnx"), "--executor-workers", "2"]) == 2
    assert "executor_workers need executor ray" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


def test_executor_ray_without_the_extra_exits_2_naming_it(tmp_path: Path) -> None:
    # ray blocked in a subprocess: the CLI exits 2 with a message naming the extra and writes
    # nothing, and the default (local) run needs no ray at all
    out = tmp_path / "out.onnx"
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["ray"] = None
        import pruner
        from service.cli import main
        model, data = {str(FIXTURES / "mlp.onnx")!r}, {str(FIXTURES / "mlp_eval.npz")!r}
        local = pruner.prune(model, data, pruner.PruneOptions(max_evaluations=2))
        assert local.report.evaluations >= 1
        sys.exit(main(["prune", model, "--eval", data, "-o", {str(out)!r}, "--executor", "ray", "--quiet"]))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert "pip install 'onnx-pruner[ray]'" in done.stderr
    assert not out.exists()


def test_the_cli_refuses_executor_ray_for_a_server_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    out = tmp_path / "out.onnx"
    args = ["prune", str(FIXTURES / "mlp.onnx"), "--eval", str(FIXTURES / "mlp_eval.npz"), "-o", str(out)]
    assert main([*args, "--executor", "ray", "--server", "127.0.0.1:1", "--quiet"]) == 2
    assert "--executor ray is for local runs" in capsys.readouterr().err
    assert not out.exists()


def test_the_cli_on_the_cluster_writes_the_local_model(cluster: Cluster, tmp_path: Path) -> None:
    from service.cli import main

    args = ["prune", str(FIXTURES / "cnn.onnx"), "--eval", str(FIXTURES / "cnn_eval.npz"), "--quiet"]
    assert main([*args, "-o", str(tmp_path / "local.onnx")]) == 0
    assert main([*args, "-o", str(tmp_path / "ray.onnx"), "--executor", "ray", "--ray-address", cluster.address]) == 0
    assert (tmp_path / "ray.onnx").read_bytes() == (tmp_path / "local.onnx").read_bytes()
    one = ["-o", str(tmp_path / "one.onnx"), "--executor", "ray", "--ray-address", cluster.address]
    assert main([*args, *one, "--executor-workers", "1"]) == 0  # one of the cluster's 2 CPUs
    assert (tmp_path / "one.onnx").read_bytes() == (tmp_path / "local.onnx").read_bytes()


def test_a_driver_outside_the_cluster_runs_through_ray_client(cluster: Cluster, tmp_path: Path) -> None:
    """``--ray-address ray://HEAD:PORT`` (Ray Client): the CLI in a process of its own, not a node of
    the cluster, gives the local model."""
    args = ["prune", str(FIXTURES / "mlp.onnx"), "--eval", str(FIXTURES / "mlp_eval.npz"), "--quiet"]
    run = [sys.executable, "-m", "service.cli", *args]
    local = subprocess.run([*run, "-o", str(tmp_path / "local.onnx")], capture_output=True, text=True, cwd=ROOT)
    assert local.returncode == 0, local.stderr
    for attempt in range(2):
        remote = subprocess.run(
            [*run, "-o", str(tmp_path / "ray.onnx"), "--executor", "ray", "--ray-address", cluster.client_address],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=cluster.env,
            timeout=600,
        )
        # Ray's client proxy now and then loses the per-client server it forks: it exits at once, its
        # logs empty, and the proxy says "Starting Ray client server failed" or, when it reads the
        # dead child's command line first, raises psutil's ZombieProcess. Ray's flake, not ours, so
        # one more try
        lost = ("Starting Ray client server failed", "ZombieProcess")
        if attempt == 0 and any(sign in remote.stderr for sign in lost):
            continue
        break
    assert remote.returncode == 0, remote.stderr
    assert (tmp_path / "ray.onnx").read_bytes() == (tmp_path / "local.onnx").read_bytes()


def test_a_node_lost_mid_run_has_its_pieces_run_on_the_node_left() -> None:
    """The worker node dies whole (its raylet, object store, agents and the run's worker on it, as a
    machine lost): the run goes on with the head's worker and returns the local model. A driver
    process of its own on a cluster of its own, which this process does not join: the module's
    cluster stays whole."""
    options = {"batch_size": 1, "max_evaluations": 6}
    local_sha, _ = _run("mlp", Executor.LOCAL, **options)
    driver = textwrap.dedent(
        f"""
        import hashlib, sys
        import pruner
        from pruner import Executor, PruneOptions
        options = PruneOptions(executor=Executor.RAY, ray_address=sys.argv[1], **{options!r})
        def show(event):
            print(event.kind.value, flush=True)
        model, evalset = {str(FIXTURES / "mlp.onnx")!r}, {str(FIXTURES / "mlp_eval.npz")!r}
        result = pruner.prune(model, evalset, options, on_progress=show)
        print("sha256", hashlib.sha256(result.model_bytes).hexdigest(), flush=True)
        """
    )
    with running_cluster(join=False) as own:
        run = subprocess.Popen(
            [sys.executable, "-c", driver, own.address],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=own.env,
        )
        try:
            assert run.stdout is not None
            seen = []
            for line in run.stdout:  # the first candidate: the search is under way on both nodes
                seen.append(line)
                if line.strip() == pruner.EventKind.CANDIDATE.value:
                    break
            assert run.poll() is None, "".join(seen)
            os.killpg(own.nodes[1].pid, signal.SIGKILL)
            out, err = run.communicate(timeout=600)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait(30)
    assert run.returncode == 0, err
    assert "died" in err and "run again on the 1 left" in err  # the executor's warning
    assert f"sha256 {local_sha}" in out.splitlines()


def test_a_server_job_runs_on_the_cluster_and_gives_the_local_model(cluster: Cluster, tmp_path: Path) -> None:
    """``python -m service --executor ray``: each stored job's process drives the cluster."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from service.cli import main

    address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "service", "--address", address, "--artifacts", str(tmp_path / "store")]
    command += ["--runtime-dir", str(tmp_path / "run"), "--executor", "ray", "--ray-address", cluster.address]
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=log)
    try:
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            while True:
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                        break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                    time.sleep(0.5)
        args = ["prune", str(FIXTURES / "cnn.onnx"), "--eval", str(FIXTURES / "cnn_eval.npz"), "--quiet"]
        assert main([*args, "-o", str(tmp_path / "local.onnx")]) == 0
        remote = [*args, "-o", str(tmp_path / "job.onnx"), "--report", str(tmp_path / "job.json")]
        assert main([*remote, "--server", address]) == 0, (tmp_path / "server.log").read_text()
        assert (tmp_path / "job.onnx").read_bytes() == (tmp_path / "local.onnx").read_bytes()
        options = json.loads((tmp_path / "job.json").read_text())["options"]
        assert (options["executor"], options["ray_address"]) == ("ray", cluster.address)
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def test_a_server_refuses_executor_ray_without_the_extra_or_an_executor_it_does_not_know() -> None:
    from service.server import ServerConfig

    with pytest.raises(ValueError, match="executor must be local or ray"):
        ServerConfig(executor="dask")
    with pytest.raises(ValueError, match="ray_address needs executor ray"):
        ServerConfig(ray_address="127.0.0.1:6379")
    with pytest.raises(ValueError, match="ray_workers needs executor ray"):
        ServerConfig(ray_workers=2)
    if HAVE_RAY:
        with pytest.raises(ValueError, match=r"ray_workers must be 0 .* got -1"):
            ServerConfig(executor="ray", ray_workers=-1)
    if not HAVE_RAY:
        with pytest.raises(ValueError, match=r"pip install 'onnx-pruner\[ray\]'"):
            ServerConfig(executor="ray")


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("mlp", {"search_width": 2}),  # fed weights: each candidate's weights in the store at once
        ("cnn_bn", {"mode": Mode.REMOVE, "search_width": 2}),  # rebuilt models, sent as bytes
    ],
)
def test_a_k_section_on_ray_gives_the_local_model_and_report(
    cluster: Cluster, name: str, options: dict[str, Any]
) -> None:
    local_sha, local_figures = _run(name, Executor.LOCAL, **options)
    ray_sha, ray_figures = _run(name, Executor.RAY, **options)
    assert ray_sha == local_sha
    assert ray_figures == local_figures
    assert ray_figures["options"]["search_width"] == 2
    assert [t["phase"] for t in ray_figures["trace"][:2]] == ["bisect", "bisect"]


def test_ray_runs_the_candidates_of_a_round_together_each_stopping_on_its_own(cluster: Cluster) -> None:
    from pruner._evaluate import PortableRunner
    from pruner._ray import IN_FLIGHT, RayExecutor

    model, batches = _mlp_batches()
    proto, output = onnx.load_from_string(model), batches.output
    rows = np.arange(32)  # 2 batches a candidate: one candidate alone leaves workers idle
    pieces = batches.pieces(rows)
    variants = []
    for scale in (1.0, 0.5, 0.25):
        changed = onnx.load_from_string(model)
        changed.graph.initializer[0].CopyFrom(
            onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(proto.graph.initializer[0]) * scale, "w")
        )
        changed.graph.initializer[0].name = proto.graph.initializer[0].name
        variants.append(changed.SerializeToString())
    executor = RayExecutor(None, 2)
    try:
        jobs = [(lambda v=v: PortableRunner(output, model=lambda: v), pieces) for v in variants]
        streams = executor.outputs_many(batches, jobs)
        first = next(streams[0])
        wave = streams[0].gi_frame.f_locals["self"]  # the streams' shared schedule
        # the second candidate's batches went out while the first's were read (a window of 2 a worker)
        assert wave.sent > IN_FLIGHT * 2 - 1
        streams[0].close()  # an early stop of the first: the others go on
        rest = [np.concatenate(list(s)) for s in streams[1:]]
        expected = [batches.outputs(PortableRunner(output, model=lambda v=v: v), rows) for v in variants]
        assert np.array_equal(first, expected[0][: len(first)])
        assert all(np.array_equal(a, b) for a, b in zip(rest, expected[1:], strict=True))
        assert not np.array_equal(expected[1], expected[2])  # the premise: different candidates
    finally:
        executor.close()


def test_probe_rows_computed_again_on_the_workers_give_the_local_results(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe rows' whole outputs are bigger than the model here, so the baseline keeps the model's
    bytes and runs them again on the first probe (``Evaluator.deferred``): on Ray, through the workers."""
    from pruner import MetricKind, Tolerance
    from tests.pruner.test_reference import count_reruns, wide_tagger

    model, data = wide_tagger()
    reruns = count_reruns(monkeypatch)
    results = []
    for executor in (Executor.LOCAL, Executor.RAY):
        where = {"executor": executor, "ray_address": cluster.address} if executor is Executor.RAY else {}
        options = PruneOptions(metric=MetricKind.AGREEMENT, tolerance=Tolerance(0.05), **where)
        result = pruner.prune(model, data, options)
        figures = json.loads(result.report.to_json())
        del figures["timings"], figures["options"]
        for record in figures["trace"]:
            del record["seconds"]
        figures["notes"] = [n for n in figures["notes"] if not n.startswith("candidates ran")]
        results.append((result.model.SerializeToString(), figures))
    assert reruns == [128, 128]  # each run computed the probe rows again, once
    assert results[0] == results[1]
