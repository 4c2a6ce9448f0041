"""``lookahead summarize DIR --out OUT --ray``: the local command's per-document work on a Ray Data actor pool.

Each worker (an actor of the pool) loads its own model and runs
:func:`lookahead.summarize.run.summarize_document` on the documents it gets: the same summary and record files as the
local command, written atomically, and a document already finished with the same settings is not redone. Every
document is its own block, so a worker that dies loses only the documents it was decoding: Ray restarts the actor and
retries them, and what the dead worker had finished is found finished (no document is lost or written twice). With
``batch_size > 1`` a worker decodes that many documents together (one forward pass per step through
:class:`lookahead.scheduler.Scheduler`; every output equals the document decoded alone). The output folder must be
one every worker can write (a local run, or a shared file system on a cluster).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import ray.data
from tqdm.auto import tqdm

from lookahead.engine import GenerationResult, LookaheadGenerator, Prompt
from lookahead.scheduler import Scheduler
from lookahead.summarize import DocumentReport, RequestStats, SourceDocument, Summarizer, SummaryRun
from lookahead.summarize.run import summarize_document, write_report

from .hub import HUB_NAME, NAMESPACE
from .spec import GeneratorSpec
from .worker import hub_sync

COLUMNS = ("path", "name", "text", "sha256")


@dataclass(frozen=True)
class SummarizeOptions:
    """What each document's summary depends on (as the local command's flags)."""

    max_new_tokens: int = 160
    chunk_tokens: int = 1024
    baseline: bool = False


@dataclass(frozen=True)
class PoolOptions:
    """The actor pool: ``workers`` actors of ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs, each decoding
    ``batch_size`` documents together; ``hub_name`` None switches trie sharing off."""

    workers: int = 2
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    batch_size: int = 1
    hub_name: str | None = HUB_NAME
    sync_interval: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {self.workers!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ValueError("cpus_per_worker and gpus_per_worker must be >= 0")


class ScheduledGenerator:
    """The generator as :class:`Summarizer` sees it, with ``generate`` going through a scheduler, so that the
    requests of several threads are decoded together."""

    def __init__(self, generator: LookaheadGenerator, scheduler: Scheduler) -> None:
        self._generator = generator
        self._scheduler = scheduler

    def generate(self, prompt: Prompt, *, max_new_tokens: int, documents: Sequence[str] | None = None
                 ) -> GenerationResult:
        handle = self._scheduler.submit(prompt, max_new_tokens=max_new_tokens, documents=documents)
        return handle.result()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._generator, name)


class SummarizeWorker:
    """The Ray Data callable of the pool: one model, its trie synced with the hub, documents in, reports out."""

    def __init__(self, spec: GeneratorSpec, out: str, options: SummarizeOptions, pool: PoolOptions,
                 namespace: str = NAMESPACE) -> None:
        generator = spec.build()
        self.pass_seconds = generator.budget.cost.cost(1)  # the cost model now, before the first document
        self.sync = hub_sync(generator, pool.hub_name, pool.sync_interval, namespace)
        engine: Any = generator
        self.threads: ThreadPoolExecutor | None = None
        if pool.batch_size > 1:
            engine = ScheduledGenerator(generator, Scheduler(generator, max_batch_size=pool.batch_size,
                                                             max_queue=pool.batch_size))
            self.threads = ThreadPoolExecutor(pool.batch_size, thread_name_prefix="lookahead-summarize")
        self.summarizer = Summarizer(engine, max_new_tokens=options.max_new_tokens,
                                     chunk_tokens=options.chunk_tokens, baseline=options.baseline)
        self.settings = self.summarizer.settings()
        self.out = Path(out)

    def _one(self, doc: SourceDocument) -> DocumentReport:
        return summarize_document(doc, self.out, self.summarizer, self.settings)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        docs = [SourceDocument(Path(str(p)), str(n), str(t), str(h))
                for p, n, t, h in zip(*(batch[c] for c in COLUMNS))]
        reports = list(self.threads.map(self._one, docs)) if self.threads else [self._one(d) for d in docs]
        return {"name": [r.name for r in reports], "report": [asdict(r) for r in reports],
                "pass_seconds": [self.pass_seconds] * len(reports), "pid": [os.getpid()] * len(reports)}


def documents_dataset(documents: Sequence[SourceDocument]) -> ray.data.Dataset:
    """The documents as a Ray Dataset (columns ``path``, ``name``, ``text``, ``sha256``), one block each."""
    rows = []
    for d in documents:  # read first: read() sets sha256 to what was read
        text = d.read()
        rows.append({"path": str(d.path), "name": d.name, "text": text, "sha256": d.sha256})
    return ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))


def summarize_dataset(dataset: ray.data.Dataset, out: str | os.PathLike[str], spec: GeneratorSpec,
                      options: SummarizeOptions | None = None, pool: PoolOptions | None = None) -> ray.data.Dataset:
    """Summarize every row of ``dataset`` (columns ``path``, ``name``, ``text``, ``sha256``: see
    :func:`documents_dataset`) into ``out`` on an actor pool; returns the (lazy) dataset of per-document reports
    (``name``, ``report``: a :class:`DocumentReport` as a dict, ``pass_seconds``, ``pid``)."""
    options, pool = options or SummarizeOptions(), pool or PoolOptions()
    Path(out).mkdir(parents=True, exist_ok=True)
    return dataset.map_batches(
        SummarizeWorker, fn_constructor_kwargs={"spec": spec, "out": os.fspath(out), "options": options,
                                                "pool": pool},
        batch_size=pool.batch_size, compute=ray.data.ActorPoolStrategy(size=pool.workers),
        num_cpus=pool.cpus_per_worker, num_gpus=pool.gpus_per_worker or None, batch_format="numpy")


def report_of(row: dict[str, Any]) -> DocumentReport:
    """The :class:`DocumentReport` of an output row of :func:`summarize_dataset`."""
    data = dict(row["report"])
    data["requests"] = [RequestStats(**r) for r in data["requests"]]
    return DocumentReport(**data)


def summarize_documents(documents: Sequence[SourceDocument], out: str | os.PathLike[str], spec: GeneratorSpec,
                        options: SummarizeOptions | None = None, pool: PoolOptions | None = None,
                        progress: bool = True) -> SummaryRun:
    """Summarize ``documents`` into ``out`` on Ray (Ray must be initialised, and the hub started when ``pool``
    names one); write ``report.json`` and return the run, documents in the given order."""
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts documents
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    results = summarize_dataset(documents_dataset(documents), out, spec, options, pool)
    reports: dict[str, DocumentReport] = {}
    pass_seconds = None
    for row in _with_progress(results.iter_rows(), len(documents), progress):
        report = report_of(row)
        if report.name in reports:
            raise RuntimeError(f"document {report.name} was reported twice (a retried block's output)")
        reports[report.name] = report
        pass_seconds = float(row["pass_seconds"])
    missing = [d.name for d in documents if d.name not in reports]
    if missing:
        raise RuntimeError(f"{len(missing)} document(s) got no summary: {', '.join(missing[:5])}")
    run = SummaryRun([reports[d.name] for d in documents], Path(out), pass_seconds)
    write_report(run)
    return run


def _with_progress(rows: Iterator[dict[str, Any]], total: int, enabled: bool) -> Iterator[dict[str, Any]]:
    if not enabled:
        yield from rows
        return
    with tqdm(total=total, desc="summarize (ray)", unit="doc", file=sys.stderr) as bar:
        for row in rows:
            bar.update(1)
            yield row
