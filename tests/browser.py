"""Headless chromium for the tests that look at pages as a person would: its own headless
mode renders the MLflow UI's React app and crossaudit's report.html; `--dump-dom` gives
the page after its scripts ran, `--screenshot` the picture. Screenshots go where the
test says, and also to $CROSSAUDIT_SCREENSHOTS when set (how docs/ got them)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--virtual-time-budget=20000"]


def browse(url: str, screenshot: Path, size: tuple[int, int] = (1400, 1000)) -> str:
    """The page's DOM once its scripts ran, and a screenshot of it."""
    flags = [*FLAGS, f"--window-size={size[0]},{size[1]}"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    subprocess.run([CHROMIUM, *flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    if shots := os.environ.get("CROSSAUDIT_SCREENSHOTS"):
        shutil.copy(screenshot, Path(shots) / screenshot.name)
    return dom.stdout
