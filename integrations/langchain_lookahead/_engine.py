"""Shared plumbing of the LangChain classes: a process-wide registry of loaded engines, message conversion, the plain
greedy baseline and the router that carries retrieved documents to the LLM call of the same chain run.

Models are loaded on the first generation, once per (model, dtype, device, knobs) in a process, and shared by every
LangChain object that names them, so the global trie of past outputs is shared across calls and across instances.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import torch

from lookahead import reference
from lookahead.config import LookaheadConfig
from lookahead.emitter import Emitter
from lookahead.engine import GenerationStats, LookaheadGenerator, StreamChunk
from lookahead.inputs import RequestOptions
from lookahead.models import load_model
from lookahead.multidraft import MultiDraftGenerator, MultiDraftResult
from lookahead.pacing import pace

__all__ = ["EngineHandle", "DocumentRouter", "get_engine", "register_engine", "clear_engines", "loaded_engines",
           "check_documents"]


@dataclass
class EngineHandle:
    """One loaded model with its lookahead generator. ``lock`` serialises requests: on a CPU the cores are already
    busy with one request, and the engine's draft budget learns from one request at a time."""

    name: str
    generator: LookaheadGenerator
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def tokenizer(self) -> Any:
        return self.generator.tokenizer

    @property
    def model(self) -> Any:
        return self.generator.model


_ENGINES: dict[tuple, EngineHandle] = {}
_ENGINES_LOCK = threading.Lock()


def _key(name: str, dtype: str, device: str | None, config: LookaheadConfig) -> tuple:
    return (name, dtype, device, tuple(sorted(config.to_dict().items())))


def get_engine(name: str, dtype: str, device: str | None, config: LookaheadConfig) -> EngineHandle:
    """The shared engine for these settings, loading the model on first use (once per process)."""
    key = _key(name, dtype, device, config)
    with _ENGINES_LOCK:
        handle = _ENGINES.get(key)
        if handle is None:
            model, tokenizer = load_model(name, dtype=dtype, device=device)
            handle = EngineHandle(name, LookaheadGenerator(model, tokenizer, config))
            _ENGINES[key] = handle
        return handle


def register_engine(generator: LookaheadGenerator, name: str | None = None) -> EngineHandle:
    """Wrap a prebuilt generator (not put in the registry: the caller owns it)."""
    if not isinstance(generator, LookaheadGenerator):
        raise TypeError(f"generator must be a lookahead.engine.LookaheadGenerator, got {type(generator).__name__}")
    if name is None:
        name = str(getattr(generator.model.config, "_name_or_path", "") or generator.model.config.model_type)
    return EngineHandle(name, generator)


def loaded_engines() -> list[str]:
    """The model names of the engines loaded in this process (one per name, dtype, device and settings)."""
    with _ENGINES_LOCK:
        return [handle.name for handle in _ENGINES.values()]


def clear_engines() -> None:
    """Forget every loaded engine (frees the models once nothing else holds them)."""
    with _ENGINES_LOCK:
        _ENGINES.clear()


def check_documents(documents: Any) -> list[str]:
    """Validate per-call ``documents=``: a list of strings (or LangChain ``Document`` objects)."""
    if documents is None:
        return []
    if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
        raise TypeError(f"documents must be a list of strings, got {type(documents).__name__}")
    texts = []
    for i, doc in enumerate(documents):
        text = getattr(doc, "page_content", doc)
        if not isinstance(text, str):
            raise TypeError(f"documents[{i}] must be a string or a Document, got {type(doc).__name__}")
        texts.append(text)
    return texts


# ---------------------------------------------------------------------------------------------------- generation


@dataclass
class Piece:
    """One accepted run of tokens as the LangChain classes see it (engine chunk or the baseline's single piece)."""

    text: str
    token_ids: list[int]
    accepted: int
    finish_reason: str | None = None
    stats: GenerationStats | None = None
    prompt_tokens: int = 0


def stream_pieces(handle: EngineHandle, prompt: Any, *, max_new_tokens: int, stop: Sequence[str] | None,
                  documents: Sequence[str], use_lookahead: bool = True, sampling: Mapping[str, Any] | None = None,
                  prediction: str | Sequence[int] | None = None, chunking: str | None = None) -> Iterator[Piece]:
    """Generate under the handle's lock, yielding one piece per accepted run (lookahead) or one piece (baseline);
    ``chunking`` (``token``, ``fixed:N``) re-cuts and paces the pieces (:func:`lookahead.pacing.pace`).

    ``sampling`` holds the engine's sampling keywords (``do_sample``, ``temperature``, ``top_p``, ``top_k``,
    ``seed``); empty or None decodes greedily. ``prediction`` (the expected output) is drafted first; the plain
    baseline drafts nothing and ignores it.

    The lock is released when the generator finishes or is closed (a consumer that stops early). A fault that ends
    the generation is raised by the engine after the pieces before it (never a shorter answer).
    """
    options = RequestOptions.of(max_new_tokens=max_new_tokens, stop=stop, documents=documents or None,
                                prediction=prediction, **dict(sampling or {}))
    generator = handle.generator
    handle.lock.acquire()
    try:
        if not use_lookahead:
            yield _plain_generate(handle, prompt, options)
            return
        prompt_ids = generator.encode(prompt)
        for chunk in pace(generator.stream(prompt_ids, options), chunking, generator.tokenizer, stop or ()):
            yield _piece(chunk, len(prompt_ids))
    finally:
        handle.lock.release()


