"""``lookahead summarize PATH...``: offline summarization of a folder of documents with lookahead decoding.

Every document gets one summary file (``<out>/<name>.summary.txt``) and a small JSON record next to it (source hash,
settings, stats). Both are written atomically (a temporary file, then ``os.replace``), the record last, so an
interrupted run never leaves a half-written summary, and running the same command again skips every document whose
record matches its current content and settings. Documents longer than ``chunk_tokens`` are split at paragraph and
sentence boundaries (token counts from the model's tokenizer), each chunk is summarized (map), and the partial
summaries are combined (reduce; repeated while they are still too long). The original chunks seed the trie of the
reduce request, so its drafts can copy from the source. At the end a report (tokens per step, time, speedup) is
printed and written to ``<out>/report.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .argtypes import positive_int
from .prompts import SUMMARY_SYSTEM, summary_messages

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .engine import GenerationResult, LookaheadGenerator

SUMMARY_SUFFIX = ".summary.txt"
RECORD_SUFFIX = ".summary.json"
REPORT_NAME = "report.json"
RECORD_FORMAT = 1


class SummarizeError(ValueError):
    """Bad input for ``summarize``: a missing path, an empty folder, an unreadable or binary file."""


@dataclass
class SourceDocument:
    """One input document."""

    path: Path
    name: str  # output name: the path relative to the argument it came from, separators replaced
    text: str
    sha256: str


@dataclass
class RequestStats:
    """One generation request (a whole document, a chunk, or a combine step)."""

    kind: str  # "single", "map" or "reduce"
    prompt_tokens: int
    new_tokens: int
    steps: int
    seconds: float
    estimated_plain_seconds: float  # prefill + one 1-token pass per further new token, from the cost curve
    baseline_seconds: float | None = None  # measured plain HF greedy generate (--baseline)
    exact: bool | None = None  # token-for-token equal to the baseline (--baseline)


@dataclass
class DocumentReport:
    """What summarizing one document cost."""

    name: str
    source: str
    summary_file: str
    chunks: int
    requests: list[RequestStats] = field(default_factory=list)
    resumed: bool = False  # finished by an earlier run: read back from its record

    @property
    def new_tokens(self) -> int:
        return sum(r.new_tokens for r in self.requests)

    @property
    def steps(self) -> int:
        return sum(r.steps for r in self.requests)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.requests)


# ---------------------------------------------------------------------------------------------------- input


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SummarizeError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    if b"\x00" in data[:8192]:
        raise SummarizeError(f"{path}: looks like a binary file (NUL bytes); summarize takes UTF-8 text files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SummarizeError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from exc


def collect_documents(paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str] | None = None,
                      skip_invalid: bool = False, warn: Callable[[str], None] | None = None
                      ) -> list[SourceDocument]:
    """Text documents named by ``paths`` (files, or folders searched recursively; hidden files and anything inside
    ``out_dir`` are left out). Empty files are skipped with a warning. A file that cannot be read or is not UTF-8
    text is an error, or a warning with ``skip_invalid``. No document at all is an error."""
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise SummarizeError("no input: pass one or more files or folders")
    out = Path(out_dir).resolve() if out_dir is not None else None
    found: list[tuple[Path, str]] = []
    for arg in paths:
        root = Path(arg)
        if not root.exists():
            raise SummarizeError(f"{root}: no such file or folder")
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and not _is_hidden(p, root)
                           and not (out is not None and p.resolve().is_relative_to(out)))
            if not files:
                raise SummarizeError(f"{root}: the folder holds no files to summarize")
            found.extend((p, p.relative_to(root).as_posix()) for p in files)
        else:
            found.append((root, root.name))
    documents: list[SourceDocument] = []
    names: dict[str, Path] = {}
    for path, rel in found:
        try:
            text = _read_text(path)
        except SummarizeError as exc:
            if not skip_invalid:
                raise SummarizeError(f"{exc} (pass --skip-invalid to leave such files out)") from None
            warn(f"skipping {exc}")
            continue
        if not text.strip():
            warn(f"skipping {path}: the file is empty")
            continue
        name = rel.replace("/", "__")
        if name in names and names[name] != path:
            raise SummarizeError(f"{path} and {names[name]} would write the same summary file {name}{SUMMARY_SUFFIX}")
        names[name] = path
        documents.append(SourceDocument(path, name, text, hashlib.sha256(text.encode("utf-8")).hexdigest()))
    if not documents:
        raise SummarizeError("no text documents to summarize in " + ", ".join(str(p) for p in paths))
    return documents


# ---------------------------------------------------------------------------------------------------- chunking

_PARAGRAPHS = re.compile(r"\n\s*\n")
_SENTENCES = re.compile(r"(?<=[.!?])\s+")


def split_text(text: str, count_tokens: Callable[[str], int], chunk_tokens: int,
               encode: Callable[[str], list[int]] | None = None, decode: Callable[[list[int]], str] | None = None
               ) -> list[str]:
    """Split ``text`` into chunks of at most ``chunk_tokens`` tokens at paragraph, then sentence boundaries; a single
    sentence longer than that is cut by tokens (needs ``encode``/``decode``)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    units: list[tuple[str, int, str]] = []  # (text, tokens, joiner before it)
    for paragraph in (p.strip() for p in _PARAGRAPHS.split(text)):
        if not paragraph:
            continue
        n = count_tokens(paragraph)
        if n <= chunk_tokens:
            units.append((paragraph, n, "\n\n"))
            continue
        joiner = "\n\n"
        for sentence in (s for s in _SENTENCES.split(paragraph) if s):
            m = count_tokens(sentence)
            if m <= chunk_tokens or encode is None or decode is None:
                units.append((sentence, m, joiner))
            else:
                ids = encode(sentence)
                for start in range(0, len(ids), chunk_tokens):
                    piece = decode(ids[start:start + chunk_tokens])
                    units.append((piece, count_tokens(piece), joiner))
            joiner = " "
    chunks: list[str] = []
    current, used = "", 0
    for unit, n, joiner in units:
        if current and used + n > chunk_tokens:
            chunks.append(current)
            current, used = "", 0
        current = f"{current}{joiner}{unit}" if current else unit
        used += n
    if current:
        chunks.append(current)
    return chunks


