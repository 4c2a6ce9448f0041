"""How much a long prompt joining a running batch slows the rows already decoding.

Three short RAG questions decode together; at step ``--join-at`` a request of about ``--join-tokens`` prompt tokens
(long_rag documents, repeated to length) joins. The script reports the mean wall time of one batch step of the
short rows while the long request was joining, against the same steps of a run where nothing joins, for the
engine's sliced joining and for a one-shot prefill (``prefill_chunk`` larger than the prompt). Greedy outputs of
the short rows are checked to be identical in all runs. The short rows decode plain one-token steps unless
``--draft`` is given: drafting rows change their step sizes as the budget learns, which would blur the comparison
between runs.

    python scripts/join_check.py [--join-tokens 6000] [--prefill-share 0.15]
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
    limit = generator.model.config.max_position_embeddings
    for key, ids in enumerate(shorts):
        # an EOS id the model never emits: the short rows decode for the whole window (or up to the model's limit)
        batch.add(generator.prepare(ids, max_new_tokens=limit - len(ids) - 1, eos_token_id=NEVER), key)
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


def joined_at(progress: list[int], join_at: int) -> int | None:
    """The step at which the joiner's last slice ran (its row joined then), or None if it never did."""
    return next((i for i in range(join_at, len(progress)) if progress[i] == -1), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--join-tokens", type=int, default=6000)
    parser.add_argument("--join-at", type=int, default=5)
    parser.add_argument("--max-steps", type=int, default=4000,
                        help="give up on the sliced join after this many steps (default 4000)")
    parser.add_argument("--draft", action="store_true",
                        help="let the short rows draft (default: plain one-token steps, so that every run's steps are "
                             "the same size and the rise is the joining cost alone)")
    parser.add_argument("--prefill-share", type=float, default=None,
                        help="the engine's prefill_share for the sliced join (default: the config's)")
    args = parser.parse_args()
    model, tokenizer = load_model()
    generator = LookaheadGenerator(model, tokenizer)
    if args.prefill_share is not None:
        generator.config = generator.config.with_updates(prefill_share=args.prefill_share)
    shorts = [generator.encode(case_messages(c)) for c in load_cases("rag_qa", limit=3)]
    joiner = long_prompt(generator, args.join_tokens)
    generator.budget  # noqa: B018 - the cost model, before any clock
    if not args.draft:  # drafts that differ between runs (the budget learns on) would change the step sizes
        generator.config = generator.config.with_updates(decoding_length=0)
    sliced_chunk = generator.config.prefill_chunk

    def fresh_run(joining: list[int] | None, chunk: int, steps: int) -> tuple[list[float], dict, list[int]]:
        generator.trie = generator.empty_trie()  # every run drafts from the same (empty) trie
        generator.config = generator.config.with_updates(prefill_chunk=chunk)
        return run(generator, shorts, joining, args.join_at, steps)

    fresh_run(None, sliced_chunk, 10)  # warm-up, discarded
    runs = {"sliced (default)": fresh_run(joiner, sliced_chunk, args.max_steps)}
    done = joined_at(runs["sliced (default)"][2], args.join_at)
    steps = len(runs["sliced (default)"][0]) if done is None else done + 1
    base_times, base_tokens, _ = fresh_run(None, sliced_chunk, steps)
    runs["one-shot prefill"] = fresh_run(joiner, 1 << 20, steps)
    for _, tokens, _ in runs.values():  # the same greedy tokens (as many as each run reached)
        for key, ids in tokens.items():
            common = min(len(ids), len(base_tokens[key]))
            assert ids[:common] == base_tokens[key][:common], "the short rows' outputs changed"
    end = min(len(base_times), *(len(r[0]) for r in runs.values()))
    window = slice(args.join_at, min(steps, end))
    base = statistics.mean(base_times[window])
    print(f"join of a {len(joiner)}-token prompt at step {args.join_at}, 3 short rows decoding "
          f"({'drafting' if args.draft else 'plain one-token steps'}), prefill_share "
          f"{generator.config.prefill_share}; steps {window.start}..{window.stop - 1} (until the sliced join "
          f"completed{'' if done is not None else ': it did not within --max-steps'}); a fresh trie per run")
    print("| joining | mean step ms, alone | mean step ms, while joining | rise | longest step ms | joined after |")
    print("|---|---|---|---|---|---|")
    for label, (times, _, progress) in runs.items():
        mean = statistics.mean(times[window])
        at = joined_at(progress, args.join_at)
        waited = sum(times[args.join_at:at + 1]) if at is not None else 0.0
        wait = "not joined" if at is None else f"{waited:.1f} s ({at - args.join_at + 1} steps)"
        print(f"| {label} | {base * 1000:.1f} | {mean * 1000:.1f} | {100 * (mean / base - 1):+.0f}% | "
              f"{max(times[window]) * 1000:.0f} | {wait} |")


if __name__ == "__main__":
    main()