def generate_n(handle: EngineHandle, prompt: Any, *, n: int, max_new_tokens: int, stop: Sequence[str] | None,
               documents: Sequence[str]) -> MultiDraftResult:
    """``n`` distinct completions under the handle's lock (multidraft tree method: the first is the greedy output)."""
    options = RequestOptions.of(max_new_tokens=max_new_tokens, stop=stop, documents=documents or None)
    with handle.lock:
        return MultiDraftGenerator(generator=handle.generator).generate(prompt, options, k=n)


def _piece(chunk: StreamChunk, prompt_tokens: int) -> Piece:
    return Piece(chunk.text, list(chunk.token_ids), chunk.accepted, chunk.finish_reason, chunk.stats, prompt_tokens)


def _plain_generate(handle: EngineHandle, prompt: Any, options: RequestOptions) -> Piece:
    """Plain Hugging Face ``generate`` (no drafts): the baseline the lookahead path must match exactly in float32
    (greedy; in half precision up to the first near-tie), or match in distribution and, with the same seed, token
    for token (sampling).

    Stops like the engine does (its :class:`~lookahead.emitter.Emitter` says where and why): at EOS, after
    ``max_new_tokens``, or as soon as the decoded text contains a stop string (the text is cut before it).
    """
    generator = handle.generator
    model, tokenizer = generator.model, generator.tokenizer
    prompt_ids = generator.encode(prompt)
    special = generator.inputs.special_ids(options.eos_token_id)
    params = options.sampling
    chosen = {name: getattr(params, name) for name in ("temperature", "top_k", "top_p", "repetition_penalty")
              if getattr(params, name) is not None}
    decode = dict(stop=options.stop, tokenizer=tokenizer, **special.generate_kwargs(), **chosen)
    start = time.perf_counter()
    if params.do_sample:
        # HF draws from the global generator: seeded here, restored afterwards
        with torch.random.fork_rng(devices=[] if model.device.type == "cpu" else [model.device]):
            token_ids = reference.sample(model, prompt_ids, options.max_new_tokens, seed=params.seed, **decode)
    else:
        token_ids = reference.greedy(model, prompt_ids, options.max_new_tokens, **decode)
    seconds = time.perf_counter() - start
    text, finish = Emitter(tokenizer, special.eos, options.stop, options.max_new_tokens).settle(token_ids)
    stats = GenerationStats(prompt_tokens=len(prompt_ids), new_tokens=len(token_ids), steps=len(token_ids),
                            time_total=seconds)
    return Piece(text, token_ids, 0, finish, stats, len(prompt_ids))


def drafting_metadata(stats: GenerationStats) -> dict[str, Any]:
    """What a response's metadata says about predicted outputs and provenance: the prediction's accepted and rejected
    draft tokens, and per document of the call the accepted draft tokens copied from it with their spans (output
    token offsets)."""
    return {"accepted_prediction_tokens": stats.accepted_prediction_tokens,
            "rejected_prediction_tokens": stats.rejected_prediction_tokens,
            "provenance": [use.to_dict() for use in stats.provenance]}


# ---------------------------------------------------------------------------------------------------- routing


@dataclass
class _Retrieval:
    texts: list[str]
    created: float


class DocumentRouter:
    """Carries documents a :class:`LookaheadRetriever` returned to the LLM call of the same chain run.

    A retrieval is filed under the run id of the retriever's parent chain. An LLM call takes the documents filed
    under its own parent run (``retriever | prompt | llm``: both are steps of one sequence), else those of recent
    retrievals whose text occurs in its prompt (the retriever sits in a nested branch, e.g. ``{"context": retriever |
    format_docs, ...} | prompt | llm``). Entries are kept until ``max_entries`` newer ones push them out or
    ``ttl`` seconds pass, so several LLM calls of one run (map-reduce) all get them. Routing only shapes drafts: a
    document that reaches the wrong request costs speed, never correctness.
    """

    def __init__(self, max_entries: int = 64, ttl: float = 600.0) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._entries: OrderedDict[Any, _Retrieval] = OrderedDict()
        self._lock = threading.Lock()

    def file(self, run_key: UUID | str | None, texts: Sequence[str]) -> None:
        """Remember ``texts`` retrieved in the run ``run_key`` (None: a retrieval outside any chain)."""
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        if not texts:
            return
        key = run_key if run_key is not None else object()  # unkeyed retrievals are found by content only
        with self._lock:
            self._expire()
            entry = self._entries.pop(key, None)
            if entry is not None:
                texts = entry.texts + [t for t in texts if t not in entry.texts]
            self._entries[key] = _Retrieval(list(texts), time.monotonic())
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def take(self, run_key: UUID | str | None, prompt_text: str) -> list[str]:
        """Documents for an LLM call whose parent run is ``run_key`` and whose prompt is ``prompt_text``."""
        with self._lock:
            self._expire()
            if not self._entries:
                return []
            if run_key is not None and run_key in self._entries:
                return list(self._entries[run_key].texts)
            found: list[str] = []
            for entry in reversed(self._entries.values()):
                if any(_probe(t) in prompt_text for t in entry.texts):
                    found.extend(t for t in entry.texts if t not in found)
            return found

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if now - entry.created <= self.ttl:
                break
            del self._entries[key]


def _probe(text: str, length: int = 120) -> str:
    """A stretch of a document to look for in a prompt (prompts often strip or reflow the ends)."""
    stripped = text.strip()
    if len(stripped) <= length:
        return stripped
    middle = len(stripped) // 2
    return stripped[middle - length // 2: middle + length // 2]
