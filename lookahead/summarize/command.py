"""``lookahead summarize PATH...``: the command line (options, input checks before the model loads, the summary)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..argtypes import RunnerUnavailable, add_ray_options, load_runner, non_negative_float, positive_int
from .discovery import SourceDocument, SummarizeError, collect_documents
from .names import REPORT_NAME
from .records import finished_names
from .report import SummaryRun
from .run import summarize_documents
from .summarizer import Summarizer

#: the entry point group whose ``ray`` runner (``run(args, documents) -> SummaryRun``) runs ``--ray``: the
#: lookahead_ray integration registers it (``pip install 'lookahead-rag[ray]'``)
RUNNERS = "lookahead.summarize.runners"


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
                        help="also run plain HF greedy generate on every request: measured speedup + exactness "
                             "(fails on a hard mismatch; a near-tie in half precision is reported)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="skip unreadable or binary files with a warning instead of stopping")
    parser.add_argument("--follow-symlinks", action="store_true",
                        help="follow symbolic links that point outside a folder given (default: skip them with a "
                             "warning)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_ray_args(parser)
    add_model_args(parser)
    parser.set_defaults(func=lambda args: cmd_summarize(args, build))
    return parser


def _add_ray_args(parser: argparse.ArgumentParser) -> None:
    """``--ray`` and its options (the work runs in the runner registered in :data:`RUNNERS`)."""
    ray = add_ray_options(parser, "worker", "summarize on a Ray actor pool: a model per worker, one shared trie, "
                                            "same output files", "summaries")
    ray.add_argument("--worker-batch-size", type=positive_int, default=1,
                     help="documents each worker decodes together (default 1)")
    ray.add_argument("--trie", default=None, metavar="PATH",
                     help="the hub loads its trie from PATH at start and saves it there (atomically)")
    ray.add_argument("--trie-save-interval", type=non_negative_float, default=60.0, metavar="SECONDS",
                     help="seconds between hub saves when the trie changed (0: only at the end; default 60)")


def _run_on_ray(args: argparse.Namespace, documents: list[SourceDocument]) -> SummaryRun:
    """The run on Ray, or a clear error when the ray extra is missing."""
    try:
        run = load_runner(RUNNERS, "ray", "--ray")
    except RunnerUnavailable as exc:
        raise SummarizeError(str(exc)) from None
    return run(args, documents)


def cmd_summarize(args: argparse.Namespace, build: Callable[[argparse.Namespace], tuple]) -> int:
    """Run ``lookahead summarize``: check the inputs first (before loading a model), then summarize."""
    if args.chunk_tokens < 16:
        raise SummarizeError(f"--chunk-tokens must be at least 16, got {args.chunk_tokens}")
    documents = collect_documents(args.paths, args.out, skip_invalid=args.skip_invalid,
                                  follow_symlinks=args.follow_symlinks)
    if getattr(args, "ray", False):
        try:
            run = _run_on_ray(args, documents)
        except KeyboardInterrupt:
            print(f"\ninterrupted: the finished documents are in {args.out}; run the same command again to resume",
                  file=sys.stderr)
            return 130
        return _report(run, args.out)
    _, _, generator = build(args)
    summarizer = Summarizer(generator, max_new_tokens=args.max_new_tokens, chunk_tokens=args.chunk_tokens,
                            baseline=args.baseline)
    try:
        run = summarize_documents(documents, args.out, summarizer, progress=not args.no_progress)
    except KeyboardInterrupt:
        done = sum(1 for _ in finished_names(documents, Path(args.out), summarizer.settings()))
        print(f"\ninterrupted: {done} of {len(documents)} documents are summarized in {args.out}; run the same "
              "command again to resume", file=sys.stderr)
        return 130
    return _report(run, args.out)


def _report(run: SummaryRun, out: str) -> int:
    """Print the run's table; 1 when an output differs from its ``--baseline`` beyond the dtype's rounding."""
    print(run.format())
    print(f"summaries and {REPORT_NAME} written to {out}")
    if run.failed:  # only hard mismatches fail: a near-tie is what half precision allows
        print("FAILED: an output differs from plain HF greedy decoding beyond the dtype's rounding", file=sys.stderr)
        return 1
    return 0
