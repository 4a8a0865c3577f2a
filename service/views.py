"""What a run looks like: the trade-off plot (PNG) and a self-contained HTML page.

Both need matplotlib (``pip install 'onnx-pruner[plot]'``), imported only here and
only when asked for, with the Agg backend (no display).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import pruner

__all__ = ["PlotUnavailable", "html_page", "require_matplotlib", "trade_off_png", "wall_time"]

INSTALL_HINT = "pip install 'onnx-pruner[plot]'"


class PlotUnavailable(pruner.InvalidConfigError):
    """matplotlib is not installed."""


def wall_time(report: pruner.Report) -> str:
    """The run's wall time, and what recovery took of it when it ran."""
    timings = report.timings
    text = f"{timings.get('total', 0.0):.2f} s"
    if "recovery" in timings:
        text += f" (calibration {timings.get('calibration', 0.0):.2f} s, fits {timings['recovery']:.2f} s)"
    return text


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotUnavailable(f"plots need matplotlib: {INSTALL_HINT}") from e
    return plt


def require_matplotlib() -> None:
    """Fail before a long run, not after it, when the plot extra is missing."""
    _pyplot()


def trade_off_png(report: pruner.Report) -> bytes:
    """Metric vs sparsity of every evaluated candidate, the tolerance band, baseline and result."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    base = report.baseline.search
    worst = base - report.allowed_loss if report.higher_is_better else base + report.allowed_loss
    low, high = sorted((base, worst))
    ax.axhspan(low, high, color="#cde8cd", alpha=0.6, label=f"within tolerance ({report.options['tolerance']})")
    ax.axhline(base, color="#2b6a2b", linewidth=1.2, label=f"baseline {base:.4f}")
    removed = "removed" if report.options.get("mode") == "remove" else "zeroed"
    for passed, complete, colour, label in (
        (True, True, "#1f77b4", "passed"),
        (False, True, "#d62728", "failed"),
        (False, False, "#d62728", "failed (stopped early)"),
    ):
        points = [t for t in report.trace if t.passed == passed and t.complete == complete]
        if points:
            ax.scatter(
                [100 * t.sparsity for t in points],
                [t.metric for t in points],
                s=36,
                facecolors=colour if complete else "none",
                edgecolors=colour,
                label=label,
                zorder=3,
            )
    ax.scatter(
        [100 * report.sparsity],
        [report.final.search],
        marker="*",
        s=260,
        color="#ff9f1c",
        edgecolors="black",
        label=f"result: {report.sparsity:.1%} {removed}, {report.final.search:.4f}",
        zorder=4,
    )
    ax.set_xlabel(f"prunable weights {removed} (%)")
    ax.set_ylabel(f"{report.metric} (search split)")
    ax.set_title(f"{report.metric} vs size: {report.evaluations} candidates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if headers else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def drop_text(drop: pruner.DropInterval | None) -> str:
    """The held-out drop with its confidence interval, on one line (``-`` without a held-out split)."""
    if drop is None:
        return "- (no held-out split)"
    counts = "" if drop.worse is None else f", {drop.worse} worse / {drop.better} better samples"
    return (
        f"{drop.estimate:.4f}, {drop.confidence:.0%} interval [{drop.low:.4f}, {drop.high:.4f}] "
        f"({drop.method}, {drop.samples} samples{counts}; rule {drop.rule})"
    )


def html_page(report: pruner.Report, model_name: str = "model") -> str:
    """One self-contained page: summary, plot, per-layer table and the search trace."""
    png = base64.b64encode(trade_off_png(report)).decode()

    def metric(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    summary = [
        ["status", report.status],
        ["mode", report.options.get("mode", "zero")],
        [f"{report.metric}, search split", f"{metric(report.baseline.search)} → {metric(report.final.search)}"],
        [f"{report.metric}, held-out split", f"{metric(report.baseline.holdout)} → {metric(report.final.holdout)}"],
        ["held-out drop", drop_text(report.drop)],
        ["allowed loss", f"{report.allowed_loss:.4g}"],
        ["prunable weights", f"{report.nonzero_before:,} → {report.nonzero_after:,} ({report.sparsity:.1%} pruned)"],
        ["file bytes", f"{report.bytes_before:,} → {report.bytes_after:,}"],
        ["evaluations", f"{report.evaluations} (+{report.confirmations} held-out, {report.probes} probes)"],
        ["wall time", wall_time(report)],
    ]
    channels = any(la.channels_before is not None for la in report.layers)
    layer_rows = []
    for la in report.layers:
        profile = report.sensitivity.get(la.name)
        row: list[object] = [la.name, la.op_type, f"{la.params:,}", f"{la.nonzero_after:,}", f"{la.sparsity:.1%}"]
        if channels:
            row.append(f"{la.channels_before} → {la.channels_after}")
        row.append(", ".join(f"{p[0]:.0%}: {p[1]:.3g}" for p in profile) if profile else "-")
        layer_rows.append(row)
    layer_headers = ["layer", "op", "params", "after", "pruned", *(["channels"] if channels else []), "sensitivity"]
    trace_rows: list[list[object]] = [
        [
            t.index,
            t.phase.value,
            f"{t.sparsity:.1%}",
            f"{t.nonzero_params:,}",
            f"{t.metric:.4f}",
            "pass" if t.passed else "fail",
            "" if t.complete else f"stopped after {t.samples}",
        ]
        for t in report.trace
    ]
    skipped = [[s.name, s.op_type, s.reason] for s in report.skipped]
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>onnx-pruner: {html.escape(model_name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
th {{ background: #f0f0f0; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>onnx-pruner report: {html.escape(model_name)}</h1>
{_table([], summary)}
<img alt="metric vs size of every candidate" src="data:image/png;base64,{png}">
<h2>Layers</h2>
{_table(layer_headers, layer_rows)}
<h2>Search trace</h2>
{_table(["#", "phase", "pruned", "nonzero", report.metric, "verdict", ""], trace_rows)}
<h2>Left alone</h2>
{_table(["name", "op", "why"], skipped) if skipped else "<p>nothing</p>"}
<h2>Notes</h2><ul>{notes}</ul>
<p><small>onnx-pruner {html.escape(report.tool_version)}; {html.escape(str(report.versions))}</small></p>
</body></html>
"""
