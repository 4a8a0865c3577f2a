"""Spike: could the graph layer (``pruner/_graph.py``) sit on onnx-ir? Prints a table; asserts nothing.

    pip install onnx-ir   # not a dependency of the project
    python bench/graph_layer.py

For the largest model of the zoo cache (by file size) and every fixture, each way is run
in a fresh subprocess (so its peak RSS is its own), three times, median time kept:

- ``onnx+index``: ``onnx.load`` and ``GraphIndex.build`` (producers, uses, constants), then every
  initializer read as numpy through ``GraphIndex.value``, then ``SerializeToString`` (what
  onnxruntime takes);
- ``ir.load``: ``onnx_ir.load`` and a producers/uses map read off the IR (``Value.producer()``,
  ``Value.uses()``), every initializer read as numpy (``const_value.numpy()``), then
  ``onnx_ir.to_proto`` + ``SerializeToString``;
- ``proto->ir``: what a port inside the library costs where a ModelProto is at hand (the service
  and the API take one): ``onnx.load``, ``onnx_ir.from_proto``, the same map and reads, back to a
  proto and bytes.

Columns (seconds): load (``onnx.load`` / ``onnx_ir.load``), convert (``from_proto``), index
(producers and uses), read (every initializer as numpy), to_proto, bytes (``SerializeToString``),
total; RSS: peak resident MiB over the interpreter with its imports.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ZOO = Path.home() / ".cache" / "onnx-pruner-zoo" / "models"
FIXTURES = ROOT / "tests" / "fixtures"
WAYS = ("onnx+index", "ir.load", "proto->ir")
REPEATS = 3


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one(path: str, way: str) -> dict[str, float]:
    """Run one way on one model in this process; its timings and peak RSS."""
    import numpy as np
    import onnx
    import onnx_ir

    from pruner._graph import GraphIndex

    base = _rss_mib()
    times: dict[str, float] = {}
    start = time.perf_counter()
    if way == "onnx+index":
        model = onnx.load(path)
        times["load"] = time.perf_counter() - start
        mark = time.perf_counter()
        index = GraphIndex.build(model.graph)
        times["index"] = time.perf_counter() - mark
        mark = time.perf_counter()
        total = sum(float(np.abs(v).sum()) for v in map(index.value, index.initializers) if v is not None)
        times["read"] = time.perf_counter() - mark
        mark = time.perf_counter()
        data = model.SerializeToString()
    else:
        if way == "ir.load":
            ir_model = onnx_ir.load(path)
            times["load"] = time.perf_counter() - start
        else:
            proto = onnx.load(path)
            times["load"] = time.perf_counter() - start
            mark = time.perf_counter()
            ir_model = onnx_ir.from_proto(proto)
            times["convert"] = time.perf_counter() - mark
        mark = time.perf_counter()
        producers, uses = {}, {}
        graph = ir_model.graph
        for node in graph:
            for value in node.outputs:
                producers[value.name] = value.producer()
                uses[value.name] = list(value.uses())
        for value in [*graph.inputs, *graph.initializers.values()]:
            uses[value.name] = list(value.uses())
        times["index"] = time.perf_counter() - mark
        mark = time.perf_counter()
        total = sum(
            float(np.abs(v.const_value.numpy()).sum()) for v in graph.initializers.values() if v.const_value is not None
        )
        times["read"] = time.perf_counter() - mark
        mark = time.perf_counter()
        back = onnx_ir.to_proto(ir_model)
        times["to_proto"] = time.perf_counter() - mark
        mark = time.perf_counter()
        data = back.SerializeToString()
    times["bytes"] = time.perf_counter() - mark
    times["total"] = time.perf_counter() - start
    times["rss"] = _rss_mib() - base
    times["size"] = len(data) / 2**20
    times["checksum"] = total
    return times


def measure(path: Path, way: str) -> dict[str, float]:
    runs = []
    for _ in range(REPEATS):
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(path), way], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout))
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _columns_doc() -> str:
    return "load, convert (from_proto), index, read weights, to_proto, bytes (SerializeToString), total: s"


def main() -> None:
    import onnx
    import onnx_ir

    zoo = sorted(ZOO.glob("*.onnx"), key=lambda p: p.stat().st_size, reverse=True)[:1]
    models = [*zoo, *sorted(FIXTURES.glob("*.onnx"))]
    print(
        f"python {platform.python_version()}, onnx {onnx.__version__}, onnx-ir {onnx_ir.__version__}, "
        f"{platform.machine()}; median of {REPEATS} fresh processes; the machine was shared (load varies)"
    )
    columns = ("load", "convert", "index", "read", "to_proto", "bytes", "total", "RSS")
    header = f"{'model':<28} {'MiB':>6} {'way':<11} " + " ".join(f"{c:>8}" for c in columns)
    print(header)
    print("-" * len(header))
    for path in models:
        results = {way: measure(path, way) for way in WAYS}
        checks = {round(r["checksum"], 1) for r in results.values()}
        for way, r in results.items():
            cells = " ".join(f"{r[c]:>8.3f}" if c in r else f"{'-':>8}" for c in columns[:-1])
            print(f"{path.name:<28} {path.stat().st_size / 2**20:>6.1f} {way:<11} {cells} {r['rss']:>8.1f}")
        if len(checks) != 1:
            print(f"  ! the ways read different weights: {sorted(checks)}")
    print(_columns_doc() + "; RSS: peak resident MiB above the interpreter with numpy/onnx/onnx_ir imported")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], sys.argv[3])))
    else:
        main()
