"""RAG QA demo on the embedded default model: answer questions from documents, with and without lookahead.

Runs plain greedy decoding (HF ``generate``) and lookahead on the same prompts in the same process, checks that the
answers are identical token for token, and prints the speedup and tokens per step. The last question is asked twice
to show a RAG QA service that sees a question again: the trie has learned the first answer.
"""

from __future__ import annotations

import argparse
import time

from lookahead.bench.cases import load_cases
from lookahead.engine import LookaheadGenerator
from lookahead.models import load_model
from lookahead.prompts import rag_messages
from lookahead.reference import greedy


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
    print("c(n)/c(1): " + ", ".join(f"{n}:{r:.2f}" for n, r in curve.relative().items() if n <= 16))

    cases = load_cases("rag_qa", limit=args.questions)
    cases = cases + cases[-1:]  # the last question comes again: the trie has learned its answer
    eos = model.generation_config.eos_token_id
    total_plain = total_lookahead = 0.0
    for number, case in enumerate(cases, start=1):
        ids = generator.encode(rag_messages(case["question"], case["documents"]))
        start = time.perf_counter()
        plain = greedy(model, ids, args.max_new_tokens, eos_token_id=eos)
        plain_seconds = time.perf_counter() - start

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
        same = "identical" if tokens == plain else "DIFFERENT"
        total_plain += plain_seconds
        total_lookahead += seconds
        print(f"\n   greedy {plain_seconds:.2f}s | lookahead {seconds:.2f}s | speedup x{plain_seconds / seconds:.2f} | "
              f"{stats.tokens_per_step:.2f} tokens/step | answers {same}")
    print(f"\nall questions: speedup x{total_plain / total_lookahead:.2f} over plain greedy decoding (same run)")


if __name__ == "__main__":
    main()
