"""Wall time of one pruning run on Ray with 1 worker and with 2 workers (one thread each).

    python bench/ray_scaling.py                      # minilm, 2 repeats, writes bench/results/ray_scaling.txt
    python bench/ray_scaling.py --repeats 1 --max-evaluations 4 --no-write
    python bench/ray_scaling.py --samples 2400 --append    # a larger eval set, table added
    python bench/ray_scaling.py --cluster local --append   # one local Ray in this session, table added

The zoo's largest model (all-MiniLM-L6-v2, 86 MB: ``bench/zoo.py`` builds and caches it in
``~/.cache/onnx-pruner-zoo``) and its cached sentence eval sets (both, 600 samples; ``--samples``
picks another count of the zoo's sentences: the run's fixed costs stay, its rows grow). A Ray cluster
of 2 CPUs is started (by default two nodes of one CPU, as ``tests/pruner/test_ray.py`` starts
them); each run starts its workers (Ray actors, one CPU and one onnxruntime thread each) and
stops them. Runs alternate 1 and 2 workers, repeated, so that a
change of the machine's load hits both; ``uptime`` is recorded with every run. Every run must
return the same model (sha256): the executor changes where the work runs, not what it computes.

Columns: the whole run's wall time, the search phase's (candidate evaluations and probes), and
the 1-worker / 2-worker ratio of each; and the search's driver time between evaluations (the
search phase minus its evaluations' own seconds: building each candidate's weights, serial on
the driver). Every phase that runs rows is sharded over the workers: the baseline, the search,
the held-out confirmation and the final check of the written model (its serialized bytes, a
fresh session on each worker); loading, the unit scores, each candidate's weights and the
write's build and checker run on the driver, a third process on this machine's 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pruner
from pruner import Executor, MetricKind, PruneOptions, Recovery

CACHE = Path(os.environ.get("ONNX_PRUNER_ZOO_CACHE", Path.home() / ".cache" / "onnx-pruner-zoo"))
RESULTS = Path(__file__).resolve().parent / "results" / "ray_scaling.txt"
SETS = ("sentences_200_0.npz", "sentences_400_1.npz")
CLUSTERS = {
    "nodes": "a head and a worker node, 1 CPU each, each in a session of its own",
    "local": "ray.init(num_cpus=2) in the bench's own session",
}


def load_set(samples: int) -> pruner.EvalSet:
    """600 samples: both cached sentence sets, as ``bench/zoo.py`` reads them (``i_`` prefix
    stripped); any other count: that many sentences of the zoo's eval half (built and cached by
    ``bench/zoo.py``'s ``dataset``)."""
    if samples != 600:
        from zoo import dataset

        inputs, _ = dataset("minilm", samples, 0)
        return pruner.EvalSet(inputs)
    parts: dict[str, list[np.ndarray]] = {}
    for name in SETS:
        with np.load(CACHE / "data" / name) as z:
            for key in z.files:
                if key.startswith("i_"):
                    parts.setdefault(key[2:], []).append(z[key])
    return pruner.EvalSet({k: np.concatenate(v) for k, v in parts.items()})


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (sockets held open until all are chosen: one at a time, the
    kernel may hand one out twice, and a node refuses to start)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


def start_nodes() -> tuple[list[subprocess.Popen[bytes]], str]:
    """A head and a worker node of one CPU each (``ray start --block``, each in its own session and
    process group), on free loopback ports; stopped by ``stop_node``."""
    root = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))
    names = (
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    )
    port, client, *free = _free_ports(2 + 2 * len(names))
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "RAY_AUTH_MODE": "disabled"}
    nodes = []
    for extra in (
        [
            "--head",
            f"--port={port}",
            f"--temp-dir={root}",
            "--include-dashboard=false",
            f"--ray-client-server-port={client}",
        ],
        [f"--address={address}"],
    ):
        ports = [f"--{n}={free.pop()}" for n in names]
        nodes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ray.scripts.scripts",
                    "start",
                    *extra,
                    "--num-cpus=1",
                    "--node-ip-address=127.0.0.1",
                    "--disable-usage-stats",
                    "--block",
                    *ports,
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        time.sleep(5.0)
    return nodes, address


