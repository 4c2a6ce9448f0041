"""Every model pass of the engine: prefill, tree passes (one row or a padded batch), logits, greedy tokens, and
the timing of tree passes that the draft budget's cost curve is made of.

The model is a stock Hugging Face causal LM; only its decoder (``model.get_decoder()``) runs here, with explicit
``position_ids``, a 4-D additive mask where the pass is not plainly causal (windowed for sliding-window layers, whose
cache keeps every position), and a ``DynamicCache`` passed under the argument name the installed transformers accepts
(:func:`cache_argument`). The LM head, with the model's own post-processing of its output, is applied here too, so a
pass computes logits only for the rows that need them.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from .budget import DEFAULT_SIZES, CostCurve, CostModel, measure_cost_curve
from .kernels import install_skinny_linear, skinny_linear, skinny_matmul
from .kvcache import check_compactable, compact_cache, compact_rows, crop, replicated, spare_cache
from .models import check_single_device
from .tree import TreeBuffers, attention_mask, batch_inputs, build_tree, position_ids

#: model_type values whose stock transformers implementation is verified by the test-suite to accept a 4-D tree
#: mask with explicit position ids and a DynamicCache, giving output identical to greedy decoding in float32.
SUPPORTED_ARCHITECTURES = (
    "llama", "qwen2", "qwen3", "mistral", "mixtral", "phi3", "gemma", "gemma2", "gemma3_text", "olmo2", "qwen2_moe",
    "qwen3_moe", "starcoder2", "smollm3", "granite", "cohere",
)
SUPPORTED_ATTENTION = ("sdpa", "eager")
#: architectures without ``layer_types`` whose modeling applies ``config.sliding_window`` to every layer when set
WINDOW_ON_EVERY_LAYER = ("mistral", "mixtral", "phi3", "qwen3_moe", "starcoder2")
#: layer types a tree pass can mask: the cache keeps every position, sliding layers get a windowed mask
LAYER_TYPES = ("full_attention", "sliding_attention")


def rope_types(config: Any) -> set[str]:
    """The RoPE types of ``config`` (one per layer type where the parameters are given per layer type)."""
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(parameters, dict):
        return set()
    if "rope_type" in parameters or "type" in parameters:
        return {str(parameters.get("rope_type", parameters.get("type")))}
    return {str(p.get("rope_type", p.get("type", "default"))) for p in parameters.values() if isinstance(p, dict)}


def sliding_window(config: Any) -> int | None:
    """The attention window of the model's sliding-window layers (None: every layer attends to everything).

    Raises ValueError for windows the tree masks cannot reproduce: a non-positive window, a window on an
    architecture whose modeling ignores it, layer types other than full and sliding attention, bidirectional
    windows."""
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("bidirectional attention is not causal: lookahead decodes causal language models only")
    if layer_types is not None:
        unknown = sorted(set(layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"attention layer types {unknown} are not supported by lookahead's tree masks and KV "
                             f"compaction (supported: {', '.join(LAYER_TYPES)})")
        if "sliding_attention" not in layer_types:
            return None
    elif window is None:
        return None
    elif getattr(config, "model_type", None) not in WINDOW_ON_EVERY_LAYER:
        raise ValueError(f"sliding_window={window!r} on a {getattr(config, 'model_type', None)!r} config without "
                         "layer_types: its modeling does not apply it, so lookahead cannot match it")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding-window attention needs a positive integer sliding_window, got {window!r}")
    return window


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
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise ValueError("lookahead needs a plain bias-free linear LM head")
    check_single_device(model)  # cache, masks and compaction indices live on one device
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {attn!r} does not accept a 4-D tree mask; load the model with "
            f"attn_implementation='sdpa' or 'eager'"
        )
    dynamic = sorted(t for t in rope_types(config) if t == "longrope" or "dynamic" in t)
    if dynamic:
        raise ValueError(
            f"RoPE type {dynamic[0]!r} is not supported: transformers recomputes its frequencies from the largest "
            "position in each forward pass, so a tree pass (whose draft nodes reach further) would rotate the same "
            "token differently from plain decoding"
        )
    sliding_window(config)
    try:  # the cache a runner makes: every layer a plain growing DynamicLayer
        check_compactable(full_cache(config))
    except TypeError as error:
        raise ValueError(f"this model's KV cache layers are not supported by lookahead's KV compaction ({error})"
                         ) from error


def full_cache(config: Any) -> DynamicCache:
    """An empty cache in which every layer keeps every position: sliding-window layers too (their tree masks apply
    the window instead, see :func:`window_mask`), so compaction never has to know which positions a window evicted.
    Models without sliding-window layers get the cache transformers itself builds for their config. Every layer is
    a :class:`~lookahead.kvcache.SpareLayer`: a pass appends in place instead of copying the layer."""
    if sliding_window(config) is None:
        return spare_cache(DynamicCache(config=config))
    return spare_cache(DynamicCache())  # layers are created on first use, each a full layer


def window_mask(mask: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor, window: int
                ) -> torch.Tensor:
    """``mask`` with every key ``window`` or more positions before its query hidden, as transformers' sliding
    window (a key at position k is visible from position q iff ``q - k < window``).

    Args:
        mask: [B, 1, m, L] additive mask.
        query_positions: [B, m] or [1, m] positions of the queries.
        key_positions: [B, L] or [1, L] positions of the keys (of cached keys and tree nodes alike).
    """
    distance = query_positions[:, None, :, None] - key_positions[:, None, None, :]  # [B, 1, m, L]
    return mask.masked_fill(distance >= window, torch.finfo(mask.dtype).min)


@dataclass(frozen=True)
class LogitProcessing:
    """What a model's forward does to ``lm_head(h)`` before it returns logits, in its order: divide by ``divide``
    (Granite's ``logits_scaling``), multiply by ``multiply`` (Cohere's ``logit_scale``), then soft-cap as
    ``tanh(x / softcap) * softcap`` (Gemma 2/3's ``final_logit_softcapping``). All None: plain ``lm_head(h)``."""

    divide: float | None = None
    multiply: float | None = None
    softcap: float | None = None

    @classmethod
    def of(cls, config: Any) -> LogitProcessing:
        """The processing of a supported architecture, read from its config."""
        divide, multiply = getattr(config, "logits_scaling", None), getattr(config, "logit_scale", None)
        return cls(divide=None if divide in (None, 1) else float(divide),  # x / 1 and x * 1 are exact no-ops
                   multiply=None if multiply in (None, 1) else float(multiply),
                   softcap=getattr(config, "final_logit_softcapping", None) or None)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's own operations on ``logits`` (in their dtype, as the model computes them)."""
        if self.divide is not None:
            logits = logits / self.divide
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def cache_argument(decoder: torch.nn.Module) -> str:
    """The keyword under which ``decoder.forward`` takes its KV cache: ``cache`` where the installed transformers
    has it (``past_key_values`` is deprecated there), else ``past_key_values``."""
    try:
        parameters = inspect.signature(decoder.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


@dataclass(frozen=True)
class RowLayout:
    """Where each batch row's tree goes: row ``b`` has ``lengths[b]`` valid cache positions, and every row's tree
    block starts at ``tree_start`` (the cache length; positions past a row's length are stale)."""

    lengths: tuple[int, ...]
    tree_start: int

    @property
    def dense(self) -> bool:
        """One row and nothing stale: the pass is a plain single-row tree pass and compaction a plain crop/move."""
        return len(self.lengths) == 1 and self.lengths[0] == self.tree_start


class ModelRunner:
    """Runs the passes of one model. ``skinny``: on CPU, small passes use :mod:`lookahead.kernels`."""

    def __init__(self, model: PreTrainedModel, skinny: bool = True) -> None:
        check_model(model)
        self.model = model
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings().weight  # [V, d]
        self.processing = LogitProcessing.of(model.config)
        self.window = sliding_window(model.config)
        layer_types = getattr(model.config, "layer_types", None)
        #: sliding-window models with ``layer_types`` take one mask per layer type, the others one for every layer
        self.layer_types = sorted(set(layer_types)) if self.window and layer_types is not None else None
        self.device = next(model.parameters()).device
        self.dtype = model.dtype
        self.skinny = skinny and self.device.type == "cpu"
        if self.skinny:
            install_skinny_linear(self.decoder)
        self.cache_name = cache_argument(self.decoder)
        self.check_head()

    def kernels(self) -> AbstractContextManager[None]:
        """The block inside which this runner's small CPU passes use the skinny kernels (a no-op elsewhere)."""
        return skinny_linear(self.skinny)

    def new_cache(self) -> DynamicCache:
        """An empty cache for this model, checked to be compactable."""
        cache = full_cache(self.model.config)
        check_compactable(cache)
        return cache

    def _decode(self, cache: DynamicCache, **inputs: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden state for ``inputs``, with ``cache`` passed under the accepted name."""
        return self.decoder(**inputs, **{self.cache_name: cache}, use_cache=True).last_hidden_state

    def _masks(self, mask: torch.Tensor, query_positions: torch.Tensor, block_positions: torch.Tensor
               ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The attention mask argument for a tree pass whose full-attention mask is ``mask`` [B, 1, m, C + n]: the
        same mask, windowed for sliding-window layers (one mask per layer type where the model has several).

        ``query_positions`` [B, m] are the positions of the queries, ``block_positions`` [B, n] those of the whole
        tree block at cache index C (cached position j < C is position j)."""
        if self.window is None:
            return mask
        cached = torch.arange(mask.shape[-1] - block_positions.shape[-1], device=mask.device)  # [C]
        keys = torch.cat([cached.expand(block_positions.shape[0], -1), block_positions], dim=-1)  # [B, C + n]
        windowed = window_mask(mask, query_positions, keys, self.window)
        if self.layer_types is None:  # the window applies to every layer
            return windowed
        return {t: windowed if t == "sliding_attention" else mask for t in self.layer_types}

    # ------------------------------------------------------------------ passes

    def prefill(self, cache: DynamicCache, token_ids: Sequence[int], start: int = 0) -> torch.Tensor:
        """Run prompt tokens (causal) into a cache that holds the ``start`` tokens before them (a whole prompt: an
        empty cache); returns the last row of the hidden state, [1, d]."""
        inputs: dict[str, torch.Tensor] = {"input_ids": torch.tensor([list(token_ids)], device=self.device)}
        if start:
            inputs["position_ids"] = torch.arange(start, start + len(token_ids), device=self.device)[None]  # [1, P]
        hidden = self._decode(cache, **inputs)  # [1, P, d]
        return hidden[0, -1:]  # [1, d]

    def run_tree(self, cache: DynamicCache, prefix_length: int, tree: TreeBuffers | None, start: int = 0,
                 inputs_embeds: torch.Tensor | None = None, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run nodes ``start..n-1`` of ``tree``; nodes ``0..start-1`` sit in ``cache`` right after the prefix.

        Args:
            cache: holds exactly ``prefix_length + start`` positions; grows by ``n - start``.
            tree: the whole tree (node 0 = block root); None when the one new node follows every cached block node.
            inputs_embeds: [n - start, d] input embeddings of the new nodes instead of their tokens.
            input_ids: [1, n - start] tokens of the new nodes (default: from ``tree``).

        Returns the last hidden state of the new nodes, [n - start, d].
        """
        inputs: dict[str, torch.Tensor] = {}
        if inputs_embeds is not None:
            inputs["inputs_embeds"] = inputs_embeds[None]  # [1, m, d]
        else:
            inputs["input_ids"] = input_ids if input_ids is not None else tree.input_ids[None, start:]  # [1, m]
        if tree is None or tree.size == 1:  # causal: the default mask is the tree mask
            positions = torch.tensor([[prefix_length + start]], device=self.device)  # [1, 1]
            return self._decode(cache, **inputs, position_ids=positions)[0]  # [1, d]
        positions = position_ids(tree, prefix_length)  # [1, n]
        mask = attention_mask(tree, prefix_length, self.dtype)[:, :, start:]  # [1, 1, m, P + n]
        hidden = self._decode(cache, **inputs, position_ids=positions[:, start:],  # [1, m]
                              attention_mask=self._masks(mask, positions[:, start:], positions))  # [1, m, d]
        return hidden[0]  # [m, d]

    def run_nodes(self, cache: DynamicCache, prefix_length: int, tokens: Sequence[int], parents: Sequence[int],
                  start: int = 0, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`run_tree` for a tree given as token and parent lists; returns [n - start, d]."""
        if not 0 <= start < len(tokens):
            raise ValueError(f"run_nodes: start must be in 0..{len(tokens) - 1}, got {start}")
        if start == len(tokens) - 1 and sees_whole_block(parents, start):  # a chain: no tree tensors needed
            return self.run_tree(cache, prefix_length, None, start, inputs_embeds,
                                 input_ids=torch.tensor([list(tokens[start:])], device=self.device))
        return self.run_tree(cache, prefix_length, build_tree(tokens, parents, device=self.device), start,
                             inputs_embeds)

    def tree_pass(self, cache: DynamicCache, trees: Sequence[TreeBuffers], layout: RowLayout) -> torch.Tensor:
        """One tree-masked pass over a batch: row b's tree follows its ``layout.lengths[b]`` valid positions.
        The trees may be on the host: they reach the device in one upload.

        Returns hidden states [B, N, d] with N the largest tree; rows of smaller trees are padded.
        """
        if layout.dense:
            return self.run_tree(cache, layout.tree_start, trees[0].to(self.device))[None]  # [1, n, d]
        if self.window is None and all(tree.size == 1 for tree in trees):
            return self.plain_step(cache, [int(tree.input_ids[0]) for tree in trees], layout)  # [B, 1, d]
        inputs = batch_inputs(trees, layout.lengths, layout.tree_start, self.dtype, self.device)
        return self._decode(cache, input_ids=inputs.input_ids, position_ids=inputs.position_ids,
                            attention_mask=self._masks(inputs.attention_mask, inputs.position_ids, inputs.position_ids)
                            )  # [B, N, d]

    def plain_step(self, cache: DynamicCache, tokens: Sequence[int], layout: RowLayout) -> torch.Tensor:
        """One token per row (no row drafts): a 2-D padding mask instead of the 4-D tree mask, so the attention
        implementation builds its own mask and may take its fast path (flash attention on CUDA; none at all when no
        row has stale positions). Not for sliding-window models: their windows count cache slots, and a row with
        stale positions is not where its slots say.

        Returns hidden states [B, 1, d]."""
        rows = len(tokens)
        packed = torch.tensor([*tokens, *layout.lengths], dtype=torch.long).to(self.device)  # one upload
        input_ids, prefixes = packed[:rows, None], packed[rows:, None]  # [B, 1] each
        keys = torch.arange(layout.tree_start + 1, device=self.device)[None]  # [1, C + 1]
        mask = ((keys < prefixes) | (keys == layout.tree_start)).long()  # [B, C + 1]: valid prefix and the new token
        return self._decode(cache, input_ids=input_ids, position_ids=prefixes, attention_mask=mask)  # [B, 1, d]

    @staticmethod
    def compact(cache: DynamicCache, layout: RowLayout, keeps: Sequence[Sequence[int]]) -> list[int]:
        """Keep each row's accepted tree nodes ``keeps[b]`` (root first) after its valid prefix; returns the new
        lengths. The dense layout of :meth:`tree_pass` is compacted the same dense way."""
        if layout.dense:
            compact_cache(cache, layout.tree_start, keeps[0])
            return [layout.tree_start + len(keeps[0])]
        return compact_rows(cache, layout.tree_start, layout.lengths, keeps)

    # ------------------------------------------------------------------ the head

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ W.T`` in the model's dtype: [n, d] -> [n, V] (on CPU as ``W @ hidden.T``, see
        lookahead.kernels)."""
        if hidden.device.type != "cpu":
            return torch.nn.functional.linear(hidden, self.head)  # [n, V]
        return skinny_matmul(hidden, self.head)  # [n, V]

    def _processed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head and the model's own processing of its output, in the model's dtype: [n, d] -> [n, V]."""
        return self.processing.apply(self._head(hidden))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits as the model's forward returns them: ``hidden @ W.T`` and the model's own processing of it
        (scaling, soft-capping; see :class:`LogitProcessing`): [n, d] -> [n, V]."""
        return self._processed(hidden).float()  # [n, V]

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """Argmax of :meth:`logits` for every row: [n, d] -> [n] (on CPU 2-4x faster as ``W @ hidden.T``). The
        processing is applied before the argmax too: rounding (and soft-capping's saturation) can make ties."""
        return self._processed(hidden).argmax(-1)  # [n]

    def check_head(self) -> None:
        """Refuse the model unless :meth:`logits` of the decoder's hidden states reproduce the logits of the model's
        own forward, on a 2-token probe: a head post-processing this runner does not know would change outputs."""
        vocab = int(self.head.shape[0])
        probe = torch.tensor([[1 % vocab, vocab // 2]], device=self.device)  # [1, 2]
        with torch.inference_mode():
            expected = self.model(input_ids=probe, use_cache=False).logits[0].float()  # [2, V]
            ours = self.logits(self.decoder(input_ids=probe, use_cache=False).last_hidden_state[0])  # [2, V]
        scale = float(expected.abs().max())
        error = float((ours.to(expected.device) - expected).abs().max())
        tolerance = max(4 * torch.finfo(self.dtype).eps, 1e-4) * max(scale, 1.0)
        if not error <= tolerance:
            raise ValueError(
                f"lookahead's LM head does not reproduce the logits of this {self.model.config.model_type!r} model "
                f"(largest difference {error:.3g} on a probe, logits up to {scale:.3g}): its forward post-processes "
                "the LM head's output in a way lookahead does not apply"
            )


def sees_whole_block(parents: Sequence[int], start: int) -> bool:
    """True when the only new node (``start == n - 1``) has every cached block node as an ancestor (a chain)."""
    if start != len(parents) - 1:
        return False
    node, seen = parents[start], 0
    while node >= 0:
        seen += 1
        node = parents[node]
    return seen == start


# ---------------------------------------------------------------------------------------------------- cost timing


def cost_grid(decoding_length: int, prefix_length: int, max_context: int | None) -> tuple[tuple[int, ...], int]:
    """Pass sizes to time (up to ``decoding_length + 1``, at most 64) and the prefix length to time them after
    (shortened to fit the model's context)."""
    limit = max(min(decoding_length + 1, 64), 2)
    sizes = tuple(n for n in DEFAULT_SIZES if n <= limit)
    if max_context:
        prefix_length = max(1, min(prefix_length, max_context - sizes[-1] - 1))
    return sizes, prefix_length


#: contexts and batch sizes the cost model is measured at (contexts past the model's own are dropped)
COST_CONTEXTS = (384, 1536, 4096)
COST_BATCHES = (1, 4, 8)


def cost_model_grid(decoding_length: int, max_context: int | None, contexts: Sequence[int] = COST_CONTEXTS,
                    batches: Sequence[int] = COST_BATCHES) -> list[tuple[int, int, tuple[int, ...]]]:
    """The (batch, context, sizes) points of a cost model: batch ``b`` is timed up to ``b * n <= 4 * limit``
    tokens (``limit = decoding_length + 1``, at most 64; beyond that the model extrapolates), at every context
    that fits the model (at least one)."""
    sizes, _ = cost_grid(decoding_length, 1, None)
    limit = sizes[-1]
    fitting = sorted({cost_grid(decoding_length, c, max_context)[1] for c in contexts})
    points = []
    for batch in sorted(set(batches)):
        batch_sizes = tuple(n for n in sizes if batch == 1 or batch * n <= 4 * limit)
        if len(batch_sizes) < 2:
            batch_sizes = sizes[:2]
        points += [(batch, context, batch_sizes) for context in fitting]
    return points


def prefilled_caches(runners: Sequence[ModelRunner], prefix_length: int) -> list[DynamicCache]:
    """One cache per runner holding the same random ``prefix_length``-token prefix (what passes are timed after)."""
    vocab = int(runners[0].model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (prefix_length,), generator=generator).tolist()
    caches = [runner.new_cache() for runner in runners]
    with torch.inference_mode():
        for runner, cache in zip(runners, caches):
            with runner.kernels():
                runner.prefill(cache, prefix)
    return caches


def time_tree_passes(runners: Sequence[ModelRunner], sizes: Sequence[int], prefix_length: int, repeats: int,
                     with_logits: bool = False, batch: int = 1, caches: Sequence[DynamicCache] | None = None
                     ) -> CostCurve:
    """Seconds of one chain-shaped tree pass of every runner (then its greedy tokens, or full logits), per size,
    after a random ``prefix_length``-token prefix (or the prefilled single-row ``caches``, left as they were), for
    ``batch`` rows of the same tree (one row is the dense single-row pass, several the batched one); see
    :func:`lookahead.budget.measure_cost_curve`. Device work is synchronised before each timer reads."""
    vocab = int(runners[0].model.config.vocab_size)
    generator = torch.Generator().manual_seed(1)
    if caches is None:
        caches = prefilled_caches(runners, prefix_length)
    elif batch == 1:
        caches = [copy.deepcopy(cache) for cache in caches]
    if batch > 1:
        caches = [replicated(cache, batch) for cache in caches]
    layout = RowLayout((prefix_length,) * batch, prefix_length)
    with torch.inference_mode():

        def run_pass(n: int) -> None:
            tokens = torch.randint(0, vocab, (n,), generator=generator).tolist()
            parents = [-1] + list(range(n - 1))
            for runner, cache in zip(runners, caches):
                with runner.kernels():
                    if batch == 1:
                        hidden = runner.run_nodes(cache, prefix_length, tokens, parents)  # [n, d]
                    else:
                        tree = build_tree(tokens, parents, device=runner.device)
                        hidden = runner.tree_pass(cache, [tree] * batch, layout).flatten(0, 1)  # [B * n, d]
                if with_logits:
                    runner.logits(hidden)
                else:
                    runner.greedy_tokens(hidden).tolist()
                crop(cache, prefix_length)  # drop the whole tree again
            synchronize(runners[0].device)

        return measure_cost_curve(run_pass, sizes, repeats=repeats)


def measure_cost_model(runners: Sequence[ModelRunner], decoding_length: int, max_context: int | None,
                       repeats: int = 3, with_logits: bool = False, contexts: Sequence[int] = COST_CONTEXTS,
                       batches: Sequence[int] = COST_BATCHES) -> CostModel:
    """Time tree passes at every point of :func:`cost_model_grid` (one prefill per context)."""
    points = []
    grid = cost_model_grid(decoding_length, max_context, contexts, batches)
    for context in sorted({c for _, c, _ in grid}):
        caches = prefilled_caches(runners, context)
        points += [(batch, context, time_tree_passes(runners, sizes, context, repeats, with_logits, batch, caches))
                   for batch, c, sizes in grid if c == context]
    return CostModel(tuple(sorted(points, key=lambda p: (p[0], p[1]))))


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (CUDA), so a timer reads the real end of a pass."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

