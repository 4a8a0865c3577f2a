"""A real two-node Ray cluster for tests: a head and one more worker node, one CPU each, started with
``ray start`` as separate processes (each in a session of its own) in a temporary directory, on
loopback ports of their own, and stopped by their process groups.

The tests that use it need the ``ray`` extra and are skipped without it, except under
PRUNER_CI_REQUIRE_RAY=1 (CI's Ray step), where a missing extra fails them (:func:`needs_ray`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAVE_RAY = importlib.util.find_spec("ray") is not None
REQUIRED = os.environ.get("PRUNER_CI_REQUIRE_RAY") == "1"
"""CI's Ray step sets it (CI=true alone cannot: the README's test command runs before the extra is installed)."""
START_SECONDS = 180.0
"""How long the cluster may take to show both CPUs (Ray's start-up is slow on a loaded machine)."""


def needs_ray() -> None:
    """Skip the test without the ray extra, or fail it under PRUNER_CI_REQUIRE_RAY=1."""
    if HAVE_RAY:
        return
    if REQUIRED:
        pytest.fail("the ray extra is not installed (PRUNER_CI_REQUIRE_RAY=1 requires it): pip install -e '.[ray]'")
    pytest.skip("needs the ray extra: pip install -e '.[ray]'")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports: the sockets are held open until all are chosen (one
    after the other, the kernel may hand the same port out twice, and a node refuses to start)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


NODE_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)
"""Every port a node would otherwise take at a fixed default: free ones instead."""
NODES = 2


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a node: its ``ray start --block`` process and every process of its group."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if process.poll() is not None and not _group_alive(process.pid):
                return
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class Cluster:
    """The nodes' processes and the head's address; ``pythonpath``: more folders the nodes import from."""

    def __init__(self, root: Path, pythonpath: tuple[Path, ...] = ()) -> None:
        self.root = root
        path = os.pathsep.join(str(p) for p in (ROOT, *pythonpath))
        self.env = {**os.environ, "PYTHONPATH": path, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        # every port of both nodes chosen at once, so that no two of them are the same
        self.port, client, *self._free = free_ports(2 + NODES * len(NODE_PORTS))
        self.address = f"127.0.0.1:{self.port}"
        self.client_address = f"ray://127.0.0.1:{client}"
        """The head's Ray Client server (``ray://``), for a driver that is not a node of the cluster."""
        self.nodes: list[subprocess.Popen[bytes]] = []

    def start_node(self, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"node{len(self.nodes)}.log", "wb")  # open for the node's life
        ports = [f"--{name}={self._free.pop()}" for name in NODE_PORTS]
        common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats", "--block", *ports]
        process = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", *args, *common],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped by id at teardown
        )
        self.nodes.append(process)
        return process

    def descendants(self, pid: int) -> list[tuple[int, str]]:
        """(pid, command line) of every process under ``pid``."""
        children: dict[int, list[int]] = {}
        lines: dict[int, str] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
            lines[int(entry.name)] = cmdline
        found, todo = [], [pid]
        while todo:
            for child in children.get(todo.pop(), []):
                found.append((child, lines[child]))
                todo.append(child)
        return found

    def processes(self, prefix: str) -> list[int]:
        """The pids of the processes under any node whose command line (a Ray worker's process
        title, such as ``ray::_Worker``) starts with ``prefix``."""
        return [pid for node in self.nodes for pid, line in self.descendants(node.pid) if line.startswith(prefix)]


def _cpus(address: str, env: dict[str, str]) -> float:
    """The cluster's CPUs as a driver of its own sees them (0 when it cannot join yet)."""
    probe = "import ray; ray.init(address=%r, logging_level='ERROR'); print(ray.cluster_resources().get('CPU', 0))"
    done = subprocess.run(
        [sys.executable, "-c", probe % address], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    try:
        return float(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return 0.0


@contextlib.contextmanager
def running_cluster(pythonpath: tuple[Path, ...] = (), *, join: bool = True) -> Iterator[Cluster]:
    """Starts a head and a worker node, joins this process to the cluster (``ray.init``) once both
    CPUs show, and at the end leaves it and stops both nodes. ``join=False``: this process does not
    join (a cluster for drivers of their own, as a second cluster beside the one it joined)."""
    needs_ray()
    import ray

    root = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    cluster = Cluster(root, pythonpath)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    joined = False
    try:
        cluster.start_node(
            "--head",
            f"--port={cluster.port}",
            f"--temp-dir={root}",
            "--include-dashboard=false",
            f"--ray-client-server-port={cluster.client_address.rsplit(':', 1)[1]}",
        )
        cluster.start_node(f"--address={cluster.address}")
        deadline = time.monotonic() + START_SECONDS
        while True:
            head = cluster.nodes[0]
            if head.poll() is not None:  # it failed to start: say why, do not wait for it
                log = (root / "node0.log").read_text(errors="replace").strip().splitlines()
                pytest.fail(f"the Ray head exited with {head.returncode}: {log[-1] if log else 'no output'}")
            if not _listening(cluster.port):  # ray.init would wait long for a head that is not there
                assert time.monotonic() < deadline, f"the Ray head did not listen within {START_SECONDS} s"
                time.sleep(0.5)
                continue
            if not join:
                break
            try:
                ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
                joined = True
                break
            except Exception:  # the head is not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        while (ray.cluster_resources().get("CPU", 0) if join else _cpus(cluster.address, cluster.env)) < 2:
            assert time.monotonic() < deadline, f"the worker node did not join within {START_SECONDS} s"
            time.sleep(0.5)
        yield cluster
    finally:
        if joined and ray.is_initialized():
            ray.shutdown()
        for node in reversed(cluster.nodes):
            _stop(node)
