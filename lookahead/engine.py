"""The public facade: :class:`LookaheadGenerator` (``generate``, ``stream``) over the decoding loop.

The generator owns what requests share: the model runner, the trie of past outputs and the draft budget (its cost
curve is measured once, or read from the cache). Each request is validated by :class:`~lookahead.inputs.InputEncoder`
into a :class:`~lookahead.outputs.Request` and decoded by a :class:`~lookahead.batch.Batch` (a batch of one for a
single request), drafting through its own :class:`~lookahead.drafter.Drafter`.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .batch import Batch
from .budget import CostCurve, CostModel, DraftBudget, cached_cost_curve, cost_cache_key
from .config import LookaheadConfig
from .drafter import Drafter, DraftSource, new_trie
from .inputs import InputEncoder, RequestOptions, check_positive_int, is_prompt_list
from .outputs import GenerationResult, GenerationStats, Message, Prompt, Request, StreamChunk, collect_chunks
from .runner import (
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_ATTENTION,
    ModelRunner,
    check_model,
    cost_grid,
    cost_model_grid,
    measure_cost_model,
    time_tree_passes,
)
from .store import DraftStore

__all__ = [
    "SUPPORTED_ARCHITECTURES", "SUPPORTED_ATTENTION", "GenerationResult", "GenerationStats", "LookaheadGenerator",
    "Message", "Prompt", "Request", "RequestOptions", "StreamChunk", "check_model", "collect_chunks",
]


def per_prompt_predictions(prediction: Sequence[str | Sequence[int] | None] | None, prompts: int
                           ) -> list[str | Sequence[int] | None]:
    """The prediction of each of ``prompts`` prompts: None for all, else a list of one per prompt."""
    if prediction is None:
        return [None] * prompts
    if isinstance(prediction, str) or not isinstance(prediction, Sequence) or len(prediction) != prompts or any(
            isinstance(p, int) for p in prediction):
        raise ValueError(f"for a list of {prompts} prompts, prediction must be a list of {prompts} predictions (a "
                         f"text, token ids or None each)")
    return list(prediction)


class LookaheadGenerator:
    """Lossless trie-drafted decoding on a stock Hugging Face causal LM.

    One generator holds the model, a shared :class:`~lookahead.store.DraftStore` (request-local entries for prompts
    and documents, global entries for past outputs) and the adaptive draft budget. ``generate`` and ``stream``
    follow the keyword names of HF ``generate``; in float32, greedy output is identical to
    ``model.generate(do_sample=False)`` token for token.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 config: LookaheadConfig | None = None, trie: DraftSource | None = None,
                 cost_curve: CostCurve | CostModel | None = None) -> None:
        self.config = config or LookaheadConfig()
        self.runner = ModelRunner(model, skinny=self.config.skinny_matmul)  # refuses unverified models first
        self.model = model
        self.tokenizer = tokenizer
        self.trie = trie if trie is not None else self.empty_trie()  # an empty store is falsy: kept all the same
        self.device = self.runner.device
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self.inputs = InputEncoder(tokenizer, int(model.config.vocab_size), getattr(model, "generation_config", None),
                                   self.max_context)
        self._cost_curve = cost_curve
        self._budget: DraftBudget | None = None
        self._budget_lock = threading.Lock()

    def empty_trie(self) -> DraftSource:
        """A new empty trie with this generator's knobs (assign it to ``self.trie`` to forget all past outputs)."""
        return new_trie(self.config)

    # ------------------------------------------------------------------ cost model and drafting

    @property
    def budget(self) -> DraftBudget:
        """The adaptive draft budget; the cost curve is measured (or read from cache) on first use."""
        with self._budget_lock:
            if self._budget is None:
                cost = self._cost_curve or self.measure_cost_model()
                self._budget = DraftBudget(cost, self.config.decoding_length, adaptive=self.config.adaptive)
            return self._budget

    def measure_cost_curve(self, prefix_length: int = 384, use_cache: bool = True) -> CostCurve:
        """Time tree passes of 1..64 tokens after a ``prefix_length`` prefix; cached per model/device/threads."""
        cfg = self.model.config
        sizes, prefix_length = cost_grid(self.config.decoding_length, prefix_length, self.max_context)

        def measure() -> CostCurve:
            return time_tree_passes([self.runner], sizes, prefix_length, repeats=5)

        if not use_cache:
            return measure()
        key = cost_cache_key(
            getattr(cfg, "_name_or_path", ""), cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers,
            int(cfg.vocab_size), self.model.dtype, self.device, torch.get_num_threads(), sizes, prefix_length,
            torch.__version__, "tree-v5", self.config.skinny_matmul,
        )
        return cached_cost_curve(key, measure, self.config.cost_cache)

    def measure_cost_model(self, use_cache: bool = True) -> CostModel:
        """Time tree passes over a grid of contexts and batch sizes (:func:`lookahead.runner.cost_model_grid`);
        cached per model, dtype, device (and its name), attention implementation, thread count and library
        versions."""
        cfg = self.model.config

        def measure() -> CostModel:
            return measure_cost_model([self.runner], self.config.decoding_length, self.max_context)

        if not use_cache:
            return measure()
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
        key = cost_cache_key(
            getattr(cfg, "_name_or_path", ""), cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers,
            int(cfg.vocab_size), self.model.dtype, self.device, device_name, getattr(cfg, "_attn_implementation", ""),
            torch.get_num_threads(), cost_model_grid(self.config.decoding_length, self.max_context),
            torch.__version__, transformers.__version__, "model-v2", self.config.skinny_matmul,
        )
        return cached_cost_curve(key, measure, self.config.cost_cache)

    def new_drafter(self, request_id: str | None = None, trie: DraftSource | None = None,
                    budget: DraftBudget | None = None) -> Drafter:
        """A drafter for one request over ``trie`` (None: this generator's current trie) and ``budget`` (None: this
        generator's)."""
        return Drafter(trie if trie is not None else self.trie, budget if budget is not None else self.budget,
                       self.config, request_id)

    # ------------------------------------------------------------------ inputs

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: a string, chat messages (rendered with the chat template) or token ids."""
        return self.inputs.encode(prompt)

    def prepare(self, prompt: Prompt, options: RequestOptions | None = None, **keywords: Any) -> Request:
        """Validate and encode one request (no model work). Raises ValueError / TypeError saying what is wrong.

        ``options`` (or keywords replacing its fields, as in :meth:`generate`) say what the request asks for; see
        :class:`~lookahead.inputs.RequestOptions`. Its documents' drafting state is built here, in the caller's
        thread (:meth:`DraftStore.stage_documents`), so a request with large documents joins a running batch without
        sorting them on the decode thread."""
        request = self.inputs.prepare(prompt, options, **keywords)
        store = request.trie if request.trie is not None else self.trie
        if request.document_ids and isinstance(store, DraftStore) and self.config.decoding_length > 0:
            request = dataclasses.replace(request, document_ids=store.stage_documents(request.document_ids))
        return request

    # ------------------------------------------------------------------ public API

    def generate(self, prompt: Prompt | Sequence[Prompt], options: RequestOptions | None = None, *,
                 batch_size: int = 1, show_progress: bool = False, **keywords: Any
                 ) -> GenerationResult | list[GenerationResult]:
        """Lookahead decoding of one prompt, or of a list of prompts (returns a list then).

        In float32, greedy output equals HF ``generate(do_sample=False)`` token for token; sampled output is drawn
        from exactly the distribution HF sampling uses (sample-then-match), reproducibly with ``seed``.

        A fault (out of memory, say) raises for one prompt; for a list, the prompt it belongs to gets a result with
        ``finish_reason`` "error" and its ``error``, and the others are decoded as if it had not happened.

        Args:
            prompt: a string, chat messages, token ids, or a list of those.
            options: what each request asks for (:class:`~lookahead.inputs.RequestOptions`); ``keywords`` replace
                its fields. They are, as in HF ``generate`` where HF has them: ``max_new_tokens`` (>= 1),
                ``eos_token_id`` (default from the model's generation config), ``stop`` (strings that end
                generation; the text is cut before the first one), ``documents`` (texts whose tokens seed this
                request's local trie), ``document_names`` (an id per document, naming them in
                ``stats.provenance``), ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``
                (unset values come from the model's generation config), ``seed`` (each prompt of a list gets
                ``seed + index``), ``prediction`` (the expected output, a text or token ids, drafted first; for a
                list of prompts a list of one per prompt, None items allowed; output never depends on it) and
                ``trie`` (the trie this request drafts from and learns into; None: :attr:`trie`).
            batch_size: for a list of prompts, how many are decoded together in each forward pass.
            show_progress: a progress bar over a list of prompts.
        """
        if not is_prompt_list(prompt):
            return collect_chunks(self.run(self.prepare(prompt, options, **keywords)))  # type: ignore[arg-type]
        check_positive_int("batch_size", batch_size)
        predictions = per_prompt_predictions(keywords.pop("prediction", None), len(prompt))  # type: ignore[arg-type]
        shared = RequestOptions.of(options, **keywords)
        seed = shared.sampling.seed
        requests = [
            self.prepare(p, shared, prediction=predictions[i],
                         **({} if seed is None else {"seed": seed + i}))  # type: ignore[arg-type]
            for i, p in enumerate(prompt)  # type: ignore[arg-type]
        ]
        return self.run_many(requests, batch_size, show_progress)

    def stream(self, prompt: Prompt, options: RequestOptions | None = None, **keywords: Any) -> Iterator[StreamChunk]:
        """Yield every accepted run of tokens as it is verified. The last chunk carries the finish reason and stats.

        Options (as in :meth:`generate`) are checked right away, when ``stream`` is called, before any model work.
        """
        return self.run(self.prepare(prompt, options, **keywords))

    def new_batch(self) -> Batch:
        """An empty batch of rows decoded together (see :class:`lookahead.batch.Batch`)."""
        self.budget  # noqa: B018 - measure the cost curve before any request's clock starts
        return Batch(self.runner, self.tokenizer, self.new_drafter, self.config.decoding_length,
                     prefill_chunk=self.config.prefill_chunk, prefill_share=self.config.prefill_share,
                     join_stall=self.config.join_stall)

    def run(self, request: Request) -> Iterator[StreamChunk]:
        """Decode one prepared request as a batch of one, yielding its chunks; a fault that ends it is raised
        (the exception itself), never a shorter answer."""
        batch = self.new_batch()
        batch.add(request, key=0)
        try:
            while len(batch):
                for _, chunk in batch.step():
                    if chunk.finish_reason == "error":
                        raise chunk.exception or RuntimeError(chunk.error)
                    yield chunk
        finally:
            batch.close()

    def run_many(self, requests: Sequence[Request], batch_size: int = 1, show_progress: bool = False
                 ) -> list[GenerationResult]:
        """Decode prepared requests ``batch_size`` at a time; a finished row's slot goes to the next waiting one."""
        chunks: list[list[StreamChunk]] = [[] for _ in requests]
        waiting = list(range(len(requests)))[::-1]
        batch = self.new_batch()
        progress = tqdm(total=len(requests), desc="lookahead", unit="prompt", disable=not show_progress)
        try:
            while waiting or len(batch):
                while waiting and len(batch) < batch_size:
                    index = waiting.pop()
                    batch.add(requests[index], key=index)
                for index, chunk in batch.step():
                    chunks[index].append(chunk)
                    if chunk.finish_reason is not None:
                        progress.update(1)
        finally:
            batch.close()
            progress.close()
        return [collect_chunks(c) for c in chunks]

