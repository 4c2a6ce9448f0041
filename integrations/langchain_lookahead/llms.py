"""``LookaheadLLM``: a LangChain text LLM on the lookahead engine."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from ._base import LookaheadParams
from ._engine import Piece, drafting_metadata, generate_n, stream_pieces


class LookaheadLLM(LookaheadParams, BaseLLM):
    """Lossless lookahead decoding as a LangChain LLM (string in, string out).

    ``invoke``, ``batch``, ``stream``, ``ainvoke`` and ``astream`` all work; the text is exactly what calling
    :meth:`lookahead.engine.LookaheadGenerator.generate` on the same prompt returns. Per call: ``stop=[...]`` cuts the
    output right before the first stop string, ``documents=[...]`` seeds the request-local trie, ``max_new_tokens``
    overrides the limit, ``temperature``/``top_p``/``top_k``/``seed`` sample losslessly (temperature > 0).
    ``run_manager.on_llm_new_token`` fires once per accepted run of tokens, with
    ``generation_info={"accepted": n, "token_ids": [...]}``.

    Example:
        ```python
        from langchain_lookahead import LookaheadLLM

        llm = LookaheadLLM(max_new_tokens=64)  # nothing loaded yet
        print(llm.invoke("What is a trie?", documents=["A trie is a prefix tree ..."]))
        ```
    """

    chat_template: bool | None = None
    """Render the prompt as one user message with the tokenizer's chat template: True, False (raw completion), or
    None (when the tokenizer has a template)."""

    @property
    def _llm_type(self) -> str:
        return "lookahead"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._params()

    def _prompt(self, prompt: str, tokenizer: Any) -> Any:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        use_template = self.chat_template
        if use_template is None:
            use_template = bool(getattr(tokenizer, "chat_template", None))
        return [{"role": "user", "content": prompt}] if use_template else prompt

    def _pieces(self, prompt: str, stop: list[str] | None, run_manager: CallbackManagerForLLMRun | None,
                kwargs: dict[str, Any], paced: bool = False) -> Iterator[tuple[Piece, GenerationChunk]]:
        parent = run_manager.parent_run_id if run_manager else None
        handle, limit, stops, documents = self._request(stop, kwargs, parent, prompt)
        for piece in stream_pieces(handle, self._prompt(prompt, handle.tokenizer), max_new_tokens=limit, stop=stops,
                                   documents=documents, use_lookahead=self.use_lookahead,
                                   sampling=self.sampling(kwargs), prediction=kwargs.get("prediction"),
                                   chunking=kwargs.get("stream_chunk", self.stream_chunk) if paced else None):
            info: dict[str, Any] = {"accepted": piece.accepted, "token_ids": piece.token_ids}
            if piece.finish_reason is not None:
                info["finish_reason"] = piece.finish_reason
                info["model_name"] = kwargs.get("model") or self.model_name
                if piece.stats is not None:
                    info["stats"] = piece.stats.to_dict()
                    info.update(drafting_metadata(piece.stats))
            chunk = GenerationChunk(text=piece.text, generation_info=info)
            if run_manager:
                run_manager.on_llm_new_token(piece.text, chunk=chunk)
            yield piece, chunk

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        generations = []
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        n = self._completions(kwargs)
        for prompt in prompts:
            if n > 1:
                generations.append(self._n_generations(prompt, n, stop, run_manager, kwargs, usage))
                continue
            texts, last = [], None
            for piece, _ in self._pieces(prompt, stop, run_manager, kwargs):
                texts.append(piece.text)
                last = piece
            assert last is not None and last.stats is not None
            info = {"finish_reason": last.finish_reason, "stats": last.stats.to_dict(),
                    "model_name": kwargs.get("model") or self.model_name, **drafting_metadata(last.stats)}
            generations.append([Generation(text="".join(texts), generation_info=info)])
            usage["prompt_tokens"] += last.stats.prompt_tokens
            usage["completion_tokens"] += last.stats.new_tokens
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return LLMResult(generations=generations, llm_output={"token_usage": usage, "model_name": self.model_name})

    def _n_generations(self, prompt: str, n: int, stop: list[str] | None,
                       run_manager: CallbackManagerForLLMRun | None, kwargs: dict[str, Any], usage: dict[str, int]
                       ) -> list[Generation]:
        """``n`` distinct completions of one prompt: the greedy output first, then by model log-probability."""
        parent = run_manager.parent_run_id if run_manager else None
        handle, limit, stops, documents = self._request(stop, kwargs, parent, prompt)
        result = generate_n(handle, self._prompt(prompt, handle.tokenizer), n=n, max_new_tokens=limit, stop=stops,
                            documents=documents)
        usage["prompt_tokens"] += result.stats.prompt_tokens
        usage["completion_tokens"] += sum(len(c.token_ids) for c in result.completions)
        model_name = kwargs.get("model") or self.model_name
        return [Generation(text=c.text, generation_info={
            "finish_reason": c.finish_reason, "logprob": c.logprob, "mean_logprob": c.mean_logprob,
            "token_ids": c.token_ids, "model_name": model_name, "stats": result.stats.to_dict()})
            for c in result.completions]

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        if self._completions(kwargs) > 1:
            raise ValueError("streaming yields one completion: call invoke/generate for n > 1")
        for _, chunk in self._pieces(prompt, stop, run_manager, kwargs, paced=True):
            yield chunk
