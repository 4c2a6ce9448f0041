"""Command line: ``lookahead generate``, ``bench``, ``summarize``, and the commands of installed plugins (``serve``).

The core's own commands are registered here. Any installed distribution can add one through the entry point group
``lookahead.commands``: ``name = "module:add_parser"``, where ``add_parser(sub, add_model_args, build)`` adds the
subparser ``name`` to ``sub`` (argparse subparsers), calls ``add_model_args(parser)`` for the shared model options
and keeps ``build(args) -> (model, tokenizer, generator)`` to load the engine when it runs. The server registers
``serve`` so (this project's ``pyproject.toml``); the core never imports an integration. A plugin that fails to load
still gets its subcommand, which says why it is unavailable instead of running.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from .argtypes import number_type, positive_int
from .bench.leakage import add_parser as add_leakage_parser
from .bench.store_bench import add_parsers as add_store_parsers
from .config import LookaheadConfig
from .models import AUTO_DTYPE, DTYPE_CHOICES, ModelLoadError, load_model
from .prompts import rag_messages
from .summarize import add_parser as add_summarize_parser

COMMAND_GROUP = "lookahead.commands"
AddModelArgs = Callable[[argparse.ArgumentParser], None]
Build = Callable[[argparse.Namespace], tuple]
AddParser = Callable[[Any, AddModelArgs, Build], argparse.ArgumentParser]


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model options every command shares (``--model``, ``--dtype``, ``--device`` and the drafting knobs)."""
    parser.add_argument("--model", default="default",
                        help="'default' (embedded SmolLM2-135M-Instruct), an HF model id, a local dir or a .gguf file")
    parser.add_argument("--dtype", default=AUTO_DTYPE, choices=DTYPE_CHOICES,
                        help="auto (default): bfloat16 on CUDA where supported, else float16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--decoding-length", type=int, default=LookaheadConfig.decoding_length,
                        help="most draft nodes verified per pass")
    parser.add_argument("--branch-length", type=positive_int, default=LookaheadConfig.branch_length,
                        help="deepest draft path")
    parser.add_argument("--fixed-draft", action="store_true",
                        help="always draft --decoding-length nodes instead of the adaptive budget")
    parser.add_argument("--join-stall", type=number_type(float, "a number in (0, 64]", 0.0, 64.0, low_open=True),
                        default=LookaheadConfig.join_stall,
                        help="while a prompt joins running requests, the most its prefill may add to one of their "
                             "steps, in steps (default %(default)s; 1: smoothest streams, later first tokens)")


