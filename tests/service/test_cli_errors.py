"""The onnx-prune CLI on bad input: exit code 2, one short error line, nothing written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.helpers import REPO_ROOT, run_cli, tiny_mlp, tiny_mlp_evalset, write_npz

EXIT_BAD_INPUT = 2


@dataclass(frozen=True)
class Files:
    """Inputs of one test; ``out`` is the (empty) folder the CLI writes to."""

    model: Path
    evalset: Path
    out: Path

    @property
    def pruned(self) -> Path:
        return self.out / "pruned.onnx"

    @property
    def report(self) -> Path:
        return self.out / "report.json"

    def fill(self, template: str) -> str:
        return template.format(model=self.model, eval=self.evalset, tmp=self.model.parent)


@pytest.fixture
def files(tmp_path: Path) -> Files:
    model = tmp_path / "model.onnx"
    onnx.save_model(tiny_mlp(), str(model))
    evalset = write_npz(tmp_path / "eval.npz", tiny_mlp_evalset(32))
    out = tmp_path / "out"
    out.mkdir()
    return Files(model, evalset, out)


def assert_bad_input(proc: subprocess.CompletedProcess[str], *patterns: str) -> None:
    """Exit 2 with one error line (after argparse's usage block, if any) matching every pattern."""
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines, "no error message"
    error_lines = [line for line in lines if "error:" in line]
    assert error_lines == [lines[-1]]
    if len(lines) > 1:
        assert lines[0].startswith("usage:")
        assert len(lines) <= 20
    for pattern in patterns:
        assert re.search(pattern, lines[-1]), f"{pattern!r} not in {lines[-1]!r}"


def prune_args(files: Files, *args: str | Path) -> list[str | Path]:
    return ["prune", *args, "-o", files.pruned, "--report", files.report, "--quiet"]


def write_bad_inputs(folder: Path) -> None:
    data = tiny_mlp().SerializeToString()
    (folder / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (folder / "notes.onnx").write_text("not a model\n")
    arrays = tiny_mlp_evalset(32)
    np.savez(
        folder / "pickled.npz",
        x=np.array([{"a": 1}] * 32, dtype=object),
        labels=arrays["labels"],
        allow_pickle=True,
    )
    write_npz(folder / "renamed.npz", {"input": arrays["x"], "labels": arrays["labels"]})
    with_nan = arrays["x"].copy()
    with_nan[3, 1] = np.nan
    write_npz(folder / "nan.npz", {"x": with_nan, "labels": arrays["labels"]})


# (id, arguments before -o/--report with {model}/{eval}/{tmp} placeholders, regexes the error line must match)
PRUNE_CASES = [
    ("missing-model", ["{tmp}/none.onnx", "--eval", "{eval}"], [r"none\.onnx", "does not exist"]),
    ("truncated-model", ["{tmp}/truncated.onnx", "--eval", "{eval}"], [r"truncated\.onnx", "truncated"]),
    ("not-onnx", ["{tmp}/notes.onnx", "--eval", "{eval}"], [r"notes\.onnx", "not an ONNX model"]),
    ("missing-evalset", ["{model}", "--eval", "{tmp}/none.npz"], [r"none\.npz", "does not exist"]),
    ("pickled-evalset", ["{model}", "--eval", "{tmp}/pickled.npz"], [r"pickled\.npz", "pickle"]),
    ("wrong-input-name", ["{model}", "--eval", "{tmp}/renamed.npz"], ["'x'", "'input'"]),
    ("nan-evalset", ["{model}", "--eval", "{tmp}/nan.npz"], ["'x'", "NaN"]),
    ("tolerance-abc", ["{model}", "--eval", "{eval}", "--tolerance", "abc"], ["tolerance", "abc"]),
    ("tolerance-negative", ["{model}", "--eval", "{eval}", "--tolerance", "-1"], ["tolerance", ">= 0"]),
    ("tolerance-nan", ["{model}", "--eval", "{eval}", "--tolerance", "nan"], ["tolerance", "finite"]),
    ("tolerance-over-100%", ["{model}", "--eval", "{eval}", "--tolerance", "150%"], ["tolerance", "100%"]),
    ("max-evaluations-0", ["{model}", "--eval", "{eval}", "--max-evaluations", "0"], ["max.evaluations", "0"]),
    ("batch-size-0", ["{model}", "--eval", "{eval}", "--batch-size", "0"], ["batch.size", "0"]),
    ("batch-size-abc", ["{model}", "--eval", "{eval}", "--batch-size", "abc"], ["batch-size", "abc"]),
    ("holdout-1.5", ["{model}", "--eval", "{eval}", "--holdout", "1.5"], ["holdout", r"1\.5"]),
    ("layer-cap-0", ["{model}", "--eval", "{eval}", "--layer-cap", "0"], ["layer.cap", "0"]),
    ("top-k-0", ["{model}", "--eval", "{eval}", "--top-k", "0"], ["top.k", "0"]),
    ("max-seconds-0", ["{model}", "--eval", "{eval}", "--max-seconds", "0"], ["max.seconds"]),
    ("threads-negative", ["{model}", "--eval", "{eval}", "--threads", "-1"], ["threads"]),
    ("unknown-metric", ["{model}", "--eval", "{eval}", "--metric", "f1"], ["--metric", "f1", "module:function"]),
    ("metric-module-missing", ["{model}", "--eval", "{eval}", "--metric", "no_such_module:fn"],
     ["cannot import module 'no_such_module'"]),
    ("metric-function-missing", ["{model}", "--eval", "{eval}", "--metric", "json:no_such_fn"],
     ["module 'json' has no attribute 'no_such_fn'"]),
    ("metric-and-plugin", ["{model}", "--eval", "{eval}", "--metric", "kl", "--metric-plugin", "x"],
     ["--metric or --metric-plugin, not both"]),
    ("plugin-not-installed", ["{model}", "--eval", "{eval}", "--metric-plugin", "no_such_metric"],
     ["no metric plugin 'no_such_metric' is installed"]),
    ("column-for-accuracy", ["{model}", "--eval", "{eval}", "--column", "1"], ["column", "'accuracy' ignores it"]),
    ("column-out-of-range", ["{model}", "--eval", "{eval}", "--metric", "column_mae", "--column", "9"],
     ["column 9", "out of range"]),
    ("pad-id-negative", ["{model}", "--eval", "{eval}", "--metric", "agreement", "--pad-id", "-1"], ["pad_id", "-1"]),
    ("ctc-blank-for-kl", ["{model}", "--eval", "{eval}", "--metric", "kl", "--ctc-blank", "0"], ["ctc_blank", "'kl'"]),
    ("sequence-mask-missing", ["{model}", "--eval", "{eval}", "--metric", "sequence_match", "--sequence-mask", "m"],
     ["sequence_mask 'm'", "not an array"]),
    ("threshold-nan", ["{model}", "--eval", "{eval}", "--metric", "dice", "--threshold", "nan"],
     ["threshold", "finite"]),
    ("output-sample-axis-negative", ["{model}", "--eval", "{eval}", "--output-sample-axis", "-1"],
     ["output_sample_axis", "-1"]),
    ("input-sample-axis-garbage", ["{model}", "--eval", "{eval}", "--input-sample-axis", "x:1"],
     ["--input-sample-axis", "NAME=AXIS", "'x:1'"]),
    ("input-sample-axis-twice", ["{model}", "--eval", "{eval}", "--input-sample-axis", "x=1",
     "--input-sample-axis", "x=2"], ["'x' twice"]),
    ("unknown-output", ["{model}", "--eval", "{eval}", "--output", "zzz"], ["'zzz'", "not a model output"]),
    ("empty-include", ["{model}", "--eval", "{eval}", "--include="], ["include"]),
    ("unknown-mode", ["{model}", "--eval", "{eval}", "--mode", "prune"], ["--mode", "prune"]),
    ("nm-backwards", ["{model}", "--eval", "{eval}", "--mode", "nm", "--nm", "4:2"], ["nm", r"\(4, 2\)"]),
    ("nm-garbage", ["{model}", "--eval", "{eval}", "--mode", "nm", "--nm", "two:four"], ["--nm", "two:four"]),
    ("channel-multiple-0", ["{model}", "--eval", "{eval}", "--mode", "remove", "--channel-multiple", "0"],
     ["channel.multiple", "0"]),
    ("calibration-0", ["{model}", "--eval", "{eval}", "--recover", "lsq", "--calibration-samples", "0"],
     ["calibration.samples", "0"]),
    ("target-sparsity-2", ["{model}", "--eval", "{eval}", "--target-sparsity", "2"], ["target.sparsity", "2"]),
    ("bytes-in-zero-mode", ["{model}", "--eval", "{eval}", "--objective", "bytes"], ["bytes", "mode remove"]),
    ("nm-channels", ["{model}", "--eval", "{eval}", "--mode", "nm", "--criterion", "l2"], ["N:M", "magnitude"]),
    ("sensitivity-missing", ["{model}", "--eval", "{eval}", "--sensitivity-from", "{tmp}/none.json"],
     ["none.json"]),
    ("sensitivity-not-report", ["{model}", "--eval", "{eval}", "--sensitivity-from", "{eval}"], ["eval.npz"]),
]  # fmt: skip


@pytest.mark.parametrize(("args", "patterns"), [c[1:] for c in PRUNE_CASES], ids=[c[0] for c in PRUNE_CASES])
def test_prune_bad_input(files: Files, args: list[str], patterns: list[str]) -> None:
    write_bad_inputs(files.model.parent)
    proc = run_cli(*prune_args(files, *(files.fill(a) for a in args)))
    assert_bad_input(proc, *patterns)
    # neither the model nor the report, nor any temp file
    assert list(files.out.iterdir()) == []


def test_output_folder_does_not_exist(files: Files) -> None:
    target = files.out / "missing" / "pruned.onnx"
    proc = run_cli("prune", files.model, "--eval", files.evalset, "-o", target, "--report", files.report)
    assert_bad_input(proc, "-o/--out folder", "missing", "does not exist")
    assert list(files.out.iterdir()) == []


def test_report_folder_does_not_exist(files: Files) -> None:
    report = files.out / "missing" / "report.json"
    proc = run_cli("prune", files.model, "--eval", files.evalset, "-o", files.pruned, "--report", report)
    assert_bad_input(proc, "report folder", "missing", "does not exist")
    assert list(files.out.iterdir()) == []


def test_output_path_is_a_folder(files: Files) -> None:
    target = files.out / "taken"
    target.mkdir()
    proc = run_cli("prune", files.model, "--eval", files.evalset, "-o", target, "--report", files.report)
    assert_bad_input(proc, "taken")
    assert list(files.out.iterdir()) == [target]
    assert list(target.iterdir()) == []


def test_report_path_is_a_folder(files: Files) -> None:
    report = files.out / "taken"
    report.mkdir()
    proc = run_cli("prune", files.model, "--eval", files.evalset, "-o", files.pruned, "--report", report)
    assert_bad_input(proc, "taken")
    # all or nothing: a failed run must not leave the pruned model behind
    assert list(files.out.iterdir()) == [report]
    assert list(report.iterdir()) == []


def test_good_input_writes_model_and_report(files: Files) -> None:
    # the control for the cases above: the same command line with good input succeeds
    proc = run_cli(*prune_args(files, files.model, "--eval", files.evalset, "--max-evaluations", "2"))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in files.out.iterdir()) == ["pruned.onnx", "report.json"]
    onnx.checker.check_model(onnx.load(str(files.pruned)), full_check=True)


INSPECT_CASES = [
    ("missing", "none.onnx", [r"none\.onnx", "does not exist"]),
    ("truncated", "truncated.onnx", [r"truncated\.onnx", "truncated"]),
    ("not-onnx", "notes.onnx", [r"notes\.onnx", "not an ONNX model"]),
]


@pytest.mark.parametrize("json_flag", [False, True], ids=["text", "json"])
@pytest.mark.parametrize(("name", "patterns"), [c[1:] for c in INSPECT_CASES], ids=[c[0] for c in INSPECT_CASES])
def test_inspect_bad_model(tmp_path: Path, name: str, patterns: list[str], json_flag: bool) -> None:
    write_bad_inputs(tmp_path)
    proc = run_cli("inspect", tmp_path / name, *(["--json"] if json_flag else []))
    assert_bad_input(proc, *patterns)


def test_inspect_good_model_exits_0(files: Files) -> None:
    proc = run_cli("inspect", files.model, "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"w1"' in proc.stdout


# --- outputs that would overwrite each other, or an input -----------------------------------------

# Runs the CLI's main with an audit hook that logs every file it opens, to show that the clash is
# refused before the model or the eval set is even read.
WATCHED_CLI = """
import os, sys
opened = []
sys.addaudithook(lambda event, args: opened.append(args[0]) if event == "open" else None)
from service.cli import main
code = main(sys.argv[1:])
with open(os.environ["OPENED_LOG"], "w") as log:
    log.write("\\n".join(os.fsdecode(p) for p in opened if isinstance(p, (str, bytes, os.PathLike))))
sys.exit(code)
"""


def run_watched(cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[Path]]:
    """``onnx-prune ARGS`` run in ``cwd``: the process, and the files it opened (as absolute paths)."""
    log = cwd.parent / "opened.log"
    proc = subprocess.run(
        [sys.executable, "-c", WATCHED_CLI, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OPENED_LOG": str(log)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    opened = [cwd / line for line in log.read_text().splitlines()] if log.exists() else []
    return proc, [Path(os.path.abspath(p)) for p in opened]


def tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: file contents, or where a symlink points."""
    return {
        str(p.relative_to(folder)): os.readlink(p) if p.is_symlink() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_symlink() or p.is_file()
    }


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The folder the CLI runs in: model.onnx, eval.npz, out/ and link-to-out -> out; out/old.onnx
    with a hard link out/hard.json and a symlink out/soft.json."""
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    onnx.save_model(tiny_mlp(), str(work / "model.onnx"))
    write_npz(work / "eval.npz", tiny_mlp_evalset(32))
    (work / "link-to-out").symlink_to("out", target_is_directory=True)
    (work / "out" / "old.onnx").write_bytes(b"an earlier model that must survive")
    os.link(work / "out" / "old.onnx", work / "out" / "hard.json")
    (work / "out" / "soft.json").symlink_to("old.onnx")
    (work / "token").write_text("s3cret\n")
    return work


# (id, output options, the words the error line must hold: both options and the file)
CLASHES = [
    ("report-is-out", ["-o", "X.onnx", "--report", "X.onnx"], ["--report and -o/--out are the same file 'X.onnx'"]),
    ("plot-is-out", ["-o", "X.onnx", "--plot", "./X.onnx"], ["--plot './X.onnx' and -o/--out 'X.onnx'", "same file"]),
    ("html-is-report", ["-o", "X.onnx", "--report", "r.html", "--html", "{work}/r.html"],
     ["--html '.*/r.html' and --report 'r.html'", "same file"]),
    ("symlinked-folder", ["-o", "out/X.onnx", "--report", "link-to-out/X.onnx"], ["--report", "-o/--out", "X.onnx"]),
    ("symlink", ["-o", "out/old.onnx", "--report", "out/soft.json"], ["--report", "-o/--out", "soft.json"]),
    ("hard-link", ["-o", "out/old.onnx", "--report", "out/hard.json"], ["--report", "-o/--out", "hard.json"]),
    ("out-is-model", ["-o", "model.onnx"], ["-o/--out and the input model are the same file 'model.onnx'"]),
    ("out-is-model-absolute", ["-o", "{work}/model.onnx"], ["-o/--out '.*/model.onnx' and the input model"]),
    ("report-is-eval", ["-o", "X.onnx", "--report", "./eval.npz"], ["--report './eval.npz' and --eval 'eval.npz'"]),
    ("report-is-sensitivity", ["-o", "X.onnx", "--report", "out/old.onnx", "--sensitivity-from", "out/hard.json"],
     ["--report 'out/old.onnx' and --sensitivity-from 'out/hard.json'"]),
    ("report-is-token-remote", ["-o", "X.onnx", "--report", "token", "--token-file", "token",
                                "--server", "127.0.0.1:1"], ["--report and --token-file are the same file 'token'"]),
]  # fmt: skip


@pytest.mark.parametrize(("outputs", "words"), [c[1:] for c in CLASHES], ids=[c[0] for c in CLASHES])
def test_outputs_that_are_the_same_file_are_refused_before_any_work(
    workdir: Path, outputs: list[str], words: list[str]
) -> None:
    before = tree(workdir)
    args = [a.format(work=workdir) for a in outputs]
    proc, opened = run_watched(workdir, "prune", "model.onnx", "--eval", "eval.npz", *args)
    assert_bad_input(proc, "same file", *words)
    assert "overwrite" in proc.stderr
    assert tree(workdir) == before  # nothing written, nothing replaced, no temp file
    # refused before the model or the eval set was read (the eval set is valid: the clash is the error)
    assert workdir / "model.onnx" not in opened and workdir / "eval.npz" not in opened, opened


def test_distinct_outputs_beside_links_are_written(workdir: Path) -> None:
    # the control: the same folder and links, outputs that are different files
    before = tree(workdir)
    proc, opened = run_watched(
        workdir, "prune", "model.onnx", "--eval", "eval.npz", "--max-evaluations", "2", "--quiet",
        "-o", "link-to-out/X.onnx", "--report", "out/X.json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert workdir / "model.onnx" in opened and workdir / "eval.npz" in opened
    after = tree(workdir)
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(set(after) - set(before)) == ["out/X.json", "out/X.onnx"]
    onnx.checker.check_model(onnx.load(str(workdir / "out" / "X.onnx")), full_check=True)


SERVER_TARGETS = [
    ("no-port", "localhost", ["--server needs HOST:PORT", "'localhost'"]),
    ("empty-host", ":50051", ["--server needs HOST:PORT with a host"]),
    ("port-not-a-number", "localhost:grpc", ["--server needs HOST:PORT", "port from 1 to 65535", "'localhost:grpc'"]),
    ("port-out-of-range", "localhost:65536", ["--server needs HOST:PORT", "port from 1 to 65535"]),
    ("bare-ipv6", "::1:50051", ["--server needs HOST:PORT", "brackets"]),
]


@pytest.mark.parametrize("command", ["prune", "inspect"])
@pytest.mark.parametrize(("target", "words"), [c[1:] for c in SERVER_TARGETS], ids=[c[0] for c in SERVER_TARGETS])
def test_server_needs_host_and_port(files: Files, command: str, target: str, words: list[str]) -> None:
    args = prune_args(files, files.model, "--eval", files.evalset) if command == "prune" else ["inspect", files.model]
    proc = run_cli(*args, "--server", target, timeout=120)
    assert_bad_input(proc, *(re.escape(w) for w in words))
    assert list(files.out.iterdir()) == []
