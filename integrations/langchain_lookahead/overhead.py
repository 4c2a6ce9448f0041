"""Measure what the LangChain path adds to the engine: same prompts, same generator, text compared, time compared.

Each prompt is answered by :meth:`LookaheadGenerator.generate` and by ``ChatLookahead.invoke``, alternating which goes
first. The generator does not learn outputs here (``learn_outputs=False``), so both paths do the same work on every
call. Two figures come out:

- ``wall_overhead``: (LangChain wall time - engine wall time) / engine wall time, summed over all calls (includes
  the noise of a busy machine);
- ``added_overhead``: the time spent outside the engine's own decoding loop on the LangChain path minus the same on
  the direct path, relative to the engine's wall time: what the LangChain layer itself costs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lookahead.engine import LookaheadGenerator

from .chat_models import ChatLookahead


@dataclass
class OverheadResult:
    """Totals over every measured call (seconds)."""

    calls: int = 0
    engine_wall: float = 0.0
    langchain_wall: float = 0.0
    engine_outside: float = 0.0  # engine path: wall - time inside the decoding loop
    langchain_outside: float = 0.0  # LangChain path: wall - time inside the decoding loop
    identical: bool = True
    mismatches: list[int] = field(default_factory=list)

    @property
    def wall_overhead(self) -> float:
        return (self.langchain_wall - self.engine_wall) / self.engine_wall if self.engine_wall else 0.0

    @property
    def added_overhead(self) -> float:
        return (self.langchain_outside - self.engine_outside) / self.engine_wall if self.engine_wall else 0.0

    def format(self) -> str:
        return (f"{self.calls} calls per path: engine {self.engine_wall:.2f}s, LangChain {self.langchain_wall:.2f}s; "
                f"wall-clock difference {100 * self.wall_overhead:+.2f}%; time the LangChain layer adds outside the "
                f"decoding loop {100 * self.added_overhead:+.3f}% "
                f"({1000 * (self.langchain_outside - self.engine_outside) / max(self.calls, 1):.2f} ms per call); "
                f"text {'identical' if self.identical else 'DIFFERENT'}")


def measure_overhead(generator: LookaheadGenerator, prompts: Sequence[list[dict[str, str]]], max_new_tokens: int = 64,
                     rounds: int = 2) -> OverheadResult:
    """Answer every prompt ``rounds`` times by both paths (alternating order) and total the times.

    ``generator`` should be built with ``LookaheadConfig(learn_outputs=False)`` so that repeated calls cost the same.
    """
    chat = ChatLookahead(generator=generator, max_tokens=max_new_tokens)
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    kinds: dict[str, Any] = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
    result = OverheadResult()
    chat.invoke([HumanMessage("warm up")], max_tokens=4)  # first-call costs (callbacks, imports) are not per call
    for r in range(rounds):
        for i, messages in enumerate(prompts):
            lc_messages = [kinds[m["role"]](m["content"]) for m in messages]
            order = ("engine", "langchain") if (r + i) % 2 == 0 else ("langchain", "engine")
            texts: dict[str, str] = {}
            for path in order:
                start = time.perf_counter()
                if path == "engine":
                    out = generator.generate(messages, max_new_tokens=max_new_tokens)
                    wall = time.perf_counter() - start
                    texts[path] = out.text
                    result.engine_wall += wall
                    result.engine_outside += wall - out.stats.time_total
                else:
                    reply = chat.invoke(lc_messages)
                    wall = time.perf_counter() - start
                    texts[path] = reply.content
                    result.langchain_wall += wall
                    result.langchain_outside += wall - reply.response_metadata["stats"]["time_total"]
            result.calls += 1
            if texts["engine"] != texts["langchain"]:
                result.identical = False
                result.mismatches.append(i)
    return result
