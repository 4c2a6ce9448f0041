"""How much a long prompt joining a running batch slows the rows already decoding.

Three short RAG questions decode together; at step ``--join-at`` a request of about ``--join-tokens`` prompt tokens
(long_rag documents, repeated to length) joins. The script reports the mean wall time of one batch step of the
short rows while the long request was joining, against the same steps of a run where nothing joins, for the
engine's sliced joining and for a one-shot prefill (``prefill_chunk`` larger than the prompt). Greedy outputs of
the short rows are checked to be identical in all runs.

    python scripts/join_check.py [--join-tokens 6000] [--steps 60]
"""

from __future__ import annotations

import argparse
import statistics
import time

from lookahead.bench.cases import load_cases
from lookahead.engine import LookaheadGenerator
from lookahead.models import load_model
from lookahead.prompts import case_messages


def long_prompt(generator: LookaheadGenerator, tokens: int) -> list[int]:
    """A chat prompt of about ``tokens`` tokens: a long_rag case whose documents are repeated to length."""
    case = dict(load_cases("long_rag", limit=1)[0])
    ids = generator.encode(case_messages(case))
    while len(ids) < tokens:
        case["documents"] = list(case["documents"]) * 2
        ids = generator.encode(case_messages(case))
    case["documents"] = list(case["documents"])
    while len(ids) > tokens and len(case["documents"]) > 1:
        case["documents"] = case["documents"][:-1]
        ids = generator.encode(case_messages(case))
    return ids


NEVER = 0  # the default model's <|endoftext|>, which its chat answers end with <|im_end|> instead of


def run(generator: LookaheadGenerator, shorts: list[list[int]], joiner: list[int] | None, join_at: int,
        steps: int) -> tuple[list[float], dict[int, list[int]], list[int]]:
    """Step times of a batch of ``shorts`` (joined by ``joiner`` at step ``join_at``), their tokens, and per step
    how many prompt tokens of the joiner were prefilled (-1: not added yet or joined). Stops early once a short
    row ends (its degenerate output reached ``max_new_tokens``)."""
    batch = generator.new_batch()
    for key, ids in enumerate(shorts):
        # an EOS id the model never emits: the short rows decode for the whole window
        batch.add(generator.prepare(ids, max_new_tokens=4096, eos_token_id=NEVER), key)
    batch.step()  # prefill the short rows
    times: list[float] = []
    tokens: dict[int, list[int]] = {key: [] for key in range(len(shorts))}
    progress: list[int] = []
    for step in range(steps):
        if joiner is not None and step == join_at:
            batch.add(generator.prepare(joiner, max_new_tokens=8), "long")
        t0 = time.perf_counter()
        events = batch.step()
        times.append(time.perf_counter() - t0)
        joining = [row for row in batch.new if row.key == "long"]
        progress.append(joining[0].prefilled if joining else -1)
        ended = False
        for key, chunk in events:
            if key != "long":
                tokens[key].extend(chunk.token_ids)
                ended |= chunk.finish_reason is not None
        if ended:
            break
    batch.close()
    return times, tokens, progress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--join-tokens", type=int, default=6000)
    parser.add_argument("--join-at", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    model, tokenizer = load_model()
    generator = LookaheadGenerator(model, tokenizer)
    shorts = [generator.encode(case_messages(c)) for c in load_cases("rag_qa", limit=3)]
    joiner = long_prompt(generator, args.join_tokens)
    generator.budget  # noqa: B018 - the cost model, before any clock
    base_times, base_tokens, _ = run(generator, shorts, None, args.join_at, args.steps)
    runs = {}
    for label, chunk in (("sliced (default)", generator.config.prefill_chunk), ("one-shot prefill", 1 << 20)):
        generator.config = generator.config.with_updates(prefill_chunk=chunk)
        runs[label] = run(generator, shorts, joiner, args.join_at, args.steps)
        for key, ids in runs[label][1].items():  # the same greedy tokens (as many as each run reached)
            common = min(len(ids), len(base_tokens[key]))
            assert ids[:common] == base_tokens[key][:common], "the short rows' outputs changed"
    # the window: from the join until the sliced join completed, every run still had all its short rows
    times, _, progress = runs["sliced (default)"]
    end = min(len(base_times), *(len(r[0]) for r in runs.values()))
    done = next((i for i in range(args.join_at, end) if progress[i] == -1), end)
    window = slice(args.join_at, done + 1 if done < end else end)
    base = statistics.mean(base_times[window])
    rows = []
    for label, (times, _, prog) in runs.items():
        mean = statistics.mean(times[window])
        state = "joined" if -1 in prog[window] else f"{max(prog[window])} of {len(joiner)} tokens prefilled"
        rows.append((label, base * 1000, mean * 1000, 100 * (mean / base - 1), max(times[window]) * 1000, state))
    print(f"join of a {len(joiner)}-token prompt at step {args.join_at}, 3 short rows decoding; steps "
          f"{window.start}..{window.stop - 1} (until the sliced join completed, or a short row ended)")
    print("| joining | mean step ms, alone | mean step ms, while joining | rise | longest step ms | by the end |")
    print("|---|---|---|---|---|---|")
    for label, base, mean, rise, longest, joined in rows:
        print(f"| {label} | {base:.1f} | {mean:.1f} | {rise:+.0f}% | {longest:.0f} | {joined} |")


if __name__ == "__main__":
    main()
