"""From what a caller passes to a validated :class:`~lookahead.outputs.Request`: one :class:`RequestOptions` per
request (the one set of argument checks every decoder and adapter uses: clear errors, before any model work), prompt
encoding, and the EOS and pad ids every decoder and every plain-HF baseline stop at."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .budget import DraftBudget
from .outputs import Prompt, Request
from .sampling import SamplingParams
from .store import DraftStore
from .trie import TokenTrie


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


def check_trie(trie: Any) -> None:
    """A TypeError unless ``trie`` is None, a :class:`~lookahead.store.DraftStore` or the oracle TokenTrie."""
    if trie is not None and not isinstance(trie, (DraftStore, TokenTrie)):
        raise TypeError(f"trie must be a lookahead.store.DraftStore (or the oracle lookahead.trie.TokenTrie) or "
                        f"None, got {type(trie).__name__}")


class RequestTooLargeError(ValueError):
    """A request whose prompt, prediction and documents hold more tokens than its ``max_request_tokens``: the
    message names the limit and what was counted (``counted``: tokens per part; ``partial``: counting stopped
    early, the request has at least that many)."""

    def __init__(self, limit: int, counted: dict[str, int], partial: bool) -> None:
        self.limit, self.counted, self.partial = limit, dict(counted), partial
        total = sum(counted.values())
        parts = " + ".join(f"{name} {n}" for name, n in counted.items())
        super().__init__(f"the request holds {'at least ' if partial else ''}{total} tokens ({parts}), more than "
                         f"max_request_tokens={limit} allows for its prompt, prediction and documents together; send "
                         f"fewer or shorter documents, or raise the limit")


#: a text much longer than the tokens left for it is refused from a prefix of this many characters per token left
_PREFIX_CHARS = 16
_PREFIX_SLACK = 16  # tokens a prefix cut at a space may have beyond its share of the whole text's


#: the keywords that set fields of :class:`~lookahead.sampling.SamplingParams` (``do_sample``, ``temperature``, ...)
SAMPLING_KEYWORDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


@dataclass(frozen=True)
class RequestOptions:
    """What one request asks for besides its prompt, checked once on construction (ValueError / TypeError).

    Every entry point (``LookaheadGenerator.generate`` / ``stream`` / ``prepare``, ``Scheduler.submit``, the
    adapters) takes one of these or builds it from its keywords with :meth:`of`, and the prepared
    :class:`~lookahead.outputs.Request` carries it as ``options``: a new per-request option is one field here and
    its check in ``__post_init__``.

    Attributes:
        max_new_tokens: most new tokens (>= 1), as in HF ``generate``.
        eos_token_id: token id(s) that end generation (None: the model's generation config, else the tokenizer's).
        stop: strings that end generation; the text is cut before the first one.
        documents: texts whose tokens seed the request-local trie (retrieved documents).
        document_names: an id (or None) per document, naming them in the result's provenance (None: none named).
        sampling: how tokens are chosen; unset fields come from the model's generation config.
        prediction: the expected output (a text or token ids), drafted first; output never depends on it.
        trie: the :class:`~lookahead.store.DraftStore` the request drafts from and learns into (None: the
            generator's own).
        derived_from: the store source ids its answer is learned as derived from: removing any of them
            (:meth:`~lookahead.store.DraftStore.remove_source`) removes the answer too (None: ``document_names``).
        budget: the :class:`~lookahead.budget.DraftBudget` that ranks its drafts and learns from them (None: the
            generator's; a tenant's own keeps its acceptance statistics apart; every budget of a batch must share
            the generator's cost model).
        max_request_tokens: most tokens of the prompt, the prediction and the documents together (None: no limit);
            past it :meth:`InputEncoder.prepare` raises :class:`RequestTooLargeError` (a long text is refused from
            a prefix, without tokenizing all of it).
    """

    max_new_tokens: int = 128
    eos_token_id: int | tuple[int, ...] | None = None
    stop: tuple[str, ...] = ()
    documents: tuple[str, ...] = ()
    document_names: tuple[str | None, ...] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prediction: str | Sequence[int] | None = None
    trie: Any = None
    derived_from: tuple[str, ...] | None = None
    budget: Any = None
    max_request_tokens: int | None = None

    def __post_init__(self) -> None:
        check_trie(self.trie)
        if self.max_request_tokens is not None:
            check_positive_int("max_request_tokens", self.max_request_tokens)
        if self.derived_from is not None:
            if isinstance(self.derived_from, str) or not all(isinstance(s, str) and s for s in self.derived_from):
                raise TypeError(f"derived_from must be a sequence of non-empty source ids (str), got "
                                f"{self.derived_from!r}")
            self._set("derived_from", tuple(self.derived_from))
        if self.budget is not None and not isinstance(self.budget, DraftBudget):
            raise TypeError(f"budget must be a lookahead.budget.DraftBudget or None, got {type(self.budget).__name__}")
        check_positive_int("max_new_tokens", self.max_new_tokens)
        self._set("stop", check_stop(self.stop))
        if self.sampling is None:
            self._set("sampling", SamplingParams())
        elif not isinstance(self.sampling, SamplingParams):
            raise TypeError(f"sampling must be a lookahead.sampling.SamplingParams, got "
                            f"{type(self.sampling).__name__}")
        self._set("documents", tuple(check_documents(self.documents)))
        if self.document_names is not None:
            self._set("document_names", check_document_names(self.document_names, len(self.documents)))
        if self.eos_token_id is not None and not isinstance(self.eos_token_id, int):
            self._set("eos_token_id", tuple(int(t) for t in self.eos_token_id))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # normalising a frozen instance while it is built

    @property
    def names(self) -> tuple[str | None, ...]:
        """One name (or None) per document."""
        return self.document_names if self.document_names is not None else (None,) * len(self.documents)

    @classmethod
    def of(cls, options: RequestOptions | None = None, **keywords: Any) -> RequestOptions:
        """``options`` (None: the defaults) with ``keywords`` replacing its fields; the sampling keywords
        (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``seed``) replace fields of
        its ``sampling``. An unknown keyword is a TypeError naming the ones a request takes."""
        if options is not None and not isinstance(options, RequestOptions):
            raise TypeError(f"options must be a lookahead.inputs.RequestOptions, got {type(options).__name__}")
        base = options if options is not None else cls()
        unknown = sorted(set(keywords) - set(SAMPLING_KEYWORDS) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unexpected request option(s) {', '.join(unknown)}; a request takes "
                            f"{', '.join(f.name for f in dataclasses.fields(cls))} and {', '.join(SAMPLING_KEYWORDS)}")
        sampling = {k: keywords.pop(k) for k in SAMPLING_KEYWORDS if k in keywords}
        if sampling:
            keywords["sampling"] = dataclasses.replace(keywords.get("sampling") or base.sampling, **sampling)
        if options is None:  # one validation pass
            return cls(**keywords)
        return dataclasses.replace(base, **keywords) if keywords else base


def eos_token_ids(eos_token_id: int | Sequence[int] | None, generation_config: Any,
                  tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The EOS ids in their configured order: the given id(s), else the generation config's, else the tokenizer's
    (none known: empty)."""
    if eos_token_id is None:
        eos_token_id = getattr(generation_config, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, int):
        return (eos_token_id,)
    return tuple(int(t) for t in eos_token_id)


@dataclass(frozen=True)
class SpecialIds:
    """The EOS ids (in their configured order) and the pad id a request stops and pads with."""

    eos: tuple[int, ...]
    pad: int | None  # the given pad id, else the first EOS id (None: neither is known)

    def generate_kwargs(self) -> dict[str, Any]:
        """``eos_token_id`` and ``pad_token_id`` for :mod:`lookahead.reference` (None: HF's own defaults)."""
        return {"eos_token_id": list(self.eos) or None, "pad_token_id": self.pad}


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

    def _encode_within(self, text: str, limit: int, counted: dict[str, int], part: str) -> list[int]:
        """Token ids of ``text`` (as :meth:`encode_document`), added to ``counted[part]``; a RequestTooLargeError
        once the counts pass ``limit``. A text of more than ``_PREFIX_CHARS`` characters per token left is first
        measured by a prefix of that many (cut at a space): one whose prefix alone does not fit is refused without
        tokenizing the rest."""
        room = limit - sum(counted.values())
        cut = _PREFIX_CHARS * max(room, 0) + 1
        if len(text) > cut:
            space = text.rfind(" ", 0, cut)
            head = len(self.encode_document(text[:space if space > 0 else cut]))
            if head > room + _PREFIX_SLACK:
                raise RequestTooLargeError(limit, {**counted, part: counted.get(part, 0) + head}, True)
        ids = self.encode_document(text)
        counted[part] = counted.get(part, 0) + len(ids)
        if len(ids) > room:  # what follows is not counted
            raise RequestTooLargeError(limit, counted, True)
        return ids

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
        return frozenset(eos_token_ids(eos_token_id, self.generation_config, self.tokenizer))

    def special_ids(self, eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None
                    ) -> SpecialIds:
        """The EOS ids (as :meth:`eos_ids`, in order) and the pad id (``pad_token_id``, else the first EOS id) a
        request stops and pads with: the one place plain-HF baselines take them from."""
        eos = eos_token_ids(eos_token_id, self.generation_config, self.tokenizer)
        return SpecialIds(eos, pad_token_id if pad_token_id is not None else (eos[0] if eos else None))

    def prepare(self, prompt: Prompt, options: RequestOptions | None = None, **keywords: Any) -> Request:
        """Validate and encode one request (no model work). Raises ValueError / TypeError saying what is wrong.

        ``options`` (or the ``keywords`` of :meth:`RequestOptions.of`, replacing its fields) say what the request
        asks for; the returned request carries them as ``options``.

        ``documents`` are all kept in the request's ``documents``; ``document_ids`` (what seeds the request-local
        trie) leaves out those whose text occurs verbatim in the prompt (a string prompt, a chat message's content,
        or the decoded text of a prompt of token ids), whose windows the prompt's insertion counts already: a RAG
        prompt that quotes its retrieved documents and also passes them as ``documents=`` inserts each once.
        """
        options = RequestOptions.of(options, **keywords)
        limit = options.max_request_tokens
        counted: dict[str, int] = {}
        if limit is not None and isinstance(options.prediction, str):  # a long text refused before all is tokenized
            prediction_ids = tuple(self._encode_within(options.prediction, limit, counted, "prediction"))
        else:
            prediction_ids = self.encode_prediction(options.prediction)
        if self.max_context is not None and len(prediction_ids) > self.max_context:
            raise ValueError(f"prediction has {len(prediction_ids)} tokens; the model's context is {self.max_context} "
                             f"tokens, so no answer can be that long: send at most {self.max_context}")
        prompt_ids = self.encode(prompt)
        max_new_tokens = options.max_new_tokens
        if self.max_context is not None:
            if len(prompt_ids) >= self.max_context:
                raise ValueError(f"prompt has {len(prompt_ids)} tokens; the model's context is {self.max_context} "
                                 "tokens")
            max_new_tokens = min(max_new_tokens, self.max_context - len(prompt_ids))
        docs = options.documents
        if limit is None:
            sources = tuple(tuple(self.encode_document(d)) for d in docs)
        else:
            counted = {"prompt": len(prompt_ids), "prediction": len(prediction_ids)}
            if sum(counted.values()) > limit:
                raise RequestTooLargeError(limit, counted, False)
            counted["documents"] = 0  # counted one by one: the first document past the limit stops the count
            sources = tuple(tuple(self._encode_within(d, limit, counted, "documents")) for d in docs)
        return Request(request_id=uuid.uuid4().hex, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens,
                       eos=self.eos_ids(options.eos_token_id), stop=options.stop, documents=docs,
                       sampling=options.sampling.resolved(self.generation_config),
                       document_ids=self.document_ids(docs, prompt, prompt_ids, sources),
                       prediction_ids=prediction_ids, trie=options.trie, source_ids=sources,
                       source_names=options.names, options=options)

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
