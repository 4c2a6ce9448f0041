"""Where ``lookahead summarize`` writes: one summary and one record per document, one report per run."""

from __future__ import annotations

from pathlib import Path

SUMMARY_SUFFIX = ".summary.txt"
RECORD_SUFFIX = ".summary.json"
REPORT_NAME = "report.json"


def summary_path(out: Path, name: str) -> Path:
    """The summary file of the document called ``name``."""
    return out / f"{name}{SUMMARY_SUFFIX}"


def record_path(out: Path, name: str) -> Path:
    """The JSON record (source hash, settings, stats) of the document called ``name``."""
    return out / f"{name}{RECORD_SUFFIX}"