def build_generator(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, tokenizer, LookaheadGenerator) from the options of :func:`add_model_args` (the ``build`` every command,
    plugins included, is handed); ``args.dtype`` becomes the dtype ``auto`` resolved to."""
    from .engine import LookaheadGenerator  # heavy: only when a command runs

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    args.dtype = str(model.dtype).removeprefix("torch.")  # what "auto" became: reports and records name it
    config = LookaheadConfig(decoding_length=args.decoding_length, branch_length=args.branch_length,
                             adaptive=not args.fixed_draft,
                             join_stall=getattr(args, "join_stall", LookaheadConfig.join_stall))
    return model, tokenizer, LookaheadGenerator(model, tokenizer, config)


def cmd_generate(args: argparse.Namespace) -> int:
    documents = [Path(p).read_text(encoding="utf-8") for p in args.document]
    _, _, generator = build_generator(args)
    prompt = rag_messages(args.prompt, documents) if documents else [{"role": "user", "content": args.prompt}]
    last = None
    for chunk in generator.stream(prompt, max_new_tokens=args.max_new_tokens, stop=args.stop or None):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    if last is not None and last.stats is not None:
        s = last.stats
        print(f"[{s.new_tokens} tokens in {s.time_total:.2f}s, {s.tokens_per_second:.1f} tok/s, "
              f"{s.tokens_per_step:.2f} tokens/step, finish: {last.finish_reason}]", file=sys.stderr)
    return 0


def _machine() -> dict[str, str]:
    return {"python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor()}


def _bench_batching(args: argparse.Namespace) -> int:
    """``lookahead bench --batch-size N``: throughput of batched lookahead vs one by one and HF padded batches.

    ``--json`` writes ``meta``, ``summary`` (one row per method, with its exactness counts and speedups) and
    ``results`` (one row per method and request: new tokens, exact, agreement)."""
    from .bench.batching import BATCH_METHODS, format_throughput, request_rows, run_throughput, throughput_rows

    if args.spec_bench:
        raise ValueError("--batch-size measures case files; --spec-bench runs at batch 1")
    cases = _bench_cases(args)
    model, tokenizer, generator = build_generator(args)
    curve = generator.budget.cost  # measure (or load) the cost curve before timing anything
    results = run_throughput(generator, cases, args.batch_size, BATCH_METHODS)
    dtype = str(model.dtype).removeprefix("torch.")
    print(format_throughput(results, mismatches=dtype != "float32"))
    if args.json:
        from .bench.report import write_json

        meta = {"cases": args.cases, "batch_size": args.batch_size, "model": args.model, "dtype": dtype,
                "device": str(generator.device), "methods": list(BATCH_METHODS), "limit": args.limit,
                "config": generator.config.to_dict(), "cost_curve": curve.to_dict(), "machine": _machine()}
        write_json(args.json, meta, request_rows(results, [c["id"] for c in cases]), throughput_rows(results))
        print(f"results written to {args.json}")
    batched = next(r for r in results if r.method == "lookahead-batch")
    if batched.near_tie:
        print(f"note: {batched.near_tie} batched row(s) equal the request decoded alone up to a near-tie ({dtype} "
              "rounding)", file=sys.stderr)
    if batched.hard:  # every mismatch in float32; only hard ones in half precision
        print("WARNING: a batched row differs from the same request decoded alone" if dtype == "float32" else
              f"FAILED: a batched row differs from the same request decoded alone beyond {dtype} rounding (hard "
              "mismatch)", file=sys.stderr)
        return 1
    return 0


def _bench_methods(text: str) -> list[str]:
    """The ``--methods`` list checked against the known methods (ValueError naming the unknown ones)."""
    from .bench.runner import METHODS

    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown}; allowed: {', '.join(METHODS)}")
    return methods


def _bench_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The cases of ``lookahead bench``: a Spec-Bench question file's, or the case files' (every case's
    ``max_new_tokens`` capped by ``--max-new-tokens`` when given)."""
    from .bench.cases import load_cases
    from .bench.spec_bench import DEFAULT_MAX_NEW_TOKENS, load_spec_bench, parse_categories

    if args.spec_bench and args.cases:
        raise ValueError("pass case files or --spec-bench, not both")
    if args.spec_bench and args.limit:
        raise ValueError("--limit caps case files; with --spec-bench use --questions-per-task")
    if args.spec_bench:
        return load_spec_bench(args.spec_bench, parse_categories(args.categories), args.questions_per_task,
                               args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
    if not args.cases:
        raise ValueError("name case files (or shipped names: rag_qa, summarize, open, long_rag, edit) or pass "
                         "--spec-bench PATH")
    if args.categories or args.questions_per_task:
        raise ValueError("--categories and --questions-per-task select Spec-Bench questions: pass --spec-bench PATH")
    cases = [c for name in args.cases for c in load_cases(name, args.limit)]
    if args.max_new_tokens:
        cases = [{**c, "max_new_tokens": min(c["max_new_tokens"], args.max_new_tokens)} for c in cases]
    return cases


def _run_bench(runner: Any, cases: list[dict[str, Any]], methods: list[str], args: argparse.Namespace) -> list:
    """Every round of every case with every method, then the ``--warm-round`` (vanilla, nodraft and lookahead
    after the store learned the earlier rounds)."""
    from tqdm.auto import tqdm

    from .bench.runner import WARM_METHODS

    warm = [m for m in methods if m in WARM_METHODS] if args.warm_round else []
    with tqdm(total=len(cases) * (args.rounds + bool(warm)), desc="bench", unit="case") as bar:
        results = runner.run(cases, methods, rounds=args.rounds, progress=lambda _: bar.update())
        if warm:
            results += runner.run(cases, warm, first_round=args.rounds + 1, progress=lambda _: bar.update())
    return results


def _print_bench(results: list, rows: list[dict[str, Any]], half: bool, spec: str | None) -> None:
    """The bench's tables: per round, task and method; the two factors; own baselines; provenance; Spec-Bench's."""
    from .bench.report import format_factors, format_own_baselines, format_provenance, format_table

    print(format_table(rows, mismatches=half))
    for table in (format_factors(rows), format_own_baselines(rows, mismatches=half), format_provenance(rows), spec):
        if table:
            print()
            print(table)


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .bench.cases import load_cases
    from .bench.report import exactness_messages, plot, summarize, write_json
    from .bench.runner import BenchRunner, EnsembleSettings
    from .bench.spec_table import spec_report

    if args.batch_size:
        return _bench_batching(args)
    methods = _bench_methods(args.methods)
    cases = _bench_cases(args)
    warmup = [c for name in (args.warmup or []) for c in load_cases(name, args.limit)]
    model, tokenizer, generator = build_generator(args)
    ensemble = EnsembleSettings(mode=args.ensemble_mode, amateur_layers=args.amateur_layers, mu=args.mu,
                                proposer=args.proposer, proposal_depth=args.proposal_depth)
    runner = BenchRunner(model, tokenizer, generator, ensemble=ensemble, k=args.k)
    curve = generator.budget.cost  # measure (or load) the cost curve before timing anything
    if warmup:
        with tqdm(total=len(warmup), desc="warm-up", unit="case") as bar:
            runner.warm(warmup, progress=lambda _: bar.update())
    results = _run_bench(runner, cases, methods, args)
    runner.close()
    rows = summarize(results)
    dtype = str(model.dtype).removeprefix("torch.")
    spec, spec_data = spec_report(results) if args.spec_bench else (None, None)
    _print_bench(results, rows, dtype != "float32", spec)  # half precision: near-tie and hard columns
    print("cost curve c(n)/c(1): " + ", ".join(f"{n}:{r:.2f}" for n, r in curve.relative().items()))
    meta = {
        "cases": args.cases, "warmup": args.warmup, "rounds": args.rounds, "warm_round": args.warm_round,
        "methods": methods, "model": args.model, "dtype": args.dtype, "device": str(generator.device),
        "config": generator.config.to_dict(), "cost_curve": curve.to_dict(), "machine": _machine(),
    }
    if args.spec_bench:
        meta["spec_bench"] = {"path": args.spec_bench, "categories": args.categories,
                              "questions_per_task": args.questions_per_task,
                              "max_new_tokens": cases[0]["max_new_tokens"], "questions": len(cases), **spec_data}
    if args.json:
        write_json(args.json, meta, results, rows)
        print(f"results written to {args.json}")
    if args.plot:
        plot(args.plot, results)
        print(f"plot written to {args.plot}")
    messages, failed = exactness_messages(results, dtype)  # only hard mismatches fail
    for line in messages:
        print(line, file=sys.stderr)
    return 1 if failed else 0


def add_generate_parser(sub: Any, add_model_args: AddModelArgs, build: Build) -> argparse.ArgumentParser:
    """Register ``lookahead generate``."""
    gen = sub.add_parser("generate", help="answer one prompt (optionally over documents), streaming")
    gen.add_argument("prompt")
    gen.add_argument("--document", "-d", action="append", default=[], help="a text file to answer from (repeatable)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=256)
    gen.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    add_model_args(gen)
    gen.set_defaults(func=cmd_generate)
    return gen


def add_bench_parser(sub: Any, add_model_args: AddModelArgs, build: Build) -> argparse.ArgumentParser:
    """Register ``lookahead bench``."""
    bench = sub.add_parser("bench", help="compare vanilla, pld, nodraft and lookahead on case files or Spec-Bench")
    bench.add_argument("cases", nargs="*",
                       help="case files (JSON Lines) or shipped names: rag_qa, summarize, open, long_rag, edit")
    bench.add_argument("--methods", default="vanilla,pld,nodraft,lookahead",
                       help="comma-separated: vanilla,pld,nodraft (the engine with drafting off),lookahead,"
                            "lookahead-predicted,ensemble,ensemble-plain,multidraft,superposed,k-sampling")
    bench.add_argument("--spec-bench", metavar="PATH",
                       help="run Spec-Bench's question.jsonl (your copy of hemingkx/Spec-Bench's "
                            "data/spec_bench/question.jsonl) instead of case files, and print its table")
    bench.add_argument("--categories",
                       help="Spec-Bench: comma-separated tasks (mt_bench, translation, summarization, qa, "
                            "math_reasoning, rag) or categories (writing, roleplay, ...); default: all")
    bench.add_argument("--questions-per-task", "--questions-per-category", type=positive_int, default=None,
                       help="Spec-Bench: at most N questions per task (mt_bench: spread over its categories)")
    bench.add_argument("--max-new-tokens", type=positive_int, default=None,
                       help="Spec-Bench: new tokens per turn (default 128; Spec-Bench uses 1024); case files: a "
                            "cap on each case's own")
    bench.add_argument("--warm-round", action="store_true",
                       help="one more round of vanilla, nodraft and lookahead after the store learned the earlier "
                            "rounds (the 'lookahead (warm store)' row)")
    bench.add_argument("--warmup", action="append", help="case file whose outputs the trie learns first (untimed)")
    bench.add_argument("--rounds", type=positive_int, default=1, help="repeat all cases N times (trie stays warm)")
    bench.add_argument("--limit", type=positive_int, default=None, help="first N cases of each file")
    bench.add_argument("--json", help="write all results to this JSON file")
    bench.add_argument("--plot", help="write a PNG plot (speedup and tokens per step per case)")
    bench.add_argument("--ensemble-mode", choices=["contrastive", "weighted"], default="contrastive",
                       help="ensemble methods: the model with a copy of its first --amateur-layers layers")
    bench.add_argument("--amateur-layers", type=positive_int, default=8, help="layers of the truncated member")
    bench.add_argument("--mu", type=float, default=0.1, help="contrastive ensemble: amateur strength")
    bench.add_argument("--proposer", action="store_true", help="the truncated member also proposes tokens")
    bench.add_argument("--proposal-depth", type=positive_int, default=3, help="tokens the proposer extends to")
    bench.add_argument("--k", type=positive_int, default=3, help="multidraft, superposed, k-sampling: completions")
    bench.add_argument("--batch-size", type=positive_int, default=None,
                       help="measure batched throughput instead: lookahead batched vs one by one vs HF padded batch")
    add_model_args(bench)
    bench.set_defaults(func=cmd_bench)
    return bench


CORE_COMMANDS: dict[str, AddParser] = {
    "generate": add_generate_parser,
    "bench": add_bench_parser,
    "summarize": add_summarize_parser,
    "bench-store": add_store_parsers,  # and store (stats)
    "bench-leakage": add_leakage_parser,
}


def plugin_commands() -> list[EntryPoint]:
    """The installed ``lookahead.commands`` entry points, one per name (the core's names win), sorted by name."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=COMMAND_GROUP):
        if ep.name not in CORE_COMMANDS and ep.name not in found:
            found[ep.name] = ep
    return [found[name] for name in sorted(found)]


def _install_hint(ep: EntryPoint) -> str:
    """``pip install 'dist[name]'`` when the distribution that declares ``ep`` has an extra of the same name."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return ""
    if ep.name in (dist.metadata.get_all("Provides-Extra") or []):
        return f"; the {ep.name} extra may be missing: pip install '{dist.name}[{ep.name}]'"
    return f" (declared by {dist.name})"


def _unavailable(name: str, reason: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(f"error: lookahead {name} is unavailable: {reason}", file=sys.stderr)
        return 2

    return run


def _add_unavailable_parser(sub: Any, name: str, reason: str) -> None:
    """Stand in for a plugin command that could not be registered: it accepts anything and explains why."""
    if name in sub.choices:  # the plugin got as far as adding its parser
        parser = sub.choices[name]
    else:
        parser = sub.add_parser(name, help=f"(unavailable: 'lookahead {name}' says why)",
                                description=f"lookahead {name} is unavailable: {reason}")
    parser.set_defaults(func=_unavailable(name, reason), accepts_unknown_args=True)


def add_plugin_parser(sub: Any, ep: EntryPoint, add_model_args: AddModelArgs, build: Build) -> None:
    """Register the command of one entry point, or a stand-in that says why it could not be."""
    try:
        add_parser = ep.load()
    except Exception as exc:  # any failure of a plugin is reported, never raised
        _add_unavailable_parser(sub, ep.name, f"importing {ep.value} failed ({type(exc).__name__}: {exc})"
                                               f"{_install_hint(ep)}")
        return
    try:
        add_parser(sub, add_model_args, build)
    except Exception as exc:
        _add_unavailable_parser(sub, ep.name, f"{ep.value} failed to register the command "
                                               f"({type(exc).__name__}: {exc})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lookahead", description="Lossless trie-drafted decoding for RAG.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser in CORE_COMMANDS.values():
        add_parser(sub, add_model_args, build_generator)
    for ep in plugin_commands():
        add_plugin_parser(sub, ep, add_model_args, build_generator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_unknown_args", False):  # an unavailable command takes anything
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, ModelLoadError) as exc:  # bad input: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
