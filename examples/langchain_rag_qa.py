"""LangChain RAG QA over a folder of text files, with lookahead decoding, against the same chain on plain greedy HF.

Indexes the folder (MiniLM embeddings + FAISS, offline), then answers each question with a plain LCEL chain
(retriever -> prompt -> chat model), streaming the answer and listing its sources. Every question is also answered
by the very same chain with a plain (non-lookahead) Hugging Face greedy model (same weights, same prompt): the
example checks that the answers are identical and prints the speedup measured in this run.

    python examples/langchain_rag_qa.py                      # examples/docs, built-in questions
    python examples/langchain_rag_qa.py --folder my_notes -q "What is X?" -q "How do I Y?"
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from langchain_lookahead import ChatLookahead
from langchain_lookahead.rag import build_index, load_folder, rag_chain

QUESTIONS = [
    "What does textwrap.dedent do?",
    "How do I push an item onto a heap while keeping the heap invariant?",
    "What does functools.lru_cache do?",
    "What does json.dumps do with the indent argument?",
    "What does textwrap.dedent do?",  # asked again: the trie has learned the first answer
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=str(Path(__file__).with_name("docs")), help="folder of text files")
    parser.add_argument("-q", "--question", action="append", help="a question (repeatable; default: built-in)")
    parser.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M) or a local model")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("-k", type=int, default=3, help="chunks retrieved per question")
    args = parser.parse_args()

    print(f"indexing {args.folder} ...", flush=True)
    start = time.perf_counter()
    docs = load_folder(args.folder)
    store = build_index(docs)
    print(f"{len(docs)} files, {len(store)} chunks indexed in {time.perf_counter() - start:.1f}s")

    # Both chat models name the same model and knobs, so they share one loaded copy of it.
    fast = ChatLookahead(model=args.model, max_tokens=args.max_new_tokens)
    plain = ChatLookahead(model=args.model, max_tokens=args.max_new_tokens, use_lookahead=False)
    chain, plain_chain = rag_chain(store, fast, k=args.k), rag_chain(store, plain, k=args.k)
    print("loading the model and measuring this machine's cost curve (cached) ...", flush=True)
    fast.engine().generator.budget  # noqa: B018 - load + measure before timing anything

    total_plain = total_fast = 0.0
    all_same = True
    for number, question in enumerate(args.question or QUESTIONS, start=1):
        start = time.perf_counter()
        expected = plain_chain.invoke(question)["answer"]
        plain_seconds = time.perf_counter() - start

        print(f"\nQ{number}: {question}\nA: ", end="", flush=True)
        start = time.perf_counter()
        answer, copied = "", {}
        for part in chain.stream(question):
            if "answer" in part:
                answer += part["answer"]
                print(part["answer"], end="", flush=True)
            for source in part.get("sources", []):  # after the answer: what it copied from each chunk
                name = source["source"] or "?"
                copied[name] = copied.get(name, 0) + (source["copied_tokens"] or 0)
        seconds = time.perf_counter() - start
        same = answer == expected
        all_same &= same
        total_plain += plain_seconds
        total_fast += seconds
        print(f"\n   sources (answer tokens copied): {', '.join(f'{n} ({c})' for n, c in copied.items())}")
        print(f"   plain HF greedy {plain_seconds:.2f}s | lookahead {seconds:.2f}s | x{plain_seconds / seconds:.2f} | "
              f"answers {'identical' if same else 'DIFFERENT'}")
    print(f"\nwhole chain, all questions: plain {total_plain:.1f}s, lookahead {total_fast:.1f}s: "
          f"speedup x{total_plain / total_fast:.2f}; answers {'all identical' if all_same else 'DIFFER'}")


if __name__ == "__main__":
    main()
