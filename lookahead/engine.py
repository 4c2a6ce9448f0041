"""The decoding loop: prefill -> (draft -> verify -> accept -> compact -> learn)*, with streaming and stats."""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Union

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from . import treepass
from .batch import Batch, Request
from .budget import CostCurve, DraftBudget, cached_cost_curve, cost_cache_key, measure_cost_curve
from .config import LookaheadConfig
from .kernels import install_skinny_linear, skinny_linear, skinny_matmul
from .kvcache import check_compactable, compact_cache
from .sampling import SamplingParams
from .tree import TreeBuffers, batch_inputs, build_tree
from .trie import TokenTrie

#: model_type values whose stock transformers implementation is verified by the test-suite to accept a 4-D tree
#: mask with explicit position ids and a DynamicCache, giving output identical to greedy decoding.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
SUPPORTED_ATTENTION = ("sdpa", "eager")

Message = dict[str, str]
Prompt = Union[str, Sequence[Message], Sequence[int], torch.Tensor]  # noqa: UP007 (a runtime alias)


@dataclass
class GenerationStats:
    """What one request cost and how well drafting worked. Times are seconds."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0  # forward passes, the prefill included
    draft_sizes: list[int] = field(default_factory=list)  # draft nodes verified per decoding step
    accepted_lengths: list[int] = field(default_factory=list)  # draft tokens accepted per decoding step
    time_prefill: float = 0.0
    time_trie: float = 0.0
    time_forward: float = 0.0
    time_other: float = 0.0
    time_total: float = 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.time_total if self.time_total > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(tokens_per_step=self.tokens_per_step, tokens_per_second=self.tokens_per_second)
        return data


@dataclass
class GenerationResult:
    """Decoded text (stop string and what follows removed), new token ids and stats of one request."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "eos", "stop" (a stop string), or "length"
    stats: GenerationStats


@dataclass
class StreamChunk:
    """One accepted run of tokens. ``text`` is the new text it adds (may lag to hold back a partial stop)."""

    token_ids: list[int]
    text: str
    accepted: int  # draft tokens accepted in the step that produced this run
    finish_reason: str | None = None
    stats: GenerationStats | None = None  # set on the last chunk


class _Emitter:
    """Appends verified tokens one by one and ends the request exactly where HF ``generate`` would.

    A run ends at the first EOS token (kept), at the token whose text completes a stop string (kept; the text is cut
    before the stop string), or at ``max_new_tokens``. Text deltas hold back a possible partial stop string and an
    incomplete UTF-8 character until they are settled.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos: set[int], stop: Sequence[str], max_new_tokens: int
                 ) -> None:
        self.tokenizer = tokenizer
        self.eos = eos
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.max_new_tokens = max_new_tokens
        self.generated: list[int] = []
        self.text = ""  # text emitted so far
        self.finish: str | None = None

    def _decode(self) -> str:
        return self.tokenizer.decode(self.generated, skip_special_tokens=True)

    def _cut(self, text: str) -> str:
        found = [p for p in (text.find(s) for s in self.stop) if p >= 0]
        return text[: min(found)] if found else text

    def push(self, tokens: Sequence[int]) -> tuple[list[int], str]:
        """Take this step's tokens; returns those kept and the new text. Sets ``finish`` when the request ends."""
        run: list[int] = []
        for token in tokens:
            self.generated.append(token)
            run.append(token)
            if token in self.eos:
                self.finish = "eos"
            elif self.stop and any(s in self._decode() for s in self.stop):
                self.finish = "stop"
            elif len(self.generated) >= self.max_new_tokens:
                self.finish = "length"
            if self.finish:
                break
        full = self._cut(self._decode()) if self.stop else self._decode()
        end = len(full)
        if not self.finish:
            end -= self.holdback if self.stop else 0
            while end > 0 and full[end - 1] == "\ufffd":  # an incomplete UTF-8 character
                end -= 1
        delta = full[len(self.text):max(end, len(self.text))]
        self.text += delta
        return run, delta


