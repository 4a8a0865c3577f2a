"""deploy/ci/: the pipeline examples (GitHub Actions, GitLab CI): submit, watch, download, fail when nothing passed.

- Each validates against its CI system's schema with check-jsonschema's vendored copies (``vendor.github-workflows``,
  ``vendor.gitlab-ci``; offline), and a broken copy is refused with the problem named.
- Their shell scripts pass ``bash -n``.
- The ``onnx-prune`` commands run in order submit, watch (with ``--fail-unchanged``: exit 3 fails the step), fetch,
  and each parses with the real CLI's argument parser (a subcommand this CLI does not have yet is skipped, naming it).
- The GitLab job's script, run by bash as GitLab runs it (all lines in one shell, ``set -eo pipefail``), against a
  real server on a loopback port with the real CLI: a model that prunes is downloaded (exit 0), one where nothing
  passes fails the job with exit 3 and downloads nothing.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
import yaml
from grpc_health.v1 import health_pb2

from service import cli, errors, server
from tests.service.test_server import healthy

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"

CI = ROOT / "deploy" / "ci"
GITHUB = CI / "github-actions.yml"
GITLAB = CI / "gitlab-ci.yml"
SCHEMAS = {GITHUB.name: "vendor.github-workflows", GITLAB.name: "vendor.gitlab-ci"}


def check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", SCHEMAS[path.name], str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def scripts(path: Path) -> list[str]:
    """The shell each CI system runs, in order (GitHub's ``${{ }}`` expressions become a placeholder word)."""
    doc = yaml.safe_load(path.read_text())
    if path == GITHUB:
        found = [step["run"] for job in doc["jobs"].values() for step in job["steps"] if "run" in step]
    else:
        found = [line for job in doc.values() if isinstance(job, dict) and "script" in job for line in job["script"]]
    return [re.sub(r"\$\{\{[^}]*\}\}", "EXPRESSION", s) for s in found]


def commands(path: Path) -> list[list[str]]:
    """Every ``onnx-prune`` command line of a pipeline, split as the shell would, in order."""
    out = []
    for script in scripts(path):
        for match in re.finditer(r"onnx-prune ([^\n)|]*?)(?:\|\||>|\)|$)", script, flags=re.MULTILINE):
            out.append(shlex.split(match.group(1)))
    return out


@pytest.mark.parametrize("path", [GITHUB, GITLAB], ids=lambda p: p.name)
def test_pipeline_validates_against_its_ci_schema(path: Path) -> None:
    done = check_jsonschema(path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "validation done" in done.stdout


@pytest.mark.parametrize(
    ("path", "break_it", "named"),
    [
        (GITHUB, lambda text: text.replace("runs-on:", "run-on:"), "'runs-on' is a required property"),
        (GITHUB, lambda text: text.replace("timeout-minutes: 240", "timeout-minutes: four hours"), "timeout-minutes"),
        (GITLAB, lambda text: text.replace("  rules:\n", "  rule:\n"), "'rule' was unexpected"),
        (GITLAB, lambda text: text.replace("    paths:\n      - pruned/", "    paths: pruned/"), "artifacts.paths"),
        (GITLAB, lambda text: text.replace("when: on_success", "when: sometimes"), "'sometimes'"),
    ],
    ids=["github-misspelt-key", "github-bad-timeout", "gitlab-misspelt-key", "gitlab-paths-not-a-list", "gitlab-enum"],
)
def test_a_broken_pipeline_is_refused_naming_the_problem(tmp_path: Path, path: Path, break_it: Any, named: str) -> None:
    broken_text = break_it(path.read_text())
    assert broken_text != path.read_text()
    broken = tmp_path / path.name
    broken.write_text(broken_text)
    done = check_jsonschema(broken)
    assert done.returncode == 1, done.stdout + done.stderr
    assert named in done.stdout, done.stdout


@pytest.mark.parametrize("path", [GITHUB, GITLAB], ids=lambda p: p.name)
def test_pipeline_scripts_are_valid_shell(path: Path) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    for script in scripts(path):
        done = subprocess.run([bash, "-n"], input=script, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{done.stderr}\nin:\n{script}"


@pytest.mark.parametrize("path", [GITHUB, GITLAB], ids=lambda p: p.name)
def test_pipeline_submits_watches_fetches_and_fails_when_nothing_passed(path: Path) -> None:
    found = commands(path)
    order = [c[0] for c in found]
    assert order[:3] == ["submit", "watch", "fetch"], order
    submit, watch = found[0], found[1]
    assert "--idempotency-key" in submit and "--server" in submit
    # exit 3 (nothing passed the tolerance) comes from watch, and the step exits with watch's code
    assert "--fail-unchanged" in watch
    assert errors.Exit.UNCHANGED == 3
    watch_script = next(s for s in scripts(path) if "onnx-prune watch" in s)
    assert 'exit "$rc"' in watch_script
    assert '"$rc" -eq 3' in watch_script
    assert f'"$rc" -ne {int(errors.Exit.UNAVAILABLE)}' in watch_script


@pytest.mark.parametrize("path", [GITHUB, GITLAB], ids=lambda p: p.name)
def test_pipeline_commands_parse_with_the_cli(path: Path) -> None:
    parser = cli._parser()
    known = set(next(a for a in parser._actions if a.dest == "command").choices)
    missing = sorted({c[0] for c in commands(path)} - known)
    for command in commands(path):
        if command[0] in missing:
            continue
        try:
            parser.parse_args(command)
        except SystemExit as e:
            pytest.fail(f"onnx-prune {shlex.join(command)} does not parse (exit {e.code})")
    if missing:
        pytest.skip(f"this CLI has no {', '.join(missing)} yet (issue 19: the jobs API adds them)")


def _jobs_api() -> None:
    parser = cli._parser()
    known = set(next(a for a in parser._actions if a.dest == "command").choices)
    flags = {o for a in server._parser()._actions for o in a.option_strings}
    if not {"submit", "watch", "fetch"} <= known or "--job-store" not in flags:
        pytest.skip("this server and CLI have no job API yet (issue 19)")


@pytest.fixture
def job_server(tmp_path: Path) -> Iterator[str]:
    """``python -m service`` with its own SQLite job store on a free loopback port; its address."""
    _jobs_api()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ONNX_PRUNER_TOKEN", None)
    command = [sys.executable, "-m", "service", "--address", address, "--max-jobs", "1"]
    command += ["--artifacts", str(tmp_path / "artifacts"), "--runtime-dir", str(tmp_path / "runtime")]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the server exited: {process.communicate()[1]}"
            try:
                if healthy(address) == health_pb2.HealthCheckResponse.SERVING:
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, "the server did not start serving within 120 s"
            time.sleep(0.2)
        yield address
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_gitlab_job(work: Path, address: str, options: str | None = None) -> subprocess.CompletedProcess[str]:
    """The GitLab job's script in ``work``, as GitLab's runner runs it, with ``onnx-prune`` the real CLI.

    ``options`` replaces the prune options of the example (to make a job where nothing passes)."""
    job = yaml.safe_load(GITLAB.read_text())["prune-detector"]
    script = "\n".join(job["script"])
    if options is not None:
        assert "--tolerance 0.01 --metric accuracy" in script
        script = script.replace("--tolerance 0.01 --metric accuracy", options)
    bin_dir = work / "bin"
    bin_dir.mkdir()
    (bin_dir / "onnx-prune").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m service.cli "$@"\n')
    (bin_dir / "onnx-prune").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    env.update({k: str(v) for k, v in job["variables"].items()})
    env.update(ONNX_PRUNER_SERVER=address, CI_PROJECT_PATH="group/project", CI_PIPELINE_ID=str(os.getpid()))
    env.pop("ONNX_PRUNER_TOKEN", None)
    return subprocess.run(
        ["bash", "-c", "set -eo pipefail\n" + script], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )


def _work(tmp_path: Path, name: str) -> Path:
    work = tmp_path / name
    (work / "models").mkdir(parents=True)
    (work / "data").mkdir()
    shutil.copy(FIXTURES / "mlp.onnx", work / "models" / "detector.onnx")
    shutil.copy(FIXTURES / "mlp_eval.npz", work / "data" / "detector-eval.npz")
    return work


def test_the_gitlab_job_prunes_and_downloads(tmp_path: Path, job_server: str) -> None:
    work = _work(tmp_path, "prunes")
    done = run_gitlab_job(work, job_server)
    assert done.returncode == 0, done.stdout + done.stderr
    pruned = work / "pruned" / "detector.onnx"
    assert pruned.is_file() and (work / "pruned" / "detector.report.json").is_file()
    onnx.checker.check_model(onnx.load(pruned), full_check=True)


def test_the_gitlab_job_fails_with_exit_3_when_nothing_passed(tmp_path: Path, job_server: str) -> None:
    work = _work(tmp_path, "unchanged")
    # the CLI's own way to a job where nothing passes (tests/service/test_cli.py)
    done = run_gitlab_job(work, job_server, options="--tolerance 0 --metric cosine --recover none")
    assert done.returncode == errors.Exit.UNCHANGED, done.stdout + done.stderr
    assert "nothing passed the tolerance" in done.stdout
    assert not (work / "pruned").exists()
