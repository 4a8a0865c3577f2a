"""The HTML report page."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pruner import Report
from service import views

# a report with a held-out drop interval, as the CLI writes it
REPORT = Path(__file__).resolve().parents[1] / "fixtures" / "report_v0_dict_skipped.json"


def test_html_page_shows_the_held_out_drop_and_its_interval() -> None:
    report = Report.from_json(REPORT.read_text())
    drop = report.drop
    assert drop is not None
    page = views.html_page(report, "mlp.onnx")
    line = (
        f"<tr><td>held-out drop</td><td>{drop.estimate:.4f}, {drop.confidence:.0%} interval "
        f"[{drop.low:.4f}, {drop.high:.4f}] ({drop.method}, {drop.samples} samples"
    )
    assert line in page
    assert f"rule {drop.rule})</td></tr>" in page


def test_html_page_without_a_held_out_split_says_so() -> None:
    report = dataclasses.replace(Report.from_json(REPORT.read_text()), drop=None)
    assert "<tr><td>held-out drop</td><td>- (no held-out split)</td></tr>" in views.html_page(report)
