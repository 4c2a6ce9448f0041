"""Model passes over a tree block that grows on top of a cached prefix, for decoders that need full logits.

The cache holds ``prefix_length`` positions, then the block: tree nodes in node order (node 0 is the block root,
``parents[0] == -1``, parents before children). :func:`run_nodes` runs the nodes ``start..n-1`` of such a tree
when the nodes ``0..start-1`` are already cached, with the 4-D mask, positions and tree tensors of
:mod:`lookahead.tree`; :func:`lookahead.kvcache.compact_cache` then keeps the accepted nodes. A root that is already
cached (``start == 1``) is how one model of an ensemble, or one completion of a multi-draft run, continues from a
token that another pass has processed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from .kernels import skinny_matmul
from .tree import TreeBuffers, attention_mask, build_tree, position_ids


def sees_whole_block(parents: Sequence[int], start: int) -> bool:
    """True when the only new node (``start == n - 1``) has every cached block node as an ancestor (a chain)."""
    if start != len(parents) - 1:
        return False
    node, seen = parents[start], 0
    while node >= 0:
        seen += 1
        node = parents[node]
    return seen == start


def run_nodes(decoder: torch.nn.Module, cache: DynamicCache, prefix_length: int, tokens: Sequence[int],
              parents: Sequence[int], start: int = 0, inputs_embeds: torch.Tensor | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Run nodes ``start..n-1`` of the tree given as token and parent lists (see :func:`run_tree`); returns their
    last hidden state, [n - start, d]."""
    device = next(decoder.parameters()).device
    if not 0 <= start < len(tokens):
        raise ValueError(f"run_nodes: start must be in 0..{len(tokens) - 1}, got {start}")
    if start == len(tokens) - 1 and sees_whole_block(parents, start):  # a chain: no tree tensors needed
        return run_tree(decoder, cache, prefix_length, None, start, inputs_embeds, dtype,
                        input_ids=torch.tensor([list(tokens[start:])], device=device))
    return run_tree(decoder, cache, prefix_length, build_tree(tokens, parents, device=device), start, inputs_embeds,
                    dtype)


def run_tree(decoder: torch.nn.Module, cache: DynamicCache, prefix_length: int, tree: TreeBuffers | None,
             start: int = 0, inputs_embeds: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
             input_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Run nodes ``start..n-1`` of ``tree``; nodes ``0..start-1`` sit in ``cache`` right after the prefix.

    Args:
        decoder: the model's decoder (``model.get_decoder()``), called with a 4-D mask unless the pass is causal.
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
        device = next(decoder.parameters()).device
        positions = torch.tensor([[prefix_length + start]], device=device)  # [1, 1]
        hidden = decoder(**inputs, position_ids=positions, past_key_values=cache, use_cache=True).last_hidden_state
        return hidden[0]  # [1, d]
    hidden = decoder(
        **inputs,
        position_ids=position_ids(tree, prefix_length)[:, start:],  # [1, m]
        attention_mask=attention_mask(tree, prefix_length, dtype)[:, :, start:],  # [1, 1, m, P + n]
        past_key_values=cache, use_cache=True,
    ).last_hidden_state  # [1, m, d]
    return hidden[0]  # [m, d]


def prefill(decoder: torch.nn.Module, cache: DynamicCache, token_ids: Sequence[int]) -> torch.Tensor:
    """Run a whole prompt (causal) into an empty cache; returns the last row of the hidden state, [1, d]."""
    device = next(decoder.parameters()).device
    hidden = decoder(input_ids=torch.tensor([list(token_ids)], device=device), past_key_values=cache,
                     use_cache=True).last_hidden_state  # [1, P, d]
    return hidden[0, -1:]  # [1, d]


def logits_rows(lm_head_weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``hidden @ W.T``: [n, d] -> [n, V] (on CPU as ``W @ hidden.T``, see lookahead.kernels)."""
    if hidden.device.type != "cpu":
        return torch.nn.functional.linear(hidden, lm_head_weight).float()  # [n, V]
    return skinny_matmul(hidden, lm_head_weight).float()  # [n, V]
