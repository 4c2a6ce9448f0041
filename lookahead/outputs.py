"""The types below the decoding loop: a prepared request, its stats, stream chunks and the joined result.

Nothing here runs a model; every decoder (the batch loop, the ensemble, multidraft) produces these, and every
consumer (the facade, the scheduler, the adapters) reads them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Union

import torch

from .provenance import DocumentUse
from .sampling import SamplingParams

Message = dict[str, str]
Prompt = Union[str, Sequence[Message], Sequence[int], torch.Tensor]  # noqa: UP007 (a runtime alias)


@dataclass(frozen=True)
class Request:
    """A validated request, ready to decode (see :meth:`lookahead.inputs.InputEncoder.prepare`)."""

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int  # already capped by the model's context
    eos: frozenset[int]
    stop: tuple[str, ...]
    documents: tuple[str, ...]
    sampling: SamplingParams  # resolved against the model's generation config
    document_ids: tuple[tuple[int, ...], ...] = ()  # token ids of ``documents`` (no special tokens)
    prediction_ids: tuple[int, ...] = ()  # the predicted output's token ids (drafted first; see Drafter)
    trie: Any = None  # a lookahead.trie.TokenTrie this request drafts from (None: the generator's own trie)
    source_ids: tuple[tuple[int, ...], ...] = ()  # token ids of every document, in order (for provenance)
    source_names: tuple[str | None, ...] = ()  # an id per document (None: known by its index), for provenance
    options: Any = None  # the lookahead.inputs.RequestOptions it was prepared from (as asked: not capped, unresolved)

    @property
    def derived_from(self) -> tuple[str, ...]:
        """The store sources its answer is learned as derived from (``options.derived_from``, else its named
        documents)."""
        chosen = getattr(self.options, "derived_from", None)
        return tuple(chosen) if chosen is not None else tuple(n for n in self.source_names if n)


@dataclass
class GenerationStats:
    """What one request cost and how well drafting worked. Times are seconds."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0  # forward passes, the prefill included
    draft_sizes: list[int] = field(default_factory=list)  # draft nodes verified per decoding step
    accepted_lengths: list[int] = field(default_factory=list)  # draft tokens accepted per decoding step
    accepted_prediction_tokens: int = 0  # draft tokens from the prediction that were accepted
    rejected_prediction_tokens: int = 0  # draft tokens from the prediction that were verified and not accepted
    provenance: list[DocumentUse] = field(default_factory=list)  # per document: accepted draft tokens copied from it
    time_prefill: float = 0.0
    time_trie: float = 0.0
    time_forward: float = 0.0  # model passes (prefill and tree passes)
    time_other: float = 0.0  # host work outside the model and the trie (trees, acceptance, compaction, emitting)
    time_total: float = 0.0

    @property
    def host_seconds_per_step(self) -> float:
        """Host time outside the model forward (trie work included) per decoding step, the prefill excluded."""
        decoding = self.steps - 1
        return (self.time_trie + self.time_other) / decoding if decoding > 0 else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.time_total if self.time_total > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(tokens_per_step=self.tokens_per_step, tokens_per_second=self.tokens_per_second,
                    host_seconds_per_step=self.host_seconds_per_step)
        return data


@dataclass
class GenerationResult:
    """Decoded text (stop string and what follows removed), new token ids and stats of one request."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "eos", "stop" (a stop string), "length", or "error" (a fault ended it: see ``error``)
    stats: GenerationStats
    error: str | None = None  # with finish_reason "error": what went wrong (the text is cut short there)


@dataclass
class StreamChunk:
    """One accepted run of tokens. ``text`` is the new text it adds (may lag to hold back a partial stop)."""

    token_ids: list[int]
    text: str
    accepted: int  # draft tokens accepted in the step that produced this run
    finish_reason: str | None = None
    stats: GenerationStats | None = None  # set on the last chunk
    source: str | None = None  # the document its accepted draft tokens were copied from (its id, or doc:<index>)
    error: str | None = None  # with finish_reason "error": what failed (the request ends without its answer)
    plain_seconds: float | None = None  # the cost model's seconds of a pass without drafts (see Batch)
    exception: BaseException | None = field(default=None, repr=False, compare=False)  # the fault itself


def collect_chunks(chunks: Iterable[StreamChunk]) -> GenerationResult:
    """Join a request's stream into one result."""
    items = list(chunks)
    last = items[-1]
    assert last.stats is not None and last.finish_reason is not None
    return GenerationResult(text="".join(c.text for c in items), token_ids=[t for c in items for t in c.token_ids],
                            finish_reason=last.finish_reason, stats=last.stats, error=last.error)
