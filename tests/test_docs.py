"""The documentation as a newcomer meets it: the site builds in strict mode (a broken link
or anchor fails), README stays a front door, its results table is the benchmark's own,
and nothing outside the design log tells the project's history."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from benchmarks.headline import PAGES, page_table, table

ROOT = Path(__file__).resolve().parents[1]
# Where the project's history may be told; everywhere else says why things are as they are.
HISTORY = re.compile(r"\b(stop|issue) \d+\b", re.IGNORECASE)


def test_the_site_builds_in_strict_mode(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    report_page = (tmp_path / "site" / "report" / "index.html").read_text()
    assert "additionalProperties" in report_page, "the report page includes the published JSON Schema"


def test_readme_is_a_front_door_and_its_results_are_generated():
    import json

    from benchmarks.headline import HEADLINE

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    generated = table(json.loads(HEADLINE.read_text()))
    for page in PAGES:
        assert page_table(page) == generated, f"run `python -m benchmarks.headline` ({page.name})"


def test_nothing_outside_the_design_log_tells_history():
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    told = [
        f"{name}:{number}"
        for name in tracked
        if name.endswith((".py", ".md", ".yaml", ".yml", ".toml", ".j2")) and name != "docs/design_log.md"
        for number, line in enumerate((ROOT / name).read_text().splitlines(), start=1)
        if HISTORY.search(line)
    ]
    assert told == []
