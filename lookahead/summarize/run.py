"""Summarizing a list of documents into a folder: skip the finished ones, write each summary and record
atomically, show progress, write the report."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_write_text
from .discovery import SourceDocument
from .names import REPORT_NAME, summary_path
from .records import finished, write_record
from .report import DocumentReport, SummaryRun
from .summarizer import Summarizer


def summarize_documents(documents: Sequence[SourceDocument], out_dir: str | os.PathLike[str], summarizer: Summarizer,
                        progress: bool = True) -> SummaryRun:
    """Summarize every document not already finished in ``out_dir``; write the summaries, records and the report.

    A ``KeyboardInterrupt`` propagates after the current document is abandoned: finished documents keep their files
    and the next run resumes after them.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = summarizer.settings()
    reports: list[DocumentReport] = []
    bar = _progress(len(documents), progress)
    try:
        for doc in documents:
            bar.set_postfix_str(doc.name[:30])
            reports.append(summarize_document(doc, out, summarizer, settings))
            bar.update(1)
            steps = sum(r.steps for r in reports)
            if steps:
                bar.set_postfix(tok_per_step=f"{sum(r.new_tokens for r in reports) / steps:.2f}")
    finally:
        bar.close()
    run = SummaryRun(reports, out, summarizer._pass_seconds)
    write_report(run)
    return run


def summarize_document(doc: SourceDocument, out: Path, summarizer: Summarizer, settings: dict[str, Any]
                       ) -> DocumentReport:
    """Summarize one document into ``out`` (summary, then its record, each written atomically), or return the report
    of an earlier run when it is finished with these ``settings``. Also the unit of work of ``summarize --ray``."""
    done = finished(doc, out, settings)
    if done is not None:
        return done
    summary, chunks, requests = summarizer.summarize(doc.read())  # the one document held now
    path = summary_path(out, doc.name)
    atomic_write_text(path, summary + "\n")
    write_record(out, doc, settings, chunks, requests)  # last: the record marks the summary finished
    return DocumentReport(doc.name, str(doc.path), str(path), chunks, requests)


def write_report(run: SummaryRun) -> None:
    """Write ``report.json`` of a run into its output folder (atomically)."""
    atomic_write_text(run.out_dir / REPORT_NAME, json.dumps(run.to_dict(), indent=1) + "\n")


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="summarize", unit="doc")