def combine_messages(partials: Sequence[str]) -> list[dict[str, str]]:
    """Chat messages asking to merge partial summaries of one document into one summary."""
    parts = "\n\n".join(f"Part {i}: {p.strip()}" for i, p in enumerate(partials, start=1))
    user = ("The following are summaries of consecutive parts of one document. Combine them into one summary of "
            f"the whole document in a few sentences.\n\n{parts}")
    return [{"role": "system", "content": SUMMARY_SYSTEM}, {"role": "user", "content": user}]


# ---------------------------------------------------------------------------------------------------- summarizing


class Summarizer:
    """Summarize texts with a :class:`~lookahead.engine.LookaheadGenerator`, map-reduce for long ones.

    Args:
        generator: the engine (its global trie keeps learning from every summary).
        max_new_tokens: most tokens per summary (and per partial summary).
        chunk_tokens: longest text (in tokens) summarized in one request.
        baseline: also run plain HF greedy ``generate`` on every request, to measure the speedup and check that
            the outputs are identical (doubles the time).
    """

    def __init__(self, generator: LookaheadGenerator, max_new_tokens: int = 160, chunk_tokens: int = 1024,
                 baseline: bool = False) -> None:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not isinstance(chunk_tokens, int) or chunk_tokens < 16:
            raise ValueError(f"chunk_tokens must be an integer >= 16, got {chunk_tokens!r}")
        self.generator = generator
        self.max_new_tokens = max_new_tokens
        self.chunk_tokens = chunk_tokens
        self.baseline = baseline
        self._pass_seconds: float | None = None

    def settings(self) -> dict[str, Any]:
        """What a finished summary depends on (a record with other settings is redone)."""
        cfg = self.generator.model.config
        return {"model": str(getattr(cfg, "_name_or_path", "")), "model_type": cfg.model_type,
                "max_new_tokens": self.max_new_tokens, "chunk_tokens": self.chunk_tokens}

    def count_tokens(self, text: str) -> int:
        return len(self.generator.tokenizer(text, add_special_tokens=False)["input_ids"])

    def split(self, text: str) -> list[str]:
        tok = self.generator.tokenizer
        return split_text(text, self.count_tokens, self.chunk_tokens,
                          encode=lambda s: tok(s, add_special_tokens=False)["input_ids"],
                          decode=lambda ids: tok.decode(ids, skip_special_tokens=True))

    def _one_pass_seconds(self) -> float:
        if self._pass_seconds is None:
            self._pass_seconds = self.generator.budget.cost.cost(1)
        return self._pass_seconds

    def _generate(self, kind: str, messages: list[dict[str, str]], documents: Sequence[str] | None
                  ) -> tuple[str, RequestStats]:
        generator = self.generator
        prompt_ids = generator.encode(messages)
        result: GenerationResult = generator.generate(prompt_ids, max_new_tokens=self.max_new_tokens,
                                                      documents=list(documents) if documents else None)
        s = result.stats
        estimate = s.time_prefill + max(0, s.new_tokens - 1) * self._one_pass_seconds()
        stats = RequestStats(kind, s.prompt_tokens, s.new_tokens, s.steps, s.time_total, estimate)
        if self.baseline:
            from .bench.runner import hf_generate

            eos = generator.model.generation_config.eos_token_id
            start = time.perf_counter()
            plain = hf_generate(generator.model, prompt_ids, self.max_new_tokens, eos)
            stats.baseline_seconds = time.perf_counter() - start
            stats.exact = plain == result.token_ids
        return result.text.strip(), stats

    def summarize(self, text: str) -> tuple[str, int, list[RequestStats]]:
        """Summary of ``text``, the number of chunks it was split into, and the stats of every request."""
        chunks = self.split(text)
        if len(chunks) <= 1:
            summary, stats = self._generate("single", summary_messages(text), None)
            return summary, 1, [stats]
        requests: list[RequestStats] = []
        partials = []
        for chunk in chunks:
            partial, stats = self._generate("map", summary_messages(chunk), None)
            partials.append(partial)
            requests.append(stats)
        while True:  # reduce until the partial summaries fit in one request
            groups = self._group(partials)
            if len(groups) == 1:
                summary, stats = self._generate("reduce", combine_messages(groups[0]), chunks)
                requests.append(stats)
                return summary, len(chunks), requests
            merged = []
            for group in groups:
                partial, stats = self._generate("reduce", combine_messages(group), None)
                merged.append(partial)
                requests.append(stats)
            if len(merged) >= len(partials):  # cannot shrink further: combine what there is
                partials = merged[:1]
            else:
                partials = merged

    def _group(self, partials: list[str]) -> list[list[str]]:
        groups: list[list[str]] = [[]]
        used = 0
        for partial in partials:
            n = self.count_tokens(partial) + 8
            if groups[-1] and used + n > self.chunk_tokens:
                groups.append([])
                used = 0
            groups[-1].append(partial)
            used += n
        return groups


