"""Documents through `lookahead serve`: post a corpus with ids while a client streams, as a new user would.

Starts the server in this process on the default model (the app `lookahead serve` runs), posts --docs documents of
about --doc-tokens tokens each (the standard library's source, the bench-store text) to `/v1/documents` with ids, in
batches of --batch, while one client streams completions back to back; then reports the server's memory growth per
document token (resident set size), the stream's longest gap between chunks against its median, and whether every
document still drafts (its text after 6 of its tokens is the store's best path).

    .venv/bin/python scripts/serve_documents_check.py [--docs 410] [--doc-tokens 500]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import httpx
from lookahead_server.app import ServeSettings, create_app
from lookahead_server.background import BackgroundServer

from lookahead.bench.store_bench import real_tokens
from lookahead.engine import LookaheadGenerator
from lookahead.models import load_model


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * 4096


def stream_gaps(url: str, stop: threading.Event, gaps: list[float]) -> None:
    """Stream completions until ``stop``; record the gaps between chunks."""
    with httpx.Client(base_url=url, timeout=120) as client:
        while not stop.is_set():
            t_start = time.perf_counter()
            body = {"model": "default", "prompt": "Explain what a suffix array is, step by step.",
                    "max_tokens": 96, "stream": True, "temperature": 0}
            last = None
            with client.stream("POST", "/v1/completions", json=body) as response:
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    now = time.perf_counter()
                    gaps.append(now - (t_start if last is None else last))  # the first: time to first chunk
                    last = now


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=410)
    p.add_argument("--doc-tokens", type=int, default=500)
    p.add_argument("--batch", type=int, default=10)
    args = p.parse_args(argv)
    model, tokenizer = load_model("default")
    generator = LookaheadGenerator(model, tokenizer)
    toks = real_tokens(args.docs * args.doc_tokens)
    texts = [tokenizer.decode(toks[i * args.doc_tokens:(i + 1) * args.doc_tokens].tolist())
             for i in range(args.docs)]
    app = create_app(generator, ServeSettings())
    server = BackgroundServer(app).start()
    try:
        with httpx.Client(base_url=server.url, timeout=300) as client:  # warm: cost model, first answers
            client.post("/v1/completions", json={"model": "default", "prompt": "Hello", "max_tokens": 8})
            before = rss_bytes()
            stop, gaps = threading.Event(), []
            streamer = threading.Thread(target=stream_gaps, args=(server.url, stop, gaps))
            streamer.start()
            time.sleep(2.0)
            t0 = time.perf_counter()
            for start in range(0, args.docs, args.batch):
                ids = [f"d{i}" for i in range(start, min(start + args.batch, args.docs))]
                reply = client.post("/v1/documents", json={"documents": texts[start:start + len(ids)], "ids": ids})
                reply.raise_for_status()
            posted = time.perf_counter() - t0
            time.sleep(2.0)
            stop.set()
            streamer.join()
            generator.trie.flush()
            after = rss_bytes()
        store = generator.trie
        doc_tokens = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        drafting = 0
        for ids in doc_tokens:  # the document's own next 8 tokens are a path of the draft tree
            draft = store.draft(ids[100:106], 48)
            child = {(p, t): i for i, (p, t) in enumerate(zip(draft.parents, draft.tokens))}
            node, depth = -1, 0
            while depth < 8 and (node, ids[106 + depth]) in child:
                node = child[(node, ids[106 + depth])]
                depth += 1
            drafting += depth == 8
        total = sum(len(ids) for ids in doc_tokens)
        report = {"documents": args.docs, "tokens": total, "post_seconds": round(posted, 2),
                  "rss_bytes_per_token": round((after - before) / total, 1),
                  "store_bytes_per_token": round(store.nbytes / max(1, store.num_tokens()), 1),
                  "stream_chunks": len(gaps), "gap_median_ms": round(1e3 * statistics.median(gaps), 1),
                  "gap_max_ms": round(1e3 * max(gaps), 1), "documents_drafting": drafting,
                  "listed": len(store.sources())}
        print(json.dumps(report, indent=1))
        return 0 if drafting == args.docs else 1
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
