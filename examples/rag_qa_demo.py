"""RAG QA demo on the embedded default model: answer questions from documents, with and without lookahead.

Runs plain greedy decoding (HF ``generate``), the lookahead engine with drafting off (``nodraft``) and lookahead on
the same prompts in the same process, checks that the answers are identical token for token, and prints the speedup
and tokens per step, split into its two factors: the engine's own gain over HF (nodraft vs greedy) and drafting's
(lookahead vs nodraft). The last question is asked twice to show a RAG QA service that sees a question again: the
trie has learned the first answer.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from lookahead.bench.cases import load_cases
from lookahead.engine import LookaheadGenerator
from lookahead.models import load_model
from lookahead.prompts import rag_messages
from lookahead.reference import greedy


def warm_up(model: Any, *generators: LookaheadGenerator) -> None:
    """A few untimed tokens of every method on a prompt of its own: the first passes of new shapes pay one-time
    set-up, which would otherwise land on the first question's timings."""
    eos = model.generation_config.eos_token_id
    for generator in generators:
        ids = generator.encode([{"role": "user", "content": "Say hello."}])
        generator.generate(ids, max_new_tokens=8)
    greedy(model, ids, 8, eos_token_id=eos)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--questions", type=int, default=3, help="how many shipped RAG QA cases to answer")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()

    print(f"loading model {args.model!r} ...", flush=True)
    model, tokenizer = load_model(args.model)
    generator = LookaheadGenerator(model, tokenizer)
    print("measuring the cost curve of this machine (cached after the first run) ...", flush=True)
    curve = generator.budget.cost
    # the same engine with drafting off: what the engine alone gains over HF
    no_drafting = generator.config.with_updates(decoding_length=0, learn_outputs=False)
    nodraft = LookaheadGenerator(model, tokenizer, no_drafting, cost_curve=curve)
    print("c(n)/c(1): " + ", ".join(f"{n}:{r:.2f}" for n, r in curve.relative().items() if n <= 16))

    warm_up(model, generator, nodraft)

    cases = load_cases("rag_qa", limit=args.questions)
    cases = cases + cases[-1:]  # the last question comes again: the trie has learned its answer
    eos = model.generation_config.eos_token_id
    total_plain = total_nodraft = total_lookahead = 0.0
    for number, case in enumerate(cases, start=1):
        ids = generator.encode(rag_messages(case["question"], case["documents"]))
        start = time.perf_counter()
        plain = greedy(model, ids, args.max_new_tokens, eos_token_id=eos)
        plain_seconds = time.perf_counter() - start
        start = time.perf_counter()
        engine_only = nodraft.generate(ids, max_new_tokens=args.max_new_tokens).token_ids
        nodraft_seconds = time.perf_counter() - start

        print(f"\nQ{number}: {case['question']}  ({len(ids)} prompt tokens, {len(case['documents'])} documents)")
        print("A: ", end="", flush=True)
        start = time.perf_counter()
        last, tokens = None, []
        for chunk in generator.stream(ids, max_new_tokens=args.max_new_tokens):
            print(chunk.text, end="", flush=True)
            tokens += chunk.token_ids
            last = chunk
        seconds = time.perf_counter() - start
        assert last is not None and last.stats is not None
        stats = last.stats
        same = "identical" if tokens == plain == engine_only else "DIFFERENT"
        total_plain += plain_seconds
        total_nodraft += nodraft_seconds
        total_lookahead += seconds
        print(f"\n   greedy {plain_seconds:.2f}s | nodraft {nodraft_seconds:.2f}s | lookahead {seconds:.2f}s | "
              f"speedup x{plain_seconds / seconds:.2f} | {stats.tokens_per_step:.2f} tokens/step | answers {same}")
    print(f"\nall questions: speedup x{total_plain / total_lookahead:.2f} over plain greedy decoding (same run) = "
          f"engine x{total_plain / total_nodraft:.2f} (nodraft vs greedy) * drafting "
          f"x{total_nodraft / total_lookahead:.2f} (lookahead vs nodraft)")


if __name__ == "__main__":
    main()