class LookaheadGenerator:
    """Lossless trie-drafted decoding on a stock Hugging Face causal LM.

    One generator holds the model, a shared :class:`TokenTrie` (request-local counts for prompts and documents,
    global counts for past outputs) and the adaptive draft budget. ``generate`` and ``stream`` follow the keyword
    names of HF ``generate``; greedy output is identical to ``model.generate(do_sample=False)`` token for token.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 config: LookaheadConfig | None = None, trie: TokenTrie | None = None,
                 cost_curve: CostCurve | None = None) -> None:
        check_model(model)
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or LookaheadConfig()
        self.trie = trie or self.empty_trie()
        self._cost_curve = cost_curve
        self._budget: DraftBudget | None = None
        self._budget_lock = threading.Lock()
        self.device = next(model.parameters()).device
        self._decoder = model.get_decoder()
        if self.config.skinny_matmul and self.device.type == "cpu":
            install_skinny_linear(self._decoder)
        self._lm_head_weight = model.get_output_embeddings().weight  # [vocab, d]
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None

    def empty_trie(self) -> TokenTrie:
        """A new empty trie with this generator's knobs (assign it to ``self.trie`` to forget all past outputs)."""
        return TokenTrie(
            branch_length=self.config.branch_length, max_query_length=self.config.max_query_length,
            node_budget=self.config.node_budget, decay=self.config.decay,
            local_weight=self.config.local_weight, global_weight=self.config.global_weight,
        )

    # ------------------------------------------------------------------ cost model

    @property
    def budget(self) -> DraftBudget:
        """The adaptive draft budget; the cost curve is measured (or read from cache) on first use."""
        with self._budget_lock:
            if self._budget is None:
                curve = self._cost_curve or self.measure_cost_curve()
                self._budget = DraftBudget(curve, self.config.decoding_length, adaptive=self.config.adaptive)
            return self._budget

    def measure_cost_curve(self, prefix_length: int = 384, use_cache: bool = True) -> CostCurve:
        """Time tree passes of 1..64 tokens after a ``prefix_length`` prefix; cached per model/device/threads."""
        cfg = self.model.config
        limit = min(self.config.decoding_length + 1, 64)
        sizes = tuple(n for n in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if n <= max(limit, 2))
        if self.max_context:
            prefix_length = max(1, min(prefix_length, self.max_context - sizes[-1] - 1))
        vocab = int(cfg.vocab_size)

        def measure() -> CostCurve:
            generator = torch.Generator().manual_seed(0)
            prefix = torch.randint(0, vocab, (1, prefix_length), generator=generator).to(self.device)
            cache = DynamicCache(config=cfg)
            with torch.inference_mode():
                self.model(input_ids=prefix, past_key_values=cache, use_cache=True)

                def run_pass(n: int) -> None:
                    tokens = torch.randint(0, vocab, (n,), generator=generator).tolist()
                    parents = [-1] + list(range(n - 1))
                    self._tree_forward(cache, prefix_length, tokens, parents)
                    compact_cache(cache, prefix_length, [])  # drop the whole tree again

                return measure_cost_curve(run_pass, sizes, repeats=5)

        if not use_cache:
            return measure()
        key = cost_cache_key(
            getattr(cfg, "_name_or_path", ""), cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, vocab,
            self.model.dtype, self.device, torch.get_num_threads(), sizes, prefix_length, torch.__version__, "tree-v4",
            self.config.skinny_matmul,
        )
        return cached_cost_curve(key, measure, self.config.cost_cache)

    # ------------------------------------------------------------------ inputs

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
                return self._encode_messages(items)
            if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
                vocab = int(self.model.config.vocab_size)
                bad = [t for t in items if not 0 <= t < vocab]
                if bad:
                    raise ValueError(f"token ids must be in 0..{vocab - 1}, got {bad[:5]}")
                return items
        raise TypeError(
            "prompt must be a string, a list of chat messages ({'role': ..., 'content': ...}) or a list of token ids, "
            f"got {type(prompt).__name__}"
        )

    def _encode_messages(self, messages: list[dict]) -> list[int]:
        for i, m in enumerate(messages):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"chat message {i} needs string 'role' and 'content' keys, got {m!r}")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template: pass a plain string prompt or token ids")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def _eos_ids(self, eos_token_id: int | Sequence[int] | None) -> set[int]:
        if eos_token_id is None:
            eos_token_id = getattr(self.model.generation_config, "eos_token_id", None)
            if eos_token_id is None:
                eos_token_id = self.tokenizer.eos_token_id
        if eos_token_id is None:
            return set()
        if isinstance(eos_token_id, int):
            return {eos_token_id}
        return {int(t) for t in eos_token_id}

    @staticmethod
    def _check_documents(documents: Sequence[str] | None) -> list[str]:
        if documents is None:
            return []
        if isinstance(documents, str) or not isinstance(documents, Sequence):
            raise TypeError(f"documents must be a list of strings, got {type(documents).__name__}")
        for i, doc in enumerate(documents):
            if not isinstance(doc, str):
                raise TypeError(f"documents[{i}] must be a string, got {type(doc).__name__}")
        return list(documents)

    # ------------------------------------------------------------------ model passes

    def prefill(self, cache: DynamicCache, prompt_ids: list[int]) -> torch.Tensor:
        """Run the prompt through the decoder into ``cache``; returns the last position's hidden state [1, d]."""
        return treepass.prefill(self._decoder, cache, prompt_ids)  # [1, d]

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy next token after each hidden state: [n, d] -> [n]."""
        return greedy_tokens(self._lm_head_weight, hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits of hidden states: [n, d] -> [n, V] (float32)."""
        return treepass.logits_rows(self._lm_head_weight, hidden)  # [n, V]

    def batch_forward(self, cache: DynamicCache, trees: Sequence[TreeBuffers], lengths: Sequence[int],
                      tree_start: int) -> torch.Tensor:
        """One tree-masked pass over a batch: row b's tree follows its ``lengths[b]`` valid cache positions.

        The cache holds ``tree_start`` positions per row (stale past a row's length). Returns hidden states
        [B, N, d] with N the largest tree; rows of smaller trees are padded.
        """
        with skinny_linear(self.config.skinny_matmul):
            if len(trees) == 1 and lengths[0] == tree_start:  # one row, nothing stale: the plain single pass
                return self._single_tree_pass(cache, tree_start, trees[0])  # [1, n, d]
            inputs = batch_inputs(trees, lengths, tree_start, self.model.dtype)
            return self._decoder(input_ids=inputs.input_ids, position_ids=inputs.position_ids,
                                 attention_mask=inputs.attention_mask, past_key_values=cache,
                                 use_cache=True).last_hidden_state  # [B, N, d]

    def _single_tree_pass(self, cache: DynamicCache, prefix_length: int, tree: TreeBuffers) -> torch.Tensor:
        return treepass.run_tree(self._decoder, cache, prefix_length, tree, dtype=self.model.dtype)[None]  # [1, n, d]

    def _tree_forward(self, cache: DynamicCache, prefix_length: int, tokens: list[int], parents: list[int]
                      ) -> list[int]:
        """One tree-masked pass of a single row; returns the greedy next token after every node."""
        tree = build_tree(tokens, parents, device=self.device)
        hidden = self.batch_forward(cache, [tree], [prefix_length], prefix_length)  # [1, n, d]
        return self.greedy_tokens(hidden[0]).tolist()  # [n]

    # ------------------------------------------------------------------ public API

    def generate(self, prompt: Prompt | Sequence[Prompt], *, max_new_tokens: int = 128,
                 eos_token_id: int | Sequence[int] | None = None, stop: Sequence[str] | None = None,
                 documents: Sequence[str] | None = None, do_sample: bool = False, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                 seed: int | None = None, batch_size: int = 1, show_progress: bool = False,
                 ) -> GenerationResult | list[GenerationResult]:
        """Lookahead decoding of one prompt, or of a list of prompts (returns a list then).

        Greedy output equals HF ``generate(do_sample=False)`` token for token; sampled output is drawn from exactly
        the distribution HF sampling uses (sample-then-match), reproducibly with ``seed``.

        Args:
            prompt: a string, chat messages, token ids, or a list of those.
            max_new_tokens: most new tokens (>= 1), as in HF ``generate``.
            eos_token_id: token id(s) that end generation; default from the model's generation config.
            stop: strings that end generation; the returned text is cut before the first one.
            documents: texts whose tokens seed this request's local trie (retrieved documents).
            do_sample, temperature, top_k, top_p, repetition_penalty: as in HF ``generate``; unset values come
                from the model's generation config.
            seed: seeds the sampler of this request (each prompt of a list gets ``seed + index``).
            batch_size: for a list of prompts, how many are decoded together in each forward pass.
            show_progress: a progress bar over a list of prompts.
        """
        sampling = SamplingParams(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty, seed=seed)
        if not self._is_batch(prompt):
            request = self.prepare(prompt, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, stop=stop,
                                   documents=documents, sampling=sampling)
            return collect_chunks(self._run(request))
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        requests = [
            self.prepare(p, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, stop=stop, documents=documents,
                         sampling=sampling if seed is None else dataclasses.replace(sampling, seed=seed + i))
            for i, p in enumerate(prompt)  # type: ignore[arg-type]
        ]
        return self._run_many(requests, batch_size, show_progress)

    @staticmethod
    def _is_batch(prompt: Any) -> bool:
        if isinstance(prompt, (str, torch.Tensor)) or not isinstance(prompt, Sequence) or not prompt:
            return False
        first = prompt[0]
        return isinstance(first, str) or (isinstance(first, Sequence) and not isinstance(first, dict))

    def stream(self, prompt: Prompt, *, max_new_tokens: int = 128, eos_token_id: int | Sequence[int] | None = None,
               stop: Sequence[str] | None = None, documents: Sequence[str] | None = None, do_sample: bool = False,
               temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
               repetition_penalty: float | None = None, seed: int | None = None) -> Iterator[StreamChunk]:
        """Yield every accepted run of tokens as it is verified. The last chunk carries the finish reason and stats.

        Arguments (as in :meth:`generate`) are checked right away, when ``stream`` is called, before any model work.
        """
        sampling = SamplingParams(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty, seed=seed)
        request = self.prepare(prompt, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, stop=stop,
                               documents=documents, sampling=sampling)
        return self._run(request)

    def prepare(self, prompt: Prompt, *, max_new_tokens: int = 128, eos_token_id: int | Sequence[int] | None = None,
                stop: Sequence[str] | None = None, documents: Sequence[str] | None = None,
                sampling: SamplingParams | None = None) -> Request:
        """Validate and encode one request (no model work). Raises ValueError / TypeError saying what is wrong."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) for s in stop)):
            raise TypeError("stop must be a list of strings")
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a lookahead.sampling.SamplingParams, got {type(sampling).__name__}")
        docs = self._check_documents(documents)
        prompt_ids = self.encode(prompt)
        if self.max_context is not None:
            if len(prompt_ids) >= self.max_context:
                raise ValueError(f"prompt has {len(prompt_ids)} tokens; the model's context is {self.max_context} "
                                 "tokens")
            max_new_tokens = min(max_new_tokens, self.max_context - len(prompt_ids))
        resolved = (sampling or SamplingParams()).resolved(getattr(self.model, "generation_config", None))
        return Request(request_id=uuid.uuid4().hex, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens,
                       eos=frozenset(self._eos_ids(eos_token_id)), stop=tuple(stop or ()), documents=tuple(docs),
                       sampling=resolved)

    def new_batch(self) -> Batch:
        """An empty batch of rows decoded together (see :class:`lookahead.batch.Batch`)."""
        return Batch(self)

    # ------------------------------------------------------------------ the loop

    def _run(self, request: Request) -> Iterator[StreamChunk]:
        """Decode one request as a batch of one, yielding its chunks."""
        self.budget  # noqa: B018 - measure the cost curve before the request's clock starts
        batch = self.new_batch()
        batch.add(request, key=0)
        try:
            while len(batch):
                for _, chunk in batch.step():
                    yield chunk
        finally:
            batch.close()

    def _run_many(self, requests: list[Request], batch_size: int, show_progress: bool) -> list[GenerationResult]:
        """Decode requests ``batch_size`` at a time; a finished row's slot goes to the next waiting request."""
        self.budget  # noqa: B018
        chunks: list[list[StreamChunk]] = [[] for _ in requests]
        waiting = list(range(len(requests)))[::-1]
        batch = self.new_batch()
        progress = None
        if show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(requests), desc="lookahead", unit="prompt")
        try:
            while waiting or len(batch):
                while waiting and len(batch) < batch_size:
                    index = waiting.pop()
                    batch.add(requests[index], key=index)
                for index, chunk in batch.step():
                    chunks[index].append(chunk)
                    if progress is not None and chunk.finish_reason is not None:
                        progress.update(1)
        finally:
            batch.close()
            if progress is not None:
                progress.close()
        return [collect_chunks(iter(c)) for c in chunks]


