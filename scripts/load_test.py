"""Load test of `lookahead serve` on the real default model (or any running server with --url).

Starts the server in this process (uvicorn in a background thread, the same app `lookahead serve` runs), sends
--requests chat requests built from benchmark cases from --clients concurrent clients (every --stream-every-th one
streamed; a 429 is retried), and prints p50/p95 latency, time to first text, tokens/s, tokens per step and the trie
size. --check then decodes each distinct case alone with `generator.generate` and compares the texts: an answer that
differs is classified where it parts from the case decoded alone (lookahead.agreement: a near-tie of the dtype's
rounding, float32's included, or hard), and only hard ones fail.

    .venv/bin/python scripts/load_test.py --clients 16 --requests 128 --check [--dtype bfloat16]
    .venv/bin/python scripts/load_test.py --url http://127.0.0.1:8000 --api-key "$LOOKAHEAD_API_KEY"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from lookahead_server.app import ServeSettings, create_app
from lookahead_server.background import BackgroundServer
from lookahead_server.loadgen import Job, run_load

from lookahead.agreement import NEAR_TIE, classify_text
from lookahead.argtypes import positive_int
from lookahead.bench.cases import load_cases
from lookahead.config import LookaheadConfig
from lookahead.engine import LookaheadGenerator
from lookahead.models import load_model
from lookahead.prompts import case_messages


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="load an already running server instead of starting one here")
    p.add_argument("--api-key", default=None, help="bearer key for --url")
    p.add_argument("--model", default="default", help="model of the in-process server (default: the embedded one)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype of the in-process server's model")
    p.add_argument("--cases", default="rag_qa", help="case file or shipped name (rag_qa, summarize, open)")
    p.add_argument("--limit", type=positive_int, default=None, help="first N cases")
    p.add_argument("--clients", type=positive_int, default=16)
    p.add_argument("--requests", type=positive_int, default=128, help="requests in all (cases repeat)")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="default: each case's max_new_tokens")
    p.add_argument("--stream-every", type=int, default=2, help="every N-th request is streamed (0: none)")
    p.add_argument("--max-batch-size", type=positive_int, default=8)
    p.add_argument("--max-queue", type=positive_int, default=64)
    p.add_argument("--cost-cache", default=None, help="folder of cached cost curves (default: the engine's)")
    p.add_argument("--check", action="store_true", help="compare every answer with the case decoded alone")
    p.add_argument("--json", help="write the report (and every outcome) to this JSON file")
    return p.parse_args(argv)


def build_jobs(args: argparse.Namespace) -> tuple[list[Job], list[dict[str, Any]]]:
    cases = load_cases(args.cases, args.limit)
    jobs, used = [], []
    for i in range(args.requests):
        case = cases[i % len(cases)]
        body = {"messages": case_messages(case), "max_tokens": args.max_tokens or case["max_new_tokens"],
                "stream": bool(args.stream_every) and i % args.stream_every == 0}
        jobs.append(Job("/v1/chat/completions", body))
        used.append(case)
    return jobs, used


def scrape(url: str, api_key: str | None) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def check_answers(generator: LookaheadGenerator, jobs: list[Job], cases: list[dict[str, Any]],
                  outcomes: list[Any]) -> tuple[list[int], list[int]]:
    """Compare every successful answer with its case decoded alone; the indices of the answers that differ beyond
    the dtype's rounding (hard) and of those that differ only from a near-tie on."""
    alone: dict[str, tuple[list[int], list[int], str]] = {}  # case id -> prompt ids, token ids, text
    hard, ties = [], []
    for outcome, case in zip(outcomes, cases):
        body = jobs[outcome.index].body
        if case["id"] not in alone:
            prompt_ids = generator.encode(body["messages"])
            result = generator.generate(prompt_ids, max_new_tokens=body["max_tokens"])
            alone[case["id"]] = (prompt_ids, result.token_ids, result.text)
        prompt_ids, tokens, text = alone[case["id"]]
        if outcome.error is not None or outcome.text == text:
            continue
        verdict = classify_text(generator.model, lambda ids: generator.tokenizer.decode(ids, skip_special_tokens=True),
                                prompt_ids, outcome.text, tokens)
        (ties if verdict.kind == NEAR_TIE else hard).append(outcome.index)
    return hard, ties


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jobs, cases = build_jobs(args)
    server = generator = None
    url, api_key = args.url, args.api_key
    if url is None:
        print(f"loading {args.model} ...", file=sys.stderr)
        model, tokenizer = load_model(args.model, dtype=args.dtype)
        generator = LookaheadGenerator(model, tokenizer, LookaheadConfig(cost_cache=args.cost_cache))
        generator.budget  # noqa: B018 - measure (or load) the cost curve before timing anything
        app = create_app(generator, ServeSettings(model_name=args.model, max_batch_size=args.max_batch_size,
                                                  max_queue=args.max_queue))
        server = BackgroundServer(app).start()
        url = server.url
    try:
        before = scrape(url, api_key)
        print(f"{len(jobs)} requests from {args.clients} clients against {url} ...", file=sys.stderr)
        report = asyncio.run(run_load(url, jobs, clients=args.clients, api_key=api_key))
        after = scrape(url, api_key)
    finally:
        if server is not None:
            server.stop()
    tokens = after.get("lookahead_completion_tokens_total", 0) - before.get("lookahead_completion_tokens_total", 0)
    steps = after.get("lookahead_request_steps_total", 0) - before.get("lookahead_request_steps_total", 0)
    report.extra["tokens per step (this run, prefill included)"] = f"{tokens / steps:.2f}" if steps else "n/a"
    report.extra["trie nodes"] = int(after.get("lookahead_trie_nodes", 0))
    mismatches: list[int] = []  # hard: beyond the dtype's rounding
    near_ties: list[int] = []
    if args.check:
        if generator is None:
            print("--check needs the in-process server (no --url)", file=sys.stderr)
        else:
            t0 = time.perf_counter()
            mismatches, near_ties = check_answers(generator, jobs, cases, report.outcomes)
            dtype = str(generator.model.dtype).removeprefix("torch.")
            report.extra["check"] = (f"{len(report.ok) - len(mismatches) - len(near_ties)}/{len(report.ok)} answers "
                                     f"equal the case decoded alone, {len(near_ties)} up to a near-tie ({dtype} "
                                     f"rounding), {len(mismatches)} hard ({time.perf_counter() - t0:.0f}s)")
    print(report.summary())
    for outcome in report.errors[:5]:
        print(f"error in request {outcome.index}: {outcome.error}", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"summary": report.summary().splitlines(), "mismatches": mismatches, "near_ties": near_ties,
                       "outcomes": [o.__dict__ for o in report.outcomes]}, f, indent=1)
    return 1 if report.errors or mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
