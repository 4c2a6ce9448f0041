"""A RAG QA service loop: many questions over the same documents; past answers make later ones faster.

One LangChain RAG chain (MiniLM + FAISS retrieval -> prompt -> ChatLookahead) serves a stream of requests: a set of
questions, then the same questions again in another order with a few reworded ones (as many users asking about the
same documents would). The global trie of the chat model keeps every answer it gave, so repeated and overlapping
answers are drafted from it and verified many tokens per step. For each distinct question, plain greedy decoding
of the same prompt (same model) is timed once; outputs are deterministic, so that time is its cost every round.

    python examples/rag_service_loop.py --rounds 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from langchain_lookahead import ChatLookahead
from langchain_lookahead.callbacks import LookaheadStatsHandler
from langchain_lookahead.rag import build_index, load_folder, rag_chain

QUESTIONS = [
    "What does textwrap.dedent do?",
    "What does heapq.heappop return?",
    "What does bisect.insort_left do?",
    "What does functools.partial return?",
    "What does json.loads do?",
    "What does itertools.groupby do?",
]
REWORDED = [
    "Explain what textwrap.dedent does.",
    "What is returned by heapq.heappop?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=str(Path(__file__).with_name("docs")))
    parser.add_argument("--model", default="default")
    parser.add_argument("--rounds", type=int, default=3, help="how many times the question set comes around")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    store = build_index(load_folder(args.folder))
    fast = ChatLookahead(model=args.model, max_tokens=args.max_new_tokens)
    plain = ChatLookahead(model=args.model, max_tokens=args.max_new_tokens, use_lookahead=False)
    chain, plain_chain = rag_chain(store, fast), rag_chain(store, plain)
    fast.engine().generator.budget  # noqa: B018 - load the model and its cost curve before timing

    recorder = LookaheadStatsHandler()
    rng = random.Random(args.seed)
    plain_cost: dict[str, tuple[float, str]] = {}
    per_round: list[list[tuple[float, float, float]]] = []  # (plain s, lookahead s, tokens/step)
    print(f"{'round':>5s} {'request':>7s}  {'tok/step':>8s} {'lookahead':>9s} {'plain':>7s} {'speedup':>7s}  question")
    for round_number in range(1, args.rounds + 1):
        questions = list(QUESTIONS) + (REWORDED if round_number > 1 else [])
        if round_number > 1:
            rng.shuffle(questions)
        rows = []
        for n, question in enumerate(questions, start=1):
            if question not in plain_cost:
                start = time.perf_counter()
                answer = plain_chain.invoke(question)["answer"]
                plain_cost[question] = (time.perf_counter() - start, answer)
            start = time.perf_counter()
            result = chain.invoke(question, config={"callbacks": [recorder]})
            seconds = time.perf_counter() - start
            plain_seconds, plain_answer = plain_cost[question]
            assert result["answer"] == plain_answer, f"answers differ for {question!r}"
            tps = recorder.last["tokens_per_step"] if recorder.last else 0.0
            rows.append((plain_seconds, seconds, tps))
            print(f"{round_number:5d} {n:7d}  {tps:8.2f} {seconds:8.2f}s {plain_seconds:6.2f}s "
                  f"{plain_seconds / seconds:6.2f}x  {question}")
        per_round.append(rows)
    print("\nround  mean tokens/step  speedup over plain greedy (same chain, same answers)")
    for number, rows in enumerate(per_round, start=1):
        speedup = sum(r[0] for r in rows) / sum(r[1] for r in rows)
        print(f"{number:5d}  {statistics.mean(r[2] for r in rows):16.2f}  x{speedup:.2f}")


if __name__ == "__main__":
    main()
