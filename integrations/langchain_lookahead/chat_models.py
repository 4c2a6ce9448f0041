"""``ChatLookahead``: a thin LangChain chat model on the lookahead engine."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from ._base import LookaheadParams
from ._engine import Piece, drafting_metadata, generate_n, stream_pieces


def _text_content(message: BaseMessage, index: int) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"message {index} has a {kind!r} content block: ChatLookahead takes text content only")
    return "".join(parts)


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages -> ``{"role", "content"}`` dicts for the tokenizer's chat template."""
    if not messages:
        raise ValueError("no messages: pass at least one message")
    out = []
    for i, message in enumerate(messages):
        if isinstance(message, SystemMessage):
            role = "system"
        elif isinstance(message, HumanMessage):
            role = "user"
        elif isinstance(message, AIMessage):
            role = "assistant"
        elif isinstance(message, ToolMessage):
            role = "tool"
        elif isinstance(message, ChatMessage):
            role = message.role
        else:
            raise ValueError(f"message {i}: unsupported message type {type(message).__name__}")
        out.append({"role": role, "content": _text_content(message, i)})
    return out


def _usage(input_tokens: int, output_tokens: int) -> UsageMetadata:
    return UsageMetadata(input_tokens=input_tokens, output_tokens=output_tokens,
                         total_tokens=input_tokens + output_tokens)


class ChatLookahead(LookaheadParams, BaseChatModel):
    """Lossless lookahead decoding as a LangChain chat model.

    Messages are rendered with the tokenizer's chat template and handed to the engine, so the reply is exactly what
    :meth:`lookahead.engine.LookaheadGenerator.generate` (and plain greedy decoding) gives for them. Replies carry
    ``usage_metadata`` (prompt and new token counts) and ``response_metadata`` with ``model_name``,
    ``finish_reason`` and the engine's stats. Streaming yields one chunk per accepted run of tokens. Per call:
    ``stop``, ``documents`` (seed the request-local trie), ``max_new_tokens``/``max_tokens``, ``model``, and the
    sampling settings ``temperature``, ``top_p``, ``top_k``, ``seed`` (temperature > 0 samples losslessly).

    Example:
        ```python
        from langchain_lookahead import ChatLookahead

        chat = ChatLookahead(max_tokens=128)  # nothing is loaded until the first call
        for chunk in chat.stream("Explain tries in two sentences."):
            print(chunk.content, end="")
        ```
    """

    @property
    def _llm_type(self) -> str:
        return "lookahead-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._params()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "lookahead"
        model = kwargs.get("model")
        params["ls_model_name"] = model if isinstance(model, str) else self.model_name
        limit = kwargs.get("max_tokens", kwargs.get("max_new_tokens", self.max_new_tokens))
        if isinstance(limit, int):
            params["ls_max_tokens"] = limit
        return params

    def _pieces(self, messages: list[BaseMessage], stop: list[str] | None,
                run_manager: CallbackManagerForLLMRun | None, kwargs: dict[str, Any], paced: bool = False
                ) -> Iterator[Piece]:
        chat = to_chat_messages(messages)
        parent = run_manager.parent_run_id if run_manager else None
        prompt_text = "\n".join(m["content"] for m in chat)
        handle, limit, stops, documents = self._request(stop, kwargs, parent, prompt_text)
        yield from stream_pieces(handle, chat, max_new_tokens=limit, stop=stops, documents=documents,
                                 use_lookahead=self.use_lookahead, sampling=self.sampling(kwargs),
                                 prediction=kwargs.get("prediction"),
                                 chunking=kwargs.get("stream_chunk", self.stream_chunk) if paced else None)

    def _metadata(self, piece: Piece, kwargs: dict[str, Any]) -> dict[str, Any]:
        data: dict[str, Any] = {"model_name": kwargs.get("model") or self.model_name,
                                "finish_reason": piece.finish_reason}
        if piece.stats is not None:
            data["stats"] = piece.stats.to_dict()
            data.update(drafting_metadata(piece.stats))
        return data

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        n = self._completions(kwargs)
        if n > 1:
            return self._generate_n(messages, n, stop, run_manager, kwargs)
        texts, last = [], None
        for piece in self._pieces(messages, stop, run_manager, kwargs):
            texts.append(piece.text)
            if run_manager:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece.text),
                                            generation_info={"accepted": piece.accepted, "token_ids": piece.token_ids})
                run_manager.on_llm_new_token(piece.text, chunk=chunk)
            last = piece
        assert last is not None and last.stats is not None
        metadata = self._metadata(last, kwargs)
        message = AIMessage(content="".join(texts), usage_metadata=_usage(last.prompt_tokens, last.stats.new_tokens),
                            response_metadata=metadata)
        return ChatResult(generations=[ChatGeneration(message=message)],
                          llm_output={"model_name": metadata["model_name"]})

    def _generate_n(self, messages: list[BaseMessage], n: int, stop: list[str] | None,
                    run_manager: CallbackManagerForLLMRun | None, kwargs: dict[str, Any]) -> ChatResult:
        """``n`` distinct replies: the greedy reply first, then the others by model log-probability."""
        chat = to_chat_messages(messages)
        parent = run_manager.parent_run_id if run_manager else None
        handle, limit, stops, documents = self._request(stop, kwargs, parent, "\n".join(m["content"] for m in chat))
        result = generate_n(handle, chat, n=n, max_new_tokens=limit, stop=stops, documents=documents)
        model_name = kwargs.get("model") or self.model_name
        generations = [
            ChatGeneration(message=AIMessage(
                content=c.text, usage_metadata=_usage(result.stats.prompt_tokens, len(c.token_ids)),
                response_metadata={"model_name": model_name, "finish_reason": c.finish_reason, "logprob": c.logprob,
                                   "mean_logprob": c.mean_logprob, "stats": result.stats.to_dict()}))
            for c in result.completions
        ]
        return ChatResult(generations=generations, llm_output={"model_name": model_name})

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        if self._completions(kwargs) > 1:
            raise ValueError("streaming yields one reply: call invoke/generate for n > 1")
        # LangChain's stream() reports each chunk to run_manager.on_llm_new_token itself.
        for piece in self._pieces(messages, stop, run_manager, kwargs, paced=True):
            last = piece.finish_reason is not None
            message = AIMessageChunk(
                content=piece.text,
                usage_metadata=_usage(piece.prompt_tokens if last else 0, len(piece.token_ids)),
                response_metadata=self._metadata(piece, kwargs) if last else {},
                chunk_position="last" if last else None,
            )
            yield ChatGenerationChunk(message=message, generation_info={"accepted": piece.accepted})
