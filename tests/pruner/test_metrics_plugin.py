"""Metrics of your own: ``load_metric('module:function')`` and installed plugins (entry points)."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import pruner
from pruner import EvalSet, PruneOptions
from tests.helpers import tiny_mlp, tiny_mlp_evalset

PLUGIN_SOURCE = Path(__file__).resolve().parents[1] / "fixtures" / "metric_plugin"
PLUGIN_MODULE = "onnx_pruner_test_metrics"


def install_metric_plugin(target: Path) -> Path:
    """``pip install`` the fixture plugin package into ``target`` (offline, no dependencies) and
    return the directory to put on ``sys.path`` or ``PYTHONPATH``. The source is copied first,
    so the build leaves nothing in the repository."""
    source = target / "src"
    shutil.copytree(PLUGIN_SOURCE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = target / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return site


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    site = install_metric_plugin(tmp_path_factory.mktemp("metric_plugin"))
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        sys.modules.pop(PLUGIN_MODULE, None)
        importlib.invalidate_caches()


def mlp_data(n: int = 48) -> EvalSet:
    return EvalSet({"x": tiny_mlp_evalset(n)["x"]})


def test_no_plugin_is_found_before_it_is_installed() -> None:
    assert "score_gap" not in pruner.metric_plugins()
    with pytest.raises(pruner.InvalidConfigError, match="no metric plugin 'score_gap' is installed"):
        pruner.plugin_metric("score_gap")


def test_installed_plugins_are_listed_by_entry_point(plugin_site: Path) -> None:
    found = pruner.metric_plugins()
    assert found["score_gap"] == f"{PLUGIN_MODULE}:score_gap"
    assert found["top1_kept"] == f"{PLUGIN_MODULE}:make_top1_kept"
    assert (plugin_site / f"{PLUGIN_MODULE}-0.1.0.dist-info" / "entry_points.txt").is_file()


def test_a_plugin_object_prunes_end_to_end(plugin_site: Path) -> None:
    metric = pruner.plugin_metric("score_gap")
    assert metric.name == "score_gap" and not metric.higher_is_better and metric.best == 0.0
    options = PruneOptions(metric=metric, tolerance=pruner.Tolerance(0.5), max_evaluations=3)
    result = pruner.prune(tiny_mlp(), mlp_data(), options)
    assert result.report.metric == "score_gap"
    assert not result.report.higher_is_better
    assert result.report.baseline.search == 0.0
    assert result.report.final.search <= 0.5 + 1e-9


def test_a_plugin_factory_prunes_end_to_end(plugin_site: Path) -> None:
    metric = pruner.plugin_metric("top1_kept")
    assert metric.name == "top1_kept" and metric.best == 1.0
    result = pruner.prune(tiny_mlp(), mlp_data(), PruneOptions(metric=metric, max_evaluations=3))
    assert result.report.metric == "top1_kept"
    assert result.report.baseline.search == 1.0


def test_a_plugin_that_is_not_a_metric_is_named(plugin_site: Path) -> None:
    with pytest.raises(pruner.InvalidConfigError, match=r"metric plugin 'not_a_metric' \(.*NOT_A_METRIC\) is a int"):
        pruner.plugin_metric("not_a_metric")


def test_load_metric_takes_a_plain_scoring_function(plugin_site: Path) -> None:
    metric = pruner.load_metric(f"{PLUGIN_MODULE}:top1_agreement")
    # named by its spec; the function's attributes say what it is
    assert metric.name == f"{PLUGIN_MODULE}:top1_agreement"
    assert metric.higher_is_better and metric.best == 1.0 and not metric.needs_labels
    result = pruner.prune(tiny_mlp(), mlp_data(), PruneOptions(metric=metric, max_evaluations=2))
    assert result.report.metric == f"{PLUGIN_MODULE}:top1_agreement"


def test_load_metric_takes_objects_and_factories(plugin_site: Path) -> None:
    assert pruner.load_metric(f"{PLUGIN_MODULE}:score_gap").name == "score_gap"
    assert pruner.load_metric(f"{PLUGIN_MODULE}:make_top1_kept").name == "top1_kept"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("score_gap", "'score_gap' is neither a built-in metric nor 'module:function'"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz' of metric 'no_such_module_xyz:f'"),
        ("numpy:no_such_function", "module 'numpy' has no attribute 'no_such_function'"),
        ("numpy:pi", r"'numpy:pi' is a float, not a CustomMetric or a function"),
    ],
)
def test_load_metric_names_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(pruner.InvalidConfigError, match=message):
        pruner.load_metric(spec)


def test_a_factory_that_returns_something_else_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_metrics_factory.py").write_text("def make():\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(pruner.InvalidConfigError, match="metric factory 'my_metrics_factory:make' returned a int"):
        pruner.load_metric("my_metrics_factory:make")


def test_a_users_module_is_loaded_from_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_error_metric.py").write_text(
        "import numpy as np\n"
        "def worst_gap(outputs, labels, reference):\n"
        "    return np.abs(outputs - reference).max(axis=1)\n"
        "worst_gap.higher_is_better = False\n"
        "worst_gap.best = 0.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    metric = pruner.load_metric("my_error_metric:worst_gap")
    assert not metric.higher_is_better and metric.best == 0.0
    out = np.array([[1.0, 2.0]], np.float32)
    assert metric.fn(out, None, out + 0.5).tolist() == [0.5]
