"""Sections of docs/benchmarks.md that other benchmarks than the detection one write.

Each lives between its own HTML comment markers, so a benchmark rewrites its section
alone, and the detection benchmark, which writes the page, keeps the others as they are.
"""

from __future__ import annotations

import re
from pathlib import Path

PARADIGMS = ("<!-- paradigms:begin -->", "<!-- paradigms:end -->")
MODEL_SIZES = ("<!-- model-sizes:begin -->", "<!-- model-sizes:end -->")
ENGINEERING = ("<!-- engineering:begin -->", "<!-- engineering:end -->")
# One section per split of the clean corpus (`benchmarks.clean_corpus`).
CLEAN_CORPUS = {split: (f"<!-- clean-corpus-{split}:begin -->", f"<!-- clean-corpus-{split}:end -->")
                for split in ("calibration", "test")}  # fmt: skip
MARKED = (MODEL_SIZES, ENGINEERING, PARADIGMS, *CLEAN_CORPUS.values())  # in the order the page shows them


def _pattern(markers: tuple[str, str]) -> re.Pattern[str]:
    return re.compile(re.escape(markers[0]) + ".*?" + re.escape(markers[1]), re.S)


def existing_section(page: Path, markers: tuple[str, str]) -> str | None:
    """The marked section of the page, if it has one."""
    found = _pattern(markers).search(page.read_text()) if page.is_file() else None
    return found.group(0) if found else None


def write_section(text: str, page: Path, markers: tuple[str, str]) -> None:
    """Replace the marked section of the page, or append it."""
    current = page.read_text() if page.is_file() else ""
    pattern = _pattern(markers)
    page.write_text(pattern.sub(lambda _: text, current) if pattern.search(current) else f"{current}\n{text}\n")
