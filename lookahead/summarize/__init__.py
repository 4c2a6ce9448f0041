"""``lookahead summarize PATH...``: offline summarization of a folder of documents with lookahead decoding.

Every document gets one summary file (``<out>/<name>.summary.txt``) and a small JSON record next to it (source hash,
settings, stats). Both are written atomically (a temporary file, then ``os.replace``), the record last, so an
interrupted run never leaves a half-written summary, and running the same command again skips every document whose
record matches its current content and settings. Documents longer than ``chunk_tokens`` are split at paragraph and
sentence boundaries (token counts from the model's tokenizer), each chunk is summarized (map), and the partial
summaries are combined (reduce; repeated while they are still too long). The original chunks seed the trie of the
reduce request, so its drafts can copy from the source. At the end a report (tokens per step, time, speedup) is
printed and written to ``<out>/report.json``.

Modules, each with one job: :mod:`.discovery` (the input documents), :mod:`.chunking` (splitting by tokens),
:mod:`.prompts`, :mod:`.summarizer` (one text: single request or map-reduce), :mod:`.names` (output file names),
:mod:`.records` (finished documents), :mod:`.report` (costs and the table), :mod:`.run` (a folder of documents),
:mod:`.command` (the command line).
"""

from __future__ import annotations

from ..files import atomic_write_text
from .chunking import split_text
from .command import add_parser, cmd_summarize
from .discovery import SourceDocument, SummarizeError, collect_documents
from .names import RECORD_SUFFIX, REPORT_NAME, SUMMARY_SUFFIX
from .prompts import combine_messages
from .records import RECORD_FORMAT
from .report import DocumentReport, SummaryRun
from .run import summarize_documents
from .summarizer import RequestStats, Summarizer

__all__ = [
    "RECORD_FORMAT", "RECORD_SUFFIX", "REPORT_NAME", "SUMMARY_SUFFIX", "DocumentReport", "RequestStats",
    "SourceDocument", "SummarizeError", "Summarizer", "SummaryRun", "add_parser", "atomic_write_text",
    "cmd_summarize", "collect_documents", "combine_messages", "split_text", "summarize_documents",
]