def stop_node(node: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, sig)
        time.sleep(5.0)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-evaluations", type=int, default=6)
    parser.add_argument(
        "--samples",
        type=int,
        default=600,
        help="eval-set size: 600 (the two cached sets, the default) or any other count of the zoo's "
        "sentences (the fixed costs, such as the workers' start and the driver's steps, do not grow with it)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--append", action="store_true", help="add the table to the results file")
    parser.add_argument(
        "--cluster",
        choices=("nodes", "local"),
        default="nodes",
        help="nodes: a head and a worker node of one CPU each, each started in a session of its own (as two "
        "machines: the kernel's autogroup scheduling gives each session its own share of a loaded CPU); "
        "local: ray.init(num_cpus=2) in this process's session (all workers share one session's CPU share)",
    )
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    nodes: list[subprocess.Popen[bytes]] = []
    if args.cluster == "local":
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    else:
        nodes, address = start_nodes()
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        deadline = time.monotonic() + 180
        while ray.cluster_resources().get("CPU", 0) < 2:
            if time.monotonic() > deadline:  # a node that died at start (e.g. a port taken meanwhile)
                ray.shutdown()
                for node in reversed(nodes):
                    stop_node(node)
                sys.exit("the Ray cluster did not show 2 CPUs within 180 s: run the bench again")
            time.sleep(0.5)
    model = (CACHE / "models" / "minilm.onnx").read_bytes()
    data = load_set(args.samples)
    rows = []
    shas = set()
    finals: set[tuple[float, float | None]] = set()
    phases: dict[int, dict[str, float]] = {}
    for repeat in range(args.repeats):
        for workers in (1, 2):
            options = PruneOptions(
                executor=Executor.RAY,
                executor_workers=workers,
                metric=MetricKind.COSINE,
                recover=Recovery.NONE,
                max_evaluations=args.max_evaluations,
                batch_size=args.batch_size,
            )
            load = uptime()
            start = time.perf_counter()
            result = pruner.prune(model, data, options)
            wall = time.perf_counter() - start
            search = result.report.timings.get("search", float("nan"))
            evaluating = sum(r.seconds for r in result.report.trace if r.phase.value != "fallback")
            shas.add(hashlib.sha256(result.model_bytes or result.model.SerializeToString()).hexdigest())
            finals.add((result.report.final.search, result.report.final.holdout))
            rows.append((repeat, workers, wall, search, search - evaluating, result.report.evaluations, load))
            phases[workers] = {k: round(v, 1) for k, v in result.report.timings.items()}
            print(f"repeat {repeat} workers {workers}: {wall:.1f} s (search {search:.1f} s); {load}", flush=True)
    ray.shutdown()
    for node in reversed(nodes):
        stop_node(node)

    def median(workers: int, column: int) -> float:
        return statistics.median(r[column] for r in rows if r[1] == workers)

    lines = [
        f"minilm (86 MB), {len(data)} samples, batch {args.batch_size}, metric cosine, recover none, "
        f"max {args.max_evaluations} evaluations; workers 1 thread each; cluster: {CLUSTERS[args.cluster]}",
        f"machine: {os.cpu_count()} cores, shared; models returned: {len(shas)} distinct sha256 (must be 1), "
        f"final check's metrics: {len(finals)} distinct (must be 1)",
        "",
        "repeat  workers  wall s  search s  between s  evaluations  load (uptime before the run)",
    ]
    for repeat, workers, wall, search, between, evaluations, load in rows:
        average = load.split("load average:")[-1].strip()
        lines.append(
            f"{repeat:6d}  {workers:7d}  {wall:6.1f}  {search:8.1f}  {between:9.1f}  {evaluations:11d}  {average}"
        )
    lines += [
        "",
        f"median wall:   1 worker {median(1, 2):.1f} s, 2 workers {median(2, 2):.1f} s, "
        f"ratio {median(1, 2) / median(2, 2):.2f}x",
        f"median search: 1 worker {median(1, 3):.1f} s, 2 workers {median(2, 3):.1f} s, "
        f"ratio {median(1, 3) / median(2, 3):.2f}x",
    ]
    lines += [f"phases of the last run with {w} worker(s), s: {phases[w]}" for w in sorted(phases)]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        before = RESULTS.read_text() + "\n" if args.append and RESULTS.exists() else ""
        RESULTS.write_text(before + text)


if __name__ == "__main__":
    main()
