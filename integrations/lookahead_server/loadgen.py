"""A small load generator for the server: N concurrent clients send a list of requests (streamed or not), retrying
on 429, and report latency percentiles, throughput and every answer's text (to check it against single requests).

Used by ``tests/test_serve_load.py`` (tiny model) and ``scripts/load_test.py`` (the real default model).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Job:
    """One request: ``path`` is ``/v1/completions`` or ``/v1/chat/completions``; ``body`` its JSON body."""

    path: str
    body: dict[str, Any]


@dataclass
class Outcome:
    """What one job got. ``status`` is the final HTTP status (after 429 retries); ``error`` is set on failure."""

    index: int
    status: int = 0
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    latency: float = 0.0  # seconds from the accepted attempt's send to its last byte
    first_token: float | None = None  # streamed: seconds to the first text
    rejected: int = 0  # 429 answers before it was accepted
    error: str | None = None


@dataclass
class LoadReport:
    outcomes: list[Outcome]
    wall: float
    clients: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is None]

    @property
    def errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is not None]

    @property
    def rejected(self) -> int:
        return sum(o.rejected for o in self.outcomes)

    @property
    def completion_tokens(self) -> int:
        return sum(o.completion_tokens for o in self.ok)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.wall if self.wall > 0 else 0.0

    def latency(self, q: float) -> float:
        return percentile([o.latency for o in self.ok], q)

    def first_token(self, q: float) -> float:
        return percentile([o.first_token for o in self.ok if o.first_token is not None], q)

    def summary(self) -> str:
        lines = [
            f"requests: {len(self.outcomes)} ({len(self.ok)} ok, {len(self.errors)} failed, {self.rejected} x 429 "
            f"retried) from {self.clients} concurrent clients in {self.wall:.1f}s",
            f"latency: p50 {self.latency(50):.2f}s  p95 {self.latency(95):.2f}s  max {self.latency(100):.2f}s",
            f"time to first text (streamed): p50 {self.first_token(50):.2f}s  p95 {self.first_token(95):.2f}s",
            f"throughput: {self.completion_tokens} completion tokens, {self.tokens_per_second:.1f} tokens/s",
        ]
        lines += [f"{k}: {v}" for k, v in self.extra.items()]
        return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


async def _send(client: Any, job: Job, outcome: Outcome) -> tuple[int, dict[str, Any] | None]:
    """One attempt; returns the status and, for errors, the error body."""
    chat = job.path.endswith("/chat/completions")
    body = dict(job.body)
    start = time.perf_counter()
    if not body.get("stream"):
        r = await client.post(job.path, json=body)
        if r.status_code != 200:
            return r.status_code, _error_body(r.text)
        data = r.json()
        choice = data["choices"][0]
        outcome.text = choice["message"]["content"] if chat else choice["text"]
        outcome.finish_reason = choice["finish_reason"]
        outcome.completion_tokens = data["usage"]["completion_tokens"]
        outcome.latency = time.perf_counter() - start
        return 200, None
    body.setdefault("stream_options", {"include_usage": True})
    parts: list[str] = []
    async with client.stream("POST", job.path, json=body) as r:
        if r.status_code != 200:
            return r.status_code, _error_body((await r.aread()).decode("utf-8", "replace"))
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return 500, event
            if event.get("usage"):
                outcome.completion_tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                piece = (choice["delta"].get("content") or "") if chat else choice.get("text", "")
                if piece and outcome.first_token is None:
                    outcome.first_token = time.perf_counter() - start
                parts.append(piece)
                outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason
    outcome.text = "".join(parts)
    outcome.latency = time.perf_counter() - start
    return 200, None


def _error_body(text: str) -> dict[str, Any]:
    try:
        return json.loads(text)
    except ValueError:
        return {"error": {"message": text[:500]}}


async def run_load(base_url: str, jobs: list[Job], clients: int = 16, api_key: str | None = None,
                   timeout: float = 600.0, max_retries: int = 1000, backoff: float = 0.05, seed: int = 0
                   ) -> LoadReport:
    """Send ``jobs`` from ``clients`` concurrent connections; a 429 is retried after a short jittered pause."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    outcomes = [Outcome(i) for i in range(len(jobs))]
    pending = iter(range(len(jobs)))
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker(client: Any) -> None:
        for i in pending:
            outcome = outcomes[i]
            for _ in range(max_retries + 1):
                try:
                    status, error = await _send(client, jobs[i], outcome)
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    status, error = 0, {"error": {"message": f"{type(e).__name__}: {e}"}}
                outcome.status = status
                if status != 429:
                    break
                outcome.rejected += 1
                await asyncio.sleep(backoff * (0.5 + rng.random()))
            if outcome.status != 200:
                outcome.error = json.dumps(error)[:500] if error else f"HTTP {outcome.status}"

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return LoadReport(outcomes, time.perf_counter() - start, clients)
