"""Every model pass of the engine: prefill, tree passes (one row or a padded batch), logits, greedy tokens, and
the timing of tree passes that the draft budget's cost curve is made of.

The model is a stock Hugging Face causal LM; only its decoder (``model.get_decoder()``) runs here, with explicit
``position_ids``, a 4-D additive mask where the pass is not plainly causal, and a ``DynamicCache`` passed under the
argument name the installed transformers accepts (:func:`cache_argument`). The LM head is applied here too, so a
pass computes logits only for the rows that need them.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from .budget import DEFAULT_SIZES, CostCurve, measure_cost_curve
from .kernels import install_skinny_linear, skinny_linear, skinny_matmul
from .kvcache import check_compactable, compact_cache, compact_rows
from .tree import TreeBuffers, attention_mask, batch_inputs, build_tree, position_ids

#: model_type values whose stock transformers implementation is verified by the test-suite to accept a 4-D tree
#: mask with explicit position ids and a DynamicCache, giving output identical to greedy decoding.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
SUPPORTED_ATTENTION = ("sdpa", "eager")


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
        self.device = next(model.parameters()).device
        self.dtype = model.dtype
        self.skinny = skinny and self.device.type == "cpu"
        if self.skinny:
            install_skinny_linear(self.decoder)
        self.cache_name = cache_argument(self.decoder)

    def kernels(self) -> AbstractContextManager[None]:
        """The block inside which this runner's small CPU passes use the skinny kernels (a no-op elsewhere)."""
        return skinny_linear(self.skinny)

    def new_cache(self) -> DynamicCache:
        """An empty cache for this model, checked to be compactable."""
        cache = DynamicCache(config=self.model.config)
        check_compactable(cache)
        return cache

    def _decode(self, cache: DynamicCache, **inputs: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden state for ``inputs``, with ``cache`` passed under the accepted name."""
        return self.decoder(**inputs, **{self.cache_name: cache}, use_cache=True).last_hidden_state

    # ------------------------------------------------------------------ passes

    def prefill(self, cache: DynamicCache, token_ids: Sequence[int]) -> torch.Tensor:
        """Run a whole prompt (causal) into an empty cache; returns the last row of the hidden state, [1, d]."""
        hidden = self._decode(cache, input_ids=torch.tensor([list(token_ids)], device=self.device))  # [1, P, d]
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
        hidden = self._decode(
            cache, **inputs,
            position_ids=position_ids(tree, prefix_length)[:, start:],  # [1, m]
            attention_mask=attention_mask(tree, prefix_length, self.dtype)[:, :, start:],  # [1, 1, m, P + n]
        )  # [1, m, d]
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

        Returns hidden states [B, N, d] with N the largest tree; rows of smaller trees are padded.
        """
        if layout.dense:
            return self.run_tree(cache, layout.tree_start, trees[0])[None]  # [1, n, d]
        inputs = batch_inputs(trees, layout.lengths, layout.tree_start, self.dtype)
        return self._decode(cache, input_ids=inputs.input_ids, position_ids=inputs.position_ids,
                            attention_mask=inputs.attention_mask)  # [B, N, d]

    @staticmethod
    def compact(cache: DynamicCache, layout: RowLayout, keeps: Sequence[Sequence[int]]) -> list[int]:
        """Keep each row's accepted tree nodes ``keeps[b]`` (root first) after its valid prefix; returns the new
        lengths. The dense layout of :meth:`tree_pass` is compacted the same dense way."""
        if layout.dense:
            compact_cache(cache, layout.tree_start, keeps[0])
            return [layout.tree_start + len(keeps[0])]
        return compact_rows(cache, layout.tree_start, layout.lengths, keeps)

    # ------------------------------------------------------------------ the head

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``hidden @ W.T``: [n, d] -> [n, V] (on CPU as ``W @ hidden.T``, see lookahead.kernels)."""
        if hidden.device.type != "cpu":
            return torch.nn.functional.linear(hidden, self.head).float()  # [n, V]
        return skinny_matmul(hidden, self.head).float()  # [n, V]

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """Argmax of ``hidden @ W.T`` for every row: [n, d] -> [n] (on CPU 2-4x faster as ``W @ hidden.T``)."""
        if hidden.device.type != "cpu":
            return torch.nn.functional.linear(hidden, self.head).argmax(-1)  # [n]
        return skinny_matmul(hidden, self.head).argmax(-1)  # [n]


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


def time_tree_passes(runners: Sequence[ModelRunner], sizes: Sequence[int], prefix_length: int, repeats: int,
                     with_logits: bool = False) -> CostCurve:
    """Seconds of one chain-shaped tree pass of every runner (then its greedy tokens, or full logits), per size,
    after a random ``prefix_length``-token prefix; see :func:`lookahead.budget.measure_cost_curve`."""
    vocab = int(runners[0].model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (prefix_length,), generator=generator).tolist()
    caches = [runner.new_cache() for runner in runners]
    with torch.inference_mode():
        for runner, cache in zip(runners, caches):
            with runner.kernels():
                runner.prefill(cache, prefix)

        def run_pass(n: int) -> None:
            tokens = torch.randint(0, vocab, (n,), generator=generator).tolist()
            parents = [-1] + list(range(n - 1))
            for runner, cache in zip(runners, caches):
                with runner.kernels():
                    hidden = runner.run_nodes(cache, prefix_length, tokens, parents)  # [n, d]
                if with_logits:
                    runner.logits(hidden)
                else:
                    runner.greedy_tokens(hidden).tolist()
                compact_cache(cache, prefix_length, [])  # drop the whole tree again
            synchronize(runners[0].device)

        return measure_cost_curve(run_pass, sizes, repeats=repeats)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (CUDA), so a timer reads the real end of a pass."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

