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
5. With ``--spec-bench PATH`` (your copy of Spec-Bench's data/spec_bench/question.jsonl; nothing is downloaded): the
   Spec-Bench table of ``lookahead bench --spec-bench`` (vanilla, pld, nodraft, lookahead per task, the leaderboard's
   layout), the two factors of lookahead's speedup and the two turns of the conversations; ``--spec-bench-only``
   skips sections 1 to 4.

Every batch-1 table has ``nodraft``, the same engine with drafting off: nodraft vs vanilla is the engine's own gain
over HF, lookahead vs nodraft drafting's own (the one to put next to the leaderboard).

    python scripts/gpu_check.py                                   # cuda, bfloat16 (auto), the default model
    python scripts/gpu_check.py --device cpu --limit 2 --quick    # a couple of minutes on a CPU
    python scripts/gpu_check.py --model PATH --out report.md --json report.json
    OUT=/tmp/out bash scripts/gpu_check.sh --limit 8                # a fresh GPU machine: install, run, report
    python scripts/gpu_check.py --spec-bench question.jsonl --spec-bench-only --questions-per-task 10

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
from lookahead.bench.report import format_factors, format_table, summarize
from lookahead.bench.runner import NODRAFT, WARM_METHODS, BenchRunner, CaseResult
from lookahead.bench.spec_bench import DEFAULT_MAX_NEW_TOKENS, load_spec_bench, parse_categories
from lookahead.bench.spec_table import spec_report
from lookahead.budget import CostCurve
from lookahead.engine import LookaheadGenerator
from lookahead.models import AUTO_DTYPE, DTYPE_CHOICES, ModelLoadError, load_model
from lookahead.runner import cost_grid, time_tree_passes

BENCH_METHODS = ("vanilla", "pld", NODRAFT, "lookahead")
ENGINE_METHODS = (NODRAFT, "lookahead")  # decoded by the engine: each must equal HF greedy (vanilla)
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
    parser.add_argument("--spec-bench", type=Path, metavar="PATH",
                        help="add the Spec-Bench table (section 5): your copy of Spec-Bench's "
                             "data/spec_bench/question.jsonl")
    parser.add_argument("--categories", help="Spec-Bench tasks or categories, comma-separated (default: all)")
    parser.add_argument("--questions-per-task", type=positive_int, default=None,
                        help="Spec-Bench: at most N questions per task (default: all)")
    parser.add_argument("--warm-round", action="store_true",
                        help="Spec-Bench: a second round of vanilla, nodraft and lookahead with the store warm")
    parser.add_argument("--spec-bench-only", action="store_true", help="only the Spec-Bench section (skip 1 to 4)")
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
    given = {"--categories": args.categories, "--questions-per-task": args.questions_per_task,
             "--warm-round": args.warm_round, "--spec-bench-only": args.spec_bench_only}
    spec_only = [name for name, value in given.items() if value]
    if spec_only and not args.spec_bench:
        parser.error(f"{', '.join(spec_only)} need --spec-bench PATH")
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


def spec_bench_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The Spec-Bench cases of ``--spec-bench`` (none without it): answers of ``--max-new-tokens`` (default 128)."""
    if not args.spec_bench:
        return []
    return load_spec_bench(args.spec_bench, parse_categories(args.categories), args.questions_per_task,
                           args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)


def run_spec_bench(runner: BenchRunner, cases: list[dict[str, Any]], warm_round: bool) -> list[CaseResult]:
    """Spec-Bench at batch 1 (interleaved question by question, turn by turn), then the warm round if asked."""
    progress(f"Spec-Bench: {len(cases)} question(s)")
    results = runner.run(cases, BENCH_METHODS, progress=lambda step: progress(f"Spec-Bench: {step}"))
    if warm_round:
        results += runner.run(cases, WARM_METHODS, first_round=2,
                              progress=lambda step: progress(f"Spec-Bench warm: {step}"))
    return results


def hard_mismatches(results: Sequence[CaseResult]) -> int:
    """Outputs of the engine's methods that differ from HF greedy beyond the dtype's rounding."""
    return sum(exactness_counts(results, method)["hard"] for method in ENGINE_METHODS)


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
        *([f"- Spec-Bench: `{args.spec_bench}`, tasks {args.categories or 'all'}, "
           f"{args.questions_per_task or 'all'} question(s) per task, "
           f"{args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS} new tokens per turn"
           f"{', a warm round' if args.warm_round else ''}{', Spec-Bench only' if args.spec_bench_only else ''}"]
          if args.spec_bench else []),
    ]


def exactness_section(reports: Sequence[FileReport], dtype: str) -> list[str]:
    rule = ("any difference is a hard mismatch (token identity is promised)." if dtype == "float32" else
            "a near-tie (two logits equal within rounding) is allowed; hard is not.")
    lines = ["", "## 1. Exactness: lookahead greedy vs HF greedy", "", f"In {dtype}: {rule}", "",
             "| cases | compared | identical | near-tie | hard | nodraft hard | lookahead-batch hard |",
             "|---|---|---|---|---|---|---|"]
    for r in reports:
        c = exactness_counts(r.results)
        lines.append(f"| {r.name} | {c['compared']} | {c['identical']} | {c['near_tie']} | {c['hard']} | "
                     f"{exactness_counts(r.results, NODRAFT)['hard']} | {r.batch_hard} |")
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
             "model forward per decoding step; nodraft: the same engine with drafting off (the factors: the engine's "
             "own gain over HF, and drafting's)."]
    for r in reports:
        factors = format_factors(r.rows)
        lines += ["", f"### {r.name}", "", r.table, *(["", factors] if factors else [])]
    return lines


def batch_section(reports: Sequence[FileReport], batch_size: int) -> list[str]:
    lines = ["", f"## 4. Batched throughput at batch {batch_size}", "",
             "Exact: rows equal to lookahead-alone (each request decoded alone)."]
    for r in reports:
        lines += ["", f"### {r.name}", "", r.batch_table]
    return lines


def spec_section(text: str, results: Sequence[CaseResult]) -> list[str]:
    """Section 5: the Spec-Bench tables (`lookahead bench --spec-bench`) and the engine's exactness on them."""
    exact = {m: exactness_counts(results, m) for m in ENGINE_METHODS}
    counts = ", ".join(f"{m} {c['identical']}/{c['compared']} identical ({c['near_tie']} near-tie, {c['hard']} hard)"
                       for m, c in exact.items())
    return ["", "## 5. Spec-Bench at batch 1", "", f"Exactness against HF greedy: {counts}.", "", text]


def footer_lines(device: torch.device, seconds: float, failed: bool) -> list[str]:
    lines = ["", "## Verdict", ""]
    if device.type == "cuda":
        lines.append(f"- peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    lines.append(f"- wall time: {seconds:.0f} s")
    lines.append("- FAILED: hard mismatches (see sections 1, 4 and 5)" if failed else "- PASS: no hard mismatch")
    return lines


# ---------------------------------------------------------------------------------------------------- running


def run(args: argparse.Namespace) -> tuple[str, dict[str, Any], bool]:
    """Load the model, measure every section; returns (Markdown report, JSON data, failed)."""
    start = time.perf_counter()
    case_sets = [] if args.spec_bench_only else [
        (name, capped(load_cases(name, args.limit), args.max_new_tokens)) for name in args.cases]
    spec_cases = spec_bench_cases(args)  # bad files fail here, before the model loads
    progress(f"loading {args.model} on {args.device}")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    generator = LookaheadGenerator(model, tokenizer)
    dtype = str(model.dtype).removeprefix("torch.")
    progress("the engine's cost curve")
    generator.budget  # noqa: B018 - measure (or load) the draft budget's cost curve before timing anything
    # the fastest of the repeats counts: the first pass of a new shape pays one-time kernel set-up (seconds on a CPU)
    curves = [] if args.spec_bench_only else tree_costs(generator, args.contexts, (1, args.batch_size),
                                                         repeats=2 if args.quick else 5)
    runner = BenchRunner(model, tokenizer, generator)
    try:
        reports = [bench_file(runner, name, cases, args.batch_size, dtype != "float32") for name, cases in case_sets]
        spec_results = run_spec_bench(runner, spec_cases, args.warm_round) if spec_cases else []
    finally:
        runner.close()
    spec_text, spec_data = spec_report(spec_results) if spec_results else ("", {})
    failed = any(hard_mismatches(r.results) or r.batch_hard for r in reports) or bool(hard_mismatches(spec_results))
    sections = [] if args.spec_bench_only else [
        *exactness_section(reports, dtype), *cost_section(curves), *bench_section(reports),
        *batch_section(reports, args.batch_size)]
    lines = [*header_lines(args, model, generator), *sections,
             *(spec_section(spec_text, spec_results) if spec_results else []),
             *footer_lines(generator.device, time.perf_counter() - start, failed)]
    data = {
        "meta": {"model": args.model, "device": str(generator.device), "dtype": dtype, "cases": args.cases,
                 "limit": args.limit, "batch_size": args.batch_size, "quick": args.quick,
                 "max_new_tokens": args.max_new_tokens, "torch": torch.__version__,
                 "config": generator.config.to_dict(),
                 "spec_bench": str(args.spec_bench) if args.spec_bench else None,
                 "spec_bench_only": args.spec_bench_only},
        "exactness": {r.name: {**exactness_counts(r.results), "nodraft_hard": exactness_counts(r.results, NODRAFT)[
            "hard"], "batch_hard": r.batch_hard} for r in reports},
        "tree_cost": [{"context": prefix, "batch": batch, **curve.to_dict()} for prefix, batch, curve in curves],
        "bench": {r.name: r.rows for r in reports},
        "batch": {r.name: r.batch_rows for r in reports},
        "failed": failed,
    }
    if spec_results:
        data["spec_bench"] = {**spec_data, "exactness": {m: exactness_counts(spec_results, m) for m in ENGINE_METHODS},
                              "summary": summarize(spec_results), "results": [r.to_dict() for r in spec_results]}
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
