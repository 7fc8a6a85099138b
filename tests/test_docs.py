"""The docs site builds strictly (every warning an error: broken links and anchors, pages left
out of the table of contents, a CLI reference that cannot be generated), and the README stays
a short front page whose links lead somewhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

# bin/test installs the docs extra (bin/setup-venv); bin/test-versions' venvs do not have it.
pytestmark = pytest.mark.docs


def test_the_docs_site_builds_with_warnings_as_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), os.path.join(REPO, "docs"), str(tmp_path / "html")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cli_page = re.sub(r"<[^>]+>", "", (tmp_path / "html" / "cli.html").read_text())
    assert "py-preload bundle [OPTIONS]" in cli_page  # generated from the click commands


def test_readme_is_short_and_its_links_exist():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert len(text.splitlines()) <= 150
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert "docs/index.md" in local
    missing = [t for t in local if not os.path.exists(os.path.join(REPO, t))]
    assert not missing, f"README links to missing files: {missing}"


def test_the_charts_are_drawn_from_the_benchmarks_json(tmp_path):
    """benchmarks/charts.py draws every chart whose data the benchmarks saved in docs/data/,
    and each committed chart carries its data's date (it was drawn from that file)."""
    import json

    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "charts.py"),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import charts
    finally:
        sys.path.pop(0)
    drawn = 0
    for name, (source, _draw) in charts.CHARTS.items():
        data = os.path.join(REPO, "docs", "data", source)
        if not os.path.exists(data):
            continue
        with open(data, encoding="utf-8") as f:
            date = json.load(f)["date"][:16].replace("T", " ")
        for svg in (tmp_path / name, os.path.join(REPO, "docs", "img", name)):
            with open(svg, encoding="utf-8") as f:
                assert date in f.read(), (svg, date)
        drawn += 1
    assert drawn >= 1
