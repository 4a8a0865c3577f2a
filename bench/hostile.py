"""Hostile clients against a real server process: what a well-behaved client still gets.

    python bench/hostile.py [--out bench/results/hostile.txt] [--seed 0]

Starts ``python -m service`` on free loopback ports (one fresh server per check) and measures:

(a) slow uploads: clients that send half a model then stay silent, while a well-behaved client
    keeps calling Inspect and small Prunes; calls served while attacked, and when (if) the server
    dropped each silent upload. The server's upload flags (``--upload-idle-timeout`` and friends)
    are passed when ``python -m service --help`` lists them.
(b) decompression bombs: a ~1 MB deflated .npz that expands to 1 GiB, sent 3 times under the default
    limit and under --max-eval-bytes 256 MiB: the status
    each got and the server's RSS (VmRSS, VmHWM from /proc/PID/status) before and after.
(c) cancel storm: 20 long prune jobs (sequential recovery, batch 1, on cnn_bn) cancelled at random
    points: time from the cancel to the slot taking a new call, and RSS before/after.
(d) SIGTERM during a job with ``--grace 2``: the status and message the client got, and how long
    the server took to exit.

Loopback only, bounded loops, every call has a deadline; it stops by itself in a few minutes.
Statuses are printed by name, so the table keeps its shape whatever codes a newer server uses.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service._gen.onnxpruner.v1 import pruner_pb2 as pb  # noqa: E402
from service._gen.onnxpruner.v1 import pruner_pb2_grpc as pb_grpc  # noqa: E402
from tests.helpers import tiny_mlp, tiny_mlp_evalset  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
CHUNK = 1 << 20
TINY = tiny_mlp().SerializeToString()
BIG_MODEL = (FIXTURES / "cnn_bn.onnx").read_bytes()
BIG_EVAL = (FIXTURES / "cnn_bn_eval.npz").read_bytes()
QUICK = pb.PruneConfig(max_evaluations=2)
LONG = pb.PruneConfig(recover=pb.RECOVERY_SEQUENTIAL, batch_size=1, max_evaluations=50)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


TINY_EVAL = _npz(tiny_mlp_evalset(64))


class Server:
    """``python -m service`` on a free loopback port, its log in a temporary file."""

    def __init__(self, *args: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile("w+")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "--address", self.address, "--log-level", "WARNING", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        deadline = time.monotonic() + 60
        while not self.healthy():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"the server did not come up: {self.logs()[-500:]}")
            time.sleep(0.1)

    def healthy(self) -> bool:
        try:
            with grpc.insecure_channel(self.address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError:
            return False

    def rss_mib(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MiB: resident now, and the peak so far."""
        fields = {}
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = value.split()
        return int(fields["VmRSS"][0]) / 1024, int(fields["VmHWM"][0]) / 1024

    def logs(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def server_flags() -> str:
    return subprocess.run(
        [sys.executable, "-m", "service", "--help"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout


def prune_requests(model: bytes, evalset: bytes, config: pb.PruneConfig) -> list[pb.PruneRequest]:
    return [
        pb.PruneRequest(config=config),
        *(pb.PruneRequest(model_chunk=model[i : i + CHUNK]) for i in range(0, len(model), CHUNK)),
        *(pb.PruneRequest(eval_npz_chunk=evalset[i : i + CHUNK]) for i in range(0, len(evalset), CHUNK)),
    ]


def status(error: grpc.RpcError) -> tuple[str, str]:
    code = error.code()  # type: ignore[attr-defined]
    return (code.name if code else "UNKNOWN"), (error.details() or "")  # type: ignore[attr-defined]


def inspect(address: str, timeout: float = 10) -> str:
    try:
        with grpc.insecure_channel(address) as channel:
            pb_grpc.PrunerServiceStub(channel).Inspect(iter([pb.InspectRequest(model_chunk=TINY)]), timeout=timeout)
        return "OK"
    except grpc.RpcError as e:
        return status(e)[0]


def small_prune(address: str, timeout: float = 30) -> str:
    try:
        with grpc.insecure_channel(address) as channel:
            list(
                pb_grpc.PrunerServiceStub(channel).Prune(iter(prune_requests(TINY, TINY_EVAL, QUICK)), timeout=timeout)
            )
        return "OK"
    except grpc.RpcError as e:
        return status(e)[0]


def tally(outcomes: list[str]) -> str:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o] = counts.get(o, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"


# ------------------------------------------------------------------------------------------- (a)


def slow_uploads(lines: list[str], help_text: str, clients: int = 4, attack: float = 20.0) -> None:
    supported = "--upload-idle-timeout" in help_text
    args = ["--max-jobs", "2"]
    if supported:
        args += ["--upload-idle-timeout", "3"]
    lines.append(f"(a) slow uploads: {clients} clients send half of cnn_bn.onnx then stay silent for {attack:g} s")
    lines.append(f"    server: python -m service {' '.join(args)}")
    if not supported:
        lines.append("    --upload-idle-timeout / --upload-deadline / --max-uploads: not supported by this server")
    server = Server(*args)
    try:
        release = threading.Event()
        ended: list[tuple[float, str] | None] = [None] * clients
        started = time.monotonic()

        def silent(k: int) -> None:
            def requests() -> Iterator[pb.PruneRequest]:
                yield pb.PruneRequest(config=QUICK)
                yield pb.PruneRequest(model_chunk=BIG_MODEL[: len(BIG_MODEL) // 2])
                release.wait(attack + 5)

            with grpc.insecure_channel(server.address) as channel:
                try:
                    list(pb_grpc.PrunerServiceStub(channel).Prune(requests(), timeout=attack + 10))
                    ended[k] = (time.monotonic() - started, "OK")
                except grpc.RpcError as e:
                    if not release.is_set():
                        ended[k] = (time.monotonic() - started, status(e)[0])

        threads = [threading.Thread(target=silent, args=(k,), daemon=True) for k in range(clients)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        calls: list[tuple[str, str]] = []
        while time.monotonic() - started < attack:
            calls.append(("Inspect", inspect(server.address)))
            calls.append(("Prune", small_prune(server.address)))
            time.sleep(0.2)
        release.set()
        for t in threads:
            t.join(15)
        served = sum(1 for _, s in calls if s == "OK")
        lines.append(f"    well-behaved calls while attacked: {served}/{len(calls)} served")
        lines.append(f"      Inspect: {tally([s for k, s in calls if k == 'Inspect'])}")
        lines.append(f"      Prune:   {tally([s for k, s in calls if k == 'Prune'])}")
        for k, end in enumerate(ended):
            text = f"dropped at {end[0]:5.1f} s with {end[1]}" if end else f"still open at {attack:g} s (never dropped)"
            lines.append(f"    silent upload {k + 1}: {text}")
        lines.append(f"    server still healthy: {server.healthy()}")
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------- (b)


def bomb() -> bytes:
    """An .npz whose x.npy declares (2**24, 8) float64 (1 GiB) of zeros, deflated to about 1 MB."""
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (16777216, 8), }"
    header = header.ljust(((len(header) + 11) // 64 + 1) * 64 - 11) + "\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        member = zipfile.ZipInfo("x.npy", date_time=(1980, 1, 1, 0, 0, 0))
        member.compress_type = zipfile.ZIP_DEFLATED  # a ZipInfo does not inherit the archive's method
        member._compresslevel = 9  # type: ignore[attr-defined]  # (a public name only from Python 3.13)
        with archive.open(member, "w", force_zip64=True) as f:
            f.write(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())
            zeros = bytes(CHUNK)
            for _ in range(1024):
                f.write(zeros)
    return buffer.getvalue()


def bombs(lines: list[str], times: int = 3) -> None:
    data = bomb()
    lines.append(f"(b) decompression bomb: {len(data) / 1e6:.2f} MB .npz expanding to 1 GiB (x: float64 [2**24, 8]),")
    lines.append(f"    sent {times} times with the tiny model (its input is float32, so a full load is refused after)")
    limits = (
        ("the default --max-eval-bytes (1 GiB): the bomb fits, is decoded, refused, and freed", ()),
        (
            "--max-eval-bytes 256 MiB: refused from its header, before anything is allocated",
            ("--max-eval-bytes", str(256 << 20)),
        ),
    )
    for label, flags in limits:
        lines.append(f"  with {label}")
        server = Server("--max-jobs", "1", *flags)
        try:
            before, _ = server.rss_mib()
            lines.append(f"    server RSS before: {before:7.1f} MiB")
            for k in range(times):
                started = time.monotonic()
                try:
                    with grpc.insecure_channel(server.address) as channel:
                        stub = pb_grpc.PrunerServiceStub(channel)
                        list(stub.Prune(iter(prune_requests(TINY, data, QUICK)), timeout=120))
                    code, message = "OK", ""
                except grpc.RpcError as e:
                    code, message = status(e)
                seconds = time.monotonic() - started
                rss, peak = server.rss_mib()
                lines.append(
                    f"    bomb {k + 1}: {code:<18} in {seconds:5.1f} s; RSS after {rss:7.1f} MiB, peak {peak:7.1f} MiB"
                )
                lines.append(f"            message: {message[:110]!r}")
            lines.append(f"    server still healthy: {server.healthy()}, Inspect: {inspect(server.address)}")
        finally:
            server.stop()


# ------------------------------------------------------------------------------------------- (c)


def cancel_storm(lines: list[str], rng: random.Random, jobs: int = 20) -> None:
    lines.append(f"(c) cancel storm: {jobs} prune jobs on cnn_bn (sequential recovery, batch 1) cancelled at random")
    lines.append("    points in [0, 3] s; recovery = time from the cancel to a new call (Inspect) being accepted")
    server = Server("--max-jobs", "1")
    try:
        before, _ = server.rss_mib()
        recoveries: list[float] = []
        ends: list[str] = []
        requests = prune_requests(BIG_MODEL, BIG_EVAL, LONG)
        for _ in range(jobs):
            delay = rng.uniform(0.0, 3.0)
            channel = grpc.insecure_channel(server.address)
            call = pb_grpc.PrunerServiceStub(channel).Prune(iter(requests), timeout=120)
            time.sleep(delay)
            cancelled = time.monotonic()
            call.cancel()
            try:
                list(call)
                ends.append("finished")
            except grpc.RpcError as e:
                ends.append(status(e)[0])
            channel.close()
            recovered = None
            while time.monotonic() - cancelled < 30:
                if inspect(server.address) == "OK":
                    recovered = time.monotonic() - cancelled
                    break
                time.sleep(0.02)
            recoveries.append(recovered if recovered is not None else float("inf"))
        after, peak = server.rss_mib()
        finite = [r for r in recoveries if r != float("inf")]
        lines.append(f"    client saw: {tally(ends)}")
        if finite:
            lines.append(
                f"    cancel -> slot usable: median {statistics.median(finite):.2f} s, max {max(finite):.2f} s, "
                f"min {min(finite):.2f} s; never within 30 s: {len(recoveries) - len(finite)}"
            )
        else:
            lines.append("    cancel -> slot usable: never within 30 s")
        lines.append(f"    server RSS before {before:7.1f} MiB, after {after:7.1f} MiB (peak {peak:7.1f} MiB)")
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------- (d)


def sigterm(lines: list[str], grace: float = 2.0) -> None:
    lines.append(f"(d) SIGTERM during a long prune job (cnn_bn, sequential recovery, batch 1), --grace {grace:g}")
    server = Server("--max-jobs", "1", "--grace", str(grace))
    try:
        outcome: dict[str, object] = {}
        first_event = threading.Event()

        def job() -> None:
            with grpc.insecure_channel(server.address) as channel:
                call = pb_grpc.PrunerServiceStub(channel).Prune(
                    iter(prune_requests(BIG_MODEL, BIG_EVAL, LONG)), timeout=120
                )
                try:
                    for _ in call:
                        first_event.set()
                    outcome["status"], outcome["message"] = "OK", ""
                except grpc.RpcError as e:
                    outcome["status"], outcome["message"] = status(e)
                outcome["at"] = time.monotonic()
                first_event.set()

        thread = threading.Thread(target=job, daemon=True)
        thread.start()
        first_event.wait(60)
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        try:
            code = server.process.wait(60)
            exited = f"{time.monotonic() - sent:.2f} s after SIGTERM, exit code {code}"
        except subprocess.TimeoutExpired:
            exited = "not within 60 s (killed)"
        thread.join(30)
        at = outcome.get("at")
        lines.append(f"    client got: {outcome.get('status', 'no answer')}: {str(outcome.get('message', ''))[:100]!r}")
        if isinstance(at, float):
            lines.append(f"    the call ended {at - sent:.2f} s after SIGTERM")
        lines.append(f"    server exited {exited}")
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cancel points")
    args = parser.parse_args(argv)
    started = time.monotonic()
    load = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    lines = [
        "Hostile clients against python -m service (bench/hostile.py)",
        f"machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}, "
        f"grpcio {grpc.__version__}",
        f"load before: {load}",
        "",
    ]
    help_text = server_flags()
    print("\n".join(lines), flush=True)
    for check in (
        lambda: slow_uploads(lines, help_text),
        lambda: bombs(lines),
        lambda: cancel_storm(lines, random.Random(args.seed)),
        lambda: sigterm(lines),
    ):
        mark = len(lines)
        check()
        lines.append("")
        print("\n".join(lines[mark:]), flush=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    lines.append(f"load after: {load}")
    lines.append(f"total: {time.monotonic() - started:.0f} s")
    print("\n".join(lines[-2:]))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
