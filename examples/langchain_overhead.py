"""How much time does the LangChain path add to the engine? (Issue 3: at most 3%.)

Answers the shipped RAG QA cases through ``LookaheadGenerator.generate`` and through ``ChatLookahead.invoke`` on the
same generator, alternating the order, checks that the texts are identical and prints the overhead.

    python examples/langchain_overhead.py --cases 6 --rounds 2 --max-new-tokens 96
"""

from __future__ import annotations

import argparse

from langchain_lookahead.overhead import measure_overhead

from lookahead.bench.cases import load_cases
from lookahead.config import LookaheadConfig
from lookahead.engine import LookaheadGenerator
from lookahead.models import load_model
from lookahead.prompts import case_messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--cases", type=int, default=6, help="first N shipped RAG QA cases")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    generator = LookaheadGenerator(model, tokenizer, LookaheadConfig(learn_outputs=False))
    generator.budget  # noqa: B018 - measure (or load) the cost curve before timing
    prompts = [case_messages(c) for c in load_cases("rag_qa", limit=args.cases)]
    result = measure_overhead(generator, prompts, max_new_tokens=args.max_new_tokens, rounds=args.rounds)
    print(result.format())


if __name__ == "__main__":
    main()
