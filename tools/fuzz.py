"""The long fuzz campaign: the properties of the fuzz tests, run for as long as you like.

    python tools/fuzz.py TARGET [--seconds N] [--engine hypothesis|atheris] [--out DIR] [--seed S]

TARGET is one of:

- ``model``:   ``pruner.load_model(bytes)`` and ``pruner.inspect(bytes)`` on mutated models
- ``evalset``: ``pruner.load_eval_set(bytes)`` and the eval-set validation on mutated ``.npz`` archives
- ``stream``:  the Prune and Inspect request streams of a real server on a loopback port

The inputs and the property are those of ``tests/pruner/test_fuzz_loaders.py`` and
``tests/service/test_fuzz_stream.py``: every input must end in a documented error (library) or a
documented status (server). The CI runs a short, fixed budget of them; this runs them with fresh
random seeds until ``--seconds`` are up.

Engines:

- ``hypothesis`` (default): batches of random examples, a new seed per batch.
- ``atheris``: coverage-guided (libFuzzer through ``atheris``, ``pip install atheris``): libFuzzer
  mutates the choice sequence that Hypothesis turns into an input (``fuzz_one_input``), keeping
  the sequences that reach new lines of ``pruner``/``service``, ``zipfile`` and ``numpy.lib.format``.

A failing input is not raised: it is written to ``--out`` (default ``fuzz-findings/``) as
``<target>-<outcome>-<sha>.<ext>`` with a ``.txt`` note of its outcome, one file per distinct
outcome, and the run goes on. A summary of the outcomes seen is printed at the end; the exit
status is 1 when anything undocumented was found; ``<out>/summary-<target>.txt`` holds the same
summary (with atheris, the only one: libFuzzer ends the process itself). Keep a finding by copying its file into
``tests/fixtures/fuzz/`` and adding its expected outcome to ``expected.json`` (docs/fuzzing.md).
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import hashlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ("model", "evalset", "stream")
CORPUS = ROOT / "tests" / "fixtures" / "fuzz"
INSTRUMENTED = ("pruner", "service", "zipfile", "numpy.lib._format_impl", "numpy.lib._npyio_impl", "tests.")


class Campaign:
    """Counts outcomes and keeps one input per undocumented outcome."""

    def __init__(self, target: str, out: Path) -> None:
        self.target = target
        self.out = out
        self.seen: collections.Counter[str] = collections.Counter()
        self.kept: dict[str, Path] = {}
        self.examples = 0

    def record(self, outcome: str, bad: bool, blob: bytes, ext: str, note: str = "") -> None:
        self.examples += 1
        self.seen[outcome] += 1
        if self.examples % 100 == 0:
            self.write_summary()  # libFuzzer ends the process with exit(): the summary must be on disk
        if not bad or outcome in self.kept:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        tag = "".join(c if c.isalnum() else "_" for c in outcome)[:60]
        path = self.out / f"{self.target}-{tag}-{hashlib.sha256(blob).hexdigest()[:10]}.{ext}"
        path.write_bytes(blob)
        path.with_suffix(".txt").write_text(f"outcome: {outcome}\n{note}\n")
        self.kept[outcome] = path
        print(f"[{self.examples}] FOUND {outcome} -> {path}", flush=True)
        self.write_summary()

    def text(self) -> str:
        lines = [f"{self.target}: {self.examples} examples"]
        for outcome, count in self.seen.most_common():
            flag = "  UNDOCUMENTED" if outcome in self.kept else ""
            lines.append(f"  {count:7d}  {outcome}{flag}")
        return "\n".join(lines) + "\n"

    def write_summary(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"summary-{self.target}.txt").write_text(self.text())

    def summary(self) -> int:
        self.write_summary()
        print("\n" + self.text())
        return 1 if self.kept else 0


def _loader_body(target: str, campaign: Campaign) -> tuple[Any, Callable[[bytes], None]]:
    from tests.pruner import test_fuzz_loaders as loaders

    if target == "model":
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="fuzz-model-"))

        def body(data: bytes) -> None:
            outcome = loaders.model_outcome(data, folder)
            parts = outcome.replace("(path:", "|").replace(")", "").split("|")
            campaign.record(outcome, any(loaders.undocumented(p) for p in parts), data, "onnx")

        return loaders.mutated_models(), body

    def body(data: bytes) -> None:
        outcome = loaders.evalset_outcome(data)
        campaign.record(outcome, any(loaders.undocumented(p) for p in outcome.split("|")), data, "npz")

    return loaders.mutated_evalsets(), body


def _stream_body(campaign: Campaign) -> tuple[Any, Callable[[Any], None], Callable[[], None]]:
    from tests.service import test_fuzz_stream as streams

    address, stop = streams.start_fuzz_server()

    def body(case: Any) -> None:
        outcome = streams.stream_outcome(address, case)
        bad = not streams.documented(outcome)
        recovered = streams.server_recovers(address)
        if not recovered:
            outcome, bad = f"{outcome} then server unhealthy", True
        campaign.record(outcome, bad, streams.encode_case(case), "stream", note=repr(case)[:2000])

    return streams.stream_cases(), body, stop


def run(target: str, seconds: float, engine: str, out: Path, seed: int | None) -> int:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    campaign = Campaign(target, out)
    stop: Callable[[], None] = lambda: None  # noqa: E731
    if target == "stream":
        strategy, body, stop = _stream_body(campaign)
    else:
        strategy, body = _loader_body(target, campaign)
    quiet = settings(
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        max_examples=100,
    )
    test = settings(quiet)(given(strategy)(body))
    deadline = time.monotonic() + seconds
    try:
        if engine == "atheris":
            _atheris(test, seconds, target)
        else:
            batch = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
            print(f"{target}: hypothesis, first seed {batch}, {seconds:g} s", flush=True)
            while time.monotonic() < deadline:
                hypothesis_seed(batch)(test)()
                batch += 1
    except KeyboardInterrupt:
        pass
    finally:
        stop()
    return campaign.summary()


def _atheris(test: Any, seconds: float, target: str) -> None:
    try:
        import atheris
    except ImportError:
        sys.exit("atheris is not installed: pip install atheris (or use --engine hypothesis)")
    # only the code that reads hostile input: instrumenting everything loaded (numpy, grpc, onnx's
    # Python layer) takes minutes and guides towards nothing we own
    count = 0
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(INSTRUMENTED):
            continue
        for value in list(vars(module).values()):
            for function in [value, *vars(value).values()] if isinstance(value, type) else [value]:
                code = getattr(function, "__code__", None)
                if code is not None and getattr(function, "__module__", None) == name:
                    atheris.instrument_func(function)
                    count += 1
    print(f"{target}: instrumented {count} functions", flush=True)
    print(f"{target}: atheris (coverage-guided), {seconds:g} s", flush=True)
    atheris.Setup(
        [sys.argv[0], f"-max_total_time={int(seconds)}", "-rss_limit_mb=8192", "-timeout=120"],
        test.hypothesis.fuzz_one_input,
    )
    try:
        atheris.Fuzz()
    except SystemExit:
        pass


def hand_picked() -> dict[str, tuple[str, bytes, list[str], str]]:
    """The kept corpus: ``{file: (target, bytes, acceptable outcomes, why)}``, rebuilt by ``seeds``.

    Outcomes are those of ``model_outcome`` / ``evalset_outcome`` / ``stream_outcome``. For the
    cases that found a bug, the acceptable outcomes are the documented ones a fix may choose.
    """
    import io
    import zipfile

    import numpy as np
    import onnx

    from tests.helpers import tiny_mlp, tiny_mlp_evalset
    from tests.pruner import test_fuzz_loaders as loaders
    from tests.service import test_fuzz_stream as streams

    pb = streams.pb
    bad = ["InvalidModelError|InvalidModelError"]
    out: dict[str, tuple[str, bytes, list[str], str]] = {}

    def model(name: str, change: Callable[[onnx.ModelProto], None], expect: list[str], why: str) -> None:
        m = tiny_mlp()
        change(m)
        out[f"model-{name}.onnx"] = ("model", m.SerializeToString(), expect, why)

    def external(location: str, **extra: str) -> Callable[[onnx.ModelProto], None]:
        def change(m: onnx.ModelProto) -> None:
            tensor = m.graph.initializer[0]
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.external_data.add(key="location", value=location)
            for key, value in extra.items():
                tensor.external_data.add(key=key, value=value)

        return change

    model("external-parent-path", external("../../etc/passwd"), bad, "hostile external data path")
    model("external-absolute-path", external("/etc/passwd"), bad, "absolute external data path")
    model("external-nul-byte", external("\x00"), bad, "BUG: by path, ValueError 'embedded null byte'")
    model("external-long-name", external("a" * 5000), bad, "BUG: by path, OSError 'File name too long'")
    model("external-bad-offset", external("model.onnx", offset="x", length="4"), bad,
          "BUG?: by path, int('x') of the offset")  # fmt: skip
    model("no-outputs", lambda m: m.graph.ClearField("output"), [*bad, "ok|ok"], "a graph without outputs")
    model("no-opset", lambda m: m.ClearField("opset_import"), bad, "no opset_import")
    model("opset-1e6", lambda m: setattr(m.opset_import[0], "version", 10**6), [*bad, "ok|ok"],
          "an opset from the future (onnx's checker accepts it)")  # fmt: skip
    model("huge-dims", lambda m: m.graph.initializer[0].dims.extend([2**62]), bad, "initializer dims of 2**62")
    model(
        "duplicate-output-name",
        lambda m: m.graph.node[1].output.__setitem__(0, m.graph.node[0].output[0]),
        bad,
        "two nodes write the same tensor",
    )

    def recursive(m: onnx.ModelProto) -> None:
        call = onnx.helper.make_node("Rec", ["a"], ["b"], domain="local")
        m.functions.append(
            onnx.helper.make_function("local", "Rec", ["a"], ["b"], [call], [onnx.helper.make_opsetid("", 17)])
        )
        m.opset_import.add(domain="local", version=1)
        m.graph.node.append(onnx.helper.make_node("Rec", ["y"], ["rec"], domain="local"))

    model("recursive-function", recursive, [*bad, "ok|ok"], "a local function that calls itself")
    out["model-truncated.onnx"] = ("model", tiny_mlp().SerializeToString()[:50], bad, "truncated protobuf")

    # eval sets
    tiny = loaders._npz(tiny_mlp_evalset(4))
    refused = ["InvalidEvalSetError", "ResourceLimitError"]
    member = loaders.npy_member("<f4", (2**40,), data=b"\0" * (1 << 20))
    out["evalset-bomb-4tib.npz"] = ("evalset", loaders.zip_of([("x.npy", member)], zipfile.ZIP_DEFLATED), refused,
                                    "BUG: 1 MiB of deflated zeros declared as 4 TiB: MemoryError")  # fmt: skip
    out["evalset-absurd-shape.npz"] = (
        "evalset", loaders.zip_of([("x.npy", loaders.npy_member("|b1", (2**62,)))]), refused,
        "BUG: shape (2**62,): MemoryError",
    )  # fmt: skip
    method = bytearray(tiny)
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        at = -1
        while (at := method.find(signature, at + 1)) >= 0:
            method[at + offset : at + offset + 2] = (99).to_bytes(2, "little")
    out["evalset-unknown-compression.npz"] = ("evalset", bytes(method), refused,
                                              "BUG: zip method 99: NotImplementedError")  # fmt: skip
    compressed = bytearray(loaders._npz(tiny_mlp_evalset(4), compressed=True))
    data_at = compressed.find(b"x.npy") + len("x.npy") + 20  # inside the deflate stream of x.npy
    for flip in range(data_at, data_at + 200):
        trial = bytearray(compressed)
        trial[flip] ^= 0xFF
        name, _ = loaders.outcome_of(lambda t=bytes(trial): loaders.pruner.load_eval_set(t))
        if name == "zlib.error":
            out["evalset-corrupt-deflate.npz"] = ("evalset", bytes(trial), refused, "BUG: zlib.error escapes")
            break
    raw = loaders.zip_of([("x", b"not an array"), ("labels.npy", loaders._npz_member(tiny, "labels.npy"))])
    out["evalset-member-without-npy.npz"] = (
        "evalset", raw, [*refused, "ok|InvalidEvalSetError|InvalidEvalSetError|InvalidEvalSetError"],
        "BUG: a member not named .npy loads as bytes; validation raises AttributeError",
    )  # fmt: skip
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
    out["evalset-pickled.npz"] = ("evalset", loaders.zip_of([("x.npy", buffer.getvalue())]), ["InvalidEvalSetError"],
                                  "object arrays are never unpickled")  # fmt: skip
    loaded_then_refused = "ok|InvalidEvalSetError|InvalidEvalSetError|InvalidEvalSetError"
    out["evalset-nested-zip.npz"] = (
        "evalset", loaders.zip_of([("x.npy", tiny)]), [*refused, loaded_then_refused],
        "BUG: an .npz inside an .npz loads as bytes; validation raises AttributeError",
    )  # fmt: skip
    out["evalset-fortran-maybe.npz"] = (
        "evalset", loaders.zip_of([("x.npy", loaders.npy_member("<f4", (4, 8), "maybe", b"\0" * 128))]), refused,
        "a header numpy refuses",
    )  # fmt: skip
    out["evalset-traversal-names.npz"] = (
        "evalset", loaders.zip_of([("../../x.npy", loaders._npz_member(tiny)), ("/labels.npy", b"")]),
        [*refused, "ok|InvalidEvalSetError|InvalidEvalSetError|InvalidEvalSetError"], "member names with ../ and /",
    )  # fmt: skip
    out["evalset-nan.npz"] = ("evalset", loaders._npz({"x": np.full((4, 8), np.nan, np.float32)}),
                              ["ok|InvalidEvalSetError|InvalidEvalSetError|InvalidEvalSetError"],
                              "NaN inputs: loaded, refused by validation")  # fmt: skip

    # streams
    def stream(name: str, messages: list[bytes], expect: list[str], why: str, method: str = "Prune") -> None:
        case = streams.StreamCase(method, messages, notes=[why])
        out[f"stream-{name}.stream"] = ("stream", streams.encode_case(case), expect, why)

    config = streams._req(config=streams.QUICK)
    model_chunk = streams._req(model_chunk=streams.MODEL)
    npz_chunk = streams._req(eval_npz_chunk=streams.NPZ)
    invalid = ["INVALID_ARGUMENT"]
    stream("garbage-message", [b"\xff\xff\xff\xff\x0f", config, model_chunk, npz_chunk], invalid,
           "BUG: undecodable bytes -> INTERNAL 'Exception deserializing request!' (grpc's default)")  # fmt: skip
    stream("garbage-inspect", [b"\x12\x80"], invalid, "BUG: same, on Inspect", method="Inspect")
    stream("no-outputs-model", [config, streams._req(model_chunk=streams.MODELS["no_outputs"]), npz_chunk], invalid,
           "BUG: a model without outputs -> IndexError -> INTERNAL")  # fmt: skip
    stream(
        "dims-overflow",
        [config, model_chunk, *streams.HOSTILE_MESSAGES["overflow_dims_empty_data"]()],  # type: ignore[misc]
        invalid,
        "BUG: EvalTensor dims [2**62, 4] overflow to 0 bytes -> reshape ValueError -> INTERNAL",
    )
    zeros = loaders._npz({"x": np.zeros((33_000, 8), np.float32), "labels": np.zeros(33_000, np.int64)})
    stream("chunk-over-1mib", [config, model_chunk, streams._req(eval_npz_chunk=zeros)],
           ["INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"],
           "BUG: a 1.3 MB eval_npz_chunk is accepted (the proto says at most 1 MiB)")  # fmt: skip
    stream("model-before-config", [model_chunk, config, npz_chunk], invalid, "model before config")
    stream("two-configs", [config, config, model_chunk, npz_chunk], invalid, "two configs")
    stream("data-before-header", [config, model_chunk, streams._req(eval_tensor_data=b"\0" * 16)], invalid,
           "eval_tensor_data before any header")  # fmt: skip
    stream("nan-tolerance", [streams._req(config=pb.PruneConfig(tolerance=pb.Tolerance(value=float("nan")))),
                             model_chunk, npz_chunk], invalid, "tolerance NaN")  # fmt: skip
    stream(
        "max-evaluations-max-uint32",
        [streams._req(config=pb.PruneConfig(max_evaluations=2**32 - 1, max_seconds=2.0)), model_chunk, npz_chunk],
        ["OK", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED"],
        "max_evaluations=2**32-1 (what -1 becomes on the wire) with a 2 s budget",
    )
    stream("unknown-enum", [streams._req(config=pb.PruneConfig(mode=99)), model_chunk, npz_chunk], invalid,
           "an unknown enum value")  # fmt: skip
    return out


def write_seeds() -> int:
    import json

    CORPUS.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, (target, data, expect, why) in sorted(hand_picked().items()):
        (CORPUS / name).write_bytes(data)
        manifest[name] = {"target": target, "expect": expect, "why": why}
    (CORPUS / "expected.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=True) + "\n")
    print(f"wrote {len(manifest)} cases to {CORPUS}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=(*TARGETS, "seeds"), help="what to fuzz; 'seeds' rewrites the corpus")
    parser.add_argument("--seconds", type=float, default=600.0, help="how long to fuzz (default 600)")
    parser.add_argument("--engine", choices=("hypothesis", "atheris"), default="hypothesis")
    parser.add_argument("--out", type=Path, default=Path("fuzz-findings"), help="where findings go")
    parser.add_argument("--seed", type=int, default=None, help="first Hypothesis seed (default: random)")
    args = parser.parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 <pid>: where is it stuck?
    if args.target == "seeds":
        return write_seeds()
    return run(args.target, args.seconds, args.engine, args.out, args.seed)


if __name__ == "__main__":
    sys.exit(main())
