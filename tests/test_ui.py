"""The MLflow UI as a person sees it: `make demo`'s end state in a real headless chromium.

Chromium's own headless mode renders the React UI; `--dump-dom` gives the page after its
scripts ran, `--screenshot` the picture. Screenshots are written under the test's
temporary folder, and also to $CROSSAUDIT_SCREENSHOTS when set (how docs/ got them:
`CROSSAUDIT_SCREENSHOTS=docs .venv/bin/pytest tests/test_ui.py`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urljoin

import pytest

from crossaudit import registry
from crossaudit.demo import MODEL_NAME, demo

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs Debian's chromium)"),
]
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
         "--virtual-time-budget=20000"]  # fmt: skip


def browse(url: str, screenshot: Path) -> str:
    """The page's DOM once its scripts ran, and a screenshot of it."""
    dom = subprocess.run([CHROMIUM, *FLAGS, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    subprocess.run([CHROMIUM, *FLAGS, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    if shots := os.environ.get("CROSSAUDIT_SCREENSHOTS"):
        shutil.copy(screenshot, Path(shots) / screenshot.name)
    return dom.stdout


def tag_value(dom: str, key: str) -> str | None:
    """The value cell of a tag row in the version page's tag table."""
    row = re.search(rf'data-row-key="{re.escape(key)}".*?</tr>', dom, re.S)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row[0], re.S) if row else []
    return re.sub(r"<[^>]+>", "", cells[1]).strip() if len(cells) > 1 else None


def test_demo_verdicts_are_visible_and_the_status_links_to_the_audit_report(tmp_path):
    with demo(tmp_path / "demo") as state:
        poisoned = state.versions["globex"]
        page = f"{state.url}/#/models/{MODEL_NAME}/versions/{poisoned.version}"
        dom = browse(page, tmp_path / "mlflow_ui_version.png")
        assert tag_value(dom, registry.STATUS) == "failed"
        assert tag_value(dom, registry.VERDICT) == "backdoor"
        assert "crossaudit incident" in dom, "the reverted manual promotion is in the description"
        link = re.search(r'<a [^>]*href="([^"]+)"[^>]*>audit run</a>', dom)
        assert link, "the description links to the audit run"
        run_page = urljoin(page, link[1])
        run_id = registry.client(state.url).get_model_version(MODEL_NAME, poisoned.version).tags[registry.RUN_ID]
        assert run_page.endswith(f"/runs/{run_id}") and run_page.startswith(state.url)

        report = browse(f"{run_page}/artifacts/peer_1/report.html", tmp_path / "mlflow_ui_report.png")
        assert "peer_1/report.html" in report and "cka_heatmap.png" in report
        assert re.search(r'<iframe[^>]*class="mlflow-html-iframe"', report), "the UI renders the HTML report"
