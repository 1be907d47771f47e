"""docs/results.md is generated from the result files and kept in step with them."""

from __future__ import annotations

import json
from pathlib import Path

from dsf_runtime.benchmarks.report import results_page
from dsf_runtime.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_page_matches_the_committed_results():
    page = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    assert page == results_page(ROOT / "benchmarks" / "results"), "run `dsf bench report` and commit docs/results.md"


def test_each_section_names_its_machine(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "machines.json").write_text(json.dumps({"folders": {"old": "Some CPU"}}))
    (tmp_path / "old" / "layer.json").write_text(json.dumps({"environment": {"processor": "unknown"}}))
    (tmp_path / "old" / "layer.md").write_text("# Layer\n\n| a |\n|---|\n| 1 |\n")
    (tmp_path / "new.json").write_text(
        json.dumps({"environment": {"cpu": "AMD EPYC (family 25 model 17)", "cores": 2}})
    )
    out = tmp_path / "page.md"
    assert main(["bench", "report", "--results", str(tmp_path), "--out", str(out), "--no-readme"]) == 0
    text = out.read_text()
    assert "## Layer speed (`old/layer.json`)\n\nCPU: Some CPU\n\n| a |" in text
    assert "CPU: AMD EPYC (family 25 model 17), 2 cores" in text and "(no markdown table" in text


def test_the_readme_headline_matches_the_committed_results():
    from dsf_runtime.benchmarks.report import HEADLINE_END, HEADLINE_START, headline

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index(HEADLINE_START) + len(HEADLINE_START) : readme.index(HEADLINE_END)].strip()
    assert table == headline(ROOT / "benchmarks" / "results"), "run `dsf bench report` and commit README.md"
    assert len(readme.splitlines()) <= 200
