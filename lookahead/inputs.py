"""From what a caller passes to a validated :class:`~lookahead.outputs.Request`: prompt encoding, EOS defaults,
and the one set of argument checks every decoder uses (clear errors, before any model work)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .outputs import Prompt, Request
from .sampling import SamplingParams


def check_positive_int(name: str, value: object) -> int:
    """``value`` if it is an integer >= 1 (not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value!r}")
    return value


def check_stop(stop: Sequence[str] | None) -> tuple[str, ...]:
    """Stop strings as a tuple; a bare string or a non-string item is a TypeError."""
    if stop is None:
        return ()
    if isinstance(stop, str) or not all(isinstance(s, str) for s in stop):
        raise TypeError("stop must be a list of strings")
    return tuple(stop)


def check_documents(documents: Sequence[str] | None) -> list[str]:
    """Documents as a list of strings; anything else is a TypeError naming the bad item."""
    if documents is None:
        return []
    if isinstance(documents, str) or not isinstance(documents, Sequence):
        raise TypeError(f"documents must be a list of strings, got {type(documents).__name__}")
    for i, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise TypeError(f"documents[{i}] must be a string, got {type(doc).__name__}")
    return list(documents)


def check_document_names(names: Sequence[str | None] | None, count: int) -> tuple[str | None, ...]:
    """One name (or None) per document, as a tuple; a wrong count or a non-string name is an error."""
    if names is None:
        return (None,) * count
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"document_names must be a list of strings (or None items), got {type(names).__name__}")
    if len(names) != count:
        raise ValueError(f"got {len(names)} document_names for {count} documents: give one per document")
    for i, name in enumerate(names):
        if name is not None and not isinstance(name, str):
            raise TypeError(f"document_names[{i}] must be a string or None, got {type(name).__name__}")
    return tuple(names)


def prompt_texts(prompt: Prompt) -> list[str]:
    """The text a prompt was written in: the string itself, or each chat message's content (none for token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        return [m["content"] for m in prompt if isinstance(m.get("content"), str)]
    return []


def in_prompt(document: str, texts: Sequence[str]) -> bool:
    """True when ``document`` (its surrounding whitespace aside) occurs verbatim in one of ``texts``: its windows
    reach the trie with the prompt's already."""
    needle = document.strip()
    return bool(needle) and any(needle in text for text in texts)


def is_prompt_list(prompt: Any) -> bool:
    """True when ``prompt`` is a list of prompts (strings, message lists or id lists), not one prompt."""
    if isinstance(prompt, (str, torch.Tensor)) or not isinstance(prompt, Sequence) or not prompt:
        return False
    first = prompt[0]
    return isinstance(first, str) or (isinstance(first, Sequence) and not isinstance(first, dict))


