"""A request with huge documents next to a running stream, through `lookahead serve` (issue 22, item 1).

First checks that the default ``--max-request-tokens`` refuses a request whose documents hold --doc-tokens tokens
(the standard library's source) with a 413 naming the limit. Then starts the server in this process on the default
model with the limit raised to let it in, streams chat completions back to back from one client (a new question
each time), and while the stream runs sends, a few seconds apart, the same question without documents (the
control: what any joining request costs the stream) and with them. For each: the stream's normal step (median gap
between chunks over the 3.5 s before), its longest gap while the request was tokenized, staged, prefilled and
decoded, and the server's memory growth (resident set size; the request keeps at most ``local_tokens`` tokens of
its documents for drafting).

    .venv/bin/python scripts/bounded_request_check.py [--doc-tokens 100000] [--docs 10] [--draft-size 8]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import threading
import time
from typing import Any

import httpx
from lookahead_server.app import ServeSettings, create_app, default_scheduler
from lookahead_server.background import BackgroundServer

from lookahead.bench.store_bench import real_tokens
from lookahead.config import LookaheadConfig
from lookahead.engine import LookaheadGenerator
from lookahead.models import load_model


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * 4096


TOPICS = ["a suffix array", "a hash table", "a binary heap", "a linked list", "a red-black tree", "a bloom filter",
          "a trie", "a skip list", "a B-tree", "a ring buffer", "a union-find structure", "a segment tree"]


def stream_gaps(url: str, stop: threading.Event, gaps: list[tuple[float, float]]) -> None:
    """Stream completions until ``stop``; record (time, gap since the previous chunk) of every chunk but each
    answer's first (its gap is the time to first token, not a step)."""
    with httpx.Client(base_url=url, timeout=300) as client:
        for n in itertools.count():
            if stop.is_set():
                return
            topic = TOPICS[n % len(TOPICS)]  # answers that were not learned yet: steps of a first-time question
            body = {"model": "default", "messages": [{"role": "user", "content": f"Explain what {topic} is."}],
                    "max_tokens": 96, "stream": True, "temperature": 0}
            last = None
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append((now, now - last))
                    last = now


class _Timed:
    """A proxy of the generator (or of its batch) that records every batch step: (end time, seconds, draft nodes
    verified in it)."""

    def __init__(self, inner: Any, steps: list[tuple[float, float, int]]) -> None:
        self._inner, self._steps = inner, steps

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __len__(self) -> int:
        return len(self._inner)

    def new_batch(self) -> Any:
        return _Timed(self._inner.new_batch(), self._steps)

    def step(self) -> Any:
        t0 = time.perf_counter()
        out = self._inner.step()
        t1 = time.perf_counter()
        nodes = sum(row.stats.draft_sizes[-1] for row in self._inner.rows if row.stats.draft_sizes)
        self._steps.append((t1, t1 - t0, nodes))
        return out


def joining(url: str, body: dict, gaps: list[tuple[float, float]], steps: list[tuple[float, float, int]]) -> dict:
    """Send ``body`` while the stream runs (after it ran alone for a while); the stream's gaps before and during."""
    time.sleep(4.0)
    before = rss_bytes()
    t0 = time.perf_counter()
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    t1 = time.perf_counter()
    grown = rss_bytes() - before
    alone = [g for t, g in gaps if t0 - 3.5 <= t < t0]
    busy = [g for t, g in gaps if t0 <= t <= t1]
    normal = statistics.median(alone)
    step_alone = [d for t, d, _ in steps if t0 - 3.5 <= t < t0]
    step_busy = [d for t, d, _ in steps if t0 <= t <= t1]
    return {"batch_step_alone_ms": round(1e3 * statistics.median(step_alone), 1),
            "batch_step_longest_during_ms": round(1e3 * max(step_busy), 1) if step_busy else None,
            "longest_steps_during": [[round(t - t0, 2), round(1e3 * d), n] for t, d, n in
                                     sorted((x for x in steps if t0 <= x[0] <= t1), key=lambda x: -x[1])[:3]],
            "status": reply.status_code, "seconds": round(t1 - t0, 2), "steps_alone": len(alone),
            "normal_step_ms": round(1e3 * normal, 1), "longest_alone_ms": round(1e3 * max(alone), 1),
            "steps_during": len(busy), "median_during_ms": round(1e3 * statistics.median(busy), 1) if busy else None,
            "longest_during_ms": round(1e3 * max(busy), 1) if busy else None,
            "longest_over_normal": round(max(busy) / normal, 2) if busy else None,
            "longest_at_s": [[round(t - t0, 2), round(1e3 * g)] for t, g in
                             sorted(((t, g) for t, g in gaps if t0 <= t <= t1), key=lambda x: -x[1])[:3]],
            "rss_growth_mib": round(grown / 2**20, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--doc-tokens", type=int, default=100_000)
    p.add_argument("--docs", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens of the joining requests")
    p.add_argument("--draft-size", type=int, default=0,
                   help="draft this many nodes every step (0: the adaptive budget; a fixed size keeps the tree "
                        "size, and so a CPU step's cost, from varying with what is drafted)")
    args = p.parse_args(argv)
    model, tokenizer = load_model("default")
    config = LookaheadConfig() if not args.draft_size else LookaheadConfig(decoding_length=args.draft_size,
                                                                            adaptive=False)
    generator = LookaheadGenerator(model, tokenizer, config)
    per_doc = args.doc_tokens // args.docs
    toks = real_tokens(args.doc_tokens)
    texts = [tokenizer.decode(toks[i * per_doc:(i + 1) * per_doc].tolist()) for i in range(args.docs)]
    counted = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    ask = {"model": "default", "messages": [{"role": "user", "content": "Summarize the code in the documents."}],
           "max_tokens": args.max_tokens, "temperature": 0}
    big = dict(ask, documents=texts)
    # the default limit refuses the request (a 413 naming the limit), before any model work
    server = BackgroundServer(create_app(generator, ServeSettings())).start()
    try:
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=big, timeout=300)
    finally:
        server.stop()
    steps: list[tuple[float, float, int]] = []
    settings = ServeSettings(max_request_tokens=2 * counted + 4096)
    server = BackgroundServer(create_app(generator, settings, lambda g, s: default_scheduler(_Timed(g, steps), s))
                              ).start()
    try:
        httpx.post(f"{server.url}/v1/completions", json={"model": "default", "prompt": "Hi", "max_tokens": 8},
                   timeout=600)  # warm: the cost model, the first answers
        stop, gaps = threading.Event(), []
        streamer = threading.Thread(target=stream_gaps, args=(server.url, stop, gaps))
        streamer.start()
        try:
            control = joining(server.url, ask, gaps, steps)  # the same request without documents
            with_docs = joining(server.url, big, gaps, steps)
            held = generator.trie.stats()["requests"]
        finally:
            stop.set()
            streamer.join()
        report = {"document_tokens": counted, "local_tokens_kept": min(counted, generator.trie.local_tokens),
                  "draft_size": args.draft_size or "adaptive",
                  "default_limit": {"status": refused.status_code,
                                    "message": refused.json().get("error", {}).get("message")},
                  "control_no_documents": control, "with_documents": with_docs,
                  "requests_held_after": held}
        print(json.dumps(report, indent=1))
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
