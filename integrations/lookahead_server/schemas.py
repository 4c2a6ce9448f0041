"""Request bodies of the OpenAI-compatible endpoints: strict pydantic models (unknown fields and wrong types refused).

OpenAI fields this server cannot honour are accepted only with their neutral value (``n: 1``, ``echo: false``,
``presence_penalty: 0`` ...), so clients that always send them keep working and a request that asks for more gets a
clear 400 instead of a silently different answer.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .documents import ID_RULE, check_document_id

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    """``stream_options``: ``include_usage`` adds a last chunk with token counts (``choices`` empty)."""

    include_usage: bool = False


class TextPart(_Strict):
    """One part of a message's (or a prediction's) content; only text parts are supported."""

    type: Literal["text"]
    text: str


class Prediction(_Strict):
    """``prediction``: OpenAI's Predicted Outputs, the text the answer is expected to be mostly (an edit's original
    text). It is drafted first; the answer never depends on it, only its speed."""

    type: Literal["content"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _GenerationRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    documents: list[str] | None = Field(default=None, description="texts that seed this request's local trie")
    document_ids: list[str] | None = Field(default=None, description="a name per document, for provenance")
    prediction: Prediction | None = None
    user: str | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("max_tokens")
    @classmethod
    def _positive_max_tokens(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {value}")
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
        for s in stops:
            if not s:
                raise ValueError("stop strings must not be empty")
            if len(s) > MAX_STOP_LENGTH:
                raise ValueError(f"stop strings must be at most {MAX_STOP_LENGTH} characters, got {len(s)}")
        return value

    @field_validator("temperature")
    @classmethod
    def _check_temperature(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= 2.0:
            raise ValueError(f"temperature must be in [0, 2] (0: greedy), got {value}")
        return value

    @field_validator("top_p")
    @classmethod
    def _check_top_p(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {value}")
        return value

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value < 2**63:
            raise ValueError(f"seed must be an integer in 0..2**63-1, got {value}")
        return value

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError(f"n must be 1: this server returns one choice per request, got {value}")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value not in (None, 0, 0.0):
            raise ValueError(f"presence_penalty and frequency_penalty are not supported: only 0 is allowed, "
                             f"got {value}")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported: only null or {} is allowed")
        return value

    @model_validator(mode="after")
    def _one_name_per_document(self) -> _GenerationRequest:
        if self.document_ids is not None and len(self.document_ids) != len(self.documents or []):
            raise ValueError(f"got {len(self.document_ids)} document_ids for {len(self.documents or [])} documents: "
                             f"give one per document")
        return self

    @property
    def prediction_text(self) -> str | None:
        return self.prediction.text() if self.prediction is not None else None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions: ``prompt`` is raw text (no chat template), or a list holding one string."""

    prompt: str | list[str]
    echo: bool | None = False
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError(f"prompt must be a string or a list of exactly one string, got a list of {len(value)}")
        text = value if isinstance(value, str) else value[0]
        if not text.strip():
            raise ValueError("prompt is empty: send some text")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("echo is not supported: only false is allowed")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError(f"best_of must be 1: this server returns one choice per request, got {value}")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("logprobs is not supported: only null is allowed")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported: only null or an empty string is allowed")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ChatMessage(_Strict):
    """A chat message; ``developer`` is rendered as ``system``. Tool calls and images are not supported."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def to_template(self) -> dict[str, str]:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions: messages are rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None

    @field_validator("max_completion_tokens")
    @classmethod
    def _positive_max_completion_tokens(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"max_completion_tokens must be a positive integer, got {value}")
        return value

    @field_validator("messages")
    @classmethod
    def _some_text(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.text().strip() for m in value):
            raise ValueError("every message is empty: send at least one message with text")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs is not supported: only false is allowed")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("top_logprobs is not supported: only null is allowed")
        return value

    @model_validator(mode="after")
    def _one_max(self) -> ChatCompletionRequest:
        a, b = self.max_tokens, self.max_completion_tokens
        if a is not None and b is not None and a != b:
            raise ValueError(f"max_tokens ({a}) and max_completion_tokens ({b}) disagree: send one of them")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    def template_messages(self) -> list[dict[str, str]]:
        return [m.to_template() for m in self.messages]


class DocumentsRequest(_Strict):
    """POST /v1/documents: texts inserted into the shared (global) trie of the request's tenant. A bare JSON list of
    strings also works. With ``ids`` (one per document) each document can be deleted again
    (``DELETE /v1/documents/{id}``); sending an id again replaces its document."""

    documents: list[str] = Field(min_length=1)
    ids: list[str] | None = None

    @field_validator("documents")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        for i, doc in enumerate(value):
            if not doc.strip():
                raise ValueError(f"documents[{i}] is empty")
        return value

    @field_validator("ids")
    @classmethod
    def _check_ids(cls, value: list[str] | None) -> list[str] | None:
        for i, doc_id in enumerate(value or []):
            try:
                check_document_id(doc_id)
            except ValueError as error:
                raise ValueError(f"ids[{i}]: {error}") from None
        if value is not None and len(set(value)) != len(value):
            raise ValueError("ids must be unique within one request")
        return value

    @model_validator(mode="after")
    def _one_id_each(self) -> DocumentsRequest:
        if self.ids is not None and len(self.ids) != len(self.documents):
            raise ValueError(f"got {len(self.ids)} ids for {len(self.documents)} documents: give one id per document")
        return self


#: what each field accepts, for error messages
EXPECTED: dict[str, str] = {
    "model": "a string (the served model's id, see /v1/models)",
    "prompt": "a non-empty string (or a list of exactly one string)",
    "messages": "a non-empty list of {\"role\": \"system\"|\"developer\"|\"user\"|\"assistant\", \"content\": string}",
    "role": "one of system, developer, user, assistant",
    "content": "a string or a list of {\"type\": \"text\", \"text\": string} parts",
    "name": "a string",
    "type": "\"text\" (a content part) or \"content\" (a prediction)",
    "text": "a string",
    "max_tokens": "a positive integer",
    "max_completion_tokens": "a positive integer",
    "stop": f"a string or a list of at most {MAX_STOP_STRINGS} strings",
    "temperature": "a number in [0, 2] (0: greedy)",
    "top_p": "a number in (0, 1]",
    "seed": "an integer in 0..2**63-1",
    "stream": "true or false",
    "stream_options": "{\"include_usage\": true|false}",
    "include_usage": "true or false",
    "n": "1",
    "documents": "a list of strings",
    "document_ids": "a list of strings, one per document (names them in the response's provenance)",
    "prediction": "{\"type\": \"content\", \"content\": a string or a list of {\"type\": \"text\", \"text\": string} "
                  "parts}",
    "ids": f"a list of unique document ids, one per document ({ID_RULE})",
    "user": "a string",
    "presence_penalty": "0",
    "frequency_penalty": "0",
    "logit_bias": "null or {}",
    "echo": "false",
    "best_of": "1",
    "logprobs": "null or false",
    "top_logprobs": "null",
    "suffix": "null",
}

#: the model whose fields appear under a parent field (for 'unknown field' messages on nested objects)
NESTED: dict[str, type[BaseModel]] = {"messages": ChatMessage, "content": TextPart, "stream_options": StreamOptions,
                                      "prediction": Prediction}


def field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def all_field_names() -> set[str]:
    names: set[str] = set()
    for model in (CompletionRequest, ChatCompletionRequest, DocumentsRequest, *NESTED.values()):
        names.update(model.model_fields)
    return names


def as_documents_body(data: Any) -> Any:
    """A bare JSON list of strings is shorthand for ``{"documents": [...]}``."""
    return {"documents": data} if isinstance(data, list) else data
