"""``lookahead bench-leakage``: how much a stream's chunk sizes and times tell about drafting, with and without paced
chunking (:mod:`lookahead.pacing`).

The observer sees only what a network observer of an encrypted stream sees: how many chunks, how large (bytes of
text) and when. It tries to tell whether the draft store had seen the answer before (another user asked the same
question: the store learned its answer) from one stream. Each question is asked twice in each of two fresh stores:
once first (unseen), and, in the second store, after one untimed ask (seen). The observer learns a threshold on
one feature of the trace (the one that separates best on the training half: chunks per token, bytes per chunk,
seconds per token) and is scored on the other half, both ways round (two-fold); chance is 0.5.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..outputs import StreamChunk
from ..pacing import StreamChunking, pace


@dataclass(frozen=True)
class Trace:
    """What an observer of one stream sees: each chunk's size in bytes of text and its arrival time (seconds from the
    request)."""

    sizes: tuple[int, ...]
    times: tuple[float, ...]

    @classmethod
    def of(cls, chunks: Sequence[StreamChunk], times: Sequence[float]) -> Trace:
        kept = [(len(c.text.encode("utf-8")), t) for c, t in zip(chunks, times) if c.text]
        return cls(tuple(s for s, _ in kept), tuple(t for _, t in kept))

    def features(self) -> np.ndarray:
        """[chunks per byte, bytes per chunk, seconds per byte] (what a packet observer can compute)."""
        total = max(1, sum(self.sizes))
        chunks = max(1, len(self.sizes))
        duration = (self.times[-1] - self.times[0]) if len(self.times) > 1 else 0.0
        return np.array([chunks / total, total / chunks, duration / total])


def _best_threshold(x: np.ndarray, y: np.ndarray) -> tuple[float, float, bool]:
    """(accuracy, threshold, above) of the best rule ``(x > threshold) == above`` predicting ``y`` on this data."""
    best = (0.0, 0.0, True)
    cuts = np.unique(x)
    for cut in np.concatenate([cuts, [cuts[0] - 1.0]]):
        for above in (True, False):
            acc = float(np.mean((x > cut) == (y if above else ~y)))
            if acc > best[0]:
                best = (acc, float(cut), above)
    return best


def observer_accuracy(seen: Sequence[Trace], unseen: Sequence[Trace]) -> float:
    """Two-fold accuracy of the best single-feature threshold telling ``seen`` traces from ``unseen`` ones (0.5:
    chance). Each fold picks its feature and threshold on the other half."""
    x = np.array([t.features() for t in [*seen, *unseen]])
    y = np.array([True] * len(seen) + [False] * len(unseen))
    folds = np.arange(len(y)) % 2
    right = 0
    for fold in (0, 1):
        train, test = folds != fold, folds == fold
        rules = [(_best_threshold(x[train, f], y[train]), f) for f in range(x.shape[1])]
        (_, cut, above), f = max(rules, key=lambda r: r[0][0])
        guess = (x[test, f] > cut) == above
        right += int(np.sum(guess == y[test]))
    return right / len(y)


def timed_stream(chunks: Any, chunking: StreamChunking | str, tokenizer: Any, stop: Sequence[str] = (),
                 clock: Callable[[], float] = time.monotonic) -> tuple[list[StreamChunk], Trace]:
    """Consume a stream through :func:`~lookahead.pacing.pace`; its pieces and the trace an observer sees."""
    start = clock()
    pieces, times = [], []
    for piece in pace(chunks, chunking, tokenizer, stop, clock=clock):
        pieces.append(piece)
        times.append(clock() - start)
    return pieces, Trace.of(pieces, times)


def measure(make_generator: Callable[[], Any], prompts: Sequence[str], max_new_tokens: int,
            modes: Sequence[str] = ("run", "token")) -> list[dict[str, Any]]:
    """Per chunking mode: the observer's accuracy and the tokens per second a client sees (seen and unseen answers
    together). ``make_generator`` gives a generator with a fresh store each call."""
    rows = []
    make_generator().generate(prompts[0], max_new_tokens=max_new_tokens)  # warm: cost model, kernels, caches
    for mode in modes:
        seen: list[Trace] = []
        unseen: list[Trace] = []
        tokens = 0
        seconds = 0.0
        for prompt in prompts:
            for was_seen in (False, True):
                generator = make_generator()
                if was_seen:
                    generator.generate(prompt, max_new_tokens=max_new_tokens)  # the store learns the answer
                t0 = time.monotonic()
                pieces, trace = timed_stream(generator.stream(prompt, max_new_tokens=max_new_tokens), mode,
                                             generator.tokenizer)
                seconds += time.monotonic() - t0
                tokens += sum(len(p.token_ids) for p in pieces)
                (seen if was_seen else unseen).append(trace)
        rows.append({"chunking": mode, "questions": len(prompts), "observer_accuracy": observer_accuracy(seen, unseen),
                     "client_tok_s": tokens / seconds})
    return rows


def cmd_bench_leakage(args: argparse.Namespace) -> int:
    """Print the observer's accuracy and the client's tokens per second for each ``--modes`` chunking."""
    _, tokenizer, generator = args.build(args)
    texts = [json.loads(line) for line in open(args.questions, encoding="utf-8") if line.strip()] \
        if args.questions else [{"prompt": p} for p in _DEFAULT_QUESTIONS]
    prompts = [t["prompt"] if isinstance(t, dict) else str(t) for t in texts][: args.limit]

    def fresh() -> Any:
        generator.trie = generator.empty_trie()
        return generator

    rows = measure(fresh, [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                          add_generation_prompt=True) for p in prompts],
                   args.max_new_tokens, args.modes.split(","))
    base = rows[0]["client_tok_s"]
    print("| chunking | questions | observer accuracy (0.5 = chance) | client tok/s | vs run |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['chunking']} | {row['questions']} | {row['observer_accuracy']:.2f} | "
              f"{row['client_tok_s']:.1f} | {row['client_tok_s'] / base:.2f}x |")
    return 0


_DEFAULT_QUESTIONS = (
    "What is the capital of France? Answer in two sentences.",
    "Explain what a hash table is.",
    "List three uses of copper.",
    "Why is the sky blue?",
    "What does a compiler do?",
    "Give two tips for writing clear emails.",
    "What is photosynthesis?",
    "How does a bicycle stay upright?",
    "What is the difference between weather and climate?",
    "Describe how a refrigerator keeps food cold.",
    "What is machine learning?",
    "Name the planets of the solar system in order.",
)


def add_parser(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None],
               build: Callable[[argparse.Namespace], tuple]) -> argparse.ArgumentParser:
    """``lookahead bench-leakage``."""
    parser = sub.add_parser("bench-leakage", help="how much chunk sizes and times tell about drafting, with and "
                                                  "without paced chunking")
    add_model_args(parser)
    parser.add_argument("--questions", help="JSON Lines file of {'prompt': ...} (default: 12 built-in questions)")
    parser.add_argument("--limit", type=int, default=12, help="first N questions")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--modes", default="run,token,fixed:4", help="comma-separated chunkings to compare")
    parser.set_defaults(func=cmd_bench_leakage, build=build)
    return parser
