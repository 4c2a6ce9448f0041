"""Helpers for the server tests: a tiny generator with a chat template, gated/slow schedulers, a live uvicorn server
on a free loopback port and an SSE parser."""

from __future__ import annotations

import copy
import functools
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from conftest import make_generator, make_tokenizer
from lookahead_server.background import BackgroundServer

from lookahead.engine import LookaheadGenerator
from lookahead.scheduler import Scheduler

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@functools.cache
def chat_tokenizer() -> Any:
    """The tiny tokenizer of conftest plus a chat template (a copy: the cached one is shared)."""
    tok = copy.deepcopy(make_tokenizer())
    tok.chat_template = CHAT_TEMPLATE
    return tok


def new_generator(seed: int = 0) -> LookaheadGenerator:
    """A fresh tiny llama generator (own trie) with a flat cost curve."""
    return make_generator(seed=seed, tokenizer=chat_tokenizer())


class _Proxy:
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __len__(self) -> int:
        return len(self._inner)


class SlowBatch(_Proxy):
    """A batch whose steps wait for ``gate`` (an Event) and then sleep ``delay`` seconds."""

    def __init__(self, inner: Any, gate: threading.Event | None, delay: float) -> None:
        super().__init__(inner)
        self._gate = gate
        self._delay = delay

    def step(self) -> Any:
        if self._gate is not None:
            self._gate.wait()
        if self._delay:
            time.sleep(self._delay)
        return self._inner.step()


class SlowGenerator(_Proxy):
    """A generator proxy whose batches are :class:`SlowBatch` es."""

    def __init__(self, inner: Any, gate: threading.Event | None = None, delay: float = 0.0) -> None:
        super().__init__(inner)
        self._gate = gate
        self._delay = delay

    def new_batch(self) -> Any:
        return SlowBatch(self._inner.new_batch(), self._gate, self._delay)


def slow_factory(gate: threading.Event | None = None, delay: float = 0.0) -> Callable[..., Scheduler]:
    """A ``scheduler_factory`` whose decoding waits for ``gate`` and sleeps ``delay`` per step."""

    def factory(generator: LookaheadGenerator, settings: Any) -> Scheduler:
        return Scheduler(SlowGenerator(generator, gate, delay), max_batch_size=settings.max_batch_size,
                         max_queue=settings.max_queue, max_kv_bytes=settings.max_kv_bytes)

    return factory


def sse_events(text: str) -> list[Any]:
    """The ``data:`` payloads of a server-sent-events body (JSON decoded; ``[DONE]`` kept as the string)."""
    events = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def stream_text(events: list[Any], chat: bool) -> str:
    parts = []
    for e in events:
        if isinstance(e, dict) and e.get("choices"):
            choice = e["choices"][0]
            parts.append((choice["delta"].get("content") or "") if chat else choice["text"])
    return "".join(parts)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class LiveServer(BackgroundServer):
    """The package's background uvicorn server on a free loopback port."""
