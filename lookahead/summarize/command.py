"""``lookahead summarize PATH...``: the command line (options, input checks before the model loads, the summary)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..argtypes import positive_int
from .discovery import SummarizeError, collect_documents
from .names import REPORT_NAME
from .records import finished_names
from .run import summarize_documents
from .summarizer import Summarizer


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
        done = sum(1 for _ in finished_names(documents, Path(args.out), summarizer.settings()))
        print(f"\ninterrupted: {done} of {len(documents)} documents are summarized in {args.out}; run the same "
              "command again to resume", file=sys.stderr)
        return 130
    print(run.format())
    print(f"summaries and {REPORT_NAME} written to {args.out}")
    if run.failed:  # only hard mismatches fail: a near-tie is what half precision allows
        print("FAILED: an output differs from plain HF greedy decoding beyond the dtype's rounding", file=sys.stderr)
        return 1
    return 0