class InputEncoder:
    """Encodes prompts with a tokenizer and prepares requests for a model of ``vocab_size`` tokens whose context
    holds ``max_context`` positions (None: unbounded)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, generation_config: Any = None,
                 max_context: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.generation_config = generation_config
        self.max_context = max_context

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: a string, chat messages (rendered with the chat template) or token ids."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("prompt is empty: pass a non-empty string, chat messages or token ids")
            return list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() == 2 and prompt.shape[0] == 1:
                prompt = prompt[0]
            if prompt.dim() != 1 or prompt.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"a tensor prompt must be 1-D (or [1, n]) integer token ids, got shape "
                                 f"{tuple(prompt.shape)} dtype {prompt.dtype}")
            prompt = prompt.tolist()
        if isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
            items = list(prompt)
            if not items:
                raise ValueError("prompt is empty: pass a non-empty string, chat messages or token ids")
            if all(isinstance(m, dict) for m in items):
                return self.encode_messages(items)
            if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
                bad = [t for t in items if not 0 <= t < self.vocab_size]
                if bad:
                    raise ValueError(f"token ids must be in 0..{self.vocab_size - 1}, got {bad[:5]}")
                return items
        raise TypeError(
            "prompt must be a string, a list of chat messages ({'role': ..., 'content': ...}) or a list of token ids, "
            f"got {type(prompt).__name__}"
        )

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """Chat messages through the tokenizer's chat template, with the generation prompt."""
        for i, m in enumerate(messages):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"chat message {i} needs string 'role' and 'content' keys, got {m!r}")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template: pass a plain string prompt or token ids")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def encode_document(self, text: str) -> list[int]:
        """Token ids of a document's text, without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_prediction(self, prediction: str | Sequence[int] | None) -> tuple[int, ...]:
        """Token ids of a predicted output: a text (encoded without special tokens) or token ids."""
        if prediction is None:
            return ()
        if isinstance(prediction, str):
            return tuple(self.encode_document(prediction))
        if isinstance(prediction, torch.Tensor):
            prediction = prediction.flatten().tolist()
        if isinstance(prediction, Sequence) and all(isinstance(t, int) and not isinstance(t, bool)
                                                    for t in prediction):
            bad = [t for t in prediction if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prediction token ids must be in 0..{self.vocab_size - 1}, got {bad[:5]}")
            return tuple(prediction)
        raise TypeError(f"prediction must be a string or a list of token ids, got {type(prediction).__name__}")

    def eos_ids(self, eos_token_id: int | Sequence[int] | None) -> frozenset[int]:
        """The EOS set: the given id(s), else the model's generation config, else the tokenizer's."""
        if eos_token_id is None:
            eos_token_id = getattr(self.generation_config, "eos_token_id", None)
            if eos_token_id is None:
                eos_token_id = self.tokenizer.eos_token_id
        if eos_token_id is None:
            return frozenset()
        if isinstance(eos_token_id, int):
            return frozenset({eos_token_id})
        return frozenset(int(t) for t in eos_token_id)

    def prepare(self, prompt: Prompt, *, max_new_tokens: int = 128, eos_token_id: int | Sequence[int] | None = None,
                stop: Sequence[str] | None = None, documents: Sequence[str] | None = None,
                sampling: SamplingParams | None = None, prediction: str | Sequence[int] | None = None,
                trie: Any = None, document_names: Sequence[str | None] | None = None) -> Request:
        """Validate and encode one request (no model work). Raises ValueError / TypeError saying what is wrong.

        ``prediction`` (a text or token ids) is what the output is expected to be, mostly: it is drafted first (an
        edit's original text). ``trie`` (a :class:`~lookahead.trie.TokenTrie`) is the trie this request drafts
        from instead of the generator's. ``document_names`` name the documents in the result's provenance.

        ``documents`` are all kept in the request's ``documents``; ``document_ids`` (what seeds the request-local
        trie) leaves out those whose text occurs verbatim in the prompt (a string prompt, a chat message's content,
        or the decoded text of a prompt of token ids), whose windows the prompt's insertion counts already: a RAG
        prompt that quotes its retrieved documents and also passes them as ``documents=`` inserts each once.
        """
        check_positive_int("max_new_tokens", max_new_tokens)
        stops = check_stop(stop)
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a lookahead.sampling.SamplingParams, got {type(sampling).__name__}")
        docs = check_documents(documents)
        names = check_document_names(document_names, len(docs))
        prediction_ids = self.encode_prediction(prediction)
        prompt_ids = self.encode(prompt)
        if self.max_context is not None:
            if len(prompt_ids) >= self.max_context:
                raise ValueError(f"prompt has {len(prompt_ids)} tokens; the model's context is {self.max_context} "
                                 "tokens")
            max_new_tokens = min(max_new_tokens, self.max_context - len(prompt_ids))
        sources = tuple(tuple(self.encode_document(d)) for d in docs)
        resolved = (sampling or SamplingParams()).resolved(self.generation_config)
        return Request(request_id=uuid.uuid4().hex, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens,
                       eos=self.eos_ids(eos_token_id), stop=stops, documents=tuple(docs), sampling=resolved,
                       document_ids=self.document_ids(docs, prompt, prompt_ids, sources),
                       prediction_ids=prediction_ids, trie=trie, source_ids=sources, source_names=names)

    def document_ids(self, documents: Sequence[str], prompt: Prompt, prompt_ids: Sequence[int],
                     encoded: Sequence[tuple[int, ...]] | None = None) -> tuple[tuple[int, ...], ...]:
        """Token ids of each document whose text does not occur in the prompt (see :func:`in_prompt`): the prompt
        as written, or, for a prompt of token ids, its decoded text. ``encoded`` holds the documents' ids already
        (else they are encoded here)."""
        if not documents:
            return ()
        if encoded is None:
            encoded = [tuple(self.encode_document(d)) for d in documents]
        texts = prompt_texts(prompt) or [self.tokenizer.decode(list(prompt_ids), clean_up_tokenization_spaces=False)]
        return tuple(ids for d, ids in zip(documents, encoded) if not in_prompt(d, texts))