def collect_chunks(chunks: Iterable[StreamChunk]) -> GenerationResult:
    """Join a request's stream into one result."""
    items = list(chunks)
    last = items[-1]
    assert last.stats is not None and last.finish_reason is not None
    return GenerationResult(text="".join(c.text for c in items), token_ids=[t for c in items for t in c.token_ids],
                            finish_reason=last.finish_reason, stats=last.stats)


def greedy_tokens(lm_head_weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Argmax of ``hidden @ W.T`` for every row: [n, d] -> [n].

    On CPU computed as ``W @ hidden.T`` (see :mod:`lookahead.kernels`): 2-4x faster than ``linear`` for 1..48 rows.
    """
    if hidden.device.type != "cpu":
        return torch.nn.functional.linear(hidden, lm_head_weight).argmax(-1)  # [n]
    return skinny_matmul(hidden, lm_head_weight).argmax(-1)  # [n]


def check_model(model: Any) -> None:
    """Refuse models whose architecture or attention implementation is not verified with 4-D tree masks."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "forward"):
        raise TypeError(f"expected a Hugging Face causal LM (PreTrainedModel), got {type(model).__name__}")
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architecture {model_type!r} is not verified with lookahead's 4-D tree masks; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    softcap = getattr(config, "final_logit_softcapping", None)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or softcap:
        raise ValueError("lookahead needs a plain bias-free linear LM head (no logit soft-capping)")
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {attn!r} does not accept a 4-D tree mask; load the model with "
            f"attn_implementation='sdpa' or 'eager'"
        )
    try:  # the cache the model would get: sliding-window layers also come from a bare `sliding_window` (Mistral)
        check_compactable(DynamicCache(config=config))
    except TypeError as error:
        raise ValueError(f"sliding-window attention layers are not supported by lookahead's KV compaction ({error})"
                         ) from error