# ---------------------------------------------------------------------------------------------------- files


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``: readers see the
    old file or the complete new one, never a partial write."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; summaries are ordinary output files
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def _finished(doc: SourceDocument, out: Path, settings: dict[str, Any]) -> DocumentReport | None:
    """The report of an earlier run that already summarized ``doc`` with these settings, else None."""
    record = _load_record(out / f"{doc.name}{RECORD_SUFFIX}")
    summary = out / f"{doc.name}{SUMMARY_SUFFIX}"
    if record is None or not summary.is_file():
        return None
    if record.get("sha256") != doc.sha256 or record.get("settings") != settings:
        return None
    try:
        requests = [RequestStats(**r) for r in record["requests"]]
        return DocumentReport(doc.name, str(doc.path), str(summary), int(record["chunks"]), requests, resumed=True)
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class SummaryRun:
    """The outcome of :func:`summarize_documents`."""

    documents: list[DocumentReport]
    out_dir: Path
    cost_curve_pass_seconds: float | None = None

    def totals(self) -> dict[str, Any]:
        requests = [r for d in self.documents for r in d.requests]
        fresh = [r for d in self.documents if not d.resumed for r in d.requests]
        new_tokens = sum(r.new_tokens for r in requests)
        steps = sum(r.steps for r in requests)
        seconds = sum(r.seconds for r in requests)
        estimate = sum(r.estimated_plain_seconds for r in requests)
        data: dict[str, Any] = {
            "documents": len(self.documents), "summarized_now": sum(not d.resumed for d in self.documents),
            "resumed": sum(d.resumed for d in self.documents), "requests": len(requests), "new_tokens": new_tokens,
            "steps": steps, "tokens_per_step": new_tokens / steps if steps else 0.0, "seconds": seconds,
            "tokens_per_second": new_tokens / seconds if seconds else 0.0,
            "estimated_speedup": estimate / seconds if seconds else 0.0,
        }
        measured = [r for r in fresh if r.baseline_seconds is not None]
        if measured:
            base = sum(r.baseline_seconds or 0.0 for r in measured)
            mine = sum(r.seconds for r in measured)
            data["measured_speedup"] = base / mine if mine else 0.0
            data["identical_to_baseline"] = all(r.exact for r in measured)
        return data

    def to_dict(self) -> dict[str, Any]:
        docs = []
        for d in self.documents:
            item = {k: v for k, v in asdict(d).items() if k != "requests"}
            item.update(new_tokens=d.new_tokens, steps=d.steps, seconds=d.seconds,
                        tokens_per_step=d.new_tokens / d.steps if d.steps else 0.0)
            item["requests"] = [asdict(r) for r in d.requests]
            docs.append(item)
        return {"totals": self.totals(), "documents": docs}

    def format(self) -> str:
        """A plain-text table and the totals."""
        lines = [f"{'document':40s} {'chunks':>6s} {'tokens':>7s} {'steps':>6s} {'tok/step':>8s} {'seconds':>8s}"]
        for d in self.documents:
            tps = d.new_tokens / d.steps if d.steps else 0.0
            mark = " (earlier run)" if d.resumed else ""
            lines.append(f"{d.name[:40]:40s} {d.chunks:6d} {d.new_tokens:7d} {d.steps:6d} {tps:8.2f} "
                         f"{d.seconds:8.2f}{mark}")
        t = self.totals()
        lines.append(f"total: {t['documents']} documents ({t['summarized_now']} now, {t['resumed']} from an earlier "
                     f"run), {t['new_tokens']} tokens in {t['seconds']:.1f}s, {t['tokens_per_step']:.2f} tokens/step, "
                     f"{t['tokens_per_second']:.1f} tokens/s")
        lines.append(f"estimated speedup over plain greedy decoding: x{t['estimated_speedup']:.2f} "
                     "(tokens/step and this machine's measured cost of a 1-token pass)")
        if "measured_speedup" in t:
            same = "identical" if t["identical_to_baseline"] else "DIFFERENT"
            lines.append(f"measured speedup over HF greedy generate (this run): x{t['measured_speedup']:.2f}, "
                         f"outputs {same}")
        return "\n".join(lines)


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
            done = _finished(doc, out, settings)
            if done is None:
                bar.set_postfix_str(doc.name[:30])
                summary, chunks, requests = summarizer.summarize(doc.text)
                summary_path = out / f"{doc.name}{SUMMARY_SUFFIX}"
                atomic_write_text(summary_path, summary + "\n")
                record = {"format": RECORD_FORMAT, "source": str(doc.path), "sha256": doc.sha256,
                          "settings": settings, "chunks": chunks, "requests": [asdict(r) for r in requests]}
                atomic_write_text(out / f"{doc.name}{RECORD_SUFFIX}", json.dumps(record, indent=1) + "\n")
                done = DocumentReport(doc.name, str(doc.path), str(summary_path), chunks, requests)
            reports.append(done)
            bar.update(1)
            steps = sum(r.steps for r in reports)
            if steps:
                bar.set_postfix(tok_per_step=f"{sum(r.new_tokens for r in reports) / steps:.2f}")
    finally:
        bar.close()
    run = SummaryRun(reports, out, summarizer._pass_seconds)
    atomic_write_text(out / REPORT_NAME, json.dumps(run.to_dict(), indent=1) + "\n")
    return run


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


