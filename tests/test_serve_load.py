"""Bounded load test of the live server on a tiny model: 16 concurrent clients, 128 requests (completions and chat,
streamed and not, some with documents), a small queue so that some requests get 429 and retry. Every answer must
equal the same request decoded alone, and nothing may fail but the intended 429s."""

from __future__ import annotations

import asyncio

import pytest
from lookahead_server.app import ServeSettings, create_app
from lookahead_server.loadgen import Job, run_load
from serve_utils import LiveServer, new_generator

pytestmark = pytest.mark.usefixtures("single_thread")

CLIENTS = 16
REQUESTS = 128
MAX_TOKENS = 16
QUESTIONS = [f"Question {i}: what does the trie draft when the context is {w}?"
             for i, w in enumerate(["empty", "long", "repeated", "new", "short", "odd", "warm", "cold"])]
DOCS = ["The trie drafts what followed the same tokens before.", "Longer matches give longer drafts."]


def _jobs() -> list[tuple[Job, object]]:
    """(job, the prompt the reference decodes); prompts repeat, so later requests hit a warm trie."""
    out = []
    for i in range(REQUESTS):
        question = QUESTIONS[i % len(QUESTIONS)]
        body = {"max_tokens": MAX_TOKENS, "stream": i % 3 == 0}
        if i % 5 == 0:
            body["documents"] = DOCS
        if i % 2:
            messages = [{"role": "user", "content": question}]
            out.append((Job("/v1/chat/completions", {"messages": messages, **body}), messages))
        else:
            out.append((Job("/v1/completions", {"prompt": question, **body}), question))
    return out


def test_load_16_clients_every_answer_exact():
    reference = new_generator()
    jobs = _jobs()
    expected = {}
    for _, prompt in jobs:
        key = repr(prompt)
        if key not in expected:
            expected[key] = reference.generate(prompt, max_new_tokens=MAX_TOKENS).text
    generator = new_generator()
    app = create_app(generator, ServeSettings(max_batch_size=4, max_queue=8))
    with LiveServer(app) as server:
        report = asyncio.run(asyncio.wait_for(run_load(server.url, [j for j, _ in jobs], clients=CLIENTS), 600))
        stats = app.state.service.scheduler.stats
        health_trie = len(generator.trie)
    print("\n" + report.summary())
    assert not report.errors, [o.error for o in report.errors][:5]
    mismatched = [o.index for o in report.outcomes if o.text != expected[repr(jobs[o.index][1])]]
    assert not mismatched, f"{len(mismatched)} answers differ from the single-request answer: {mismatched[:10]}"
    assert all(o.completion_tokens > 0 for o in report.outcomes)
    assert stats.requests_finished == REQUESTS and stats.requests_failed == 0 and stats.requests_cancelled == 0
    assert stats.requests_rejected == report.rejected  # every 429 the clients saw was a full queue
    assert health_trie > 0
