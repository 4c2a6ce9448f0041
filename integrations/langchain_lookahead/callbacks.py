"""``LookaheadStatsHandler``: collect the engine stats of every lookahead call in a chain run."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.outputs import LLMResult


class LookaheadStatsHandler(BaseCallbackHandler):
    """Keeps ``stats`` (tokens per step, draft sizes, times ...) of each :class:`ChatLookahead` / :class:`LookaheadLLM`
    call it sees: ``chain.invoke(x, config={"callbacks": [handler]})`` then ``handler.last["tokens_per_step"]``."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    @property
    def last(self) -> dict[str, Any] | None:
        return self.calls[-1] if self.calls else None

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        for generations in response.generations:
            for generation in generations:
                message = getattr(generation, "message", None)
                metadata = getattr(message, "response_metadata", None) or generation.generation_info or {}
                stats = metadata.get("stats")
                if isinstance(stats, dict):
                    self.calls.append(stats)
