"""Per-document records: what makes a summary finished, so that running the same command again skips it.

A record (``<name>.summary.json``) holds the source's hash, the settings and the stats; it is written after the
summary, so a record that matches the current content and settings means the summary file is complete.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..files import atomic_write_text
from .discovery import SourceDocument
from .names import record_path, summary_path
from .report import DocumentReport
from .summarizer import RequestStats

RECORD_FORMAT = 1


def load_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path``; None when it is missing, unreadable or of another format."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def write_record(out: Path, doc: SourceDocument, settings: dict[str, Any], chunks: int,
                 requests: Sequence[RequestStats]) -> None:
    """Mark ``doc`` finished with these settings (write it after its summary)."""
    record = {"format": RECORD_FORMAT, "source": str(doc.path), "sha256": doc.sha256,
              "settings": settings, "chunks": chunks, "requests": [asdict(r) for r in requests]}
    atomic_write_text(record_path(out, doc.name), json.dumps(record, indent=1) + "\n")


def finished(doc: SourceDocument, out: Path, settings: dict[str, Any]) -> DocumentReport | None:
    """The report of an earlier run that already summarized ``doc`` with these settings, else None."""
    record = load_record(record_path(out, doc.name))
    summary = summary_path(out, doc.name)
    if record is None or not summary.is_file():
        return None
    if record.get("sha256") != doc.sha256 or record.get("settings") != settings:
        return None
    try:
        requests = [RequestStats(**r) for r in record["requests"]]
        return DocumentReport(doc.name, str(doc.path), str(summary), int(record["chunks"]), requests, resumed=True)
    except (KeyError, TypeError, ValueError):
        return None


def finished_names(documents: Sequence[SourceDocument], out: Path, settings: dict[str, Any]) -> Iterator[str]:
    """Names of the documents already summarized in ``out`` with these settings."""
    for doc in documents:
        if finished(doc, out, settings) is not None:
            yield doc.name