# ---------------------------------------------------------------------------------------------------- CLI


def add_parser(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None],
               build: Callable[[argparse.Namespace], tuple]) -> argparse.ArgumentParser:
    """Register ``lookahead summarize`` on the CLI's subparsers."""

    parser = sub.add_parser("summarize", help="summarize a folder of text documents (resumable; report at the end)")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="text files or folders (searched recursively)")
    parser.add_argument("--out", "-o", default="summaries", help="output folder (default: ./summaries)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=160, help="most tokens per summary")
    parser.add_argument("--chunk-tokens", type=positive_int, default=1024,
                        help="longer documents are split into chunks of this many tokens (map-reduce)")
    parser.add_argument("--baseline", action="store_true",
                        help="also run plain HF greedy generate on every request: measured speedup + exactness")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="skip unreadable or binary files with a warning instead of stopping")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(parser)
    parser.set_defaults(func=lambda args: cmd_summarize(args, build))
    return parser


def cmd_summarize(args: argparse.Namespace, build: Callable[[argparse.Namespace], tuple]) -> int:
    """Run ``lookahead summarize``: check the inputs first (before loading a model), then summarize."""
    if args.chunk_tokens < 16:
        raise SummarizeError(f"--chunk-tokens must be at least 16, got {args.chunk_tokens}")
    documents = collect_documents(args.paths, args.out, skip_invalid=args.skip_invalid)
    _, _, generator = build(args)
    summarizer = Summarizer(generator, max_new_tokens=args.max_new_tokens, chunk_tokens=args.chunk_tokens,
                            baseline=args.baseline)
    try:
        run = summarize_documents(documents, args.out, summarizer, progress=not args.no_progress)
    except KeyboardInterrupt:
        done = sum(1 for _ in _finished_names(documents, Path(args.out), summarizer.settings()))
        print(f"\ninterrupted: {done} of {len(documents)} documents are summarized in {args.out}; run the same "
              "command again to resume", file=sys.stderr)
        return 130
    print(run.format())
    print(f"summaries and {REPORT_NAME} written to {args.out}")
    return 0


def _finished_names(documents: Sequence[SourceDocument], out: Path, settings: dict[str, Any]) -> Iterator[str]:
    for doc in documents:
        if _finished(doc, out, settings) is not None:
            yield doc.name
