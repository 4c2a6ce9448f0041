"""Summarizing one text with the engine: in one request, or map-reduce over chunks when it is too long."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..agreement import classify
from ..inputs import check_positive_int
from ..reference import greedy
from .chunking import split_text
from .prompts import combine_messages, summary_messages

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..engine import GenerationResult, LookaheadGenerator


@dataclass
class RequestStats:
    """One generation request (a whole document, a chunk, or a combine step)."""

    kind: str  # "single", "map" or "reduce"
    prompt_tokens: int
    new_tokens: int
    steps: int
    seconds: float
    estimated_plain_seconds: float  # prefill + one 1-token pass per further new token, from the cost curve
    baseline_seconds: float | None = None  # measured plain HF greedy generate (--baseline)
    exact: bool | None = None  # token-for-token equal to the baseline (--baseline)
    mismatch: str | None = None  # when not exact: "near-tie" or "hard" (lookahead.agreement; float32: always hard)


class Summarizer:
    """Summarize texts with a :class:`~lookahead.engine.LookaheadGenerator`, map-reduce for long ones.

    Args:
        generator: the engine (its global trie keeps learning from every summary).
        max_new_tokens: most tokens per summary (and per partial summary).
        chunk_tokens: longest text (in tokens) summarized in one request.
        baseline: also run plain HF greedy ``generate`` on every request, to measure the speedup and check that
            the outputs are identical (doubles the time); in half precision an output that is not is classified as
            a near-tie or a hard mismatch (docs/architecture.md: what lossless means per dtype).
    """

    def __init__(self, generator: LookaheadGenerator, max_new_tokens: int = 160, chunk_tokens: int = 1024,
                 baseline: bool = False) -> None:
        check_positive_int("max_new_tokens", max_new_tokens)
        if not isinstance(chunk_tokens, int) or chunk_tokens < 16:
            raise ValueError(f"chunk_tokens must be an integer >= 16, got {chunk_tokens!r}")
        self.generator = generator
        self.max_new_tokens = max_new_tokens
        self.chunk_tokens = chunk_tokens
        self.baseline = baseline
        self._pass_seconds: float | None = None

    def settings(self) -> dict[str, Any]:
        """What a finished summary depends on (a record with other settings is redone)."""
        cfg = self.generator.model.config
        return {"model": str(getattr(cfg, "_name_or_path", "")), "model_type": cfg.model_type,
                "max_new_tokens": self.max_new_tokens, "chunk_tokens": self.chunk_tokens}

    def count_tokens(self, text: str) -> int:
        return len(self.generator.tokenizer(text, add_special_tokens=False)["input_ids"])

    def split(self, text: str) -> list[str]:
        tok = self.generator.tokenizer
        return split_text(text, self.count_tokens, self.chunk_tokens,
                          encode=lambda s: tok(s, add_special_tokens=False)["input_ids"],
                          decode=lambda ids: tok.decode(ids, skip_special_tokens=True))

    def _one_pass_seconds(self) -> float:
        if self._pass_seconds is None:
            self._pass_seconds = self.generator.budget.cost.cost(1)
        return self._pass_seconds

    def _generate(self, kind: str, messages: list[dict[str, str]], documents: Sequence[str] | None
                  ) -> tuple[str, RequestStats]:
        generator = self.generator
        prompt_ids = generator.encode(messages)
        result: GenerationResult = generator.generate(prompt_ids, max_new_tokens=self.max_new_tokens,
                                                      documents=list(documents) if documents else None)
        if result.finish_reason == "error":  # a fault: never write a summary cut short
            raise RuntimeError(f"the {kind} request failed: {result.error}")
        s = result.stats
        estimate = s.time_prefill + max(0, s.new_tokens - 1) * self._one_pass_seconds()
        stats = RequestStats(kind, s.prompt_tokens, s.new_tokens, s.steps, s.time_total, estimate)
        if self.baseline:
            special = generator.inputs.special_ids()  # the EOS and pad ids the engine stops at
            start = time.perf_counter()
            plain = greedy(generator.model, prompt_ids, self.max_new_tokens, **special.generate_kwargs())
            stats.baseline_seconds = time.perf_counter() - start
            stats.exact = plain == result.token_ids
            if not stats.exact:
                stats.mismatch = classify(generator.model, prompt_ids, result.token_ids, plain).kind
        return result.text.strip(), stats

    def summarize(self, text: str) -> tuple[str, int, list[RequestStats]]:
        """Summary of ``text``, the number of chunks it was split into, and the stats of every request."""
        chunks = self.split(text)
        if len(chunks) <= 1:
            summary, stats = self._generate("single", summary_messages(text), None)
            return summary, 1, [stats]
        requests: list[RequestStats] = []
        partials = []
        for chunk in chunks:
            partial, stats = self._generate("map", summary_messages(chunk), None)
            partials.append(partial)
            requests.append(stats)
        while True:  # reduce until the partial summaries fit in one request
            groups = self._group(partials)
            if len(groups) == 1:  # the last combine: the original chunks seed its trie, so drafts copy the source
                summary, stats = self._generate("reduce", combine_messages(groups[0]), chunks)
                requests.append(stats)
                return summary, len(chunks), requests
            merged = []
            for group in groups:
                partial, stats = self._generate("reduce", combine_messages(group), None)
                merged.append(partial)
                requests.append(stats)
            if len(merged) >= len(partials):  # cannot shrink further: combine what there is
                partials = merged[:1]
            else:
                partials = merged

    def _group(self, partials: list[str]) -> list[list[str]]:
        """Consecutive partial summaries packed into groups of at most ``chunk_tokens`` tokens."""
        groups: list[list[str]] = [[]]
        used = 0
        for partial in partials:
            n = self.count_tokens(partial) + 8
            if groups[-1] and used + n > self.chunk_tokens:
                groups.append([])
                used = 0
            groups[-1].append(partial)
            used += n
        return groups
