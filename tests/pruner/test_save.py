"""Saving a model with companion files: two outputs that are the same file are refused before anything is written."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

import pruner
from tests.helpers import tiny_mlp, tiny_mlp_evalset, write_npz

OLD = b"an earlier file that must survive"

# (id, how the companion names the model's file "out/m.onnx" from tmp_path, which is the working folder)
Alias = Callable[[Path], Path]
ALIASES: list[tuple[str, Alias]] = [
    ("same-spelling", lambda tmp: Path("out/m.onnx")),
    ("dot-slash", lambda tmp: Path("./out/m.onnx")),
    ("dot-dot", lambda tmp: Path("out/../out/m.onnx")),
    ("absolute", lambda tmp: tmp / "out" / "m.onnx"),
    ("symlinked-folder", lambda tmp: Path("link-to-out/m.onnx")),
    ("symlink-to-file", lambda tmp: Path("out/m-link.onnx")),
]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the working folder, with ``out/`` and ``link-to-out -> out``, ``out/m-link.onnx -> m.onnx``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "link-to-out").symlink_to(tmp_path / "out", target_is_directory=True)
    (tmp_path / "out" / "m-link.onnx").symlink_to("m.onnx")  # dangling until m.onnx exists
    return tmp_path


def listing(folder: Path) -> dict[str, bytes | str]:
    """Every entry of ``folder``: file contents, or where a symlink points."""
    return {p.name: os.readlink(p) if p.is_symlink() else p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("exists", [False, True], ids=["new", "existing"])
@pytest.mark.parametrize("alias", [a[1] for a in ALIASES], ids=[a[0] for a in ALIASES])
def test_companion_that_is_the_model_file_is_refused(workdir: Path, alias: Alias, exists: bool) -> None:
    model_path = Path("out/m.onnx")
    if exists:
        (workdir / model_path).write_bytes(OLD)
    before = listing(workdir / "out")
    companion = alias(workdir)
    with pytest.raises(pruner.InvalidConfigError, match="same file") as info:
        pruner.save_model(tiny_mlp(), model_path, companions=[(companion, b"{}")])
    assert str(companion) in str(info.value) and "m.onnx" in str(info.value)
    assert listing(workdir / "out") == before  # nothing written, nothing replaced, no temp file


def test_hard_link_to_the_model_file_is_refused(workdir: Path) -> None:
    model_path = workdir / "out" / "m.onnx"
    model_path.write_bytes(OLD)
    os.link(model_path, workdir / "out" / "hard.onnx")
    with pytest.raises(pruner.InvalidConfigError, match=r"hard\.onnx.*same file"):
        pruner.save_model(tiny_mlp(), model_path, companions=[(workdir / "out" / "hard.onnx", b"{}")])
    assert model_path.read_bytes() == OLD == (workdir / "out" / "hard.onnx").read_bytes()


def test_two_companions_that_are_the_same_file_are_refused(workdir: Path) -> None:
    with pytest.raises(pruner.InvalidConfigError, match="same file"):
        pruner.save_model(
            tiny_mlp(),
            "out/m.onnx",
            companions=[("out/report.json", b"{}"), (workdir / "link-to-out" / "report.json", b"[]")],
        )
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["m-link.onnx"]


def test_distinct_files_beside_links_are_written(workdir: Path) -> None:
    # the control: names that only look alike are different files
    pruner.save_model(tiny_mlp(), "out/m.onnx", companions=[("out/m.onnx.json", b"{}"), ("m.onnx", b"[]")])
    assert pruner.load_model(workdir / "out" / "m.onnx").graph.node
    assert (workdir / "out" / "m.onnx.json").read_bytes() == b"{}"
    assert (workdir / "m.onnx").read_bytes() == b"[]"


def test_prune_result_save_refuses_a_report_over_the_model(tmp_path: Path) -> None:
    evalset = write_npz(tmp_path / "eval.npz", tiny_mlp_evalset(64))
    result = pruner.prune(tiny_mlp(), evalset, pruner.PruneOptions(max_evaluations=1))
    out = tmp_path / "out"
    out.mkdir()
    target = out / "x.onnx"
    with pytest.raises(pruner.InvalidConfigError, match=r"companion and model are the same file .*x\.onnx"):
        result.save(target, target)
    with pytest.raises(pruner.InvalidConfigError, match="same file"):
        result.save(target, out / "r.json", extra=[(out / "." / "x.onnx", b"png")])
    assert list(out.iterdir()) == []
    result.save(target, out / "r.json")  # the control
    assert pruner.Report.from_json((out / "r.json").read_text()).status == result.report.status


def test_check_output_path_names_both_options(tmp_path: Path) -> None:
    out = tmp_path / "x.onnx"
    with pytest.raises(pruner.InvalidConfigError) as info:
        pruner.check_output_path(out, "--report", others=[(out, "-o/--out")])
    assert str(info.value) == f"--report and -o/--out are the same file {str(out)!r}: one would overwrite the other"
    pruner.check_output_path(out, "--report", others=[(tmp_path / "y.onnx", "-o/--out")])
