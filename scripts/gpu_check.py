"""One Markdown report of how lookahead does on a device: exactness, tree-pass cost, speedups at batch 1 and batched.

Sections, for every case file (default: rag_qa and long_rag; --quick: rag_qa):

1. Exactness: lookahead greedy against HF greedy ``generate`` (identical / near-tie / hard, lookahead.agreement;
   in float32 every difference is hard).
2. Tree verification cost: seconds of one tree pass of n tokens (n = 1..64) after a prefix of several context
   lengths, at batch 1 and at ``--batch-size`` rows, and its ratio to a 1-token pass
   (lookahead.runner.time_tree_passes).
3. Speedups at batch 1: vanilla (HF greedy), pld (HF prompt lookup) and lookahead, overall and after the prefill,
   tokens per step, lookahead's host time per step (the ``lookahead bench`` table).
4. Batched throughput: lookahead-batch against hf-batch (HF greedy on left-padded batches) at ``--batch-size``, and
   lookahead-alone (the exactness reference of the batched rows).

    python scripts/gpu_check.py                                   # cuda, bfloat16 (auto), the default model
    python scripts/gpu_check.py --device cpu --limit 2 --quick    # a couple of minutes on a CPU
    python scripts/gpu_check.py --model PATH --out report.md --json report.json
    OUT=/tmp/out bash scripts/gpu_check.sh --limit 8                # a fresh GPU machine: install, run, report

The report goes to stdout (and ``--out``); progress goes to stderr. Exit status 1 when any output differs beyond
the dtype's rounding (a hard mismatch), 2 on bad arguments or a model that does not load, else 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from lookahead.agreement import NEAR_TIE
from lookahead.argtypes import positive_int
from lookahead.bench.batching import format_throughput, run_throughput, throughput_rows
from lookahead.bench.cases import load_cases
from lookahead.bench.report import format_table, summarize
from lookahead.bench.runner import BenchRunner, CaseResult
from lookahead.budget import CostCurve
from lookahead.engine import LookaheadGenerator
from lookahead.models import AUTO_DTYPE, DTYPE_CHOICES, ModelLoadError, load_model
from lookahead.runner import cost_grid, time_tree_passes

BENCH_METHODS = ("vanilla", "pld", "lookahead")
BATCH_METHODS = ("lookahead-alone", "lookahead-batch", "hf-batch")  # lookahead-alone: the exactness reference
CASES = ("rag_qa", "long_rag")
QUICK_CASES = ("rag_qa",)
CONTEXTS = (256, 1024, 4096, 8192)
QUICK_CONTEXTS = (128, 1024)
QUICK_MAX_NEW_TOKENS = 32
LARGEST_TREE = 64  # tree sizes timed: lookahead.budget.DEFAULT_SIZES up to this


@dataclass
class FileReport:
    """What one case file gave: the batch-1 results and summary rows, and the batched throughput rows."""

    name: str
    cases: int
    results: list[CaseResult] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    table: str = ""
    batch_rows: list[dict[str, Any]] = field(default_factory=list)
    batch_table: str = ""
    batch_hard: int = 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default",
                        help="'default' (embedded SmolLM2-135M-Instruct), an HF model id, a local dir or a .gguf file")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu ...")
    parser.add_argument("--dtype", default=AUTO_DTYPE, choices=DTYPE_CHOICES,
                        help="auto (default): bfloat16 on CUDA where supported, else float16 on CUDA, float32 on CPU")
    parser.add_argument("--cases", default=None,
                        help=f"comma-separated case files or shipped names (default: {','.join(CASES)}; --quick: "
                             f"{','.join(QUICK_CASES)})")
    parser.add_argument("--limit", type=positive_int, default=16, help="first N cases of each file (default: 16)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="batched section (default: 8)")
    parser.add_argument("--contexts", default=None,
                        help=f"comma-separated prefix lengths of the tree-cost section (default: "
                             f"{','.join(map(str, CONTEXTS))}; --quick: {','.join(map(str, QUICK_CONTEXTS))}; "
                             "shortened to fit the model's context)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help=f"cap every case's max_new_tokens (default: the case's own; --quick: "
                             f"{QUICK_MAX_NEW_TOKENS})")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: rag_qa only, fewer contexts, two timing repeats, short answers")
    parser.add_argument("--out", type=Path, help="also write the report to this Markdown file")
    parser.add_argument("--json", type=Path, help="also write the numbers behind the report to this JSON file")
    args = parser.parse_args(argv)
    try:
        args.contexts = tuple(positive_int(c) for c in args.contexts.split(",")) if args.contexts else (
            QUICK_CONTEXTS if args.quick else CONTEXTS)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--contexts: {exc}")
    if args.max_new_tokens is None and args.quick:
        args.max_new_tokens = QUICK_MAX_NEW_TOKENS
    args.cases = ([name.strip() for name in args.cases.split(",") if name.strip()] if args.cases is not None else
                  list(QUICK_CASES if args.quick else CASES))
    if not args.cases:
        parser.error("--cases names no case file")
    return args


def progress(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def capped(cases: list[dict[str, Any]], max_new_tokens: int | None) -> list[dict[str, Any]]:
    """The cases with ``max_new_tokens`` capped (unchanged when the cap is None)."""
    if max_new_tokens is None:
        return cases
    return [{**case, "max_new_tokens": min(case["max_new_tokens"], max_new_tokens)} for case in cases]


# ---------------------------------------------------------------------------------------------------- measuring


def tree_costs(generator: LookaheadGenerator, contexts: Sequence[int], batches: Sequence[int], repeats: int
               ) -> list[tuple[int, int, CostCurve]]:
    """(context, batch, curve): seconds of tree passes of 1..64 tokens per row (a batch of ``b`` rows: up to
    ``b * n <= 256`` tokens in all) after a prefix of each context length, fitted to the model's context (lengths
    that fit to the same prefix are timed once)."""
    curves: list[tuple[int, int, CostCurve]] = []
    for context in contexts:
        sizes, prefix = cost_grid(LARGEST_TREE, context, generator.max_context)
        if any(prefix == done for done, _, _ in curves):
            continue
        for batch in sorted(set(batches)):
            fitting = tuple(n for n in sizes if batch * n <= 4 * LARGEST_TREE) if batch > 1 else sizes
            progress(f"tree passes after {prefix} tokens, batch {batch}")
            curves.append((prefix, batch, time_tree_passes([generator.runner], fitting, prefix, repeats=repeats,
                                                           batch=batch)))
    return curves


def bench_file(runner: BenchRunner, name: str, cases: list[dict[str, Any]], batch_size: int,
               half: bool) -> FileReport:
    """Batch-1 bench (vanilla, pld, lookahead, interleaved case by case) and batched throughput of one case file."""
    report = FileReport(name=name, cases=len(cases))
    progress(f"{name}: {len(cases)} case(s) at batch 1")
    report.results = runner.run(cases, BENCH_METHODS, progress=lambda step: progress(f"{name}: {step}"))
    report.rows = summarize(report.results)
    report.table = format_table(report.rows, mismatches=half)
    progress(f"{name}: {len(cases)} case(s) at batch {batch_size}")
    throughput = run_throughput(runner.generator, cases, batch_size, BATCH_METHODS)
    report.batch_rows = throughput_rows(throughput)
    report.batch_table = format_throughput(throughput, mismatches=half)
    report.batch_hard = sum(r.hard for r in throughput if r.method == "lookahead-batch")
    return report


def exactness_counts(results: Sequence[CaseResult], method: str = "lookahead") -> dict[str, int]:
    """``compared``, ``identical``, ``near_tie`` and ``hard`` of ``method`` against HF greedy (vanilla)."""
    mine = [r for r in results if r.method == method and r.exact is not None]
    return {"compared": len(mine), "identical": sum(1 for r in mine if r.exact),
            "near_tie": sum(1 for r in mine if r.mismatch == NEAR_TIE),
            "hard": sum(1 for r in mine if r.exact is False and r.mismatch != NEAR_TIE)}


# ---------------------------------------------------------------------------------------------------- formatting


def header_lines(args: argparse.Namespace, model: Any, generator: LookaheadGenerator) -> list[str]:
    device = generator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return [
        "# lookahead device check",
        "",
        f"- model: `{args.model}` ({model.config.model_type}, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters), dtype {str(model.dtype).removeprefix('torch.')}",
        f"- device: {device} ({name}), torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}, {torch.get_num_threads()} CPU threads",
        f"- cases: {', '.join(args.cases)} (first {args.limit} of each), max new tokens "
        f"{args.max_new_tokens or 'as in the cases'}{', quick' if args.quick else ''}",
        f"- lookahead config: decoding_length {generator.config.decoding_length}, branch_length "
        f"{generator.config.branch_length}, adaptive {generator.config.adaptive}",
    ]


def exactness_section(reports: Sequence[FileReport], dtype: str) -> list[str]:
    rule = ("any difference is a hard mismatch (token identity is promised)." if dtype == "float32" else
            "a near-tie (two logits equal within rounding) is allowed; hard is not.")
    lines = ["", "## 1. Exactness: lookahead greedy vs HF greedy", "", f"In {dtype}: {rule}", "",
             "| cases | compared | identical | near-tie | hard | lookahead-batch hard |", "|---|---|---|---|---|---|"]
    for r in reports:
        c = exactness_counts(r.results)
        lines.append(f"| {r.name} | {c['compared']} | {c['identical']} | {c['near_tie']} | {c['hard']} | "
                     f"{r.batch_hard} |")
    return lines


def cost_section(curves: Sequence[tuple[int, int, CostCurve]]) -> list[str]:
    lines = ["", "## 2. Tree verification cost vs tree size", "",
             "Milliseconds of one tree pass of n tokens per row after a prefix of the given length, for a batch of "
             "rows (ratio to n = 1 at the same context and batch).", ""]
    if not curves:
        return [*lines, "(no context length measured)"]
    sizes = sorted({n for _, _, curve in curves for n in curve.sizes})
    lines += ["| context | batch | " + " | ".join(f"n={n}" for n in sizes) + " |", "|" + "---|" * (len(sizes) + 2)]
    for prefix, batch, curve in curves:
        ratios = curve.relative()
        cells = [f"{1000 * curve.cost(n):.2f} ({ratios[n]:.2f}x)" if n in ratios else "-" for n in sizes]
        lines.append(f"| {prefix} | {batch} | " + " | ".join(cells) + " |")
    return lines


def bench_section(reports: Sequence[FileReport]) -> list[str]:
    lines = ["", "## 3. Speedups at batch 1 (vanilla = HF greedy, pld = HF prompt lookup)", "",
             "`vs vanilla (decode)`: over the seconds after the prefill; `host ms/step`: lookahead's time outside the "
             "model forward per decoding step."]
    for r in reports:
        lines += ["", f"### {r.name}", "", r.table]
    return lines


def batch_section(reports: Sequence[FileReport], batch_size: int) -> list[str]:
    lines = ["", f"## 4. Batched throughput at batch {batch_size}", "",
             "Exact: rows equal to lookahead-alone (each request decoded alone)."]
    for r in reports:
        lines += ["", f"### {r.name}", "", r.batch_table]
    return lines


def footer_lines(device: torch.device, seconds: float, failed: bool) -> list[str]:
    lines = ["", "## Verdict", ""]
    if device.type == "cuda":
        lines.append(f"- peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    lines.append(f"- wall time: {seconds:.0f} s")
    lines.append("- FAILED: hard mismatches (see sections 1 and 4)" if failed else "- PASS: no hard mismatch")
    return lines


# ---------------------------------------------------------------------------------------------------- running


def run(args: argparse.Namespace) -> tuple[str, dict[str, Any], bool]:
    """Load the model, measure every section; returns (Markdown report, JSON data, failed)."""
    start = time.perf_counter()
    case_sets = [(name, capped(load_cases(name, args.limit), args.max_new_tokens)) for name in args.cases]
    progress(f"loading {args.model} on {args.device}")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    generator = LookaheadGenerator(model, tokenizer)
    dtype = str(model.dtype).removeprefix("torch.")
    progress("the engine's cost curve")
    generator.budget  # noqa: B018 - measure (or load) the draft budget's cost curve before timing anything
    # the fastest of the repeats counts: the first pass of a new shape pays one-time kernel set-up (seconds on a CPU)
    curves = tree_costs(generator, args.contexts, (1, args.batch_size), repeats=2 if args.quick else 5)
    runner = BenchRunner(model, tokenizer, generator)
    try:
        reports = [bench_file(runner, name, cases, args.batch_size, dtype != "float32") for name, cases in case_sets]
    finally:
        runner.close()
    failed = any(exactness_counts(r.results)["hard"] or r.batch_hard for r in reports)
    lines = [*header_lines(args, model, generator), *exactness_section(reports, dtype), *cost_section(curves),
             *bench_section(reports), *batch_section(reports, args.batch_size),
             *footer_lines(generator.device, time.perf_counter() - start, failed)]
    data = {
        "meta": {"model": args.model, "device": str(generator.device), "dtype": dtype, "cases": args.cases,
                 "limit": args.limit, "batch_size": args.batch_size, "quick": args.quick,
                 "max_new_tokens": args.max_new_tokens, "torch": torch.__version__,
                 "config": generator.config.to_dict()},
        "exactness": {r.name: {**exactness_counts(r.results), "batch_hard": r.batch_hard} for r in reports},
        "tree_cost": [{"context": prefix, "batch": batch, **curve.to_dict()} for prefix, batch, curve in curves],
        "bench": {r.name: r.rows for r in reports},
        "batch": {r.name: r.batch_rows for r in reports},
        "failed": failed,
    }
    return "\n".join(lines) + "\n", data, failed


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report, data, failed = run(args)
    except (ValueError, FileNotFoundError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report, encoding="utf-8")
        progress(f"report written to {args.out}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1), encoding="utf-8")
        progress(f"numbers written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
